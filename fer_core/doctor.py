"""The dataset doctor: what is wrong with a dataset before a model learns from it.

It looks at the decoded 48x48 grey images (`data.load_dataset`, the pixels training sees) and
finds unreadable files, blank or near-constant images, exact and near duplicates, the same
image in train and test (leakage), the same image under two labels (conflicts) and class
imbalance. An exclusion list written from a report (into the cache folder, never beside the
user's files) lets training leave those images out: `TrainConfig.exclude`.

Rules, each stated once here:
- blank: the pixel standard deviation of the 48x48 image is below BLANK_STD grey levels.
- exact duplicates: the same 48x48 pixels (a hash of the bytes).
- near duplicates: perceptual hashes (`imagehash.phash` of the 48x48 image, 64 bits) at most
  NEAR_THRESHOLD bits apart, between images whose pixels differ (exact copies are not reported
  again as near ones). Found by multi-index hashing, not by comparing all pairs.
- images linked by exact or near matches form one group (connected components), so a chain a~b~c is one
  group even when a and c are further apart than the threshold. Each group is reported once,
  under the first of: label conflict (more than one label), train/test leak (in both splits of
  a dataset's own split), duplicate. Blank images are left out of the duplicate search (every
  black frame matches every other).
- imbalance: largest class / smallest class above IMBALANCE_RATIO.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import runs, settings
from .data import Dataset, display_path, label_file_root, load_dataset
from .errors import DataError

if TYPE_CHECKING:
    import torch

    from .store import ImageArray

# In FER2013 the flattest real face has a pixel standard deviation of 9.1 grey levels; below
# 5 there are only black or grey frames and one black frame with a speck (13 at 0-0.7, 1 at 4.1).
BLANK_STD = 5.0
# Measured on FER2013's nearest pairs (phash distances are even: every hash has 32 bits set):
# in samples of 16 pairs, at distance 4 all 32 were the same photo (re-cropped, re-compressed,
# a watermark); at 6 four of 16 were other photos, often other people; at 8 about half.
NEAR_THRESHOLD = 4
MAX_NEAR_THRESHOLD = 16  # beyond this almost any two aligned faces "match"
# A rule of thumb: beyond about 5:1 a plain classifier's recall on the rare class suffers;
# class weights (TrainConfig.class_weights) or more data for it help.
IMBALANCE_RATIO = 5.0
EXCLUSIONS_FOLDER = "exclusions"
EXCLUSIONS_FORMAT = 1
HASH_BITS = 64
# Images read at a time: a store too large for memory stays on disk (`store.ImageArray`), and
# a float copy of a whole large dataset would be gigabytes.
PIXEL_BLOCK = 4096
SMALL_BUCKET = 64  # near_pairs: buckets up to this size are searched together, larger ones one by one

KINDS = ("unreadable", "blank", "exact_duplicate", "near_duplicate", "leak", "conflict", "imbalance")
KIND_TITLES = {"unreadable": "Unreadable files", "blank": "Blank or near-constant images",
               "exact_duplicate": "Exact duplicates", "near_duplicate": "Near duplicates",
               "leak": "Train/test leaks", "conflict": "Label conflicts", "imbalance": "Class imbalance"}
# What each finding is, in words (the Data page's help).
KIND_RULES = {
    "unreadable": "files that are not images or cannot be decoded",
    "blank": f"pixel standard deviation below {BLANK_STD:g} grey levels on the decoded 48x48 image",
    "exact_duplicate": "the same 48x48 pixels (a hash of the bytes), one label, one split",
    "near_duplicate": f"perceptual hashes (phash, 64 bits) at most {NEAR_THRESHOLD} bits apart, the pixels not "
                      "identical; one label, one split",
    "leak": "the same image, exactly or nearly, in the train and in the test split",
    "conflict": "the same image, exactly or nearly, under more than one label",
    "imbalance": f"the largest class has more than {IMBALANCE_RATIO:g} times the images of the smallest",
}
# What the exclusion list does with each finding, in words (the Data page and the list say it).
EXCLUSION_RULES = {
    "unreadable": "left out (they cannot be decoded; training skips them anyway)",
    "blank": "left out of training; test images are kept (the test set stays the benchmark)",
    "exact_duplicate": "the first copy in sorted path order is kept, the other copies are left out; "
                       "copies inside the test split are all kept (the test set stays the benchmark)",
    "near_duplicate": "as exact duplicates: the first in sorted path order is kept, the rest left out; "
                      "never from the test split",
    "leak": "the train copies are left out; the test copies stay, so the test set stays the benchmark",
    "conflict": "every train copy is left out (which label is right is unknown); test copies are kept, so "
                "test scores stay comparable with runs that used no list",
    "imbalance": "nothing is left out; consider class weights",
}


@dataclass
class Group:
    """One finding: the images it concerns (in sorted path order) and which of them an
    exclusion list leaves out. Unreadable files have no decoded image (indices is empty)."""

    kind: str
    paths: list[str]                 # dataset-relative, sorted
    indices: list[int] = field(default_factory=list)   # positions in the Dataset
    labels: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)    # "train"/"test"; "" in a pooled dataset
    dropped: list[str] = field(default_factory=list)   # what an exclusion list leaves out
    match: str = ""                  # "exact" or "near" for duplicates, leaks and conflicts
    detail: str = ""                 # e.g. the reason a file is unreadable, a blank image's deviation

    @property
    def kept(self) -> list[str]:
        dropped = set(self.dropped)
        return [p for p in self.paths if p not in dropped]


@dataclass
class DoctorReport:
    """Everything the doctor found in one dataset, with the thresholds it used."""

    spec: str
    dataset_path: str                # the dataset's resolved path: what an exclusion list is for
    num_images: int
    classes: list[str]
    has_given_split: bool
    near_threshold: int
    blank_std: float
    findings: dict[str, list[Group]]                   # every kind except imbalance
    class_counts: dict[str, int]
    split_class_counts: dict[str, dict[str, int]]      # split -> class -> images (own split only)
    imbalance_ratio: float | None                      # None when a class is empty
    imbalance: str | None                              # the warning in words, or None
    seconds: dict[str, float]

    def count(self, kind: str) -> int:
        """Groups found of one kind (images for unreadable and blank, 0 or 1 for imbalance)."""
        if kind == "imbalance":
            return int(self.imbalance is not None)
        return len(self.findings[kind])

    def images_in(self, kind: str) -> int:
        return sum(len(group.paths) for group in self.findings.get(kind, []))

    def excluded(self) -> dict[str, list[str]]:
        """Dataset-relative path -> the findings that leave it out."""
        reasons: dict[str, list[str]] = {}
        for kind, groups in self.findings.items():
            for group in groups:
                for path in group.dropped:
                    if kind not in reasons.setdefault(path, []):
                        reasons[path].append(kind)
        return {path: reasons[path] for path in sorted(reasons, key=path_order)}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per kind: groups, images involved, images an exclusion list leaves out."""
        counts = {}
        for kind in KINDS:
            groups = self.findings.get(kind, [])
            counts[kind] = {"groups": self.count(kind), "images": self.images_in(kind),
                            "left_out": len({p for g in groups for p in g.dropped})}
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (`doctor --json`)."""
        return {"dataset": self.spec, "dataset_path": self.dataset_path, "num_images": self.num_images,
                "classes": self.classes, "has_given_split": self.has_given_split,
                "thresholds": self.thresholds(), "counts": self.counts(),
                "class_counts": self.class_counts, "split_class_counts": self.split_class_counts,
                "imbalance_ratio": self.imbalance_ratio, "imbalance_warning": self.imbalance,
                "left_out": len(self.excluded()), "seconds": self.seconds,
                "findings": {kind: [_group_dict(g) for g in groups] for kind, groups in self.findings.items()}}

    def thresholds(self) -> dict[str, Any]:
        return {"blank_std": self.blank_std, "near_hamming": self.near_threshold, "hash": "imagehash.phash 64 bits",
                "imbalance_ratio": IMBALANCE_RATIO}

    def summary_lines(self) -> list[str]:
        """What the CLI prints: one line per finding, then what an exclusion list would do."""
        split = "its own train/test split" if self.has_given_split else "one pool, split by us"
        lines = [f"{self.spec}: {self.num_images:,} images, {len(self.classes)} classes, {split}"]
        words = {
            "unreadable": f"{self.count('unreadable')} file(s)",
            "blank": f"{self.count('blank')} image(s) with pixel standard deviation below {self.blank_std:g}",
            "exact_duplicate": f"{self.count('exact_duplicate')} group(s), {self.images_in('exact_duplicate')} "
                               "images with identical pixels",
            "near_duplicate": f"{self.count('near_duplicate')} group(s), {self.images_in('near_duplicate')} "
                              f"images within {self.near_threshold} bits of phash",
            "leak": f"{self.count('leak')} group(s) in both train and test ({self._matches('leak')}; "
                    f"{self._test_images('leak')} test images)" if self.has_given_split
                    else "not applicable (no given split; duplicates are handled above)",
            "conflict": f"{self.count('conflict')} group(s), {self.images_in('conflict')} images under "
                        f"more than one label ({self._matches('conflict')})",
            "imbalance": self.imbalance or (f"largest/smallest class {self.imbalance_ratio:.1f}:1, fine"
                                            if self.imbalance_ratio else "a class is empty"),
        }
        lines += [f"  {KIND_TITLES[kind]:<30} {words[kind]}" for kind in KINDS]
        excluded = self.excluded()
        by_split = self._split_of_paths()
        in_test = sum(1 for p in excluded if by_split.get(p) == "test")
        lines.append(f"An exclusion list would leave out {len(excluded):,} file(s)"
                     + (f" ({in_test} of them from the test split)" if self.has_given_split else "") + ".")
        lines.append(f"Examined in {sum(self.seconds.values()):.1f} s "
                     + "(" + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()) + ").")
        return lines

    def _matches(self, kind: str) -> str:
        exact = sum(g.match == "exact" for g in self.findings[kind])
        return f"{exact} exact, {len(self.findings[kind]) - exact} near"

    def _test_images(self, kind: str) -> int:
        return sum(s == "test" for g in self.findings[kind] for s in g.splits)

    def _split_of_paths(self) -> dict[str, str]:
        return {p: s for groups in self.findings.values() for g in groups for p, s in zip(g.paths, g.splits)}


def _group_dict(group: Group) -> dict[str, Any]:
    values = asdict(group)
    values["kept"] = group.kept
    return values


# ---- where a dataset lives, and its paths --------------------------------------------

def dataset_root(spec: str) -> Path:
    """The folder the dataset's paths are relative to, as load_dataset reads it."""
    if spec == "demo":
        return settings.demo_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".txt":
        return label_file_root(path)
    return path.parent if path.suffix.lower() == ".csv" else path


def dataset_key(spec: str) -> str:
    """What identifies a dataset for an exclusion list: its resolved path (the demo's folder)."""
    path = settings.demo_dir() if spec == "demo" else Path(spec).expanduser()
    return display_path(path.resolve())


def path_order(path: str) -> list[Any]:
    """Sort key: paths in natural order, so 'fer2013.csv#9' comes before 'fer2013.csv#10'."""
    return [int(part) if n % 2 else part for n, part in enumerate(re.split(r"(\d+)", path))]


def relative_path(path: str, root: Path) -> str:
    """A Dataset path (or a bad file's) relative to the dataset's root, with '/' separators:
    'train/happy/x.png', or 'fer2013.csv#12' for a csv row."""
    shown = display_path(path)
    prefix = display_path(root).rstrip(os.sep) + os.sep
    return shown[len(prefix):].replace(os.sep, "/") if shown.startswith(prefix) else shown


def exclusion_file(spec: str) -> Path:
    """Where the exclusion list for a dataset lives: <cache>/exclusions/<name>-<hash>.json."""
    key = dataset_key(spec)
    name = "demo" if spec == "demo" else re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).name)[:40] or "dataset"
    return settings.cache_dir() / EXCLUSIONS_FOLDER / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def default_exclusions(spec: str | None) -> str:
    """The exclusion list training should use for `spec` by default: its path, or ''."""
    if not spec:
        return ""
    try:
        path = exclusion_file(spec)
        return str(path) if path.is_file() else ""
    except (OSError, RuntimeError):
        return ""


def dataset_fingerprint(spec: str) -> str:
    """A cheap key that changes when files are added, removed or renamed: every folder's name,
    time and file names (no per-file stat: 35,000 of them take seconds). A csv: its size and time."""
    path = settings.demo_dir() if spec == "demo" else Path(spec).expanduser()
    digest = hashlib.sha256(dataset_key(spec).encode())
    try:
        if not path.is_dir():
            info = path.stat()
            digest.update(f"{info.st_size}\0{info.st_mtime_ns}".encode())
        # a label list names images in a folder: its changes count too (a csv holds its own pixels)
        walked = label_file_root(path) if path.is_file() and path.suffix.lower() == ".txt" else path
        for folder, folders, files in os.walk(walked):
            folders.sort()
            digest.update(f"{display_path(folder)}\0{os.stat(folder).st_mtime_ns}\0".encode())
            digest.update("\0".join(sorted(files)).encode("utf-8", "surrogateescape"))
    except OSError as exc:
        digest.update(str(exc).encode())
    return digest.hexdigest()[:24]


# ---- the search ----------------------------------------------------------------------

def examine_spec(spec: str, *, near_threshold: int = NEAR_THRESHOLD, blank_std: float = BLANK_STD,
                 cache_dir: Path | None = None) -> tuple[Dataset, DoctorReport]:
    """Load a dataset (as training would) and examine it."""
    _check_threshold(near_threshold)  # before the load, which can take minutes
    started = time.perf_counter()
    dataset = load_dataset(spec, cache_dir=cache_dir)
    loaded = time.perf_counter() - started
    report = examine(dataset, spec, near_threshold=near_threshold, blank_std=blank_std)
    report.seconds = {"load": round(loaded, 2), **report.seconds}
    return dataset, report


def examine(dataset: Dataset, spec: str, *, near_threshold: int = NEAR_THRESHOLD,
            blank_std: float = BLANK_STD) -> DoctorReport:
    """Find every kind of problem in an already loaded dataset (`spec` names it, for paths)."""
    _check_threshold(near_threshold)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    root = dataset_root(spec)
    paths = [relative_path(p, root) for p in dataset.paths]
    labels = dataset.labels.numpy()
    splits = list(dataset.given_split) if dataset.given_split is not None else [""] * len(paths)
    describe = _Describer(paths, labels, splits, dataset.classes)

    unreadable = [Group("unreadable", [p], dropped=[p], detail=bad["reason"])
                  for bad in dataset.bad_files for p in [relative_path(bad["path"], root)]]
    unreadable.sort(key=lambda g: path_order(g.paths[0]))

    deviation = np.empty(len(paths), dtype=np.float32)
    digests: list[bytes] = []
    for positions, block in pixel_blocks(dataset.images):
        flat = block.reshape(len(block), -1)
        deviation[positions] = flat.std(axis=1, dtype=np.float32)
        digests.extend(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat)
    is_blank = deviation < blank_std
    blank = [describe.group("blank", [i], dropped=[i] if splits[i] != "test" else [],
                            detail=f"pixel standard deviation {deviation[i]:.1f}")
             for i in sorted(np.flatnonzero(is_blank), key=lambda i: path_order(paths[i]))]
    lap("blank and digests")

    # exact: one content per distinct pixel array (blank images are left out of the search)
    order = sorted(np.flatnonzero(~is_blank).tolist(), key=lambda i: path_order(paths[i]))
    contents: dict[bytes, list[int]] = {}
    for i in order:
        contents.setdefault(digests[i], []).append(i)
    members = list(contents.values())  # each in path order; member[0] represents the content
    lap("exact")

    representatives = np.array([m[0] for m in members], dtype=np.int64)
    hashes = np.concatenate([np.empty(0, dtype=np.uint64)] + [
        perceptual_hashes(block) for _, block in pixel_blocks(dataset.images, representatives)])
    lap("phash")
    components = near_components(hashes, near_threshold)
    lap("near search")

    findings = _classify(members, components, describe)
    findings["unreadable"] = unreadable
    findings["blank"] = blank
    counts = dataset.class_counts()
    ratio, warning = imbalance(counts)
    split_counts = {}
    if dataset.given_split is not None:
        for part in ("train", "test"):
            mask = np.array([s == part for s in splits])
            split_counts[part] = {c: int(((labels == k) & mask).sum()) for k, c in enumerate(dataset.classes)}
    lap("groups")
    return DoctorReport(spec=spec, dataset_path=dataset_key(spec), num_images=len(paths),
                        classes=list(dataset.classes), has_given_split=dataset.given_split is not None,
                        near_threshold=near_threshold, blank_std=blank_std,
                        findings={kind: findings[kind] for kind in KINDS if kind != "imbalance"},
                        class_counts=counts, split_class_counts=split_counts, imbalance_ratio=ratio,
                        imbalance=warning, seconds=seconds)


def _check_threshold(near_threshold: int) -> None:
    if not 0 <= near_threshold <= MAX_NEAR_THRESHOLD:
        raise DataError(f"the near-duplicate threshold must be 0 to {MAX_NEAR_THRESHOLD} bits (got {near_threshold})")


class _Describer:
    """Builds Groups from dataset positions: paths, labels and splits in path order."""

    def __init__(self, paths: list[str], labels: np.ndarray, splits: list[str], classes: list[str]):
        self.paths, self.labels, self.splits, self.classes = paths, labels, splits, classes

    def group(self, kind: str, indices: list[int], *, dropped: list[int], match: str = "",
              detail: str = "") -> Group:
        indices = sorted(indices, key=lambda i: path_order(self.paths[i]))
        return Group(kind, [self.paths[i] for i in indices], [int(i) for i in indices],
                     [self.classes[self.labels[i]] for i in indices], [self.splits[i] for i in indices],
                     sorted((self.paths[i] for i in dropped), key=path_order), match, detail)


def _classify(members: list[list[int]], near: np.ndarray, describe: _Describer) -> dict[str, list[Group]]:
    """Report each group of contents linked by near pairs (`near`: each content's component) once."""
    components: dict[int, list[int]] = {}
    for content, component in enumerate(near.tolist()):
        components.setdefault(component, []).append(content)

    findings: dict[str, list[Group]] = {"exact_duplicate": [], "near_duplicate": [], "leak": [], "conflict": []}
    for contents in components.values():
        images = [i for c in contents for i in members[c]]
        if len(images) < 2:
            continue
        labels = {int(describe.labels[i]) for i in images}
        splits = {describe.splits[i] for i in images}
        if len(labels) > 1:
            exact = any(len({int(describe.labels[i]) for i in members[c]}) > 1 for c in contents)
            findings["conflict"].append(describe.group(
                "conflict", images, dropped=[i for i in images if describe.splits[i] != "test"],
                match="exact" if exact else "near"))
        elif {"train", "test"} <= splits:
            exact = any({describe.splits[i] for i in members[c]} >= {"train", "test"} for c in contents)
            train = [i for i in images if describe.splits[i] == "train"]
            findings["leak"].append(describe.group("leak", images, dropped=train, match="exact" if exact else "near"))
        else:
            in_test = splits == {"test"}  # the test split is never reduced for duplication
            for c in contents:
                if len(members[c]) > 1:
                    findings["exact_duplicate"].append(describe.group(
                        "exact_duplicate", members[c], dropped=[] if in_test else members[c][1:], match="exact"))
            if len(contents) > 1:
                firsts = sorted((members[c][0] for c in contents), key=lambda i: path_order(describe.paths[i]))
                findings["near_duplicate"].append(describe.group(
                    "near_duplicate", firsts, dropped=[] if in_test else firsts[1:], match="near"))
    for groups in findings.values():
        groups.sort(key=lambda g: path_order(g.paths[0]))
    return findings


def imbalance(counts: dict[str, int]) -> tuple[float | None, str | None]:
    """(largest / smallest class, a warning in words above IMBALANCE_RATIO, else None)."""
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[smallest] == 0:
        return None, f"class {smallest} has no images"
    ratio = counts[largest] / counts[smallest]
    if ratio <= IMBALANCE_RATIO:
        return round(ratio, 2), None
    return round(ratio, 2), (f"{largest} has {ratio:.1f} times as many images as {smallest} "
                             f"({counts[largest]:,} vs {counts[smallest]:,}): the model will rarely predict "
                             f"{smallest}; consider class weights or more {smallest} images")


def pixel_blocks(images: torch.Tensor | ImageArray, positions: np.ndarray | None = None, *,
                 block: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The images at `positions` (default: all, in order) as (positions, uint8 pixels) pairs of
    at most `block` (default PIXEL_BLOCK) images, so that only one block is held at a time."""
    block = block or PIXEL_BLOCK
    if positions is None:
        for start in range(0, len(images), block):
            yield np.arange(start, min(start + block, len(images))), images[start:start + block].numpy()
        return
    for start in range(0, len(positions), block):
        chunk = positions[start:start + block]
        yield chunk, images[chunk].numpy()


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """imagehash.phash of each 48x48 grey image, as 64-bit integers (bit 63 = the first DCT bit)."""
    import imagehash
    from PIL import Image

    packed = np.empty(len(images), dtype=np.uint64)
    for n, pixels in enumerate(images):
        bits = imagehash.phash(Image.fromarray(pixels)).hash.ravel()
        packed[n] = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return packed


def near_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Every pair (i < j) of 64-bit hashes at most `threshold` bits apart, as an (n, 2) array.
    It holds them all: the doctor itself uses `near_components`, which does not."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    return np.unique(np.concatenate([np.empty((0, 2), dtype=np.int64), *_near_pair_blocks(hashes, threshold)]),
                     axis=0)


def near_components(hashes: np.ndarray, threshold: int, *, merge_every: int = 1 << 22) -> np.ndarray:
    """Each hash's near-duplicate component, named by its smallest index: hashes linked by a
    chain of pairs at most `threshold` bits apart share it.

    The pairs are merged into the components as they are found, `merge_every` new links at a
    time (scipy's connected components), and never held together: on 400,000 synthetic
    gradients, which phash finds much alike, they come to about a hundred million (at a
    4,000-image sample's rate), and holding them took the doctor past 13 GB."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    components = np.arange(count)
    pending: list[np.ndarray] = []
    waiting = 0

    def merge() -> np.ndarray:
        links = np.concatenate(pending)
        rows = np.concatenate([np.arange(count), links[:, 0]])  # each hash to its component's name,
        cols = np.concatenate([components, links[:, 1]])        # and the names the new pairs link
        graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(count, count))
        _, found = connected_components(graph, directed=False)
        smallest = np.full(found.max() + 1, count)
        np.minimum.at(smallest, found, np.arange(count))
        return smallest[found]

    for block in _near_pair_blocks(hashes, threshold):
        first, second = components[block[:, 0]], components[block[:, 1]]
        new = first != second  # a pair inside one component adds nothing
        if new.any():
            pending.append(np.stack([first[new], second[new]], axis=1))
            waiting += int(new.sum())
            if waiting >= merge_every:
                components, pending, waiting = merge(), [], 0
    return merge() if pending else components


def _near_pair_blocks(hashes: np.ndarray, threshold: int) -> Iterator[np.ndarray]:
    """The pairs (i < j) within `threshold` bits, in (k, 2) blocks of bounded size; a pair comes
    once for each part its two hashes share.

    Multi-index hashing: the 64 bits are cut into threshold+1 parts, so two hashes within
    `threshold` bits agree exactly on at least one part (pigeonhole). Only hashes sharing a
    part's value are compared, with a vectorised popcount."""
    if len(hashes) < 2:
        return
    bounds = np.linspace(0, HASH_BITS, threshold + 2).astype(int)
    for low, high in zip(bounds[:-1], bounds[1:]):
        keys = (hashes >> np.uint64(HASH_BITS - high)) & np.uint64((1 << int(high - low)) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        large = sizes > SMALL_BUCKET
        for start, size in zip(starts[large], sizes[large]):  # a large bucket: blocks of popcounts
            yield from _close_pairs(np.sort(order[start:start + size]), hashes, threshold)
        # the many small buckets at once: compare each hash with the one m places on in key order
        small = np.repeat(sizes <= SMALL_BUCKET, sizes)
        largest_small = int(sizes[sizes <= SMALL_BUCKET].max(initial=1))
        for shift in range(1, largest_small):
            same = (sorted_keys[shift:] == sorted_keys[:-shift]) & small[shift:]
            first, second = order[:-shift][same], order[shift:][same]
            close = np.bitwise_count(hashes[first] ^ hashes[second]) <= threshold
            yield np.sort(np.stack([first[close], second[close]], axis=1), axis=1)


def _close_pairs(bucket: np.ndarray, hashes: np.ndarray, threshold: int,
                 cells: int = 1 << 24) -> Iterator[np.ndarray]:
    """Pairs within `threshold` bits among the (sorted) indices of one bucket, a block of rows at
    a time: at most `cells` popcounts (and so pairs) per block, however large the bucket."""
    values = hashes[bucket]
    rows = max(1, cells // len(bucket))
    for start in range(0, len(bucket), rows):
        block = np.bitwise_count(values[start:start + rows, None] ^ values[None, :])
        a, b = np.nonzero(block <= threshold)
        a += start
        keep = a < b
        yield np.stack([bucket[a[keep]], bucket[b[keep]]], axis=1)


# ---- exclusion lists -----------------------------------------------------------------

def exclusion_payload(report: DoctorReport) -> dict[str, Any]:
    """The exclusion list for a report: every path left out, and per finding which copy was
    kept and why."""
    findings = {}
    for kind, groups in report.findings.items():
        findings[kind] = {"rule": EXCLUSION_RULES[kind], "groups": [
            {"kept": g.kept, "left_out": g.dropped, **({"match": g.match} if g.match else {}),
             **({"detail": g.detail} if g.detail else {})} for g in groups]}
    excluded = report.excluded()
    return {"format": EXCLUSIONS_FORMAT, "made_by": "fer_core.doctor",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": report.spec, "dataset_path": report.dataset_path, "thresholds": report.thresholds(),
            "num_images": report.num_images, "num_excluded": len(excluded),
            "paths": list(excluded), "reasons": excluded, "findings": findings}


def write_exclusions(report: DoctorReport) -> Path:
    """Write the report's exclusion list into the cache folder (atomically); return its path.
    The dataset's own files are never touched."""
    path = exclusion_file(report.spec)
    runs.atomic_write_json(path, exclusion_payload(report))
    return path


def remove_exclusions(spec: str) -> bool:
    """Forget a dataset's exclusion list (training then uses every image again)."""
    path = exclusion_file(spec)
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def read_exclusions(path: Path | str) -> dict[str, Any]:
    """An exclusion list written by `write_exclusions`, or a DataError saying why not."""
    path = Path(path).expanduser()
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"exclusion list not found: {display_path(path)}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"exclusion list {display_path(path)} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != EXCLUSIONS_FORMAT:
        raise DataError(f"{display_path(path)} is not an exclusion list of this version")
    listed = payload.get("paths")
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise DataError(f"{display_path(path)} is not an exclusion list: 'paths' must be a list of paths")
    return payload


def excluded_mask(dataset: Dataset, spec: str, exclusions: dict[str, Any]) -> np.ndarray:
    """True for every image of `dataset` that the exclusion list leaves out. A list made for
    another dataset is refused."""
    made_for = exclusions.get("dataset_path")
    if made_for and made_for != dataset_key(spec):
        raise DataError(f"the exclusion list was made for {made_for}, not for {dataset_key(spec)}")
    listed = set(exclusions["paths"])
    root = dataset_root(spec)
    return np.array([relative_path(p, root) in listed for p in dataset.paths], dtype=bool)


def exclusion_summary(path: Path | str) -> tuple[int, str | None]:
    """(how many decoded images a list leaves out, None), or (0, why it cannot be used).
    Unreadable files are listed too, but they never were images training could use."""
    try:
        payload = read_exclusions(path)
    except DataError as exc:
        return 0, str(exc)
    reasons = payload.get("reasons") if isinstance(payload.get("reasons"), dict) else {}
    return sum(reasons.get(p) != ["unreadable"] for p in payload["paths"]), None
