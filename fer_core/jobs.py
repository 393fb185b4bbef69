"""Background training jobs whose whole state lives on disk, in each run's status.json.

A page reload, a second browser tab or a restarted app therefore sees the same jobs: nothing
about a job is kept in memory except the handle used to reap a child process.

Life of a job
-------------
launch() creates the run directory and writes config.json and status.json (state 'queued'),
then pump_queue(). pump_queue() works under an exclusive fcntl lock on <runs_dir>/.jobs.lock, so
two tabs or processes never start the same job or more than `max_concurrent` jobs. It starts a
queued job by spawning a small *runner* process in its own session:

    python -m fer_core.jobs run RUN_DIR        (stdout/stderr appended to RUN_DIR/train.log)

and records state 'running', pid = runner_pid = the runner's pid at once, so the UI sees it.
The runner takes the same lock (so it starts only after that record is written), spawns the
*trainer* in a session of its own,

    python -m fer_core train --run-dir RUN_DIR <flags from the config>   (or --resume RUN_DIR)

and records `pid` = the trainer's pid (the trainer's fit() writes the same pid again). Then it
waits for the trainer and afterwards:
  * if the trainer died without recording an outcome (kill -9, out of memory), writes
    'cancelled' when a cancel was requested, else 'failed' with the exit reason and log tail;
  * calls pump_queue(), so the next queued job starts even when no browser is open.
The app's own pump_queue() reconciles the rare case where the runner itself is gone too.
A runner only writes to a run while status.json still names it as the runner (a cancelled run
may be resumed under a new runner while the old one is still exiting), and a resumed run's
runner first waits for the previous trainer of that folder to exit.

Cancelling
----------
A queued job is marked 'cancelled' at once. For a running job cancel() touches the run's
`cancel` file (the engine stops within one batch and records 'cancelled', keeping last.pt) and
records cancel_requested_at / cancel_grace_s in status.json. The runner is the reaper: if the
trainer is still alive grace_s after the request it sends SIGTERM to the trainer's process
group (the engine turns SIGTERM into a clean cancel), and SIGKILL after another grace_s. Because
the runner, not the app, enforces this, it survives an app restart. If no runner is alive (a
run started from a terminal, or a runner that was killed) cancel() starts a daemon thread that
does the same. Either way the final state is written as 'cancelled' if the process died
without writing it.

The trainer runs in its own session (process group = its pid), so signalling that group
stops the trainer and anything it spawned, never the runner or the app.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import runs
from .errors import ConfigError, FerError

if TYPE_CHECKING:  # importing config pulls in torch; the runner process must start fast
    from .config import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = ".jobs.lock"
ACTIVE_STATES = ("queued", "running")
DEAD_PROCESS_ERROR = "process exited without finishing"
POLL_S = 0.2
LOG_TAIL_LINES = 40
STATUS_LOG_TAIL_LINES = 20
PREVIOUS_EXIT_TIMEOUT_S = 60.0
_LOG_TAIL_BYTES = 64 * 1024
STAMP_LENGTH = len("YYYY-mm-dd_HH-MM-SS")  # runs.new_run_dir's folder name, before any "-<n>"
# TrainConfig fields the job manager passes some other way than a same-named CLI flag.
_NOT_FLAGS = ("preset",)


@dataclass
class JobInfo:
    """One run seen as a job: its state and progress, read from the run directory."""

    run_dir: Path
    state: str
    pid: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    batch: int | None = None
    batches: int | None = None
    eta_s: float | None = None
    images_per_second: float | None = None
    error: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    experiment: str = ""
    mode: str = ""
    log_tail: str = ""
    cancel_requested: bool = False  # running, but a cancel is on its way
    phase: str | None = None  # what a running trainer is doing: loading data, training, ...


# ---- public API -----------------------------------------------------------------------

def launch(config: "TrainConfig", *, max_concurrent: int = 1) -> Path:
    """Queue a new training run and start it if a slot is free; return its run directory.

    Relative paths in the config are resolved against the caller's working directory (the
    trainer runs from the project root). Raises ConfigError before anything is written.
    """
    _check_max_concurrent(max_concurrent)
    config = _with_absolute_paths(config)
    config.validate()
    flags = trainer_flags(config)
    runs_dir = Path(config.runs_dir)
    with _queue_lock(runs_dir):
        run_dir = runs.new_run_dir(runs_dir, config.experiment, config.mode)
        # status first: a reader never sees a config.json without a status beside it
        runs.write_status(run_dir, "queued", queued_at=time.time(), epochs=config.epochs, epoch=0,
                          resume=False, train_args=["train", "--run-dir", str(run_dir), *flags],
                          max_concurrent=max_concurrent)
        runs.atomic_write_json(run_dir / runs.CONFIG_FILE, config.to_dict())
        _pump_locked(runs_dir, max_concurrent)
    return run_dir


def resume_job(run_dir: Path, *, epochs: int | None = None, max_concurrent: int = 1) -> None:
    """Queue a finished, failed or cancelled run to continue from its last.pt (`train --resume`)."""
    _check_max_concurrent(max_concurrent)
    run_dir = Path(run_dir).resolve()
    runs_dir = _runs_dir_of(run_dir)
    with _queue_lock(runs_dir):
        _check_resumable(run_dir, epochs)
        (run_dir / runs.CANCEL_FILE).unlink(missing_ok=True)  # else the runner sees a cancel
        previous = _read_status(run_dir)
        still_exiting = [p for p in (previous.get("pid"), previous.get("runner_pid")) if runs.pid_alive(p)]
        args = ["train", "--resume", str(run_dir)] + (["--epochs", str(epochs)] if epochs else [])
        more = {"epochs": epochs} if epochs else {}
        runs.write_status(run_dir, "queued", queued_at=time.time(), resume=True, resume_epochs=epochs,
                          train_args=args, max_concurrent=max_concurrent, pid=None, runner_pid=None,
                          finished_at=None, error=None, log_tail=None, eta_s=None,
                          cancel_requested_at=None, cancel_grace_s=None, previous_pids=still_exiting,
                          **more)
        _pump_locked(runs_dir, max_concurrent)


def cancel(run_dir: Path, *, grace_s: float = 10.0) -> None:
    """Cancel a queued job at once, or ask a running one to stop (signals after grace_s)."""
    run_dir = Path(run_dir).resolve()
    with _queue_lock(_runs_dir_of(run_dir)):
        status = _read_status(run_dir)
        if not status:
            raise FerError(f"{run_dir} is not a job: it has no readable status.json")
        state = status.get("state")
        if state == "queued":
            runs.write_status(run_dir, "cancelled", finished_at=time.time(), cancel_requested_at=time.time())
            return
        if state != "running" or not _job_alive(status) or _cancel_request(run_dir, status):
            return  # finished (or died: pump_queue records it), or a cancel is under way
        requested_at = time.time()
        runs.atomic_write_json(run_dir / runs.CANCEL_FILE, {"requested_at": requested_at, "grace_s": grace_s})
        runs.write_status(run_dir, "running", cancel_requested_at=requested_at, cancel_grace_s=grace_s)
    if not runs.pid_alive(status.get("runner_pid")):
        # no runner to enforce the grace period (started elsewhere, or the runner died)
        threading.Thread(target=_reap_without_runner, name=f"fer-cancel-{run_dir.name}", daemon=True,
                         args=(run_dir, status.get("pid"), requested_at, grace_s)).start()


def pump_queue(runs_dir: Path, *, max_concurrent: int = 1) -> list[Path]:
    """Mark dead running jobs failed, then start the oldest queued ones while slots are free."""
    _check_max_concurrent(max_concurrent)
    with _queue_lock(Path(runs_dir)):
        return _pump_locked(Path(runs_dir), max_concurrent)


def list_jobs(runs_dir: Path) -> list[JobInfo]:
    """Every run under runs_dir as a job, newest first."""
    return [job_info(p) for p in sorted(runs.find_run_dirs(Path(runs_dir)), key=_age_key, reverse=True)]


def job_info(run_dir: Path) -> JobInfo:
    """Read one job's state, progress and log tail from its run directory (never raises)."""
    run_dir = Path(run_dir)
    status = _read_status(run_dir)
    config = _read_json_object(run_dir / runs.CONFIG_FILE)
    state = visible_state(run_dir, status)
    parts = run_dir.parts
    error = status.get("error")
    if state in ("failed", "cancelled") and status.get("state") == "running" and not error:
        error = DEAD_PROCESS_ERROR if state == "failed" else None
    return JobInfo(
        run_dir=run_dir, state=state, pid=_int_or_none(status.get("pid")),
        epoch=_int_or_none(status.get("epoch")), epochs=_int_or_none(status.get("epochs")),
        batch=_int_or_none(status.get("batch")), batches=_int_or_none(status.get("batches")),
        eta_s=_float_or_none(status.get("eta_s")) if state == "running" else None,
        images_per_second=_float_or_none(status.get("images_per_second")),
        error=error, queued_at=_float_or_none(status.get("queued_at")),
        started_at=_float_or_none(status.get("started_at")),
        finished_at=_float_or_none(status.get("finished_at")),
        experiment=str(config.get("experiment") or (parts[-3] if len(parts) >= 3 else "")),
        mode=str(config.get("mode") or (parts[-1] if parts else "")),
        log_tail=read_log_tail(run_dir, LOG_TAIL_LINES),
        cancel_requested=state == "running" and _cancel_request(run_dir, status) is not None,
        phase=str(status["phase"]) if state == "running" and status.get("phase") else None)


def active_jobs(runs_dir: Path) -> list[JobInfo]:
    """Running jobs (oldest start first), then queued jobs in the order they will start."""
    active = [job for job in list_jobs(runs_dir) if job.state in ACTIVE_STATES]
    return sorted(active, key=lambda j: (j.state != "running", _queue_key(j), str(j.run_dir)))


def read_log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of train.log ('' if there is none); reads at most 64 KiB."""
    path = Path(run_dir) / runs.LOG_FILE
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


def visible_state(run_dir: Path, status: dict[str, Any]) -> str:
    """The state to show. A 'running' job whose trainer and runner are both gone has ended:
    'cancelled' if a cancel was requested, else 'failed'."""
    state = status.get("state", "failed") if status else "failed"
    if state != "running" or _job_alive(status):
        return state if state in runs.STATES else "failed"
    return "cancelled" if _cancel_request(Path(run_dir), status) else "failed"


def trainer_flags(config: "TrainConfig") -> list[str]:
    """CLI flags that make `python -m fer_core train` rebuild exactly this config.

    Raises ConfigError for a field that differs from its default but that the CLI cannot take,
    rather than silently training something else.
    """
    from .cli import TRAIN_FLAGS, TRAIN_SWITCHES
    from .config import PRESETS, TrainConfig

    by_field = {flag[2:].replace("-", "_"): flag for flag, _ in TRAIN_FLAGS}
    defaults = TrainConfig()
    flags: list[str] = []
    if config.preset in PRESETS:  # only to keep the preset's name; every value is explicit below
        flags += ["--preset", config.preset]
    unsupported = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        dashed = item.name.replace("_", "-")
        if item.name in by_field:
            if value is not None:
                flags += [by_field[item.name], str(value)]
        elif item.name in TRAIN_SWITCHES:
            flags.append(f"--{dashed}" if value else f"--no-{dashed}")
        elif item.name not in _NOT_FLAGS and value != getattr(defaults, item.name):
            unsupported.append(f"{item.name}={value!r}")
    if unsupported:
        raise ConfigError("the training command line has no flag for "
                          f"{', '.join(unsupported)}; leave these at their defaults")
    return flags


# ---- the queue ------------------------------------------------------------------------

def _queue_lock(runs_dir: Path) -> "AbstractContextManager[None]":
    """Exclusive lock over one runs folder's queue, across threads and processes."""
    return runs.exclusive_lock(runs_dir / LOCK_FILE)


def _pump_locked(runs_dir: Path, max_concurrent: int) -> list[Path]:
    running, queued = 0, []
    for run_dir in runs.find_run_dirs(runs_dir):
        status = _read_status(run_dir)
        state = status.get("state")
        if state == "running":
            if _job_alive(status):
                running += 1
            else:
                _record_end_of_dead_job(run_dir, status)
        elif state == "queued":
            queued.append((_queue_key_of(status), str(run_dir), run_dir, status))
    started = []
    for _, _, run_dir, status in sorted(queued, key=lambda item: item[:2]):
        if running >= max_concurrent:
            break
        if _start_runner(run_dir, status):
            started.append(run_dir)
            running += 1
    return started


def _start_runner(run_dir: Path, status: dict[str, Any]) -> bool:
    """Spawn the runner for a queued job and record it as running (caller holds the lock)."""
    if not isinstance(status.get("train_args"), list):
        runs.write_status(run_dir, "failed", finished_at=time.time(),
                          error="queued without a training command (status.json was edited?)")
        return False
    with open(run_dir / runs.LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fer_core.jobs", "run", str(run_dir.resolve())],
            cwd=PROJECT_ROOT, env=_child_env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    now = time.time()
    fields: dict[str, Any] = {"pid": process.pid, "runner_pid": process.pid, "runner_started_at": now,
                              "finished_at": None, "error": None}
    fields["resumed_at" if status.get("resume") else "started_at"] = now
    runs.write_status(run_dir, "running", **fields)
    # reap the runner when it ends so it does not linger as a zombie of the app
    threading.Thread(target=process.wait, name=f"fer-reap-{process.pid}", daemon=True).start()
    return True


def _record_end_of_dead_job(run_dir: Path, status: dict[str, Any], detail: str | None = None) -> str:
    """Write the final state of a job whose processes died without recording one."""
    if _cancel_request(run_dir, status):
        runs.write_status(run_dir, "cancelled", finished_at=time.time())
        return "cancelled"
    error = DEAD_PROCESS_ERROR + (f" ({detail})" if detail else "")
    runs.write_status(run_dir, "failed", finished_at=time.time(), error=error,
                      log_tail=read_log_tail(run_dir, STATUS_LOG_TAIL_LINES))
    return "failed"


def _check_resumable(run_dir: Path, epochs: int | None) -> None:
    status = _read_status(run_dir)
    state = visible_state(run_dir, status)
    if state in ACTIVE_STATES:
        raise FerError(f"cannot resume {runs.run_id(run_dir)}: it is {state}")
    if not (run_dir / runs.CHECKPOINT_DIR / runs.LAST_CHECKPOINT).is_file():
        raise FerError(f"cannot resume {runs.run_id(run_dir)}: it has no checkpoints/last.pt "
                       "(no epoch finished)")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be a whole number of at least 1 (got {epochs})")
    trained = max((int(row.get("epoch", 0)) for row in runs.read_metrics(run_dir)[0]), default=0)
    target = epochs or _int_or_none(_read_json_object(run_dir / runs.CONFIG_FILE).get("epochs")) or 0
    if target < trained or (state == "completed" and target == trained):
        raise FerError(f"cannot resume {runs.run_id(run_dir)}: it has trained {trained} epochs; "
                       f"ask for more than {trained}")


# ---- the runner process ---------------------------------------------------------------

def _run_job(run_dir: Path) -> int:
    """Entry of `python -m fer_core.jobs run RUN_DIR`: train, record the outcome, pump."""
    runs_dir = _runs_dir_of(run_dir)
    with _queue_lock(runs_dir):  # waits until the launcher has recorded us as running
        status = _read_status(run_dir)
    if not _is_ours(status):
        _say(f"not starting: the job is {status.get('state')!r} and not assigned to this runner")
        return 0
    max_concurrent = _int_or_none(status.get("max_concurrent")) or 1
    # a resumed run's previous trainer may still be exiting: never two trainers in one folder
    _wait_until_gone(status.get("previous_pids") or [], PREVIOUS_EXIT_TIMEOUT_S)
    with _queue_lock(runs_dir):
        trainer = _spawn_trainer(run_dir, _read_status(run_dir))
    if trainer is not None:
        code = _supervise(run_dir, trainer)
        with _queue_lock(runs_dir):
            status = _read_status(run_dir)
            # only while the run is still ours: it may already have been resumed under a new runner
            if _is_ours(status):
                outcome = _record_end_of_dead_job(run_dir, status, _describe_exit(code))
                _say(f"trainer exited with code {code} without recording an outcome: {outcome}")
    pump_queue(runs_dir, max_concurrent=max_concurrent)
    return 0


def _spawn_trainer(run_dir: Path, status: dict[str, Any]) -> subprocess.Popen | None:
    """Start the trainer and record its pid (caller holds the lock); None if it must not run."""
    if not _is_ours(status):
        return None
    if _cancel_request(run_dir, status):
        runs.write_status(run_dir, "cancelled", finished_at=time.time())
        return None
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "fer_core", *status["train_args"]],
                                   cwd=PROJECT_ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    except OSError as exc:
        runs.write_status(run_dir, "failed", finished_at=time.time(),
                          error=f"could not start the trainer: {exc}")
        return None
    runs.write_status(run_dir, "running", pid=trainer.pid)
    return trainer


def _is_ours(status: dict[str, Any]) -> bool:
    return status.get("state") == "running" and status.get("runner_pid") == os.getpid()


def _wait_until_gone(pids: list[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(runs.pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _supervise(run_dir: Path, trainer: subprocess.Popen) -> int:
    """Wait for the trainer; once a cancel is requested, enforce its grace period."""
    while True:
        with suppress(subprocess.TimeoutExpired):  # still running: check for a cancel, wait again
            return trainer.wait(timeout=POLL_S)
        request = _cancel_request(run_dir, _read_status(run_dir))
        if request:
            _stop_after_grace(trainer.pid, lambda: trainer.poll() is None, *request)
            return trainer.wait()


def _stop_after_grace(pgid: int, alive: Callable[[], bool], requested_at: float, grace_s: float) -> None:
    """SIGTERM the process group grace_s after the request, SIGKILL after another grace_s."""
    for sig, deadline in ((signal.SIGTERM, requested_at + grace_s),
                          (signal.SIGKILL, requested_at + 2 * grace_s)):
        while alive() and time.time() < deadline:
            time.sleep(POLL_S)
        if not alive():
            return
        _signal_group(pgid, sig)
    give_up = time.time() + 10.0
    while alive() and time.time() < give_up:
        time.sleep(POLL_S)


def _reap_without_runner(run_dir: Path, pid: Any, requested_at: float, grace_s: float) -> None:
    """cancel()'s fallback reaper thread, for a job that has no live runner."""
    pid = _int_or_none(pid)
    with suppress(ProcessLookupError):  # it may end on its own between the check and getpgid
        if pid and runs.pid_alive(pid):
            _stop_after_grace(os.getpgid(pid), lambda: runs.pid_alive(pid), requested_at, grace_s)
    runs_dir = _runs_dir_of(run_dir)
    with _queue_lock(runs_dir):
        status = _read_status(run_dir)
        if status.get("state") == "running" and status.get("pid") == pid and not _job_alive(status):
            _record_end_of_dead_job(run_dir, status)
        max_concurrent = _int_or_none(status.get("max_concurrent")) or 1
    pump_queue(runs_dir, max_concurrent=max_concurrent)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):  # already gone, or not ours: nothing to stop
        os.killpg(pgid, sig)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _say(message: str) -> None:
    print(f"[fer_core.jobs] {message}", flush=True)  # stdout is the run's train.log


# ---- small helpers --------------------------------------------------------------------

def _job_alive(status: dict[str, Any]) -> bool:
    """The trainer or its runner still lives (the runner records the outcome if it dies)."""
    return runs.pid_alive(status.get("pid")) or runs.pid_alive(status.get("runner_pid"))


def _cancel_request(run_dir: Path, status: dict[str, Any]) -> tuple[float, float] | None:
    """(requested_at, grace_s) if a cancel was asked for, from status.json or the cancel file."""
    requested_at = _float_or_none(status.get("cancel_requested_at"))
    if requested_at is not None:
        return requested_at, _float_or_none(status.get("cancel_grace_s")) or 0.0
    path = run_dir / runs.CANCEL_FILE
    try:
        request = _read_json_object(path, missing_ok=False)
        at = _float_or_none(request.get("requested_at"))
        return (at if at is not None else path.stat().st_mtime,
                _float_or_none(request.get("grace_s")) or 10.0)
    except FileNotFoundError:
        return None


def _runs_dir_of(run_dir: Path) -> Path:
    """<runs_dir>/<stamp>/<experiment>/resnet18/<mode> -> <runs_dir>."""
    run_dir = Path(run_dir).resolve()
    if len(run_dir.parts) < 6 or run_dir.parts[-2] != runs.MODEL_NAME:
        raise FerError(f"{run_dir} is not a run directory (<runs>/<time>/<experiment>/"
                       f"{runs.MODEL_NAME}/<mode>)")
    return run_dir.parents[3]


def _with_absolute_paths(config: "TrainConfig") -> "TrainConfig":
    """A copy whose paths mean what they meant to the caller, wherever the trainer runs."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value else value

    data = config.data if config.data == "demo" else absolute(config.data)
    return dataclasses.replace(config, data=data, runs_dir=absolute(config.runs_dir),
                               checkpoints_dir=absolute(config.checkpoints_dir),
                               weights=absolute(config.weights), notes=dict(config.notes))


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _check_max_concurrent(value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_concurrent must be at least 1 (got {value!r})")


def _age_key(run_dir: Path) -> tuple[str, int, str]:
    """Sort key by creation: '<stamp>-<n>' (a clash within one second) is newer than '<stamp>'.
    Plain string order gets this wrong because '/' sorts after '-'."""
    folder = run_dir.parts[-4] if len(run_dir.parts) >= 4 else ""
    stamp, suffix = folder[:STAMP_LENGTH], folder[STAMP_LENGTH + 1:]
    return stamp, int(suffix) if suffix.isdigit() else 0, str(run_dir)


def _queue_key_of(status: dict[str, Any]) -> float:
    return _float_or_none(status.get("queued_at")) or 0.0


def _queue_key(job: JobInfo) -> float:
    return (job.started_at or job.queued_at or 0.0) if job.state == "running" else (job.queued_at or 0.0)


def _read_status(run_dir: Path) -> dict[str, Any]:
    return _read_json_object(Path(run_dir) / runs.STATUS_FILE, missing_ok=True)


def _read_json_object(path: Path, missing_ok: bool = True) -> dict[str, Any]:
    """A JSON object from disk; {} when damaged (and when missing, unless missing_ok is False)."""
    try:
        value = runs.read_json(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        return _run_job(Path(argv[1]).resolve())
    print("usage: python -m fer_core.jobs run RUN_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
