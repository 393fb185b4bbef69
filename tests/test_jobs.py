"""Background jobs with real trainer processes: queue, cancel, crash, restart, races, resume.

Every job trains a tiny ResNet18 (7 classes x 8 images, 32 px, one thread) so a short run
takes seconds; "long" jobs have many epochs and are cancelled or killed early. A finalizer
kills whatever a test left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from fer_core import jobs, runs
from fer_core.config import TrainConfig
from fer_core.errors import ConfigError, FerError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0   # a trainer imports torch and loads data first; slow when the CPU is busy
FINISH_TIMEOUT_S = 120.0


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until predicate() is truthy; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def status_of(run_dir: Path) -> runs.RunStatus:
    return runs.run_status(run_dir)[0]


def trainer_record(run_dir: Path) -> runs.TrainerStatus | None:
    """status.json as the trainer wrote it."""
    return runs.read_record(run_dir / runs.STATUS_FILE, runs.TrainerStatus)[0]


def job_record(run_dir: Path) -> runs.JobRecord | None:
    return runs.read_record(run_dir / runs.JOB_FILE, runs.JobRecord)[0]


def state_is(run_dir: Path, *states: str) -> Callable[[], bool]:
    return lambda: status_of(run_dir).state in states


def trainer_started(run_dir: Path) -> Callable[[], bool]:
    """The runner has spawned the trainer and the trainer has written its record."""
    def check() -> bool:
        status, job = status_of(run_dir), job_record(run_dir)
        return (status.state == "running" and job is not None and status.pid is not None
                and status.pid != job.runner_pid and runs.pid_alive(status.pid))
    return check


def epochs_logged(run_dir: Path, n: int) -> Callable[[], bool]:
    return lambda: len(runs.read_metrics(run_dir)[0]) >= n


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fer_core.demo import generate_demo_dataset
    return generate_demo_dataset(tmp_path_factory.mktemp("jobs_demo") / "demo", per_class=8, seed=0)


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh runs folder; at the end every job process still alive in it is killed."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))  # inherited by the children
    folder = tmp_path / "runs"
    yield folder
    _kill_everything_in(folder)


def _kill_everything_in(folder: Path) -> None:
    pids = set()
    for run_dir in runs.find_run_dirs(folder):
        trainer, job = trainer_record(run_dir), job_record(run_dir)
        candidates = [trainer.pid if trainer else None] + ([job.runner_pid, job.trainer_pid] if job else [])
        pids.update(p for p in candidates if runs.pid_alive(p))
    own_group = os.getpgid(0)
    # never pytest itself, nor init (a record may name pid 1 as a stand-in)
    pids = {p for p in pids if p > 1 and p != os.getpid() and os.getpgid(p) != own_group}
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(runs.pid_alive(p) for p in pids), 10, "leftover job processes to die")


@pytest.fixture
def make_config(demo_data: Path, runs_dir: Path, tmp_path: Path) -> Callable[..., TrainConfig]:
    def make(**overrides: Any) -> TrainConfig:
        values = dict(data=str(demo_data), epochs=2, img_size=32, batch_size=16, val_fraction=0.2,
                      runs_dir=str(runs_dir), checkpoints_dir=str(tmp_path / "ckpt"), pretrained=False,
                      num_threads=1)
        values.update(overrides)
        return TrainConfig(**values)
    return make


def fake_run(runs_dir: Path, trainer: dict[str, Any] | None = None, job: dict[str, Any] | None = None) -> Path:
    """A run directory with only records (no process of ours behind it)."""
    layout = runs.RunLayout.create(runs_dir, "fake", "finetune")
    runs.atomic_write_json(layout.config_file, {"experiment": "fake", "mode": "finetune", "epochs": 2})
    if trainer is not None:
        runs.atomic_write_json(layout.status_file, runs.TrainerStatus(**trainer).to_dict())
    if job is not None:
        runs.atomic_write_json(layout.job_file, runs.JobRecord(**job).to_dict())
    return layout.path


def fresh_process_view(runs_dir: Path) -> list[list[Any]]:
    """What a freshly started app would see: list_runs() in a brand-new interpreter."""
    code = ("import json, sys; from fer_core.runs import list_runs; "
            "print(json.dumps([[str(r.path), r.state, r.status.pid] for r in list_runs(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, str(runs_dir)], cwd=PROJECT_ROOT, check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def view(runs_dir: Path) -> list[list[Any]]:
    return [[str(r.path), r.state, r.status.pid] for r in runs.list_runs(runs_dir)]


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# ---- without processes ----------------------------------------------------------------

def test_launch_writes_the_config_and_a_queued_job_record_and_never_flags(make_config, runs_dir):
    busy = fake_run(runs_dir, trainer={"state": "running", "pid": os.getpid()})  # the one slot is taken
    config = make_config(notes={"why": "any field travels: the trainer reads config.json"}, test_fraction=0.3)
    run_dir = jobs.launch(config)
    assert runs.read_json(run_dir / runs.CONFIG_FILE) == config.to_dict()
    job = job_record(run_dir)
    assert job is not None and job.runner_pid is None and job.queued_at > 0
    assert status_of(run_dir).state == "queued" and status_of(busy).state == "running"
    assert not (run_dir / runs.STATUS_FILE).exists()  # only the trainer ever writes status.json


def test_a_run_started_outside_the_queue_hands_its_slot_on_when_it_ends(make_config, runs_dir, monkeypatch):
    """A terminal `fer train` (or an ensemble being built) counts as running, so a job queued
    behind it starts when it ends: the ending process pumps the queue (no runner, no browser)."""
    from fer_core import cli
    terminal = fake_run(runs_dir, trainer={"state": "running", "pid": os.getpid()})
    queued = jobs.launch(make_config())
    assert status_of(queued).state == "queued"
    started = []
    monkeypatch.setattr(jobs, "_start_runner", lambda layout: started.append(layout.path))
    record = runs.read_json(terminal / runs.STATUS_FILE)
    runs.atomic_write_json(terminal / runs.STATUS_FILE, {**record, "state": "completed", "finished_at": time.time()})
    cli._start_next_job(None, make_config())  # as `fer train --data ...` ends
    assert started == [queued]


def test_handing_on_a_slot_where_no_job_was_ever_queued_touches_nothing(runs_dir):
    fake_run(runs_dir, trainer={"state": "completed", "pid": dead_pid()})
    jobs.hand_on_slot(runs_dir)
    assert not (runs_dir / jobs.LOCK_FILE).exists()


def test_a_job_whose_runner_cannot_be_started_ends_failed_instead_of_waiting_queued(make_config, runs_dir,
                                                                                    monkeypatch):
    def no_fork(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(jobs, "spawn_detached", no_fork)
    with pytest.raises(OSError):
        jobs.launch(make_config())
    run_dir, = runs.find_run_dirs(runs_dir)
    status = status_of(run_dir)
    assert status.state == "failed" and "could not start its runner" in status.error
    started = []
    monkeypatch.setattr(jobs, "_start_runner", lambda layout: started.append(layout.path))
    jobs.pump_queue(runs_dir)
    assert started == []  # a later pump does not start it behind the user's back


def test_an_invalid_config_is_refused_before_anything_is_written(make_config, runs_dir):
    with pytest.raises(ConfigError, match="epochs"):
        jobs.launch(make_config(epochs=0))
    assert runs.find_run_dirs(runs_dir) == []


def test_resume_is_refused_for_active_runs_and_runs_without_last_checkpoint(runs_dir):
    queued = fake_run(runs_dir, job={"queued_at": time.time()})
    with pytest.raises(FerError, match="queued"):
        jobs.resume_job(queued)
    running = fake_run(runs_dir, trainer={"state": "running", "pid": os.getpid()})
    with pytest.raises(FerError, match="running"):
        jobs.resume_job(running)
    cancelled = fake_run(runs_dir, trainer={"state": "cancelled"})
    with pytest.raises(FerError, match="last.pt"):
        jobs.resume_job(cancelled)
    assert status_of(cancelled).state == "cancelled" and job_record(cancelled) is None


def test_a_resume_the_trainer_would_refuse_is_refused_before_it_is_queued(make_config, runs_dir):
    run_dir = fake_run(runs_dir, trainer={"state": "cancelled", "epochs": 2})
    runs.atomic_write_json(run_dir / runs.CONFIG_FILE, make_config().to_dict())
    (run_dir / runs.CHECKPOINT_DIR).mkdir()
    (run_dir / runs.CHECKPOINT_DIR / "last.pt").write_bytes(b"stand-in: never loaded here")
    with pytest.raises(ConfigError, match="epochs"):
        jobs.resume_job(run_dir, epochs=10_001)
    assert job_record(run_dir) is None and status_of(run_dir).state == "cancelled"


def test_a_dead_running_job_reads_failed_with_its_log_and_nothing_is_rewritten(runs_dir):
    run_dir = fake_run(runs_dir, trainer={"state": "running", "pid": dead_pid()},
                       job={"queued_at": 1.0, "runner_pid": dead_pid()})
    (run_dir / runs.LOG_FILE).write_text("epoch 1/5 ...\nTraceback: something broke\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    run = runs.load_run(run_dir)
    assert run.state == "failed" and run.status.error == jobs.DEAD_PROCESS_ERROR
    assert "something broke" in run.log_tail()
    assert jobs.pump_queue(runs_dir) == []
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_two_processes_updating_job_records_lose_no_update(runs_dir):
    """Every job.json write is a read-modify-write under the queue lock: hammer it from two
    processes at once, each appending its own numbers, and count what survived."""
    run_dir = fake_run(runs_dir, job={"queued_at": 1.0})
    code = ("import sys; from pathlib import Path; from fer_core import jobs; from fer_core.runs import RunLayout\n"
            "layout = RunLayout(Path(sys.argv[1])); start = int(sys.argv[2])\n"
            "for i in range(start, start + 150):\n"
            "    with jobs._queue_lock(layout.runs_dir):\n"
            "        record = jobs._read_job(layout)\n"
            "        jobs._update_job(layout, previous_pids=record.previous_pids + [i])\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(start)], cwd=PROJECT_ROOT)
               for start in (0, 1000)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert sorted(job_record(run_dir).previous_pids) == [*range(150), *range(1000, 1150)]


def test_a_cancel_is_never_lost_while_the_trainer_writes_progress(runs_dir):
    """The trainer rewrites status.json many times a second; the cancel request lives in its own
    file, so no interleaving of the two writers can lose it (or the progress)."""
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live "runner":
    run_dir = fake_run(runs_dir, job={"queued_at": 1.0, "runner_pid": runner.pid})  # so no reaper thread
    layout = runs.RunLayout(run_dir)
    writer = runs.TrainerStatusWriter.start(layout, epochs=1000)
    stop = threading.Event()

    def progress() -> None:
        epoch = 0
        while not stop.is_set():
            epoch += 1
            writer.update(epoch=epoch, batch=epoch % 7)

    thread = threading.Thread(target=progress)
    thread.start()
    try:
        time.sleep(0.2)
        jobs.cancel(run_dir, grace_s=600)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
        runner.kill()
        runner.wait()
    assert status_of(run_dir).cancel_requested
    assert runs.read_json(run_dir / runs.STATUS_FILE)["epoch"] == writer.record.epoch > 1


def test_cancel_escalates_to_sigkill_when_the_process_ignores_sigterm(runs_dir):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        # no runner: cancel's own reaper acts
        run_dir = fake_run(runs_dir, trainer={"state": "running", "pid": stubborn.pid})
        started = time.monotonic()
        jobs.cancel(run_dir, grace_s=0.3)
        assert (run_dir / runs.CANCEL_FILE).exists() and status_of(run_dir).cancel_requested
        assert stubborn.wait(timeout=10) == -signal.SIGKILL
        assert time.monotonic() - started >= 0.6  # SIGKILL only after grace + grace
        wait_for(state_is(run_dir, "cancelled"), 5, "the state to read 'cancelled'")
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


def test_read_log_tail_keeps_the_last_lines_as_a_progress_bar_finally_showed_them(tmp_path):
    (tmp_path / runs.LOG_FILE).write_text("".join(f"line {i}\n" for i in range(100)) + "bar 10%\rbar 90%\n\n")
    tail = runs.read_log_tail(tmp_path, lines=3)
    assert tail.splitlines() == ["line 98", "line 99", "bar 90%"]
    assert runs.read_log_tail(tmp_path / "missing") == ""


# ---- with real trainer processes ------------------------------------------------------

def test_queued_jobs_run_one_at_a_time_in_order_and_continue_without_the_app(make_config, runs_dir):
    first = jobs.launch(make_config(epochs=1))
    second = jobs.launch(make_config(epochs=1, experiment="second"))
    assert first != second
    assert [r.path for r in jobs.active_runs(runs_dir)] == [first, second]
    assert status_of(first).state == "running" and job_record(first).runner_pid
    assert status_of(second).state == "queued" and job_record(second).runner_pid is None
    assert jobs.pump_queue(runs_dir) == []  # the slot is taken: pumping again starts nothing

    # a restarted app (a new interpreter) reads the same jobs from disk
    for _ in range(5):
        before, fresh, after = view(runs_dir), fresh_process_view(runs_dir), view(runs_dir)
        if before == after:
            assert fresh == before
            break
    else:
        pytest.fail("the jobs kept changing while comparing views")

    # only reads from here on: the first job's runner must start the second one by itself
    wait_for(trainer_started(first), START_TIMEOUT_S, "the first trainer to start")
    assert status_of(second).state == "queued"
    wait_for(state_is(first, "completed"), FINISH_TIMEOUT_S, "the first job to complete")
    wait_for(state_is(second, "running", "completed"), 30, "the second job to start by itself")
    wait_for(state_is(second, "completed"), FINISH_TIMEOUT_S, "the second job to complete")

    one, two = runs.load_run(first), runs.load_run(second)
    assert job_record(second).runner_started_at >= one.status.finished_at  # not a moment before
    assert (one.status.epoch, one.status.epochs, two.status.epoch, two.status.epochs) == (1, 1, 1, 1)
    assert (one.experiment, two.experiment) == ("default", "second")
    for run_dir in (first, second):
        assert (run_dir / runs.EVALUATION_FILE).is_file()
        assert runs.read_json(run_dir / runs.CONFIG_FILE)["img_size"] == 32
        runner = job_record(run_dir).runner_pid
        wait_for(lambda: not runs.pid_alive(runner), 10, "the runner to exit after its job")
    assert "test accuracy" in one.log_tail()
    assert jobs.active_runs(runs_dir) == []
    assert view(runs_dir) == fresh_process_view(runs_dir)


def test_cancel_stops_a_running_job_keeps_last_pt_and_resume_finishes_it(make_config, runs_dir):
    run_dir = jobs.launch(make_config(epochs=200))
    wait_for(epochs_logged(run_dir, 1), START_TIMEOUT_S, "the first epoch")
    trainer_pid = trainer_record(run_dir).pid
    started = time.monotonic()
    jobs.cancel(run_dir, grace_s=60)  # a long grace: the engine itself must stop within a batch
    wait_for(state_is(run_dir, "cancelled"), 20, "the job to be cancelled")
    assert time.monotonic() - started < 20
    wait_for(lambda: not runs.pid_alive(trainer_pid), 10, "the trainer to exit")
    assert trainer_record(run_dir).state == "cancelled"  # written by the engine, not inferred
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    trained = len(runs.read_metrics(run_dir)[0])
    assert 1 <= trained < 200

    target = trained + 1
    jobs.resume_job(run_dir, epochs=target)
    with pytest.raises(FerError, match="queued|running"):
        jobs.resume_job(run_dir, epochs=target)
    wait_for(state_is(run_dir, "completed"), FINISH_TIMEOUT_S, "the resumed job to complete")
    rows, bad = runs.read_metrics(run_dir)
    assert bad == 0 and [row["epoch"] for row in rows] == list(range(1, target + 1))
    status = status_of(run_dir)
    assert status.epoch == target and (run_dir / runs.EVALUATION_FILE).is_file()
    # the cancelled trainer's runner, exiting late, must not have touched the resumed run
    assert status.error is None and "without recording an outcome" not in runs.read_log_tail(run_dir)
    assert job_record(run_dir).outcome is None


def test_a_killed_trainer_shows_failed_with_its_log_and_the_queue_moves_on(make_config, runs_dir):
    doomed = jobs.launch(make_config(epochs=200))
    waiting = jobs.launch(make_config(epochs=200, experiment="next"))
    wait_for(lambda: "epoch 1/200" in runs.read_log_tail(doomed), START_TIMEOUT_S, "the first epoch's log line")
    trainer_pid = trainer_record(doomed).pid
    os.kill(trainer_pid, signal.SIGKILL)
    wait_for(state_is(doomed, "failed"), 10, "the killed job to show as failed")
    run = runs.load_run(doomed)
    assert run.status.error.startswith(jobs.DEAD_PROCESS_ERROR)
    assert "epoch 1/200" in run.log_tail()
    wait_for(lambda: job_record(doomed).outcome == "failed", 10, "the runner to record the outcome")
    assert "SIGKILL" in status_of(doomed).error
    # nobody called pump_queue: the dead job's runner started the next one
    wait_for(state_is(waiting, "running"), 30, "the queued job to start after the crash")
    jobs.cancel(waiting, grace_s=0.5)
    wait_for(state_is(waiting, "cancelled"), 30, "the second job to be cancelled")


def test_threads_launching_at_once_start_exactly_one_job(make_config, runs_dir):
    barrier = threading.Barrier(4)  # four tabs pressing "train" at the same moment
    launched: list[Path] = []
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            barrier.wait()
            launched.append(jobs.launch(make_config(epochs=200)))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=launch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(set(launched)) == 4
    states = sorted(status_of(run_dir).state for run_dir in launched)
    assert states == ["queued", "queued", "queued", "running"]
    assert len([r for r in launched if job_record(r).runner_pid]) == 1
    # no job was started twice either (a second runner for one job would log that it stood down)
    time.sleep(1.0)  # a runner that would stand down needs a moment to start and say so
    assert not any("not starting" in runs.read_log_tail(r) for r in launched)

    queued = [r for r in launched if status_of(r).state == "queued"]
    running = next(r for r in launched if r not in queued)
    for run_dir in queued:
        jobs.cancel(run_dir)
        assert status_of(run_dir).state == "cancelled"  # at once, no process involved
    jobs.cancel(running, grace_s=0.5)
    wait_for(state_is(running, "cancelled"), 30, "the running job to be cancelled")
    wait_for(lambda: not runs.pid_alive(job_record(running).runner_pid), 10, "the runner to exit")
    assert all(status_of(r).state == "cancelled" and status_of(r).started_at is None for r in queued)


def test_a_killed_runner_does_not_stall_the_queue(make_config, runs_dir):
    """Issue #12 item 12: kill -9 of the first job's runner (not its trainer). The trainer
    finishes on its own and hands the slot on: the queued job starts with no app open and no
    pump_queue call from here."""
    first = jobs.launch(make_config(epochs=2))
    second = jobs.launch(make_config(epochs=1, experiment="second"))
    wait_for(lambda: trainer_record(first) is not None, START_TIMEOUT_S, "the first trainer's record")
    runner_pid = job_record(first).runner_pid
    trainer_pid = trainer_record(first).pid
    assert runner_pid and trainer_pid and runner_pid != trainer_pid
    os.kill(runner_pid, signal.SIGKILL)
    wait_for(lambda: not runs.pid_alive(runner_pid), 10, "the runner to die")
    assert runs.pid_alive(trainer_pid) and status_of(second).state == "queued"
    wait_for(state_is(first, "completed"), FINISH_TIMEOUT_S, "the orphaned trainer to complete")
    wait_for(state_is(second, "running", "completed"), 60, "the queued job to start by itself")
    wait_for(state_is(second, "completed"), FINISH_TIMEOUT_S, "the second job to complete")
    assert runs.load_run(first).status.epoch == 2 and runs.load_run(second).status.epoch == 1
