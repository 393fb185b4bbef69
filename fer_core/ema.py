"""An exponential moving average of the weights (torch's AveragedModel), kept beside the model
being trained: validation, best.pt, the test and the published model use the average.

Averaging the last steps' weights smooths the noise of SGD's final steps, for one `lerp` per
parameter a step. Whether it scores higher on FER2013 is not measured yet (bench/accuracy.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

# The decay grows towards the configured one as (1 + n) / (WARMUP + n) after n updates (timm's
# warm-up): an average that starts at the random initial weights would otherwise take
# ~1 / (1 - decay) steps to forget them, longer than a short run lasts.
WARMUP_STEPS = 10


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay used for the update after `updates` earlier ones."""
    return min(decay, (1 + updates) / (WARMUP_STEPS + updates))


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """The moving average of `model`'s parameters and buffers (BatchNorm statistics included),
    starting from its current weights at the first update."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        weight = 1.0 - warmed_up_decay(decay, int(updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's integer batch counters: not averaged, kept as the model's
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)

    # AveragedModel deep-copies the module: the copy keeps channels_last and the device
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
