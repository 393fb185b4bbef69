"""Prediction: image -> faces -> crops in the run's stored format (48 px grey by default) -> emotion probabilities.

The crops go through exactly the path the model was evaluated on: `pixels.to_stored` (how
every dataset image is stored) and then `inference.probabilities` at the checkpoint's img_size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .argtypes import positive_int, share
from .backends import BACKENDS, Classifier, OnnxClassifier, TorchClassifier
from .calibration import Calibration, apply_temperature
from .errors import CheckpointError, FerError
from .faces import DETECTORS, FaceBox, crop_face, detect_faces
from .images import DEFAULT_TOTAL_TIMEOUT, ImageSource, PixelBudget, load_image
from .image_format import DEFAULT_FORMAT, ImageFormat
from .inference import averaged_probabilities
from .models import load_checkpoint, model_from_checkpoint
from .pixels import DECODE_SIDE, to_stored
from .runs import RunLayout

FACE_MARGIN = 0.0
"""Margin around the detector's box for the model's crop. FER2013's framing *is* the Haar box:
on FER2013 test images pasted into larger canvases the box covers a median 0.98 of the stored
48 px image, centred, and our crop correlates with the stored image 0.56 at margin 0, 0.38 at
0.1 and 0.24 at 0.2 (145 faces). A wider crop shows the model smaller faces than it learnt."""
NO_FACE_MESSAGE = "no face found: classified the whole image"
MAX_FACES = 64
"""Faces classified per image at most, the largest first (the rest are counted in the message)."""
MAX_BATCH = 256
DEFAULT_UNCERTAIN_BELOW = 0.4
"""Where an uncalibrated model flags a face uncertain (a calibrated one brings its own threshold)."""


@dataclass(frozen=True)
class FacePrediction:
    """One face (or the whole image when `box` is None) and what the model thinks of it."""

    box: FaceBox | None
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    uncertain: bool
    crop: Image.Image = field(repr=False)

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def confidence(self) -> float:
        return self.top_k[0][1]

    def to_dict(self) -> dict[str, Any]:
        return {"box": self.box.to_dict() if self.box else None,
                "label": self.label, "confidence": self.confidence,
                "top_k": [{"label": name, "probability": p} for name, p in self.top_k],
                "probabilities": self.probabilities, "uncertain": self.uncertain}


@dataclass(frozen=True)
class PredictionResult:
    """Everything predicted for one image; `error` is set (and `faces` empty) when it failed."""

    source: str
    faces: list[FacePrediction]
    face_found: bool
    message: str
    image_size: tuple[int, int] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "error": self.error,
                "face_found": self.face_found, "message": self.message,
                "image_size": list(self.image_size) if self.image_size else None,
                "faces": [face.to_dict() for face in self.faces],
                "timings_ms": self.timings_ms}


class Predictor:
    """A trained model plus the exact preprocessing it was evaluated with, on PyTorch or ONNX
    Runtime (`backend`): detection, crops, preprocessing and test-time views are the same."""

    def __init__(self, model: nn.Module | Classifier, class_names: Sequence[str], img_size: int, *,
                 amp: bool = False, tta: bool = False, info: dict[str, Any] | None = None,
                 num_threads: int | None = None, calibration: Calibration | None = None,
                 image_format: ImageFormat = DEFAULT_FORMAT) -> None:
        self.classifier: Classifier = TorchClassifier(model, amp=amp) if isinstance(model, nn.Module) else model
        self.model: nn.Module | None = self.classifier.model if isinstance(self.classifier, TorchClassifier) else None
        self.class_names = list(class_names)
        self.img_size = int(img_size)
        self.amp = amp
        self.tta = tta
        self.info = dict(info or {})
        self.num_threads = num_threads
        self.calibration = calibration
        self.image_format = image_format  # how the run stored its faces: crops are made the same way

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def uncertain_below(self) -> float:
        """The calibrated model's threshold, chosen on its validation split; else the default."""
        return self.calibration.uncertain_below if self.calibration else DEFAULT_UNCERTAIN_BELOW

    @classmethod
    def load(cls, path: str | Path, *, backend: str | None = None, num_threads: int | None = None,
             amp: bool | None = None, tta: bool | None = None) -> Predictor:
        """Open a model for prediction: a .pt checkpoint (PyTorch, or ONNX Runtime when `backend`
        is "onnx": exported once and cached) or a .onnx file exported by `fer_core.export`.
        `backend` None picks by the file: .onnx runs on ONNX Runtime, anything else on PyTorch."""
        path = Path(path)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if path.suffix.lower() == ".onnx":
            if backend == "torch":
                raise CheckpointError(f"{path.name} is an ONNX model: it runs on ONNX Runtime "
                                      "(backend onnx), not on PyTorch")
            return cls.from_onnx(path, num_threads=num_threads, tta=tta)
        if backend == "onnx":
            from .export import cached_onnx_export
            predictor = cls.from_onnx(cached_onnx_export(path), num_threads=num_threads, tta=tta)
            predictor.info["path"] = str(path)  # what the user opened, not the cache file
            return predictor
        return cls.from_checkpoint(path, num_threads=num_threads, amp=amp, tta=tta)

    @classmethod
    def from_onnx(cls, path: str | Path, *, num_threads: int | None = None,
                  tta: bool | None = None) -> Predictor:
        """An exported .onnx model on ONNX Runtime; its model card says the classes, input
        size and whether its run was evaluated with test-time augmentation."""
        from .export import read_card
        card = read_card(path)
        classifier = OnnxClassifier(path, num_threads=num_threads)
        classifier.check_fits(len(card.classes), card.image_format.channels, card.input_size)
        info = {"classes": list(card.classes), "num_classes": len(card.classes), "img_size": card.input_size,
                "stem": card.stem, "amp": False, "tta": card.tta, "accuracy": card.test_accuracy,
                "macro_f1": card.macro_f1, "run_dir": None, "run_id": card.run_id, "path": str(path)}
        return cls(classifier, card.classes, card.input_size, tta=card.tta if tta is None else tta,
                   info=info, num_threads=num_threads, calibration=Calibration.from_dict(card.calibration),
                   image_format=card.image_format)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, num_threads: int | None = None,
                        amp: bool | None = None, tta: bool | None = None) -> Predictor:
        """Load a checkpoint safely (weights only) and check it is complete and consistent.

        `amp` (bfloat16) and `tta` (ten-view averaging) default to what the checkpoint's run
        was evaluated with, so predictions match its reported accuracy.
        """
        ckpt = load_checkpoint(path)
        info = describe_checkpoint(ckpt)
        model = model_from_checkpoint(ckpt, Path(path).name)
        info["path"] = str(path)
        config = ckpt["config"]
        return cls(model, info["classes"], info["img_size"],
                   amp=bool(config.get("amp", False)) if amp is None else amp,
                   tta=bool(config.get("tta", False)) if tta is None else tta,
                   info=info, num_threads=num_threads, calibration=Calibration.from_dict(ckpt.get("calibration")),
                   image_format=ImageFormat.of(config))

    def describe(self) -> dict[str, Any]:
        """What a client of this model needs to know (the REST service's GET /model)."""
        return {"classes": list(self.class_names), "input_size": self.img_size, "backend": self.backend,
                "face_size": self.image_format.size, "colour": self.image_format.colour,
                "tta": self.tta, "test_accuracy": self.info.get("accuracy"),
                "macro_f1": self.info.get("macro_f1"), "run_id": self.info.get("run_id"),
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "uncertain_below": self.uncertain_below,
                "source": Path(self.info["path"]).name if self.info.get("path") else None}

    # ------------------------------------------------------------------ whole images

    def predict(self, source: ImageSource, *, top_k: int = 3, min_face_size: int = 24,
                uncertain_below: float | None = None, allow_private_urls: bool = False,
                detector: str = "auto", pixel_budget: PixelBudget | None = None,
                fetch_timeout: float = DEFAULT_TOTAL_TIMEOUT) -> PredictionResult:
        """Find the faces in `source` and classify each; the whole image when none is found.
        `uncertain_below` None: the model's own threshold (`self.uncertain_below`).
        `pixel_budget`: the decoded pixels left to the request this image belongs to.
        `fetch_timeout`: the most seconds a URL's download may take."""
        if uncertain_below is None:
            uncertain_below = self.uncertain_below
        _check_options(top_k, uncertain_below)
        timings: dict[str, float] = {}
        with _timed(timings, "load"):
            image = load_image(source, allow_private_urls=allow_private_urls,
                               reduce_to=DECODE_SIDE, budget=pixel_budget, fetch_timeout=fetch_timeout)
        original = image.info.get("original_size", image.size)
        scale = image.width / original[0]  # < 1 when the JPEG was decoded at reduced scale
        with _timed(timings, "detect"):
            found = detect_faces(image, min_face_size=max(1, round(min_face_size * scale)),
                                 detector=detector)
        boxes = found[:MAX_FACES]  # largest first: a crowd photo cannot make one request classify thousands
        with _timed(timings, "crop"):
            crops = self.face_crops(image, boxes, self.image_format)
        with _timed(timings, "classify"):
            probs = self.probabilities(self.preprocess(crops, self.image_format))
        shown = [_to_original(box, image.size, original) for box in boxes]
        faces = self._face_predictions(shown or [None], crops, probs, top_k, uncertain_below)
        return PredictionResult(source=_describe_source(source), faces=faces,
                                face_found=bool(boxes), message=_found_message(len(found)),
                                image_size=original, timings_ms=timings)

    def predict_many(self, sources: Sequence[ImageSource], *, deadline: float | None = None,
                     **options: Any) -> list[PredictionResult]:
        """`predict` for each source; a source that fails gives a result with `error` set.
        The sources share one `PixelBudget` (a new one per call unless `pixel_budget` is given):
        once it is spent, further images are refused without being decoded. With `deadline` (a
        `time.monotonic()` instant: a service's request timeout), no download runs past it and
        the sources not begun by then are refused, so a request its client was already told had
        timed out does not keep a prediction thread busy for minutes."""
        results = []
        options.setdefault("pixel_budget", PixelBudget())
        for source in sources:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise FerError("not analysed: the request ran out of time before this image")
                fetch_timeout = DEFAULT_TOTAL_TIMEOUT if left is None else min(DEFAULT_TOTAL_TIMEOUT, left)
                results.append(self.predict(source, fetch_timeout=fetch_timeout, **options))
            except FerError as exc:
                results.append(failed_result(source, exc))
        return results

    # ------------------------------------------------------------------ building blocks

    @staticmethod
    def face_crops(image: Image.Image, boxes: Sequence[FaceBox],
                   image_format: ImageFormat = DEFAULT_FORMAT) -> list[Image.Image]:
        """The stored-format crop of each box (48x48 grey by default), or of the whole image
        when there are no boxes."""
        regions = [crop_face(image, box, margin=FACE_MARGIN) for box in boxes] or [image]
        return [to_model_crop(region, image_format) for region in regions]

    @staticmethod
    def preprocess(crops: Sequence[Image.Image], image_format: ImageFormat = DEFAULT_FORMAT) -> torch.Tensor:
        """Face crops (or whole images) -> uint8 tensor (N, *image_format.shape), the dataset
        storage format."""
        if not crops:
            return image_format.empty_batch()
        return torch.from_numpy(np.stack([to_stored(crop, image_format) for crop in crops]))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 stored faces (N, 48, 48 by default) -> probabilities (N, classes), in checkpoint
        class order.

        `inference.averaged_probabilities`, the computation training's evaluation uses, on this
        predictor's backend and thread budget; then the model's temperature when it is calibrated.
        """
        with self._threads():
            probs = averaged_probabilities(self.classifier, batch, self.img_size, tta=self.tta,
                                           batch_size=MAX_BATCH, num_classes=len(self.class_names))
        return apply_temperature(probs, self.calibration.temperature) if self.calibration else probs

    def _face_predictions(self, boxes: Sequence[FaceBox | None], crops: Sequence[Image.Image],
                          probs: torch.Tensor, top_k: int, uncertain_below: float
                          ) -> list[FacePrediction]:
        k = min(top_k, len(self.class_names))
        faces = []
        for box, crop, row in zip(boxes, crops, probs.tolist(), strict=True):
            probabilities = dict(zip(self.class_names, row, strict=True))
            ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:k]
            faces.append(FacePrediction(box=box, probabilities=probabilities, top_k=ranked,
                                        uncertain=ranked[0][1] < uncertain_below, crop=crop))
        return faces

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Use `num_threads` for this forward only (`TORCH_THREADS`: the setting is process-wide)."""
        if not self.num_threads:
            yield
            return
        with TORCH_THREADS.use(self.num_threads):
            yield


class ThreadSetting:
    """torch's thread count is process-wide, and forwards overlap (the app's sessions share one
    Predictor): the count in force before the first of overlapping forwards is restored when the
    last of them ends. Saving and restoring around each one alone could leave the process at a
    forward's count for good (A saves 2 and sets 1, B saves 1, A restores 2, B restores 1)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before = 0

    @contextlib.contextmanager
    def use(self, num_threads: int) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._before = torch.get_num_threads()
            self._users += 1
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch.set_num_threads(self._before)


TORCH_THREADS = ThreadSetting()


def _to_original(box: FaceBox, decoded: tuple[int, int], original: tuple[int, int]) -> FaceBox:
    """Map a box from the (possibly reduced) decoded image to original-image pixels."""
    if decoded == original:
        return box
    sx, sy = original[0] / decoded[0], original[1] / decoded[1]
    return dataclasses.replace(box, x=round(box.x * sx), y=round(box.y * sy),
                               w=min(round(box.w * sx), original[0] - round(box.x * sx)),
                               h=min(round(box.h * sy), original[1] - round(box.y * sy)))


def to_model_crop(region: Image.Image, image_format: ImageFormat = DEFAULT_FORMAT) -> Image.Image:
    """Any face region -> the stored-format image the model sees (`pixels.to_stored`)."""
    return Image.fromarray(to_stored(region, image_format))  # "L" for grey, "RGB" for colour


def _check_options(top_k: int, uncertain_below: float) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if not 0.0 <= uncertain_below <= 1.0:
        raise ValueError(f"uncertain_below must be within [0, 1], got {uncertain_below}")


def failed_result(source: ImageSource, exc: FerError) -> PredictionResult:
    """The result for an image that could not be analysed: no faces, and why."""
    return PredictionResult(source=_describe_source(source), faces=[], face_found=False,
                            message=str(exc), error=str(exc))


def _found_message(count: int) -> str:
    if count == 0:
        return NO_FACE_MESSAGE
    if count > MAX_FACES:
        return f"{count} faces found; the {MAX_FACES} largest are shown"
    return f"{count} face{'s' if count != 1 else ''} found"


def _describe_source(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<image {source.width}x{source.height}>"
    return str(source)


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - start) * 1000.0


# ---------------------------------------------------------------------- checkpoints

def newest_checkpoint(checkpoints_dir: Path, *, recursive: bool = False) -> Path | None:
    """The most recently modified *.pt in `checkpoints_dir` (None when there is none)."""
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return None
    found = [p for p in (directory.rglob("*.pt") if recursive else directory.glob("*.pt"))
             if p.is_file()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime, p.name))


def describe_checkpoint(ckpt: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Facts about a checkpoint for people: classes, img_size, stem, accuracy, run_dir."""
    if isinstance(ckpt, (str, Path)):
        ckpt = load_checkpoint(ckpt)
    classes = ckpt.get("class_names")
    if (not isinstance(classes, (list, tuple)) or not classes
            or not all(isinstance(c, str) and c for c in classes)):
        raise CheckpointError("checkpoint class_names must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"checkpoint class_names repeat a name: {list(classes)}")
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError("checkpoint config must be a dict")
    img_size = config.get("img_size")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 16 <= img_size <= 1024:
        raise CheckpointError(f"checkpoint config img_size must be an int in [16, 1024], "
                              f"got {img_size!r}")
    evaluation = ckpt.get("evaluation") if isinstance(ckpt.get("evaluation"), dict) else {}
    run_dir = ckpt.get("run_dir") if isinstance(ckpt.get("run_dir"), str) else None
    return {"classes": list(classes), "num_classes": len(classes), "img_size": img_size,
            "stem": config.get("stem", "imagenet"), "amp": bool(config.get("amp", False)),
            "tta": bool(config.get("tta", False)),
            "accuracy": _number(evaluation.get("accuracy")),
            "macro_f1": _number(evaluation.get("macro_f1")),
            "run_dir": run_dir, "run_id": _run_id(run_dir)}


def _run_id(run_dir: str | None) -> str | None:
    if run_dir is None:
        return None
    try:
        return RunLayout.of(run_dir).id
    except FerError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------- CLI glue

def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m fer_core predict CHECKPOINT IMAGE_OR_URL...`."""
    parser.add_argument("checkpoint", type=Path, metavar="MODEL",
                        help="a .pt checkpoint written by training, or a .onnx file from `export`")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_URL",
                        help="image files or http(s) URLs")
    parser.add_argument("--top-k", type=positive_int, default=3,
                        help="emotions to show per face (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="allow URLs on private, loopback or link-local addresses")
    parser.add_argument("--min-face-size", type=positive_int, default=24,
                        help="ignore faces smaller than this many pixels (default 24)")
    parser.add_argument("--detector", choices=DETECTORS, default="auto",
                        help="face detector (default auto)")
    parser.add_argument("--uncertain-below", type=share, default=None, metavar="P",
                        help="flag a face uncertain when its top probability is below P (default: the "
                             "threshold a calibrated model chose on its validation split, else 0.4)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for the model (default: torch's or ONNX Runtime's choice)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="run the model on PyTorch or ONNX Runtime (default auto: ONNX Runtime "
                             "for a .onnx file, PyTorch for a .pt checkpoint)")


def predict_command(args: argparse.Namespace) -> int:
    """Run `predict` for the CLI: 0 when every image worked, 1 when any failed, 2 bad checkpoint."""
    try:
        predictor = Predictor.load(args.checkpoint, num_threads=args.threads,
                                   backend=None if args.backend == "auto" else args.backend)
    except FerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = predictor.predict_many(args.images, top_k=args.top_k,
                                     min_face_size=args.min_face_size,
                                     allow_private_urls=args.allow_private_urls,
                                     detector=args.detector, uncertain_below=args.uncertain_below)
    for result in results:
        if not result.ok:
            print(f"error: {result.source}: {result.error}", file=sys.stderr)
    if args.json:
        document = {"checkpoint": str(args.checkpoint), "backend": predictor.backend,
                    "classes": predictor.class_names,
                    "results": [result.to_dict() for result in results]}
        try:  # strict JSON: NaN or Infinity would make the document unreadable to most parsers
            print(json.dumps(document, indent=2, allow_nan=False))
        except ValueError:
            print("error: the model produced probabilities that are not numbers (NaN or inf)",
                  file=sys.stderr)
            return 1
    else:
        for result in results:
            if result.ok:
                print(format_result(result))
    return 0 if all(result.ok for result in results) else 1


def format_result(result: PredictionResult) -> str:
    """Human-readable lines: the image, then each face's box and top emotions."""
    lines = [f"{result.source}: {result.message}"]
    for number, face in enumerate(result.faces, start=1):
        where = ("whole image" if face.box is None else
                 f"face {number} at x={face.box.x} y={face.box.y} w={face.box.w} h={face.box.h}")
        emotions = ", ".join(f"{name} {p * 100:.1f}%" for name, p in face.top_k)
        flag = " (uncertain)" if face.uncertain else ""
        lines.append(f"  {where}: {emotions}{flag}")
    return "\n".join(lines)
