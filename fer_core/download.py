"""Download a FER dataset from Kaggle with the official `kaggle` package.

kaggle prints an authentication banner on import and calls sys.exit when credentials are
missing, so credentials are checked first and the package is imported only when needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from . import settings
from .errors import FerError
from .runs import atomic_write_text

DEFAULT_DATASET = "msambare/fer2013"
CREDENTIALS_HELP = ("Kaggle credentials not found. Either create an API token at "
                    "https://www.kaggle.com/settings (API -> Create New Token) and save it as "
                    "~/.kaggle/access_token (or the legacy ~/.kaggle/kaggle.json), or set the "
                    "environment variable KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY); "
                    "KAGGLE_CONFIG_DIR points to another folder holding kaggle.json.")


def default_data_home() -> Path:
    return settings.data_home()


def find_credentials() -> str | None:
    """Where the kaggle package will find credentials, in its own order, or None: the
    KAGGLE_API_TOKEN or KAGGLE_USERNAME/KAGGLE_KEY variables, an access token in ~/.kaggle (the
    only folder kagglesdk reads it from), then kaggle.json in kaggle's config folder."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    for name in ("access_token", "access_token.txt"):
        token = Path.home() / ".kaggle" / name
        if token.is_file():
            return str(token)
    legacy = kaggle_config_dir() / "kaggle.json"
    return str(legacy) if legacy.is_file() else None


def kaggle_config_dir() -> Path:
    """kaggle's folder for kaggle.json: $KAGGLE_CONFIG_DIR, else ~/.kaggle, else (on Linux, when
    ~/.kaggle does not exist) $XDG_CONFIG_HOME/kaggle or ~/.config/kaggle."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser()
    folder = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not folder.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return folder


def dataset_dest(slug: str, dest: Path | None = None) -> Path:
    return Path(dest) if dest else default_data_home() / slug.replace("/", "__")


def is_downloaded(folder: Path) -> bool:
    return (folder / ".download-complete").is_file()


def download_dataset(slug: str = DEFAULT_DATASET, dest: Path | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """Download and unzip `slug` into dest; return the folder. A finished download is reused."""
    if "/" not in slug or slug.count("/") != 1:
        raise FerError(f"a Kaggle dataset is named owner/name, e.g. {DEFAULT_DATASET} (got {slug!r})")
    folder = dataset_dest(slug, dest)
    if is_downloaded(folder):
        log(f"already downloaded: {folder}")
        return folder
    if find_credentials() is None:
        raise FerError(CREDENTIALS_HELP)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # silence kaggle's import-time banner
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit as exc:  # kaggle exits instead of raising on bad credentials
        raise FerError(f"Kaggle rejected the credentials. {CREDENTIALS_HELP}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {slug} into {folder} ...")
    try:
        api.dataset_download_files(slug, path=str(folder), unzip=True, quiet=False)
    except SystemExit as exc:
        raise FerError(f"Kaggle download of {slug} failed (exit {exc.code})") from exc
    except Exception as exc:
        raise FerError(f"Kaggle download of {slug} failed: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''} (no network?)") from exc
    atomic_write_text(folder / ".download-complete", slug + "\n")
    log(f"done: {folder}")
    return folder
