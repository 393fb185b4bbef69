"""The dataset doctor on generated datasets with planted defects: every planted defect is found,
nothing else is flagged, and its exclusion list makes training leave exactly those images out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_class_folders
from fer_core import cli, doctor, runs
from fer_core.data import Dataset, assign_splits, load_dataset, read_split_manifest
from fer_core.errors import DataError
from fer_core.store import ImageArray

# What write_planted plants, as dataset-relative paths.
UNREADABLE = "train/angry/broken.png"
BLANK = "train/happy/blank.png"                 # all 128
NEAR_CONSTANT = "train/sad/flat.png"            # 128 +-2: a standard deviation of about 1.4
EXACT = ("train/angry/angry_000.png", "train/angry/zz_copy.png")
NEAR_BRIGHT = ("train/happy/happy_001.png", "train/happy/happy_001_bright.png")
NEAR_JPEG = ("train/sad/sad_005.png", "train/sad/sad_005_reencoded.jpg")
LEAK_EXACT = ("test/sad/leak.png", "train/sad/sad_002.png")
LEAK_NEAR = ("test/happy/near_leak.png", "train/happy/happy_003.png")
CONFLICT = ("train/angry/angry_004.png", "train/happy/conflict.png")
LEFT_OUT = {UNREADABLE, BLANK, NEAR_CONSTANT, EXACT[1], NEAR_BRIGHT[1], NEAR_JPEG[1], LEAK_EXACT[1],
            LEAK_NEAR[1], *CONFLICT}
# happy (24 train + 4 test + 4 planted) against disgust (3 + 1): 8:1, above doctor.IMBALANCE_RATIO
TRAIN_COUNTS = {"angry": 12, "disgust": 3, "happy": 24, "sad": 12}
TEST_COUNTS = {"angry": 4, "disgust": 1, "happy": 4, "sad": 4}


def read_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def save(path: Path, pixels: np.ndarray, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path, **options)


def brighter(pixels: np.ndarray, rng: np.random.Generator, by: int) -> np.ndarray:
    """The same photo a little brighter, with slight noise: a near duplicate."""
    return np.clip(pixels.astype(int) + by + rng.integers(-1, 2, pixels.shape), 0, 255).astype(np.uint8)


def write_planted(root: Path) -> Path:
    """Random-noise faces in train/ and test/ class folders, plus one defect of every kind."""
    write_class_folders(root / "train", TRAIN_COUNTS, seed=1)
    write_class_folders(root / "test", TEST_COUNTS, seed=2)
    rng = np.random.default_rng(3)
    (root / UNREADABLE).write_bytes(b"not a png at all")
    save(root / BLANK, np.full((48, 48), 128, np.uint8))
    save(root / NEAR_CONSTANT, (128 + rng.integers(-2, 3, (48, 48))).astype(np.uint8))
    (root / EXACT[1]).write_bytes((root / EXACT[0]).read_bytes())
    save(root / NEAR_BRIGHT[1], brighter(read_pixels(root / NEAR_BRIGHT[0]), rng, 6))
    save(root / NEAR_JPEG[1], read_pixels(root / NEAR_JPEG[0]), quality=90)  # re-encoded as JPEG
    (root / LEAK_EXACT[0]).write_bytes((root / LEAK_EXACT[1]).read_bytes())
    save(root / LEAK_NEAR[0], brighter(read_pixels(root / LEAK_NEAR[1]), rng, 5))
    (root / CONFLICT[1]).write_bytes((root / CONFLICT[0]).read_bytes())  # an angry face filed as happy
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_planted(tmp_path_factory.mktemp("planted") / "faces")


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "faces"
    write_class_folders(root / "train", {"angry": 12, "happy": 12, "sad": 12}, seed=4)
    write_class_folders(root / "test", {"angry": 4, "happy": 4, "sad": 4}, seed=5)
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own: exclusion lists are written there."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def only(groups: list[doctor.Group]) -> doctor.Group:
    assert len(groups) == 1, [g.paths for g in groups]
    return groups[0]


def files_and_times(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ---- what is found ---------------------------------------------------------------------

def test_every_planted_defect_is_found_and_nothing_else(planted):
    _, report = doctor.examine_spec(str(planted))
    findings = report.findings
    unreadable = only(findings["unreadable"])
    assert unreadable.paths == [UNREADABLE] and "not a readable image" in unreadable.detail

    assert [g.paths for g in findings["blank"]] == [[BLANK], [NEAR_CONSTANT]]
    assert findings["blank"][0].detail == "pixel standard deviation 0.0"
    assert 0 < float(findings["blank"][1].detail.rsplit(" ", 1)[1]) < doctor.BLANK_STD

    exact = only(findings["exact_duplicate"])
    assert exact.paths == list(EXACT) and exact.kept == [EXACT[0]] and exact.dropped == [EXACT[1]]

    near = findings["near_duplicate"]
    assert [g.paths for g in near] == [list(NEAR_BRIGHT), list(NEAR_JPEG)]
    assert [g.dropped for g in near] == [[NEAR_BRIGHT[1]], [NEAR_JPEG[1]]]  # the first in path order is kept

    leaks = findings["leak"]
    assert [(g.paths, g.match) for g in leaks] == [(list(LEAK_NEAR), "near"), (list(LEAK_EXACT), "exact")]
    assert [g.dropped for g in leaks] == [[LEAK_NEAR[1]], [LEAK_EXACT[1]]]  # from train, never from test
    assert all(g.splits == ["test", "train"] for g in leaks)

    conflict = only(findings["conflict"])
    assert conflict.paths == list(CONFLICT) and conflict.labels == ["angry", "happy"]
    assert conflict.match == "exact" and conflict.dropped == list(CONFLICT)

    assert report.imbalance_ratio == 8.0 and "happy has 8.0 times as many images as disgust" in report.imbalance
    assert set(report.excluded()) == LEFT_OUT
    assert {kind: c["groups"] for kind, c in report.counts().items()} == {
        "unreadable": 1, "blank": 2, "exact_duplicate": 1, "near_duplicate": 2, "leak": 2, "conflict": 1,
        "imbalance": 1}


def test_a_dataset_kept_on_disk_is_read_a_block_at_a_time_with_the_same_findings(planted, tmp_path, monkeypatch):
    in_memory = load_dataset(str(planted), cache_dir=tmp_path)
    on_disk = load_dataset(str(planted), cache_dir=tmp_path, in_memory_bytes=0)
    assert isinstance(in_memory.images, torch.Tensor) and isinstance(on_disk.images, ImageArray)
    expected = doctor.examine(in_memory, str(planted)).findings

    reads: list[int] = []
    read = ImageArray._read
    monkeypatch.setattr(ImageArray, "_read", lambda self, rows: reads.append(len(rows)) or read(self, rows))
    monkeypatch.setattr(doctor, "PIXEL_BLOCK", 16)
    assert doctor.examine(on_disk, str(planted)).findings == expected
    # every image once for blanks and digests, then one per distinct content for phash
    assert max(reads) == 16 and len(on_disk) < sum(reads) < 2 * len(on_disk)


def test_a_clean_dataset_of_random_faces_has_no_findings(clean):
    dataset, report = doctor.examine_spec(str(clean))
    assert all(not groups for groups in report.findings.values()), report.counts()
    assert report.imbalance is None and report.imbalance_ratio == 1.0 and report.excluded() == {}
    # random noise is far apart in phash: the nearest pair is many times the threshold away
    hashes = doctor.perceptual_hashes(dataset.images.numpy())
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    np.fill_diagonal(distances, 64)
    assert distances.min() > 3 * doctor.NEAR_THRESHOLD


def test_the_exclusion_list_never_reduces_the_test_split(tmp_path):
    """A conflict with copies in train and test, and a blank test image: reported, but only the
    train copy is left out, so test scores stay comparable with runs trained without a list."""
    root = tmp_path / "faces"
    write_class_folders(root / "train", {"angry": 6, "happy": 6}, seed=6)
    write_class_folders(root / "test", {"angry": 3, "happy": 3}, seed=7)
    source = root / "train/angry/angry_000.png"
    for copy in ("test/happy/mislabelled.png", "test/angry/also_here.png"):
        (root / copy).write_bytes(source.read_bytes())
    save(root / "test/happy/blank.png", np.zeros((48, 48), np.uint8))
    _, report = doctor.examine_spec(str(root))
    conflict = only(report.findings["conflict"])
    assert set(conflict.paths) == {"train/angry/angry_000.png", "test/happy/mislabelled.png",
                                   "test/angry/also_here.png"}
    assert conflict.dropped == ["train/angry/angry_000.png"]
    assert only(report.findings["blank"]).dropped == []
    assert set(report.excluded()) == {"train/angry/angry_000.png"}


def test_near_matches_chain_into_one_group_not_only_pairs(monkeypatch):
    """a~b and b~c within the threshold, a and c twice as far: one group of three, as union-find
    gives; an exact copy of b is an exact duplicate, not reported again as a near one."""
    rng = np.random.default_rng(0)
    a = np.uint64(rng.integers(0, 2**63))
    b = a ^ np.uint64(0b1111)                   # 4 bits from a
    c = b ^ np.uint64(0b1111 << 8)              # 4 bits from b, 8 from a
    far = a ^ np.uint64((1 << 64) - 1 - (1 << 40))  # 63 bits from a
    images = torch.from_numpy(rng.integers(0, 256, (5, 48, 48), dtype=np.uint8))
    images[4] = images[1]                        # b's exact copy
    dataset = Dataset(images=images, labels=torch.zeros(5, dtype=torch.int64),
                      paths=[f"/d/x/{n}.png" for n in "abcde"], classes=["x"], source="/d")
    monkeypatch.setattr(doctor, "perceptual_hashes", lambda _: np.array([a, b, c, far], dtype=np.uint64))
    report = doctor.examine(dataset, "/d")
    assert [g.paths for g in report.findings["near_duplicate"]] == [["x/a.png", "x/b.png", "x/c.png"]]
    assert [g.paths for g in report.findings["exact_duplicate"]] == [["x/b.png", "x/e.png"]]
    assert set(report.excluded()) == {"x/b.png", "x/c.png", "x/e.png"}  # a is kept: first in path order


@pytest.mark.parametrize("threshold", [0, 1, 4, 7])
def test_multi_index_search_finds_exactly_the_pairs_that_all_pairs_would(threshold):
    rng = np.random.default_rng(threshold)
    hashes = rng.integers(0, 2**63, 600, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    hashes[:200] = (hashes[:200] & np.uint64(2**32 - 1)) | np.uint64(0xABCD1234 << 32)  # large buckets too
    for k in range(0, 600, 7):  # plant neighbours at every distance up to threshold + 2
        flips = rng.choice(64, size=k % (threshold + 3), replace=False)
        hashes[k + 1] = hashes[k] ^ np.uint64(sum(1 << int(f) for f in flips))
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    expected = np.argwhere(np.triu(distances <= threshold, k=1))
    found = doctor.near_pairs(hashes, threshold)
    assert found.tolist() == expected.tolist() and len(expected) > 0
    first_part = int(np.linspace(0, 64, threshold + 2)[1])  # the bits of near_pairs' first part
    if first_part <= 32:  # the search met a bucket too large to be searched with the small ones
        assert np.unique(hashes >> np.uint64(64 - first_part), return_counts=True)[1].max() > doctor.SMALL_BUCKET


@pytest.mark.parametrize("merge_every", [1, 50, 1 << 22])
def test_near_components_are_the_connected_components_of_all_near_pairs(merge_every):
    """The doctor's grouping, merged a few links at a time (memory stays bounded), must be the
    components of the whole pair graph, each named by its smallest index."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(11)
    hashes = rng.integers(0, 2**63, 800, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    hashes[:300] = (hashes[:300] & np.uint64(2**20 - 1)) | np.uint64(0x5A5A5A5A5A5 << 20)  # one dense cloud
    for k in range(300, 800, 5):  # and chains: k ~ k+1 ~ k+2, k and k+2 further apart
        for step in (1, 2):
            hashes[k + step] = hashes[k + step - 1] ^ np.uint64(sum(1 << int(f) for f in rng.choice(64, 3, False)))
    pairs = doctor.near_pairs(hashes, 4)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(800, 800))
    _, expected = connected_components(graph, directed=False)
    found = doctor.near_components(hashes, 4, merge_every=merge_every)
    for component in np.unique(expected):
        members = np.flatnonzero(expected == component)
        assert (found[members] == members.min()).all()
    assert len(np.unique(found)) == len(np.unique(expected)) < 800 - 250


def test_a_pooled_csv_dataset_gets_duplicates_and_conflicts_but_no_leaks(tmp_path, cache):
    """fer2013.csv rows are named 'fer2013.csv#LINE'; without a given split there is no leak."""
    rng = np.random.default_rng(6)
    faces = [rng.integers(0, 256, 48 * 48) for _ in range(16)]
    rows = [(n % 7, faces[n]) for n in range(14)] + [(0, faces[0]), (5, faces[1])]  # a copy; a relabelled copy
    path = tmp_path / "fer2013.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels"])
        writer.writerows((code, " ".join(map(str, pixels))) for code, pixels in rows)
    dataset, report = doctor.examine_spec(str(path))
    exact = only(report.findings["exact_duplicate"])
    assert exact.paths == ["fer2013.csv#2", "fer2013.csv#16"] and exact.kept == ["fer2013.csv#2"]  # natural order
    assert only(report.findings["conflict"]).paths == ["fer2013.csv#3", "fer2013.csv#17"]
    assert not report.has_given_split and report.findings["leak"] == []
    exclusions = doctor.read_exclusions(doctor.write_exclusions(report))
    assert exclusions["paths"] == ["fer2013.csv#3", "fer2013.csv#16", "fer2013.csv#17"]
    excluded = doctor.excluded_mask(dataset, str(path), exclusions)
    assert [dataset.paths[i].rsplit("#")[1] for i in np.flatnonzero(excluded)] == ["3", "16", "17"]


# ---- the exclusion list ----------------------------------------------------------------

def test_the_exclusion_list_says_what_is_left_out_and_why_and_touches_no_user_file(planted, cache):
    before = files_and_times(planted)
    dataset, report = doctor.examine_spec(str(planted))
    path = doctor.write_exclusions(report)
    assert path == doctor.exclusion_file(str(planted)) and path.parent == cache / doctor.EXCLUSIONS_FOLDER
    assert files_and_times(planted) == before
    listed = doctor.read_exclusions(path)
    assert set(listed["paths"]) == LEFT_OUT and listed["num_excluded"] == len(LEFT_OUT)
    assert listed["dataset_path"] == str(planted.resolve())
    assert listed["reasons"][CONFLICT[0]] == ["conflict"] and listed["reasons"][LEAK_EXACT[1]] == ["leak"]
    duplicates = listed["findings"]["exact_duplicate"]
    assert duplicates["groups"] == [{"kept": [EXACT[0]], "left_out": [EXACT[1]], "match": "exact"}]
    assert "first copy in sorted path order is kept" in duplicates["rule"]
    assert listed["findings"]["leak"]["groups"][1]["kept"] == [LEAK_EXACT[0]]  # the test copy stays
    assert doctor.default_exclusions(str(planted)) == str(path)
    assert doctor.exclusion_summary(path) == (len(LEFT_OUT) - 1, None)  # the unreadable file was never an image

    excluded = doctor.excluded_mask(dataset, str(planted), listed)
    assert int(excluded.sum()) == len(LEFT_OUT) - 1
    splits = assign_splits(dataset, val_fraction=0.2, excluded=excluded)
    assert set(splits[excluded]) == {"excluded"} and "excluded" not in set(splits[~excluded])
    test_paths = {p for p, s in zip(dataset.paths, splits) if s == "test"}
    assert len(test_paths) == sum(TEST_COUNTS.values()) + 2  # the leaked test copies stay in test
    assert doctor.remove_exclusions(str(planted)) and doctor.default_exclusions(str(planted)) == ""


def test_the_fingerprint_that_keys_the_pages_cache_changes_with_added_and_removed_files(tmp_path):
    root = write_class_folders(tmp_path / "faces", {"a": 2, "b": 2})
    first = doctor.dataset_fingerprint(str(root))
    assert doctor.dataset_fingerprint(str(root)) == first
    extra = root / "a" / "new.png"
    extra.write_bytes((root / "a" / "a_000.png").read_bytes())
    second = doctor.dataset_fingerprint(str(root))
    extra.unlink()
    assert second != first and doctor.dataset_fingerprint(str(root)) != second


def test_an_exclusion_list_made_for_another_dataset_is_refused(planted, clean, cache):
    _, report = doctor.examine_spec(str(planted))
    listed = doctor.read_exclusions(doctor.write_exclusions(report))
    with pytest.raises(DataError, match="made for"):
        doctor.excluded_mask(load_dataset(str(clean)), str(clean), listed)
    broken = cache / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        doctor.read_exclusions(broken)
    with pytest.raises(DataError, match="not found"):
        doctor.read_exclusions(cache / "missing.json")


def test_training_leaves_out_the_listed_images_and_keeps_the_list_in_the_run(planted, cache, tmp_path):
    from fer_core.train import fit

    _, report = doctor.examine_spec(str(planted))
    listed = doctor.write_exclusions(report)
    run_dir = fit(tiny_config(planted, tmp_path, epochs=1, exclude=str(listed)))
    layout = runs.RunLayout(run_dir)
    rows = read_split_manifest(layout.split_file)
    excluded = {r["path"].removeprefix(str(planted) + "/") for r in rows if r["split"] == "excluded"}
    assert excluded == LEFT_OUT - {UNREADABLE}  # the unreadable file never was in the split
    assert {r["split"] for r in rows} == {"train", "val", "test", "excluded"}
    assert runs.read_json(layout.exclusions_file) == doctor.read_exclusions(listed)
    assert runs.read_json(layout.config_file)["exclude"] == str(listed)
    data_report = runs.read_json(layout.data_report_file)
    assert data_report["num_excluded"] == len(LEFT_OUT) - 1
    assert sum(row["excluded"] for row in data_report["split_table"]) == len(LEFT_OUT) - 1
    evaluation = runs.read_json(layout.evaluation_file())
    assert evaluation["num_images"] == sum(TEST_COUNTS.values()) + 2


# ---- the command line ------------------------------------------------------------------

def test_doctor_json_on_the_command_line(planted, cache, capsys):
    assert cli.main(["doctor", str(planted), "--json", "--write-exclusions"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {kind: c["groups"] for kind, c in printed["counts"].items()} == {
        "unreadable": 1, "blank": 2, "exact_duplicate": 1, "near_duplicate": 2, "leak": 2, "conflict": 1,
        "imbalance": 1}
    assert printed["left_out"] == len(LEFT_OUT) and printed["thresholds"]["near_hamming"] == doctor.NEAR_THRESHOLD
    assert Path(printed["exclusion_list"]).is_file()
    assert printed["findings"]["exact_duplicate"][0]["kept"] == [EXACT[0]]

    assert cli.main(["doctor", str(planted), "--near-threshold", "0"]) == 0
    text = capsys.readouterr().out
    assert "Near duplicates" in text and "within 0 bits" in text and "Examined in" in text
    assert cli.main(["doctor", str(planted), "--near-threshold", "40"]) == 2
    assert "near-duplicate threshold must be 0 to 16" in capsys.readouterr().err


# ---- the Data and Train pages ----------------------------------------------------------

def app_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, folder in (("FER_RUNS_DIR", "runs"), ("FER_CHECKPOINTS_DIR", "ckpt"), ("FER_DATA_HOME", "data_home"),
                         ("FER_DEMO_DIR", "demo")):
        monkeypatch.setenv(name, str(tmp_path / folder))


def test_the_data_page_shows_the_first_files_of_a_large_group_and_counts_the_rest(tmp_path, cache, monkeypatch):
    """On a large dataset one near-duplicate group can hold 100,000s of images: the page draws
    the first FILES_SHOWN of a group, not a thumbnail per image."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    root = write_class_folders(tmp_path / "faces", {"angry": 6, "happy": 6}, seed=3)
    copies = 20
    for n in range(copies - 1):
        (root / "happy" / f"copy_{n:02d}.png").write_bytes((root / "happy" / "happy_000.png").read_bytes())
    app_folders(tmp_path, monkeypatch)
    at = AppTest.from_file("../streamlit_app.py", default_timeout=120)
    at.session_state["data_source"] = str(root)
    at.switch_page("pages/data.py").run()
    at.button(key="data_doctor_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [t.value for t in at.text if "happy/copy_" in t.value or "happy/happy_000" in t.value]
    assert len(shown) == 1, shown
    assert len(shown[0].splitlines()) == 12 + 1 and "…and 8 more files in this group (19 of the group's files " \
        "left out)" in shown[0]
    assert len(at.image[-1].value) == 12  # the group's faces (the sample faces per class come first)


def test_the_data_page_examines_shows_and_leaves_out_and_train_uses_it(planted, cache, tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from markdown_safety import active_markdown

    from pages import _shared

    app_folders(tmp_path, monkeypatch)
    # as the app holds a dataset too large for its memory: in the store on disk
    monkeypatch.setattr(_shared, "APP_IN_MEMORY_BYTES", 0)
    examined = []
    pixel_blocks = doctor.pixel_blocks
    monkeypatch.setattr(doctor, "pixel_blocks", lambda images, *a, **k: examined.append(type(images))
                        or pixel_blocks(images, *a, **k))
    at = AppTest.from_file("../streamlit_app.py", default_timeout=120)
    at.session_state["data_source"] = str(planted)
    at.switch_page("pages/data.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Dataset doctor" in [s.value for s in at.subheader]
    at.button(key="data_doctor_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert examined and set(examined) == {ImageArray}
    metrics = {m.label: m.value for m in at.metric}
    assert {k: metrics[doctor.KIND_TITLES[k]] for k in doctor.KINDS} == {
        "unreadable": "1", "blank": "2", "exact_duplicate": "1", "near_duplicate": "2", "leak": "2",
        "conflict": "1", "imbalance": "8.0:1"}
    labels = [e.label for e in at.expander]
    assert any(label.startswith("Train/test leaks: 2 group(s), 4 images, 2 to leave out") for label in labels)
    shown = "\n".join(t.value for t in at.text)
    for path in (EXACT[1], LEAK_EXACT[0], CONFLICT[1], UNREADABLE):
        assert path in shown
    assert "left out  train/angry/zz_copy.png  (angry, train)" in shown
    assert len(at.image) >= 8  # a row of faces per group shown (unreadable files have none)
    assert not active_markdown(at)

    at.button(key="data_doctor_exclude").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert doctor.exclusion_file(str(planted)).is_file()
    after = next(d.value for d in at.dataframe if "excluded" in d.value.columns)
    assert after["excluded"].sum() == len(LEFT_OUT) - 1
    assert (after["train"] + after["val"] + after["test"] + after["excluded"] == after["total"]).all()
    assert f"{len(LEFT_OUT) - 1:,} images of this dataset are left out" in " ".join(i.value for i in at.info)

    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="train_data").value == str(planted)
    assert at.text_input(key="tf_exclude").value == str(doctor.exclusion_file(str(planted)))
    assert f"{len(LEFT_OUT) - 1} images left out by the dataset doctor" in " ".join(i.value for i in at.info)



def test_a_label_list_is_placed_and_fingerprinted_by_the_image_folder_it_names(tmp_path):
    """RAF-DB's list lives in EmoLabel/: the report's paths are relative to the dataset folder
    and an image added there is a changed dataset (the list file itself did not change)."""
    from test_data import _raf_db
    root = _raf_db(tmp_path / "basic", {f"train_{i:05d}.jpg": 1 + i % 7 for i in range(1, 15)})
    spec = str(root / "EmoLabel" / "list_patition_label.txt")
    assert doctor.dataset_root(spec) == root
    before = doctor.dataset_fingerprint(spec)
    (root / "Image" / "aligned" / "train_00099_aligned.jpg").write_bytes(b"not yet a face")
    assert doctor.dataset_fingerprint(spec) != before
