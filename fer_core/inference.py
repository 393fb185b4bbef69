"""What the model sees: any image -> its stored uint8 face, and uint8 batches -> class probabilities.

Training data, evaluation and prediction all go through this module, so a photo and the same
pixels stored as a dataset image reach the model identically. It must not import scikit-learn
(the prediction path loads it) nor streamlit.

The conversion rules, in order: honour EXIF orientation; composite transparency on white;
scale 16/32-bit and float grey to 8 bits by the range of their type (min-max only when the
values exceed it); convert to grey (or RGB); crop the centre square; resize bilinearly to the
stored side. The stored format (`ImageFormat`: 48 px grey by default, FER2013's own) is a
training choice recorded in the run's config, so prediction and export follow the run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from .image_format import DEFAULT_FORMAT, ImageFormat
from .transforms import eval_transform, tta_views

DECODE_SIDE = 1600
"""Large JPEGs decode at 1/2-1/8 scale down to this longest side, in datasets as in photos: the
DCT scaling changes pixels, so both paths must use the same scale to give the same crop. Face
detection never looks at more (its fallback works at 1280)."""
BATCH_SIZE = 256

_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "PA", "LA", "La", "RGBa")
_SIXTEEN_BIT_FULL = 65535.0


# ---- images -----------------------------------------------------------------------------

def reduce_jpeg_decode(image: Image.Image, longest_side: int | None = DECODE_SIDE) -> None:
    """Before `load()`: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (much faster)
    while its longest side stays >= `longest_side`. Other formats are left alone."""
    width, height = image.size
    if longest_side and image.format == "JPEG" and max(width, height) > longest_side:
        ratio = longest_side / max(width, height)
        # the image's own mode: a grey draft would let libjpeg, not Pillow, compute the grey
        image.draft(image.mode, (math.ceil(width * ratio), math.ceil(height * ratio)))


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        if image.getexif().get(_ORIENTATION, 1) == 1:
            return image  # exif_transpose would copy every pixel for nothing
        turned = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user the picture
        return image
    return turned if turned is not None else image


def flatten(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit "L" or "RGB" without alpha, by the rules in the module docstring.

    "L" results turn into RGB and back into the same grey values (Pillow's grey weights sum
    to one exactly), so a photo decoded to RGB and a dataset file give the same crop.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if (mode == "P" and "transparency" in image.info) or mode in _ALPHA_MODES:
        return on_white(image.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return high_depth_to_grey(image)
    return image.convert("RGB")


def on_white(rgba: Image.Image) -> Image.Image:
    """Composite onto white: transparent areas of logos and stickers are meant as background."""
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def high_depth_to_grey(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit "L" (Pillow's own convert would clip at 255).

    Scaled by the range of the type, as a photo's sample values mean: 0..65535 for integer
    modes (16-bit PNG, TIFF and PGM open as I;16 or I), 0..1 for float. A dark 16-bit photo
    stays dark. Values outside that range (negative, beyond 16 bits, float beyond 1) carry
    no known scale, so they are stretched from their minimum to their maximum.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    full = 1.0 if image.mode == "F" else _SIXTEEN_BIT_FULL
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= full:
        scaled = values * (255.0 / full)
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8 is "L"


def to_stored(image: Image.Image, image_format: ImageFormat = DEFAULT_FORMAT) -> np.ndarray:
    """Any PIL image (a dataset file, a photo, a face crop) -> the uint8 array the model is fed:
    upright, flattened, grey or RGB, centre square, bilinear resize to the stored side."""
    side = image_format.size
    converted = flatten(upright(image)).convert("L" if image_format.colour == "grey" else "RGB")
    if converted.size != (side, side):
        converted = ImageOps.fit(converted, (side, side), method=Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).copy()


# ---- the model --------------------------------------------------------------------------

@functools.cache
def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere (e.g.
    AVX2-only CPUs) torch emulates it and bfloat16 autocast is several times SLOWER than
    float32, so mixed precision must not be used there."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: trust torch's view of the vector unit
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return " avx512_bf16" in flags or " amx_bf16" in flags


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype mixed precision uses on this device, or None when it is off or
    would be slower than float32 (bfloat16 on a CPU without native support)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bfloat16() else None


def autocast_context(device: torch.device, amp: bool) -> AbstractContextManager:
    """float16 autocast on CUDA, bfloat16 on a CPU that computes it natively, else nothing."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def probabilities(model: nn.Module, images: torch.Tensor, img_size: int, *,
                  device: torch.device | None = None, amp: bool = False, tta: bool = False,
                  batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Softmax probabilities (N, classes), float32 on the CPU, for uint8 stored images: grey
    (N, H, W) or RGB (N, H, W, 3).

    `eval_transform` at `img_size`, the model in eval mode, `amp` autocast; `tta` averages the
    probabilities of `transforms.tta_views` (the face and its mirror, centred and shifted).
    """
    device = device or next(model.parameters()).device
    return averaged_probabilities(softmax_classifier(model, device, amp), images, img_size,
                                  device=device, tta=tta, batch_size=batch_size,
                                  num_classes=_num_outputs(model))


def softmax_classifier(model: nn.Module, device: torch.device, amp: bool
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a classifier of preprocessed batches: eval mode, channels_last, autocast
    where it pays, float32 softmax out."""
    model.eval()

    def classify(batch: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, amp):
            return model(batch.contiguous(memory_format=torch.channels_last)).float().softmax(1)

    return classify


@torch.inference_mode()
def averaged_probabilities(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                           img_size: int, *, device: torch.device | None = None,
                           tta: bool = False, batch_size: int = BATCH_SIZE,
                           num_classes: int = 0) -> torch.Tensor:
    """`probabilities` for any classifier: `classify` maps a preprocessed batch (N, C, S, S) to
    softmax probabilities; this function does the preprocessing, the test-time views and their
    average, so every backend (PyTorch, ONNX Runtime) gets exactly the same input."""
    if len(images) == 0:
        return torch.empty((0, num_classes))
    device = device or torch.device("cpu")
    chunks = []
    for start in range(0, len(images), batch_size):
        x = eval_transform(images[start:start + batch_size], img_size).to(device)
        views = tta_views(x) if tta else [x]
        chunk = torch.stack([classify(view).float() for view in views]).mean(0)
        chunks.append(chunk.cpu())
    return torch.cat(chunks)


def _num_outputs(model: nn.Module) -> int:
    """Classes of a classifier whose last layer is `fc` (ours), or that says (an ensemble); 0 when
    it cannot be told."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    head = getattr(model, "fc", None)
    return int(getattr(head, "out_features", 0))
