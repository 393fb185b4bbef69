from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_core import data as data_module
from fer_core.data import (STORE_SIZE, assign_splits, load_dataset, read_fer2013_csv,
                           read_split_manifest, split_table, write_split_manifest)
from fer_core.errors import DataError

from conftest import write_class_folders

SEVEN = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def test_pool_split_is_75_25_stratified_with_val_carved_from_train(tmp_path):
    root = write_class_folders(tmp_path / "pool", {"happy": 40, "sad": 20, "angry": 12})
    dataset = load_dataset(str(root))
    splits = assign_splits(dataset, test_fraction=0.25, val_fraction=0.1, seed=7)
    table = {row["class"]: row for row in split_table(dataset, splits)}
    assert table["happy"]["test"] == 10 and table["sad"]["test"] == 5 and table["angry"]["test"] == 3
    for row in table.values():
        assert row["train"] + row["val"] + row["test"] == row["total"]
        assert row["val"] >= 1
    assert (splits == "test").sum() == 18


def test_split_is_identical_for_the_same_seed_and_differs_for_another(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "p", {"a": 30, "b": 30})))
    first = assign_splits(dataset, seed=1)
    assert np.array_equal(first, assign_splits(dataset, seed=1))
    assert not np.array_equal(first, assign_splits(dataset, seed=2))


def test_val_fraction_zero_means_no_validation_split(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "p", {"a": 8, "b": 8})))
    assert set(assign_splits(dataset, val_fraction=0.0)) == {"train", "test"}


def test_train_test_layout_is_used_as_given(tmp_path):
    write_class_folders(tmp_path / "ds" / "train", {"happy": 10, "sad": 10})
    write_class_folders(tmp_path / "ds" / "test", {"happy": 3, "sad": 4}, seed=1)
    dataset = load_dataset(str(tmp_path / "ds"))
    splits = assign_splits(dataset, val_fraction=0.2, seed=0)
    assert (splits == "test").sum() == 7
    assert (splits == "val").sum() == 4
    test_paths = [p for p, s in zip(dataset.paths, splits) if s == "test"]
    assert all("/test/" in p for p in test_paths)


def test_bad_files_are_skipped_and_reported(tmp_path):
    root = write_class_folders(tmp_path / "ds", {"happy": 5, "sad": 5})
    (root / "happy" / "empty.png").write_bytes(b"")
    (root / "happy" / "fake.jpg").write_bytes(b"this is not a jpeg")
    (root / "sad" / "notes.txt").write_text("hello")
    good = root / "sad" / "sad_000.png"
    (root / "sad" / "truncated.png").write_bytes(good.read_bytes()[:40])
    nested = root / "sad" / "junk" / "deeper"
    nested.mkdir(parents=True)
    Image.new("L", (48, 48), 128).save(nested / "nested.png")
    dataset = load_dataset(str(root))
    reasons = {Path(b["path"]).name: b["reason"] for b in dataset.bad_files}
    assert set(reasons) == {"empty.png", "fake.jpg", "notes.txt", "truncated.png"}
    assert "0 bytes" in reasons["empty.png"] and "extension" in reasons["notes.txt"]
    assert dataset.class_counts() == {"happy": 5, "sad": 7 - 1}  # 5 good + nested, truncated skipped


def test_every_image_is_stored_as_48px_grey_uint8(tmp_path):
    root = tmp_path / "ds"
    for name, image in {"a": Image.new("RGB", (200, 120), (255, 0, 0)),
                        "b": Image.new("RGBA", (30, 30), (0, 0, 0, 0))}.items():
        (root / name).mkdir(parents=True)
        image.save(root / name / "x.png")
        image.save(root / name / "y.png")
    dataset = load_dataset(str(root))
    assert dataset.images.shape == (4, STORE_SIZE, STORE_SIZE) and dataset.images.dtype == torch.uint8
    # transparent pixels are composited on white, not left black
    assert int(dataset.images[dataset.labels == 1].min()) == 255


@pytest.mark.parametrize("counts,message", [
    ({}, "no class folders"), ({"happy": 5}, "only one class"), ({"happy": 5, "sad": 0}, "no usable images"),
])
def test_unusable_datasets_are_clear_errors(tmp_path, counts, message):
    root = tmp_path / "ds"
    root.mkdir()
    write_class_folders(root, counts)
    with pytest.raises(DataError, match=message):
        load_dataset(str(root))


def test_a_class_with_one_image_cannot_be_stratified(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "ds", {"happy": 10, "sad": 1})))
    with pytest.raises(DataError, match="single image"):
        assign_splits(dataset)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope"))


def test_decoded_images_are_cached_by_file_list(tmp_path, monkeypatch):
    root = write_class_folders(tmp_path / "ds", {"a": 4, "b": 4})
    first = load_dataset(str(root))

    def must_not_decode(path):
        raise AssertionError("decoded again although the cache was valid")

    monkeypatch.setattr(data_module, "decode_file", must_not_decode)
    second = load_dataset(str(root))
    assert torch.equal(first.images, second.images) and second.paths == first.paths
    Image.new("L", (48, 48)).save(root / "a" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(str(root))


def test_max_per_class_caps_each_class_reproducibly(tmp_path):
    root = write_class_folders(tmp_path / "ds", {"a": 20, "b": 6})
    capped = load_dataset(str(root), max_per_class=5, seed=3)
    assert capped.class_counts() == {"a": 5, "b": 5}
    assert capped.paths == load_dataset(str(root), max_per_class=5, seed=3).paths


def _csv_row(code, pixels, usage):
    return f"{code},{' '.join(str(p) for p in pixels)},{usage}\n"


def test_fer2013_csv_reader_maps_codes_splits_and_skips_malformed_rows(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, 48 * 48)
    text = "emotion,pixels,Usage\n"
    text += _csv_row(3, pixels, "Training") + _csv_row(4, pixels, "Training")
    text += _csv_row(6, pixels, "PublicTest") + _csv_row(0, pixels, "PrivateTest")
    text += "9," + " ".join(["1"] * 2304) + ",Training\n"      # unknown emotion code
    text += "2,1 2 3,Training\n"                                 # too few pixels
    path = tmp_path / "fer2013.csv"
    path.write_text(text)
    dataset = read_fer2013_csv(path)
    assert dataset.classes == SEVEN
    assert [dataset.classes[i] for i in dataset.labels] == ["happy", "sad", "neutral", "angry"]
    assert dataset.given_split == ["train", "train", "test", "test"]
    assert len(dataset.bad_files) == 2 and all("malformed" in b["reason"] for b in dataset.bad_files)
    assert np.array_equal(dataset.images[0].numpy().ravel(), pixels.astype(np.uint8))


def test_csv_without_required_columns_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="emotion"):
        load_dataset(str(path))


def test_split_manifest_round_trips(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "ds", {"a": 8, "b": 8})))
    splits = assign_splits(dataset)
    write_split_manifest(tmp_path / "split.csv", dataset, splits)
    rows = read_split_manifest(tmp_path / "split.csv")
    assert [r["split"] for r in rows] == list(splits)
    assert [r["path"] for r in rows] == dataset.paths
    assert {r["label"] for r in rows} == {"a", "b"}


def test_demo_source_is_generated_on_first_use_and_labelled_synthetic(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_DEMO_DIR", str(tmp_path / "demo"))
    dataset = load_dataset("demo")
    assert dataset.synthetic and "synthetic" in dataset.source
    assert dataset.classes == SEVEN


def test_huge_images_are_skipped_not_decoded(tmp_path):
    root = write_class_folders(tmp_path / "ds", {"happy": 3, "sad": 3})
    Image.new("L", (8000, 6000), 100).save(root / "happy" / "huge.png")
    dataset = load_dataset(str(root))
    assert [b["reason"] for b in dataset.bad_files] == ["image too large (8000x6000)"]
    assert dataset.class_counts() == {"happy": 3, "sad": 3}


def test_non_utf8_file_names_load_and_survive_the_manifest(tmp_path):
    import os
    root = write_class_folders(tmp_path / "ds", {"happy": 4, "sad": 4})
    name = os.fsencode(root / "sad") + b"/caf\xe9-\xff.png"     # Latin-1 bytes: not UTF-8
    Image.new("L", (48, 48), 7).save(open(name, "wb"), format="PNG")
    dataset = load_dataset(str(root))
    assert dataset.class_counts() == {"happy": 4, "sad": 5}
    splits = assign_splits(dataset, val_fraction=0.0)
    write_split_manifest(tmp_path / "split.csv", dataset, splits)
    rows = read_split_manifest(tmp_path / "split.csv")
    assert any("\\xe9" in r["path"] for r in rows) and len(rows) == len(dataset)
