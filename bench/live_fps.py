"""Frames per second of the live webcam's frame work (`fer_core.live.LiveAnnotator.process`),
without WebRTC, on one torch thread as in the app: a 640x480 RGB frame with one face, two faces
(skimage's astronaut, the second mirrored) or none, for the auto and haar-alt2 detectors.

    .venv/bin/python bench/live_fps.py [--frames 30]

Randomly initialised models of the shapes the presets train (what is timed is the arithmetic,
not what was learnt). Prints a markdown table of median ms per frame and the fps it allows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from fer_core import CLASS_NAMES
from fer_core.live import LiveAnnotator
from fer_core.models import build_model
from fer_core.predict import Predictor

SHAPES = (("small", 48, False), ("small", 48, True), ("imagenet", 112, False))  # stem, px, ten-view TTA


def head() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).crop((117, 16, 337, 236)).resize((240, 240))


def frames() -> dict[str, np.ndarray]:
    one = Image.new("RGB", (640, 480), (70, 80, 95))
    one.paste(head(), (200, 120))
    two = Image.new("RGB", (640, 480), (70, 80, 95))
    two.paste(head(), (50, 120))
    two.paste(ImageOps.mirror(head()), (350, 120))
    empty = Image.new("RGB", (640, 480), (30, 140, 40))
    return {"1 face": np.asarray(one).copy(), "2 faces": np.asarray(two).copy(), "no face": np.asarray(empty).copy()}


def predictor(stem: str, img_size: int, tta: bool) -> Predictor:
    torch.manual_seed(0)
    model, _, _ = build_model(len(CLASS_NAMES), stem=stem, pretrained=False)
    return Predictor(model.eval(), CLASS_NAMES, img_size, tta=tta, num_threads=1)


def median_ms(annotator: LiveAnnotator, frame: np.ndarray, count: int) -> float:
    annotator.process(frame)  # warm-up: first-call allocations and the detector's cascade
    times = []
    for _ in range(count):
        start = time.perf_counter()
        annotator.process(frame)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30, help="frames timed per cell (default 30)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | frame | detector | ms/frame | fps |\n|---|---|---|---:|---:|")
    for stem, size, tta in SHAPES:
        model = predictor(stem, size, tta)
        for name, frame in frames().items():
            for detector in ("auto", "haar-alt2"):
                annotator = LiveAnnotator(model, {"top_k": 3, "min_face_size": 24, "detector": detector})
                ms = median_ms(annotator, frame, max(4, args.frames // (10 if tta else 1)))
                label = f"{stem} {size} px" + (" TTA" if tta else "")
                print(f"| {label} | {name} | {detector} | {ms:.1f} | {1000 / ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
