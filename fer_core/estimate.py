"""How long a run will take on this machine: measured here, never quoted from another machine.

CPUs differ far more than their core counts say: the cpu-fast recipe trains at 300+ img/s on
two cores with AVX-512 bfloat16 and at 25 img/s on two AVX2-only cores, where bfloat16 is
emulated and the trainer uses float32. So the Train page's estimate comes from a few real
training steps of the configured network on this machine (`measure_speed`), kept per machine
and per setting that changes the speed (`speed_key`) in the cache folder's speed.json, and
turned into a duration for the run's image counts (`estimate_seconds`).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import settings
from .backends import usable_cores
from .config import TrainConfig
from .image_format import ImageFormat
from .inference import autocast_context
from .models import build_model
from .runs import atomic_write_json, read_json
from .transforms import eval_transform, train_transform

SPEED_FILE = "speed.json"
TIMED_STEPS = 3  # after one warm-up step; a step of cpu-fast's batch takes seconds on a slow CPU
TTA_VIEWS = 10   # transforms.tta_views
# What decides the speed of a training step; the rest of the config (the learning rate, the
# schedule, the seed) does not.
SPEED_FIELDS = ("mode", "stem", "img_size", "batch_size", "amp", "augment", "store_size", "colour", "num_threads")


@dataclass(frozen=True)
class Speed:
    """Measured on this machine: images a second through a training step and through the
    evaluation forward pass, for one configuration."""

    train_images_per_second: float
    eval_images_per_second: float
    device: str
    measured_at: float


def speed_key(config: TrainConfig) -> str:
    """This machine (CPU model, cores, torch, GPU) and the settings that change a step's speed."""
    settings_part = ",".join(f"{name}={getattr(config, name)}" for name in SPEED_FIELDS)
    return f"{machine()}|{settings_part}"


@functools.cache
def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{_cpu_model()} x{os.cpu_count()}, torch {torch.__version__}, {gpu}"


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says (other systems have no cpuinfo)."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def known_speed(config: TrainConfig, folder: Path | None = None) -> Speed | None:
    """The speed measured earlier on this machine for this configuration, if any."""
    entry = _read_speeds(folder).get(speed_key(config))
    try:
        return Speed(**entry) if isinstance(entry, dict) else None
    except TypeError:  # an entry from another version: measure again
        return None


def measure_speed(config: TrainConfig, *, steps: int = TIMED_STEPS, folder: Path | None = None) -> Speed:
    """A warm-up step and `steps` timed training steps of the configured network on random faces
    (the trainer's augmentation, precision, memory format and threads), then the same batch
    through the evaluation forward pass; recorded in speed.json for `known_speed`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image_format = ImageFormat.of(config)
    previous_threads = torch.get_num_threads()
    # the trainer's threads, not this process's: the app itself computes on one thread
    torch.set_num_threads(config.num_threads or trainer_default_threads())
    try:
        model, _, _ = build_model(7, config.mode, config.stem, pretrained=False, in_channels=image_format.channels)
        model = model.to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        faces = torch.randint(0, 256, (config.batch_size, *image_format.shape), dtype=torch.uint8)
        labels = torch.randint(0, 7, (config.batch_size,), device=device)
        generator = torch.Generator().manual_seed(0)

        def train_step() -> None:
            x = (train_transform(faces, config.img_size, generator) if config.augment
                 else eval_transform(faces, config.img_size)).to(device)
            with autocast_context(device, config.amp):
                loss = F.cross_entropy(model(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        model.train()
        train_seconds = _timed(train_step, steps, device)
        model.eval()

        def eval_step() -> None:
            with torch.inference_mode(), autocast_context(device, config.amp):
                model(eval_transform(faces, config.img_size).to(device))

        eval_seconds = _timed(eval_step, steps, device)
    finally:
        torch.set_num_threads(previous_threads)
    images = config.batch_size * steps
    speed = Speed(images / train_seconds, images / eval_seconds, str(device), time.time())
    speeds = _read_speeds(folder)
    speeds[speed_key(config)] = asdict(speed)
    atomic_write_json(_speed_file(folder), speeds)
    return speed


def trainer_default_threads() -> int:
    """The threads a trainer started with "all cores" (num_threads 0) computes with: torch's
    default in a fresh process, OMP_NUM_THREADS or the cores this process may use."""
    with suppress(ValueError):
        if int(os.environ.get("OMP_NUM_THREADS", "")) > 0:
            return int(os.environ["OMP_NUM_THREADS"])
    return usable_cores()


def _timed(step: Any, steps: int, device: torch.device) -> float:
    step()  # warm-up: the first step allocates and picks kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max(time.perf_counter() - started, 1e-9)


def estimate_seconds(config: TrainConfig, counts: dict[str, int], speed: Speed) -> float:
    """The run's duration at `speed`: every epoch's training images and validation pass, and
    the final test pass (ten views each with test-time augmentation). Decoding, checkpoints and
    early stopping are left out: the first costs once per dataset, the others little or less."""
    train, val, test = (counts.get(split, 0) for split in ("train", "val", "test"))
    test_pass = test * (TTA_VIEWS if config.tta else 1) / speed.eval_images_per_second
    if config.mode == "head_only" and not config.augment:
        # the trainer computes the frozen backbone's features once; the head's epochs cost little
        return (train + val) / speed.eval_images_per_second + test_pass
    epoch = train / speed.train_images_per_second + val / speed.eval_images_per_second
    return config.epochs * epoch + test_pass


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min': as precise as an estimate deserves."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _speed_file(folder: Path | None) -> Path:
    return (folder or settings.cache_dir()) / SPEED_FILE


def _read_speeds(folder: Path | None) -> dict[str, Any]:
    try:
        speeds = read_json(_speed_file(folder))
    except (OSError, ValueError):
        return {}
    return speeds if isinstance(speeds, dict) else {}
