"""ResNet18 for emotion classes: build it, load weights honestly, restore it from a checkpoint."""

from __future__ import annotations

import io
import logging
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from .config import MODES, STEMS
from .errors import CheckpointError
from .image_format import DEFAULT_FORMAT, ImageFormat
from .runs import atomic_write_bytes
from .transforms import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fer_core.checkpoint/1"
WEIGHTS_DOWNLOAD_TIMEOUT_S = 15.0


def build_model(num_classes: int, mode: str = "finetune", stem: str = "imagenet",
                pretrained: bool = True, weights_path: str | None = None,
                in_channels: int = DEFAULT_FORMAT.channels
                ) -> tuple[nn.Module, str, str | None]:
    """Return (model, weights_source, warning). `in_channels`: 1 for grey faces, 3 for RGB.

    weights_source is "imagenet", "file:<path>" or "random"; warning says why pretrained
    weights were wanted but not used, or is None.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    model = resnet18(weights=None)
    source, warning = "random", None
    if weights_path:
        _load_backbone_state(model, _read_state_dict(Path(weights_path)))
        source = f"file:{weights_path}"
    elif pretrained:
        try:
            _load_backbone_state(model, _download_imagenet_state())
            source = "imagenet"
        except Exception as exc:  # offline, DNS failure, proxy, corrupt cache: all mean "no weights"
            warning = ("ImageNet weights could not be downloaded, so training starts from random "
                       "weights. Pass --weights FILE to use a local copy of resnet18-f37072fd.pth.")
            log.warning("%s (%s: %s)", warning, type(exc).__name__, exc)  # the details go to the log
    if in_channels == 1:
        model.conv1 = grey_first_layer(model.conv1, from_pretrained=source != "random")
    if stem == "small":
        model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    set_trainable(model, mode)
    return model, source, warning


def grey_first_layer(conv: nn.Conv2d, from_pretrained: bool) -> nn.Conv2d:
    """A one-channel copy of ResNet's first convolution. From ImageNet filters, each output's
    three colour filters are summed, each scaled by GREY_STD / its channel's std: on a grey face
    that is exactly the response to the face repeated on three ImageNet-normalised channels, up
    to a constant per filter that the next BatchNorm absorbs. Summing keeps a third of the first
    layer's input traffic and compute, where repeating the image would triple it for nothing.
    From random weights, a fresh layer with torchvision's initialisation."""
    grey = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    if from_pretrained:
        scale = torch.tensor([GREY_STD / s for s in IMAGENET_STD]).view(1, 3, 1, 1)
        grey.weight.data.copy_((conv.weight.data * scale).sum(1, keepdim=True))
    else:
        nn.init.kaiming_normal_(grey.weight, mode="fan_out", nonlinearity="relu")
    return grey


class GreyAsRGB(nn.Module):
    """Before a first layer trained on grey faces repeated on three ImageNet-normalised channels
    (every run before the colour choice existed): turns today's one-channel grey input into
    exactly those three channels, so old checkpoints predict as they were evaluated."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", GREY_STD / std, persistent=False)
        self.register_buffer("shift", (GREY_MEAN - mean) / std, persistent=False)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return grey * self.scale + self.shift


def _download_imagenet_state() -> dict[str, torch.Tensor]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(WEIGHTS_DOWNLOAD_TIMEOUT_S)  # never hang on a silent network
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a loadable PyTorch weights file: {exc}") from exc
    if isinstance(state, dict) and "model_state" in state:
        state = state["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def _load_backbone_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load everything but the classifier, which is replaced for our classes anyway."""
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError("weights are not a torchvision ResNet18 state dict "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def set_trainable(model: nn.Module, mode: str) -> None:
    """head_only freezes everything but `fc`; finetune trains all layers."""
    for name, param in model.named_parameters():
        param.requires_grad = mode == "finetune" or name.startswith("fc.")


def freeze_batchnorm_if_head_only(model: nn.Module, mode: str) -> None:
    """A frozen backbone must also keep its BatchNorm statistics fixed."""
    if mode == "head_only":
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """The new head learns at `lr`; a fine-tuned backbone at `lr * backbone_lr_scale`."""
    head = [p for n, p in model.named_parameters() if n.startswith("fc.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.") and p.requires_grad]
    groups = [{"params": head, "lr": lr}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_scale})
    return groups


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints safely (weights_only) and check it is complete."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # PyTorch's own message suggests weights_only=False, which is exactly what must not be
        # done with a file from elsewhere; say what happened instead.
        raise CheckpointError(f"{path.name} is not a safe fer_core checkpoint: it could not be read "
                              "with weights_only=True (it is corrupt, from another tool, or would run "
                              f"code when loaded; {type(exc).__name__})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path.name} is not a fer_core checkpoint (no dict inside)")
    missing = [k for k in ("model_state", "class_names", "config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path.name} is not a fer_core checkpoint: missing {', '.join(missing)}")
    return ckpt


def save_checkpoint_file(path: Path, payload: dict[str, Any]) -> None:
    """torch.save, atomically. Serialised in memory first: torch reports a full disk as a
    RuntimeError from its zip writer, a plain write reports it as OSError (ENOSPC)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getbuffer())


def weights_are_finite(state: dict[str, Any]) -> bool:
    """False when any floating-point tensor holds NaN or inf (a diverged model)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def resnet_from_state(state: dict[str, Any], num_classes: int, stem: str, image_format: ImageFormat,
                      name: str = "the checkpoint", prefix: str = "") -> nn.Module:
    """Our ResNet18 with the weights under `prefix` in `state`. Its first layer takes the
    channels it was trained with; a 3-channel layer trained on grey faces (runs from before the
    colour choice) gets `GreyAsRGB` in front, so it takes today's one-channel grey input."""
    wrapped = f"{prefix}conv1.1.weight" in state  # saved with GreyAsRGB already in front
    first = state.get(f"{prefix}conv1.1.weight" if wrapped else f"{prefix}conv1.weight")
    channels = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 4 else image_format.channels
    if channels != image_format.channels and (channels, image_format.colour) != (3, "grey"):
        raise CheckpointError(f"{name}: its first layer takes {channels} channel(s), but its faces "
                              f"are stored {image_format.colour}")
    model, _, _ = build_model(num_classes, mode="finetune", stem=stem, pretrained=False, in_channels=channels)
    if channels != image_format.channels:
        model.conv1 = nn.Sequential(GreyAsRGB(), model.conv1)
    load_weights(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model


def load_weights(model: nn.Module, state: dict[str, Any]) -> None:
    """`model.load_state_dict(state)`, whether or not either side has `GreyAsRGB` in front of its
    first layer: an old grey run resumed today saves its first layer as conv1.1, and its earlier
    checkpoints call it conv1."""
    model_wrapped, state_wrapped = isinstance(model.conv1, nn.Sequential), "conv1.1.weight" in state
    if model_wrapped != state_wrapped:
        old, new = ("conv1.", "conv1.1.") if model_wrapped else ("conv1.1.", "conv1.")
        state = {(new + key[len(old):] if key.startswith(old) else key): value for key, value in state.items()}
    model.load_state_dict(state)


def model_from_checkpoint(ckpt: dict[str, Any], name: str = "the checkpoint") -> nn.Module:
    """Rebuild the trained network from a loaded checkpoint, in eval mode on the CPU; anything
    that does not fit (unknown stem, odd weights, a class list of another length) is a
    CheckpointError that says so, naming the file as `name`."""
    config = ckpt["config"]
    classes = ckpt["class_names"]
    if isinstance(ckpt["model_state"], dict) and not weights_are_finite(ckpt["model_state"]):
        raise CheckpointError("this model's weights contain NaN or inf (its training diverged): "
                              "it cannot make predictions")
    try:
        if "ensemble" in ckpt:  # several runs' networks averaged (fer_core.ensemble)
            from .ensemble import network_from_checkpoint
            return network_from_checkpoint(ckpt)
        model = resnet_from_state(ckpt["model_state"], len(classes), config.get("stem", "imagenet"),
                                  ImageFormat.of(config), name)
    except CheckpointError:
        raise
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: its weights do not fit a ResNet18 with "
                              f"{len(classes)} classes: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # unknown stem, non-tensor weights, ...: all "not our checkpoint"
        raise CheckpointError(f"{name} cannot be turned into a model: {type(exc).__name__}: {exc}") from exc
    return model.eval()
