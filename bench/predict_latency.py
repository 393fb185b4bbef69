"""End-to-end prediction latency, per-stage costs, batch throughput and hard detection cases,
and PyTorch vs ONNX Runtime side by side.

    .venv/bin/python bench/predict_latency.py [--runs 50] [--threads 1 2] [--sizes 48 64 96]
        [--backends torch onnx] [--reps 40]

Uses a randomly initialised checkpoint (latency does not depend on the weights) and synthetic
photos built from skimage's astronaut. The ONNX model is exported from that same checkpoint into
a temporary folder; each backend comparison alternates the backends call by call (their order
flipping every round) so that the machine's noise falls on both alike. Prints tables, then one
line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from fer_core import CLASS_NAMES
from fer_core.backends import BACKENDS
from fer_core.export import export_model
from fer_core.faces import detect_faces
from fer_core.models import build_model
from fer_core.predict import Predictor

FACE_IN_ASTRONAUT = (177, 66, 95, 95)  # Haar's box on skimage.data.astronaut()
AIM_CLASSIFIER_MS = 2.0  # issue #13: the model per face at batch 1
AIM_PHOTO_P50_MS = 18.0  # issue #13: a 640x480 one-face photo end to end


# --------------------------------------------------------------------------- synthetic photos

def astronaut() -> Image.Image:
    from skimage import data
    return Image.fromarray(data.astronaut())


def background(width: int, height: int, seed: int) -> Image.Image:
    """A real face-free photo (skimage coffee/rocket), stretched and blurred like a backdrop."""
    from skimage import data
    source = [data.coffee, data.rocket, data.chelsea][seed % 3]()
    image = Image.fromarray(source).resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).normal(0, 4, (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def head(side: int) -> Image.Image:
    """Astronaut's head and shoulders; the face is ~49% of the side."""
    return astronaut().crop((127, 16, 322, 211)).resize((side, side), Image.Resampling.LANCZOS)


def portrait_640x480() -> Image.Image:
    canvas = background(640, 480, 0)
    canvas.paste(astronaut().resize((480, 480), Image.Resampling.LANCZOS), (80, 0))
    return canvas


def photo_4000x3000() -> Image.Image:
    canvas = background(4000, 3000, 1)
    canvas.paste(astronaut().resize((2048, 2048), Image.Resampling.BICUBIC), (976, 476))
    return canvas


def small_face(width: int = 4000, height: int = 3000, face_px: int = 120) -> Image.Image:
    canvas = background(width, height, 1)
    canvas.paste(head(round(face_px / 0.49)), (width * 2 // 3, height // 3))
    return canvas


def tilted(angle: float) -> Image.Image:
    canvas = background(640, 480, 2)
    piece = head(300).rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(120, 120, 120))
    canvas.paste(piece, (170, 90))
    return canvas


def several() -> Image.Image:
    canvas = background(1280, 720, 0)
    for side, x, y in ((280, 60, 200), (240, 460, 120), (200, 820, 330), (240, 1000, 40)):
        canvas.paste(head(side), (x, y))
    return canvas


def dark() -> Image.Image:
    image = ImageEnhance.Brightness(portrait_640x480()).enhance(0.18)
    return ImageEnhance.Contrast(image).enhance(0.5).filter(ImageFilter.GaussianBlur(0.6))


def noise_field() -> Image.Image:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((640, 480), Image.Resampling.BILINEAR)


HARD_CASES: dict[str, tuple[Callable[[], Image.Image], int]] = {
    # name: (builder, faces expected)
    "portrait 640x480": (portrait_640x480, 1),
    "photo 4000x3000, face 380 px": (photo_4000x3000, 1),
    "small face 120 px in 4000x3000": (small_face, 1),
    "small face 60 px in 1600x1200": (lambda: small_face(1600, 1200, 60), 1),
    "head tilted +20 deg": (lambda: tilted(20), 1),
    "head tilted -20 deg": (lambda: tilted(-20), 1),
    "head tilted +30 deg": (lambda: tilted(30), 1),
    "four faces 1280x720": (several, 4),
    "dark low-contrast": (dark, 1),
    "blank": (lambda: Image.new("RGB", (640, 480), (200, 200, 200)), 0),
    "random colour blocks": (noise_field, 0),
    "cat photo (chelsea)": (lambda: background(640, 480, 2), 0),
    "coffee photo": (lambda: background(640, 480, 0), 0),
}


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- measuring

def make_checkpoint(directory: Path, img_size: int) -> Path:
    torch.manual_seed(0)
    model, _, _ = build_model(len(CLASS_NAMES), stem="small", pretrained=False)
    path = directory / f"random_{img_size}.pt"
    torch.save({"model_state": model.state_dict(), "class_names": list(CLASS_NAMES),
                "config": {"img_size": img_size, "stem": "small"}}, path)
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def end_to_end(predictor: Predictor, data: bytes, runs: int) -> dict[str, float]:
    for _ in range(3):
        predictor.predict(data)
    totals, cpu, stages = [], [], {"load": [], "detect": [], "crop": [], "classify": []}
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = predictor.predict(data)
        totals.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
        for stage, ms in result.timings_ms.items():
            stages[stage].append(ms)
    # CPU time (all threads) is what the call costs even when other processes share the cores
    out = {"p50_ms": percentile(totals, 50), "p95_ms": percentile(totals, 95),
           "cpu_p50_ms": percentile(cpu, 50), "faces": len(result.faces) if result.face_found else 0}
    out.update({f"{stage}_p50_ms": statistics.median(v) for stage, v in stages.items()})
    return out


def crop_throughput(predictor: Predictor, crops: list[Image.Image], repeats: int = 5
                    ) -> dict[str, float]:
    predictor.probabilities(predictor.preprocess(crops[:8]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.probabilities(predictor.preprocess(crops))
        times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {"batch": len(crops), "ms": best * 1000, "crops_per_s": len(crops) / best}


def hard_case_table() -> list[dict[str, object]]:
    rows = []
    for name, (build, expected) in HARD_CASES.items():
        image = build()
        detect_faces(image)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            boxes = detect_faces(image)
            times.append((time.perf_counter() - start) * 1000)
        rows.append({"case": name, "size": f"{image.width}x{image.height}", "expected": expected,
                     "found": len(boxes), "ms": min(times),
                     "passes": sorted({b.detector for b in boxes})})
    return rows


def detector_study(fer_dir: Path, per_class: int = 40) -> list[dict[str, object]]:
    """Recall on FER2013 test faces (3x upscaled into a 320 px canvas) and false alarms on
    face-free skimage photos, for each cascade and min_neighbors: how faces.py was tuned."""
    import random
    import warnings

    import cv2
    from skimage import data

    from fer_core import faces

    rng = random.Random(0)
    files = []
    for folder in sorted(p for p in fer_dir.iterdir() if p.is_dir()):
        names = sorted(folder.glob("*.jpg"))
        rng.shuffle(names)
        files += names[:per_class]
    canvases = []
    for path in files:
        face = np.asarray(Image.open(path).convert("L").resize((144, 144), Image.Resampling.BICUBIC))
        canvases.append(cv2.copyMakeBorder(face, 88, 88, 88, 88, cv2.BORDER_REPLICATE))
    empty = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("brick", "cat", "cell", "clock", "coffee", "coins", "colorwheel", "grass",
                     "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon",
                     "page", "retina", "rocket", "text", "checkerboard", "microaneurysms"):
            pixels = np.asarray(getattr(data, name)())
            if pixels.dtype != np.uint8:
                pixels = (pixels.astype(float) / max(pixels.max(), 1) * 255).astype(np.uint8)
            grey = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels[..., :3], cv2.COLOR_RGB2GRAY)
            for side in (320, 640):
                scale = side / max(grey.shape)
                empty.append(cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    rows = []
    for cascade_name in ("alt2", "default"):
        cascade = faces._cascade(cascade_name)
        for neighbours in (3, 4, 5):
            found = 0
            for canvas in canvases:
                rects, _ = cascade.detectMultiScale2(faces._enhance(canvas), faces.SCALE_FACTOR,
                                                     neighbours, minSize=(40, 40))
                found += any(abs(x + w / 2 - 160) < 40 and abs(y + h / 2 - 160) < 40
                             for x, y, w, h in np.asarray(rects).reshape(-1, 4))
            false = sum(len(cascade.detectMultiScale2(faces._enhance(g), faces.SCALE_FACTOR,
                                                      neighbours, minSize=(20, 20))[0]) for g in empty)
            rows.append({"cascade": cascade_name, "min_neighbors": neighbours,
                         "recall": f"{found}/{len(canvases)}", "false_alarms": false,
                         "face_free_images": len(empty)})
    return rows


# --------------------------------------------------------------------------- backends side by side

def alternate(calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
              ) -> dict[str, list[float]]:
    """Wall ms of each call, `rounds` times, the calls alternating (order flipped every round)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def compare_backends(checkpoint: Path, onnx_model: Path, backends: list[str], threads: list[int],
                     crops: list[Image.Image], photos: dict[str, bytes], reps: int, runs: int
                     ) -> list[dict[str, object]]:
    """Rows (measurement, threads, {backend: ms}) for the classifier per face at batch 1 and 64
    and for whole photos end to end, the backends alternating call by call."""
    rows: list[dict[str, object]] = []
    for count in threads:
        predictors = {backend: Predictor.load(onnx_model if backend == "onnx" else checkpoint,
                                              backend=backend, num_threads=count)
                      for backend in backends}
        for batch_size, rounds in ((1, reps), (64, max(5, reps // 4))):
            batch = Predictor.preprocess(crops[:batch_size])
            times = alternate({b: (lambda p=p, x=batch: p.probabilities(x))
                               for b, p in predictors.items()}, rounds)
            rows.append({"measure": f"classifier ms/face, batch {batch_size} (p50)", "threads": count,
                         "key": f"classifier_b{batch_size}", "rounds": rounds,
                         **{b: percentile(t, 50) / batch_size for b, t in times.items()}})
        for label, data in photos.items():
            rounds = runs if label == "640x480" else max(10, runs // 3)
            results: dict[str, list] = {b: [] for b in predictors}
            times = alternate({b: (lambda p=p, out=results[b], image=data: out.append(p.predict(image)))
                               for b, p in predictors.items()}, rounds)
            for q in (50, 95):
                rows.append({"measure": f"{label} photo p{q} ms", "threads": count,
                             "key": f"photo_{label}_p{q}", "rounds": rounds,
                             **{b: percentile(t, q) for b, t in times.items()}})
            for stage in ("detect", "classify"):
                rows.append({"measure": f"  of which {stage} p50 ms", "threads": count,
                             "key": f"photo_{label}_{stage}_p50", "rounds": rounds,
                             **{b: statistics.median(r.timings_ms[stage] for r in rs[-rounds:])
                                for b, rs in results.items()}})
    return rows


def backend_table(rows: list[dict[str, object]], backends: list[str]) -> str:
    """Markdown: one row per measurement and thread count, a column per backend, onnx/torch."""
    both = "torch" in backends and "onnx" in backends
    header = ["measurement", "threads", *backends] + (["onnx/torch"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [str(row["measure"]).strip(), str(row["threads"])]
        cells += [f"{row[b]:.2f}" for b in backends]
        if both:
            cells.append(f"{row['onnx'] / row['torch']:.2f}" if row["torch"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aims(rows: list[dict[str, object]], backends: list[str]) -> list[str]:
    """The issue's aims against the best thread count of each backend."""
    lines = []
    for key, aim, what in (("classifier_b1", AIM_CLASSIFIER_MS, "classifier per face, batch 1"),
                           ("photo_640x480_p50", AIM_PHOTO_P50_MS, "640x480 photo p50")):
        for backend in backends:
            best = min((row for row in rows if row["key"] == key), key=lambda row: row[backend],
                       default=None)
            if best is not None:
                verdict = "met" if best[backend] <= aim else "NOT met"
                lines.append(f"  {what} <= {aim:g} ms: {backend} {best[backend]:.2f} ms "
                             f"({best['threads']} threads) - {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96])
    parser.add_argument("--cv-threads", type=int, default=None,
                        help="cv2.setNumThreads for this run (default: OpenCV's choice)")
    parser.add_argument("--detector-study", type=Path, metavar="FER2013_TEST_DIR",
                        help="also measure cascade recall/false alarms on these class folders")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="backends measured side by side (default: both)")
    parser.add_argument("--reps", type=int, default=40,
                        help="repetitions of the classifier at batch 1 per backend (batch 64: a "
                             "quarter, at least 5)")
    args = parser.parse_args(argv)
    backends = list(dict.fromkeys(args.backends))
    import cv2
    if args.cv_threads is not None:
        cv2.setNumThreads(args.cv_threads)

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"torch {torch.__version__}, OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads")
    portrait, photo = jpeg_bytes(portrait_640x480()), jpeg_bytes(photo_4000x3000())
    crops = Predictor.face_crops(portrait_640x480(),
                                 detect_faces(portrait_640x480())) * 100
    summary: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for img_size in args.sizes:
            path = make_checkpoint(Path(tmp), img_size)
            for threads in args.threads:
                predictor = Predictor.from_checkpoint(path, num_threads=threads)
                runs = args.runs if img_size == args.sizes[0] else max(10, args.runs // 3)
                small = end_to_end(predictor, portrait, runs)
                large = end_to_end(predictor, photo, max(10, runs // 3))
                batch = crop_throughput(predictor, crops[:100])
                key = f"img{img_size}_t{threads}"
                summary[key] = {"640x480": small, "4000x3000": large, "batch100": batch}
                print(f"\nimg_size {img_size}, torch threads {threads} (load avg "
                      f"{os.getloadavg()[0]:.2f})")
                print(f"  {'image':10s} {'p50 ms':>7s} {'p95 ms':>7s} {'cpu ms':>7s} | {'decode':>6s} "
                      f"{'detect':>6s} {'crop':>6s} {'model':>6s}  (stage p50 ms)")
                for label, row in (("640x480", small), ("4000x3000", large)):
                    print(f"  {label:10s} {row['p50_ms']:7.1f} {row['p95_ms']:7.1f} "
                          f"{row['cpu_p50_ms']:7.1f} | "
                          f"{row['load_p50_ms']:6.1f} {row['detect_p50_ms']:6.1f} "
                          f"{row['crop_p50_ms']:6.1f} {row['classify_p50_ms']:6.1f}  "
                          f"faces={row['faces']}")
                print(f"  batch of {batch['batch']} crops: {batch['ms']:.1f} ms = "
                      f"{batch['crops_per_s']:.0f} crops/s")
                for label, row in (("640x480", small), ("4000x3000", large)):
                    stage_ms = {name: row[f"{name}_p50_ms"] for name in
                                ("load", "detect", "crop", "classify")}
                    top = max(stage_ms, key=stage_ms.get)
                    print(f"  {label}: {top} dominates ({stage_ms[top] / sum(stage_ms.values()):.0%} "
                          "of the stage time)")

            onnx_model = export_model(path, "onnx", Path(tmp) / f"random_{img_size}.onnx").path
            rows = compare_backends(path, onnx_model, backends, args.threads, crops,
                                    {"640x480": portrait, "4000x3000": photo}, args.reps, args.runs)
            print(f"\nimg_size {img_size}: backends side by side (same checkpoint, same images, "
                  f"alternating calls; load avg {os.getloadavg()[0]:.2f})\n")
            print(backend_table(rows, backends))
            print("\naims (issue #13), best thread count:")
            print("\n".join(aims(rows, backends)))
            summary[f"backends_img{img_size}"] = {
                f"{row['key']}_t{row['threads']}": {
                    **{b: round(float(row[b]), 3) for b in backends},
                    **({"onnx_over_torch": round(float(row["onnx"]) / float(row["torch"]), 3)}
                       if "onnx" in backends and "torch" in backends and row["torch"] else {}),
                    "rounds": row["rounds"]}
                for row in rows}

    print("\nhard detection cases (detector 'auto', default settings)")
    rows = hard_case_table()
    for row in rows:
        verdict = "ok" if row["found"] == row["expected"] else "MISS" if \
            int(row["found"]) < int(row["expected"]) else "EXTRA"
        print(f"  {row['case']:32s} {row['size']:>10s} found {row['found']}/{row['expected']} "
              f"{verdict:5s} {row['ms']:7.1f} ms  {','.join(row['passes'])}")
    summary["hard_cases"] = rows
    if args.detector_study:
        print(f"\ndetector study (scale factor 1.1, FER2013 faces from {args.detector_study})")
        study = detector_study(args.detector_study)
        for row in study:
            print(f"  {row['cascade']:8s} min_neighbors={row['min_neighbors']}  recall "
                  f"{row['recall']:>8s}  false alarms {row['false_alarms']:3d} on "
                  f"{row['face_free_images']} face-free images")
        summary["detector_study"] = study
    summary["load_avg_end"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(summary, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
