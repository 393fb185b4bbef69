"""The Evaluate page with hand-written run folders (no training): class names holding any
character a folder name can (issue #12 items 5 and 6), and comparing runs tested on different
data (issue #11, "Also")."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from fer_core import runs, ui_data  # noqa: E402
from markdown_safety import MALICIOUS_IMAGE, active_markdown, plain_text  # noqa: E402

APP = "../streamlit_app.py"
TIMEOUT = 60
PIPE_CLASSES = ["happy|sad", "a|b|c", MALICIOUS_IMAGE, "**bold**"]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FER_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "runs"


def scored_run(runs_dir: Path, stamp: str, classes: list[str], *, experiment: str = "exp",
               data: str = "/data/fer2013", synthetic: bool = False, num_per_class: int = 3) -> runs.RunInfo:
    """A completed run with evaluation.json and predictions.csv: class k is mistaken for k+1 once."""
    layout = runs.RunLayout(runs_dir / stamp / experiment / runs.MODEL_NAME / "finetune")
    layout.path.mkdir(parents=True)
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]
    rows = []
    for i, name in enumerate(classes):
        for k in range(num_per_class):
            j = (i + 1) % n if k == 0 else i
            matrix[i][j] += 1
            probabilities = {c: (0.7 if c == classes[j] else 0.3 / (n - 1)) for c in classes}
            rows.append({"path": str(runs_dir / f"missing{i}_{k}.png"), "true": name,
                         "predicted": classes[j], **{f"p_{c}": p for c, p in probabilities.items()}})
    with open(layout.predictions_file(), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    accuracy = (num_per_class - 1) / num_per_class
    report = {c: {"precision": accuracy, "recall": accuracy, "f1-score": accuracy - 0.01 * i,
                  "support": num_per_class} for i, c in enumerate(classes)}
    runs.atomic_write_json(layout.evaluation_file(), {
        "accuracy": accuracy, "macro_f1": accuracy, "classes": classes, "confusion_matrix": matrix,
        "report": report, "num_images": n * num_per_class, "best_epoch": 1, "split": "test",
        "data": data, "synthetic": synthetic})
    runs.atomic_write_json(layout.config_file, {"data": data, "experiment": experiment, "mode": "finetune",
                                                "seed": 42, "test_fraction": 0.25})
    runs.atomic_write_json(layout.environment_file, {"synthetic_data": synthetic, "classes": classes})
    runs.atomic_write_json(layout.status_file, {"state": "completed", "started_at": time.time() - 60,
                                                "finished_at": time.time()})
    return runs.load_run(layout)


def open_evaluate() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/evaluate.py").run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_class_names_with_pipes_and_markdown_work_and_show_literally(env):
    run = scored_run(env, "2030-01-01_00-00-00", PIPE_CLASSES, experiment="![x](x.png)")
    at = open_evaluate()
    cell_box = at.selectbox(key=f"eval_cell::{run.id}")
    assert len(cell_box.options) == len(PIPE_CLASSES) ** 2  # every cell, none confused with another
    assert "true happy|sad → predicted a|b|c · 1 image (mistake)" in cell_box.options
    for true, predicted in [(0, 1), (1, 1), (2, 3)]:
        cell_box = at.selectbox(key=f"eval_cell::{run.id}")
        cell_box.set_value((true, predicted)).run(timeout=TIMEOUT)
        assert not at.exception, [e.value for e in at.exception]
        shown = " ".join(m.value for m in at.markdown).replace("\\", "")
        assert f"are **{PIPE_CLASSES[true]}** and were predicted **{PIPE_CLASSES[predicted]}**" in shown
    assert not active_markdown(at), active_markdown(at)
    assert MALICIOUS_IMAGE in plain_text(at)


def test_a_click_names_its_cell_by_position_whatever_the_names():
    classes = ["a|b", "<b>x</b>", "c"]
    click = {"selection": {"points": [{"curve_number": 1, "point_index": 5, "x": "c", "y": "&lt;b&gt;x&lt;/b&gt;"}]}}
    assert ui_data.cell_index_from_selection(click, classes) == (1, 2)
    assert ui_data.cell_from_selection(click, classes) == ("<b>x</b>", "c")
    figure = ui_data.confusion_figure({"classes": classes, "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})
    assert list(figure.data[0].y) == ["a|b", "&lt;b&gt;x&lt;/b&gt;", "c"]  # no HTML in plotly's labels
    cells = ui_data.confusion_cell_order({"classes": classes, "confusion_matrix": [[1, 2, 0], [0, 1, 0], [0, 0, 1]]})
    assert cells[0] == (0, 1, 2) and len({(i, j) for i, j, _ in cells}) == 9


def test_comparing_runs_tested_on_different_data_warns(env):
    fer = scored_run(env, "2030-01-01_00-00-00", ["happy", "sad"], experiment="fer")
    scored_run(env, "2030-01-02_00-00-00", ["happy", "sad"], experiment="demo", data="demo", synthetic=True)
    at = open_evaluate()
    at.selectbox(key="eval_run").set_value(str(fer.path)).run(timeout=TIMEOUT)
    warnings = " ".join(w.value for w in at.warning).replace("\\", "")
    assert "Different test sets: this run was tested on fer2013, the other on demo (SYNTHETIC)" in warnings


def test_runs_tested_on_the_same_split_compare_without_a_warning(env):
    first = scored_run(env, "2030-01-01_00-00-00", ["happy", "sad"], experiment="one")
    second = scored_run(env, "2030-01-02_00-00-00", ["happy", "sad"], experiment="two")
    assert ui_data.test_set_difference(first, second) is None
    at = open_evaluate()
    assert not [w for w in at.warning if "Different test" in w.value]
