"""One typed training configuration that flows through the whole run, plus named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .models import MODES, STEMS

SCHEDULERS = ("cosine", "onecycle", "none")
OPTIMIZERS = ("adamw", "sgd")
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 512


@dataclass
class TrainConfig:
    """Everything that decides what a training run does. Written to config.json as is."""

    data: str = "demo"
    experiment: str = "default"
    mode: str = "finetune"
    stem: str = "small"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    img_size: int = 48
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    seed: int = 42
    amp: bool = True
    pretrained: bool = True
    weights: str | None = None
    patience: int = 0
    max_per_class: int | None = None
    label_smoothing: float = 0.0
    class_weights: bool = False
    augment: bool = True
    tta: bool = False
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    num_threads: int = 0
    preset: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Refuse impossible values with the reason, before any work starts."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.stem not in STEMS:
            problems.append(f"stem must be one of {', '.join(STEMS)} (got {self.stem!r})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs must be a whole number of at least 1 (got {self.epochs})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"learning rate must be a positive number (got {self.lr})")
        if not MIN_IMG_SIZE <= self.img_size <= MAX_IMG_SIZE:
            problems.append(f"image size must be between {MIN_IMG_SIZE} and {MAX_IMG_SIZE} px "
                            f"(got {self.img_size})")
        if not 0.0 <= self.val_fraction < 0.5:
            problems.append(f"validation fraction must be in [0, 0.5) (got {self.val_fraction})")
        if not 0.05 <= self.test_fraction <= 0.5:
            problems.append(f"test fraction must be in [0.05, 0.5] (got {self.test_fraction})")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.patience < 0:
            problems.append(f"patience must be 0 (off) or more (got {self.patience})")
        if self.max_per_class is not None and self.max_per_class < 2:
            problems.append(f"max per class must be at least 2 (got {self.max_per_class})")
        if not 0 < self.backbone_lr_scale <= 10:
            problems.append(f"backbone LR scale must be in (0, 10] (got {self.backbone_lr_scale})")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            problems.append(f"weight decay must be 0 or more (got {self.weight_decay})")
        if not self.experiment or any(c in self.experiment for c in "/\\:") or self.experiment in (".", ".."):
            problems.append(f"experiment name must be a plain folder name (got {self.experiment!r})")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys this version does not know (e.g. recorded extras)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Presets set the fields that matter for a recipe; anything given explicitly overrides them.
PRESETS: dict[str, dict[str, Any]] = {
    "demo-quick": dict(mode="finetune", stem="small", img_size=48, epochs=8, batch_size=64,
                       lr=2e-3, scheduler="onecycle", label_smoothing=0.05, patience=0),
    "cpu-fast": dict(mode="finetune", stem="small", img_size=48, epochs=30, batch_size=128,
                     optimizer="sgd", lr=0.1, weight_decay=5e-4, scheduler="onecycle",
                     label_smoothing=0.1, augment=True, tta=True, pretrained=False, patience=0),
    "gpu-imagenet": dict(mode="finetune", stem="imagenet", img_size=160, epochs=30,
                         batch_size=128, optimizer="sgd", lr=0.05, backbone_lr_scale=1.0,
                         weight_decay=5e-4, scheduler="onecycle", label_smoothing=0.1,
                         augment=True, tta=True, pretrained=True),
    "reference": dict(mode="head_only", stem="imagenet", img_size=224, epochs=5, batch_size=64,
                      optimizer="adamw", lr=1e-3, weight_decay=0.0, scheduler="none",
                      augment=False, label_smoothing=0.0, val_fraction=0.0, pretrained=True),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "demo-quick": "Fine-tune at 48 px for 8 epochs: learns the synthetic demo in about a minute.",
    "cpu-fast": "Recommended on a CPU: ResNet18 without max-pool at native 48 px, SGD + one-cycle, "
                "label smoothing, strong batch augmentation, flip TTA.",
    "gpu-imagenet": "For a CUDA GPU with ImageNet weights: fine-tune at 160 px with AMP.",
    "reference": "The reference configuration: frozen ImageNet backbone, head only, 224 px, "
                 "5 epochs, selection on the test split.",
}


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
