"""Any JSON of any shape in any run-folder file (issue #12 item 7): the run it belongs to is
read as a RunInfo (marked damaged, with the reason, when the file is unusable), never an
exception; everything the app and the CLI compute from a RunInfo works on it; and
`fer runs` still prints every run.

Hypothesis writes arbitrary JSON values, and objects holding each file's own keys with values
of any type, into one file of an otherwise well-formed run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fer_core import runs, ui_data
from fer_core.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["angry", "happy", "sad"]

# Every JSON file of a run folder that is read by the library, with the keys its writer uses.
RUN_FILE_KEYS = {
    runs.CONFIG_FILE: ["data", "experiment", "mode", "epochs", "img_size", "batch_size", "lr", "preset",
                       "stem", "pretrained", "seed", "max_per_class", "amp", "tta"],
    runs.ENVIRONMENT_FILE: ["classes", "synthetic_data", "selection_split", "weights_source",
                            "weights_warning", "num_test", "device", "num_train"],
    runs.STATUS_FILE: [f.name for f in runs.fields(runs.TrainerStatus)],
    runs.JOB_FILE: [f.name for f in runs.fields(runs.JobRecord)],
    runs.EVALUATION_FILE: ["accuracy", "macro_f1", "classes", "confusion_matrix", "num_images", "report",
                           "best_epoch", "split", "data", "synthetic", "tta"],
    runs.METRICS_FILE: list(runs._METRIC_KINDS),
    runs.CANCEL_FILE: ["requested_at", "grace_s"],
}

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.sampled_from([10**400, -10**400, 1e308, -1e308, 2**63, -1, 0, 1])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["running", "completed", "failed", "queued", "cancelled", "demo", "test",
                              "val", "happy", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def shaped_objects(file_name: str) -> st.SearchStrategy:
    """Objects with this file's own keys, each holding any JSON value."""
    return st.dictionaries(st.sampled_from(RUN_FILE_KEYS[file_name]), json_values, max_size=8)


def mutated(file_name: str) -> st.SearchStrategy:
    """The well-formed content of this file with some of its keys (and, for evaluation.json,
    some per-class scores) replaced by any JSON value: the shapes a near-miss writer leaves."""
    good = GOOD_CONTENT[file_name]
    report_changes = st.dictionaries(st.sampled_from(CLASSES + ["macro avg"]),
                                     json_values | st.dictionaries(
                                         st.sampled_from(["precision", "recall", "f1-score", "support"]),
                                         json_values, min_size=1), max_size=2)

    def merge(changes: dict, report: dict) -> dict:
        merged = {**good, **changes}
        if file_name == runs.EVALUATION_FILE and report:
            merged["report"] = {**good["report"], **{c: ({**good["report"].get(c, {}), **v}
                                                         if isinstance(v, dict) else v)
                                                     for c, v in report.items()}}
        return merged

    return st.builds(merge, shaped_objects(file_name), report_changes)


def any_content(file_name: str) -> st.SearchStrategy:
    return json_values | shaped_objects(file_name) | mutated(file_name) | mutated(file_name)


NOW = time.time()
GOOD_CONTENT = {
    runs.CONFIG_FILE: {"data": "demo", "experiment": "fuzzed", "mode": "finetune", "epochs": 2, "img_size": 48,
                       "batch_size": 16, "lr": 0.001, "stem": "imagenet", "seed": 0},
    runs.ENVIRONMENT_FILE: {"classes": CLASSES, "synthetic_data": True, "selection_split": "val", "num_test": 6,
                            "weights_source": "random"},
    runs.STATUS_FILE: {"state": "completed", "pid": 1, "started_at": NOW - 60, "attempt_started_at": NOW - 60,
                       "finished_at": NOW, "epoch": 2, "epochs": 2, "best_val_acc": 0.5, "best_epoch": 2},
    runs.JOB_FILE: {"queued_at": NOW - 61, "max_concurrent": 1, "runner_pid": 1, "trainer_pid": 1,
                    "previous_pids": [], "ended_at": NOW},
    runs.METRICS_FILE: {"epoch": 2, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5,
                        "lr": 0.001, "seconds": 1.0, "images_per_second": 10.0},
    runs.EVALUATION_FILE: {
        "accuracy": 0.5, "macro_f1": 0.4, "classes": CLASSES, "num_images": 6, "best_epoch": 2,
        "confusion_matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]], "split": "test", "data": "demo",
        "synthetic": True, "tta": False,
        "report": {c: {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 2} for c in CLASSES}},
    runs.CANCEL_FILE: {"requested_at": NOW, "grace_s": 10.0},
}


def good_run(runs_dir: Path, name: str, stamp: str) -> runs.RunLayout:
    """A finished run with every file well formed (no training: the records only; no cancel
    request, no job.json: a run trained from the command line)."""
    layout = runs.RunLayout(runs_dir / stamp / name / runs.MODEL_NAME / "finetune")
    layout.path.mkdir(parents=True)
    for file_name in (runs.CONFIG_FILE, runs.ENVIRONMENT_FILE, runs.STATUS_FILE, runs.EVALUATION_FILE):
        content = dict(GOOD_CONTENT[file_name])
        if file_name == runs.CONFIG_FILE:
            content["experiment"] = name
        (layout.path / file_name).write_text(json.dumps(content))
    layout.metrics_file.write_text("".join(json.dumps({**GOOD_CONTENT[runs.METRICS_FILE], "epoch": epoch}) + "\n"
                                           for epoch in (1, 2)))
    return layout


def write_file(layout: runs.RunLayout, file_name: str, value) -> None:
    path = layout.path / file_name
    if file_name == runs.METRICS_FILE:  # one good line, then the value as a line of its own
        path.write_text(json.dumps({"epoch": 1, "val_acc": 0.5}) + "\n" + json.dumps(value) + "\n")
    else:
        path.write_text(json.dumps(value))


def everything_shown(run: runs.RunInfo) -> None:
    """What the pages and the CLI compute from a run: none of it may raise."""
    for name in ("state", "damaged", "experiment", "mode", "best_val_acc", "test_accuracy", "macro_f1",
                 "planned_epochs", "duration_s"):
        getattr(run, name)
    assert run.state in (*runs.STATES, "damaged")
    ui_data.runs_frame([run])
    ui_data.hparam_diff([run, run])
    ui_data.metrics_frame(run.metrics)
    ui_data.curves_figure(run.metrics, run.config.get("selection_split", "val"))
    ui_data.overlay_figure([run], "val_acc", "validation accuracy", percent=True)
    ui_data.job_progress(run.status)
    ui_data.best_run([run])
    ui_data.dataset_label(run.config.get("data"), run.config.get("synthetic_data"))
    ui_data.format_percent(run.test_accuracy)
    ui_data.format_time(run.status.started_at)
    if run.evaluation is not None:
        ui_data.confusion_figure(run.evaluation)
        ui_data.confusion_figure(run.evaluation, normalise=True)
        ui_data.confusion_cells(run.evaluation)
        ui_data.per_class_frame(run.evaluation)
        f"{ui_data.image_count(run.evaluation):,}"  # as the Evaluate page shows it
    json.dumps({"state": run.state, "test_accuracy": run.test_accuracy, "problems": run.problems})


def test_the_well_formed_run_is_not_damaged(tmp_path):
    run = runs.load_run(good_run(tmp_path, "good", "2030-01-01_00-00-00"))
    assert run.state == "completed" and not run.problems and run.evaluation is not None
    everything_shown(run)


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def _report_with(**scores) -> dict:
    good = GOOD_CONTENT[runs.EVALUATION_FILE]
    return {**good, "report": {**good["report"], "angry": {**good["report"]["angry"], **scores}}}


# shapes that once escaped as exceptions: always tried, whatever hypothesis draws
KNOWN = [{"queued_at": None}, {"queued_at": 10**400}, {"requested_at": 10**400}, {"started_at": 10**400},
         {**GOOD_CONTENT[runs.EVALUATION_FILE], "num_images": "lots"},
         {**GOOD_CONTENT[runs.EVALUATION_FILE], "num_images": None},
         {**GOOD_CONTENT[runs.EVALUATION_FILE], "report": [1]},
         {**GOOD_CONTENT[runs.EVALUATION_FILE], "confusion_matrix": [[10**30, 0, 0], [0, 1, 0], [0, 0, 1]]},
         _report_with(precision=None, support=None), _report_with(support="x")]


@pytest.mark.parametrize("file_name", sorted(RUN_FILE_KEYS))
def test_any_json_in_any_run_file_gives_a_run_info_and_never_raises(tmp_path_factory, file_name):
    @FUZZ
    @given(value=any_content(file_name))
    @example(value=KNOWN[0])
    @example(value=KNOWN[1])
    @example(value=KNOWN[2])
    @example(value=KNOWN[3])
    @example(value=KNOWN[4])
    @example(value=KNOWN[5])
    @example(value=KNOWN[6])
    @example(value=KNOWN[7])
    @example(value=KNOWN[8])
    @example(value=KNOWN[9])
    def check(value):
        runs_dir = tmp_path_factory.mktemp("fuzz")
        layout = good_run(runs_dir, "fuzzed", "2030-01-01_00-00-00")
        write_file(layout, file_name, value)
        if file_name in (runs.STATUS_FILE, runs.JOB_FILE):  # the typed records on their own, too
            record = runs.TrainerStatus if file_name == runs.STATUS_FILE else runs.JobRecord
            parsed, problems = runs.read_record(layout.path / file_name, record)
            assert parsed is not None or problems or value is None
        run = runs.load_run(layout)
        assert isinstance(run, runs.RunInfo)
        everything_shown(run)
        if not isinstance(value, dict) and file_name not in (runs.METRICS_FILE, runs.CANCEL_FILE):
            assert run.problems, f"{file_name} holding {value!r} went unnoticed"
        if run.evaluation is not None:
            assert runs.evaluation_problem(run.evaluation) is None
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (run.test_accuracy, run.macro_f1) if v is not None)

    check()


@pytest.mark.parametrize("content", ["[1, 2]", '{"accuracy": "high"}', '{"finished_at": "yesterday"}',
                                     '{"data": 7}', '{"epoch": "one", "val_acc": "great"}', "1e999",
                                     '{"epochs": 1e400}', '{"accuracy": 123456789012345678901234567890}'])
@pytest.mark.parametrize("file_name", [runs.CONFIG_FILE, runs.STATUS_FILE, runs.EVALUATION_FILE,
                                       runs.ENVIRONMENT_FILE, runs.JOB_FILE])
def test_the_runs_command_prints_every_run_whatever_one_holds(tmp_path, capsys, file_name, content):
    good_run(tmp_path, "good", "2030-01-01_00-00-00")
    bad = good_run(tmp_path, "bad", "2030-01-02_00-00-00")
    (bad.path / file_name).write_text(content)
    assert cli_main(["runs", "--runs-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "completed" in lines[1] and str(bad.path) in lines[0]
    assert cli_main(["runs", "--runs-dir", str(tmp_path), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["state"] for r in listed][1] == "completed" and len(listed) == 2


def test_the_runs_command_as_a_process_lists_a_damaged_run_beside_a_good_one(tmp_path):
    good_run(tmp_path, "good", "2030-01-01_00-00-00")
    bad = good_run(tmp_path, "bad", "2030-01-02_00-00-00")
    (bad.path / runs.EVALUATION_FILE).write_text('{"accuracy": "high"}')
    (bad.path / runs.METRICS_FILE).write_text('{"epoch": 1, "val_acc": "great"}\n')
    (bad.path / runs.STATUS_FILE).write_text('{"state": "completed", "finished_at": "yesterday"}')
    result = subprocess.run([sys.executable, "-m", "fer_core", "runs", "--runs-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("damaged") and "DAMAGED" in lines[0]
    assert lines[1].startswith("completed") and "test_acc=0.500" in lines[1]
