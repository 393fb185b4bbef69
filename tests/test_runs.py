import json
import os
import subprocess
import sys

import pytest

from fer_core import runs


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


def test_status_merges_fields_and_validates_state(tmp_path):
    runs.write_status(tmp_path, "running", pid=123, epoch=1)
    status = runs.write_status(tmp_path, "running", epoch=2)
    assert status["pid"] == 123 and status["epoch"] == 2
    with pytest.raises(ValueError):
        runs.write_status(tmp_path, "exploded")


def test_a_running_status_whose_process_is_gone_shows_failed(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert runs.effective_state({"state": "running", "pid": process.pid}) == "failed"
    assert runs.effective_state({"state": "running", "pid": os.getpid()}) == "running"
    assert runs.effective_state({"state": "completed", "pid": process.pid}) == "completed"


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
    made = [runs.new_run_dir(tmp_path, "exp", "finetune", now) for _ in range(3)]
    for path in made:
        runs.write_status(path, "queued")
    assert runs.find_run_dirs(tmp_path) == list(reversed(made))
