"""Prediction end to end with an untrained model: shapes, class order, preprocessing, errors."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data

import fer_core
from fer_core.errors import CheckpointError, ImageInputError
from fer_core.inference import autocast_context
from fer_core.models import build_model
from fer_core.image_format import STORE_SIZE
from fer_core.predict import (NO_FACE_MESSAGE, Predictor, add_predict_arguments,
                              describe_checkpoint, newest_checkpoint, predict_command)
from fer_core.image_format import DEFAULT_FORMAT, ImageFormat
from fer_core.transforms import eval_transform, tta_views

CLASSES = list(fer_core.CLASS_NAMES)


def save_checkpoint(path: Path, *, classes: list[str] = CLASSES, img_size: int = 48,
                    outputs: int | None = None, image_format: ImageFormat = DEFAULT_FORMAT, **extra: Any) -> Path:
    torch.manual_seed(0)
    model, _, _ = build_model(outputs or len(classes), stem="small", pretrained=False,
                              in_channels=image_format.channels)
    torch.save({"model_state": model.state_dict(), "class_names": classes,
                "config": {"img_size": img_size, "stem": "small", "store_size": image_format.size,
                           "colour": image_format.colour}, **extra}, path)
    return path


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    # one thread: the test machine is shared, and oversubscribed torch threads crawl
    return Predictor.from_checkpoint(checkpoint, num_threads=1)


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return jpeg(Image.fromarray(data.astronaut()))


# --------------------------------------------------------------------------- predictions

def test_face_is_found_and_classified(predictor: Predictor, astronaut_jpeg: bytes) -> None:
    result = predictor.predict(astronaut_jpeg)
    assert result.ok and result.face_found and result.message == "1 face found"
    assert result.image_size == (512, 512)
    (face,) = result.faces
    assert face.box is not None and abs(face.box.x - 177) < 15 and abs(face.box.w - 95) < 15
    assert list(face.probabilities) == CLASSES
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert len(face.top_k) == 3
    assert [p for _, p in face.top_k] == sorted((p for _, p in face.top_k), reverse=True)
    assert face.top_k[0] == max(face.probabilities.items(), key=lambda item: item[1])
    assert face.crop.mode == "L" and face.crop.size == (STORE_SIZE, STORE_SIZE)
    assert set(result.timings_ms) == {"load", "detect", "crop", "classify"}


def test_boxes_of_a_large_jpeg_are_in_original_pixels(predictor: Predictor) -> None:
    photo = Image.new("RGB", (3600, 2700), (70, 90, 80))
    photo.paste(Image.fromarray(data.astronaut()).resize((1536, 1536)), (1200, 600))
    result = predictor.predict(jpeg(photo))  # decoded at 1/2 scale for speed
    (face,) = result.faces
    assert result.image_size == (3600, 2700)
    assert abs(face.box.x - (1200 + 177 * 3)) < 40 and abs(face.box.w - 95 * 3) < 45
    assert face.crop.size == (STORE_SIZE, STORE_SIZE)


def test_blank_image_falls_back_to_the_whole_image(predictor: Predictor) -> None:
    result = predictor.predict(Image.new("RGB", (320, 240), (180, 180, 180)))
    assert not result.face_found and result.message == NO_FACE_MESSAGE
    (face,) = result.faces
    assert face.box is None and face.crop.size == (STORE_SIZE, STORE_SIZE)
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_preprocessing_is_exactly_the_evaluation_path(predictor: Predictor,
                                                      astronaut_jpeg: bytes) -> None:
    result = predictor.predict(astronaut_jpeg)
    box = result.faces[0].box
    region = Image.open(io.BytesIO(astronaut_jpeg)).convert("RGB").crop(
        (box.x, box.y, box.x + box.w, box.y + box.h))
    grey = ImageOps.fit(region.convert("L"), (48, 48), method=Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(grey), np.asarray(result.faces[0].crop))
    batch = torch.from_numpy(np.array(grey)).unsqueeze(0)
    with torch.inference_mode():
        expected = torch.softmax(predictor.model(eval_transform(batch, 48)), dim=1)[0]
    assert list(result.faces[0].probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.parametrize("amp, tta", [(False, False), (True, False), (False, True)])
def test_probabilities_are_the_averaged_softmax_of_the_evaluation_views(checkpoint: Path, amp: bool,
                                                                         tta: bool) -> None:
    predictor = Predictor.from_checkpoint(checkpoint, amp=amp, tta=tta, num_threads=1)
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the predictor does; oversubscribed threads crawl on shared CPUs
    try:
        x = eval_transform(batch, 48)
        views = tta_views(x) if tta else [x]
        with torch.inference_mode(), autocast_context(torch.device("cpu"), amp):
            expected = torch.stack([predictor.model(v).float().softmax(1) for v in views]).mean(0)
    finally:
        torch.set_num_threads(threads)
    assert np.allclose(predictor.probabilities(batch).numpy(), expected.numpy(), atol=1e-6)


def test_amp_and_tta_follow_the_checkpoint_config(tmp_path: Path) -> None:
    path = tmp_path / "evaluated.pt"
    ckpt = torch.load(save_checkpoint(path), weights_only=True)
    ckpt["config"].update(amp=True, tta=True)
    torch.save(ckpt, path)
    predictor = Predictor.from_checkpoint(path)
    assert predictor.amp and predictor.tta and predictor.info["tta"]
    assert not Predictor.from_checkpoint(path, tta=False).tta


def test_probabilities_follow_the_checkpoint_class_order(tmp_path: Path, predictor: Predictor,
                                                         astronaut_jpeg: bytes) -> None:
    shuffled = ["surprise", "angry", "sad", "happy", "fear", "neutral", "disgust"]
    other = Predictor.from_checkpoint(save_checkpoint(tmp_path / "s.pt", classes=shuffled),
                                      num_threads=1)
    mine = predictor.predict(astronaut_jpeg).faces[0].probabilities
    theirs = other.predict(astronaut_jpeg).faces[0].probabilities
    assert list(theirs) == shuffled
    # same weights: output i carries the i-th name of whichever checkpoint
    assert list(theirs.values()) == pytest.approx(list(mine.values()), abs=1e-6)


def test_all_faces_of_an_image_go_through_the_model_once(predictor: Predictor,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    face = Image.fromarray(data.astronaut()).crop((127, 16, 322, 211))
    canvas = Image.new("RGB", (900, 300), (90, 110, 100))
    for x in (20, 330, 640):
        canvas.paste(face.resize((240, 240)), (x, 30))
    calls: list[int] = []
    forward = predictor.model.forward
    monkeypatch.setattr(predictor.model, "forward", lambda x: calls.append(len(x)) or forward(x))
    result = predictor.predict(canvas)
    assert len(result.faces) == 3 and calls == [3]
    assert all(f.box is not None for f in result.faces)


def test_a_crowd_photo_classifies_its_largest_faces_and_counts_the_rest(predictor: Predictor,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fer_core import predict as predict_module
    face = Image.fromarray(data.astronaut()).crop((127, 16, 322, 211))
    canvas = Image.new("RGB", (900, 300), (90, 110, 100))
    for x, side in ((20, 260), (330, 240), (640, 220)):
        canvas.paste(face.resize((side, side)), (x, 20))
    monkeypatch.setattr(predict_module, "MAX_FACES", 2)
    result = predictor.predict(canvas)
    assert len(result.faces) == 2 and result.message == "3 faces found; the 2 largest are shown"
    assert [f.box.w for f in result.faces] == sorted((f.box.w for f in result.faces), reverse=True)
    assert all(f.box.x < 600 for f in result.faces)  # the two larger pastes, not the one at x=640


def test_overlapping_forwards_leave_torchs_thread_count_as_they_found_it() -> None:
    from fer_core.predict import ThreadSetting
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        setting = ThreadSetting()
        first, second = setting.use(1), setting.use(1)
        first.__enter__()
        second.__enter__()  # another session's forward starts while the first runs
        assert torch.get_num_threads() == 1
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 1  # the second is still running
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_larger_img_size_checkpoint(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    predictor = Predictor.from_checkpoint(save_checkpoint(tmp_path / "64.pt", img_size=64),
                                          num_threads=1)
    face = predictor.predict(astronaut_jpeg).faces[0]
    assert predictor.img_size == 64 and face.crop.size == (48, 48)
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_colour_run_crops_faces_in_its_own_size_and_colour(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    """A run that stored 96 px RGB faces gets 96 px RGB crops, on PyTorch and on ONNX Runtime
    alike (the export's card carries the format)."""
    checkpoint = save_checkpoint(tmp_path / "rgb.pt", img_size=64, image_format=ImageFormat(96, "rgb"))
    torch_predictor = Predictor.from_checkpoint(checkpoint, num_threads=1)
    onnx_predictor = Predictor.load(checkpoint, backend="onnx", num_threads=1)
    assert torch_predictor.image_format == onnx_predictor.image_format == ImageFormat(96, "rgb")
    for predictor in (torch_predictor, onnx_predictor):  # what GET /model tells a REST client
        assert (predictor.describe()["face_size"], predictor.describe()["colour"]) == (96, "rgb")
    faces = [p.predict(astronaut_jpeg).faces[0] for p in (torch_predictor, onnx_predictor)]
    assert all(face.crop.mode == "RGB" and face.crop.size == (96, 96) for face in faces)
    for name in CLASSES:
        assert faces[0].probabilities[name] == pytest.approx(faces[1].probabilities[name], abs=1e-4)


def test_options(predictor: Predictor, astronaut_jpeg: bytes) -> None:
    assert len(predictor.predict(astronaut_jpeg, top_k=99).faces[0].top_k) == len(CLASSES)
    assert predictor.predict(astronaut_jpeg, uncertain_below=1.0).faces[0].uncertain
    assert not predictor.predict(astronaut_jpeg, uncertain_below=0.0).faces[0].uncertain
    assert not predictor.predict(astronaut_jpeg, min_face_size=300).face_found
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict(astronaut_jpeg, top_k=0)
    with pytest.raises(ValueError, match="uncertain_below"):
        predictor.predict(astronaut_jpeg, uncertain_below=1.5)


def test_empty_batch(predictor: Predictor) -> None:
    assert tuple(predictor.probabilities(predictor.preprocess([])).shape) == (0, len(CLASSES))


def test_threads_are_restored(checkpoint: Path, astronaut_jpeg: bytes) -> None:
    before = torch.get_num_threads()
    Predictor.from_checkpoint(checkpoint, num_threads=1).predict(astronaut_jpeg)
    assert torch.get_num_threads() == before


def test_predict_many_reports_each_failure(predictor: Predictor, astronaut_jpeg: bytes,
                                           tmp_path: Path) -> None:
    results = predictor.predict_many([astronaut_jpeg, b"not an image", tmp_path / "missing.png"])
    assert [r.ok for r in results] == [True, False, False]
    assert "not an image" in results[1].error and "file not found" in results[2].error
    assert json.loads(json.dumps([r.to_dict() for r in results]))[0]["faces"][0]["label"] in CLASSES


def test_bad_sources_raise_image_input_error(predictor: Predictor) -> None:
    for source in (b"", b"\x89PNG\r\n\x1a\n broken", "ftp://example.com/a.jpg",
                   "http://127.0.0.1:9/face.jpg"):
        with pytest.raises(ImageInputError):
            predictor.predict(source)


# --------------------------------------------------------------------------- checkpoints

class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"model_state": _RunsCode(marker), "class_names": CLASSES,
               "config": {"img_size": 48, "stem": "small"}}
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil-legacy.pt"
    torch.save(payload, zipped)
    legacy.write_bytes(pickle.dumps(payload, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match="not a safe fer_core checkpoint"):
            Predictor.from_checkpoint(path)
    assert not marker.exists()
    # the payload is live: plain pickle would have run it
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()


def test_broken_checkpoints_raise_checkpoint_error(tmp_path: Path) -> None:
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    missing = tmp_path / "missing-keys.pt"
    torch.save({"model_state": {}}, missing)
    cases = {
        random_bytes: "not a safe",
        missing: "missing class_names, config",
        save_checkpoint(tmp_path / "five.pt", outputs=5): "7 classes",
        save_checkpoint(tmp_path / "names.pt", classes=["a", "a"], outputs=2): "repeat",
        save_checkpoint(tmp_path / "size.pt", img_size=0): "img_size",
        tmp_path / "absent.pt": "not found",
    }
    bad_stem = tmp_path / "stem.pt"
    torch.save({"model_state": {}, "class_names": CLASSES,
                "config": {"img_size": 48, "stem": "giant"}}, bad_stem)
    cases[bad_stem] = "cannot be turned into a model"
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words):
            Predictor.from_checkpoint(path)


def test_describe_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "e.pt", evaluation={"accuracy": 0.65, "macro_f1": 0.6},
                           run_dir="runs/2024-01-01")
    info = describe_checkpoint(path)
    assert info["classes"] == CLASSES and info["img_size"] == 48 and info["stem"] == "small"
    assert info["accuracy"] == 0.65 and info["macro_f1"] == 0.6 and info["run_dir"] == "runs/2024-01-01"
    bare = describe_checkpoint(torch.load(save_checkpoint(tmp_path / "b.pt"), weights_only=True))
    assert bare["accuracy"] is None and bare["run_dir"] is None


def test_newest_checkpoint(tmp_path: Path) -> None:
    assert newest_checkpoint(tmp_path / "nowhere") is None
    assert newest_checkpoint(tmp_path) is None
    for age, name in ((300, "old.pt"), (100, "new.pt"), (200, "mid.pt")):
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000 - age, 1_700_000_000 - age))
    (tmp_path / "notes.txt").write_text("newest but not a checkpoint")
    assert newest_checkpoint(tmp_path) == tmp_path / "new.pt"


# --------------------------------------------------------------------------- CLI

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return predict_command(parser.parse_args(argv))


def test_cli_prints_faces_and_percentages(checkpoint: Path, astronaut_jpeg: bytes, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(astronaut_jpeg)
    assert run_cli([str(checkpoint), str(image), "--top-k", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "astronaut.jpg: 1 face found" in out and "face 1 at x=" in out
    assert out.count("%") == 2


def test_cli_json(checkpoint: Path, astronaut_jpeg: bytes, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(astronaut_jpeg)
    assert run_cli([str(checkpoint), str(image), "--json", "--threads", "1"]) == 0
    document = json.loads(capsys.readouterr().out)
    face = document["results"][0]["faces"][0]
    assert document["classes"] == CLASSES and len(face["top_k"]) == 3 and face["box"]["w"] > 0


def test_cli_errors_are_one_line_and_non_zero(checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([str(checkpoint), str(tmp_path / "nope.jpg")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "file not found" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert run_cli([str(junk), "whatever.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.pt" in err
    with pytest.raises(SystemExit):
        run_cli([str(checkpoint), "x.jpg", "--top-k", "0"])


def test_a_1x1_image_is_classified_whole_and_a_10000px_square_is_refused(predictor: Predictor) -> None:
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (120, 90, 60)).save(tiny, format="PNG")
    result = predictor.predict(tiny.getvalue())
    assert not result.face_found and len(result.faces) == 1
    assert abs(sum(result.faces[0].probabilities.values()) - 1) < 1e-4
    huge = io.BytesIO()
    Image.new("L", (10_000, 10_000), 128).save(huge, format="PNG")
    with pytest.raises(ImageInputError, match="megapixels|too large"):
        predictor.predict(huge.getvalue())
