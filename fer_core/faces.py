"""Face detection that works offline: OpenCV's Haar cascades, tuned for speed, plus fallbacks.

"auto" runs one fast upright pass on a small copy of the image; only when that finds nothing
does it look harder (the head tilted by about 20 degrees either way, then smaller faces on a
larger copy). Boxes come back in original-image pixels.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from PIL import Image

DETECTORS = ("auto", "haar-alt2", "haar-default")
"""auto: alt2 cascade with the tilt and small-face fallbacks; the others: one upright pass."""

WORK_SIDE = 256
"""Longest side of the copy the fast pass searches: it sets the speed and the smallest face that
pass sees (alt2's 20 px window = 7.8% of the longest side; 50 px in a 640x480 photo). Searching
320 px costs ~1.6x as much; smaller faces are left to the fine fallback."""
FINE_SIDE = 1280
"""Longest side for the small-face fallback (faces down to ~1.6% of the longest side)."""
SCALE_FACTOR = 1.1
# Agreeing windows needed per pass (`bench/predict_latency.py --detector-study`): at scale 1.1
# on 280 FER2013 test faces alt2 finds 229 / 221 / 212 with 3 / 4 / 5, with 4 / 2 / 1 false
# alarms on 40 face-free photos (20 skimage images at 320 and 640 px). The default cascade finds
# 230 / 225 / 222 but raises 27 / 21 / 18 false alarms: hence alt2. The fallback passes search
# more windows, so they ask for more agreement.
MIN_NEIGHBORS = 3
MIN_NEIGHBORS_TILT = 4
MIN_NEIGHBORS_FINE = 5
TILT_ANGLES = (20.0, -20.0)
NMS_IOU = 0.3
NESTED_SHARE = 0.6
"""A box whose area lies this much inside a better box is a duplicate too."""
LOW_CONTRAST_SPREAD = 100
"""Equalise the histogram when the 2nd-98th percentile grey spread is below this (or dark)."""

_CASCADE_FILES = {"alt2": "haarcascade_frontalface_alt2.xml",
                  "default": "haarcascade_frontalface_default.xml"}
_local = threading.local()  # detectMultiScale mutates the classifier: one copy per thread


@dataclass(frozen=True)
class FaceBox:
    """A face in original-image pixels.

    `score` is in [0, 1): for Haar, the number of agreeing detection windows squashed as n/(n+8).
    `angle` is the rotation (degrees, counter-clockwise) that makes the face upright; 0 unless
    a tilted-head pass found it.
    """

    x: int
    y: int
    w: int
    h: int
    score: float
    detector: str
    angle: float = 0.0

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def detect_faces(image: Image.Image, *, min_face_size: int = 24, detector: str = "auto"
                 ) -> list[FaceBox]:
    """Faces in `image`, largest first. Faces smaller than `min_face_size` px are ignored."""
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    if min_face_size < 1:
        raise ValueError(f"min_face_size must be at least 1, got {min_face_size}")
    cascade_name = "default" if detector == "haar-default" else "alt2"
    label = f"haar-{cascade_name}"
    grey = _grey_array(image)
    work, scale = _downscaled(grey, WORK_SIDE)
    work = _enhance(work)
    boxes = _haar_pass(work, scale, cascade_name, label, min_face_size)
    if detector == "auto" and not boxes:
        for angle in TILT_ANGLES:
            boxes += _rotated_pass(work, scale, angle, cascade_name, label, min_face_size)
    if detector == "auto" and not boxes:
        boxes = _fine_pass(grey, scale, cascade_name, label, min_face_size)
    kept = non_max_suppression(boxes, NMS_IOU)
    width, height = image.size
    clipped = [b for b in (_clip(b, width, height) for b in kept) if b is not None]
    return sorted(clipped, key=lambda b: b.w * b.h, reverse=True)


# --------------------------------------------------------------------------- passes

def _haar_pass(work: np.ndarray, scale: float, cascade_name: str, label: str, min_face_size: int,
               max_size: int | None = None, min_neighbors: int = MIN_NEIGHBORS) -> list[FaceBox]:
    cascade = _cascade(cascade_name)
    window = int(cascade.getOriginalWindowSize()[0])
    min_px = max(window, math.ceil(min_face_size * scale))
    if max_size is not None and max_size <= min_px:
        return []
    rects, neighbours = cascade.detectMultiScale2(
        work, scaleFactor=SCALE_FACTOR, minNeighbors=min_neighbors, minSize=(min_px, min_px),
        maxSize=(max_size, max_size) if max_size else (0, 0))
    rows = zip(np.asarray(rects).reshape(-1, 4), np.ravel(neighbours), strict=True)
    return [FaceBox(round(x / scale), round(y / scale), round(w / scale), round(h / scale),
                    _score(int(n)), label)
            for (x, y, w, h), n in rows]


def _rotated_pass(work: np.ndarray, scale: float, angle: float, cascade_name: str, label: str,
                  min_face_size: int) -> list[FaceBox]:
    """Rotate the working image by `angle` so a head tilted the other way stands upright."""
    height, width = work.shape
    centre = (width / 2, height / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    # grow the canvas so no corner (and no face in it) is cut off
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += new_w / 2 - centre[0]
    matrix[1, 2] += new_h / 2 - centre[1]
    rotated = cv2.warpAffine(work, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    inverse = cv2.invertAffineTransform(matrix)
    found = _haar_pass(rotated, 1.0, cascade_name, label, math.ceil(min_face_size * scale),
                       min_neighbors=MIN_NEIGHBORS_TILT)
    boxes = []
    for box in found:
        cx, cy = inverse @ np.array([box.x + box.w / 2, box.y + box.h / 2, 1.0])
        side = box.w / scale
        boxes.append(FaceBox(round(cx / scale - side / 2), round(cy / scale - side / 2),
                             round(side), round(side), box.score, f"{label}@rot{angle:+.0f}",
                             angle))
    return boxes


def _fine_pass(grey: np.ndarray, coarse_scale: float, cascade_name: str, label: str,
               min_face_size: int) -> list[FaceBox]:
    """Search a larger copy, only for the faces too small for the fast pass to see."""
    fine, scale = _downscaled(grey, FINE_SIDE)
    if scale < coarse_scale * 1.5:
        return []
    window = int(_cascade(cascade_name).getOriginalWindowSize()[0])
    # the fast pass saw faces from window/coarse_scale original px up; overlap by 25%
    max_size = math.ceil(window / coarse_scale * scale * 1.25)
    boxes = _haar_pass(_enhance(fine), scale, cascade_name, label, min_face_size, max_size,
                       MIN_NEIGHBORS_FINE)
    return [FaceBox(b.x, b.y, b.w, b.h, b.score, f"{label}@fine") for b in boxes]


# --------------------------------------------------------------------------- helpers

def _cascade(name: str) -> cv2.CascadeClassifier:
    cache = getattr(_local, "cascades", None)
    if cache is None:
        cache = _local.cascades = {}
    if name not in cache:
        classifier = cv2.CascadeClassifier(cv2.data.haarcascades + _CASCADE_FILES[name])
        if classifier.empty():
            raise RuntimeError(f"OpenCV could not load its {name} face cascade; reinstall "
                               "opencv-python-headless<5")
        cache[name] = classifier
    return cache[name]


def _grey_array(image: Image.Image) -> np.ndarray:
    grey = image if image.mode == "L" else image.convert("L")
    return np.asarray(grey)


def _downscaled(grey: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longest side is at most `max_side`; INTER_AREA avoids aliasing."""
    height, width = grey.shape
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return grey, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA), scale


def _enhance(grey: np.ndarray) -> np.ndarray:
    """Equalise dark or flat photos; leave normal ones alone (equalising costs them faces)."""
    low, high = np.percentile(grey[::2, ::2], (2, 98))
    if high - low < LOW_CONTRAST_SPREAD or high < 96:
        return cv2.equalizeHist(grey)
    return grey


def _score(neighbours: int) -> float:
    return neighbours / (neighbours + 8.0)


def non_max_suppression(boxes: list[FaceBox], iou_threshold: float = NMS_IOU) -> list[FaceBox]:
    """Keep the best-scored box of each overlapping group (also drops boxes inside others)."""
    kept: list[FaceBox] = []
    for box in sorted(boxes, key=lambda b: (b.score, b.w * b.h), reverse=True):
        if not any(_duplicates(box, other, iou_threshold) for other in kept):
            kept.append(box)
    return kept


def _duplicates(a: FaceBox, b: FaceBox, iou_threshold: float) -> bool:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    if inter == 0:
        return False
    area_a, area_b = a.w * a.h, b.w * b.h
    return (inter / (area_a + area_b - inter) > iou_threshold
            or inter / min(area_a, area_b) > NESTED_SHARE)


def _clip(box: FaceBox, width: int, height: int) -> FaceBox | None:
    x0, y0 = max(0, box.x), max(0, box.y)
    x1, y1 = min(width, box.x + box.w), min(height, box.y + box.h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return FaceBox(x0, y0, x1 - x0, y1 - y0, box.score, box.detector, box.angle)


# --------------------------------------------------------------------------- cropping

def crop_face(image: Image.Image, box: FaceBox, margin: float = 0.2) -> Image.Image:
    """Square crop around `box` with `margin` (share of the box side) on each side.

    The square stays centred on the face and shrinks its margin near the image edges, so it never
    needs padding; a tilted face (box.angle != 0) is rotated upright.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    width, height = image.size
    cx, cy = box.center
    box_half = max(box.w, box.h) / 2
    wanted = box_half * (1 + 2 * margin)
    room = min(cx, width - cx, cy, height - cy)
    half = max(min(wanted, room), box_half)
    if box.angle:
        return _upright_crop(image, cx, cy, half, box.angle)
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    right, bottom = min(width, round(cx + half)), min(height, round(cy + half))
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


def _upright_crop(image: Image.Image, cx: float, cy: float, half: float, angle: float
                  ) -> Image.Image:
    # take a region large enough that the rotated square's corners are real pixels
    outer = half * math.sqrt(2) + 2
    region = image.crop((round(cx - outer), round(cy - outer), round(cx + outer), round(cy + outer)))
    upright = region.rotate(angle, resample=Image.Resampling.BILINEAR)
    mid = region.width / 2
    return upright.crop((round(mid - half), round(mid - half), round(mid + half), round(mid + half)))
