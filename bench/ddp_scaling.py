"""Data-parallel scaling: training images/s with 1, 2, ... processes (DDP under torchrun).

Each row is one real `fer train --nproc-per-node P` run (a fresh launcher, its torchrun agent
and P ranks) on the same images with the same global batch. The speed is the trainer's own
`images_per_second` (global images / epoch seconds, rank 0's clock) averaged over the epochs
after the first, which pays for start-up. On a CPU the processes share the cores (the threads
are split among them), so expect about 1x or less; with one GPU per process the work divides.

Usage:
  python bench/ddp_scaling.py                                   # CPU: 1 and 2 processes, 48 px
  python bench/ddp_scaling.py --device cuda --procs 1 2 4 8 --img-size 112 --per-class 400
The last line is machine readable: RESULT {...}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu hides any GPU from the runs; cuda gives each process one GPU")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="processes per run")
    parser.add_argument("--data", default=None, help="a dataset (default: a generated synthetic one)")
    parser.add_argument("--per-class", type=int, default=40, help="faces per class of the generated set")
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads in all (0: all cores)")
    return parser.parse_args()


def train_flags(args: argparse.Namespace, data: str, work: Path, procs: int) -> list[str]:
    return ["--data", data, "--epochs", str(args.epochs), "--img-size", str(args.img_size),
            "--batch-size", str(args.batch_size), "--no-pretrained", "--val-fraction", "0.1",
            "--num-threads", str(args.num_threads), "--nproc-per-node", str(procs),
            "--runs-dir", str(work / f"runs-{procs}"), "--checkpoints-dir", str(work / "published"),
            "--experiment", f"ddp-{procs}"]


def measure(args: argparse.Namespace, data: str, work: Path, procs: int) -> dict[str, float]:
    """One run with `procs` processes: its steady images/s and wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fer_core", "train", *train_flags(args, data, work, procs)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{procs} processes failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[1:] or rows
    return {"procs": procs, "images_per_second": sum(r["images_per_second"] for r in timed) / len(timed),
            "epoch_seconds": sum(r["seconds"] for r in timed) / len(timed), "wall_seconds": wall}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from fer_core.demo import generate_demo_dataset
            data = str(generate_demo_dataset(work / "faces", per_class=args.per_class, seed=0))
        results = [measure(args, data, work, procs) for procs in args.procs]
    base = results[0]["images_per_second"]
    print(f"\n{args.device}, {os.cpu_count()} cores, {args.img_size} px, global batch {args.batch_size}, "
          f"{args.epochs} epochs (the first not timed), python {platform.python_version()}\n")
    print("| processes | images/s | speed-up | seconds/epoch | wall s (whole run) |")
    print("|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['procs']} | {row['images_per_second']:.1f} | {row['images_per_second'] / base:.2f}x "
              f"| {row['epoch_seconds']:.2f} | {row['wall_seconds']:.1f} |")
    print("RESULT " + json.dumps({"device": args.device, "img_size": args.img_size, "batch_size": args.batch_size,
                                  "cores": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
