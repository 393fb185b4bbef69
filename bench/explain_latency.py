"""Grad-CAM latency per face next to the plain prediction of the same face, in one run.

    .venv/bin/python bench/explain_latency.py [--sizes 48 96] [--threads 1 2] [--reps 30]
        [--gallery 30]

Uses randomly initialised checkpoints (latency does not depend on the weights) and the face crop
of skimage's astronaut. For each img_size and torch thread count the two calls alternate, their
order flipping every round, so the machine's noise falls on both alike:
- predict: `Predictor.probabilities` of the face (the model's share of a Predict page reading,
  without test-time augmentation),
- Grad-CAM: `GradCam.heatmaps` of the same face for its predicted class (what the Predict page's
  toggle computes), and per face for a batch of `--gallery` faces (an Evaluate gallery).
The one-off costs (importing Captum, copying the model) are reported apart. Prints a Markdown
table, then one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fer_core import CLASS_NAMES
from fer_core.faces import detect_faces
from fer_core.models import build_model
from fer_core.predict import Predictor
from predict_latency import alternate  # bench/ is the script's folder: the same alternation as the backends


def astronaut_face() -> Image.Image:
    from skimage import data
    photo = Image.fromarray(data.astronaut())
    return Predictor.face_crops(photo, detect_faces(photo))[0]


def make_checkpoint(directory: Path, img_size: int) -> Path:
    torch.manual_seed(0)
    model, _, _ = build_model(len(CLASS_NAMES), stem="small", pretrained=False)
    path = directory / f"random_{img_size}.pt"
    torch.save({"model_state": model.state_dict(), "class_names": list(CLASS_NAMES),
                "config": {"img_size": img_size, "stem": "small"}}, path)
    return path


def measure(checkpoint: Path, face: Image.Image, threads: int, reps: int, gallery: int
            ) -> dict[str, object]:
    from fer_core.explain import GradCam

    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(checkpoint, num_threads=threads, tta=False)
    start = time.perf_counter()
    cam = GradCam.for_predictor(predictor)
    setup_ms = (time.perf_counter() - start) * 1000
    one = Predictor.preprocess([face])
    many = Predictor.preprocess([face] * gallery)
    target = [int(predictor.probabilities(one).argmax())]
    times = alternate({"predict": lambda: predictor.probabilities(one),
                       "gradcam": lambda: cam.heatmaps(one, target)}, reps)
    batch_times = alternate({"predict": lambda: predictor.probabilities(many),
                             "gradcam": lambda: cam.heatmaps(many, target * gallery)},
                            max(3, reps // 6), warmup=1)
    row = {"img_size": predictor.img_size, "threads": threads, "layer": cam.layer,
           "setup_ms": setup_ms,
           "predict_ms": statistics.median(times["predict"]),
           "gradcam_ms": statistics.median(times["gradcam"]),
           "gallery": gallery,
           "predict_batch_ms_per_face": statistics.median(batch_times["predict"]) / gallery,
           "gradcam_batch_ms_per_face": statistics.median(batch_times["gradcam"]) / gallery}
    row["ratio"] = row["gradcam_ms"] / row["predict_ms"]
    row["batch_ratio"] = row["gradcam_batch_ms_per_face"] / row["predict_batch_ms_per_face"]
    return row


def table(rows: list[dict[str, object]]) -> str:
    header = ("| img_size | threads | layer | predict ms/face | Grad-CAM ms/face | ratio "
              "| gallery batch | predict ms/face | Grad-CAM ms/face | ratio |")
    lines = [header, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['img_size']} | {row['threads']} | {row['layer']} | {row['predict_ms']:.1f} "
                     f"| {row['gradcam_ms']:.1f} | {row['ratio']:.1f}x | {row['gallery']} "
                     f"| {row['predict_batch_ms_per_face']:.1f} | {row['gradcam_batch_ms_per_face']:.1f} "
                     f"| {row['batch_ratio']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=30, help="rounds at batch 1 (gallery: a sixth, >= 3)")
    parser.add_argument("--gallery", type=int, default=30, help="faces in the gallery batch")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import captum.attr  # noqa: F401  (the one-off import the first map pays)
    import_ms = (time.perf_counter() - start) * 1000
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"torch {torch.__version__}; importing captum.attr took {import_ms:.0f} ms")
    face = astronaut_face()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for img_size in args.sizes:
            checkpoint = make_checkpoint(Path(tmp), img_size)
            for threads in args.threads:
                rows.append(measure(checkpoint, face, threads, args.reps, args.gallery))
    print(f"\nGrad-CAM vs prediction, median of alternating calls (load average "
          f"{os.getloadavg()[0]:.2f} at the end)\n")
    print(table(rows))
    print("\none-off per model: " + ", ".join(
        f"{row['img_size']} px {row['threads']} thr {row['setup_ms']:.0f} ms" for row in rows)
        + " (copying the model and finding its layer)")
    print("RESULT " + json.dumps({"captum_import_ms": import_ms, "rows": rows,
                                  "load_avg_end": os.getloadavg()[0]}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
