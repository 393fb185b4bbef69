"""Checkpoints uploaded through the app: stored under canonical names, at most a few kept.

Each upload gets its own freshly generated folder; the file in it is always `<safe stem>.pt`,
whatever the browser called it (`x.PT`, `..pt`, a name with spaces or 300 characters), so
the checkpoint loader's messages still name something the user recognises. The clean-up
counts upload folders, not file names, so no name can slip past the cap.
"""

from __future__ import annotations

import re
import shutil
import uuid
from contextlib import suppress
from pathlib import Path

from .runs import atomic_write_bytes

KEEP_UPLOADED_CHECKPOINTS = 4
UPLOADS_FOLDER = "uploaded_checkpoints"
MAX_STEM_CHARS = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def checkpoint_file_name(uploaded_name: str) -> str:
    """A safe file name for an upload: ASCII letters, digits, `_.-`, ending in exactly `.pt`."""
    base = uploaded_name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = _UNSAFE.sub("_", base)
    if stem.lower().endswith(".pt"):
        stem = stem[:-3]
    stem = stem.strip("._-")[:MAX_STEM_CHARS].rstrip("._-")
    return f"{stem or 'checkpoint'}.pt"


def store_uploaded_checkpoint(data: bytes, uploaded_name: str, folder: Path,
                              keep: int = KEEP_UPLOADED_CHECKPOINTS) -> Path:
    """Write an upload to `folder/<new id>/<canonical name>` and keep only the newest `keep`."""
    entry = folder / uuid.uuid4().hex
    path = entry / checkpoint_file_name(uploaded_name)
    atomic_write_bytes(path, data)
    prune_uploads(folder, keep, newest=entry)
    return path


def prune_uploads(folder: Path, keep: int = KEEP_UPLOADED_CHECKPOINTS,
                  newest: Path | None = None) -> None:
    """Delete all but `keep` entries of `folder` (`newest` and then the most recently changed).

    Every entry counts, folder or file, whatever it is called: uploads stored by older
    versions under their own names are cleaned up too.
    """
    entries: list[tuple[float, Path]] = []
    with suppress(OSError):
        for entry in folder.iterdir():
            with suppress(OSError):
                mtime = float("inf") if entry == newest else entry.lstat().st_mtime
                entries.append((mtime, entry))
    entries.sort(key=lambda item: item[0], reverse=True)
    for _mtime, stale in entries[max(keep, 1):]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with suppress(OSError):
                stale.unlink()
