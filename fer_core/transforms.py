"""Batch transforms on whole uint8 tensors: no per-image PIL work in the epoch loop.

Images are stored as uint8 tensors: grey (N, H, W) or RGB (N, H, W, 3). The model sees float
tensors (N, C, S, S) with the images' own channels (1 or 3) in channels_last memory format:
RGB normalised by ImageNet's per-channel statistics, grey by their average (what timm uses for
one-channel inputs), so a grey first layer adapted from ImageNet filters sees familiar values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = sum(IMAGENET_MEAN) / 3
GREY_STD = sum(IMAGENET_STD) / 3


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the training augmentation; the defaults suit 48 px faces."""

    scale: tuple[float, float] = (0.85, 1.15)
    max_rotation_deg: float = 10.0
    max_translate: float = 0.08
    hflip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    erase_prob: float = 0.25


def channel_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the model input: ImageNet's for RGB, their average for grey."""
    return ((GREY_MEAN,), (GREY_STD,)) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def _as_unit_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey (N, H, W) or RGB (N, H, W, 3) -> float (N, C, H, W) in [0, 1]."""
    if images.dim() == 3:
        return images.unsqueeze(1).float().div_(255.0)
    if images.dim() == 4 and images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    raise ValueError(f"images must be grey (N, H, W) or RGB (N, H, W, 3), got shape {tuple(images.shape)}")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) in [0, 1] -> normalised by `channel_statistics`, channels_last."""
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                 for v in channel_statistics(x.shape[1]))
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def eval_transform(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """Deterministic transform used for validation, test and prediction.

    `images` is uint8 grey (N, H, W) or RGB (N, H, W, 3); returns (N, C, img_size, img_size)
    float32.
    """
    x = _as_unit_nchw(images)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                          antialias=img_size < x.shape[-1])
    return _normalise(x)


def train_transform(images: torch.Tensor, img_size: int, generator: torch.Generator,
                    aug: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Random scale, rotation, translation and flip in one affine resample, then photometric
    jitter and random erasing, all on the whole batch, on the images' device (a GPU when the
    trainer keeps the dataset there). The draws come from `generator` on the CPU, so a seed
    gives the same augmentation on any device."""
    n = images.shape[0]
    x = _as_unit_nchw(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(x.device)

    scale = uniform(*aug.scale)
    angle = uniform(-aug.max_rotation_deg, aug.max_rotation_deg) * math.pi / 180.0
    tx = uniform(-aug.max_translate, aug.max_translate) * 2
    ty = uniform(-aug.max_translate, aug.max_translate) * 2
    flip = ((torch.rand(n, generator=generator) < 0.5).float() * 2 - 1).to(x.device) if aug.hflip \
        else torch.ones(n, device=x.device)
    # affine_grid maps output coords to input coords: zoom-in by `scale` means sampling a smaller area.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, tx], dim=1),
        torch.stack([sin * flip, cos, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, x.shape[1], img_size, img_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    brightness = uniform(-aug.brightness, aug.brightness).view(n, 1, 1, 1)
    contrast = uniform(1 - aug.contrast, 1 + aug.contrast).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # one mean over the colours keeps their hue
    x = ((x - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)

    if aug.erase_prob > 0:
        x = _random_erase(x, aug.erase_prob, generator)
    return _normalise(x)


def _random_erase(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Blank one random rectangle (2-20% of the area) per selected image with noise."""
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=generator) < prob
    area = torch.rand(n, generator=generator) * 0.18 + 0.02
    aspect = torch.exp(torch.rand(n, generator=generator) * 2 * math.log(3.0) - math.log(3.0))
    eh = (torch.sqrt(area * aspect) * h).clamp(1, h).long()
    ew = (torch.sqrt(area / aspect) * w).clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1).float()).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1).float()).long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
            & chosen.view(n, 1, 1))
    noise = torch.rand(x.shape, generator=generator)
    return torch.where(mask.unsqueeze(1).to(x.device), noise.to(x.device), x)


class BatchMixer:
    """MixUp (blend two faces) and CutMix (paste a patch of one face into another), torchvision's,
    on a model-input batch: each face is paired with its neighbour in the shuffled batch, and the
    labels become the two one-hot labels mixed in the same proportion. With both on, each batch
    uses one of the two at even odds (timm's default).

    torchvision draws from torch's global generator; the draws are seeded from the epoch's
    augmentation generator instead, so a seed gives the same mixing in every run and resume."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        from torchvision.transforms import v2

        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("a BatchMixer needs MixUp or CutMix (an alpha above 0)")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft labels (N, classes)) for images (N, C, S, S) and labels (N,)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixed, targets = self.transform(images, labels)
        return mixed.contiguous(memory_format=torch.channels_last), targets


def tta_views(x: torch.Tensor, shift: int | None = None) -> list[torch.Tensor]:
    """Test-time views of a model-input batch: the image and its mirror, each centred and
    shifted by ~6% towards the four corners (a "ten-crop" that keeps the full size)."""
    size = x.shape[-1]
    shift = shift if shift is not None else max(1, round(size * 0.06))
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = [(shift, shift), (0, 0), (0, 2 * shift), (2 * shift, 0), (2 * shift, 2 * shift)]
    views = []
    for image in (x, torch.flip(x, dims=[3])):
        source = padded if image is x else torch.flip(padded, dims=[3])
        views.append(image)
        views.extend(source[..., top:top + size, left:left + size] for top, left in offsets[1:])
    return views


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Model input back to [0, 1], for image grids in TensorBoard."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in channel_statistics(x.shape[1]))
    return (x.float().cpu() * std + mean).clamp(0, 1)
