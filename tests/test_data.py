from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fer_core import CLASS_NAMES
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

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache was valid")

    monkeypatch.setattr(data_module, "decode_file", must_not_decode)
    second = load_dataset(str(root))
    assert torch.equal(first.images, second.images) and second.paths == first.paths
    Image.new("L", (48, 48)).save(root / "a" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(str(root))


def test_a_folder_typed_relative_or_absolute_shares_one_store(tmp_path, monkeypatch):
    root = write_class_folders(tmp_path / "ds", {"a": 4, "b": 4})
    first = load_dataset(str(root), cache_dir=tmp_path / "cache")
    monkeypatch.chdir(tmp_path)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again for the same files typed another way")

    monkeypatch.setattr(data_module, "decode_file", must_not_decode)
    second = load_dataset("ds", cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images) and len(list((tmp_path / "cache").glob("store-*"))) == 1


def test_a_file_replaced_keeping_its_size_and_mtime_is_decoded_again(tmp_path):
    """As `cp -p` or `rsync -a` leave it, or a `chmod` that makes an unreadable file readable:
    only the change time differs, and the store must not keep what it found before."""
    import os
    root = write_class_folders(tmp_path / "ds", {"a": 4, "b": 4})
    face = root / "a" / "face.bmp"
    Image.new("L", (48, 48), 10).save(face)  # BMP: the same size in bytes whatever the pixels
    stamp = face.stat().st_mtime_ns
    first = load_dataset(str(root))
    Image.new("L", (48, 48), 200).save(face)
    os.utime(face, ns=(stamp, stamp))
    second = load_dataset(str(root))
    index = second.paths.index(str(face))
    assert first.paths == second.paths and int(second.images[index].float().mean()) == 200


def test_max_per_class_caps_training_images_only_and_reproducibly(tmp_path):
    from fer_core.data import cap_training_images
    root = write_class_folders(tmp_path / "ds", {"a": 40, "b": 12})
    dataset = load_dataset(str(root))
    splits = assign_splits(dataset, test_fraction=0.25, val_fraction=0.1, seed=3)
    capped = cap_training_images(dataset, splits, 5, seed=3)
    labels = dataset.labels.numpy()
    for label in (0, 1):
        assert ((labels == label) & (capped == "train")).sum() == 5
    assert ((capped == "test") == (splits == "test")).all() and ((capped == "val") == (splits == "val")).all()
    assert (capped == cap_training_images(dataset, splits, 5, seed=3)).all()
    assert {row["class"]: row["unused"] for row in split_table(dataset, capped)} == {
        "a": int(((labels == 0) & (splits == "train")).sum()) - 5,
        "b": int(((labels == 1) & (splits == "train")).sum()) - 5}


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
    text += "2," + " ".join(["300"] * 2304) + ",Training\n"    # values past 255
    path = tmp_path / "fer2013.csv"
    path.write_text(text)
    dataset = read_fer2013_csv(path)
    assert dataset.classes == SEVEN
    assert [dataset.classes[i] for i in dataset.labels] == ["happy", "sad", "neutral", "angry"]
    assert dataset.given_split == ["train", "train", "test", "test"]
    assert len(dataset.bad_files) == 3 and all("malformed" in b["reason"] for b in dataset.bad_files)
    reasons = [b["reason"] for b in dataset.bad_files]
    assert "expected 2304 pixel values, got 3" in reasons[1]
    assert "pixel values must be 0-255, got 300..300" in reasons[2]
    assert np.array_equal(dataset.images[0].numpy().ravel(), pixels.astype(np.uint8))


def test_a_csv_with_carriage_return_line_ends_loads_in_a_colour_format(tmp_path):
    """Faces go into one array sized by the file's line count: whatever ends its lines."""
    from fer_core.image_format import ImageFormat
    rows = _face_rows(3)
    text = "emotion,pixels,Usage\r" + "".join(f"{code},{' '.join(map(str, row))},Training\r"
                                               for code, row in enumerate(rows))
    path = tmp_path / "fer2013.csv"
    path.write_bytes(text.encode())
    dataset = read_fer2013_csv(path, ImageFormat(size=64, colour="rgb"))
    assert len(dataset) == 3 and tuple(dataset.images.shape) == (3, 64, 64, 3)
    assert [dataset.classes[i] for i in dataset.labels] == ["angry", "disgust", "fear"]


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


def test_a_folder_that_cannot_be_read_is_reported_not_passed_over(tmp_path, monkeypatch):
    import os
    root = write_class_folders(tmp_path / "ds", {"happy": 4, "sad": 4})
    locked = root / "happy" / "more"
    locked.mkdir()
    Image.new("L", (48, 48), 9).save(locked / "hidden.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # as a folder without read permission is (tests run as root)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    dataset = load_dataset(str(root), cache_dir=tmp_path / "cache")
    assert dataset.class_counts() == {"happy": 4, "sad": 4}
    reported = {b["path"]: b["reason"] for b in dataset.bad_files}
    assert "folder cannot be read (Permission denied)" in reported[str(locked)]


def test_a_class_folder_whose_name_is_not_utf8_survives_the_manifest(tmp_path):
    import os
    root = write_class_folders(tmp_path / "ds", {"happy": 4, "sad": 4})
    odd = os.fsencode(root) + b"/caf\xe9"  # a class folder from a zip made on Windows
    os.rename(os.fsencode(root / "sad"), odd)
    dataset = load_dataset(str(root))
    splits = assign_splits(dataset, val_fraction=0.0)
    write_split_manifest(tmp_path / "split.csv", dataset, splits)
    rows = read_split_manifest(tmp_path / "split.csv")
    assert {r["label"] for r in rows} == {"happy", "caf\\xe9"} and len(rows) == len(dataset) == 8


def _face_rows(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, 48 * 48) for _ in range(count)]


@pytest.mark.parametrize("rows_after", [2, 40])  # 40 rows of ~9 KB pass csv's 128 KiB field limit
def test_a_runaway_quote_costs_only_its_own_row(tmp_path, rows_after):
    """One unclosed quote must not swallow the rows after it, nor kill the whole file."""
    faces = _face_rows(3 + rows_after)
    text = "emotion,pixels,Usage\n"
    text += "".join(_csv_row(3, p, "Training") for p in faces[:3])
    text += '4,"' + " ".join(["9"] * 2304) + ",Training\n"       # line 5: the quote never closes
    text += "".join(_csv_row(6, p, "PublicTest") for p in faces[3:])
    path = tmp_path / "fer2013.csv"
    path.write_text(text)
    dataset = read_fer2013_csv(path)
    assert len(dataset) == 3 + rows_after
    assert [b["path"] for b in dataset.bad_files] == [f"{path}#5"]
    assert "malformed" in dataset.bad_files[0]["reason"]
    assert dataset.paths[3] == f"{path}#6"  # references are physical line numbers
    assert np.array_equal(dataset.images[-1].numpy().ravel(), faces[-1].astype(np.uint8))


def test_a_line_too_long_for_any_face_is_skipped_without_reading_it_whole(tmp_path):
    faces = _face_rows(2)
    text = "emotion,pixels,Usage\n" + _csv_row(3, faces[0], "Training")
    text += "3," + "1 " * 200_000 + ",Training\n"                 # 400 KB on one line
    text += _csv_row(4, faces[1], "Training")
    path = tmp_path / "fer2013.csv"
    path.write_text(text)
    dataset = read_fer2013_csv(path)
    assert len(dataset) == 2 and dataset.paths[1] == f"{path}#4"
    assert [b["path"] for b in dataset.bad_files] == [f"{path}#3"]
    assert "too long" in dataset.bad_files[0]["reason"]


def test_a_csv_saved_with_a_byte_order_mark_loads(tmp_path):
    """Excel and Windows tools write UTF-8 with a BOM; the header must still be recognised."""
    from fer_core.ui_data import load_csv_rows

    faces = _face_rows(2)
    path = tmp_path / "fer2013.csv"
    # pixels first: the BOM then sits on the column the gallery needs
    path.write_text("pixels,emotion,Usage\n" + "".join(
        f"{' '.join(map(str, p))},{code},Training\n" for p, code in zip(faces, (3, 4))),
        encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = read_fer2013_csv(path)
    assert [dataset.classes[i] for i in dataset.labels] == ["happy", "sad"] and not dataset.bad_files
    shown = load_csv_rows(str(path), [2, 3])
    assert np.array_equal(shown[3].ravel(), faces[1].astype(np.uint8))


def test_the_gallery_reads_the_same_rows_the_dataset_names(tmp_path):
    """load_csv_rows(path, [n]) shows the face the reader called path#n, even after a bad row."""
    from fer_core.ui_data import load_csv_rows

    faces = _face_rows(4)
    text = "emotion,pixels,Usage\n" + _csv_row(3, faces[0], "Training")
    text += '2,"1 2 3,Training\n' + "\n"                          # a runaway quote, a blank line
    text += "".join(_csv_row(5, p, "Training") for p in faces[1:])
    path = tmp_path / "fer2013.csv"
    path.write_text(text)
    dataset = read_fer2013_csv(path)
    assert len(dataset) == 4
    numbers = [int(ref.rsplit("#", 1)[1]) for ref in dataset.paths]
    shown = load_csv_rows(str(path), numbers)
    for number, image in zip(numbers, dataset.images):
        assert np.array_equal(shown[number], image.numpy()), number


_FER_FIELDS = st.one_of(
    st.sampled_from(["emotion", "pixels", "Usage", "", '"', '"3"', "0", "3", "7", "-1", "255 0",
                     "256", "99999999999999999999", "\u0663", "Training", "PublicTest", "\ufeff",
                     "\x00", " ".join(["128"] * 2304), " ".join(["128"] * 2303) + ' "']),
    st.text(max_size=30))
_FER_LIKE = st.tuples(
    st.sampled_from(["emotion,pixels,Usage", "\ufeffemotion,pixels", "pixels,emotion", "emotion"]),
    st.lists(st.lists(_FER_FIELDS, max_size=4).map(",".join), max_size=12),
    st.sampled_from(["\n", "\r\n", "\r"]),
).map(lambda parts: parts[2].join([parts[0], *parts[1]]))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(_FER_LIKE, st.text(max_size=3000), st.binary(max_size=3000)))
@example("emotion,pixels\n0,99999999999999999999\n")  # what hypothesis found first
def test_any_csv_content_gives_a_dataset_or_a_data_error(tmp_path, content):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        dataset = read_fer2013_csv(path)
    except DataError as exc:
        assert str(exc)
        return
    assert len(dataset.paths) == len(dataset.labels) == dataset.images.shape[0]
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (48, 48)
    assert all(b["path"].startswith(f"{path}#") and b["reason"] for b in dataset.bad_files)


# ---- class names from other datasets ------------------------------------------------------

def test_class_folder_aliases_map_to_canonical_names_across_train_and_test(tmp_path):
    """AffectNet/RAF-DB spellings ("Anger", "Happiness") are the canonical classes, train/ and
    test/ may spell a class differently, and an eighth class (contempt) is just another class."""
    write_class_folders(tmp_path / "train", {"Anger": 6, "Happiness": 6, "Contempt": 6, "sad": 6})
    write_class_folders(tmp_path / "test", {"angry": 3, "happy": 3, "contemptuous": 3, "Sadness": 3}, seed=1)
    dataset = load_dataset(str(tmp_path), cache_dir=tmp_path / "cache")
    assert dataset.classes == ["angry", "contempt", "happy", "sad"]
    assert dataset.class_counts() == {"angry": 9, "contempt": 9, "happy": 9, "sad": 9}
    assert dataset.renamed_classes["Happiness"] == "happy" and dataset.renamed_classes["contemptuous"] == "contempt"
    assert "sad" not in dataset.renamed_classes
    happy = dataset.classes.index("happy")
    for path, label, split in zip(dataset.paths, dataset.labels.tolist(), dataset.given_split):
        assert (label == happy) == (Path(path).parent.name in ("Happiness", "happy"))
        assert split == Path(path).parent.parent.name


def test_unknown_class_names_are_kept_as_written(tmp_path):
    write_class_folders(tmp_path, {"Thinking": 5, "yawn": 5})
    assert load_dataset(str(tmp_path), cache_dir=tmp_path / "cache").classes == ["Thinking", "yawn"]


def _raf_db(root: Path, labels: dict[str, int], aligned: bool = True) -> Path:
    """RAF-DB's basic layout: EmoLabel/list_patition_label.txt and Image/aligned/*_aligned.jpg
    (100x100 colour faces)."""
    rng = np.random.default_rng(0)
    images = root / "Image" / ("aligned" if aligned else "original")
    images.mkdir(parents=True)
    for name in labels:
        stored = f"{Path(name).stem}_aligned.jpg" if aligned else name
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(images / stored)
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel" / "list_patition_label.txt").write_text(
        "".join(f"{name} {code}\n" for name, code in labels.items()))
    return root


def test_raf_db_label_file_uses_its_numbering_and_its_train_test_names(tmp_path):
    labels = {f"train_{i:05d}.jpg": 1 + i % 7 for i in range(1, 22)}
    labels.update({f"test_{i:04d}.jpg": 1 + i % 7 for i in range(1, 15)})
    root = _raf_db(tmp_path / "basic", labels)
    for spec in (root, root / "EmoLabel" / "list_patition_label.txt"):
        dataset = load_dataset(str(spec), cache_dir=tmp_path / "cache")
        assert dataset.classes == sorted(CLASS_NAMES)
        by_name = {Path(p).name: (dataset.classes[label], split)
                   for p, label, split in zip(dataset.paths, dataset.labels.tolist(), dataset.given_split)}
        assert by_name["train_00005_aligned.jpg"] == ("angry", "train")      # RAF-DB code 6 = anger
        assert by_name["train_00007_aligned.jpg"] == ("surprise", "train")   # code 1 = surprise
        assert by_name["test_0003_aligned.jpg"] == ("happy", "test")         # code 4 = happiness
        assert len(dataset) == 35 and dataset.images.shape[1:] == (STORE_SIZE, STORE_SIZE)


def test_label_file_with_names_missing_images_and_bad_lines_reports_each(tmp_path):
    root = tmp_path / "faces"
    write_class_folders(root / "images", {"all": 8})
    names = sorted(p.name for p in (root / "images" / "all").iterdir())
    for name in names:  # the label file lists images by bare name, in one flat folder
        (root / "images" / "all" / name).rename(root / "images" / name)
    lines = [f"{name} {'Happiness' if i % 2 else 'sad'}" for i, name in enumerate(names)]
    lines += ["# a comment", "", "missing.png happy", "one_field_only"]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(str(root), cache_dir=tmp_path / "cache")
    assert dataset.classes == ["happy", "sad"] and dataset.given_split is None
    assert dataset.class_counts() == {"happy": 4, "sad": 4}
    reasons = {Path(b["path"]).name: b["reason"] for b in dataset.bad_files}
    assert reasons["missing.png"] == "listed in the label file but not found"
    assert any("malformed line" in r for r in reasons.values()) and len(reasons) == 2


@pytest.mark.parametrize("lines,message", [
    (["a.png 3", "b.png happy"], "mixes numeric labels and class names"),
    (["a.png 3", "b.png 9"], "neither RAF-DB's 1-7 nor FER2013's 0-6"),
])
def test_ambiguous_label_files_are_refused_in_words(tmp_path, lines, message):
    write_class_folders(tmp_path / "x", {"a": 1})
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "labels.txt"), cache_dir=tmp_path / "cache")


def test_zero_based_codes_follow_fer2013s_numbering(tmp_path):
    images = tmp_path / "images"
    write_class_folders(images, {"x": 4})
    names = sorted(p.name for p in (images / "x").iterdir())
    (tmp_path / "labels.txt").write_text("".join(f"x/{n} {c}\n" for n, c in zip(names, (0, 6, 0, 6))))
    dataset = load_dataset(str(tmp_path / "labels.txt"), cache_dir=tmp_path / "cache")
    assert dataset.classes == ["angry", "neutral"] and dataset.class_counts() == {"angry": 2, "neutral": 2}


def test_a_label_file_never_reads_images_outside_its_dataset_folder(tmp_path):
    """Names that climb out ("../") or symbolic links to files elsewhere are listed as bad
    files, not read."""
    secret = write_class_folders(tmp_path / "elsewhere", {"x": 1})
    secret_file = next(secret.rglob("*.png"))
    root = tmp_path / "faces"
    write_class_folders(root / "images", {"a": 4})
    (root / "images" / "a" / "link.png").symlink_to(secret_file)
    names = sorted(p.name for p in (root / "images" / "a").iterdir() if p.name != "link.png")
    lines = [f"a/{name} {'happy' if i % 2 else 'sad'}" for i, name in enumerate(names)]
    lines += ["a/link.png happy", f"../../elsewhere/x/{secret_file.name} sad"]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(str(root / "labels.txt"), cache_dir=tmp_path / "cache")
    assert len(dataset) == 4 and not any("elsewhere" in p or "link" in p for p in dataset.paths)
    outside = [b for b in dataset.bad_files if b["reason"] == "outside the dataset folder"]
    assert len(outside) == 2
