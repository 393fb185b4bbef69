"""The gpu preset, end to end, with the figures #17 asks for: one script for the minutes a GPU is lent.

Trains `--preset gpu` on FER2013 (or --data) in this process, then prints the wall time, the
device and precision the trainer used, its training speed, and the test accuracy, macro-F1 and
per-class recall read back from the run folder. Check it on the CPU first with --tiny (a tiny
generated dataset, one epoch): the same code path, minus the GPU.

Usage: python bench/gpu_preset.py [--data ../shared/datasets/fer2013] [--epochs N] [--tiny]
The last line is machine readable: minutes=.. test_acc=.. macro_f1=.. img_s=.. device=..
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fer_core import runs
from fer_core.config import config_from_preset
from fer_core.train import fit


def train(data: str, folder: Path, **overrides: object) -> Path:
    config = config_from_preset("gpu", data=data, experiment="gpu-preset", runs_dir=str(folder / "runs"),
                                checkpoints_dir=str(folder / "checkpoints"), **overrides)
    return fit(config)


def report(run_dir: Path, seconds: float) -> dict[str, object]:
    evaluation = runs.read_json(run_dir / runs.EVALUATION_FILE)
    environment = runs.read_json(run_dir / runs.ENVIRONMENT_FILE)
    rows, _ = runs.read_metrics(run_dir)
    speeds = [row["images_per_second"] for row in rows if row.get("images_per_second")]
    recall = {name: evaluation["report"][name]["recall"] for name in evaluation["classes"]}
    return {"minutes": seconds / 60, "test_acc": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"],
            "img_s": max(speeds) if speeds else None, "device": environment.get("device"),
            "amp_dtype": environment.get("amp_dtype"), "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/fer2013")
    parser.add_argument("--epochs", type=int, help="the preset's 60 unless given")
    parser.add_argument("--tiny", action="store_true", help="a tiny generated dataset and one epoch: the CPU check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu_preset_") as scratch:
        folder = Path(scratch)
        overrides: dict[str, object] = {"epochs": args.epochs} if args.epochs else {}
        data = args.data
        if args.tiny:
            from fer_core.demo import generate_demo_dataset
            data = str(generate_demo_dataset(folder / "tiny", per_class=10, seed=0))
            overrides.update(epochs=1, batch_size=16, img_size=32)
        started = time.perf_counter()
        run_dir = train(data, folder, **overrides)
        figures = report(run_dir, time.perf_counter() - started)
    recall = " / ".join(f"{name} {value:.0%}" for name, value in figures.pop("recall").items())
    print(f"{figures['minutes']:.1f} min on {figures['device']} (autocast {figures['amp_dtype']}), "
          f"up to {figures['img_s'] or 0:,.0f} img/s; test accuracy {figures['test_acc']:.1%}, "
          f"macro-F1 {figures['macro_f1']:.3f}; recall {recall}")
    json.dump(figures, sys.stdout)
    print()
    print(" ".join(f"{key}={figures[key]}" for key in ("minutes", "test_acc", "macro_f1", "img_s", "device")))


if __name__ == "__main__":
    main()
