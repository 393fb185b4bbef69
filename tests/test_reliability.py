"""Faults done for real: kill -9 mid-epoch, a failed checkpoint write, a full disk, an
unwritable runs folder. Nothing a user trained may be lost."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fer_core import runs
from fer_core.errors import FerError
from fer_core.train import fit, resume

from conftest import tiny_config

pytestmark = pytest.mark.train  # faults during real training runs

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float = 300, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def status_of(run_dir: Path) -> dict:
    try:
        return runs.read_json(run_dir / runs.STATUS_FILE)
    except (OSError, ValueError):
        return {}


def queued_run(config, experiment: str) -> Path:
    """A run folder as the job manager leaves it: config.json, ready for `train --run-dir`."""
    layout = runs.RunLayout.create(Path(config.runs_dir), experiment, config.mode)
    runs.atomic_write_json(layout.config_file, config.to_dict())
    return layout.path


def test_kill_9_mid_epoch_loses_nothing_and_resume_logs_every_epoch_once(tiny_demo, tmp_path):
    run_dir = queued_run(tiny_config(tiny_demo, tmp_path, epochs=4, img_size=32, batch_size=8), "kill")
    process = subprocess.Popen([sys.executable, "-m", "fer_core", "train", "--run-dir", str(run_dir)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # mid-epoch 2: epoch 1 checkpointed, some batches of epoch 2 done
        wait_for(lambda: status_of(run_dir).get("epoch") == 2 and 1 <= status_of(run_dir).get("batch", 0) < 6)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert runs.load_run(run_dir).state == "failed"
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["epoch"] == 1
    resume(run_dir)
    rows, bad = runs.read_metrics(run_dir)
    assert bad == 0 and [r["epoch"] for r in rows] == [1, 2, 3, 4]
    history = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["training_history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("epoch/val_acc")] == [1, 2, 3, 4]
    assert runs.load_run(run_dir).state == "completed"


def test_a_failure_between_checkpoint_write_and_rename_keeps_the_previous_checkpoint(
        tiny_demo, tmp_path, monkeypatch):
    real_replace = os.replace
    calls = {"n": 0}

    def replace_failing_in_epoch_2(src, dst):
        if str(dst).endswith("last.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.EIO, "injected failure before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_in_epoch_2)
    with pytest.raises(FerError, match="could not write"):
        fit(tiny_config(tiny_demo, tmp_path, epochs=3))
    monkeypatch.setattr(os, "replace", real_replace)
    run_dir = next((tmp_path / "runs").glob("*/*/*/*"))
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert runs.load_run(run_dir).state == "failed"
    resume(run_dir)
    assert [r["epoch"] for r in runs.read_metrics(run_dir)[0]] == [1, 2, 3]


def test_a_full_disk_is_a_clear_error_and_earlier_runs_are_untouched(tiny_demo, tmp_path, monkeypatch,
                                                                     trained_run):
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    import fer_core.models as models_module
    real = models_module.atomic_write_bytes

    def disk_full(path, data):
        if path.name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(models_module, "atomic_write_bytes", disk_full)
    with pytest.raises(FerError, match="No space left on device"):
        fit(tiny_config(tiny_demo, tmp_path, epochs=1))
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == before


@pytest.fixture
def small_tmpfs(tmp_path, trained_run):
    """A real tmpfs just big enough for one checkpoint of the tiny config (and the run's small
    files), not for the temp file of a second one beside it. Unmounted afterwards."""
    checkpoint_bytes = (trained_run / "checkpoints" / "last.pt").stat().st_size
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    size = int(checkpoint_bytes * 1.5) + 4 * 2**20
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}): "
                    "needs root with CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_real_full_disk_fails_the_run_in_words_and_keeps_the_earlier_checkpoint(tiny_demo, tmp_path,
                                                                                  small_tmpfs):
    """Issue #12 item 3, on a real full file system: torch's zip writer used to report it as
    "[enforce fail at inline_container.cc]" and the run stayed "running" for ever."""
    config = tiny_config(tiny_demo, tmp_path, epochs=3, runs_dir=str(small_tmpfs))
    run_dir = queued_run(config, "fulldisk")
    result = subprocess.run([sys.executable, "-m", "fer_core", "train", "--run-dir", str(run_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not write to") and "No space left on device" in error, result.stderr
    assert "enforce fail" not in result.stderr + result.stdout
    run = runs.load_run(run_dir)
    assert run.state == "failed" and run.status.state == "failed"  # not "running": the trainer is gone
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1  # the first checkpoint, intact
    assert [row["epoch"] for row in run.metrics][:1] == [1]
    assert not list(run_dir.rglob("*.tmp"))  # the half-written second checkpoint is gone


def test_an_unusable_runs_folder_is_a_clear_error(tiny_demo, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(FerError, match="cannot create a run directory"):
        fit(tiny_config(tiny_demo, tmp_path, runs_dir=str(blocker / "runs")))


KILL_EPOCHS = (2, 3, 3, 4)  # one kill -9 each, at whatever batch the trainer has reached (twice in epoch 3)


def trainer_reached(run_dir: Path, pid: int, epoch: int) -> dict | None:
    """The status once this trainer process is in `epoch` (or later), else None."""
    status = status_of(run_dir)
    return status if status.get("pid") == pid and status.get("epoch", 0) >= epoch else None


def test_repeated_kill_9_at_many_points_never_loses_or_repeats_an_epoch(tiny_demo, tmp_path):
    """Kill the trainer again and again at different points; resume each time; the finished
    run must hold every epoch exactly once and the same number of epochs as asked for."""
    epochs = 5
    run_dir = queued_run(tiny_config(tiny_demo, tmp_path, epochs=epochs, img_size=32, batch_size=4,
                                     num_threads=1), "killer")
    first = ["train", "--run-dir", str(run_dir)]
    again = ["train", "--resume", str(run_dir)]
    killed_at = []
    for index, epoch in enumerate(KILL_EPOCHS):
        process = subprocess.Popen([sys.executable, "-m", "fer_core", *(first if index == 0 else again)],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            status = wait_for(lambda: trainer_reached(run_dir, process.pid, epoch))
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        killed_at.append((status["epoch"], status.get("batch")))
        assert runs.load_run(run_dir).state == "failed"
        assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"] >= epoch - 1
    resume(run_dir)
    rows, bad = runs.read_metrics(run_dir)
    assert bad == 0 and [r["epoch"] for r in rows] == list(range(1, epochs + 1)), killed_at
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("epoch/train_loss")] == list(range(1, epochs + 1))
    assert runs.load_run(run_dir).state == "completed"
    assert len(killed_at) == len(KILL_EPOCHS)
    assert not list(run_dir.rglob("*.tmp"))  # no half-written save survives a completed run


def kill_right_after_a_checkpoint(run_dir: Path, process: subprocess.Popen, previous_inode: int | None) -> int:
    """SIGKILL the trainer the moment last.pt is replaced (a new inode: the rename of its atomic
    save), the window in which TensorBoard used to lag behind the checkpoint. Returns the inode."""
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            inode = last.stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != previous_inode:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            return inode
        if process.poll() is not None:
            raise AssertionError(f"the trainer exited ({process.returncode}) before saving a checkpoint")
        time.sleep(0.005)
    raise TimeoutError("no checkpoint written in time")


def test_a_kill_right_after_the_checkpoint_rename_loses_no_tensorboard_epoch(tiny_demo, tmp_path):
    """Issue #12 item 8: metrics.jsonl held epochs 1-3 but TensorBoard only 2-3, because the
    events were flushed after last.pt was renamed into place."""
    epochs = 4
    run_dir = queued_run(tiny_config(tiny_demo, tmp_path, epochs=epochs, img_size=32, batch_size=8,
                                     num_threads=1), "tbkill")
    inode = None
    killed_after = []
    for command in (["train", "--run-dir", str(run_dir)], ["train", "--resume", str(run_dir)]):
        process = subprocess.Popen([sys.executable, "-m", "fer_core", *command], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            inode = kill_right_after_a_checkpoint(run_dir, process, inode)
        finally:
            if process.poll() is None:
                process.kill()
        killed_after.append(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"])
        assert runs.load_run(run_dir).state == "failed"
    assert killed_after == [1, 2]
    resume(run_dir)
    rows, bad = runs.read_metrics(run_dir)
    assert bad == 0 and [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    for tag in ("epoch/train_loss", "epoch/val_acc"):
        assert [e.step for e in accumulator.Scalars(tag)] == list(range(1, epochs + 1)), tag
    assert not list(run_dir.rglob("*.tmp"))
