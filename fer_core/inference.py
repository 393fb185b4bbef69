"""What the model sees: uint8 batches of stored faces -> class probabilities.

Training data, evaluation and prediction all go through this module and `pixels` (which turns
any image into its stored face), so a photo and the same pixels stored as a dataset image reach
the model identically. It must not import scikit-learn (the prediction path loads it) nor
streamlit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from .transforms import eval_transform, tta_views

BATCH_SIZE = 256


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
