"""One typed training configuration that flows through the whole run, plus named presets.

Every field carries its own description (`setting(...)`): help text, label, choices, bounds,
the form group it is shown in. validate(), the CLI's `train` flags (fer_core.cli) and the Train
page's form (fer_core.config_form) are all generated from it, so a new hyper-parameter is one
declaration here, in the spirit of H2O LLM Studio's config metadata.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import settings
from .errors import ConfigError, DataError
from .image_format import COLOURS, STORE_SIZE


# Device nodes that a Linux GPU driver creates (NVIDIA's CUDA, AMD's ROCm). Without any of them
# torch sees no GPU, so its import (4-5 s on a small CPU) is skipped: a refused `fer train` value
# is answered at once.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def require_dataset(spec: str) -> None:
    """Refuse a dataset that is neither the built-in "demo" nor an existing path, before
    anything (the trainer's libraries, a run folder) is loaded or made for it."""
    if spec != "demo" and not Path(spec).expanduser().exists():
        raise DataError(f"dataset not found: {Path(spec).expanduser()}")


def require_new_run_inputs(config: "TrainConfig") -> None:
    """`require_dataset`, and the other files a new run reads (a resume reads neither: its split
    and weights are its own): the exclusion list and a local weights file. Refused before a run
    folder is made, not after it."""
    require_dataset(config.data)
    for noun, value in (("exclusion list", config.exclude), ("weights file", config.weights)):
        if value and not Path(value).expanduser().is_file():
            raise DataError(f"{noun} not found: {Path(value).expanduser()}")


def visible_gpu_count() -> int:
    """One training process per visible GPU by default; 1 on a machine without CUDA."""
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return 1
    import torch  # only here: the config itself loads without torch (`fer --help` stays fast)

    return max(1, torch.cuda.device_count())

MODES = ("head_only", "finetune")
# "imagenet": the torchvision stem (7x7 stride-2 conv + max-pool), made for 224 px.
# "small": the same without the max-pool, so a 48-64 px face keeps a usable feature map.
STEMS = ("imagenet", "small")
SCHEDULERS = ("cosine", "onecycle", "none")
OPTIMIZERS = ("adamw", "sgd")
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 512
MAX_NAME_LENGTH = 100
# The groups of the Train page's form, in order; a field with group None is not in the form.
FORM_GROUPS = ("basics", "optimisation", "data", "advanced")
WIDGETS = ("text", "radio", "select", "toggle", "number")
TEXT_RULES = ("folder name", "path")

# Presets set the fields that matter for a recipe; anything given explicitly overrides them.
# Defined before TrainConfig because the `preset` field takes its choices from here.
PRESETS: dict[str, dict[str, Any]] = {
    # the synthetic cartoons are learnt from scratch in a minute: no ImageNet download needed
    "demo-quick": dict(mode="finetune", stem="small", img_size=48, epochs=8, batch_size=64,
                       lr=2e-3, scheduler="onecycle", label_smoothing=0.05, patience=0, pretrained=False),
    "cpu-fast": dict(mode="finetune", stem="small", img_size=48, epochs=30, batch_size=128,
                     optimizer="sgd", lr=0.1, weight_decay=5e-4, scheduler="onecycle",
                     label_smoothing=0.1, augment=True, tta=True, pretrained=False, patience=0),
    "gpu-imagenet": dict(mode="finetune", stem="imagenet", img_size=160, epochs=30,
                         batch_size=128, optimizer="sgd", lr=0.05, backbone_lr_scale=1.0,
                         weight_decay=5e-4, scheduler="onecycle", label_smoothing=0.1,
                         augment=True, tta=True, pretrained=True),
    # random initialisation (no ImageNet weights needed): the whole dataset and its augmentation
    # on the GPU, float16 AMP, channels_last, a batch that keeps a GPU busy at 48 px
    "gpu": dict(mode="finetune", stem="small", img_size=48, epochs=60, batch_size=256, optimizer="sgd",
                lr=0.2, weight_decay=5e-4, scheduler="onecycle", label_smoothing=0.1, augment=True, tta=True,
                amp=True, pretrained=False, patience=0),
    "reference": dict(mode="head_only", stem="imagenet", img_size=224, epochs=5, batch_size=64,
                      optimizer="adamw", lr=1e-3, weight_decay=0.0, scheduler="none",
                      augment=False, label_smoothing=0.0, val_fraction=0.0, pretrained=True,
                      nproc_per_node=1),  # cached features train in one process, whatever the GPUs
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "demo-quick": "Fine-tune at 48 px for 8 epochs: learns the synthetic demo in a few minutes on a CPU.",
    "cpu-fast": "Recommended on a CPU: ResNet18 without max-pool at native 48 px, SGD + one-cycle, "
                "label smoothing, strong batch augmentation, flip TTA.",
    "gpu": "For a CUDA GPU, no ImageNet weights needed: cpu-fast's network at 48 px for 60 epochs, "
           "batch 256, the dataset and its augmentation kept on the GPU, float16 AMP. Not yet run on a GPU "
           "here: its accuracy is not measured.",
    "gpu-imagenet": "For a CUDA GPU with ImageNet weights: fine-tune at 160 px with AMP.",
    "reference": "The reference configuration: frozen ImageNet backbone, head only, 224 px, "
                 "5 epochs, selection on the test split.",
}


# ---- field metadata -------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What the app, the CLI and validate() need to know about one config field."""

    help: str
    label: str = ""             # the form's label; "" = the field name in words
    noun: str = ""              # how error messages name it; "" = the label in lower case
    group: str | None = None    # one of FORM_GROUPS, or None: not in the Train page's form
    cli: bool = True            # a `train --<name>` flag
    choices: tuple[str, ...] = ()
    choice_labels: dict[str, str] | None = None
    min_value: float | None = None
    max_value: float | None = None
    min_open: bool = False      # the bound itself is refused: (min, ...
    max_open: bool = False      # ..., max)
    zero_means: str | None = None  # 0 is also accepted and means this ("off", "all"); None-able fields store None
    unit: str = ""
    step: float | None = None
    format: str | None = None   # the form's number format, e.g. "%g"
    text: str | None = None     # one of TEXT_RULES: what a string must look like
    widget: str | None = None   # one of WIDGETS; None = from the type (bool: toggle, choices: select, ...)
    metavar: str | None = None


def setting(default: Any = dataclasses.MISSING, *, help: str,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING, **options: Any) -> Any:
    """A dataclass field with its Setting beside it: `lr: float = setting(1e-3, help=..., ...)`."""
    return field(default=default, default_factory=default_factory,
                 metadata={"setting": Setting(help=help, **options)})


@dataclass(frozen=True)
class ConfigField:
    """One TrainConfig field: its name, base type, whether None is allowed, and its Setting."""

    name: str
    kind: type                  # int, float, str, bool or dict
    optional: bool              # None is a valid value
    setting: Setting

    @property
    def label(self) -> str:
        return self.setting.label or self.name.replace("_", " ").capitalize()

    @property
    def noun(self) -> str:
        return self.setting.noun or self.label.lower()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def widget(self) -> str:
        if self.setting.widget:
            return self.setting.widget
        if self.kind is bool:
            return "toggle"
        if self.setting.choices:
            return "select"
        return "number" if self.kind in (int, float) else "text"

    def default(self) -> Any:
        item = {f.name: f for f in dataclasses.fields(TrainConfig)}[self.name]
        return item.default_factory() if item.default is dataclasses.MISSING else item.default

    def range_text(self) -> str:
        """The allowed values in words, e.g. '1 to 10000', 'in (0, 10]', '0 (off) to 1000'."""
        s = self.setting
        if s.choices:
            return "one of " + ", ".join(s.choices)
        if s.min_value is None and s.max_value is None:
            return ""
        low, high = _number(s.min_value), _number(s.max_value)
        unit = f" {s.unit}" if s.unit else ""
        # a 0 that means something ("off", "all") below the range is named after it
        zero_apart = f", or 0 ({s.zero_means})" if s.zero_means and s.min_value and s.min_value > 0 else ""
        if self.kind is int and not s.min_open and not s.max_open:
            if s.zero_means and s.min_value == 0:
                low = f"0 ({s.zero_means})"
            return f"{low} to {high}{unit}{zero_apart}"
        return f"in {'(' if s.min_open else '['}{low}, {high}{')' if s.max_open else ']'}{unit}{zero_apart}"

    def problem(self, value: Any) -> str | None:
        """Why `value` cannot be this field's value, in one line naming the field; None if it can."""
        s = self.setting
        if value is None:
            return None if self.optional else f"{self.noun} must be given"
        if self.kind is bool:
            return None if isinstance(value, bool) else f"{self.noun} must be true or false (got {_shown(value)})"
        if self.kind is dict:
            return None if isinstance(value, dict) else f"{self.noun} must be a mapping (got {_shown(value)})"
        if self.kind is str:
            if not isinstance(value, str):
                return f"{self.noun} must be text (got {_shown(value)})"
            if s.choices and value not in s.choices:
                return f"{self.noun} must be one of {', '.join(s.choices)} (got {_shown(value)})"
            return _text_problem(self.noun, value, s.text)
        # numbers: bool is an int to Python, never to a user
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{self.noun} must be a whole number (got {_shown(value)})"
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{self.noun} must be a number (got {_shown(value)})"
        if not math.isfinite(value):
            return f"{self.noun} must be a finite number (got {_shown(value)})"
        if s.zero_means and value == 0:
            return None
        too_low = s.min_value is not None and (value <= s.min_value if s.min_open else value < s.min_value)
        too_high = s.max_value is not None and (value >= s.max_value if s.max_open else value > s.max_value)
        if too_low or too_high:
            between = self.range_text()
            verb = "be" if between.startswith("in ") else "be from"
            return f"{self.noun} must {verb} {between} (got {_shown(value)})"
        return None

    def normalise(self, value: Any) -> Any:
        """The stored form of a value: 0 -> None where 0 means off for a None-able field, and a
        whole number -> float for a float field (JSON and presets write 1 for 1.0)."""
        if isinstance(value, bool):
            return value
        if self.optional and self.setting.zero_means and isinstance(value, (int, float)) and value == 0:
            return None
        if self.kind is float and isinstance(value, int):
            return float(value)
        return value


def _host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _number(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _control_character(value: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)


def _text_problem(noun: str, value: str, rule: str | None) -> str | None:
    if rule == "path":
        if not value.strip():
            return f"{noun} must not be empty"
        if _control_character(value):
            return f"{noun} must not contain control characters (got {_shown(value)})"
    elif rule == "folder name":
        # The name becomes one folder of the run path and an argument of later commands:
        # a separator would escape the runs folder, a leading '-' reads as an option, a
        # leading '.' hides the folder (or is '..').
        reason = None
        if not value:
            reason = "not empty"
        elif len(value) > MAX_NAME_LENGTH:
            reason = f"at most {MAX_NAME_LENGTH} characters"
        elif _control_character(value):
            reason = "no control characters"
        elif any(c in value for c in "/\\:"):
            reason = "no '/', '\\' or ':'"
        elif value[0] in "-.":
            reason = "not starting with '-' or '.'"
        elif value != value.strip():
            reason = "no leading or trailing spaces"
        if reason:
            return f"{noun} must be a plain folder name: {reason} (got {_shown(value)})"
    return None


def folder_name_problem(noun: str, value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why `value` cannot be a plain folder name (as an experiment name must be), or None."""
    if isinstance(value, str) and len(value) > max_length:
        return f"{noun} must be a plain folder name: at most {max_length} characters (got {_shown(value)})"
    return _text_problem(noun, value, "folder name")


def _describe(cls: type) -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(cls)
    described = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kind = typing.get_origin(base) or base
        if "setting" not in item.metadata:
            raise TypeError(f"TrainConfig.{item.name} needs a setting(...) with its help text")
        described.append(ConfigField(item.name, kind, optional, item.metadata["setting"]))
    return tuple(described)


# ---- the config -----------------------------------------------------------------------

MODE_LABELS = {"finetune": "Fine-tune all layers", "head_only": "Head only (frozen backbone)"}
STEM_LABELS = {"small": "Small: no max-pool (48-96 px faces)", "imagenet": "ImageNet: standard (112-224 px)"}
COLOUR_LABELS = {"grey": "Grey (1 channel)", "rgb": "RGB (3 channels)"}


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Written to config.json as is."""

    data: str = setting(
        "demo", text="path", metavar="{demo|DIR|FILE.csv}",
        # the page offers the datasets it discovered instead of a free-text field
        help="demo, a folder of class folders, a folder with train/ and test/, or fer2013.csv")
    experiment: str = setting(
        "default", group="basics", label="Experiment name", text="folder name", metavar="NAME",
        help="A folder name grouping related runs, e.g. 'lr-sweep'.")
    mode: str = setting(
        "finetune", group="basics", choices=MODES, choice_labels=MODE_LABELS, widget="radio",
        help="Head only trains just the final layer on top of a frozen backbone: fast, but it needs "
             "ImageNet weights to be any good. Fine-tuning trains every layer: slower, better.")
    stem: str = setting(
        "small", group="basics", choices=STEMS, choice_labels=STEM_LABELS, widget="radio",
        help="The small stem drops ResNet's max-pool so 48 px faces keep enough resolution; "
             "use the ImageNet stem for 112-224 px inputs.")
    epochs: int = setting(
        10, group="basics", min_value=1, max_value=10_000, step=1, metavar="N",
        help="Passes over the training images.")
    batch_size: int = setting(
        64, group="optimisation", min_value=1, max_value=65_536, step=16, metavar="N",
        help="Images per optimisation step. Larger is faster per image but needs more memory.")
    lr: float = setting(
        1e-3, group="optimisation", label="Learning rate", min_value=1e-7, max_value=10.0,
        step=1e-4, format="%g", metavar="LR",
        help="Peak learning rate. SGD likes ~0.05-0.1, AdamW ~1e-3.")
    backbone_lr_scale: float = setting(
        1.0, group="advanced", label="Backbone LR scale", noun="backbone LR scale", min_value=1e-3, max_value=10.0,
        step=0.1, format="%g", metavar="F",
        help="When fine-tuning, the backbone learns at LR x this (the new head at LR).")
    weight_decay: float = setting(
        0.05, group="optimisation", min_value=0.0, max_value=1.0, step=1e-4, format="%g", metavar="F",
        help="L2 regularisation strength.")
    optimizer: str = setting(
        "adamw", group="optimisation", choices=OPTIMIZERS, help="SGD with Nesterov momentum, or AdamW.")
    scheduler: str = setting(
        "cosine", group="optimisation", label="LR schedule", noun="scheduler", choices=SCHEDULERS,
        help="One-cycle warms up then anneals; cosine anneals; none keeps the LR fixed.")
    warmup_epochs: float = setting(
        0.0, group="advanced", label="Warm-up epochs", min_value=0.0, max_value=10_000.0, step=0.5,
        format="%g", metavar="X",
        help="Epochs of linear LR warm-up before the cosine schedule (one-cycle has its own); "
             "at most the number of epochs.")
    img_size: int = setting(
        48, group="basics", label="Image size (px)", noun="image size", unit="px",
        min_value=MIN_IMG_SIZE, max_value=MAX_IMG_SIZE, step=16, metavar="PX",
        help="The network's input: stored faces are resized to this. 48-64 px is fast on a CPU; "
             "224 px is the reference setting, many times slower on a CPU, and rarely better for "
             "48 px source images.")
    store_size: int = setting(
        STORE_SIZE, group="data", label="Stored face size (px)", noun="stored face size", unit="px",
        min_value=16, max_value=512, step=8, metavar="PX",
        help="Faces are decoded once at this size and kept in the cache. 48 px is FER2013's own; "
             "96-112 px keeps the detail of sharper sources such as RAF-DB (100 px) or AffectNet.")
    colour: str = setting(
        "grey", group="data", choices=COLOURS, choice_labels=COLOUR_LABELS, widget="radio",
        help="Grey suits FER2013 (grey by nature): the first layer takes one channel, with "
             "ImageNet's filters summed. RGB keeps colour datasets' colour: three channels.")
    val_fraction: float = setting(
        0.1, group="data", label="Validation fraction", min_value=0.0, max_value=0.5, max_open=True,
        step=0.05, metavar="F",
        help="Share of the training images held out to pick the best epoch. 0 selects on the test "
             "split (the reference's way, optimistic).")
    test_fraction: float = setting(
        0.25, group="data", min_value=0.05, max_value=0.5, step=0.05, metavar="F",
        help="Share of all images kept for the test (ignored when the source has its own split).")
    seed: int = setting(
        42, group="data", min_value=0, max_value=2**32 - 1, step=1, metavar="N",
        help="Fixes the split, the shuffling and the augmentation: same seed, same run.")
    amp: bool = setting(
        True, group="advanced", label="Mixed precision (AMP)", noun="AMP",
        help="Mixed precision: bfloat16 on the CPU, float16 on CUDA. Faster, same accuracy.")
    pretrained: bool = setting(
        True, group="basics", label="Start from ImageNet weights", noun="pretrained",
        help="Start from ImageNet weights (downloaded; if that fails the run says so and starts "
             "from random weights).")
    weights: str | None = setting(
        None, text="path", noun="weights file", metavar="FILE",
        # a file on the machine that trains: the CLI's business, not the browser's
        help="A local torchvision ResNet18 state dict to start from instead of downloading ImageNet weights.")
    patience: int = setting(
        0, group="optimisation", label="Early-stopping patience (epochs)", noun="patience",
        min_value=0, max_value=10_000, zero_means="off", step=1, metavar="N",
        help="Stop after this many epochs without validation improvement (0 = never).")
    max_per_class: int | None = setting(
        None, group="data", label="Max training images per class (0 = all)", noun="max per class",
        min_value=2, max_value=10**9, zero_means="all", step=50, metavar="N",
        help="Use at most this many training images per class (0 = all): for quick trials. "
             "Validation and test images are never capped, so the test score is comparable.")
    label_smoothing: float = setting(
        0.0, group="optimisation", min_value=0.0, max_value=1.0, max_open=True, step=0.05, metavar="F",
        help="Softens the targets (e.g. 0.1); helps with noisy labels like FER2013's.")
    class_weights: bool = setting(
        False, group="data", help="Weight the loss by inverse class frequency so rare classes (disgust) count.")
    augment: bool = setting(
        True, group="data", label="Augmentation",
        help="Random crops, flips, small rotations, brightness/contrast and erasing while training.")
    mixup: float = setting(
        0.0, group="data", label="MixUp alpha (0 = off)", noun="MixUp alpha", min_value=0.01, max_value=10.0,
        zero_means="off", step=0.1, format="%g", metavar="ALPHA",
        help="Blend pairs of training faces and mix their labels alike (torchvision's MixUp); the "
             "blend's share is drawn from Beta(alpha, alpha), e.g. 0.2. A regulariser for long runs.")
    cutmix: float = setting(
        0.0, group="data", label="CutMix alpha (0 = off)", noun="CutMix alpha", min_value=0.01, max_value=10.0,
        zero_means="off", step=0.1, format="%g", metavar="ALPHA",
        help="Paste a patch of one training face into another, labels mixed by area (torchvision's "
             "CutMix), e.g. 1.0. With MixUp on too, each batch uses one of the two.")
    ema_decay: float = setting(
        0.0, group="optimisation", label="Weight averaging: EMA decay (0 = off)", noun="EMA decay",
        min_value=0.5, max_value=1.0, max_open=True, zero_means="off", step=0.0001, format="%g", metavar="D",
        help="Keep an exponential moving average of the weights, updated every step with this decay "
             "(e.g. 0.999, about the last 1,000 steps), and validate, test and publish the average "
             "instead of the last weights.")
    tta: bool = setting(
        False, group="advanced", label="Test-time augmentation (10 views)", noun="TTA",
        help="Test-time augmentation: average the prediction over ten views (the face and its mirror, "
             "centred and shifted); evaluation takes 10x as long.")
    # not text="path": that rule refuses "", and "" is the usual value here (nothing left out)
    exclude: str = setting(
        "", group="advanced", label="Exclusion list (dataset doctor)", noun="exclusion list", metavar="FILE.json",
        help="Leave out the images listed in this file, written by the dataset doctor (Data page, or "
             "`fer doctor DATA --write-exclusions`); empty uses every image. The run keeps a copy.")
    runs_dir: str = setting(
        default_factory=lambda: str(settings.runs_dir()), text="path", noun="runs folder", metavar="DIR",
        help="Where run folders go (default runs/, or $FER_RUNS_DIR).")
    checkpoints_dir: str = setting(
        default_factory=lambda: str(settings.checkpoints_dir()), text="path", noun="checkpoints folder",
        metavar="DIR",
        help="Where finished best models are published (default checkpoints/, or $FER_CHECKPOINTS_DIR).")
    num_threads: int = setting(
        0, group="advanced", label="CPU threads (0 = all cores)", noun="CPU threads",
        min_value=0, max_value=256, zero_means="all cores", step=1, metavar="N",
        help="Threads the training process may use on the CPU. Fewer is faster when other programs "
             "keep the cores busy: oversubscribed cores slow training sharply.")
    nproc_per_node: int = setting(
        default_factory=visible_gpu_count, group="advanced", label="Processes per machine",
        noun="processes per machine",
        min_value=1, max_value=64, step=1, metavar="N",
        help="Training processes on this machine (DistributedDataParallel under torchrun): one per "
             "GPU (the default: one per visible GPU, 1 without one); on a CPU more than 1 only "
             "splits the cores.")
    nnodes: int = setting(
        1, group="advanced", label="Machines", noun="number of machines",
        min_value=1, max_value=1024, step=1, metavar="M",
        help="Machines taking part. This one is machine 0 and writes the run folder; the run's page "
             "shows the command to start on each of the others (same dataset path there).")
    node_rank: int = setting(
        0, label="This machine's rank", noun="node rank", min_value=0, max_value=1023, step=1, metavar="R",
        help="0 on the machine that writes the run folder, 1..M-1 on the others.")
    rdzv_endpoint: str = setting(
        "", group="advanced", label="Rendezvous endpoint (HOST:PORT)", noun="rendezvous endpoint", metavar="HOST:PORT",
        help="Where the machines meet: HOST:PORT of machine 0, reachable from all; empty on one "
             "machine (127.0.0.1 and a free port).")
    preset: str | None = setting(
        None, cli=False, choices=tuple(PRESETS),  # the CLI's --preset applies one; this records it
        help="The recipe this config started from (recorded; its values are already applied).")
    notes: dict[str, Any] = setting(
        default_factory=dict, cli=False, help="Free-form notes recorded with the run.")

    def __post_init__(self) -> None:
        for item in CONFIG_FIELDS:
            setattr(self, item.name, item.normalise(getattr(self, item.name)))

    def validate(self) -> "TrainConfig":
        """Refuse impossible values with the reason, before any work starts.

        Types, bounds and choices come from each field's setting; the rules that tie two fields
        together are below."""
        problems = [p for item in CONFIG_FIELDS if (p := item.problem(getattr(self, item.name)))]
        both_fine = not any(FIELDS_BY_NAME[n].problem(getattr(self, n)) for n in ("warmup_epochs", "epochs"))
        if both_fine and self.warmup_epochs > self.epochs:
            problems.append(f"warm-up epochs must not exceed epochs ({_number(self.warmup_epochs)} > "
                            f"{self.epochs})")
        mixing = any(isinstance(v, (int, float)) and v > 0 for v in (self.mixup, self.cutmix))
        if mixing and self.mode == "head_only" and not self.augment:
            problems.append("MixUp and CutMix mix images, and head-only training without augmentation trains "
                            "on features computed once: turn augmentation on, or MixUp and CutMix off")
        problems += self._distributed_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _distributed_problems(self) -> list[str]:
        problems = []
        if isinstance(self.nnodes, int) and isinstance(self.node_rank, int) and self.node_rank >= self.nnodes:
            problems.append(f"node rank must be below the number of machines ({self.node_rank} >= {self.nnodes})")
        if isinstance(self.nnodes, int) and self.nnodes > 1 and not self.rdzv_endpoint:
            problems.append("several machines need a rendezvous endpoint (HOST:PORT of machine 0)")
        if self.rdzv_endpoint and not _host_port(self.rdzv_endpoint):
            problems.append(f"rendezvous endpoint must be HOST:PORT (got {_shown(self.rdzv_endpoint)})")
        several = (isinstance(self.nproc_per_node, int) and self.nproc_per_node > 1) or \
            (isinstance(self.nnodes, int) and self.nnodes > 1)
        if several and self.mode == "head_only" and not self.augment:
            # that path trains a linear head on features cached once: nothing worth distributing
            problems.append("head-only training without augmentation (cached features) runs in one "
                            "process: set processes per machine and machines to 1, or turn augmentation on")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys this version does not know (e.g. recorded extras)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


CONFIG_FIELDS: tuple[ConfigField, ...] = _describe(TrainConfig)
# Where a run's processes run, not what it learns: a resume may change them (a 2-process run
# continues in 1 process and vice versa), and the worker processes ignore them (torchrun's
# environment says who they are).
LAUNCH_FIELDS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")
FIELDS_BY_NAME: dict[str, ConfigField] = {item.name: item for item in CONFIG_FIELDS}


def command_line_flags(config: TrainConfig, *, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The `fer train` flags that give `config`: one per field whose value is not the default."""
    flags = []
    for item in CONFIG_FIELDS:
        value = getattr(config, item.name)
        if not item.setting.cli or item.name in leave_out or value == item.default() or value is None:
            continue
        if item.kind is bool:
            flags.append(item.flag if value else "--no-" + item.flag.removeprefix("--"))
        else:
            flags += [item.flag, str(value)]
    return flags


def config_field(name: str) -> ConfigField:
    return FIELDS_BY_NAME[name]


def config_from_preset(preset: str | None, **overrides: Any) -> TrainConfig:
    """A config from a preset's values with explicit overrides applied on top."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values).validate()
