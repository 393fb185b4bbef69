"""Issue #12 item 12: input that costs more than it looks. Many pixel-dense images in one
request are refused once a per-request budget of decoded pixels is spent; a symbolic link in a
dataset folder that leads outside the dataset is not followed (and is reported)."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from fer_core import images
from fer_core.data import load_dataset
from fer_core.errors import ImageInputError

from conftest import write_class_folders


def dense_png(side: int) -> bytes:
    """A side x side 16-bit grey PNG that compresses to almost nothing (a flat image)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 1000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_request_of_many_dense_images_stops_decoding_at_its_pixel_budget(monkeypatch):
    png = dense_png(2000)  # 4 MP each, a few KB on the wire
    assert len(png) < 50_000
    budget = images.PixelBudget(10_000_000)
    decoded = [images.load_image(png, budget=budget) for _ in range(2)]
    assert all(image.size == (2000, 2000) for image in decoded) and budget.spent == 8_000_000
    started = time.perf_counter()
    with pytest.raises(ImageInputError, match="was not decoded: this request already decoded 8 of its 10 "
                                              "megapixels.*Send fewer or smaller images"):
        images.load_image(png, budget=budget)
    assert time.perf_counter() - started < 0.5  # refused from the header, not after decoding
    assert budget.spent == 8_000_000
    images.load_image(png)  # without a budget (one image), the per-image cap alone applies


def test_predict_many_shares_one_budget_across_its_images(monkeypatch):
    from fer_core.predict import Predictor
    from fer_core.models import build_model

    model, _, _ = build_model(3, mode="finetune", stem="small", pretrained=False)
    predictor = Predictor(model.eval(), ["a", "b", "c"], 48)
    monkeypatch.setattr(images, "MAX_REQUEST_PIXELS", 10_000_000)
    png = dense_png(2000)
    results = predictor.predict_many([png] * 4)
    assert [r.ok for r in results] == [True, True, False, False]
    assert all("megapixels" in r.error for r in results[2:])
    again = predictor.predict_many([png] * 2)  # a new request: a new budget
    assert all(r.ok for r in again)


def test_predict_many_stops_at_its_deadline_and_caps_a_download_at_the_time_left(monkeypatch):
    from fer_core import predict as predict_module
    from fer_core.models import build_model
    from fer_core.predict import Predictor

    model, _, _ = build_model(3, mode="finetune", stem="small", pretrained=False)
    predictor = Predictor(model.eval(), ["a", "b", "c"], 48)
    png = dense_png(64)
    late = predictor.predict_many([png, png], deadline=time.monotonic() - 1)
    assert [r.ok for r in late] == [False, False] and all("ran out of time" in r.error for r in late)
    fetches = []
    monkeypatch.setattr(predict_module, "load_image", lambda source, **options: fetches.append(
        options["fetch_timeout"]) or images.load_image(png))
    predictor.predict_many(["https://example.invalid/a.jpg"], deadline=time.monotonic() + 5)
    predictor.predict_many(["https://example.invalid/a.jpg"])
    assert 0 < fetches[0] <= 5 and fetches[1] == images.DEFAULT_TOTAL_TIMEOUT


def test_a_symlinked_class_folder_or_file_outside_the_dataset_is_not_followed(tmp_path):
    dataset = write_class_folders(tmp_path / "data", {"happy": 4, "sad": 4})
    secret = write_class_folders(tmp_path / "elsewhere", {"private": 3})
    os.symlink(secret / "private", dataset / "stolen")                      # a class folder outside
    os.symlink(secret / "private" / "private_000.png", dataset / "happy" / "outside.png")  # a file outside
    os.symlink(secret / "private", dataset / "sad" / "nested")             # a nested folder outside
    os.symlink(dataset / "happy" / "happy_000.png", dataset / "sad" / "inside.png")  # inside: followed
    loaded = load_dataset(str(dataset), cache_dir=tmp_path / "cache")
    assert loaded.classes == ["happy", "sad"]
    assert not [p for p in loaded.paths if "private" in p or "outside" in p or "nested" in p]
    assert len(loaded) == 4 + 4 + 1
    reported = {os.path.basename(b["path"]): b["reason"] for b in loaded.bad_files}
    assert set(reported) >= {"stolen", "outside.png"}
    assert all("outside the dataset folder" in reported[name] for name in ("stolen", "outside.png"))


def test_a_symlinked_train_class_folder_outside_the_dataset_is_not_followed(tmp_path):
    dataset = tmp_path / "split"
    write_class_folders(dataset / "train", {"happy": 4, "sad": 4})
    write_class_folders(dataset / "test", {"happy": 2, "sad": 2})
    secret = write_class_folders(tmp_path / "elsewhere", {"angry": 3})
    os.symlink(secret / "angry", dataset / "train" / "angry")
    loaded = load_dataset(str(dataset), cache_dir=tmp_path / "cache")
    assert loaded.classes == ["happy", "sad"] and len(loaded) == 12
    assert any("angry" in b["path"] and "not followed" in b["reason"] for b in loaded.bad_files)
