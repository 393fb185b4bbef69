"""Datasets: find them, decode them once into a uint8 tensor cache, split them reproducibly.

Accepted sources: "demo" (built in, synthetic), a folder of class folders (one pool that we
split 75/25), a folder with train/ and test/ class folders (split as given), a fer2013.csv, or
a list of "image label" lines (RAF-DB's list_patition_label.txt, or the folder holding it).
Class names go through `classes.canonical_class`, so "Anger" and "angry" are one class.
Images are stored as uint8 in the run's `image_format.ImageFormat`: 48 px grey by default,
FER2013's native format, or larger and RGB for colour datasets.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from . import fer2013_csv, settings
from .classes import CLASS_NAMES, FER2013_CODES, canonical_class, code_table
from .config import require_dataset
from .errors import DataError
from .image_format import DEFAULT_FORMAT, STORE_SIZE, ImageFormat
from .pixels import decode_file, to_stored
from .store import ImageArray, Progress, build_store

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: the file-backed store; 2: 16-bit by type range, no grey JPEG draft


@dataclass
class Dataset:
    """Decoded images and labels, plus where they came from and what was skipped."""

    # uint8 (N, *image_format.shape), (N, 48, 48) by default: a tensor, or for a dataset larger
    # than memory a file-backed `store.ImageArray` that reads the rows it is indexed with
    images: torch.Tensor | ImageArray
    labels: torch.Tensor            # int64 (N,)
    paths: list[str]
    classes: list[str]
    source: str
    given_split: list[str] | None = None   # "train"/"test" per image when the source has one
    synthetic: bool = False
    bad_files: list[dict[str, str]] = field(default_factory=list)
    renamed_classes: dict[str, str] = field(default_factory=dict)  # folder name -> canonical alias

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def default_cache_dir() -> Path:
    return settings.cache_dir()


@dataclass(frozen=True)
class _Decoding:
    """How a dataset's files become its images: their stored format, the cache folder that
    keeps the store, progress reports, and the largest store loaded into memory (None: the
    store's own rule, `store.in_memory_limit()`)."""

    image_format: ImageFormat
    cache_dir: Path | None = None
    progress: Progress | None = None
    in_memory_bytes: int | None = None


def load_dataset(spec: str, *, cache_dir: Path | None = None, image_format: ImageFormat = DEFAULT_FORMAT,
                 progress: Progress | None = None, in_memory_bytes: int | None = None) -> Dataset:
    """Load the dataset named by `spec` ("demo", a folder, a fer2013.csv or a label list), its
    images stored in `image_format`. `progress(done, total)` follows the decoding of files.
    Decoded images larger than `in_memory_bytes` (default: `store.in_memory_limit()`) stay in
    the file-backed store instead of memory."""
    decoding = _Decoding(image_format, cache_dir, progress, in_memory_bytes)
    if spec == "demo":
        from .demo import ensure_demo_dataset
        dataset = _load_folder(ensure_demo_dataset(), decoding)
        dataset.synthetic = True
        dataset.source = "demo (synthetic)"
    else:
        require_dataset(spec)
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".csv":
            dataset = read_fer2013_csv(path, image_format)
        elif path.is_file() and path.suffix.lower() == ".txt":
            dataset = _load_label_file(path, label_file_root(path), decoding)
        elif path.is_dir():
            dataset = _load_folder(path, decoding)
        else:
            raise DataError(f"{path} is neither a folder of class folders, a fer2013.csv nor a "
                            "label list (.txt of 'image label' lines)")
    _check_usable(dataset)
    return dataset


def describe_layout(path: Path) -> str:
    """'train_test' if the folder holds train/ and test/ class folders, else 'pool'."""
    return "train_test" if (path / "train").is_dir() and (path / "test").is_dir() else "pool"


LINK_OUTSIDE = "symbolic link to {what} outside the dataset folder ({target}): not followed"


def _outside(path: Path, root: Path) -> bool:
    """True when `path` (a symbolic link, or under one) leads outside the real dataset root."""
    try:
        return not path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop or an unreadable link leads nowhere we read
        return True


def _class_dirs(root: Path, real_root: Path | None = None,
                skipped: list[dict[str, str]] | None = None) -> list[Path]:
    """The class folders of `root`; a symbolic link to a folder outside `real_root` (the
    dataset's real path) is not a class folder: it is listed in `skipped`."""
    real_root = real_root or root.resolve()
    found = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink() and _outside(p, real_root):
            if skipped is not None:
                skipped.append({"path": display_path(p), "reason": LINK_OUTSIDE.format(
                    what="a folder", target=display_path(_link_target(p)))})
            continue
        found.append(p)
    return found


def _link_target(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _load_folder(root: Path, decoding: _Decoding) -> Dataset:
    label_file = find_label_file(root)
    if label_file is not None:
        return _load_label_file(label_file, root, decoding)
    has_own_split = describe_layout(root) == "train_test"
    real_root = root.resolve()
    links: list[dict[str, str]] = []  # symbolic links that lead outside: reported, not read
    if has_own_split:
        train_dirs = _class_dirs(root / "train", real_root, links)
        test_dirs = _class_dirs(root / "test", real_root, links)
        extra = sorted({canonical_class(d.name) for d in test_dirs} - {canonical_class(d.name) for d in train_dirs})
        if extra:
            raise DataError(f"test/ has classes that train/ lacks: {', '.join(extra)}")
        listing = [(f, canonical_class(d.name), split) for split, dirs in (("train", train_dirs), ("test", test_dirs))
                   for d in dirs for f in _list_files(d, real_root, links)]
        folders = train_dirs + test_dirs
    else:
        folders = _class_dirs(root, real_root, links)
        listing = [(f, canonical_class(d.name), None) for d in folders for f in _list_files(d, real_root, links)]
    if not folders:
        raise DataError(f"{root} has no class folders (expected e.g. {root}/happy/*.jpg)"
                        + (f"; {len(links)} symbolic link(s) outside it were not followed" if links else ""))
    renamed = {d.name: canonical_class(d.name) for d in folders if canonical_class(d.name) != d.name}
    classes = sorted({canonical_class(d.name) for d in folders})  # an empty folder is still a class
    return _decoded_dataset(listing, classes, str(root), has_own_split, links, renamed, decoding)


def _decoded_dataset(listing: list[tuple[Path, str, str | None]], classes: list[str], source: str,
                     has_own_split: bool, bad: list[dict[str, str]], renamed: dict[str, str],
                     decoding: _Decoding) -> Dataset:
    """Decode the (file, class name, given split) listing into a Dataset; files that cannot be
    decoded join `bad`."""
    images, kept, undecodable = _decode_cached([f for f, _, _ in listing], decoding)
    kept_set = set(kept)
    rows = [(str(f), classes.index(name), split) for f, name, split in listing if str(f) in kept_set]
    return Dataset(images=images, labels=torch.tensor([r[1] for r in rows], dtype=torch.int64),
                   paths=[r[0] for r in rows], classes=classes, source=source,
                   given_split=[r[2] for r in rows] if has_own_split else None,
                   bad_files=bad + undecodable, renamed_classes=renamed)


# ---- label files (RAF-DB style: "image label" per line) ---------------------------------

# Where RAF-DB and similar releases keep the list, relative to the folder the user picks.
LABEL_FILE_NAMES = ("list_patition_label.txt", "list_partition_label.txt", "labels.txt")
LABEL_FILE_FOLDERS = (".", "EmoLabel")
# Where the listed images are looked for, best first: RAF-DB's aligned faces (100x100, already
# cropped) before its original photos, then the label file's own folder.
IMAGE_FOLDERS = ("Image/aligned", "aligned", "Image/original", "original", "images", "Image", ".")


def find_label_file(root: Path) -> Path | None:
    """The label list in `root` (or its EmoLabel/ folder), if the dataset is given that way."""
    for folder in LABEL_FILE_FOLDERS:
        for name in LABEL_FILE_NAMES:
            candidate = root / folder / name
            if candidate.is_file():
                return candidate
    return None


def read_label_file(path: Path) -> tuple[list[tuple[str, str]], list[dict[str, str]], str]:
    """(image name, canonical class) per usable line, the unusable lines, and how labels were
    read: "names", or the numbering ("RAF-DB" 1-7, "FER2013" 0-6) from `classes.code_table`."""
    entries, bad = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            bad.append({"path": f"{display_path(path)}#{number}",
                        "reason": f"malformed line: expected 'image label', got {len(fields)} field(s)"})
            continue
        entries.append((fields[0], fields[1]))
    numeric = [label.isdigit() for _, label in entries]
    if any(numeric) and not all(numeric):
        raise DataError(f"{path.name} mixes numeric labels and class names; use one or the other")
    if entries and all(numeric):
        try:
            numbering, table = code_table({int(label) for _, label in entries})
        except ValueError as exc:
            raise DataError(f"{path.name}: {exc}") from exc
        return [(name, table[int(label)]) for name, label in entries], bad, numbering
    return [(name, canonical_class(label)) for name, label in entries], bad, "names"


def _image_folder(root: Path, names: list[str]) -> Path:
    """The first of IMAGE_FOLDERS that holds the first listed image (RAF-DB's aligned copies
    add "_aligned" to the name)."""
    for folder in IMAGE_FOLDERS:
        if any(_listed_image(root / folder, name) for name in names[:20]):
            return root / folder
    raise DataError(f"none of the images listed in the label file were found under {root} "
                    f"(looked in {', '.join(IMAGE_FOLDERS)})")


def _listed_image(folder: Path, name: str) -> Path | None:
    plain = folder / name
    aligned = folder / f"{Path(name).stem}_aligned{Path(name).suffix}"
    return next((p for p in (plain, aligned) if p.is_file()), None)


def _load_label_file(label_file: Path, root: Path, decoding: _Decoding) -> Dataset:
    """A dataset given as a list of "image label" lines (RAF-DB's list_patition_label.txt).
    Names starting with train/test (RAF-DB's "train_00001.jpg") keep that split; otherwise the
    images are pooled and split 75/25 like a folder of class folders."""
    entries, bad, _ = read_label_file(label_file)
    if not entries:
        raise DataError(f"{label_file} lists no images")
    real_root = root.resolve()
    folder = _image_folder(root, [name for name, _ in entries])
    has_own_split = all(name.lower().startswith(("train", "test")) for name, _ in entries)
    folders_outside: dict[Path, bool] = {}  # resolved once per folder, not once per image

    def outside(image: Path) -> bool:
        if image.parent not in folders_outside:
            folders_outside[image.parent] = _outside(image.parent, real_root)
        return folders_outside[image.parent] or (image.is_symlink() and _outside(image, real_root))

    listing = []
    for name, label in entries:
        image = _listed_image(folder, name)
        if image is None or outside(image):
            reason = "listed in the label file but not found" if image is None else "outside the dataset folder"
            bad.append({"path": display_path(folder / name), "reason": reason})
            continue
        split = ("test" if name.lower().startswith("test") else "train") if has_own_split else None
        listing.append((image, label, split))
    classes = sorted({label for _, label in entries})
    return _decoded_dataset(listing, classes, str(root), has_own_split, bad, {}, decoding)


def _list_files(class_dir: Path, real_root: Path | None = None,
                skipped: list[dict[str, str]] | None = None) -> list[Path]:
    """Every file under a class folder (nested folders included), in a stable order. A
    symbolic link (to a file, or a nested folder) that leads outside `real_root` is not read:
    it is listed in `skipped`, as is a folder that cannot be read (rglob passes over it in
    silence, and its images would go missing unexplained)."""
    real_root = real_root or class_dir.resolve()
    files = []
    for p in [class_dir, *sorted(class_dir.rglob("*"), key=lambda p: str(p))]:
        if p != class_dir and (p.is_symlink() or p.parent != class_dir) and _outside(p, real_root):
            if p.is_symlink() and skipped is not None:
                what = "a folder" if p.is_dir() else "a file"
                skipped.append({"path": display_path(p), "reason": LINK_OUTSIDE.format(
                    what=what, target=display_path(_link_target(p)))})
            continue
        if p.is_dir():
            problem = _unreadable_folder(p)
            if problem and skipped is not None:
                skipped.append({"path": display_path(p), "reason": problem})
        elif p.is_file():
            files.append(p)
    return files


def _unreadable_folder(folder: Path) -> str | None:
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as exc:
        return f"folder cannot be read ({exc.strerror or exc}): its images are left out"
    return None


def _cache_key(files: list[Path], image_format: ImageFormat) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{image_format.size}:{image_format.colour}".encode())
    for f in map(os.path.abspath, files):  # "data/fer2013" and its absolute path: one store, not two
        try:
            st = os.stat(f)
            # ctime too: a `chmod` that makes an unreadable file readable, or a copy that keeps
            # size and mtime (`cp -p`), changes only it, and the store must not keep the old verdict
            digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode(
                "utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{f}\0missing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _decode_cached(files: list[Path], decoding: _Decoding
                   ) -> tuple[torch.Tensor | ImageArray, list[str], list[dict[str, str]]]:
    """Decode every file once into the cache folder's store (`fer_core.store`: in parallel,
    resumable, file-backed when larger than memory) and reuse it while the file list and the
    format are unchanged. A read-only or full cache folder falls back to the temporary folder."""
    cache_dir = Path(decoding.cache_dir) if decoding.cache_dir else default_cache_dir()
    image_format = decoding.image_format
    name = f"store-{_cache_key(files, image_format)}"
    store = functools.partial(build_store, files, functools.partial(decode_file, image_format=image_format),
                              image_format.shape, progress=decoding.progress,
                              in_memory_bytes=decoding.in_memory_bytes)
    try:
        result = store(cache_dir / name)
    except OSError as exc:
        log.warning("cannot keep decoded images in %s (%s); using the temporary folder", cache_dir, exc)
        result = store(Path(tempfile.gettempdir()) / f"fer-{name}")
    for stale in cache_dir.glob("images-*.pt"):  # the whole-tensor caches from before the store
        with suppress(OSError):  # a read-only cache folder (the store went to the temporary folder)
            stale.unlink(missing_ok=True)
    bad = [{"path": display_path(files[index]), "reason": reason} for index, reason in result.bad]
    return result.images, [str(files[index]) for index in result.kept], bad


def display_path(path: str | Path) -> str:
    """A path as text that can always be written (undecodable bytes in a file name become
    backslash escapes); manifests and reports store this form."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def read_fer2013_csv(path: Path, image_format: ImageFormat = DEFAULT_FORMAT) -> Dataset:
    """Read Kaggle's fer2013.csv (emotion, pixels[, Usage]); malformed rows are skipped and reported.

    Each line is parsed on its own (`fer2013_csv.read_lines`): a broken row, an unclosed quote
    or an overlong line costs only that line. A UTF-8 byte-order mark is accepted.
    """
    classes = list(CLASS_NAMES)
    labels, paths, splits, bad = [], [], [], []
    try:
        handle = fer2013_csv.open_csv(path)
        # one array of as many faces as the file can hold lines, filled in place: a list of faces
        # stacked at the end held every face twice (11 GB at 224 px RGB); rows never used are
        # pages never touched
        faces = np.empty((_most_lines(path), *image_format.shape), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        with handle:
            lines = fer2013_csv.read_lines(handle)
            _, header, _ = next(lines, (1, None, None))
            columns = fer2013_csv.header_columns(header)
            if "emotion" not in columns or "pixels" not in columns:
                raise DataError(f"{path.name} is not a fer2013.csv: it needs 'emotion' and 'pixels' columns")
            usage_column = columns.get("usage")
            needed = max(columns["emotion"], columns["pixels"], -1 if usage_column is None else usage_column)
            for line_number, fields, problem in lines:
                ref = f"{path}#{line_number}"
                try:
                    if problem is not None:
                        raise ValueError(problem)
                    fields = fields or []
                    if len(fields) <= needed:
                        raise ValueError(f"{len(fields)} field(s), expected {needed + 1}")
                    code = int(fields[columns["emotion"]].strip())
                    if code not in FER2013_CODES:
                        raise ValueError(f"unknown emotion code {code}")
                    pixels = fer2013_csv.parse_pixels(fields[columns["pixels"]])
                    if pixels.size != STORE_SIZE * STORE_SIZE:
                        raise ValueError(f"expected {STORE_SIZE * STORE_SIZE} pixel values, got {pixels.size}")
                    if pixels.min() < 0 or pixels.max() > 255:
                        raise ValueError(f"pixel values must be 0-255, got {pixels.min()}..{pixels.max()}")
                except ValueError as exc:
                    bad.append({"path": ref, "reason": f"malformed row ({str(exc)[:80] or type(exc).__name__})"})
                    continue
                face = pixels.astype(np.uint8).reshape(STORE_SIZE, STORE_SIZE)
                faces[len(labels)] = face if image_format == DEFAULT_FORMAT else \
                    to_stored(Image.fromarray(face), image_format)
                labels.append(classes.index(FER2013_CODES[code]))
                paths.append(ref)
                if usage_column is not None:
                    usage = fields[usage_column].strip().lower()
                    splits.append("train" if usage == "training" else "test")
    except OSError as exc:  # a read error part-way through the file
        raise DataError(f"cannot read {path}: {exc}") from exc
    images = torch.from_numpy(faces[:len(labels)]) if labels else image_format.empty_batch()
    return Dataset(images=images, labels=torch.tensor(labels, dtype=torch.int64), paths=paths,
                   classes=classes, source=str(path), given_split=splits if usage_column is not None else None,
                   bad_files=bad)


def _most_lines(path: Path) -> int:
    """An upper bound on the lines of a text file, whichever line endings it uses."""
    count = 1
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            count += chunk.count(b"\n") + chunk.count(b"\r")
    return count


def label_file_root(path: Path) -> Path:
    """The folder a label list's image names are relative to: RAF-DB keeps its list in
    EmoLabel/ beside the image folder, others beside the images."""
    return path.parent.parent if path.parent.name == "EmoLabel" else path.parent


def _check_usable(dataset: Dataset) -> None:
    if len(dataset) == 0:
        skipped = f" ({len(dataset.bad_files)} unreadable files skipped)" if dataset.bad_files else ""
        raise DataError(f"no usable images in {dataset.source}{skipped}")
    counts = dataset.class_counts()
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"class folder(s) with no usable images: {', '.join(empty)}")
    if len(dataset.classes) < 2:
        raise DataError(f"only one class ({dataset.classes[0]}) in {dataset.source}: "
                        "a classifier needs at least two")


def cap_training_images(dataset: Dataset, splits: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Keep at most `max_per_class` training images per class (a seeded choice); the rest
    become 'unused'. Validation and test images are never capped, so a quick trial is scored
    on the same test images as a full run."""
    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    capped = np.asarray(splits).astype(object)
    for label in range(len(dataset.classes)):
        train = np.flatnonzero((labels == label) & (capped == "train"))
        if len(train) > max_per_class:
            capped[rng.permutation(train)[max_per_class:]] = "unused"
    return capped.astype(str)


# ---- split ----------------------------------------------------------------------------

def assign_splits(dataset: Dataset, *, test_fraction: float = 0.25, val_fraction: float = 0.1,
                  seed: int = 42, excluded: np.ndarray | None = None) -> np.ndarray:
    """Return 'train' / 'val' / 'test' per image: stratified and seeded.

    A pooled dataset is split train/test by `test_fraction`; a given split is kept. A
    validation set is then carved from train by `val_fraction` (0 means none). Images marked
    in `excluded` (a boolean mask: the dataset doctor's exclusion list) are 'excluded', and
    the split is made on the rest.
    """
    labels = dataset.labels.numpy()
    indices = np.arange(len(labels)) if excluded is None else np.flatnonzero(~np.asarray(excluded, dtype=bool))
    splits = np.full(len(labels), "excluded", dtype=object)
    if dataset.given_split is not None:
        splits[indices] = np.asarray(dataset.given_split, dtype=object)[indices]
        train_idx = indices[splits[indices] == "train"]
        if len(train_idx) == 0 or not (splits[indices] == "test").any():
            raise DataError("the dataset's own split needs images in both train and test")
    else:
        train_idx, test_idx = _stratified(indices, labels[indices], test_fraction, seed, "train/test")
        splits[train_idx] = "train"
        splits[test_idx] = "test"
    if val_fraction > 0:
        _, val_idx = _stratified(train_idx, labels[train_idx], val_fraction, seed, "train/validation")
        splits[val_idx] = "val"
    return splits.astype(str)


def _stratified(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                what: str) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(labels)
    too_small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
    if too_small:
        raise DataError(f"cannot make a stratified {what} split: class index {too_small} has a "
                        "single image; every class needs at least 2 (better 10+)")
    # Stratification needs one image per class on each side; small datasets get that minimum.
    num_classes = int((counts > 0).sum())
    second_size = max(int(np.ceil(fraction * len(indices))), num_classes)
    if len(indices) - second_size < num_classes:
        raise DataError(f"cannot make a stratified {what} split: {len(indices)} images are too few "
                        f"for {num_classes} classes")
    try:
        first, second = train_test_split(indices, test_size=second_size, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified {what} split with {len(indices)} images: {exc}") from exc
    return np.sort(first), np.sort(second)


def split_table(dataset: Dataset, splits: Iterable[str]) -> list[dict[str, Any]]:
    """Per class: total, train, val, test and their percentages (the reference's table)."""
    splits = np.asarray(list(splits))
    labels = dataset.labels.numpy()
    table = []
    for index, name in enumerate(dataset.classes):
        mask = labels == index
        total = int(mask.sum())
        row: dict[str, Any] = {"class": name, "total": total}
        parts = ("train", "val", "test") + tuple(p for p in ("unused", "excluded") if (splits == p).any())
        for part in parts:
            row[part] = int((mask & (splits == part)).sum())
        row["train %"] = round(100 * (row["train"] + row["val"]) / total, 1) if total else 0.0
        row["test %"] = round(100 * row["test"] / total, 1) if total else 0.0
        table.append(row)
    return table


def write_split_manifest(path: Path, dataset: Dataset, splits: np.ndarray) -> None:
    from .runs import atomic_write_text
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "split"])
    for p, label, split in zip(dataset.paths, dataset.labels.tolist(), splits):
        # a class is a folder name too, and may not be valid UTF-8 (a zip made on Windows)
        writer.writerow([display_path(Path(p)), display_path(dataset.classes[label]), split])
    atomic_write_text(path, buffer.getvalue())


def read_split_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
