"""Training speed: the reference pipeline against fer_core's, on the same FER2013 images.

The reference (the notebook this project grew from): torchvision ImageFolder + PIL transforms
at 224 px, an ImageNet ResNet18 whose frozen backbone is recomputed for every image of every
epoch, fp32. Ours: images decoded once into a uint8 tensor, batch transforms, bfloat16
autocast + channels_last on CPU (float16 AMP on CUDA), and for head-only training the frozen
backbone's features computed once.

(a) 5 head-only epochs, end to end (ours is the full `fit`: data, training, checkpoints,
    TensorBoard, test evaluation), both selecting on the test split as the reference did.
(b) Fine-tuning throughput in images/s at the same input size.

Usage: python bench/train_speed.py [--data ../shared/datasets/fer2013] [--per-class 60]
The last line is machine readable: head_only_speedup=.. finetune_speedup=..
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms
from torchvision.models import resnet18

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fer_core.config import TrainConfig  # noqa: E402
from fer_core.train import fit  # noqa: E402

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


def reference_finetune_rate(subset: Path, batches: int, batch_size: int) -> float:
    loader = reference_loader(subset / "train", batch_size, True)
    model = reference_model(len(loader.dataset.classes), head_only=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    return _time_batches(iter(loader), batches, batch_size,
                         lambda x, y: _step(model, optimizer, criterion, x, y, amp=False))


def ours_finetune_rate(subset: Path, batches: int, batch_size: int) -> float:
    from fer_core.data import load_dataset
    from fer_core.transforms import train_transform
    dataset = load_dataset(str(subset))
    model = reference_model(len(dataset.classes), head_only=False).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)

    def batches_of_tensors():
        while True:
            index = torch.randint(0, len(dataset), (batch_size,), generator=generator)
            yield train_transform(dataset.images[index], 224, generator), dataset.labels[index]

    return _time_batches(batches_of_tensors(), batches, batch_size,
                         lambda x, y: _step(model, optimizer, criterion, x, y, amp=True))


def _step(model, optimizer, criterion, x, y, amp: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = criterion(model(x).float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _time_batches(iterator, batches: int, batch_size: int, step) -> float:
    x, y = next(iterator)
    step(x, y)  # warm-up batch: allocator and kernel selection
    started = time.perf_counter()
    for _ in range(batches):
        x, y = next(iterator)  # data loading counts: it is part of each pipeline
        step(x, y)
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/fer2013"))
    parser.add_argument("--per-class", type=int, default=150, help="train images per class (test: a third)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["FER_CACHE_DIR"] = str(work / "cache")
        subset = make_subset(Path(args.data), work / "subset", args.per_class)
        n_train = sum(1 for _ in (subset / "train").rglob("*.jpg"))
        print(f"subset: {n_train} train images, {args.epochs} head-only epochs at 224 px")
        ref_head = reference_head_only(subset, args.epochs)
        our_head = ours_head_only(subset, args.epochs, work)
        print(f"(a) head-only {args.epochs} epochs: reference {ref_head:.1f} s, ours {our_head:.1f} s "
              f"-> {ref_head / our_head:.1f}x")
        ref_rate = reference_finetune_rate(subset, args.finetune_batches, args.batch_size)
        our_rate = ours_finetune_rate(subset, args.finetune_batches, args.batch_size)
        print(f"(b) fine-tune at 224 px: reference {ref_rate:.1f} img/s (fp32, PIL), "
              f"ours {our_rate:.1f} img/s (bf16 + channels_last, tensor batches) -> {our_rate / ref_rate:.1f}x")
    print(f"head_only_speedup={ref_head / our_head:.1f} finetune_speedup={our_rate / ref_rate:.1f}")


if __name__ == "__main__":
    main()
