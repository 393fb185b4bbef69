"""Shared fixtures: tiny generated datasets and one tiny trained run per session.

Nothing here touches the network; every path lives under pytest's tmp folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("FER_TEST", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep caches and the default demo folder out of the user's home and the repo."""
    root = tmp_path_factory.mktemp("fer_home")
    os.environ["FER_CACHE_DIR"] = str(root / "cache")
    os.environ["FER_DEMO_DIR"] = str(root / "demo_default")
    os.environ["FER_DATA_HOME"] = str(root / "data")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset: 7 classes x 12 images of 48x48 grey PNGs."""
    from fer_core.demo import generate_demo_dataset
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "tiny", per_class=12, seed=0)


def write_class_folders(root: Path, counts: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    """Random-noise images in class folders (fast; content does not matter for data tests)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{name}_{i:03d}.png")
    return root


def tiny_config(data: Path | str, tmp_path: Path, **overrides):
    from fer_core.config import TrainConfig
    values = dict(data=str(data), epochs=2, img_size=32, batch_size=16, val_fraction=0.2,
                  pretrained=False, runs_dir=str(tmp_path / "runs"),
                  checkpoints_dir=str(tmp_path / "published"), num_threads=2, lr=2e-3)
    values.update(overrides)
    return TrainConfig(**values).validate()


@pytest.fixture(scope="session")
def trained_run(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch run, shared read-only by the tests that inspect a run directory."""
    from fer_core.train import fit
    return fit(tiny_config(tiny_demo, tmp_path_factory.mktemp("trained")))
