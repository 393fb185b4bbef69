"""The Predict page, driven headless with AppTest: no model, a model, photos, bad input, URLs.

The checkpoint is an untrained small-stem ResNet18 saved in the training format (no training
needed): its readings are arbitrary, but everything the page shows about them must add up.
URLs are served by a local http.server on 127.0.0.1, which the page refuses by default.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("streamlit")
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import fer_core  # noqa: E402
from fer_core import runs  # noqa: E402
from markdown_safety import MALICIOUS_IMAGE, MALICIOUS_LINK, active_markdown, plain_text  # noqa: E402

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


@pytest.fixture(scope="module")
def plain_jpeg() -> bytes:
    """The flat grey picture as the camera sends it (JPEG)."""
    buffer = io.BytesIO()
    Image.new("RGB", (160, 120), (128, 128, 128)).save(buffer, "JPEG")
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
    parts = [e.value for group in (at.title, at.markdown, at.caption, at.text, at.info, at.success,
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


def images_outside_expanders(node) -> int:
    if getattr(node, "type", "") == "expander":
        return 0
    if getattr(node, "type", "") == "image":
        return len(node.proto.imgs)
    return sum(images_outside_expanders(child) for child in getattr(node, "children", {}).values())


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


def test_onnx_runtime_reads_the_photo_as_pytorch_does(env, published, face_jpeg):
    at = open_predict()
    assert at.button_group(key="predict_backend").value == "torch"
    uploader(at, "Drop one or more photos here").set_value(("astronaut.jpg", face_jpeg, "image/jpeg"))
    on_torch = results_table(rerun(at))
    assert "on PyTorch" in page_text(at)

    at.button_group(key="predict_backend").set_value("onnx")
    on_onnx = results_table(rerun(at))
    assert "on ONNX Runtime" in page_text(at) and "1 face found" in page_text(at)
    assert list(env.cache.glob("onnx/*.onnx")), "the checkpoint was exported once, into the cache"
    assert on_onnx.loc[0, "box"] == on_torch.loc[0, "box"]
    classes = list(fer_core.CLASS_NAMES)
    assert (on_onnx.loc[0, classes] - on_torch.loc[0, classes]).abs().max() <= 1e-4


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
    assert "No face found" in text  # the grey picture
    assert len(bar_traces(at)) == 2  # astronaut's face + grey's whole image

    frame = results_table(at)
    assert list(frame["file"]) == ["astronaut.jpg", "broken.jpg", "grey.png"]
    assert list(frame["face"]) == ["1", "", "none: whole image"]
    assert frame.loc[1, "error"]
    for row in (0, 2):
        assert frame.loc[row, list(fer_core.CLASS_NAMES)].sum() == pytest.approx(1.0, abs=1e-4)
    assert [b for b in at.get("download_button") if "CSV" in b.proto.label]


def test_a_photo_refused_for_the_submissions_pixel_allowance_is_read_when_sent_alone(env, published, monkeypatch):
    """The refusal is the submission's, not the photo's: it is not remembered for the photo."""
    import io

    import numpy as np
    from PIL import Image

    from fer_core import images

    def dense_png(level: int) -> bytes:  # 4 MP, a few KB on the wire
        buffer = io.BytesIO()
        Image.fromarray(np.full((2000, 2000), level, dtype=np.uint16)).save(buffer, format="PNG")
        return buffer.getvalue()

    monkeypatch.setattr(images, "MAX_REQUEST_PIXELS", 6_000_000)
    first, second = ("first.png", dense_png(1234), "image/png"), ("second.png", dense_png(2345), "image/png")
    at = open_predict()
    uploader(at, "Drop one or more photos here").set_value([first, second])
    rerun(at)
    assert "megapixels" in error_text(at)  # the second photo, refused: the first used the allowance
    uploader(at, "Drop one or more photos here").set_value([second])
    rerun(at)
    assert "megapixels" not in error_text(at) and not at.exception


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


# ---- which model, and how it is named (issue #11 items 2 and 8) ----------------------------

def add_run(env, checkpoint: Path, stamp: str, experiment: str, *, state: str = "completed",
            accuracy: float | None = None, synthetic: bool = False, age_s: float = 0.0) -> runs.RunInfo:
    """A run folder as the trainer leaves it, holding the test checkpoint (no training)."""
    layout = runs.RunLayout(env.runs / stamp / experiment / runs.MODEL_NAME / "finetune")
    layout.checkpoint_dir.mkdir(parents=True)
    runs.atomic_write_json(layout.config_file, {"data": "demo" if synthetic else "/data/fer2013",
                                                "experiment": experiment, "mode": "finetune"})
    runs.atomic_write_json(layout.environment_file, {"synthetic_data": synthetic,
                                                     "classes": list(fer_core.CLASS_NAMES)})
    layout.best_checkpoint.write_bytes(checkpoint.read_bytes())
    status = {"state": state, "started_at": time.time() - 60,
              "pid": os.getpid() if state == "running" else None}
    if state == "completed":
        target = layout.published_checkpoint(env.ckpt)
        target.write_bytes(checkpoint.read_bytes())
        status.update(published_checkpoint=str(target), finished_at=time.time())
    runs.atomic_write_json(layout.status_file, status)
    if accuracy is not None:
        runs.atomic_write_json(layout.evaluation_file(), {
            "accuracy": accuracy, "macro_f1": accuracy - 0.05, "classes": list(fer_core.CLASS_NAMES),
            "confusion_matrix": [[1 if i == j else 0 for j in range(7)] for i in range(7)]})
    for path in (layout.best_checkpoint, layout.published_checkpoint(env.ckpt)):
        if path.exists():
            os.utime(path, (time.time() - age_s, time.time() - age_s))
    return runs.load_run(layout)


def test_the_default_model_is_the_best_completed_one_on_real_data_and_says_why(env, checkpoint):
    best = add_run(env, checkpoint, "2030-01-01_00-00-00", "cpu-fast", accuracy=0.683, age_s=3000)
    add_run(env, checkpoint, "2030-01-02_00-00-00", "demo-quick", accuracy=0.874, synthetic=True,
            age_s=2000)
    live = add_run(env, checkpoint, "2030-01-03_00-00-00", "demo-live", state="running", synthetic=True)
    (env.ckpt / "left-over-of-a-deleted-run.pt").write_bytes(checkpoint.read_bytes())  # the newest

    at = open_predict()
    box = at.selectbox(key="predict_model")
    assert box.value == str(best.layout.published_checkpoint(env.ckpt))
    assert "Chosen: the best completed model on real data (68.3% test accuracy)." in page_text(at)
    labels = list(box.options)  # as shown: format_func applied
    # one entry per model (not the published file and best.pt), scored and tagged; a plain upload entry
    assert len(labels) == 4 + 1
    assert labels[0] == f"{best.id} · test 68.3% · macro-F1 63.3%"
    assert any(label.startswith(live.id) and "running" in label for label in labels)
    assert sum("SYNTHETIC" in label for label in labels) == 2
    assert labels[-1] == "Upload a checkpoint file…"
    assert not [label for label in labels if ":material/" in label]

    # choosing another model: no "Chosen" reason, its own facts
    box.set_value(str(live.best_checkpoint))
    rerun(at)
    assert "Chosen:" not in page_text(at)


# ---- many photos, no face (issue #11, "Also") --------------------------------------------

def test_more_than_four_photos_show_as_a_grid_with_details_on_demand(env, published, face_jpeg, plain_png):
    at = open_predict()
    photos = [(f"astronaut{n}.jpg", face_jpeg, "image/jpeg") for n in range(4)] + [
        ("grey.png", plain_png, "image/png")]
    uploader(at, "Drop one or more photos here").set_value(photos)
    rerun(at)
    assert images_outside_expanders(at.main) >= 5  # every photo visible without opening anything
    captions = [t.value for t in at.text]
    assert "astronaut0.jpg\n1 face found · " in "\n".join(captions)
    assert "grey.png\nno face found" in captions
    assert len(at.expander) >= 5  # the details, one per photo, closed


def test_a_photo_without_a_face_says_so_and_keeps_the_whole_image_reading_aside(env, published, plain_jpeg):
    at = open_predict()
    at.toggle(key="predict_camera_on").set_value(True)
    rerun(at)
    at.camera_input(key="predict_camera").set_value(("photo.jpg", plain_jpeg, "image/jpeg"))
    rerun(at)
    assert "No face found" in " ".join(w.value for w in at.warning)
    whole, = [e for e in at.expander if e.label.startswith("Whole-image reading")]
    assert len(whole.get("plotly_chart")) == 1
    assert len(at.get("plotly_chart")) == 1  # the only chart is the folded whole-image one
    outside = [m.value for m in at.markdown if m.value not in [w.value for w in whole.markdown]]
    assert not [m for m in outside if "%" in m], outside  # no emotion headline for a face-less photo


# ---- names from files are text, never Markdown (issue #12 item 5) -----------------------

@pytest.fixture(scope="module")
def malicious_checkpoint(tmp_path_factory) -> Path:
    import torch
    from fer_core.models import build_model
    model, _, _ = build_model(7, stem="small", pretrained=False)
    classes = [MALICIOUS_IMAGE, MALICIOUS_LINK, "**bold**", ":material/home: icon", "<b>tag</b>",
               "$x^2$", "sad"]
    path = tmp_path_factory.mktemp("evil_ckpt") / "evil.pt"
    torch.save({"model_state": model.state_dict(), "class_names": classes,
                "config": {"img_size": 48, "stem": "small"}}, path)
    return path


def test_class_names_from_a_checkpoint_show_literally_on_the_predict_page(env, malicious_checkpoint,
                                                                          face_jpeg, plain_png):
    (env.ckpt / "evil.pt").write_bytes(malicious_checkpoint.read_bytes())
    at = open_predict()
    uploader(at, "Drop one or more photos here").set_value([
        ("astronaut.jpg", face_jpeg, "image/jpeg"), ("grey.png", plain_png, "image/png"),
        (f"{MALICIOUS_IMAGE}.png", plain_png, "image/png")])
    rerun(at)
    assert not active_markdown(at), active_markdown(at)
    assert MALICIOUS_IMAGE in plain_text(at)  # shown, as typed
    assert metric(at, "Classes") == "7"
