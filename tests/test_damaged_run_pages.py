"""Every page with wrongly shaped run files beside a good run (issue #12 item 7): valid JSON of
the wrong shape in any run file marks only that run damaged; no page raises and the good run
is still shown. Driven headless with AppTest over a really trained tiny run (test_app_pages)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("streamlit")

from conftest import copy_run_dir  # noqa: E402
from fer_core import runs, ui_data  # noqa: E402

from test_app_pages import frame_with_columns, metric, open_page, page_text  # noqa: E402

# (file, content): each goes into its own copy of the trained run
DAMAGE = [
    (runs.EVALUATION_FILE, [1, 2]),
    (runs.EVALUATION_FILE, {"accuracy": "high"}),
    (runs.EVALUATION_FILE, "merge:num_images=\"lots\""),
    (runs.EVALUATION_FILE, "merge:report=[1]"),
    (runs.EVALUATION_FILE, "merge:classes=[\"a\", \"a\"]"),
    (runs.METRICS_FILE, '{"epoch": 1, "val_acc": "great"}\n{"epoch": [2], "train_loss": 1}\n'),
    (runs.STATUS_FILE, "merge:finished_at=\"yesterday\""),
    (runs.STATUS_FILE, "merge:started_at=1e308"),  # well typed, but no clock shows it: not damaged
    (runs.JOB_FILE, {"queued_at": None, "previous_pids": "x"}),
    (runs.CONFIG_FILE, "merge:data=7"),
    (runs.CONFIG_FILE, "merge:epochs=\"ten\""),
    (runs.ENVIRONMENT_FILE, "merge:classes=5"),
    (runs.ENVIRONMENT_FILE, "merge:selection_split=[\"val\"]"),
    (runs.CANCEL_FILE, {"requested_at": "now", "grace_s": -5}),  # a request all the same: not damaged
]
NOT_DAMAGED = {(runs.STATUS_FILE, "merge:started_at=1e308"),
               (runs.CANCEL_FILE, '{"requested_at": "now", "grace_s": -5}')}


def expected_damaged(file_name: str, content) -> bool:
    return (file_name, content if isinstance(content, str) else json.dumps(content)) not in NOT_DAMAGED


def damage(run_dir, file_name: str, content) -> None:
    path = run_dir / file_name
    if isinstance(content, str) and content.startswith("merge:"):
        key, _, value = content[len("merge:"):].partition("=")
        record = runs.read_json(path) if path.is_file() else {}
        record[key] = json.loads(value)
        path.write_text(json.dumps(record))
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


@pytest.fixture
def good_and_damaged(app_data, env):
    """The trained run as the good one (newest, so pages pick it first), and one copy per
    kind of damage (older)."""
    good = env.runs / "2030-06-01_00-00-00" / "tinyexp" / runs.MODEL_NAME / "finetune"
    copy_run_dir(app_data.run, good)
    damaged = []
    for index, (file_name, content) in enumerate(DAMAGE):
        target = env.runs / f"2030-01-01_00-00-{index:02d}" / f"bad{index:02d}" / runs.MODEL_NAME / "finetune"
        copy_run_dir(app_data.run, target)
        damage(target, file_name, content)
        damaged.append(target)
    return good, damaged


def test_the_damage_marks_only_its_run(good_and_damaged):
    good, damaged = good_and_damaged
    listed = {run.path: run for run in runs.list_runs(good.parents[3])}
    assert listed[good].state == "completed" and not listed[good].problems
    for path, (file_name, content) in zip(damaged, DAMAGE):
        assert listed[path].damaged == expected_damaged(file_name, content), (file_name, content)


def test_every_page_opens_beside_damaged_runs_and_shows_the_good_one(good_and_damaged):
    good, damaged = good_and_damaged
    good_run = runs.load_run(good)
    accuracy = ui_data.format_percent(good_run.test_accuracy)

    at = open_page("home")  # open_page asserts that the page raised nothing
    assert metric(at, "Runs") == str(1 + len(damaged))
    assert metric(at, "Best test accuracy") == accuracy

    at = open_page("runs", at)
    table = frame_with_columns(at, "run", "state")
    states = dict(zip(table["run"], table["state"]))
    assert states[good_run.id] == "completed" and len(states) == 1 + len(damaged)
    assert sum(state == "damaged" for state in states.values()) == sum(expected_damaged(*d) for d in DAMAGE)

    at = open_page("train", at)
    assert good_run.id in page_text(at) or any(good_run.id in str(s.options) for s in at.selectbox)

    at = open_page("evaluate", at)
    assert metric(at, "Test accuracy") == accuracy

    at = open_page("predict", at)
    assert "tinyexp" in page_text(at) or any("tinyexp" in str(s.options) for s in at.selectbox)


def test_each_page_opens_with_every_damaged_run_selected(good_and_damaged):
    """Pages that show one run: pick each damaged one (where the page offers it)."""
    good, damaged = good_and_damaged
    at = open_page("runs")
    for path in damaged:
        box = at.selectbox(key="runs_manage")
        if str(path) in box.options:
            box.set_value(str(path)).run(timeout=60)
            assert not at.exception, [e.value for e in at.exception]
