"""Housekeeping on run directories: delete or archive a finished run.

A run that is queued or running is refused: its process (or the queue) still owns the folder.
Archived runs move to <runs_dir>/.archive/<same relative path>, which list_runs does not read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import runs
from .errors import FerError

ARCHIVE_DIR = ".archive"
BUSY_STATES = ("queued", "running")


class RunBusyError(FerError):
    """The run is queued or running and must be cancelled first."""


def _checked(run_dir: Path, runs_dir: Path) -> tuple[Path, Path]:
    """The run folder itself (never a timestamp or experiment folder above it), finished."""
    run_dir, runs_dir = Path(run_dir).resolve(), Path(runs_dir).resolve()
    if runs_dir not in run_dir.parents:
        raise FerError(f"{run_dir} is not inside the runs folder {runs_dir}")
    if not run_dir.is_dir():
        raise FerError(f"run not found: {run_dir}")
    layout = runs.RunLayout.of(run_dir)
    if layout.runs_dir != runs_dir:
        raise FerError(f"{run_dir} is not a run folder of {runs_dir}")
    state = runs.load_run(layout).state
    if state in BUSY_STATES:
        raise RunBusyError(f"run {layout.id} is {state}; cancel it before removing it")
    return run_dir, runs_dir


def _published_checkpoint(run_dir: Path) -> Path | None:
    """The run's published best model, which goes with the run so that it is no longer offered
    for prediction. Withdrawn only once the run is moved or deleted: a failed removal keeps it."""
    status, _ = runs.run_status(run_dir)
    if status.published_checkpoint:
        published = Path(status.published_checkpoint)
        if published.name == runs.RunLayout(run_dir).published_checkpoint(published.parent).name:
            return published
    return None


def _prune_empty_parents(path: Path, stop: Path) -> None:
    """Remove now-empty <timestamp>/<experiment>/resnet18 folders above a removed run."""
    for parent in path.parents:
        if parent == stop or stop not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def delete_run(run_dir: Path, runs_dir: Path) -> None:
    """Delete a finished run's folder and its published checkpoint for good."""
    run_dir, runs_dir = _checked(run_dir, runs_dir)
    published = _published_checkpoint(run_dir)
    shutil.rmtree(run_dir)
    if published is not None:
        published.unlink(missing_ok=True)
    _prune_empty_parents(run_dir, runs_dir)


def archive_run(run_dir: Path, runs_dir: Path) -> Path:
    """Move a finished run under <runs_dir>/.archive/ and return its new folder; its published
    checkpoint is removed (the archived folder keeps best.pt)."""
    run_dir, runs_dir = _checked(run_dir, runs_dir)
    published = _published_checkpoint(run_dir)  # its best.pt stays in the archived folder
    target = runs_dir / ARCHIVE_DIR / run_dir.relative_to(runs_dir)
    candidate, attempt = target, 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}-{attempt}")
        attempt += 1
    candidate.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(candidate))
    if published is not None:
        published.unlink(missing_ok=True)
    _prune_empty_parents(run_dir, runs_dir)
    return candidate


def archived_run_dirs(runs_dir: Path) -> list[Path]:
    """Runs moved to the archive, newest first."""
    archive = Path(runs_dir) / ARCHIVE_DIR
    return sorted({p.parent for p in archive.rglob(runs.CONFIG_FILE)}, key=str, reverse=True)
