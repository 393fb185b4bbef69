"""The Streamlit pages, driven headless with AppTest: with no runs, a finished run, a running one.

One tiny run is really trained once per session; the other states are copies of it (a
"running" copy points status.json at a live `sleep` process, so it looks alive to the app).
Every test asserts what a user would read on the page, not just that nothing raised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from conftest import copy_run_dir  # noqa: E402
from fer_core import runs, ui_data  # noqa: E402

APP = "../streamlit_app.py"  # AppTest resolves relative paths against this file
TIMEOUT = 60
PAGES = ("home", "data", "train", "runs", "evaluate", "tensorboard")


# ---- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """The app sets torch to one thread in its process (here: pytest's); restore it after."""
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def add_finished(app_data, env, stamp: str = "2030-01-01_00-00-00", **config_changes) -> Path:
    """Copy the trained run into the test's runs folder under a new timestamp."""
    target = env.runs / stamp / "tinyexp" / runs.MODEL_NAME / "finetune"
    copy_run_dir(app_data.run, target)
    if config_changes:
        config = runs.read_json(target / runs.CONFIG_FILE)
        config.update(config_changes)
        runs.atomic_write_json(target / runs.CONFIG_FILE, config)
    return target


def add_running(app_data, env, pid: int, stamp: str = "2031-01-01_00-00-00") -> Path:
    """A run in the middle of epoch 2: one epoch of metrics, no evaluation, a live pid."""
    target = env.runs / stamp / "livexp" / runs.MODEL_NAME / "finetune"
    copy_run_dir(app_data.run, target)
    for name in (runs.EVALUATION_FILE, runs.PREDICTIONS_FILE):
        (target / name).unlink()
    rows, _ = runs.read_metrics(target)
    runs.rewrite_metrics(target, rows[:1])
    config = runs.read_json(target / runs.CONFIG_FILE)
    config["experiment"] = "livexp"
    runs.atomic_write_json(target / runs.CONFIG_FILE, config)
    status = {"state": "running", "pid": pid, "started_at": time.time() - 30, "finished_at": None,
              "epoch": 2, "epochs": 2, "batch": 1, "batches": 3, "eta_s": 42.0,
              "images_per_second": 120.0, "error": None,
              "phase": "evaluating the best model on the test split"}
    runs.atomic_write_json(target / runs.STATUS_FILE, status)
    return target


# ---- helpers ---------------------------------------------------------------------------

def open_page(page: str, at: AppTest | None = None, **state) -> AppTest:
    at = at or AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    if page == "home":
        at.run(timeout=TIMEOUT)
    else:
        at.switch_page(f"pages/{page}.py").run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    """Everything a user reads: headings, text, alerts, metric labels and values."""
    parts = [e.value for group in (at.title, at.header, at.subheader, at.markdown, at.caption,
                                   at.info, at.success, at.warning, at.error) for e in group]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)


def metric(at: AppTest, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return values[0]


def plotly_figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def heatmaps(at: AppTest) -> list[dict]:
    return [trace for figure in plotly_figures(at) for trace in figure["data"] if trace["type"] == "heatmap"]


def table_with_columns(at: AppTest, *columns: str):
    for element in at.dataframe:
        if all(c in element.value.columns for c in columns):
            return element
    raise AssertionError(f"no table with columns {columns}")


def frame_with_columns(at: AppTest, *columns: str):
    return table_with_columns(at, *columns).value


# ---- no runs at all --------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_every_page_explains_itself_without_runs(env, page):
    at = open_page(page)
    text = page_text(at)
    expected = {
        "home": "No trained model yet.",
        "data": "Sample faces per class",
        "train": "No runs yet. Launch one above",
        "runs": "No runs yet.",
        "evaluate": "No evaluated run yet.",
        "tensorboard": "TensorBoard is **not running**",
    }[page]
    assert expected in text
    assert [c.value for c in at.sidebar.caption][0] == "No runs yet."  # the router's sidebar, on every page


def test_home_counts_what_is_here(env, app_data):
    at = open_page("home")
    assert metric(at, "Runs") == "0"
    assert metric(at, "Datasets found") == "2"  # the built-in demo + data_home/tiny-demo
    text = page_text(at)
    assert "Built-in demo (SYNTHETIC" in text and "tiny-demo (SYNTHETIC demo folder)" in text
    assert at.button(key="home_quick_train").label == "Train a quick model on the demo dataset"


def test_data_page_shows_the_reference_split_table(env, app_data):
    from fer_core.data import assign_splits, load_dataset, split_table

    at = open_page("data", data_source=str(app_data.tiny))
    text = page_text(at)
    assert "tiny-demo" in text and "Images: 56" in text and "Unreadable files: 0" in text
    table = frame_with_columns(at, "class", "total", "train", "val", "test", "train %", "test %")
    assert list(table.columns) == ["class", "total", "train", "val", "test", "train %", "test %"]
    assert list(table["class"]) == ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert set(table["total"]) == {8} and set(table["test"]) == {2}  # 25% of 8, stratified
    assert (table["train"] + table["val"] + table["test"] == table["total"]).all()
    assert set(table["train %"]) == {75.0} and set(table["test %"]) == {25.0}
    dataset = load_dataset(str(app_data.tiny))
    expected = split_table(dataset, assign_splits(dataset, test_fraction=0.25, val_fraction=0.1, seed=42))
    assert table.to_dict("records") == expected
    assert len(at.image) == 7  # one row of sample faces per class
    assert all(len(row.value) == 8 for row in at.image)
    assert len(plotly_figures(at)) == 2  # class distribution and split bars

    at.slider(key="data_val_fraction").set_value(0.0).run(timeout=TIMEOUT)
    table = frame_with_columns(at, "class", "val")
    assert set(table["val"]) == {0} and set(table["train"]) == {6}


def test_data_page_reports_bad_files_and_unusable_paths(env, app_data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(app_data.tiny, broken)
    (broken / "happy" / "notes.txt").write_text("not a face")
    (broken / "sad" / "empty.png").write_bytes(b"")
    at = open_page("data", data_source=str(broken))
    assert metric(at, "Unreadable files") == "2"
    bad = frame_with_columns(at, "path", "reason")
    assert sorted(Path(p).name for p in bad["path"]) == ["empty.png", "notes.txt"]
    assert "2 file(s) were skipped" in page_text(at)

    at = open_page("data", data_source=str(tmp_path / "does-not-exist"))
    assert "This source cannot be used: dataset not found" in page_text(at)


def test_data_page_kaggle_without_credentials_says_what_to_set(env, monkeypatch):
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(env.runs / "no-kaggle-here"))
    at = open_page("data")
    at.segmented_control(key="data_kind").set_value("kaggle").run(timeout=TIMEOUT)
    assert at.text_input(key="data_kaggle_slug").value == "msambare/fer2013"
    assert "Kaggle credentials not found" in page_text(at)
    assert at.button(key="data_download").disabled


def test_train_form_refuses_invalid_values_and_starts_nothing(env):
    from fer_core.config import PRESETS

    at = open_page("train")
    assert at.selectbox(key="train_preset").value == "demo-quick"  # the demo's sensible default
    assert at.number_input(key="tf_epochs").value == PRESETS["demo-quick"]["epochs"]
    at.text_input(key="tf_experiment").set_value("bad/*name*")
    # within each widget's bounds, but more warm-up than epochs: a rule between two fields
    at.number_input(key="tf_warmup_epochs").set_value(20.0)
    at.button(key="FormSubmitter:train_form-Launch training").click().run(timeout=TIMEOUT)
    errors = " ".join(e.value for e in at.error)
    assert "Nothing was started" in errors
    assert "experiment name must be a plain folder name" in errors
    assert "\\*name\\*" in errors  # the user's text shown literally, not as Markdown emphasis
    assert "must not exceed epochs" in errors
    assert runs.find_run_dirs(env.runs) == []
    # what was submitted stays in the form to be corrected
    assert at.text_input(key="tf_experiment").value == "bad/*name*"
    assert at.number_input(key="tf_warmup_epochs").value == 20.0


def test_train_preset_follows_the_data_and_fills_the_form(env, app_data):
    from fer_core.config import PRESETS

    at = open_page("train")
    at.selectbox(key="train_data").set_value(str(app_data.tiny)).run(timeout=TIMEOUT)
    assert at.selectbox(key="train_preset").value == "cpu-fast"
    assert at.number_input(key="tf_epochs").value == PRESETS["cpu-fast"]["epochs"]
    assert at.selectbox(key="tf_optimizer").value == PRESETS["cpu-fast"]["optimizer"]
    assert "Recommended on a CPU" in page_text(at)
    at.selectbox(key="train_preset").set_value("reference").run(timeout=TIMEOUT)
    assert at.number_input(key="tf_img_size").value == PRESETS["reference"]["img_size"]
    assert at.radio(key="tf_mode").value == PRESETS["reference"]["mode"]


def test_train_page_estimates_the_time_from_a_speed_measured_on_this_machine(env, app_data, monkeypatch):
    """No figure until this machine's speed is measured (on request); then the duration of the
    form's recipe on the dataset's split. cpu-fast on the tiny dataset (35 train, 7 validation,
    14 test images; 30 epochs; ten test views) at 10 img/s training and 30 img/s evaluation:
    30 x (35/10 + 7/30) + 14 x 10/30 = 116.7 s, about 2 min."""
    from fer_core import estimate

    measured: dict[str, estimate.Speed] = {}
    monkeypatch.setattr(estimate, "known_speed", lambda config, folder=None: measured.get(estimate.speed_key(config)))
    monkeypatch.setattr(estimate, "measure_speed", lambda config, **_: measured.setdefault(
        estimate.speed_key(config), estimate.Speed(10.0, 30.0, "cpu", time.time())))
    at = open_page("train")
    at.selectbox(key="train_data").set_value(str(app_data.tiny)).run(timeout=TIMEOUT)
    assert "on this machine:" not in page_text(at) and not measured
    at.button(key="train_estimate").click().run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    assert len(measured) == 1
    caption = next(c.value for c in at.caption if "on this machine:" in c.value)
    assert caption.startswith("About **2 min** on this machine: 30 epochs of 35 training images at 10 img/s")


def test_the_train_form_launches_a_colour_run_at_its_stored_size(env, app_data, monkeypatch):
    from fer_core import jobs

    launched = []
    monkeypatch.setattr(jobs, "launch", lambda config, *, max_concurrent=1: launched.append(config) or (
        env.runs / "2040-01-01_00-00-00" / config.experiment / runs.MODEL_NAME / config.mode))
    at = open_page("train")
    at.selectbox(key="train_data").set_value(str(app_data.tiny)).run(timeout=TIMEOUT)
    form = train_form(at)
    assert (form["colour"].value, form["store_size"].value) == ("grey", 48)
    form["colour"].set_value("rgb")
    form["store_size"].set_value(96)
    at.button(key="FormSubmitter:train_form-Launch training").click().run(timeout=TIMEOUT)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (config,) = launched
    assert (config.colour, config.store_size, config.data) == ("rgb", 96, str(app_data.tiny))


def train_form(at: AppTest) -> dict:
    """The Train form's widgets (keys tf_<field>) as the user sees them: field -> widget."""
    widgets = [*at.text_input, *at.number_input, *at.toggle, *at.radio, *at.selectbox]
    return {w.key[len("tf_"):]: w for w in widgets if w.key and w.key.startswith("tf_")}


def preset_form(preset: str, names) -> dict:
    """What the form must show for a preset: its values over the defaults, named after it."""
    from fer_core.config import PRESETS, TrainConfig

    values = {**TrainConfig().to_dict(), **PRESETS[preset], "experiment": preset}
    values["max_per_class"] = values["max_per_class"] or 0  # the form's "0 = all"
    return {name: values[name] for name in names}


def test_train_form_is_generated_from_the_config_settings(env):
    from fer_core import config_form
    from fer_core.config import FIELDS_BY_NAME

    at = open_page("train")
    widgets = train_form(at)
    fields = config_form.form_fields()
    assert set(widgets) == {f.name for f in fields}
    kinds = {"text": "text_input", "number": "number_input", "toggle": "toggle", "radio": "radio",
             "select": "selectbox"}
    for field in fields:
        widget = widgets[field.name]
        assert widget.type == kinds[field.widget], field.name
        assert widget.label == field.label and widget.help == FIELDS_BY_NAME[field.name].setting.help
        if field.widget == "number":
            assert (widget.min, widget.max) == (field.min_value, field.max_value), field.name
        if field.options:
            assert list(widget.options) == [field.option_label(o) for o in field.options]
    # the bounds the page used to get wrong are the config's now
    assert widgets["epochs"].min == 1 and widgets["img_size"].max == 512
    assert widgets["val_fraction"].max < 0.5


def browser_defaults(at: AppTest) -> dict:
    """Each Train form widget's default as its proto carries it to the browser: field -> value."""
    from fer_core import config_form

    options = {field.name: field.options for field in config_form.form_fields()}
    return {name: options[name][widget.proto.default] if widget.type in ("radio", "selectbox")
            else widget.proto.default for name, widget in train_form(at).items()}


def rerun_after_losing_widget_state(at: AppTest, names) -> None:
    """Rerun as Streamlit does when the browser asks before it has drawn these form widgets
    (the expander clicked while the page loads): no widget state comes for them, and their
    session_state keys are gone, as after Streamlit drops the state of undrawn widgets."""
    lost = {f"tf_{name}" for name in names}
    states = at._tree.get_widget_states()  # AppTest's own "browser state"; no public way to edit it
    kept = [w for w in states.widgets if w.id.rsplit("-", 1)[-1] not in lost]
    del states.widgets[:]
    states.widgets.extend(kept)
    for key in lost:
        del at.session_state[key]
    at._run(states, timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]


def test_train_form_refills_itself_when_streamlit_drops_widget_state(env, app_data, monkeypatch):
    """Issue #11: with a run present the form opens folded, and Streamlit drops the state of
    widgets a run did not draw; a widget drawn again without state comes back at its minimum
    (experiment empty, epochs 0, LR 0, toggles off) under a banner still naming the preset."""
    from fer_core import jobs
    from fer_core.config import config_from_preset

    launched = []

    def fake_launch(config, *, max_concurrent=1):  # records what would start; creates nothing
        launched.append(config)
        return env.runs / f"2040-01-01_00-00-{len(launched):02d}" / config.experiment / runs.MODEL_NAME / config.mode

    monkeypatch.setattr(jobs, "launch", fake_launch)
    add_finished(app_data, env)
    at = open_page("train")
    names = list(train_form(at))
    expected = preset_form("demo-quick", names)
    assert {n: w.value for n, w in train_form(at).items()} == expected

    # 1. the state of every widget but one is gone (a run cut short keeps the ones it drew)
    rerun_after_losing_widget_state(at, [n for n in names if n != "epochs"])
    assert {n: w.value for n, w in train_form(at).items()} == expected
    # 2. what the browser shows for a widget it mounts later without a state of its own (one in
    # the folded expander, opened while the page loads) is the widget's default: the preset's
    assert browser_defaults(at) == expected
    assert "demo-quick" in page_text(at)

    # what is launched is the preset, not zeros
    at.button(key="FormSubmitter:train_form-Launch training").click().run(timeout=TIMEOUT)
    assert not at.error, [e.value for e in at.error]
    assert not at.exception, [e.value for e in at.exception]
    (config,) = launched
    assert config == config_from_preset("demo-quick", data="demo", experiment="demo-quick",
                                        runs_dir=config.runs_dir, checkpoints_dir=config.checkpoints_dir)

    # a submitted change is what the form keeps, through the same loss of state
    at.number_input(key="tf_epochs").set_value(3)
    at.button(key="FormSubmitter:train_form-Launch training").click().run(timeout=TIMEOUT)
    assert launched[-1].epochs == 3
    rerun_after_losing_widget_state(at, names)
    assert train_form(at)["epochs"].value == 3 and browser_defaults(at)["epochs"] == 3
    assert train_form(at)["batch_size"].value == expected["batch_size"]


def test_home_quick_start_launches_demo_quick_and_opens_train(env, monkeypatch):
    from fer_core import jobs

    launched = []

    def fake_launch(config, *, max_concurrent=1):
        layout = runs.RunLayout.create(Path(config.runs_dir), config.experiment, config.mode)
        runs.atomic_write_json(layout.config_file, config.to_dict())
        runs.atomic_write_json(layout.job_file, runs.JobRecord(queued_at=time.time()).to_dict())
        run_dir = layout.path
        launched.append((config, run_dir))
        return run_dir

    monkeypatch.setattr(jobs, "launch", fake_launch)
    monkeypatch.setattr(jobs, "pump_queue", lambda *a, **k: [])
    at = open_page("home")
    at.button(key="home_quick_train").click().run(timeout=TIMEOUT)
    assert not at.exception
    (config, run_dir), = launched
    assert config.preset == "demo-quick" and config.data == "demo"
    assert Path(config.runs_dir) == env.runs.resolve()
    assert at.title[0].value == "Train"  # switched pages
    assert at.selectbox(key="train_run_picker").value == str(run_dir)
    assert "Queued: one job trains at a time" in page_text(at)


# ---- a finished run --------------------------------------------------------------------

def test_pages_with_a_finished_run(env, app_data):
    run_dir = add_finished(app_data, env)
    info = runs.load_run(run_dir)
    evaluation = info.evaluation

    at = open_page("home")
    assert metric(at, "Runs") == "1"
    assert metric(at, "Best test accuracy") == ui_data.format_percent(evaluation["accuracy"])
    assert "tinyexp/finetune" in page_text(at)

    at = open_page("train", at)
    text = page_text(at)
    assert "Finished." in text and ":green-badge[:material/check_circle: completed]" in text
    assert metric(at, "Test accuracy") == ui_data.format_percent(evaluation["accuracy"])
    assert list(frame_with_columns(at, "epoch", "val_acc")["epoch"]) == [1, 2]
    curves = plotly_figures(at)[0]
    assert {t["name"] for t in curves["data"]} == {"train", "validation"}
    assert at.number_input(key=f"resume_epochs_{info.id}").value == 7  # 2 planned + 5 more
    assert not [b for b in at.button if b.label == "Cancel run"]

    at = open_page("runs", at)
    table = frame_with_columns(at, "run", "state", "test acc")
    assert list(table["state"]) == ["completed"] and list(table["run"]) == [info.id]
    assert table["test acc"][0] == pytest.approx(evaluation["accuracy"])
    assert table["epochs"][0] == "2/2" and table["mode"][0] == "finetune"
    assert not at.button(key="runs_delete").disabled


def test_evaluate_matrix_gallery_and_report_add_up(env, app_data):
    run_dir = add_finished(app_data, env)
    evaluation = runs.load_run(run_dir).evaluation
    info = runs.load_run(run_dir)
    num_test = runs.read_json(run_dir / runs.ENVIRONMENT_FILE)["num_test"]

    at = open_page("evaluate")
    assert metric(at, "Test accuracy") == ui_data.format_percent(evaluation["accuracy"])
    assert metric(at, "Test images") == str(num_test)
    heatmap, = heatmaps(at)
    assert heatmap["x"] == heatmap["y"] == evaluation["classes"]  # class order as trained
    assert sum(map(sum, heatmap["z"])) == num_test == evaluation["num_images"]

    report = frame_with_columns(at, "class", "precision", "recall", "f1", "support")
    assert report["support"].sum() == num_test
    assert list(report["class"]) == evaluation["classes"]

    # choose a cell with the fallback selectbox: the gallery shows exactly its images
    cell_box = at.selectbox(key=f"eval_cell::{info.id}")
    counts = {(i, j): n for i, j, n in ui_data.confusion_cell_order(evaluation) if n}
    for cell in list(counts)[:2]:
        at.selectbox(key=f"eval_cell::{info.id}").set_value(cell).run(timeout=TIMEOUT)
        true, predicted = (evaluation["classes"][k] for k in cell)
        assert f"**{true}** and were predicted **{predicted}**" in page_text(at)
        gallery, = at.image
        assert len(gallery.value) == counts[cell]
        assert all("%" in caption for caption in gallery.captions)
    assert cell_box.options  # every cell can be chosen without clicking

    at.toggle(key="eval_normalise").set_value(True).run(timeout=TIMEOUT)
    heatmap, = heatmaps(at)
    assert all(abs(sum(row) - 1) < 1e-9 or sum(row) == 0 for row in heatmap["z"])

    if any(t != p for t, p, _ in ui_data.confusion_cells(evaluation)):
        assert "predicted as" in page_text(at)


def test_runs_page_compares_and_archives(env, app_data):
    first = add_finished(app_data, env, stamp="2030-01-01_00-00-00")
    second = add_finished(app_data, env, stamp="2030-01-02_00-00-00", lr=0.05)
    at = open_page("runs")
    assert len(at.multiselect(key="runs_compare").value) == 2
    diff = frame_with_columns(at, runs.run_id(first), runs.run_id(second))
    assert list(diff.index) == ["lr"]  # only the setting that differs
    assert len(plotly_figures(at)) == 2  # val accuracy and val loss overlays

    at.selectbox(key="runs_manage").set_value(str(first)).run(timeout=TIMEOUT)
    assert at.get("download_button")
    at.button(key="runs_archive").click().run(timeout=TIMEOUT)
    assert "Archive " in page_text(at) and "withdrawn from Predict" in page_text(at)  # asks first
    assert first.is_dir()
    at.button(key="runs_confirm").click().run(timeout=TIMEOUT)
    assert not first.exists()
    assert (env.runs / ".archive" / first.relative_to(env.runs) / "config.json").is_file()
    assert list(frame_with_columns(at, "run", "state")["run"]) == [runs.run_id(second)]

    at.button(key="runs_delete").click().run(timeout=TIMEOUT)
    at.button(key="runs_confirm").click().run(timeout=TIMEOUT)
    assert not second.exists()
    assert "No runs yet." in page_text(at)


def test_runs_page_exports_a_finished_run_to_onnx_for_download(env, app_data):
    import onnx

    run_dir = add_finished(app_data, env)
    at = open_page("runs")
    assert not [b for b in at.get("download_button") if b.proto.label == "Download ONNX"]
    at.button(key="runs_export").click().run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    exported = runs.RunLayout(run_dir).export_file(".onnx")
    card = json.loads(exported.with_name("model.onnx.json").read_text())
    assert card["run_id"] == runs.run_id(run_dir) and card["classes"] == app_data_classes(run_dir)
    onnx.checker.check_model(onnx.load(str(exported)))
    assert [b for b in at.get("download_button") if b.proto.label == "Download ONNX"], "offered at once"

    # a resumed run writes a newer best model: the old export is no longer offered as current
    # (the export is made older, not best.pt newer: the copy's best.pt is a hard link)
    earlier = runs.RunLayout(run_dir).best_checkpoint.stat().st_mtime_ns - 10**9
    os.utime(exported, ns=(earlier, earlier))
    at.run(timeout=TIMEOUT)
    assert not [b for b in at.get("download_button") if b.proto.label == "Download ONNX"]
    assert at.button(key="runs_export")


def app_data_classes(run_dir: Path) -> list[str]:
    return runs.read_json(run_dir / runs.ENVIRONMENT_FILE)["classes"]


def test_a_damaged_run_is_listed_with_its_problem(env, app_data):
    run_dir = add_finished(app_data, env)
    (run_dir / runs.CONFIG_FILE).write_text("{ not json")
    at = open_page("runs")
    table = frame_with_columns(at, "run", "state", "problems")
    assert list(table["state"]) == ["damaged"]
    assert "config.json is damaged" in table["problems"][0]


# ---- a running run ---------------------------------------------------------------------

def test_pages_with_a_running_run(env, app_data, sleeper):
    done = add_finished(app_data, env)
    live = add_running(app_data, env, sleeper.pid)
    live_id = runs.run_id(live)

    at = open_page("home")
    assert metric(at, "Jobs running or queued") == "1"
    text = page_text(at)
    assert "livexp (finetune)" in text  # the sidebar's job panel
    assert any("epoch 2/2" in p.proto.text for p in at.get("progress"))

    at = open_page("train", at)
    assert at.selectbox(key="train_run_picker").value == str(live)  # newest active by default
    text = page_text(at)
    assert ":blue-badge[:material/progress_activity: running]" in text
    assert metric(at, "Time left") == "42 s" and metric(at, "Speed") == "120 img/s"
    bars = [p.proto.text for p in at.get("progress")]
    assert "Epoch 2: batch 1/3" in bars and any(b.startswith("Run: epoch 2/2") for b in bars)
    assert "Now: evaluating the best model on the test split" in text
    assert list(frame_with_columns(at, "epoch", "val_acc")["epoch"]) == [1]

    metrics_table = table_with_columns(at, "epoch", "val_acc")
    assert metrics_table.proto.placeholder == "—"  # a score not measured yet reads as a dash

    at = open_page("runs", at)
    table = frame_with_columns(at, "run", "state")
    assert dict(zip(table["run"], table["state"])) == {live_id: "running", runs.run_id(done): "completed"}
    live_scores = table.loc[table["run"] == live_id, ["test acc", "macro-F1"]]
    assert live_scores.isna().all(axis=None), "a running run has no test scores yet"
    assert table_with_columns(at, "run", "state").proto.placeholder == "—", "shown as a dash, not None"
    at.selectbox(key="runs_manage").set_value(str(live)).run(timeout=TIMEOUT)
    assert at.button(key="runs_delete").disabled and at.button(key="runs_archive").disabled

    at = open_page("evaluate", at)  # only the finished run has an evaluation
    picker = at.selectbox(key="eval_run")
    assert picker.value == str(done) and len(picker.options) == 1


def test_cancel_from_the_monitor_requests_a_stop(env, app_data, sleeper):
    live = add_running(app_data, env, sleeper.pid)
    at = open_page("train")
    at.button(key=f"cancel_{runs.run_id(live)}").click().run(timeout=TIMEOUT)
    assert not at.exception
    assert runs.read_json(live / runs.CANCEL_FILE)["requested_at"] > 0
    assert runs.load_run(live).status.cancel_requested
    assert "Stopping: cancel requested" in page_text(at)


def test_a_run_whose_process_died_shows_as_failed(env, app_data):
    process = subprocess.Popen(["true"])
    process.wait()
    live = add_running(app_data, env, process.pid)
    before = (live / runs.STATUS_FILE).read_bytes()
    at = open_page("home")
    assert (live / runs.STATUS_FILE).read_bytes() == before  # drawing a page writes nothing
    assert metric(at, "Jobs running or queued") == "0"
    at = open_page("train", at)
    assert "Training failed: process exited without finishing" in page_text(at)


def test_run_admin_refuses_busy_runs(env, app_data, sleeper):
    from fer_core import run_admin

    live = add_running(app_data, env, sleeper.pid)
    with pytest.raises(run_admin.RunBusyError, match="running"):
        run_admin.delete_run(live, env.runs)
    with pytest.raises(run_admin.RunBusyError):
        run_admin.archive_run(live, env.runs)
    assert live.is_dir()


# ---- Kaggle download and TensorBoard, with their slow outside parts faked ----------------

def test_kaggle_download_failure_and_success_are_shown(env, app_data, monkeypatch, tmp_path):
    from fer_core import download
    from fer_core.errors import FerError

    monkeypatch.setenv("KAGGLE_API_TOKEN", "test-token")
    monkeypatch.setenv("FER_DATA_HOME", str(tmp_path / "data_home"))

    def offline(slug, dest=None, log=print):
        log(f"downloading {slug} ...")
        raise FerError(f"Kaggle download of {slug} failed: ConnectionError: no route (no network?)")

    monkeypatch.setattr(download, "download_dataset", offline)
    at = open_page("data")
    at.segmented_control(key="data_kind").set_value("kaggle").run(timeout=TIMEOUT)
    assert "Kaggle credentials found: KAGGLE_API_TOKEN" in page_text(at).replace("\\", "")
    at.button(key="data_download").click().run(timeout=TIMEOUT)
    assert "Kaggle download of msambare/fer2013 failed" in " ".join(e.value for e in at.error)
    status, = at.status
    assert status.label == "Download failed" and status.state == "error"

    def fetched(slug, dest=None, log=print):
        folder = download.dataset_dest(slug)
        shutil.copytree(app_data.tiny, folder)
        (folder / ".download-complete").write_text(slug)
        return folder

    monkeypatch.setattr(download, "download_dataset", fetched)
    at.button(key="data_download").click().run(timeout=TIMEOUT)
    assert not at.exception and metric(at, "Images") == "56"
    status, = at.status
    assert status.label.startswith("Downloaded to") and status.state == "complete"
    at.run(timeout=TIMEOUT)  # later visits: already downloaded, used as the source
    assert "Already downloaded to" in page_text(at) and at.button(key="data_download").disabled


def test_tensorboard_page_starts_links_and_stops(env, monkeypatch):
    from fer_core import tensorboard as tb

    running: dict[str, tb.TensorBoardInfo] = {}

    def start(runs_dir, port=None):
        running["info"] = tb.TensorBoardInfo(url="http://127.0.0.1:6123/", port=6123, pid=4242,
                                             reused=False, logdir=str(runs_dir))
        return running["info"]

    monkeypatch.setattr(tb, "start_tensorboard", start)
    monkeypatch.setattr(tb, "tensorboard_status", lambda runs_dir: running.get("info"))
    monkeypatch.setattr(tb, "stop_tensorboard", lambda runs_dir: running.pop("info", None) is not None)

    at = open_page("tensorboard")
    assert "TensorBoard is **not running**" in page_text(at)
    at.button(key="tb_start").click().run(timeout=TIMEOUT)
    assert "TensorBoard is **running** at [http://127.0.0.1:6123/]" in page_text(at)
    assert at.get("link_button")[0].proto.url == "http://127.0.0.1:6123/"
    at.toggle(key="tb_embed").set_value(True).run(timeout=TIMEOUT)
    frame, = at.get("iframe")
    assert frame.proto.src == "http://127.0.0.1:6123/"
    at.button(key="tb_stop").click().run(timeout=TIMEOUT)
    assert "TensorBoard is **not running**" in page_text(at) and "info" not in running


def test_tensorboard_start_errors_are_shown_as_text(env, monkeypatch):
    from fer_core import tensorboard as tb
    from fer_core.errors import FerError

    def busy(runs_dir, port=None):
        raise FerError(f"port {port} on 127.0.0.1 is already in use; choose another port")

    monkeypatch.setattr(tb, "start_tensorboard", busy)
    monkeypatch.setattr(tb, "tensorboard_status", lambda runs_dir: None)
    at = open_page("tensorboard")
    at.number_input(key="tb_port").set_value(6006)
    at.button(key="tb_start").click().run(timeout=TIMEOUT)
    assert "TensorBoard did not start: port 6006 on 127.0.0.1 is already in use" in \
        " ".join(e.value for e in at.error)


# ---- the pure helpers behind the pages -------------------------------------------------

def test_ui_helpers_format_and_measure_progress():
    assert ui_data.format_duration(None) == "—" and ui_data.format_duration(42) == "42 s"
    assert ui_data.format_duration(185) == "3 min 05 s" and ui_data.format_duration(3720) == "1 h 02 min"
    assert ui_data.job_progress({"state": "running", "epoch": 2, "epochs": 4, "batch": 5, "batches": 10}) == 0.375
    assert ui_data.job_progress({"state": "queued", "epoch": 0, "epochs": 4}) == 0.0
    assert ui_data.job_progress({"state": "completed", "epoch": 3, "epochs": 4}) == 1.0
    assert ui_data.dataset_label("demo") == "demo (SYNTHETIC)"
    assert ui_data.dataset_label("/data/fer2013/fer2013.csv") == "fer2013.csv"


def test_a_click_on_the_matrix_names_its_cell():
    classes = ["angry", "happy", "sad"]
    click = {"selection": {"points": [{"curve_number": 1, "point_index": 5, "x": "sad", "y": "happy"}],
                           "point_indices": [5], "box": [], "lasso": []}}
    assert ui_data.cell_from_selection(click, classes) == ("happy", "sad")
    assert ui_data.cell_from_selection({"selection": {"points": []}}, classes) is None
    assert ui_data.cell_from_selection(None, classes) is None
    figure = ui_data.confusion_figure({"classes": classes, "confusion_matrix": [[3, 1, 0], [0, 4, 1], [2, 0, 5]]})
    heatmap, cells = figure.data
    assert heatmap.type == "heatmap" and list(heatmap.y) == classes
    assert cells.type == "scatter" and len(cells.x) == 9  # one clickable marker per cell


def test_gallery_images_decode_from_files_and_fer2013_csv_rows(tmp_path):
    import csv

    import numpy as np
    from PIL import Image

    png = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48), 7, dtype=np.uint8)).save(png)
    table = tmp_path / "fer2013.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        for value in (10, 20, 30):
            writer.writerow([3, " ".join([str(value)] * 48 * 48), "PublicTest"])
    images = ui_data.load_image_arrays([str(png), f"{table}#3", f"{table}#4", f"{table}#99",
                                        str(tmp_path / "gone.png")])
    assert [None if a is None else int(a[0, 0]) for a in images] == [7, 20, 30, None, None]
