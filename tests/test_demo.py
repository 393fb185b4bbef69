"""The built-in synthetic demo dataset: layout, determinism, caching, atomicity, class signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fer_core
from fer_core import CLASS_NAMES, demo, settings
from fer_core.errors import DataError


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every PNG under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(root: Path, name: str) -> np.ndarray:
    """(N, 48, 48) float images of one class, each standardised so lighting does not dominate."""
    stack = np.stack([np.asarray(Image.open(p), dtype=np.float64)
                      for p in sorted((root / name).glob("*.png"))])
    mean = stack.mean(axis=(1, 2), keepdims=True)
    std = stack.std(axis=(1, 2), keepdims=True)
    return (stack - mean) / std


def test_layout_size_mode_and_marker(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    assert demo.generate_demo_dataset(dest, per_class=3, seed=5) == dest

    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(CLASS_NAMES)
    for name in CLASS_NAMES:
        files = sorted(p.name for p in (dest / name).iterdir())
        assert files == [f"{name}_{i:04d}.png" for i in range(3)]
        for f in files:
            with Image.open(dest / name / f) as img:
                assert img.format == "PNG"
                assert img.mode == "L"
                assert img.size == (48, 48)

    marker = json.loads((dest / demo.MARKER_NAME).read_text())
    assert marker["synthetic"] is True
    assert marker["description"]
    assert (marker["per_class"], marker["seed"], marker["version"]) == (3, 5, demo.DEMO_VERSION)
    # The temporary build folder was renamed away, not left beside the dataset.
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = _files(demo.generate_demo_dataset(tmp_path / "a", per_class=2, seed=0))
    b = _files(demo.generate_demo_dataset(tmp_path / "b", per_class=2, seed=0))
    c = _files(demo.generate_demo_dataset(tmp_path / "c", per_class=2, seed=1))
    assert len(a) == 14
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_images_do_not_depend_on_per_class(tmp_path: Path) -> None:
    small = _files(demo.generate_demo_dataset(tmp_path / "small", per_class=2, seed=3))
    large = _files(demo.generate_demo_dataset(tmp_path / "large", per_class=4, seed=3))
    assert len(large) == 28
    assert all(large[k] == v for k, v in small.items())


def test_second_call_with_same_arguments_is_a_no_op(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    demo.generate_demo_dataset(dest, per_class=2, seed=0)
    probe = dest / "happy" / "happy_0000.png"
    marker = dest / demo.MARKER_NAME
    before = (probe.stat().st_mtime_ns, probe.stat().st_ino, marker.stat().st_mtime_ns)

    assert demo.generate_demo_dataset(dest, per_class=2, seed=0) == dest
    after = (probe.stat().st_mtime_ns, probe.stat().st_ino, marker.stat().st_mtime_ns)
    assert after == before


def test_different_arguments_replace_an_older_demo(tmp_path: Path) -> None:
    dest = tmp_path / "demo"
    demo.generate_demo_dataset(dest, per_class=3, seed=0)
    demo.generate_demo_dataset(dest, per_class=2, seed=1)
    assert len(_files(dest)) == 14
    assert json.loads((dest / demo.MARKER_NAME).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(DataError):
        demo.generate_demo_dataset(dest, per_class=1)
    assert (dest / "photo.jpg").read_bytes() == b"precious"


def test_interrupted_generation_leaves_nothing_behind(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = demo.render_face

    def failing(*args: object) -> Image.Image:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(demo, "render_face", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.generate_demo_dataset(tmp_path / "demo", per_class=2)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path / "d", per_class=0)
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path / "d", seed=-1)


def test_default_location_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.DEMO_DIR_ENV, raising=False)
    repo_root = Path(fer_core.__file__).resolve().parent.parent
    assert demo.demo_dataset_dir() == repo_root / "data" / "demo"

    monkeypatch.setenv(settings.DEMO_DIR_ENV, str(tmp_path / "elsewhere"))
    assert demo.demo_dataset_dir() == tmp_path / "elsewhere"
    assert demo.ensure_demo_dataset(per_class=1) == tmp_path / "elsewhere"
    assert len(_files(tmp_path / "elsewhere")) == len(CLASS_NAMES)


def test_classes_differ_where_the_expression_is(tmp_path: Path) -> None:
    root = demo.generate_demo_dataset(tmp_path / "demo", per_class=100, seed=0)
    happy, sad = _load(root, "happy"), _load(root, "sad")
    mouth = (slice(28, 44), slice(10, 38))

    def gap(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.linalg.norm((x.mean(axis=0) - y.mean(axis=0))[mouth]))

    # Compare equal-sized halves, so sampling noise is the same on both sides.
    between = gap(happy[::2], sad[::2])
    within = max(gap(happy[::2], happy[1::2]), gap(sad[::2], sad[1::2]))
    assert between > 1.3 * within

    # Held out: the happy-minus-sad template from one half separates the other half.
    template = (happy[::2].mean(axis=0) - sad[::2].mean(axis=0))[mouth]
    happy_scores = (happy[1::2][:, mouth[0], mouth[1]] * template).sum(axis=(1, 2))
    sad_scores = (sad[1::2][:, mouth[0], mouth[1]] * template).sum(axis=(1, 2))
    auc = float((happy_scores[:, None] > sad_scores[None, :]).mean())
    assert auc > 0.7
