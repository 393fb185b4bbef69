"""The Predict page, driven headless with AppTest: no model, a model, photos, bad input, URLs.

The checkpoint is an untrained small-stem ResNet18 saved in the training format (no training
needed): its readings are arbitrary, but everything the page shows about them must add up.
URLs are served by a local http.server on 127.0.0.1, which the page refuses by default.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("streamlit")
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import fer_core  # noqa: E402

APP = "../streamlit_app.py"  # AppTest resolves relative paths against this file
PAGE = "pages/predict.py"
TIMEOUT = 60
ACCURACY = 0.5


# ---- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """The app sets torch to one thread in its process (here: pytest's); restore it after."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 7-class small-stem model saved like a published checkpoint."""
    import torch
    from fer_core.models import build_model
    torch.manual_seed(0)
    model, _, _ = build_model(7, stem="small", pretrained=False)
    path = tmp_path_factory.mktemp("predict_ckpt") / "untrained-test-model.pt"
    torch.save({"model_state": model.state_dict(), "class_names": list(fer_core.CLASS_NAMES),
                "config": {"img_size": 48, "stem": "small"},
                "evaluation": {"accuracy": ACCURACY, "macro_f1": 0.4}}, path)
    return path


@pytest.fixture(scope="module")
def face_jpeg() -> bytes:
    """skimage's astronaut: a real frontal face that Haar finds."""
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def plain_png() -> bytes:
    """A flat grey picture: no face, so the whole image is classified."""
    buffer = io.BytesIO()
    Image.new("RGB", (160, 120), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    folders = SimpleNamespace(runs=tmp_path / "runs", ckpt=tmp_path / "checkpoints",
                              cache=tmp_path / "cache")
    folders.ckpt.mkdir()
    monkeypatch.setenv("FER_RUNS_DIR", str(folders.runs))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(folders.ckpt))
    monkeypatch.setenv("FER_CACHE_DIR", str(folders.cache))
    return folders


@pytest.fixture
def published(env, checkpoint) -> Path:
    target = env.ckpt / checkpoint.name
    target.write_bytes(checkpoint.read_bytes())
    return target


@pytest.fixture(scope="module")
def image_server(face_jpeg):
    """http://127.0.0.1:PORT/face.jpg serves the astronaut; any other path is a 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/face.jpg":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(face_jpeg)))
                self.end_headers()
                self.wfile.write(face_jpeg)
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ---- helpers ---------------------------------------------------------------------------

def open_predict() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page(PAGE).run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def rerun(at: AppTest) -> AppTest:
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    parts = [e.value for group in (at.title, at.markdown, at.caption, at.info, at.success,
                                   at.warning, at.error) for e in group]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)


def error_text(at: AppTest) -> str:
    """The error boxes' text without Markdown escapes (names and messages are shown literally)."""
    return " ".join(e.value for e in at.error).replace("\\", "")


def metric(at: AppTest, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return values[0]


def bar_traces(at: AppTest) -> list[dict]:
    figures = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return [t for f in figures for t in f["data"] if t["type"] == "bar"]


def results_table(at: AppTest):
    for element in at.dataframe:
        frame = element.value
        if {"file", "face", "top emotion", "probability"} <= set(frame.columns):
            return frame
    raise AssertionError("no results table on the page")


def uploader(at: AppTest, label: str):
    found = [u for u in at.file_uploader if u.label == label]
    assert found, f"no uploader {label!r}; have {[u.label for u in at.file_uploader]}"
    return found[0]


# ---- tests -----------------------------------------------------------------------------

def test_without_a_model_the_page_says_how_to_get_one_and_takes_an_upload(env, checkpoint):
    at = open_predict()
    text = page_text(at)
    assert "No trained model yet." in text
    assert [link.proto.label for link in at.get("page_link")] == ["Go to Train"]
    assert not at.get("plotly_chart")

    # a checkpoint that is not one: the library's message, nothing crashes
    uploader(at, "Upload a checkpoint file (.pt)").set_value(
        ("weights.pt", b"certainly not a torch file", "application/octet-stream"))
    rerun(at)
    errors = error_text(at)
    assert "weights.pt" in errors and "is not a safe fer_core checkpoint" in errors

    # a real checkpoint file uploaded: its facts are shown
    uploader(at, "Upload a checkpoint file (.pt)").set_value(
        ("mine.pt", checkpoint.read_bytes(), "application/octet-stream"))
    rerun(at)
    assert not at.error
    assert metric(at, "Test accuracy") == "50.0%"
    assert "Uploaded mine.pt" in page_text(at)


def test_uploaded_checkpoints_are_capped_whatever_their_names(env):
    """Names like x.PT or ..pt once escaped the clean-up; the cap must hold for any name."""
    at = open_predict()
    names = ["a.PT", "b..pt", "..pt", ".pt", "c.Pt", "d.pt.PT", "e .pt", "f..PT", "g.pt", "h.PT"]
    for number, name in enumerate(names):
        uploader(at, "Upload a checkpoint file (.pt)").set_value(
            (name, f"not a checkpoint {number}".encode(), "application/octet-stream"))
        rerun(at)
        shown = error_text(at)
        assert "is not a safe fer_core checkpoint" in shown, shown
    stored = [p for p in (env.cache / "uploaded_checkpoints").rglob("*") if p.is_file()]
    assert 1 <= len(stored) <= 4, sorted(map(str, stored))
    assert all(p.suffix == ".pt" for p in stored)
    assert b"not a checkpoint 9" in [p.read_bytes() for p in stored]  # the newest is kept


@pytest.mark.parametrize("name, stored", [
    ("weights.pt", "weights.pt"), ("a.PT", "a.pt"), ("b..pt", "b.pt"), ("..pt", "checkpoint.pt"),
    (".pt", "checkpoint.pt"), ("d.pt.PT", "d.pt.pt"), ("e .pt", "e.pt"), ("../../etc/x.pt", "x.pt"),
    ("C:\\Users\\me\\net.pt", "net.pt"), ("visage-ü.pt", "visage.pt"), ("x" * 300 + ".pt", "x" * 80 + ".pt"),
])
def test_uploaded_checkpoint_names_are_canonical(name, stored):
    from fer_core.uploads import checkpoint_file_name
    assert checkpoint_file_name(name) == stored


def test_the_upload_cap_counts_uploads_not_names(tmp_path):
    """Leftovers of any name (the old layout kept x.PT files) count and go; the newest stays."""
    from fer_core.uploads import KEEP_UPLOADED_CHECKPOINTS, store_uploaded_checkpoint

    folder = tmp_path / "uploaded_checkpoints"
    for number in range(6):  # what the old clean-up left behind
        (folder / f"old{number}").mkdir(parents=True)
        (folder / f"old{number}" / f"net{number}.PT").write_bytes(b"45 MB once")
    (folder / "stray file").write_bytes(b"?")
    paths = [store_uploaded_checkpoint(f"upload {n}".encode(), name, folder)
             for n, name in enumerate(["a.PT", "..pt", "b.pt"])]
    left = sorted(p for p in folder.rglob("*") if p.is_file())
    assert len(left) == KEEP_UPLOADED_CHECKPOINTS == 4
    assert set(paths) <= set(left)  # the three new ones, and one leftover at most
    assert [p.parent.parent for p in paths] == [folder] * 3
    assert paths[-1].read_bytes() == b"upload 2" and paths[-1].name == "b.pt"


def test_a_face_photo_gets_boxes_charts_and_probabilities(env, published, face_jpeg, monkeypatch):
    import streamlit as st
    from fer_core.predict import Predictor

    st.cache_resource.clear()
    loads = []
    original = Predictor.from_checkpoint.__func__

    def counting(cls, path, **kwargs):
        loads.append(str(path))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(counting))

    at = open_predict()
    assert at.selectbox(key="predict_model").value == str(published)
    assert metric(at, "Test accuracy") == "50.0%"
    assert metric(at, "Macro-F1") == "40.0%"
    assert metric(at, "Image size") == "48 px"
    assert metric(at, "Classes") == "7"

    uploader(at, "Drop one or more photos here").set_value(("astronaut.jpg", face_jpeg, "image/jpeg"))
    rerun(at)
    text = page_text(at)
    assert "1 face found" in text and "Face 1" in text
    assert "uncertain" in text  # an untrained model is never sure: ~1/7 for every class
    bars = bar_traces(at)
    assert len(bars) == 1
    assert sorted(bars[0]["y"]) == sorted(fer_core.CLASS_NAMES)
    assert sum(bars[0]["x"]) == pytest.approx(100.0, abs=0.01)
    highlighted = [c for c in bars[0]["marker"]["color"] if c != "#cbd5e1"]
    assert len(highlighted) == 3  # top-3 by default
    assert len(at.image) >= 2  # the annotated photo and the 48 px crop

    frame = results_table(at)
    assert len(frame) == 1 and frame.loc[0, "face"] == "1"
    assert frame.loc[0, list(fer_core.CLASS_NAMES)].sum() == pytest.approx(1.0, abs=1e-4)
    assert frame.loc[0, "probability"] == pytest.approx(max(bars[0]["x"]) / 100, abs=1e-6)
    assert frame.loc[0, "box"]  # x,y,w,h of the face

    # another option re-predicts with the model already in memory
    at.slider(key="predict_top_k").set_value(5)
    rerun(at)
    highlighted = [c for c in bar_traces(at)[0]["marker"]["color"] if c != "#cbd5e1"]
    assert len(highlighted) == 5
    assert loads == [str(published)], "the model was loaded more than once"


def test_many_images_table_csv_and_a_bad_file_only_fails_itself(env, published, face_jpeg, plain_png):
    at = open_predict()
    uploader(at, "Drop one or more photos here").set_value([
        ("astronaut.jpg", face_jpeg, "image/jpeg"),
        ("broken.jpg", b"this is a text file, not a photo", "image/jpeg"),
        ("grey.png", plain_png, "image/png")])
    rerun(at)
    errors = error_text(at)
    assert "broken" in errors and "is not an image in a format this tool reads" in errors
    text = page_text(at)
    assert "**3 images**" in text
    assert "No face found: classified the whole image" in text  # the grey picture
    assert len(bar_traces(at)) == 2  # astronaut's face + grey's whole image

    frame = results_table(at)
    assert list(frame["file"]) == ["astronaut.jpg", "broken.jpg", "grey.png"]
    assert list(frame["face"]) == ["1", "", "whole image"]
    assert frame.loc[1, "error"]
    for row in (0, 2):
        assert frame.loc[row, list(fer_core.CLASS_NAMES)].sum() == pytest.approx(1.0, abs=1e-4)
    assert [b for b in at.get("download_button") if "CSV" in b.proto.label]


def fetch(at) -> None:
    """Press the URL tab's "Fetch and predict" and let the page finish."""
    at.button[[b.label for b in at.button].index("Fetch and predict")].click()
    rerun(at)


def test_urls_private_refused_unless_allowed_and_404_explained(env, published, image_server):
    at = open_predict()
    at.text_input(key="predict_url").set_value(f"{image_server}/face.jpg")
    fetch(at)
    errors = error_text(at)
    assert "refusing to fetch from 127.0.0.1" in errors and "loopback" in errors
    assert not at.get("plotly_chart")

    at.checkbox(key="predict_allow_private").check()
    fetch(at)
    assert not at.error
    assert len(bar_traces(at)) == 1
    assert "1 face found" in page_text(at)

    at.text_input(key="predict_url").set_value(f"{image_server}/missing.jpg")
    fetch(at)
    errors = error_text(at)
    assert "not found" in errors and "HTTP 404" in errors
    assert not at.get("plotly_chart")


def test_a_camera_photo_is_read_like_an_upload(env, published, face_jpeg):
    at = open_predict()
    assert not at.camera_input  # the camera stays off (no browser permission prompt) until asked
    at.toggle(key="predict_camera_on").set_value(True)
    rerun(at)
    at.camera_input(key="predict_camera").set_value(("photo.jpg", face_jpeg, "image/jpeg"))
    rerun(at)
    assert "1 face found" in page_text(at)
    assert len(bar_traces(at)) == 1
