"""The run directory: its layout, its files (each with exactly one writer) and the run's state.

<runs_dir>/<YYYY-MM-DD_HH-MM-SS>/<experiment>/resnet18/<mode>/
    config.json        whoever creates the run (jobs.launch or train.fit), once
    job.json           fer_core.jobs, always under the queue lock
    cancel             jobs.cancel: a request (a resume removes it)
    status.json        the trainer process: progress and outcome of the current attempt
    environment.json   the trainer: classes, weights source, device, sizes, versions
    metrics.jsonl  split.csv  data_report.json  events.out.tfevents.*  checkpoints/{best,last}.pt
    evaluation.json  predictions.csv                 the trainer (`fer evaluate RUN` re-scores)
    evaluations/<dataset>.json (+ .predictions.csv)  `fer evaluate RUN --data DATASET`
    train.log          the job's processes (runner and trainer share one stdout)
    trial.json         fer_core.sweep, for a run that is one trial of a hyper-parameter sweep

`RunLayout` is the one place that knows these names and the folder shape; `run_status()` is the
one answer to "what state is this run in"; `load_run()` reads everything the UI shows. Readers
never write, so a page reload, another tab or the CLI all see the same thing. The contract in
full: docs/architecture.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
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
EXCLUSIONS_FILE = "exclusions.json"  # the dataset doctor's list the run used (a copy)
EVALUATION_FILE = "evaluation.json"
PREDICTIONS_FILE = "predictions.csv"
CALIBRATION_FILE = "calibration.json"
LOG_FILE = "train.log"
CANCEL_FILE = "cancel"
TRIAL_FILE = "trial.json"
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


# ---- the layout -----------------------------------------------------------------------

EXPORTS_DIR = "exports"  # models exported for use elsewhere (fer_core.export writes them)
EVALUATIONS_DIR = "evaluations"
ENVIRONMENT_FILE = "environment.json"
JOB_FILE = "job.json"
_STAMP_LENGTH = len("YYYY-mm-dd_HH-MM-SS")


def dataset_slug(spec: str) -> str:
    """A file-name-safe name for a dataset spec: 'demo', or a folder's or csv's name plus a
    short hash of its full path (two folders both called 'test' stay apart)."""
    if spec == "demo":
        return "demo"
    path = Path(str(spec))
    name = (path.stem if path.suffix.lower() == ".csv" else path.name) or "dataset"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:60] or "dataset"
    return f"{safe}-{hashlib.sha1(str(spec).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


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
            for parent in list(path.parents)[:3]:  # leave no empty timestamp folder behind
                with suppress(OSError):
                    parent.rmdir()
            raise FerError(f"cannot create a run directory under {runs_dir}: {exc.strerror or exc}") from exc
    raise RuntimeError(f"could not create a run directory under {runs_dir}")


def run_id(run_dir: Path) -> str:
    """A short, unique, human-readable id: '<timestamp>/<experiment>/<mode>'."""
    parts = Path(run_dir).parts
    return "/".join((parts[-4], parts[-3], parts[-1])) if len(parts) >= 4 else str(run_dir)


@dataclass(frozen=True)
class RunLayout:
    """Where every file of one run lives: <runs_dir>/<stamp>/<experiment>/resnet18/<mode>/.

    The one place that knows the folder shape; everything else asks it for paths, the run's
    id, its age order and which runs_dir it belongs to.
    """

    path: Path

    @classmethod
    def create(cls, runs_dir: Path, experiment: str, mode: str, now: datetime | None = None) -> "RunLayout":
        """Make a fresh run folder; a clash within the same second gets a numeric suffix."""
        return cls(new_run_dir(runs_dir, experiment, mode, now))

    @classmethod
    def of(cls, run_dir: Path | str) -> "RunLayout":
        """The layout of an existing run folder; FerError if the path has not the run shape."""
        path = Path(run_dir)
        if len(path.resolve().parts) < 5 or path.resolve().parts[-2] != MODEL_NAME:
            raise FerError(f"{run_dir} is not a run directory (<runs>/<time>/<experiment>/"
                           f"{MODEL_NAME}/<mode>)")
        return cls(path)

    # ---- identity -------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.path.resolve().parents[3]

    @property
    def stamp(self) -> str:
        return self.path.parts[-4] if len(self.path.parts) >= 4 else ""

    @property
    def experiment(self) -> str:
        return self.path.parts[-3] if len(self.path.parts) >= 3 else ""

    @property
    def mode(self) -> str:
        return self.path.name

    @property
    def id(self) -> str:
        """A short, unique, human-readable id: '<timestamp>/<experiment>/<mode>'."""
        return run_id(self.path)

    @property
    def age_key(self) -> tuple[str, int, str]:
        """Sort key by creation: '<stamp>-<n>' (a clash within one second) is newer than '<stamp>'.
        Plain string order gets this wrong because '/' sorts after '-'."""
        folder = self.stamp
        stamp, suffix = folder[:_STAMP_LENGTH], folder[_STAMP_LENGTH + 1:]
        return stamp, int(suffix) if suffix.isdigit() else 0, str(self.path)

    # ---- files ----------------------------------------------------------------------
    config_file = property(lambda self: self.path / CONFIG_FILE)
    environment_file = property(lambda self: self.path / ENVIRONMENT_FILE)
    status_file = property(lambda self: self.path / STATUS_FILE)
    job_file = property(lambda self: self.path / JOB_FILE)
    cancel_file = property(lambda self: self.path / CANCEL_FILE)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    split_file = property(lambda self: self.path / SPLIT_FILE)
    data_report_file = property(lambda self: self.path / DATA_REPORT_FILE)
    exclusions_file = property(lambda self: self.path / EXCLUSIONS_FILE)
    log_file = property(lambda self: self.path / LOG_FILE)
    trial_file = property(lambda self: self.path / TRIAL_FILE)
    calibration_file = property(lambda self: self.path / CALIBRATION_FILE)  # fer_core.calibration
    checkpoint_dir = property(lambda self: self.path / CHECKPOINT_DIR)
    best_checkpoint = property(lambda self: self.path / CHECKPOINT_DIR / BEST_CHECKPOINT)
    last_checkpoint = property(lambda self: self.path / CHECKPOINT_DIR / LAST_CHECKPOINT)

    def evaluation_file(self, dataset: str | None = None) -> Path:
        """The test-split result (dataset None), or the result of scoring on another dataset."""
        if dataset is None:
            return self.path / EVALUATION_FILE
        return self.path / EVALUATIONS_DIR / f"{dataset_slug(dataset)}.json"

    def predictions_file(self, dataset: str | None = None) -> Path:
        if dataset is None:
            return self.path / PREDICTIONS_FILE
        return self.path / EVALUATIONS_DIR / f"{dataset_slug(dataset)}.predictions.csv"

    def other_evaluations(self) -> list[Path]:
        """Results of scoring this run's model on other datasets, by name."""
        folder = self.path / EVALUATIONS_DIR
        return sorted(folder.glob("*.json")) if folder.is_dir() else []

    def export_file(self, suffix: str) -> Path:
        """Where this run's best model is exported to: exports/model<suffix> (.onnx, ...)."""
        return self.path / EXPORTS_DIR / f"model{suffix}"

    def published_checkpoint(self, checkpoints_dir: Path) -> Path:
        """Where this run's best model is published for prediction."""
        return Path(checkpoints_dir) / (self.id.replace("/", "_") + ".pt")


# ---- typed records ----------------------------------------------------------------------

def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in `path`, None), (None, None) when the file is missing, or
    (None, why it cannot be used) when it is unreadable, not JSON, or not an object."""
    try:
        value = read_json(path)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{Path(path).name} is damaged ({exc})"
    if not isinstance(value, dict):
        return None, f"{Path(path).name} is damaged (not a JSON object)"
    return value, None


def _kind(kind: str, default: Any = None) -> Any:
    return field(default=default, metadata={"kind": kind})


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite; an integer of 400 digits is not (as a float
    it would be inf, and math.isfinite raises on it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value))


def _valid(kind: str, value: Any) -> bool:
    if value is None:
        return True
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return is_finite_number(value)
    if kind == "number":  # a measurement: NaN is a value (a diverged loss), a string is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "pids":
        return isinstance(value, list) and all(_valid("int", v) for v in value)
    raise ValueError(kind)


class _Record:
    """A JSON file's schema: every field has a kind; a value of the wrong kind is a problem."""

    @classmethod
    def parse(cls, values: dict[str, Any], file_name: str) -> tuple[Any, list[str]]:
        """The record from a JSON object; unknown keys are ignored (older or newer versions),
        values of the wrong type are dropped and reported."""
        problems, known = [], {}
        for item in fields(cls):  # type: ignore[arg-type]
            if item.name not in values:
                continue
            value = values[item.name]
            if value is None and item.default is not None:  # null where the writer never puts one
                problems.append(f"{file_name}: {item.name} has no value")
            elif _valid(item.metadata["kind"], value):
                known[item.name] = float(value) if item.metadata["kind"] == "float" and value is not None \
                    else value
            else:
                problems.append(f"{file_name}: {item.name} has a value of the wrong type ({value!r:.40})")
        return cls(**known), problems

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}  # type: ignore[arg-type]


@dataclass
class TrainerStatus(_Record):
    """status.json: the trainer's own record of its current attempt. Only the trainer writes it."""

    state: str = _kind("str", "running")       # running, then completed | failed | cancelled
    pid: int | None = _kind("int")
    started_at: float | None = _kind("float")          # the run's first start (kept across resumes)
    attempt_started_at: float | None = _kind("float")  # this attempt (a resume starts a new one)
    finished_at: float | None = _kind("float")
    epoch: int = _kind("int", 0)
    epochs: int | None = _kind("int")
    batch: int = _kind("int", 0)
    batches: int | None = _kind("int")
    eta_s: float | None = _kind("float")
    images_per_second: float | None = _kind("float")
    train_loss: float | None = _kind("float")
    phase: str | None = _kind("str")
    error: str | None = _kind("str")
    best_val_acc: float | None = _kind("float")
    best_epoch: int | None = _kind("int")
    early_stopped_at: int | None = _kind("int")
    stop_reason: str | None = _kind("str")     # why training stopped before its last epoch
    published_checkpoint: str | None = _kind("str")
    world_size: int | None = _kind("int")         # training processes (DDP ranks); None: one


@dataclass
class JobRecord(_Record):
    """job.json: a background job's record. Written only by fer_core.jobs, under the queue lock."""

    queued_at: float = _kind("float", 0.0)      # this attempt's place in the queue
    max_concurrent: int = _kind("int", 1)
    resume: bool = _kind("bool", False)
    resume_epochs: int | None = _kind("int")
    runner_pid: int | None = _kind("int")
    runner_started_at: float | None = _kind("float")
    trainer_pid: int | None = _kind("int")
    previous_pids: list[int] = field(default_factory=list, metadata={"kind": "pids"})
    outcome: str | None = _kind("str")        # set when the job ended without the trainer saying so
    outcome_error: str | None = _kind("str")
    ended_at: float | None = _kind("float")


def read_record(path: Path, record: type, required: bool = False) -> tuple[Any, list[str]]:
    """A typed record from its JSON file: (record or None, problems)."""
    values, problem = read_json_object(path)
    if values is None:
        missing = [f"{Path(path).name} is missing"] if required and problem is None else []
        return None, [problem] if problem else missing
    parsed, problems = record.parse(values, Path(path).name)
    if isinstance(parsed, TrainerStatus) and parsed.state not in STATES:
        problems.append(f"{Path(path).name}: unknown state {parsed.state!r}")
        parsed.state = "failed"
    if isinstance(parsed, JobRecord) and parsed.outcome not in (None, *FINAL_STATES):
        problems.append(f"{Path(path).name}: unknown outcome {parsed.outcome!r}")
        parsed.outcome = "failed"
    return parsed, problems


class TrainerStatusWriter:
    """The trainer's handle on status.json: the record lives here and is always written whole,
    so no update can be lost to another writer (there is none). Without a layout (a training
    process other than rank 0, which must not write the run folder) the record is kept in
    memory only."""

    def __init__(self, layout: "RunLayout | None", record: TrainerStatus) -> None:
        self.layout, self.record = layout, record

    @classmethod
    def in_memory(cls, *, epochs: int) -> "TrainerStatusWriter":
        """A record for a process that does not own the run folder: the same updates, no file."""
        return cls(None, TrainerStatus(state="running", pid=os.getpid(), attempt_started_at=time.time(),
                                       epochs=epochs))

    @classmethod
    def start(cls, layout: "RunLayout", *, epochs: int, pid: int | None = None,
              world_size: int = 1) -> "TrainerStatusWriter":
        """Begin an attempt: keep what a previous attempt learnt (first start, epochs done, best).
        `pid`: the process that stands for the run (default this one; torchrun's agent for DDP)."""
        now = time.time()
        previous, _ = read_record(layout.status_file, TrainerStatus)
        record = TrainerStatus(state="running", pid=pid or os.getpid(), attempt_started_at=now, epochs=epochs,
                               started_at=(previous.started_at if previous else None) or now,
                               world_size=world_size if world_size > 1 else None)
        if previous is not None:
            record.epoch, record.best_val_acc, record.best_epoch = \
                previous.epoch, previous.best_val_acc, previous.best_epoch
        writer = cls(layout, record)
        writer.write()
        return writer

    def update(self, **changes: Any) -> None:
        for name, value in changes.items():
            if not hasattr(self.record, name):
                raise AttributeError(f"status.json has no field {name!r}")
            setattr(self.record, name, value)
        self.write()

    def finish(self, state: str, **changes: Any) -> None:
        """Record the outcome of this attempt."""
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        self.update(state=state, finished_at=time.time(), eta_s=None, phase=None, **changes)

    def write(self) -> None:
        if self.layout is not None:
            atomic_write_json(self.layout.status_file, {**self.record.to_dict(), "updated_at": time.time()})


# ---- the run's state --------------------------------------------------------------------

DEAD_PROCESS_ERROR = "process exited without finishing"
ACTIVE_STATES = ("queued", "running")


@dataclass(frozen=True)
class RunStatus:
    """What state a run is in and how far it got: the one answer every page, the CLI and the
    job queue use (see `run_status`)."""

    state: str
    pid: int | None = None                 # the trainer's, while it runs
    runner_pid: int | None = None
    epoch: int = 0
    epochs: int | None = None
    batch: int = 0
    batches: int | None = None
    eta_s: float | None = None
    images_per_second: float | None = None
    phase: str | None = None
    error: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False         # running, but a cancel is on its way
    best_val_acc: float | None = None
    best_epoch: int | None = None
    early_stopped_at: int | None = None
    stop_reason: str | None = None
    published_checkpoint: str | None = None
    max_concurrent: int = 1

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def get(self, name: str, default: Any = None) -> Any:
        """Dict-style access for callers that take a status dict or a RunStatus alike."""
        value = getattr(self, name, None)
        return default if value is None else value


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
    except (OverflowError, ValueError, TypeError):
        return False
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cancel_request(layout: "RunLayout") -> tuple[float, float] | None:
    """(requested_at, grace_s) if a cancel was asked for, else None."""
    values, _ = read_json_object(layout.cancel_file)
    if values is None:
        try:
            mtime = layout.cancel_file.stat().st_mtime  # an empty or damaged request still counts
        except OSError:
            return None
        return mtime, 10.0
    at, grace = values.get("requested_at"), values.get("grace_s")
    at = float(at) if _valid("float", at) and at is not None else layout.cancel_file.stat().st_mtime
    return at, float(grace) if _valid("float", grace) and grace is not None else 10.0


def refuse_while_training(run_dir: Path, what: str) -> None:
    """A FerError when the run is queued or running: its trainer is the writer of what the
    command would rewrite."""
    status, _ = run_status(run_dir)
    if status.active:
        raise FerError(f"{run_dir} is {status.state}: it can be {what} once its training has ended")


def run_status(run_dir: Path | "RunLayout") -> tuple[RunStatus, list[str]]:
    """The run's state and progress, from job.json, status.json, the cancel request and whether
    the recorded processes live; plus any problems with those files. Never writes, never raises."""
    layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout(Path(run_dir))
    trainer, problems = read_record(layout.status_file, TrainerStatus)
    job, job_problems = read_record(layout.job_file, JobRecord)
    problems += job_problems
    if trainer is None and job is None and not problems:
        problems.append(f"{STATUS_FILE} is missing")
    return resolve_status(trainer, job, cancel_request(layout) is not None), problems


def resolve_status(trainer: TrainerStatus | None, job: JobRecord | None, cancel_requested: bool) -> RunStatus:
    """The state from the records. The trainer's record is about the current attempt unless the
    job was queued again (a resume) after that attempt started."""
    current = trainer if trainer is not None and (
        job is None or (trainer.attempt_started_at or trainer.started_at or 0.0) >= job.queued_at) else None
    error: str | None = None
    if current is not None:
        state, error = current.state, current.error
        if state == "running" and not pid_alive(current.pid):
            if job is not None and job.outcome:
                state, error = job.outcome, job.outcome_error
            elif job is None or not pid_alive(job.runner_pid):  # a live runner records the end soon
                state, error = ("cancelled", None) if cancel_requested else ("failed", DEAD_PROCESS_ERROR)
    elif job is not None:
        if job.outcome:
            state, error = job.outcome, job.outcome_error
        elif job.runner_pid is None:
            state = "queued"
        elif pid_alive(job.runner_pid) or pid_alive(job.trainer_pid):
            state = "running"  # starting: the trainer has not written its record yet
        else:
            state, error = ("cancelled", None) if cancel_requested else ("failed", DEAD_PROCESS_ERROR)
    else:
        state, error = "failed", "no status recorded"

    running = state == "running"
    finished_at = None
    if state in FINAL_STATES:
        finished_at = (current.finished_at if current is not None and current.state == state else None) \
            or (job.ended_at if job is not None else None) or (trainer.finished_at if trainer else None)
    live = current if running and current is not None else None
    return RunStatus(
        state=state, error=error,
        pid=current.pid if running and current is not None else (job.trainer_pid if running and job else None),
        runner_pid=job.runner_pid if job is not None else None,
        epoch=trainer.epoch if trainer else 0,
        epochs=(current.epochs if current is not None else None) or (job.resume_epochs if job else None)
        or (trainer.epochs if trainer else None),
        batch=live.batch if live else 0, batches=live.batches if live else None,
        eta_s=live.eta_s if live else None,
        images_per_second=(current.images_per_second if current is not None else None),
        phase=live.phase if live else None,
        queued_at=job.queued_at if job is not None else None,
        started_at=trainer.started_at if trainer else None, finished_at=finished_at,
        cancel_requested=running and cancel_requested,
        best_val_acc=trainer.best_val_acc if trainer else None,
        best_epoch=trainer.best_epoch if trainer else None,
        early_stopped_at=current.early_stopped_at if current is not None else None,
        stop_reason=current.stop_reason if current is not None else None,
        published_checkpoint=trainer.published_checkpoint if trainer else None,
        max_concurrent=job.max_concurrent if job is not None else 1)


LOG_TAIL_LINES = 40
_LOG_TAIL_BYTES = 64 * 1024


def read_log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of train.log ('' if there is none); reads at most 64 KiB."""
    return read_text_tail(Path(run_dir) / LOG_FILE, lines)


def read_text_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' if there is none); reads at most 64 KiB."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    # a progress bar redraws with '\r': keep what the line finally showed
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    while shown and not shown[-1].strip():
        shown.pop()
    return "\n".join(shown[-lines:]) if lines > 0 else ""


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
            if isinstance(row, dict) and all(_valid(kind, row.get(key)) for key, kind in _METRIC_KINDS.items()):
                rows.append(row)
                continue
        bad += 1  # not JSON, not an object, or a number that is not a number
    return rows, bad


def rewrite_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with exactly these rows (used on resume to drop lost epochs)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    atomic_write_text(Path(run_dir) / METRICS_FILE, text)


# ---- reading runs back ----------------------------------------------------------------

@dataclass
class RunInfo:
    """Everything the UI shows about one run, read from its directory."""

    layout: RunLayout
    config: dict[str, Any] = field(default_factory=dict)   # config.json + the trainer's environment.json
    status: RunStatus = field(default_factory=lambda: RunStatus(state="failed"))
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def id(self) -> str:
        return self.layout.id

    @property
    def state(self) -> str:
        """The run's state; 'damaged' for a run that is not active and has unreadable files."""
        if self.problems and not self.status.active:
            return "damaged"
        return self.status.state

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    @property
    def experiment(self) -> str:
        value = self.config.get("experiment")
        return value if isinstance(value, str) and value else self.layout.experiment

    @property
    def mode(self) -> str:
        value = self.config.get("mode")
        return value if isinstance(value, str) and value else self.layout.mode

    @property
    def best_checkpoint(self) -> Path:
        return self.layout.best_checkpoint

    @property
    def last_checkpoint(self) -> Path:
        return self.layout.last_checkpoint

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
    def planned_epochs(self) -> int | None:
        epochs = self.status.epochs or self.config.get("epochs")
        return epochs if isinstance(epochs, int) else None

    @property
    def duration_s(self) -> float | None:
        start = self.status.started_at
        end = self.status.finished_at or (time.time() if self.state == "running" else None)
        if start is None or end is None:
            return None
        return max(0.0, float(end) - float(start))

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return read_log_tail(self.path, lines)


# The keys of config.json and evaluation.json the app relies on, and their kinds.
_CONFIG_KINDS = {"data": "str", "experiment": "str", "mode": "str", "epochs": "int", "img_size": "int",
                 "batch_size": "int", "lr": "float", "preset": "str", "synthetic_data": "bool",
                 "selection_split": "str", "weights_source": "str", "num_test": "int",
                 "world_size": "int", "nnodes": "int"}
_METRIC_KINDS = {"epoch": "int", "train_loss": "number", "train_acc": "number", "val_loss": "number",
                 "val_acc": "number", "lr": "number", "seconds": "number", "images_per_second": "number"}


def _check_kinds(values: dict[str, Any], kinds: dict[str, str], file_name: str) -> list[str]:
    return [f"{file_name}: {key} has a value of the wrong type ({values[key]!r:.40})"
            for key, kind in kinds.items() if key in values and not _valid(kind, values[key])]


def evaluation_problem(evaluation: Any) -> str | None:
    """Why an evaluation record cannot be shown, or None when it is well formed."""
    if not isinstance(evaluation, dict):
        return "not a JSON object"
    for key in ("accuracy", "macro_f1"):
        value = evaluation.get(key)
        if not _valid("float", value) or value is None or not 0.0 <= value <= 1.0:
            return f"{key} must be a number between 0 and 1 (got {value!r:.40})"
    classes, matrix = evaluation.get("classes"), evaluation.get("confusion_matrix")
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        return "classes must be a list of distinct names"
    if (not isinstance(matrix, list) or len(matrix) != len(classes)
            or not all(isinstance(row, list) and len(row) == len(classes)
                       and all(_valid("int", v) and v is not None and 0 <= v < 2**53 for v in row)
                       for row in matrix)):
        return "confusion_matrix must be a square table of counts, one row per class"
    for key, kind in (("num_images", "int"), ("best_epoch", "int"), ("data", "str"), ("split", "str"),
                      ("synthetic", "bool"), ("tta", "bool")):
        if not _valid(kind, evaluation.get(key)) or (kind == "int" and (evaluation.get(key) or 0) < 0):
            return f"{key} has a value of the wrong type ({evaluation.get(key)!r:.40})"
    report = evaluation.get("report", {})
    if not isinstance(report, dict) or not all(
            isinstance(scores, dict) and all(_valid("float", scores.get(name)) and scores.get(name) is not None
                                             for name in ("precision", "recall", "f1-score", "support"))
            for name, scores in report.items() if name in classes):
        return "report must hold precision, recall, f1-score and support numbers per class"
    return None


def load_run(run_dir: Path | RunLayout) -> RunInfo:
    """Read one run; a damaged or wrongly typed file is reported in `problems`, never raised."""
    layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout(Path(run_dir))
    info = RunInfo(layout=layout)
    config, problem = read_json_object(layout.config_file)
    if problem or config is None:
        info.problems.append(problem or f"{CONFIG_FILE} is missing")
    else:
        info.problems += _check_kinds(config, _CONFIG_KINDS, CONFIG_FILE)
        info.config = {k: v for k, v in config.items() if k not in _CONFIG_KINDS or _valid(_CONFIG_KINDS[k], v)}
    environment, problem = read_json_object(layout.environment_file)
    if problem:
        info.problems.append(problem)
    elif environment:
        info.problems += _check_kinds(environment, _CONFIG_KINDS, ENVIRONMENT_FILE)
        classes = environment.get("classes")
        classes_ok = classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes))
        if not classes_ok:
            info.problems.append(f"{ENVIRONMENT_FILE}: classes has a value of the wrong type ({classes!r:.40})")
        info.config.update({k: v for k, v in environment.items()
                            if (k not in _CONFIG_KINDS or _valid(_CONFIG_KINDS[k], v))
                            and (k != "classes" or classes_ok)})
    info.status, problems = run_status(layout)
    info.problems += problems
    try:
        info.metrics, bad_lines = read_metrics(layout.path)
    except OSError as exc:  # e.g. unreadable: the run is still listed, with what is wrong
        info.problems.append(f"{METRICS_FILE} cannot be read ({exc.strerror or exc})")
        bad_lines = 0
    if bad_lines:
        info.problems.append(f"{METRICS_FILE} has {bad_lines} unreadable line(s)")
    evaluation, problem = read_json_object(layout.evaluation_file())
    reason = problem or (evaluation_problem(evaluation) if evaluation is not None else None)
    if reason:
        info.problems.append(reason if problem else f"{EVALUATION_FILE} is damaged ({reason})")
    elif evaluation is not None:
        info.evaluation = evaluation
    return info


def find_runs(runs_dir: Path) -> list[RunLayout]:
    """Every run folder under runs_dir (one holding a config.json, status.json or job.json),
    newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = {p.parent for name in (CONFIG_FILE, STATUS_FILE, JOB_FILE)
             for p in runs_dir.glob(f"*/*/{MODEL_NAME}/*/{name}")}
    return sorted((RunLayout(p) for p in found), key=lambda layout: layout.age_key, reverse=True)


def find_run_dirs(runs_dir: Path) -> list[Path]:
    """find_runs as paths."""
    return [layout.path for layout in find_runs(runs_dir)]


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """All runs, newest first."""
    return [load_run(layout) for layout in find_runs(runs_dir)]
