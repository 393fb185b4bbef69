"""The models a user can predict with: one entry per model, with its scores and tags, and a
default chosen for a reason that can be said in one sentence.

A completed run's model is its published checkpoint (checkpoints/<run>.pt); a run without one
(still training, cancelled, failed) offers its best.pt so far. A checkpoint in the checkpoints
folder that no run claims (its run was deleted or it was copied in) is listed once, as such.
Pure file reading: no torch, no Streamlit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import runs

# Tiers, best first: the default is the first entry of the best tier there is.
REAL_COMPLETED, REAL_UNFINISHED, UNRECORDED, SYNTHETIC, ACTIVE = range(5)


@dataclass(frozen=True)
class ModelEntry:
    """One model: its checkpoint file and what is known about it."""

    path: Path
    name: str                          # the run id, or the file name when no run claims it
    run: runs.RunInfo | None = None
    state: str | None = None           # the run's state; None without a run
    test_accuracy: float | None = None
    macro_f1: float | None = None
    synthetic: bool = False
    tags: tuple[str, ...] = field(default=())
    mtime: float = 0.0
    tier: int = UNRECORDED

    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def label(self) -> str:
        """'2030-01-01_00-00-00/tinyexp/finetune · test 68.3% · macro-F1 64.6% · SYNTHETIC'."""
        parts = [self.name]
        if self.test_accuracy is not None:
            parts.append(f"test {self.test_accuracy:.1%}")
        if self.macro_f1 is not None:
            parts.append(f"macro-F1 {self.macro_f1:.1%}")
        return " · ".join(parts + list(self.tags))


@dataclass(frozen=True)
class ModelCatalog:
    """Every model, the default first; `reason` says why the default was chosen."""

    entries: list[ModelEntry]
    reason: str = ""

    @property
    def default(self) -> ModelEntry | None:
        return self.entries[0] if self.entries else None

    def get(self, key: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.key == key), None)


def _is_synthetic(run: runs.RunInfo) -> bool:
    flag = run.config.get("synthetic_data")
    if flag is None and run.evaluation:
        flag = run.evaluation.get("synthetic")
    if flag is None:  # no environment.json yet (queued, or the trainer just started)
        flag = run.config.get("data") == "demo"
    return bool(flag)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _run_entry(run: runs.RunInfo, checkpoints_dir: Path) -> ModelEntry | None:
    """The run's model: its published checkpoint, else its best.pt so far; None without either."""
    candidates = []
    if run.status.published_checkpoint:
        candidates.append(Path(run.status.published_checkpoint))
    candidates.append(run.layout.published_checkpoint(checkpoints_dir))
    published = next((p for p in candidates if p.is_file()), None)
    path = published or (run.best_checkpoint if run.best_checkpoint.is_file() else None)
    if path is None:
        return None
    state = run.state
    synthetic = _is_synthetic(run)
    tags = []
    if synthetic:
        tags.append("SYNTHETIC")
    if state == "completed":
        tier = SYNTHETIC if synthetic else REAL_COMPLETED
    elif state in ("running", "queued"):
        tier = ACTIVE
        tags.append(f"{state}: unfinished best.pt")
    else:
        tier = SYNTHETIC if synthetic else REAL_UNFINISHED
        tags.append(f"{state}: best.pt, not tested" if run.test_accuracy is None else state)
    return ModelEntry(path=path, name=run.id, run=run, state=state, test_accuracy=run.test_accuracy,
                      macro_f1=run.macro_f1, synthetic=synthetic, tags=tuple(tags),
                      mtime=_mtime(path), tier=tier)


def list_models(runs_dir: Path, checkpoints_dir: Path) -> ModelCatalog:
    """Every model found in the runs folder and the checkpoints folder, one entry each, the
    default first (then by tier, test accuracy, newest)."""
    found = runs.list_runs(Path(runs_dir))
    entries = [e for run in found if (e := _run_entry(run, Path(checkpoints_dir))) is not None]
    claimed = {e.path.resolve() for e in entries} | {
        run.layout.published_checkpoint(Path(checkpoints_dir)).resolve() for run in found}
    folder = Path(checkpoints_dir)
    if folder.is_dir():
        for path in sorted(folder.glob("*.pt")):
            if path.is_file() and path.resolve() not in claimed:
                entries.append(ModelEntry(path=path, name=path.name, tags=("no run record",),
                                          mtime=_mtime(path), tier=UNRECORDED))
    entries.sort(key=lambda e: (e.tier, -(e.test_accuracy if e.test_accuracy is not None else -1.0),
                                -e.mtime, e.key))
    return ModelCatalog(entries, _reason(entries[0]) if entries else "")


def _reason(entry: ModelEntry) -> str:
    """Why `entry` is the default, in one sentence."""
    accuracy = (f" ({entry.test_accuracy:.1%} test accuracy)" if entry.test_accuracy is not None
                else " (not tested yet)")
    if entry.tier == REAL_COMPLETED:
        return f"Chosen: the best completed model on real data{accuracy}."
    if entry.tier == REAL_UNFINISHED:
        return (f"Chosen: no completed model on real data yet; this is the best checkpoint of a "
                f"{entry.state} run{accuracy}.")
    if entry.tier == UNRECORDED:
        return ("Chosen: no run in the runs folder has a finished model; this checkpoint file has "
                "no run record, so its scores are unknown.")
    if entry.tier == SYNTHETIC:
        return (f"Chosen: only models trained on the synthetic demo are available{accuracy}; "
                "their readings of real photographs mean little.")
    return ("Chosen: the only model is from a run still in progress: its best checkpoint so far, "
            "not finished or tested.")

