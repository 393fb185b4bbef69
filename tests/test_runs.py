import json
import os
import subprocess
import sys
import time

import pytest

from fer_core import runs
from fer_core.errors import FerError


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "status.json"
    runs.atomic_write_json(target, {"state": "running"})

    def exploding_writer(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runs.atomic_save(target, exploding_writer)
    assert json.loads(target.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def fake_run(runs_dir, trainer=None, job=None, name="exp"):
    """A run folder holding only the given status.json / job.json records."""
    layout = runs.RunLayout.create(runs_dir, name, "finetune")
    runs.atomic_write_json(layout.config_file, {"experiment": name, "mode": "finetune", "data": "demo"})
    if trainer is not None:
        runs.atomic_write_json(layout.status_file, runs.TrainerStatus(**trainer).to_dict())
    if job is not None:
        runs.atomic_write_json(layout.job_file, runs.JobRecord(**job).to_dict())
    return layout


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_trainer_writes_its_whole_record_and_keeps_what_earlier_attempts_learnt(tmp_path):
    layout = runs.RunLayout.create(tmp_path, "exp", "finetune")
    writer = runs.TrainerStatusWriter.start(layout, epochs=3)
    writer.update(epoch=2, best_val_acc=0.5, phase="training")
    writer.finish("cancelled")
    on_disk = runs.read_json(layout.status_file)
    assert on_disk["state"] == "cancelled" and on_disk["pid"] == os.getpid() and on_disk["epoch"] == 2
    first_start = on_disk["started_at"]
    again = runs.TrainerStatusWriter.start(layout, epochs=5)  # a resume: a new attempt
    record = runs.read_json(layout.status_file)
    assert record["state"] == "running" and record["epochs"] == 5 and record["epoch"] == 2
    assert record["started_at"] == first_start and record["attempt_started_at"] >= first_start
    with pytest.raises(AttributeError):
        again.update(no_such_field=1)
    with pytest.raises(ValueError):
        again.finish("exploded")


def test_a_running_trainer_whose_process_is_gone_reads_failed_or_cancelled(tmp_path):
    gone = dead_pid()
    assert runs.run_status(fake_run(tmp_path, {"state": "running", "pid": os.getpid()}))[0].state == "running"
    failed, _ = runs.run_status(fake_run(tmp_path, {"state": "running", "pid": gone}))
    assert failed.state == "failed" and failed.error == runs.DEAD_PROCESS_ERROR
    asked = fake_run(tmp_path, {"state": "running", "pid": gone})
    runs.atomic_write_json(asked.cancel_file, {"requested_at": 1.0, "grace_s": 1.0})
    assert runs.run_status(asked)[0].state == "cancelled"
    assert runs.run_status(fake_run(tmp_path, {"state": "completed", "pid": gone}))[0].state == "completed"


def test_the_job_record_decides_until_the_trainer_of_this_attempt_writes(tmp_path):
    now = time.time()
    queued = fake_run(tmp_path, job={"queued_at": now})
    assert runs.run_status(queued)[0].state == "queued"
    starting = fake_run(tmp_path, job={"queued_at": now, "runner_pid": os.getpid()})
    assert runs.run_status(starting)[0].state == "running"
    runner_died = fake_run(tmp_path, job={"queued_at": now, "runner_pid": dead_pid()})
    assert runs.run_status(runner_died)[0].state == "failed"
    cancelled = fake_run(tmp_path, job={"queued_at": now, "outcome": "cancelled"})
    assert runs.run_status(cancelled)[0].state == "cancelled"
    # a resume queued after the last attempt: that attempt's "cancelled" is history now
    resumed = fake_run(tmp_path, trainer={"state": "cancelled", "attempt_started_at": now - 60, "epoch": 3},
                       job={"queued_at": now, "resume": True, "resume_epochs": 9})
    status, problems = runs.run_status(resumed)
    assert (status.state, status.epoch, status.epochs, problems) == ("queued", 3, 9, [])
    # the trainer died without a word; its runner said how
    crashed = fake_run(tmp_path, trainer={"state": "running", "pid": dead_pid(), "attempt_started_at": now + 1},
                       job={"queued_at": now, "runner_pid": dead_pid(), "outcome": "failed",
                            "outcome_error": "process exited without finishing (killed by SIGKILL)"})
    status, _ = runs.run_status(crashed)
    assert status.state == "failed" and "SIGKILL" in status.error


def test_reading_a_state_never_writes(tmp_path):
    layout = fake_run(tmp_path, {"state": "running", "pid": dead_pid()}, {"queued_at": 1.0, "runner_pid": dead_pid()})
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in layout.path.iterdir()}
    assert runs.load_run(layout.path).state == "failed"
    assert runs.list_runs(tmp_path)[0].state == "failed"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in layout.path.iterdir()} == before


@pytest.mark.parametrize("file_name, content, reason", [
    ("status.json", "[1, 2]", "not a JSON object"),
    ("status.json", '{"state": "running", "finished_at": "yesterday"}', "finished_at"),
    ("status.json", '{"state": "exploded"}', "unknown state"),
    ("job.json", '{"queued_at": "soon"}', "queued_at"),
    ("evaluation.json", "[1, 2]", "evaluation.json"),
    ("evaluation.json", '{"accuracy": "high"}', "accuracy"),
    ("config.json", '{"data": 7}', "data"),
    ("metrics.jsonl", '{"epoch": 1, "val_acc": "great"}\n', "unreadable line"),
])
def test_a_wrongly_typed_file_marks_its_run_damaged_and_the_rest_still_loads(tmp_path, file_name, content, reason):
    fake_run(tmp_path, {"state": "completed", "pid": 1}, name="good")
    bad = fake_run(tmp_path, {"state": "completed", "pid": 1}, name="bad")
    (bad.path / file_name).write_text(content)
    listed = {run.experiment: run for run in runs.list_runs(tmp_path)}
    assert listed["good"].state == "completed"
    assert listed["bad"].state == "damaged"
    assert any(reason in problem for problem in listed["bad"].problems), listed["bad"].problems


def test_an_unreadable_metrics_file_marks_its_run_damaged_and_the_rest_still_loads(tmp_path):
    fake_run(tmp_path, {"state": "completed", "pid": 1}, name="good")
    bad = fake_run(tmp_path, {"state": "completed", "pid": 1}, name="bad")
    (bad.path / runs.METRICS_FILE).mkdir()  # reading it raises an OSError, as an unreadable file does
    listed = {run.experiment: run for run in runs.list_runs(tmp_path)}
    assert listed["good"].state == "completed"
    assert listed["bad"].state == "damaged" and listed["bad"].metrics == []
    assert any("metrics.jsonl cannot be read" in problem for problem in listed["bad"].problems), listed["bad"].problems


def test_torn_metric_lines_are_skipped_and_counted(tmp_path):
    runs.append_metrics(tmp_path, {"epoch": 1})
    with open(tmp_path / runs.METRICS_FILE, "a") as handle:
        handle.write('{"epoch": 2, "val')
    rows, bad = runs.read_metrics(tmp_path)
    assert rows == [{"epoch": 1}] and bad == 1


def test_new_run_dirs_follow_the_layout_and_never_collide(tmp_path):
    from datetime import datetime
    now = datetime(2026, 1, 2, 3, 4, 5)
    first = runs.new_run_dir(tmp_path, "exp", "finetune", now)
    second = runs.new_run_dir(tmp_path, "exp", "finetune", now)
    assert first.relative_to(tmp_path).parts == ("2026-01-02_03-04-05", "exp", "resnet18", "finetune")
    assert first != second and second.is_dir()
    assert runs.run_id(first) == "2026-01-02_03-04-05/exp/finetune"


def test_a_damaged_run_is_listed_as_damaged_and_others_still_load(trained_run, tmp_path):
    import shutil
    good = tmp_path / "r" / "2026-01-01_00-00-00" / "e" / "resnet18" / "finetune"
    bad = tmp_path / "r" / "2026-01-01_00-00-01" / "e" / "resnet18" / "finetune"
    shutil.copytree(trained_run, good)
    shutil.copytree(trained_run, bad)
    (bad / "status.json").write_text("{not json")
    with open(bad / "metrics.jsonl", "a") as handle:
        handle.write("garbage\n")
    listed = {run.path: run for run in runs.list_runs(tmp_path / "r")}
    assert set(listed) == {good, bad}
    assert not listed[good].damaged and listed[good].state == "completed"
    assert listed[good].test_accuracy is not None and len(listed[good].metrics) == 2
    assert listed[bad].damaged and any("status.json" in p for p in listed[bad].problems)
    assert any("1 unreadable line" in p for p in listed[bad].problems)


def test_runs_created_in_the_same_second_list_newest_first(tmp_path):
    from datetime import datetime
    now = datetime(2026, 1, 2, 3, 4, 5)
    made = [runs.RunLayout.create(tmp_path, "exp", "finetune", now) for _ in range(3)]
    for layout in made:
        runs.atomic_write_json(layout.job_file, runs.JobRecord(queued_at=1.0).to_dict())
    assert [layout.path for layout in runs.find_runs(tmp_path)] == [layout.path for layout in reversed(made)]
    assert [layout.stamp for layout in made] == ["2026-01-02_03-04-05", "2026-01-02_03-04-05-1",
                                                 "2026-01-02_03-04-05-2"]


def test_the_layout_knows_every_path_and_refuses_folders_of_another_shape(tmp_path):
    layout = runs.RunLayout.create(tmp_path / "runs", "exp", "head_only")
    assert layout.runs_dir == (tmp_path / "runs").resolve()
    assert (layout.experiment, layout.mode, layout.id.split("/")[1:]) == ("exp", "head_only", ["exp", "head_only"])
    assert layout.evaluation_file() == layout.path / "evaluation.json"
    other = layout.evaluation_file("/data/CK+ faces")
    assert other.parent == layout.path / "evaluations" and other.name.startswith("CK_faces-")
    assert layout.evaluation_file("/elsewhere/CK+ faces") != other  # same name, another folder
    assert layout.published_checkpoint(tmp_path).name == layout.id.replace("/", "_") + ".pt"
    with pytest.raises(FerError, match="not a run directory"):
        runs.RunLayout.of(layout.path.parent.parent)


def test_a_name_too_long_for_the_file_system_leaves_no_empty_folder(tmp_path):
    with pytest.raises(FerError, match="cannot create a run directory"):
        runs.RunLayout.create(tmp_path, "x" * 300, "finetune")
    assert list(tmp_path.iterdir()) == []


def test_delete_and_archive_refuse_a_folder_above_a_run(tmp_path):
    """Issue #12 item 12: the library's delete_run took a timestamp folder (with a running run
    in it) and removed it whole. Only a run folder itself can be deleted or archived."""
    from fer_core import run_admin

    running = fake_run(tmp_path, {"state": "running", "pid": os.getpid()}, name="live")
    finished = fake_run(tmp_path, {"state": "completed", "pid": 1}, name="done")
    stamp_folder = running.path.parents[2]
    for folder in (stamp_folder, running.path.parent, running.path.parents[1],
                   finished.path.parents[2], finished.path.parents[1], tmp_path):
        for action in (run_admin.delete_run, run_admin.archive_run):
            with pytest.raises(FerError, match="not a run|not inside"):
                action(folder, tmp_path)
    assert (running.path / runs.CONFIG_FILE).is_file() and (finished.path / runs.CONFIG_FILE).is_file()
    with pytest.raises(FerError, match="running"):
        run_admin.delete_run(running.path, tmp_path)
    run_admin.delete_run(finished.path, tmp_path)  # the run folder itself: removed
    assert not finished.path.exists() and running.path.is_dir()


def test_the_duration_counts_from_the_trainers_first_start_and_never_jumps_back(tmp_path):
    """Issue #11: the Duration counter fell from 10 s to 1 s when a queued job started (the runner
    and then the trainer each wrote their own start). Only the trainer's record says when."""
    layout = fake_run(tmp_path, job={"queued_at": time.time() - 20, "runner_pid": os.getpid(),
                                     "runner_started_at": time.time() - 10})
    starting = runs.load_run(layout.path)
    assert starting.state == "running" and starting.duration_s is None  # not from the queue or runner
    writer = runs.TrainerStatusWriter.start(layout, epochs=2)
    first = runs.load_run(layout.path).duration_s
    time.sleep(0.05)
    writer.update(epoch=1)
    assert 0 <= first <= runs.load_run(layout.path).duration_s < 5
