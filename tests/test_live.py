"""Live video (fer_core.live and the Predict page's live tab): faces keep their number from frame
to frame, the timeline holds the last 30 s, frames per second and dropped frames add up, a
stream with many frames waiting reads only the newest, and a bad frame never stops the stream.

Most tests use a stand-in predictor that returns chosen boxes, with a hand-driven clock; one runs
the real `Predictor` (an untrained model) on two real faces.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import fer_core
from fer_core.faces import FaceBox
from fer_core.live import (ICE_SERVERS_ENV, NO_FACE_TEXT, TIMELINE_S, TRACK_MISSES, TRACK_TIMEOUT_S,
                           LiveAnnotator, ice_servers_from_env)
from fer_core.predict import FacePrediction, PredictionResult, Predictor

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["happy", "sad"]
COLOUR, UNCERTAIN = (255, 0, 0), (0, 0, 255)


# ---- helpers ---------------------------------------------------------------------------

def two_face_frame(shift: int = 0) -> np.ndarray:
    """640x480 RGB: skimage's astronaut twice (once mirrored), each face ~115 px wide, the two
    moving `shift` px towards each other. Haar finds both (the larger first)."""
    from skimage import data as skdata
    head = Image.fromarray(skdata.astronaut()).crop((117, 16, 337, 236)).resize((240, 240))
    canvas = Image.new("RGB", (640, 480), (70, 80, 95))
    canvas.paste(head, (50 + shift, 120))
    canvas.paste(ImageOps.mirror(head), (350 - shift, 120))
    return np.asarray(canvas).copy()


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 15) -> Path:
    """RGB frames -> a YUV4MPEG2 (4:2:0) file, what Chromium's fake camera plays in a loop
    (`--use-file-for-fake-video-capture`)."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as handle:
        handle.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            y, u, v = Image.fromarray(frame).convert("YCbCr").split()
            handle.write(b"FRAME\n" + y.tobytes()
                         + u.resize((width // 2, height // 2), Image.Resampling.BILINEAR).tobytes()
                         + v.resize((width // 2, height // 2), Image.Resampling.BILINEAR).tobytes())
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StubPredictor:
    """Answers `predict` with the boxes queued in `frames` (one list per call); records options."""

    class_names = CLASSES

    def __init__(self, clock: Clock | None = None, cost_s: float = 0.0) -> None:
        self.frames: list[list[tuple[int, int, int, int]]] = []
        self.calls: list[dict] = []
        self.clock, self.cost_s = clock, cost_s
        self.fail = False

    def predict(self, image, **options) -> PredictionResult:
        self.calls.append(options)
        if self.clock is not None:
            self.clock.now += self.cost_s
        if self.fail:
            raise RuntimeError("model exploded")
        boxes = self.frames.pop(0) if self.frames else []
        below = options.get("uncertain_below", 0.4)
        crop = Image.new("L", (48, 48))
        faces = [FacePrediction(box=FaceBox(x, y, w, h, 0.5, "stub"),
                                probabilities={"happy": 0.7, "sad": 0.3},
                                top_k=[("happy", 0.7), ("sad", 0.3)], uncertain=0.7 < below, crop=crop)
                 for x, y, w, h in boxes]
        if not faces:  # what Predictor does: the whole image, face_found False
            faces = [FacePrediction(box=None, probabilities={"happy": 0.5, "sad": 0.5},
                                    top_k=[("happy", 0.5), ("sad", 0.5)], uncertain=False, crop=crop)]
        return PredictionResult(source="<frame>", faces=faces, face_found=bool(boxes), message="",
                                image_size=image.size, timings_ms={"detect": 1.0, "classify": 2.0})


def annotator(predictor, clock: Clock, **options) -> LiveAnnotator:
    return LiveAnnotator(predictor, {"uncertain_below": 0.4, **options}, colour="#ff0000",
                         uncertain_colour="#0000ff", clock=clock)


def blank(width: int = 320, height: int = 240) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


def tracks_of(live: LiveAnnotator, predictor: StubPredictor, boxes) -> list[int]:
    """Feed one frame with `boxes` and return the track number of each box, in `boxes` order."""
    predictor.frames.append(boxes)
    live.process(blank())
    faces = live.current_faces()
    assert [(f.box.x, f.box.y, f.box.w, f.box.h) for f in faces] == boxes
    return [f.track for f in faces]


# ---- tracks ----------------------------------------------------------------------------

def test_faces_keep_their_number_while_they_move_and_the_detector_reorders_them():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    left, right = (20, 60, 80, 80), (200, 60, 70, 70)
    assert tracks_of(live, predictor, [left, right]) == [1, 2]
    clock.now += 0.1
    # the detector lists the larger face first: now the right one; both moved a little
    moved_right, moved_left = (190, 58, 90, 90), (28, 62, 78, 78)
    assert tracks_of(live, predictor, [moved_right, moved_left]) == [2, 1]
    clock.now += 0.1
    # a quick turn: no overlap with its last box, but its centre is near
    jumped_left = (28 + 45, 62, 78, 78)
    assert tracks_of(live, predictor, [jumped_left, moved_right]) == [1, 2]


def test_a_new_face_gets_a_new_number_and_a_face_gone_too_long_comes_back_as_new():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    face = (20, 60, 80, 80)
    assert tracks_of(live, predictor, [face]) == [1]
    clock.now += 0.2
    assert tracks_of(live, predictor, [face, (220, 60, 60, 60)]) == [1, 2]
    for _ in range(TRACK_MISSES + 2):  # missed by the detector for a few frames, briefly: same face
        clock.now += 0.1
        tracks_of(live, predictor, [])
    assert tracks_of(live, predictor, [face]) == [1]
    clock.now += TRACK_TIMEOUT_S * 3  # a slow CPU: the next frame comes late, but the face is there
    assert tracks_of(live, predictor, [face]) == [1]
    for _ in range(TRACK_MISSES):  # then it really leaves: frames without it, for long enough
        clock.now += TRACK_TIMEOUT_S / 2
        tracks_of(live, predictor, [])
    assert tracks_of(live, predictor, [face]) == [3]


def test_the_timeline_keeps_each_faces_last_30_seconds():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    for _ in range(40):  # one frame a second for 40 s, two faces
        predictor.frames.append([(20, 60, 80, 80), (200, 60, 70, 70)])
        live.process(blank())
        clock.now += 1.0
    points = live.timeline()
    assert {p.track for p in points} == {1, 2}
    assert all(-TIMELINE_S <= p.seconds_ago <= 0 for p in points)
    assert len([p for p in points if p.track == 1]) == 30
    first = points[0]
    assert (first.label, first.probabilities, first.uncertain) == ("happy", (0.7, 0.3), False)
    assert first.confidence == pytest.approx(0.7)
    clock.now += TIMELINE_S + 1  # nothing new for longer than the window: empty
    assert live.timeline() == []


# ---- frames per second, dropped frames, errors -------------------------------------------

def test_fps_counts_processed_frames_and_dropped_frames_add_up():
    clock = Clock()
    predictor = StubPredictor(clock, cost_s=0.1)  # 100 ms a frame: 10 fps at most
    live = annotator(predictor, clock)
    assert live.stats().fps == 0.0 and live.stats().processed == 0
    for _ in range(30):
        live.process(blank(), dropped=2)  # the camera sent 3 frames while each was read
    stats = live.stats()
    assert (stats.processed, stats.dropped, stats.received) == (30, 60, 90)
    assert stats.fps == pytest.approx(10.0, rel=0.05)
    assert stats.input_fps == pytest.approx(30.0, rel=0.05)
    assert stats.dropped_share == pytest.approx(2 / 3)
    assert stats.latency_ms == pytest.approx(100.0)
    assert set(stats.stages_ms) == {"detect", "classify", "draw"}
    clock.now += 10  # the stream stopped: the rate falls to 0, the totals stay
    assert live.stats().fps == 0.0 and live.stats().processed == 30


def test_a_failing_prediction_returns_the_frame_and_is_counted_not_raised():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    predictor.fail = True
    frame = blank()
    out = live.process(frame)
    assert out.shape == frame.shape and out.dtype == np.uint8
    stats = live.stats()
    assert (stats.processed, stats.errors) == (1, 1)
    assert "model exploded" in stats.last_error
    predictor.fail = False
    live.process(frame)
    assert live.stats().processed == 2


def test_a_frame_that_is_not_rgb_is_refused():
    live = annotator(StubPredictor(), Clock())
    with pytest.raises(ValueError, match="RGB uint8"):
        live.process(np.zeros((48, 48), np.uint8))


# ---- drawing and options ---------------------------------------------------------------

def test_faces_are_boxed_in_the_frame_and_a_frame_without_one_says_no_face():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    frame = blank()
    predictor.frames.append([(100, 80, 80, 80)])
    out = live.process(frame)
    assert out.shape == frame.shape
    assert tuple(out[120, 100]) == COLOUR  # the box's left edge, in the face colour
    assert (out[100:140, 110:170] == 128).all()  # the face itself is left alone

    out = live.process(frame)  # no box queued: no face
    assert out.shape == frame.shape
    assert (out[:30, :60] != 128).any(), f"a '{NO_FACE_TEXT}' label at the top left"
    assert live.stats().faces == 0
    assert {p.track for p in live.timeline()} == {1}  # no point for the face-less frame


def test_a_label_with_no_room_stays_inside_the_frame():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    predictor.frames.append([(0, 0, 320, 240)])  # a face filling the frame: no free place
    out = live.process(blank())
    assert out.shape == (240, 320, 3)


def test_options_reach_the_predictor_and_can_change_while_frames_flow():
    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock, detector="haar-alt2", min_face_size=40)
    predictor.frames.append([(100, 80, 80, 80)])
    live.process(blank())
    assert predictor.calls[-1] == {"uncertain_below": 0.4, "detector": "haar-alt2", "min_face_size": 40}
    live.set_options({"uncertain_below": 0.9})
    predictor.frames.append([(100, 80, 80, 80)])
    out = live.process(blank())
    assert predictor.calls[-1] == {"uncertain_below": 0.9}
    assert tuple(out[120, 100]) == UNCERTAIN  # 70% < 90%: drawn as uncertain
    assert live.timeline()[-1].uncertain


def test_another_model_starts_a_new_timeline():
    clock, first = Clock(), StubPredictor()
    live = annotator(first, clock)
    first.frames.append([(100, 80, 80, 80)])
    live.process(blank())
    live.use(first, {"uncertain_below": 0.5})  # same model, new options: the timeline stays
    assert live.timeline() and live.stats().processed == 1
    second = StubPredictor()
    second.class_names = ["calm", "angry", "sad"]
    live.use(second, {"uncertain_below": 0.5})
    assert live.timeline() == [] and live.stats().processed == 0
    assert live.class_names == ["calm", "angry", "sad"] and live.predictor is second


def test_a_reading_by_the_previous_model_stays_out_of_the_new_models_timeline():
    clock, first, second = Clock(), StubPredictor(), StubPredictor()
    second.class_names = ["calm", "angry", "sad"]
    live = annotator(first, clock)
    first.frames.append([(100, 80, 80, 80)])
    original = first.predict

    def switched_meanwhile(image, **options):  # the page picks another model mid-frame
        live.use(second, options)
        return original(image, **options)

    first.predict = switched_meanwhile
    live.process(blank())
    assert live.timeline() == [] and live.current_faces() == [] and live.stats().processed == 0


def test_frames_and_readers_on_different_threads():
    """The stream's thread processes while the page's thread reads, as in the app."""
    predictor = StubPredictor()
    predictor.frames = [[(20, 60, 80, 80), (200, 60, 70, 70)]] * 100
    live = LiveAnnotator(predictor, {})
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while predictor.frames:
                live.stats()
                live.timeline()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(100):
        live.process(blank(), dropped=1)
    reader.join(timeout=30)
    assert not errors
    stats = live.stats()
    assert (stats.processed, stats.dropped) == (100, 100)
    assert {p.track for p in live.timeline()} == {1, 2}


# ---- the real predictor -------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor() -> Predictor:
    import torch
    from fer_core.models import build_model
    torch.manual_seed(0)
    model, _, _ = build_model(7, stem="small", pretrained=False)
    return Predictor(model.eval(), fer_core.CLASS_NAMES, 48, num_threads=1)


def test_the_real_predictor_boxes_both_faces_and_follows_them(predictor):
    live = LiveAnnotator(predictor, {"top_k": 3, "min_face_size": 24, "uncertain_below": 0.0,
                                     "detector": "auto"})
    first = live.process(two_face_frame(0))
    assert live.stats().faces == 2
    def numbers_by_side() -> dict[str, int]:
        return {("left" if f.box.x < 320 else "right"): f.track for f in live.current_faces()}

    first_numbers = numbers_by_side()
    assert sorted(first_numbers.values()) == [1, 2]
    for shift in (8, 16):  # the faces move and the detector swaps their order: numbers stay
        live.process(two_face_frame(shift))
        assert numbers_by_side() == first_numbers
    assert first.shape == (480, 640, 3) and not np.array_equal(first, two_face_frame(0))
    points = live.timeline()
    assert len(points) == 6 and {p.track for p in points} == {1, 2}
    for point in points:
        assert point.label in fer_core.CLASS_NAMES
        assert sum(point.probabilities) == pytest.approx(1.0, abs=1e-4)
        assert not point.uncertain  # threshold 0: nothing is uncertain
    live.set_options({"uncertain_below": 1.0})  # the page's threshold goes straight through
    live.process(two_face_frame(0))
    assert [f.face.uncertain for f in live.current_faces()] == [True, True]


# ---- configuration ---------------------------------------------------------------------

def test_ice_servers_come_from_the_environment_and_bad_ones_are_explained():
    assert ice_servers_from_env({}) == []
    assert ice_servers_from_env({ICE_SERVERS_ENV: "  "}) == []
    turn = '[{"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "secret"}]'
    assert ice_servers_from_env({ICE_SERVERS_ENV: turn})[0]["username"] == "u"
    for bad, says in (("{", "not valid JSON"), ('{"urls": "turn:x"}', "must be a JSON list"),
                      ('[{"username": "u", "credential": "secret"}]', 'needs "urls"'),
                      ('[{"urls": "http://example.org"}]', "start with stun:")):
        with pytest.raises(ValueError, match=says) as caught:
            ice_servers_from_env({ICE_SERVERS_ENV: bad})
        assert "secret" not in str(caught.value)


# ---- the page's glue (streamlit-webrtc) ----------------------------------------------------

def test_the_stream_reads_only_the_newest_of_the_waiting_frames(monkeypatch):
    """streamlit-webrtc's async mode hands `recv_queued` every frame that arrived during the last
    one's processing: one is read, the others are counted as dropped, none is kept for later."""
    import asyncio

    av = pytest.importorskip("av")
    pytest.importorskip("streamlit_webrtc")
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delitem(sys.modules, "pages._live", raising=False)
    from pages._live import processor_class

    clock, predictor = Clock(), StubPredictor()
    live = annotator(predictor, clock)
    live.process(blank())  # a stream that ran before: a new processor starts from zero
    processor = processor_class()(live)
    assert live.stats().processed == 0
    frames = []
    for index in range(5):
        frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 40 * index, np.uint8), format="rgb24")
        frame.pts = index
        frames.append(frame)
    predictor.frames.append([(100, 80, 80, 80)])
    out = asyncio.run(processor.recv_queued(frames))
    assert len(out) == 1 and out[0].width == 320 and out[0].height == 240
    stats = live.stats()
    assert (stats.processed, stats.dropped) == (1, 4)
    newest = out[0].to_ndarray(format="rgb24")
    assert (newest[100:140, 110:170] == 160).all()  # the last frame (grey 160) was the one read


# ---- the page (AppTest) ----------------------------------------------------------------------

@pytest.fixture
def published_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An untrained 7-class model as a published checkpoint, the app's folders under tmp_path."""
    import torch
    from fer_core.models import build_model
    torch.manual_seed(0)
    model, _, _ = build_model(7, stem="small", pretrained=False)
    for name in ("runs", "checkpoints", "cache"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("FER_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "checkpoints" / "live-test-model.pt"
    torch.save({"model_state": model.state_dict(), "class_names": list(fer_core.CLASS_NAMES),
                "config": {"img_size": 48, "stem": "small"}, "evaluation": {"accuracy": 0.5}}, path)
    return path


class FakeStreamer:
    """Stands in for streamlit_webrtc.webrtc_streamer (its component needs a real server): records
    the call and, once "started", pushes camera frames through the processor the page made."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames, self.calls, self.playing = frames, [], False

    def __call__(self, **kwargs):
        import asyncio
        from types import SimpleNamespace

        import av
        self.calls.append(kwargs)
        if self.playing:
            processor = kwargs["video_processor_factory"]()
            waiting = [av.VideoFrame.from_ndarray(frame, format="rgb24") for frame in self.frames]
            asyncio.run(processor.recv_queued(waiting))
        return SimpleNamespace(state=SimpleNamespace(playing=self.playing, signalling=False))


def test_the_live_tab_waits_for_its_switch_then_streams_with_the_pages_options(published_model, monkeypatch):
    import streamlit_webrtc
    import torch
    from streamlit.testing.v1 import AppTest

    from markdown_safety import active_markdown

    fake = FakeStreamer([two_face_frame(8), two_face_frame(0)])
    monkeypatch.setattr(streamlit_webrtc, "webrtc_streamer", fake)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the app's 1-thread setting stays there
    at = AppTest.from_file("../streamlit_app.py", default_timeout=60)
    at.switch_page("pages/predict.py").run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    assert at.tabs[-1].label.endswith("Live")
    assert not fake.calls, "nothing of WebRTC until live mode is switched on"

    [threshold] = [s for s in at.slider if s.label == "Uncertain below"]
    threshold.set_value(95)
    at.toggle(key="predict_live_on").set_value(True)
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    call = fake.calls[-1]
    assert call["rtc_configuration"] == {"iceServers": []}  # no STUN/TURN server: works offline
    assert call["async_processing"] is True and call["media_stream_constraints"]["audio"] is False
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Processed fps"], metrics["Dropped frames"]) == ("0.0", "0")
    assert any("Press START" in c.value for c in at.caption)

    fake.playing = True  # the user pressed START: two frames were waiting, the newest is read
    at.run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Processed fps"]) > 0 and metrics["Dropped frames"] == "1"
    live = at.session_state["predict_live_annotator"]
    assert [f.face.uncertain for f in live.current_faces()] == [True, True]  # the page's 95% threshold
    figure = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert {t["name"] for t in figure["data"]} == set(fer_core.CLASS_NAMES)
    assert [a["text"].split(":")[0] for a in figure["layout"]["annotations"]] == ["Face 1", "Face 2"]
    assert not active_markdown(at), active_markdown(at)

    monkeypatch.setenv(ICE_SERVERS_ENV, '[{"urls": "http://turn.example.org"}]')
    at.run(timeout=60)
    assert "start with stun:" in " ".join(e.value for e in at.error).replace("\\", "")
