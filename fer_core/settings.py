"""The folders fer_core works in, read from the environment: one answer for the app and the CLI.

| setting          | environment variable   | default                         |
|------------------|------------------------|---------------------------------|
| runs             | FER_RUNS_DIR           | runs/ (in the working directory) |
| checkpoints      | FER_CHECKPOINTS_DIR    | checkpoints/ (working directory) |
| datasets         | FER_DATA_HOME          | <project>/data                  |
| demo dataset     | FER_DEMO_DIR           | <project>/data/demo             |
| decoded cache    | FER_CACHE_DIR          | ~/.cache/fer_core               |
| sweeps           | FER_SWEEPS_DIR         | sweeps/ beside the runs folder  |

Each function reads the environment when called, so a test (or the app's folder settings)
that changes a variable is seen at once.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RUNS_DIR_ENV = "FER_RUNS_DIR"
CHECKPOINTS_DIR_ENV = "FER_CHECKPOINTS_DIR"
DATA_HOME_ENV = "FER_DATA_HOME"
DEMO_DIR_ENV = "FER_DEMO_DIR"
CACHE_DIR_ENV = "FER_CACHE_DIR"
SWEEPS_DIR_ENV = "FER_SWEEPS_DIR"


def _from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else default


def runs_dir() -> Path:
    """Where run folders are written and listed."""
    return _from_env(RUNS_DIR_ENV, Path("runs"))


def checkpoints_dir() -> Path:
    """Where the best model of each finished run is published."""
    return _from_env(CHECKPOINTS_DIR_ENV, Path("checkpoints"))


def data_home() -> Path:
    """Where downloaded datasets go (and are discovered)."""
    return _from_env(DATA_HOME_ENV, PROJECT_ROOT / "data")


def demo_dir() -> Path:
    """Where the built-in synthetic demo dataset is generated."""
    return _from_env(DEMO_DIR_ENV, PROJECT_ROOT / "data" / "demo")


def cache_dir() -> Path:
    """Where decoded datasets (`store`), exclusion lists and measured speeds are kept."""
    return _from_env(CACHE_DIR_ENV, Path.home() / ".cache" / "fer_core")


def sweeps_dir(runs_folder: Path | None = None) -> Path:
    """Where hyper-parameter sweeps keep their studies: a sweeps/ folder beside the runs folder
    (`runs_folder`, default runs_dir()), so a sweep's trials and its study travel together."""
    return _from_env(SWEEPS_DIR_ENV, Path(runs_folder or runs_dir()).expanduser().absolute().parent / "sweeps")
