"""Dataset memory: peak memory of training from the decoded image store as the dataset grows,
against the same images held in memory (every dataset's way before the store).

For each size N: the first N of a folder of synthetic 64x64 RGB PNGs in 8 class folders (noise
over a gradient with a filled shape, so a file is about the size of a real photo's), generated
once into a temporary folder (or --keep DIR, reused by later runs) and named by a label list
(`labels-N.txt`, the RAF-DB way fer_core reads). Then, each in a fresh process so that its peak
memory is its own:
  1. file-backed: `fer_core.data.load_dataset` at 64 px RGB, as training loads it (the first
     time it decodes into the store, in worker processes: "load s"), then one whole epoch of the
     trainer's data path from the file: shuffled batches of 128 gathered from the store,
     fer_core's training augmentation, one step of a small conv net;
  2. in memory (the baseline): the same store loaded whole, then --baseline-batches batches
     (its memory is all taken when it loads).
Peak RSS is the process's ru_maxrss (the decode workers are processes of their own). The net is
small on purpose: this measures what grows with the dataset, the data path; a model's memory
does not depend on N (see --resnet18 below for a real ResNet18 run).

Disk: about 2 x 12 KB per image (PNG + store row); the default sizes need about 13 GB.

With --resnet18 it measures a real `fer train` instead, each size in a fresh process: ResNet18
(torchvision's stem, random initialisation) at 64 px RGB, one epoch of at most MAX_PER_CLASS
(default 1,500) training faces a class, so the training work is the same for every size and
only the dataset grows, then validation and the whole test split, TTA off. The synthetic
labels carry no signal (chance is 1/8): this measures memory and time, not accuracy. Peak RSS
is the trainer's own.

With --decode-workers it measures the store's decode worker processes: two spawned workers
decode the first of --sizes images, each noting its own peak RSS (VmHWM, which starts afresh
at exec); the baseline, in the same run, is the same workers with torch and scikit-learn
imported, as they were until the decoder moved to the torch-free `fer_core.pixels`.

Usage: python bench/dataset_memory.py [--sizes 20000 100000 400000] [--keep DIR]
                                      [--resnet18 [MAX_PER_CLASS] | --decode-workers]
Smoke check: --sizes 2000 4000 (a minute or two on 2 cores).
The last line is machine readable: peak RSS MB per size, file-backed then in memory (with
--resnet18: the trainer's).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64
CLASSES = 8
BATCH = 128


def image_path(root: Path, index: int) -> Path:
    return root / f"class{index % CLASSES}" / f"{index:07d}.png"


def write_images(job: tuple[Path, int, int]) -> None:
    """Write images start..stop-1 (those not there yet), each from its own seed."""
    root, start, stop = job
    for index in range(start, stop):
        path = image_path(root, index)
        if path.exists():
            continue
        rng = np.random.default_rng(index)
        gradient = np.linspace(rng.integers(0, 128), rng.integers(128, 256), SIDE)[None, :, None]
        pixels = np.clip(gradient + rng.normal(0, 12, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        x, y = rng.integers(0, SIDE // 2, 2)
        ImageDraw.Draw(image).ellipse([x, y, x + SIDE // 3, y + SIDE // 4], fill=tuple(rng.integers(0, 256, 3)))
        image.save(path)


def generate(root: Path, count: int, processes: int) -> None:
    for class_index in range(CLASSES):
        (root / f"class{class_index}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(root, start, min(start + step, count)) for start in range(0, count, step)]
    # fork is safe here: this process never imports torch (only the measuring processes do)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(write_images, jobs)


def write_label_file(root: Path, count: int) -> Path:
    """The first `count` images as a dataset of their own: a label list ("image label" lines,
    the RAF-DB way fer_core reads), so every size shares one folder of images."""
    path = root / f"labels-{count}.txt"
    path.write_text("".join(f"{image_path(Path('.'), i).as_posix()} class{i % CLASSES}\n" for i in range(count)))
    return path


def measure(label_file: Path, cache_dir: Path, backing: str, max_batches: int | None) -> dict[str, float]:
    """Load the dataset as training does (fer_core.data.load_dataset at 64 px RGB: the store is
    built, or reused), then one epoch of the trainer's data path: shuffled batches gathered from
    the images, fer_core's training augmentation, one step of a small conv net per batch. Runs in
    a fresh process (see main); `backing` "file" forces the file-backed store, "memory" loads it
    whole, as every dataset was before the store."""
    os.environ["FER_STORE_IN_MEMORY_MB"] = "0" if backing == "file" else "1000000"
    # imported here, not at the top: the parent generates images in forked processes and must
    # not carry torch's threads into them
    import torch
    from torch import nn

    from fer_core.data import load_dataset
    from fer_core.image_format import ImageFormat
    from fer_core.store import ImageArray
    from fer_core.transforms import train_transform

    reported = [0]

    def progress(done: int, total: int) -> None:
        if done == total or done - reported[0] >= total // 10:
            reported[0] = done
            print(f"  decoded {done:,}/{total:,}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    dataset = load_dataset(str(label_file), cache_dir=cache_dir, image_format=ImageFormat(SIDE, "rgb"),
                            progress=progress)
    load_seconds = time.perf_counter() - started
    images, labels = dataset.images, dataset.labels
    assert isinstance(images, ImageArray) == (backing == "file") and not dataset.bad_files

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    batches = range(0, len(order), BATCH)[:max_batches]
    started = time.perf_counter()
    for start in batches:
        index = order[start:start + BATCH]
        x = train_transform(images[index], SIDE, generator)
        loss = nn.functional.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seen = min(len(order), len(batches) * BATCH)
    stores = list(cache_dir.glob("store-*/images.u8"))
    return {"images": len(images), "backing": backing, "store_gb": max(p.stat().st_size for p in stores) / 1e9,
            "load_s": load_seconds, "epoch_img_s": seen / (time.perf_counter() - started), "batches": len(batches),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_fresh_process(label_file: Path, cache_dir: Path, backing: str,
                             max_batches: int | None) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", str(label_file), str(cache_dir), backing, str(max_batches or 0)]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_training(label_file: Path, cache_dir: Path, max_per_class: int) -> dict[str, float]:
    """`fer train` of ResNet18 on the label list, in this (fresh) process: see the module's
    docstring. The store is the one measure() built for this size, when there is one."""
    os.environ["FER_CACHE_DIR"] = str(cache_dir)
    from fer_core import runs
    from fer_core.cli import main as fer

    runs_dir = cache_dir / "runs"
    started = time.perf_counter()
    code = fer(["train", "--data", str(label_file), "--store-size", str(SIDE), "--colour", "rgb",
                "--img-size", str(SIDE), "--stem", "imagenet", "--no-pretrained", "--epochs", "1",
                "--max-per-class", str(max_per_class), "--batch-size", str(BATCH), "--no-tta",
                "--experiment", label_file.stem, "--runs-dir", str(runs_dir),
                "--checkpoints-dir", str(cache_dir / "published")])
    seconds = time.perf_counter() - started
    run = runs.load_run(sorted(runs.find_run_dirs(runs_dir))[-1])
    assert code == 0 and run.state == "completed", run.status.error
    report = runs.read_json(run.path / runs.DATA_REPORT_FILE)
    split = report["split_table"]
    epoch = run.metrics[-1]
    return {"images": report["num_images"], "backing": "file" if is_file_backed(cache_dir) else "memory",
            "train": sum(row["train"] for row in split), "test": sum(row["test"] for row in split),
            "seconds": seconds, "train_img_s": epoch["images_per_second"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def is_file_backed(cache_dir: Path) -> bool:
    """Whether training read the images from the store file (bigger than the in-memory limit)."""
    from fer_core.store import DATA_FILE, in_memory_limit
    stores = list(cache_dir.glob(f"store-*/{DATA_FILE}"))
    return max(p.stat().st_size for p in stores) > in_memory_limit()


def markdown_table(header: str, align: str, rows: list[str]) -> str:
    return "\n".join([header, align, *rows])


def backing_label(result: dict[str, float]) -> str:
    return "file-backed" if result["backing"] == "file" else "in memory"


def training_table(results: list[dict[str, float]]) -> str:
    return markdown_table(
        "| images | store | trained / test faces | wall s | train img/s | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|",
        [f"| {r['images']:,} | {backing_label(r)} | {r['train']:,} / {r['test']:,} | {r['seconds']:.0f} "
         f"| {r['train_img_s']:.0f} | {r['peak_rss_mb']:,.0f} |" for r in results])


def peak_rss_of_this_process_mb() -> float:
    """VmHWM: unlike ru_maxrss it starts afresh at exec, so a spawned worker's figure is its own
    and not the parent's pages it was forked with."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def decode_noting_peak(path: Path, notes: Path, with_torch: bool) -> tuple[np.ndarray | None, str | None]:
    """A store worker's decode (fer_core.pixels.decode_file at 64 px RGB) that notes its process's
    peak RSS; `with_torch` first imports what the decoder's module imported until 2026-12-02."""
    if with_torch:
        import sklearn.model_selection  # noqa: F401
        import torch  # noqa: F401
    from fer_core.image_format import ImageFormat
    from fer_core.pixels import decode_file
    result = decode_file(path, ImageFormat(SIDE, "rgb"))
    (notes / str(os.getpid())).write_text(f"{peak_rss_of_this_process_mb():.1f}")
    return result


def measure_decode_workers(folder: Path, count: int) -> None:
    """The store's decode workers: 2 spawned processes decode `count` images, as they are and,
    as the baseline, with torch and scikit-learn imported in each (which they were before)."""
    import functools

    from fer_core.store import build_store  # torch-free, so this process stays light too

    files = [image_path(folder, i) for i in range(count)]
    rows = []
    for with_torch in (False, True):
        with tempfile.TemporaryDirectory(prefix="decode_workers_") as scratch:
            notes = Path(scratch) / "notes"
            notes.mkdir()
            started = time.perf_counter()
            build_store(files, functools.partial(decode_noting_peak, notes=notes, with_torch=with_torch),
                        (SIDE, SIDE, 3), Path(scratch) / "store", workers=2, chunk_size=512)
            seconds = time.perf_counter() - started
            peaks = [float(note.read_text()) for note in notes.iterdir()]
        rows.append((with_torch, seconds, max(peaks)))
    print(f"| a decode worker imports | 2 workers start and decode {count:,} images | a worker's peak RSS |")
    print("|---|---:|---:|")
    for with_torch, seconds, peak in rows:
        imports = "numpy, Pillow, fer_core.store, fer_core.pixels" + (" + torch, scikit-learn" if with_torch else "")
        print(f"| {imports} | {seconds:.1f} s | {peak:,.0f} MB |")
    print(f"worker_peak_mb={rows[0][2]:.4g},{rows[1][2]:.4g} seconds={rows[0][1]:.3g},{rows[1][1]:.3g}")


def table(results: list[dict[str, float]]) -> str:
    return markdown_table(
        "| images | images kept | store GB | load s (first: decode) | batches | train img/s | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|",
        [f"| {r['images']:,} | {backing_label(r)} | {r['store_gb']:.2f} | {r['load_s']:.0f} | {r['batches']:,} "
         f"| {r['epoch_img_s']:,.0f} | {r['peak_rss_mb']:,.0f} |" for r in results])


def run_training(sizes: list[int], folder: Path, max_per_class: int) -> None:
    results = []
    for count in sizes:
        label_file, cache_dir = write_label_file(folder, count), folder / f"cache-{count}"
        print(f"training on {count:,} images", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--measure-training", str(label_file), str(cache_dir), str(max_per_class)]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print(training_table(results))
    print("peak_rss_mb=" + ",".join(f"{r['peak_rss_mb']:.4g}" for r in results)
          + " images=" + ",".join(str(count) for count in sizes))


def run(sizes: list[int], workers: int, folder: Path, baseline_batches: int, resnet18: int | None,
        decode_workers: bool) -> None:
    started = time.perf_counter()
    generate(folder, max(sizes), workers)
    print(f"generated {max(sizes):,} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if resnet18:
        run_training(sizes, folder, resnet18)
        return
    if decode_workers:
        measure_decode_workers(folder, min(sizes))
        return
    results = []
    for count in sizes:
        label_file, cache_dir = write_label_file(folder, count), folder / f"cache-{count}"
        print(f"measuring {count:,} images", file=sys.stderr, flush=True)
        # the first run decodes (timed in load s) and trains a whole epoch from the file; the
        # baseline reuses that store, loaded whole, for `baseline_batches` (its memory is all
        # taken at load time)
        results.append(measure_in_fresh_process(label_file, cache_dir, "file", None))
        results.append(measure_in_fresh_process(label_file, cache_dir, "memory", baseline_batches))
    print(table(results))
    print(" ".join(f"{key}=" + ",".join(f"{r[key]:.4g}" for r in results if r["backing"] == backing)
                   for backing in ("file", "memory") for key in ("peak_rss_mb",)) + " images="
          + ",".join(str(count) for count in sizes))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--measure":
        label_file, cache_dir, backing, max_batches = sys.argv[2:]
        print(json.dumps(measure(Path(label_file), Path(cache_dir), backing, int(max_batches) or None)))
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--measure-training":
        label_file, cache_dir, max_per_class = sys.argv[2:]
        print(json.dumps(measure_training(Path(label_file), Path(cache_dir), int(max_per_class))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 400000])
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes that generate the images (the store decodes with its own default)")
    parser.add_argument("--baseline-batches", type=int, default=100,
                        help="batches the in-memory baseline trains (its memory is taken when it loads)")
    parser.add_argument("--keep", type=Path, help="generate into (and reuse) this folder instead of a temporary one")
    parser.add_argument("--resnet18", type=int, nargs="?", const=1500, metavar="MAX_PER_CLASS",
                        help="measure a real `fer train` of ResNet18 instead, one epoch of at most "
                             "MAX_PER_CLASS training faces a class (default 1500)")
    parser.add_argument("--decode-workers", action="store_true",
                        help="measure the store's decode worker processes instead, on the first of --sizes images")
    args = parser.parse_args()
    if args.keep:
        run(args.sizes, args.workers, args.keep, args.baseline_batches, args.resnet18, args.decode_workers)
    else:
        with tempfile.TemporaryDirectory(prefix="dataset_memory_") as folder:
            run(args.sizes, args.workers, Path(folder), args.baseline_batches, args.resnet18, args.decode_workers)


if __name__ == "__main__":
    main()
