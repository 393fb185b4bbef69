"""The run directory: its layout, atomic writes, and reading runs back.

<runs_dir>/<YYYY-MM-DD_HH-MM-SS>/<experiment>/resnet18/<mode>/
    config.json  status.json  metrics.jsonl  split.csv  data_report.json  train.log
    events.out.tfevents.*  checkpoints/{best,last}.pt  evaluation.json  predictions.csv
This directory is the single source of truth: the CLI writes it, the app only reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import FerError

MODEL_NAME = "resnet18"
STATES = ("queued", "running", "completed", "failed", "cancelled")
FINAL_STATES = ("completed", "failed", "cancelled")

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
SPLIT_FILE = "split.csv"
DATA_REPORT_FILE = "data_report.json"
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
LOG_FILE = "train.log"
CANCEL_FILE = "cancel"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """Atomic save for writers that want a path (e.g. torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `lock_file`, across threads and processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (hard link, then rename over the target); a
    later os.replace of `source` leaves `target` untouched. Copies where links are unsupported."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def new_run_dir(runs_dir: Path, experiment: str, mode: str, now: datetime | None = None) -> Path:
    """Create a fresh run directory; a clash within the same second gets a numeric suffix."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}-{attempt}"
        path = Path(runs_dir) / name / experiment / MODEL_NAME / mode
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise FerError(f"cannot create a run directory under {runs_dir}: {exc.strerror or exc}") from exc
    raise RuntimeError(f"could not create a run directory under {runs_dir}")


def run_id(run_dir: Path) -> str:
    """A short, unique, human-readable id: '<timestamp>/<experiment>/<mode>'."""
    parts = Path(run_dir).parts
    return "/".join((parts[-4], parts[-3], parts[-1])) if len(parts) >= 4 else str(run_dir)


# ---- status ---------------------------------------------------------------------------

def write_status(run_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into status.json and set the state, atomically."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    path = Path(run_dir) / STATUS_FILE
    status = _read_json_or_empty(path)
    status.update(fields)
    status["state"] = state
    status["updated_at"] = time.time()
    atomic_write_json(path, status)
    return status


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = read_json(path)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int | None) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective_state(status: dict[str, Any]) -> str:
    """The state to show: a 'running' run whose process is gone has failed."""
    state = status.get("state", "failed")
    if state == "running" and not pid_alive(status.get("pid")):
        return "failed"
    return state


# ---- metrics --------------------------------------------------------------------------

def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one epoch as one JSON line; flushed and fsynced so a kill loses at most it."""
    with open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Return (rows, number of unreadable lines). A torn last line is skipped, not fatal."""
    path = Path(run_dir) / METRICS_FILE
    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return rows, 0
    for line in lines:
        if not line.strip():
            continue
        with suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
                continue
        bad += 1  # not JSON, or not an object
    return rows, bad


def rewrite_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with exactly these rows (used on resume to drop lost epochs)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write_text(Path(run_dir) / METRICS_FILE, text)


# ---- reading runs back ----------------------------------------------------------------

@dataclass
class RunInfo:
    """Everything the UI shows about one run, read from its directory."""

    path: Path
    id: str
    config: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    state: str = "failed"
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    @property
    def best_checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR / BEST_CHECKPOINT

    @property
    def last_checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR / LAST_CHECKPOINT

    @property
    def best_val_acc(self) -> float | None:
        values = [m["val_acc"] for m in self.metrics if m.get("val_acc") is not None]
        return max(values) if values else None

    @property
    def test_accuracy(self) -> float | None:
        return (self.evaluation or {}).get("accuracy")

    @property
    def macro_f1(self) -> float | None:
        return (self.evaluation or {}).get("macro_f1")

    @property
    def duration_s(self) -> float | None:
        start = self.status.get("started_at")
        end = self.status.get("finished_at") or (time.time() if self.state == "running" else None)
        if start is None or end is None:
            return None
        return max(0.0, float(end) - float(start))


def load_run(run_dir: Path) -> RunInfo:
    """Read one run; a damaged file is reported in `problems`, never raised."""
    run_dir = Path(run_dir)
    info = RunInfo(path=run_dir, id=run_id(run_dir))
    for name, attr in ((CONFIG_FILE, "config"), (STATUS_FILE, "status")):
        try:
            value = read_json(run_dir / name)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            setattr(info, attr, value)
        except FileNotFoundError:
            info.problems.append(f"{name} is missing")
        except (OSError, ValueError) as exc:
            info.problems.append(f"{name} is damaged ({exc})")
    info.state = effective_state(info.status) if info.status else "failed"
    info.metrics, bad_lines = read_metrics(run_dir)
    if bad_lines:
        info.problems.append(f"{METRICS_FILE} has {bad_lines} unreadable line(s)")
    if (run_dir / EVALUATION_FILE).exists():
        try:
            info.evaluation = read_json(run_dir / EVALUATION_FILE)
        except (OSError, ValueError) as exc:
            info.problems.append(f"{EVALUATION_FILE} is damaged ({exc})")
    return info


def find_run_dirs(runs_dir: Path) -> list[Path]:
    """Every run directory under runs_dir (those holding a config.json or status.json)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = {p.parent for pattern in (f"*/*/*/*/{CONFIG_FILE}", f"*/*/*/*/{STATUS_FILE}")
             for p in runs_dir.glob(pattern)}
    return sorted(found, key=_newest_first_key, reverse=True)


def _newest_first_key(run_dir: Path) -> tuple[str, int, str]:
    """Sort by timestamp, then by the clash suffix ('<stamp>-2' is newer than '<stamp>')."""
    folder = run_dir.parts[-4] if len(run_dir.parts) >= 4 else run_dir.name
    stamp, suffix = folder[:19], folder[20:]  # "YYYY-MM-DD_HH-MM-SS" then "-N" on a clash
    return stamp, int(suffix) if suffix.isdigit() else 0, str(run_dir)


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """All runs, newest first."""
    return [load_run(p) for p in find_run_dirs(runs_dir)]
