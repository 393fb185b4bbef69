"""Where the network runs: PyTorch or ONNX Runtime, behind one call.

A classifier takes a preprocessed batch (float32, (N, 3, S, S), `transforms.eval_transform`'s
output) and returns softmax probabilities (N, classes) as a float32 CPU tensor. Everything
around it (face detection, crops, the 48 px grey conversion, resizing, test-time views and their
averaging) is shared, so both backends answer the same question the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .inference import softmax_classifier
from .models import GreyAsRGB

BACKENDS = ("torch", "onnx")


class Classifier(Protocol):
    backend: str

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchClassifier:
    """A PyTorch module, with bfloat16/float16 autocast where `amp` asks for it and it pays."""

    backend = "torch"

    def __init__(self, model: nn.Module, *, amp: bool = False) -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.amp = amp
        self.device = next(self.model.parameters()).device
        self._classify = softmax_classifier(self.model, self.device, amp)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._classify(batch.to(self.device)).cpu()


class OnnxClassifier:
    """An ONNX model exported by `fer_core.export` (softmax included), run by ONNX Runtime."""

    backend = "onnx"

    def __init__(self, model: str | Path | bytes, *, num_threads: int | None = None) -> None:
        self.session = onnx_session(model, num_threads=num_threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) != 4:
            raise CheckpointError("the ONNX model does not take one (batch, channels, size, size) input")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        # exports from before the colour choice take grey faces on three ImageNet channels
        self.grey_as_rgb = GreyAsRGB() if inputs[0].shape[1] == 3 else None

    def check_fits(self, num_classes: int, channels: int, size: int) -> None:
        """Refuse, in words, a graph that does not take and give what its model card says (a
        file from elsewhere, or a card edited by hand): otherwise every image would fail."""
        _, in_channels, height, width = self.session.get_inputs()[0].shape
        outputs = self.session.get_outputs()[0].shape
        accepted = {channels, 3} if channels == 1 else {channels}  # grey exports of old took 3 channels
        problems = []
        if outputs and isinstance(outputs[-1], int) and outputs[-1] != num_classes:
            problems.append(f"it gives {outputs[-1]} probabilities for the card's {num_classes} classes")
        if isinstance(in_channels, int) and in_channels not in accepted:
            problems.append(f"it takes {in_channels}-channel images, the card says {channels}")
        if any(isinstance(side, int) and side != size for side in (height, width)):
            problems.append(f"it takes {height}x{width} px images, the card says {size}")
        if problems:
            raise CheckpointError("the ONNX model does not match its model card: " + "; ".join(problems))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.grey_as_rgb is not None and batch.shape[1] == 1:
            batch = self.grey_as_rgb(batch)
        feed = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        (probabilities,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(np.asarray(probabilities, dtype=np.float32))


def onnx_session(model: str | Path | bytes, *, num_threads: int | None = None):  # -> ort.InferenceSession
    """An ONNX Runtime CPU session tuned for a small shared machine.

    One inter-op thread and sequential execution: a ResNet is a chain, so parallel branches gain
    nothing. Intra-op threads: `num_threads`, else the cores this process may use, at most 4
    (beyond that a 48 px face gains little and a server's concurrent requests lose). Spinning
    worker threads are turned off: they burn a core between requests on a shared machine.
    """
    import onnxruntime as ort  # imported here: training and the app's other pages never need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or min(4, usable_cores())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        name = "the ONNX model" if isinstance(model, bytes) else Path(model).name
        raise CheckpointError(f"{name} cannot be opened by ONNX Runtime: {str(exc).splitlines()[0][:200]}") from exc


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
