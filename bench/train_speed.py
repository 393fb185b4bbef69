"""Training speed: the reference pipeline against fer_core's, on the same FER2013 images.

The reference (the notebook this project grew from): torchvision ImageFolder + PIL transforms
at 224 px, an ImageNet ResNet18 whose frozen backbone is recomputed for every image of every
epoch, fp32. Ours: images decoded once into a uint8 tensor, batch transforms, bfloat16
autocast + channels_last on CPU (float16 AMP on CUDA), a heap allocator that reuses freed
activations, and for head-only training the frozen backbone's features computed once.

(a) 5 head-only epochs, end to end (ours is the full `fit`: data, training, checkpoints,
    TensorBoard, test evaluation), both selecting on the test split as the reference did.
(b) Fine-tuning throughput in images/s at the same input size and batch size: one epoch of
    each loop over the same images, first batch included. Ours is fer_core's trainer itself.

Each measurement runs in a fresh process.

Usage: python bench/train_speed.py [--data ../shared/datasets/fer2013] [--per-class 60]
The last line is machine readable: head_only_speedup=.. finetune_speedup=..
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms
from torchvision.models import resnet18

from fer_core.config import TrainConfig
from fer_core.memory import keep_freed_memory_for_reuse
from fer_core.train import fit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_subset(source: Path, dest: Path, per_class: int, seed: int = 0) -> Path:
    """Symlink a fixed random subset of train/ and test/ into dest (nothing is copied)."""
    rng = random.Random(seed)
    for split, count in (("train", per_class), ("test", max(1, per_class // 3))):
        for class_dir in sorted((source / split).iterdir()):
            files = sorted(class_dir.iterdir())
            rng.shuffle(files)
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in files[:count]:
                (target / f.name).symlink_to(f.resolve())
    return dest


def reference_model(num_classes: int, head_only: bool) -> nn.Module:
    model = resnet18(weights=None)  # ImageNet weights cannot be downloaded here; speed is the same
    if head_only:
        for p in model.parameters():
            p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def reference_loader(folder: Path, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    transform = transforms.Compose([
        transforms.Grayscale(num_output_channels=3), transforms.Resize((224, 224)),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), transform=transform),
                                       batch_size=batch_size, shuffle=shuffle, num_workers=0)


def reference_head_only(subset: Path, epochs: int) -> float:
    """The reference loop: every epoch decodes with PIL and runs the frozen backbone again."""
    torch.manual_seed(0)
    train = reference_loader(subset / "train", 64, True)
    test = reference_loader(subset / "test", 64, False)
    model = reference_model(len(train.dataset.classes), head_only=True)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x, y in test:
                model(x)
    return time.perf_counter() - started


def ours_head_only(subset: Path, epochs: int, workdir: Path) -> float:
    config = TrainConfig(data=str(subset), mode="head_only", stem="imagenet", img_size=224, epochs=epochs,
                         batch_size=64, lr=1e-3, augment=False, val_fraction=0.0, scheduler="none",
                         pretrained=False, amp=True, runs_dir=str(workdir / "runs"),
                         checkpoints_dir=str(workdir / "ckpt"))
    started = time.perf_counter()
    fit(config)
    return time.perf_counter() - started


def reference_finetune_rate(subset: Path, batch_size: int) -> float:
    """One epoch of the reference's fine-tuning loop (PIL decoding included), in images/s."""
    torch.manual_seed(0)
    loader = reference_loader(subset / "train", batch_size, True)
    model = reference_model(len(loader.dataset.classes), head_only=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    started, images = time.perf_counter(), 0
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        images += len(y)
    return images / (time.perf_counter() - started)


def ours_finetune_rate(subset: Path, batch_size: int, workdir: Path) -> float:
    """One fine-tuning epoch of fer_core's own trainer at 224 px, as its metrics record it."""
    config = TrainConfig(data=str(subset), mode="finetune", stem="imagenet", img_size=224, epochs=1,
                         batch_size=batch_size, optimizer="adamw", lr=1e-4, augment=True,
                         val_fraction=0.0, scheduler="none", pretrained=False, amp=True, tta=False,
                         runs_dir=str(workdir / "runs"), checkpoints_dir=str(workdir / "ckpt"))
    run_dir = fit(config)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["images_per_second"]


def measure(name: str, subset: Path, args: argparse.Namespace, workdir: Path) -> float:
    if name == "reference-head-only":
        return reference_head_only(subset, args.epochs)
    if name == "ours-head-only":
        return ours_head_only(subset, args.epochs, workdir)
    if name == "reference-finetune":
        return reference_finetune_rate(subset, args.batch_size)
    if name == "reference-finetune-with-our-allocator":
        keep_freed_memory_for_reuse()
        return reference_finetune_rate(subset, args.batch_size)
    if name == "ours-finetune":
        return ours_finetune_rate(subset, args.batch_size, workdir)
    raise ValueError(name)


def measure_in_fresh_process(name: str, subset: Path, args: argparse.Namespace, workdir: Path) -> float:
    """Each pipeline gets its own process, as a user's run would: no allocator state, cache or
    thread pool carries over from one measurement to the next."""
    command = [sys.executable, __file__, "--measure", name, "--subset", str(subset),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir,
                            env={**os.environ, "FER_CACHE_DIR": str(workdir / "cache")})
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/fer2013"))
    parser.add_argument("--per-class", type=int, default=150, help="train images per class (test: a third)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="the reference configuration's batch size")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--subset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # one measurement, in the fresh process measure_in_fresh_process started
        print(measure(args.measure, Path(args.subset), args, Path.cwd()))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subset = make_subset(Path(args.data), work / "subset", args.per_class)
        n_train = sum(1 for _ in (subset / "train").rglob("*.jpg"))
        print(f"subset: {n_train} train images, batch {args.batch_size}, {args.epochs} head-only epochs at 224 px")
        rates = {name: measure_in_fresh_process(name, subset, args, work) for name in (
            "reference-head-only", "ours-head-only", "reference-finetune", "ours-finetune",
            "reference-finetune-with-our-allocator")}
    head_only_speedup = rates["reference-head-only"] / rates["ours-head-only"]
    finetune_speedup = rates["ours-finetune"] / rates["reference-finetune"]
    print(f"(a) head-only {args.epochs} epochs: reference {rates['reference-head-only']:.1f} s, "
          f"ours {rates['ours-head-only']:.1f} s -> {head_only_speedup:.1f}x")
    print(f"(b) fine-tune one epoch at 224 px: reference {rates['reference-finetune']:.1f} img/s (fp32, PIL), "
          f"ours {rates['ours-finetune']:.1f} img/s (fer_core's trainer: bf16 + channels_last, tensor "
          f"batches, heap allocator) -> {finetune_speedup:.1f}x")
    print(f"    attribution: the reference with our allocator setting alone runs at "
          f"{rates['reference-finetune-with-our-allocator']:.1f} img/s "
          f"({rates['reference-finetune-with-our-allocator'] / rates['reference-finetune']:.2f}x)")
    print(f"head_only_speedup={head_only_speedup:.1f} finetune_speedup={finetune_speedup:.1f}")


if __name__ == "__main__":
    main()
