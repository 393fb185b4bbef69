"""Background training jobs whose whole state lives on disk, in each run's folder.

A page reload, a second browser tab or a restarted app therefore sees the same jobs: nothing
about a job is kept in memory except the handle used to reap a child process. The state shown
everywhere is `runs.run_status()`; this module only writes `job.json` (always under the queue
lock) and the `cancel` request, never the trainer's `status.json`.

Life of a job
-------------
launch() creates the run folder with config.json and job.json (queued), then pumps the queue.
Pumping works under an exclusive fcntl lock on <runs_dir>/.jobs.lock, so two tabs or processes
never start the same job or more than `max_concurrent` jobs. It starts the oldest queued job by
spawning a small *runner* process in its own session and recording its pid in job.json:

    python -m fer_core.jobs run RUN_DIR          (stdout/stderr appended to RUN_DIR/train.log)

The runner takes the same lock (so it starts only after that record is written), spawns the
*trainer* in a session of its own and records its pid:

    python -m fer_core train --run-dir RUN_DIR   (the trainer reads RUN_DIR/config.json)
    python -m fer_core train --resume RUN_DIR [--epochs N]

The trainer records its own progress and outcome in status.json. When it exits, the runner
records an outcome in job.json only if the trainer could not ('cancelled' when a cancel was
asked for, else 'failed' with the exit reason), then pumps the queue. The trainer pumps the
queue too when it finishes, so the next job starts even if its runner was killed, and with no
browser open. Drawing a page never starts anything.

    queued --(slot free: runner started)--> running --(trainer records it)--> completed
      |                                        |                              failed
      +--(cancel)--> cancelled                 +--(cancel file; SIGTERM/SIGKILL after grace)--> cancelled
    completed | failed | cancelled --(resume_job: job.json queued again)--> queued

Cancelling
----------
A queued job is marked cancelled in job.json at once. For a running job cancel() writes the
run's `cancel` request (the trainer stops within one batch, records 'cancelled' and keeps
last.pt). The runner is the reaper: if the trainer is still alive grace_s after the request it
sends SIGTERM to the trainer's process group (the trainer turns SIGTERM into a clean cancel), and
SIGKILL after another grace_s. If no runner is alive (a run started from a terminal, or a runner
that was killed) cancel() starts a daemon thread that does the same.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import runs
from .errors import ConfigError, FerError
from .runs import JobRecord, RunInfo, RunLayout, TrainerStatus

if TYPE_CHECKING:  # importing config pulls in torch; the runner process must start fast
    from .config import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = ".jobs.lock"
ACTIVE_STATES = runs.ACTIVE_STATES
DEAD_PROCESS_ERROR = runs.DEAD_PROCESS_ERROR
POLL_S = 0.2
PREVIOUS_EXIT_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 10.0


# ---- public API -----------------------------------------------------------------------

def launch(config: "TrainConfig", *, max_concurrent: int = 1) -> Path:
    """Queue a new training run and start it if a slot is free; return its run directory.

    Relative paths in the config are resolved against the caller's working directory (the
    trainer runs from the project root). Raises ConfigError before anything is written.
    """
    from .config import require_new_run_inputs

    _check_max_concurrent(max_concurrent)
    config = with_absolute_paths(config)
    config.validate()
    require_new_run_inputs(config)
    runs_dir = Path(config.runs_dir)
    with _queue_lock(runs_dir):
        layout = RunLayout.create(runs_dir, config.experiment, config.mode)
        runs.atomic_write_json(layout.config_file, config.to_dict())
        _write_job(layout, JobRecord(queued_at=time.time(), max_concurrent=max_concurrent))
        _pump_locked(runs_dir, max_concurrent)
    return layout.path


def resume_job(run_dir: Path, *, epochs: int | None = None, max_concurrent: int = 1) -> None:
    """Queue a finished, failed or cancelled run to continue from its last.pt (`train --resume`)."""
    _check_max_concurrent(max_concurrent)
    layout = RunLayout.of(Path(run_dir).resolve())
    with _queue_lock(layout.runs_dir):
        status = _check_resumable(layout, epochs)
        layout.cancel_file.unlink(missing_ok=True)  # the old request is spent
        previous, _ = runs.read_record(layout.job_file, JobRecord)
        still_exiting = [pid for pid in (status.pid, previous and previous.runner_pid,
                                         previous and previous.trainer_pid, _trainer_pid(layout))
                         if runs.pid_alive(pid)]
        _write_job(layout, JobRecord(queued_at=time.time(), max_concurrent=max_concurrent, resume=True,
                                     resume_epochs=epochs, previous_pids=sorted(set(still_exiting))))
        _pump_locked(layout.runs_dir, max_concurrent)


def cancel(run_dir: Path, *, grace_s: float = DEFAULT_GRACE_S) -> None:
    """Cancel a queued job at once, or ask a running one to stop (signals after grace_s)."""
    layout = RunLayout.of(Path(run_dir).resolve())
    with _queue_lock(layout.runs_dir):
        status, _ = runs.run_status(layout)
        if status.state == "queued":
            _update_job(layout, outcome="cancelled", ended_at=time.time())
            return
        if status.state != "running" or status.cancel_requested:
            return  # already ended, or a cancel is under way
        requested_at = time.time()
        runs.atomic_write_json(layout.cancel_file, {"requested_at": requested_at, "grace_s": grace_s})
    if not runs.pid_alive(status.runner_pid) and status.pid:
        # no runner to enforce the grace period (started from a terminal, or the runner died)
        threading.Thread(target=_reap_without_runner, name=f"fer-cancel-{layout.path.name}", daemon=True,
                         args=(layout, status.pid, requested_at, grace_s)).start()


def pump_queue(runs_dir: Path, *, max_concurrent: int | None = None) -> list[Path]:
    """Start the oldest queued jobs while slots are free; return the run folders started.

    `max_concurrent` defaults to what the oldest queued job asked for."""
    if max_concurrent is not None:
        _check_max_concurrent(max_concurrent)
    with _queue_lock(Path(runs_dir)):
        return _pump_locked(Path(runs_dir), max_concurrent)


def hand_on_slot(runs_dir: Path) -> None:
    """Called by every process the queue counts as a running run (a job's trainer, a training
    started from a terminal, an ensemble being built) as it ends: the oldest queued job starts
    if a slot is now free, even with no runner and no browser left to do it. A runs folder in
    which no job was ever queued has no lock file and nothing to start."""
    runs_dir = Path(runs_dir)
    if not (runs_dir / LOCK_FILE).is_file():
        return
    try:
        pump_queue(runs_dir)
    except (FerError, OSError) as exc:  # the run itself is recorded; say why the queue waits
        logging.getLogger("fer_core.jobs").warning("could not start the next queued job: %s", exc)


def active_runs(runs_dir: Path) -> list[RunInfo]:
    """Running jobs (oldest start first), then queued jobs in the order they will start."""
    active = [run for run in runs.list_runs(Path(runs_dir)) if run.status.active]
    return sorted(active, key=lambda r: (r.status.state != "running", _queue_position(r.status),
                                         r.layout.age_key))


# ---- job.json (written here only, under the queue lock) ---------------------------------

def _queue_lock(runs_dir: Path) -> "AbstractContextManager[None]":
    """Exclusive lock over one runs folder's queue and its job records, across processes."""
    return runs.exclusive_lock(Path(runs_dir) / LOCK_FILE)


def _write_job(layout: RunLayout, record: JobRecord) -> None:
    runs.atomic_write_json(layout.job_file, record.to_dict())


def _read_job(layout: RunLayout) -> JobRecord | None:
    return runs.read_record(layout.job_file, JobRecord)[0]


def _update_job(layout: RunLayout, **changes: object) -> JobRecord:
    """Read-modify-write job.json; the caller holds the queue lock, so no update is lost."""
    record = _read_job(layout) or JobRecord(queued_at=time.time())
    record = dataclasses.replace(record, **changes)
    _write_job(layout, record)
    return record


def _trainer_pid(layout: RunLayout) -> int | None:
    trainer, _ = runs.read_record(layout.status_file, TrainerStatus)
    return trainer.pid if trainer is not None else None


# ---- the queue ------------------------------------------------------------------------

def _pump_locked(runs_dir: Path, max_concurrent: int | None) -> list[Path]:
    running, queued = 0, []
    for layout in runs.find_runs(runs_dir):
        status, _ = runs.run_status(layout)
        if status.state == "running":
            running += 1
        elif status.state == "queued":
            queued.append((_queue_position(status), layout.age_key, layout, status))
    queued.sort(key=lambda item: item[:2])
    started = []
    for _, _, layout, status in queued:
        if running >= (max_concurrent or status.max_concurrent):
            break
        _start_runner(layout)
        started.append(layout.path)
        running += 1
    return started


def _start_runner(layout: RunLayout) -> None:
    """Spawn the runner for a queued job and record it (the caller holds the lock). If it cannot
    be spawned the job ends failed, saying why, rather than waiting in the queue to start on
    some later pump after the caller was told that nothing started."""
    try:
        pid = spawn_detached(["-m", "fer_core.jobs", "run", str(layout.path.resolve())], layout.log_file)
    except OSError as exc:
        _update_job(layout, outcome="failed", outcome_error=f"could not start its runner: {exc}",
                    ended_at=time.time())
        raise
    _update_job(layout, runner_pid=pid, runner_started_at=time.time())


def spawn_detached(python_args: list[str], log_file: Path) -> int:
    """Start `python <python_args>` from the project root in a session of its own, stdout and
    stderr appended to `log_file`; return its pid. It survives the app (a page reload, a
    restart); a thread reaps it when it ends, so it never lingers as a zombie of the caller."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen([sys.executable, *python_args], cwd=PROJECT_ROOT, env=_child_env(),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    threading.Thread(target=process.wait, name=f"fer-reap-{process.pid}", daemon=True).start()
    return process.pid


def _check_resumable(layout: RunLayout, epochs: int | None) -> runs.RunStatus:
    status, _ = runs.run_status(layout)
    if status.active:
        raise FerError(f"cannot resume {layout.id}: it is {status.state}")
    if not layout.last_checkpoint.is_file():
        raise FerError(f"cannot resume {layout.id}: it has no checkpoints/last.pt (no epoch finished)")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be a whole number of at least 1 (got {epochs})")
    trained = max((int(row.get("epoch", 0)) for row in runs.read_metrics(layout.path)[0]), default=0)
    config, _ = runs.read_json_object(layout.config_file)
    planned = status.epochs or (config or {}).get("epochs")  # the latest attempt's total first
    target = epochs or (planned if isinstance(planned, int) else 0)
    if target < trained or (status.state == "completed" and target == trained):
        raise FerError(f"cannot resume {layout.id}: it has trained {trained} epochs; "
                       f"ask for more than {trained}")
    if config is not None and epochs is not None:  # what the trainer would refuse, refused before it is queued
        from .config import TrainConfig
        try:
            TrainConfig.from_dict({**config, "epochs": epochs}).validate()
        except TypeError as exc:
            raise FerError(f"cannot resume {layout.id}: its config.json does not hold together ({exc})") from exc
    return status


# ---- the runner process ---------------------------------------------------------------

def _run_job(run_dir: Path) -> int:
    """Entry of `python -m fer_core.jobs run RUN_DIR`: train, record the outcome, pump."""
    layout = RunLayout.of(run_dir)
    with _queue_lock(layout.runs_dir):  # waits until the launcher has recorded us
        job = _read_job(layout)
    if job is None or job.runner_pid != os.getpid() or job.outcome:
        _say("not starting: this job is not assigned to this runner")
        return 0
    # a resumed run's previous trainer may still be exiting: never two trainers in one folder
    _wait_until_gone(job.previous_pids, PREVIOUS_EXIT_TIMEOUT_S)
    with _queue_lock(layout.runs_dir):
        trainer = _spawn_trainer(layout)
    if trainer is not None:
        code = _supervise(layout, trainer)
        with _queue_lock(layout.runs_dir):
            job = _read_job(layout)
            # only while the run is still ours: it may already have been resumed under a new runner
            if job is not None and job.runner_pid == os.getpid() and not _trainer_recorded_outcome(layout, job):
                outcome = "cancelled" if runs.cancel_request(layout) else "failed"
                error = None if outcome == "cancelled" else f"{DEAD_PROCESS_ERROR} ({_describe_exit(code)})"
                _update_job(layout, outcome=outcome, outcome_error=error, ended_at=time.time())
                _say(f"trainer exited with {_describe_exit(code)} without recording an outcome: {outcome}")
    pump_queue(layout.runs_dir)
    return 0


def _spawn_trainer(layout: RunLayout) -> subprocess.Popen | None:
    """Start the trainer and record its pid (the caller holds the lock); None if it must not run."""
    job = _read_job(layout)
    if job is None or job.runner_pid != os.getpid() or job.outcome:
        return None
    if runs.cancel_request(layout):
        _update_job(layout, outcome="cancelled", ended_at=time.time())
        return None
    if job.resume:
        args = ["train", "--resume", str(layout.path)] + (["--epochs", str(job.resume_epochs)]
                                                          if job.resume_epochs else [])
    else:
        args = ["train", "--run-dir", str(layout.path)]
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "fer_core", *args], cwd=PROJECT_ROOT,
                                   env=_child_env(), stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        _update_job(layout, outcome="failed", outcome_error=f"could not start the trainer: {exc}",
                    ended_at=time.time())
        return None
    _update_job(layout, trainer_pid=trainer.pid)
    return trainer


def _trainer_recorded_outcome(layout: RunLayout, job: JobRecord) -> bool:
    """Did the trainer of this attempt write a final state to status.json?"""
    trainer, _ = runs.read_record(layout.status_file, TrainerStatus)
    return (trainer is not None and trainer.state in runs.FINAL_STATES
            and (trainer.attempt_started_at or trainer.started_at or 0.0) >= job.queued_at)


def _wait_until_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(runs.pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _supervise(layout: RunLayout, trainer: subprocess.Popen) -> int:
    """Wait for the trainer; once a cancel is requested, enforce its grace period."""
    while True:
        with suppress(subprocess.TimeoutExpired):  # still running: check for a cancel, wait again
            return trainer.wait(timeout=POLL_S)
        request = runs.cancel_request(layout)
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


def _reap_without_runner(layout: RunLayout, pid: int, requested_at: float, grace_s: float) -> None:
    """cancel()'s fallback reaper thread, for a job that has no live runner."""
    with suppress(ProcessLookupError):  # it may end on its own between the check and getpgid
        if runs.pid_alive(pid):
            _stop_after_grace(os.getpgid(pid), lambda: runs.pid_alive(pid), requested_at, grace_s)
    pump_queue(layout.runs_dir)


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

def _queue_position(status: runs.RunStatus) -> float:
    return status.queued_at or 0.0


def with_absolute_paths(config: "TrainConfig") -> "TrainConfig":
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


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        return _run_job(Path(argv[1]).resolve())
    print("usage: python -m fer_core.jobs run RUN_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
