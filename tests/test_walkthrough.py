"""What a new user met on Home, Train and Runs (issue #11), each driven headless with AppTest.

Fixtures and helpers come from test_app_pages: one really trained tiny run per session,
copied into each test's own runs folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from fer_core import jobs, run_admin, runs  # noqa: E402
from test_app_pages import add_finished, frame_with_columns, open_page, page_text  # noqa: E402

TIMEOUT = 60


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """The app sets torch to one thread in its process (here: pytest's); restore it after."""
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_launch(launched: list):
    """jobs.launch without processes: the run folder and its queued job record."""
    def launch(config, *, max_concurrent=1):
        layout = runs.RunLayout.create(Path(config.runs_dir), config.experiment, config.mode)
        runs.atomic_write_json(layout.config_file, config.to_dict())
        runs.atomic_write_json(layout.job_file, runs.JobRecord(queued_at=time.time()).to_dict())
        launched.append((config, layout.path))
        return layout.path
    return launch


def test_after_launch_the_monitor_follows_the_new_run_with_a_relative_runs_folder(
        env, app_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_RUNS_DIR", "runs")  # the default is relative too: runs/
    add_finished(app_data, env)
    launched: list = []
    monkeypatch.setattr(jobs, "launch", fake_launch(launched))
    at = open_page("train", train_form_open=True)
    assert "tinyexp" in at.selectbox(key="train_run_picker").value
    at.button(key="FormSubmitter:train_form-Launch training").click().run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    (config, new_run), = launched
    assert at.selectbox(key="train_run_picker").value == str(new_run.resolve())
    assert "Queued: one job trains at a time" in page_text(at)


def with_published_checkpoint(run_dir: Path, checkpoints: Path) -> Path:
    """Give a copied run its own published model (a copy shares the template's otherwise)."""
    from types import SimpleNamespace

    from fer_core.train import publish_best
    layout = runs.RunLayout(run_dir)
    published = publish_best(run_dir, SimpleNamespace(checkpoints_dir=str(checkpoints)))
    assert published == layout.published_checkpoint(checkpoints)
    status = runs.read_json(layout.status_file)
    status["published_checkpoint"] = str(published)
    runs.atomic_write_json(layout.status_file, status)
    return published


@pytest.mark.parametrize("action", ["delete", "archive"])
def test_delete_and_archive_withdraw_the_published_model(env, app_data, action):
    run_dir = add_finished(app_data, env)
    published = with_published_checkpoint(run_dir, env.ckpt)
    bystander = with_published_checkpoint(add_finished(app_data, env, stamp="2030-02-02_00-00-00"), env.ckpt)
    if action == "delete":
        run_admin.delete_run(run_dir, env.runs)
    else:
        archived = run_admin.archive_run(run_dir, env.runs)
        assert (archived / "checkpoints" / "best.pt").is_file()  # the archive keeps its weights
    assert not published.exists() and bystander.exists()


@pytest.mark.parametrize("action", ["delete", "archive"])
def test_a_failed_delete_or_archive_keeps_the_published_model(env, app_data, action, monkeypatch):
    run_dir = add_finished(app_data, env)
    published = with_published_checkpoint(run_dir, env.ckpt)

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run_dir))

    monkeypatch.setattr(shutil, "rmtree" if action == "delete" else "move", fail)
    with pytest.raises(OSError):
        getattr(run_admin, f"{action}_run")(run_dir, env.runs)
    assert published.is_file() and run_dir.is_dir()


def test_delete_refuses_a_folder_above_a_run(env, app_data):
    run_dir = add_finished(app_data, env)
    with pytest.raises(Exception, match="not a run directory"):
        run_admin.delete_run(run_dir.parent.parent.parent, env.runs)  # the timestamp folder
    assert run_dir.is_dir()


def test_the_log_box_shows_the_newest_lines(env, app_data):
    run_dir = add_finished(app_data, env)
    (run_dir / runs.LOG_FILE).write_text("glibc malloc: heap only\n" + "".join(
        f"epoch {i}/100 done\n" for i in range(1, 101)))
    at = open_page("train")
    (log,) = [c for c in at.code if "epoch" in c.value]
    shown = log.value.splitlines()
    assert shown[-1] == "epoch 100/100 done" and "glibc malloc" not in log.value
    assert len(shown) <= 15  # the box fits what it shows: nothing to scroll to see the newest


def test_a_run_cancelled_before_its_first_epoch_offers_start_again(env, app_data, monkeypatch):
    layout = runs.RunLayout.create(env.runs, "early", "finetune")
    config = runs.read_json(app_data.run / runs.CONFIG_FILE)
    config.update(experiment="early", runs_dir=str(env.runs), checkpoints_dir=str(env.ckpt))
    runs.atomic_write_json(layout.config_file, config)
    runs.atomic_write_json(layout.status_file, runs.TrainerStatus(state="cancelled", pid=1, epoch=0).to_dict())
    launched: list = []
    monkeypatch.setattr(jobs, "launch", fake_launch(launched))
    at = open_page("train")
    text = page_text(at)
    assert "Cancelled before its first epoch finished" in text and "resume it below" not in text
    assert not [b for b in at.button if b.label == "Resume"]
    at.button(key=f"again_{layout.id}").click().run(timeout=TIMEOUT)
    (new_config, _), = launched
    assert (new_config.experiment, new_config.epochs) == ("early", config["epochs"])


def test_home_counts_the_dataset_chosen_on_the_data_page(env, app_data, tmp_path):
    elsewhere = shutil.copytree(app_data.tiny, tmp_path / "fer2013-here")
    before = open_page("home")
    count = int([m.value for m in before.metric if m.label == "Datasets found"][0])
    at = open_page("home", data_source=str(elsewhere))
    assert [m.value for m in at.metric if m.label == "Datasets found"] == [str(count + 1)]
    assert "fer2013-here" in page_text(at)


def test_the_cli_and_the_app_list_the_same_runs_with_the_same_states(env, app_data, tmp_path):
    import json
    import subprocess
    import sys

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        add_finished(app_data, env, stamp="2030-01-01_00-00-00")
        for name, trainer, job in (
                ("crashed", {"state": "running", "pid": gone.pid}, None),
                ("live", {"state": "running", "pid": sleeper.pid}, None),
                ("waiting", None, {"queued_at": time.time()}),
                ("stopped", None, {"queued_at": 1.0, "outcome": "cancelled"})):
            layout = runs.RunLayout.create(env.runs, name, "finetune")
            runs.atomic_write_json(layout.config_file, {"experiment": name, "mode": "finetune", "data": "demo"})
            if trainer:
                runs.atomic_write_json(layout.status_file, runs.TrainerStatus(**trainer).to_dict())
            if job:
                runs.atomic_write_json(layout.job_file, runs.JobRecord(**job).to_dict())
        damaged = add_finished(app_data, env, stamp="2030-03-03_00-00-00")
        (damaged / runs.EVALUATION_FILE).write_text('{"accuracy": "high"}')

        listed = subprocess.run([sys.executable, "-m", "fer_core", "runs", "--json"], capture_output=True,
                                text=True, timeout=120, check=True)  # FER_RUNS_DIR: the env fixture's
        cli_states = {row["id"]: row["state"] for row in map(json.loads, listed.stdout.splitlines())}
        table = frame_with_columns(open_page("runs"), "run", "state")
        assert dict(zip(table["run"], table["state"])) == cli_states
        assert sorted(cli_states.values()) == sorted(
            ["completed", "failed", "running", "queued", "cancelled", "damaged"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_runs_page_offers_the_slim_model_first_and_the_full_checkpoint_for_resuming(env, app_data):
    run_dir = add_finished(app_data, env)
    with_published_checkpoint(run_dir, env.ckpt)
    at = open_page("runs")
    labels = [element.proto.label for element in at.get("download_button")]
    assert labels == ["Download model", "Full checkpoint (for resuming elsewhere)"]
    published = runs.RunLayout(run_dir).published_checkpoint(env.ckpt)
    assert published.stat().st_size < (run_dir / "checkpoints" / "best.pt").stat().st_size


def test_the_demo_recipe_needs_no_imagenet_weights_and_missing_weights_are_said_calmly(env, app_data):
    from fer_core.config import config_from_preset
    assert config_from_preset("demo-quick", data="demo").pretrained is False

    run_dir = add_finished(app_data, env)
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    runs.atomic_write_json(run_dir / runs.CONFIG_FILE, {**config, "pretrained": True})
    environment = runs.read_json(run_dir / runs.ENVIRONMENT_FILE)
    runs.atomic_write_json(run_dir / runs.ENVIRONMENT_FILE, {
        **environment, "weights_source": "random",
        "weights_warning": "URLError: <urlopen error [Errno -2] Name or service not known>"})
    at = open_page("train")
    said = [e.value for e in at.info if "ImageNet weights were requested" in e.value]
    assert len(said) == 1 and not [e for e in at.warning if "ImageNet" in e.value]
    assert "URLError" not in page_text(at) and "Name or service" not in page_text(at)


@pytest.mark.parametrize("page", ["home", "train", "runs"])
def test_experiment_and_class_names_show_literally_on_home_train_and_runs(env, app_data, page):
    """Issue #12 item 5 on the pages that list runs: names from files never become Markdown."""
    from markdown_safety import MALICIOUS_IMAGE, active_markdown

    run_dir = add_finished(app_data, env)
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    runs.atomic_write_json(run_dir / runs.CONFIG_FILE, {**config, "experiment": MALICIOUS_IMAGE,
                                                        "data": f"/data/{MALICIOUS_IMAGE}"})
    (run_dir / runs.LOG_FILE).write_text(f"epoch 1 {MALICIOUS_IMAGE}\n")
    at = open_page(page)
    assert not active_markdown(at), active_markdown(at)
