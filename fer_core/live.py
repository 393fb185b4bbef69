"""Live video: read the emotion on every face of each frame, keep faces apart from frame to frame,
and remember the last 30 s of what each one showed.

`LiveAnnotator.process` takes one RGB frame (a numpy array), runs `Predictor.predict` on it (the
exact path a photo takes: detection, the 48 px grey crop, the model, the uncertain flag) and
returns the frame with a box and a '<face> <emotion> <p>%' label on each face, or a "no face"
banner. The caller decides which frames to process: a live stream hands over only the newest
frame and reports how many it skipped, so the work never queues up behind a slow CPU.

Thread-safe: one thread processes frames while another reads `stats()` and `timeline()`.
No Streamlit here: the page (pages/_live.py) connects this to the browser's camera.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .annotate import LINE_COLOUR, label_text, place_labels
from .faces import FaceBox
from .predict import FacePrediction, Predictor

TIMELINE_S = 30.0
"""How far back the per-face timeline reaches."""
FPS_WINDOW_S = 3.0
"""Frames per second are counted over this much recent time."""
TRACK_TIMEOUT_S = 2.0
TRACK_MISSES = 3
"""A face unseen for TRACK_TIMEOUT_S seconds *and* in TRACK_MISSES processed frames in a row is
gone: if it comes back it is a new face (a new track). Both, so a slow CPU (one frame a second)
does not split one face into many, and a fast one does not keep a face that left."""
MATCH_IOU = 0.2
MATCH_CENTRE_SHARE = 0.6
"""A face continues a track when their boxes overlap (IoU >= MATCH_IOU) or its centre lies within
this share of the track's box side from the track's centre (a quick turn of the head)."""
MAX_POINTS_PER_TRACK = 3000
"""Memory bound of one timeline: 30 s at 100 processed frames per second."""
NO_FACE_TEXT = "no face"
BANNER_COLOUR = "#475569"
DEFAULT_COLOUR = "#ff4b4b"
DEFAULT_UNCERTAIN_COLOUR = "#d97706"
ICE_SERVERS_ENV = "FER_WEBRTC_ICE_SERVERS"
"""JSON list of WebRTC ICE servers (STUN/TURN) for the live mode, e.g.
'[{"urls": "turn:turn.example.org:3478", "username": "u", "credential": "p"}]'. Unset: none, which
is all a browser on the app's own machine needs."""


@dataclass(frozen=True)
class TrackedFace:
    """One face of one frame, with the track (a number from 1) it was assigned to."""

    track: int
    face: FacePrediction

    @property
    def box(self) -> FaceBox:
        assert self.face.box is not None
        return self.face.box


@dataclass(frozen=True)
class TimelinePoint:
    """What one face showed in one processed frame; `seconds_ago` is <= 0 (now is 0)."""

    track: int
    seconds_ago: float
    label: str
    confidence: float
    uncertain: bool
    probabilities: tuple[float, ...]  # in the predictor's class order


@dataclass(frozen=True)
class LiveStats:
    """Counters of a live stream. `fps` counts processed frames, `input_fps` every frame that
    arrived (processed or dropped); both over the last FPS_WINDOW_S seconds."""

    processed: int
    dropped: int
    fps: float
    input_fps: float
    latency_ms: float | None
    faces: int
    errors: int
    last_error: str | None
    stages_ms: dict[str, float]  # the last frame's time per stage: Predictor's, then "draw"

    @property
    def received(self) -> int:
        return self.processed + self.dropped

    @property
    def dropped_share(self) -> float:
        return self.dropped / self.received if self.received else 0.0


@dataclass
class _Track:
    number: int
    box: FaceBox
    last_seen: float
    misses: int = 0  # processed frames in a row without this face

    def gone(self, now: float) -> bool:
        return now - self.last_seen > TRACK_TIMEOUT_S and self.misses >= TRACK_MISSES


class LiveAnnotator:
    """Annotates live frames with the predictor's reading of each face; see the module doc.

    `options` are `Predictor.predict`'s keyword options (top_k, min_face_size, uncertain_below,
    detector, ...) and may be replaced while frames flow (`set_options`). `clock` is injectable
    for tests.
    """

    def __init__(self, predictor: Predictor, options: Mapping[str, Any] | None = None, *,
                 colour: str = DEFAULT_COLOUR, uncertain_colour: str = DEFAULT_UNCERTAIN_COLOUR,
                 window_s: float = TIMELINE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.predictor = predictor
        self.class_names = list(predictor.class_names)
        self.colour = colour
        self.uncertain_colour = uncertain_colour
        self.window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._options: dict[str, Any] = dict(options or {})
        self._tracks: list[_Track] = []
        self._next_track = 1
        self._timeline: dict[int, deque[tuple[float, FacePrediction]]] = {}
        self._processed = 0
        self._dropped = 0
        self._errors = 0
        self._last_error: str | None = None
        self._latency_ms: float | None = None
        self._stages_ms: dict[str, float] = {}
        self._current: list[TrackedFace] = []
        self._started: float | None = None
        self._done_times: deque[float] = deque()              # when each recent frame finished
        self._arrivals: deque[tuple[float, int]] = deque()    # (time, frames that arrived with it)

    # ------------------------------------------------------------------ the frame path

    def use(self, predictor: Predictor, options: Mapping[str, Any]) -> None:
        """Follow the page's current model and options; another model starts afresh (its classes,
        and so its timeline, may differ)."""
        with self._lock:
            self._options = dict(options)
            if predictor is self.predictor:
                return
            self.predictor = predictor
            self.class_names = list(predictor.class_names)
            self._reset()

    def set_options(self, options: Mapping[str, Any]) -> None:
        """New prediction options (e.g. the uncertain threshold) from the next frame on."""
        with self._lock:
            self._options = dict(options)

    def process(self, frame: np.ndarray, *, dropped: int = 0) -> np.ndarray:
        """Annotate one RGB uint8 frame (H, W, 3); `dropped`: frames skipped since the last one
        processed. Returns a new array of the same shape. A failing prediction does not raise:
        the frame comes back with the error on it, and `stats()` counts it."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
        start = self._clock()
        with self._lock:
            predictor, options = self.predictor, dict(self._options)
            if self._started is None:
                self._started = start
            self._dropped += max(0, int(dropped))
            self._arrivals.append((start, 1 + max(0, int(dropped))))
        image = Image.fromarray(frame, "RGB")
        try:
            result = predictor.predict(image, **options)
        except Exception as exc:  # a live stream must outlive one bad frame or option
            with self._lock:
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._current = []
                self._finish(start)
            return np.asarray(_draw_banner(image.copy(), "prediction failed (see the page)", BANNER_COLOUR))
        faces = [face for face in result.faces if face.box is not None] if result.face_found else []
        with self._lock:
            if predictor is not self.predictor:  # the model changed meanwhile: a reading of another
                return frame.copy()                # model (other classes) has no place in the new timeline
            tracked = self._assign(faces, start)
            for item in tracked:
                points = self._timeline.setdefault(item.track, deque(maxlen=MAX_POINTS_PER_TRACK))
                points.append((start, item.face))
            self._current = tracked
            self._prune(start)
        drawing = self._clock()
        out = self.draw(image, tracked)
        with self._lock:
            self._stages_ms = {**result.timings_ms, "draw": (self._clock() - drawing) * 1000.0}
            self._finish(start)
        return np.asarray(out)

    def draw(self, image: Image.Image, tracked: Sequence[TrackedFace]) -> Image.Image:
        """The frame with each face's box and label (its track number first), at the frame's own
        size: a label with no free place inside the frame goes on its bottom edge."""
        out = image.copy()
        if not tracked:
            return _draw_banner(out, NO_FACE_TEXT, BANNER_COLOUR)
        width, height = out.size
        line = max(2, round(max(out.size) / 250))
        font = _font(max(14, round(max(out.size) / 30)))
        pad = line + 2
        draw = ImageDraw.Draw(out)
        boxes, sizes, texts = [], [], []
        for item in tracked:
            box = item.box
            boxes.append((float(box.x), float(box.y), float(box.x + box.w), float(box.y + box.h)))
            text = label_text(item.track, item.face)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
            texts.append((text, left, top))
        rects = [_inside(rect, width, height) for rect in place_labels(boxes, sizes, width, height)]
        for box, rect, item, (text, left, top) in zip(boxes, rects, tracked, texts):
            tint = self.uncertain_colour if item.face.uncertain else self.colour
            draw.rectangle(box, outline=tint, width=line)
            draw.rectangle(rect, fill=tint)
            draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=LINE_COLOUR, font=font)
        return out

    # ------------------------------------------------------------------ what the page reads

    def stats(self) -> LiveStats:
        now = self._clock()
        with self._lock:
            self._trim_rates(now)
            span = min(FPS_WINDOW_S, now - self._started) if self._started is not None else 0.0
            fps = len(self._done_times) / span if span > 0 else 0.0
            arrived = sum(count for _, count in self._arrivals)
            input_fps = arrived / span if span > 0 else 0.0
            return LiveStats(processed=self._processed, dropped=self._dropped, fps=fps,
                             input_fps=input_fps, latency_ms=self._latency_ms, faces=len(self._current),
                             errors=self._errors, last_error=self._last_error,
                             stages_ms=dict(self._stages_ms))

    def current_faces(self) -> list[TrackedFace]:
        """The faces of the last processed frame, with their track numbers."""
        with self._lock:
            return list(self._current)

    def timeline(self) -> list[TimelinePoint]:
        """Every face reading of the last `window_s` seconds, oldest first within each track."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            return [TimelinePoint(track=track, seconds_ago=when - now, label=face.label,
                                  confidence=face.confidence, uncertain=face.uncertain,
                                  probabilities=tuple(face.probabilities[c] for c in self.class_names))
                    for track, points in sorted(self._timeline.items()) for when, face in points]

    def reset(self) -> None:
        """Forget tracks, timeline and counters (a new stream)."""
        with self._lock:
            self._reset()

    # ------------------------------------------------------------------ internals (under the lock)

    def _reset(self) -> None:
        self._tracks.clear()
        self._timeline.clear()
        self._next_track = 1
        self._processed = self._dropped = self._errors = 0
        self._current = []
        self._last_error = self._latency_ms = self._started = None
        self._stages_ms = {}
        self._done_times.clear()
        self._arrivals.clear()

    def _finish(self, start: float) -> None:
        end = self._clock()
        self._processed += 1
        self._latency_ms = (end - start) * 1000.0
        self._done_times.append(end)
        self._trim_rates(end)

    def _trim_rates(self, now: float) -> None:
        while self._done_times and self._done_times[0] <= now - FPS_WINDOW_S:
            self._done_times.popleft()
        while self._arrivals and self._arrivals[0][0] <= now - FPS_WINDOW_S:
            self._arrivals.popleft()

    def _prune(self, now: float) -> None:
        for track in list(self._timeline):
            points = self._timeline[track]
            while points and points[0][0] < now - self.window_s:
                points.popleft()
            if not points:
                del self._timeline[track]

    def _assign(self, faces: Sequence[FacePrediction], now: float) -> list[TrackedFace]:
        """Greedy matching, best overlap first (then nearest centre); the rest start new tracks."""
        live = [t for t in self._tracks if not t.gone(now)]
        pairs = []
        for ti, track in enumerate(live):
            for fi, face in enumerate(faces):
                overlap, distance = box_iou(track.box, face.box), centre_distance(track.box, face.box)
                if overlap >= MATCH_IOU or distance <= MATCH_CENTRE_SHARE:
                    pairs.append((-overlap, distance, ti, fi))
        numbers: dict[int, int] = {}
        used: set[int] = set()
        for _, _, ti, fi in sorted(pairs):
            if ti in used or fi in numbers:
                continue
            used.add(ti)
            numbers[fi] = live[ti].number
            live[ti].box, live[ti].last_seen, live[ti].misses = faces[fi].box, now, -1
        for track in live:
            track.misses += 1  # 0 for the tracks just seen
        for fi, face in enumerate(faces):
            if fi not in numbers:
                numbers[fi] = self._next_track
                live.append(_Track(self._next_track, face.box, now))
                self._next_track += 1
        self._tracks = live
        return [TrackedFace(numbers[fi], face) for fi, face in enumerate(faces)]


# ---------------------------------------------------------------------- geometry and drawing

def box_iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def centre_distance(track: FaceBox, face: FaceBox) -> float:
    """Distance between the centres, in units of the track box's longer side."""
    (ax, ay), (bx, by) = track.center, face.center
    return float(np.hypot(ax - bx, ay - by)) / max(track.w, track.h, 1)


def _inside(rect: tuple[float, float, float, float], width: int, height: int
            ) -> tuple[float, float, float, float]:
    """`place_labels` puts a label with no room on a strip below the photo; a video frame cannot
    grow, so such a label sits on the frame's bottom edge instead."""
    x0, y0, x1, y1 = rect
    if y1 <= height:
        return rect
    h = y1 - y0
    return (x0, max(0.0, height - h), x1, float(height))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_banner(image: Image.Image, text: str, colour: str) -> Image.Image:
    """A small label at the top left: the frame was seen, and why it carries no face box."""
    draw = ImageDraw.Draw(image)
    font = _font(max(14, round(max(image.size) / 30)))
    pad = max(4, round(max(image.size) / 160))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((pad, pad, pad + right - left + 2 * pad, pad + bottom - top + 2 * pad), fill=colour)
    draw.text((2 * pad - left, 2 * pad - top), text, fill=LINE_COLOUR, font=font)
    return image


# ---------------------------------------------------------------------- configuration

def ice_servers_from_env(environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The ICE servers `ICE_SERVERS_ENV` names (none when unset or blank); ValueError saying what
    is wrong when it is not a JSON list of {"urls": ..., "username"?: ..., "credential"?: ...}."""
    text = (os.environ if environ is None else environ).get(ICE_SERVERS_ENV, "").strip()
    if not text:
        return []
    try:
        servers = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{ICE_SERVERS_ENV} is not valid JSON ({exc})") from None
    if not isinstance(servers, list):
        raise ValueError(f"{ICE_SERVERS_ENV} must be a JSON list of ICE servers, got {type(servers).__name__}")
    for number, server in enumerate(servers, start=1):
        urls = server.get("urls") if isinstance(server, dict) else None
        listed = [urls] if isinstance(urls, str) else urls
        if not (isinstance(listed, list) and listed and all(isinstance(u, str) for u in listed)):
            # never echo the entry: it may hold a TURN password
            raise ValueError(f"{ICE_SERVERS_ENV}: server {number} needs \"urls\", a string or a list "
                             "of strings")
        wrong = [u for u in listed if not u.startswith(("stun:", "stuns:", "turn:", "turns:"))]
        if wrong:
            raise ValueError(f"{ICE_SERVERS_ENV}: ICE server urls start with stun:, stuns:, turn: or "
                             f"turns:, got {wrong[0]!r}")
    return servers
