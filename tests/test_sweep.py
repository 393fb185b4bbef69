"""Hyper-parameter sweeps (fer_core.sweep): the search-space syntax, trials as normal run
folders, pruning recorded in the run, a second worker process joining a study, and the Sweeps page."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import copy_run_dir, tiny_config
from fer_core import cli, jobs, runs, sweep, ui_data
from fer_core.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SPACE = "lr=log:0.001..0.01,label_smoothing=0..0.2"


@pytest.fixture(autouse=True)
def sweeps_beside_runs(monkeypatch):
    """The default place: sweeps/ beside each test's runs folder, whatever this machine sets."""
    monkeypatch.delenv("FER_SWEEPS_DIR", raising=False)


def sweep_config(data: Path, tmp_path: Path, **overrides):
    return tiny_config(data, tmp_path, num_threads=1, **overrides)


def study_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


# ---- the search space ----------------------------------------------------------------------

def test_the_three_forms_of_a_search_space_become_optuna_distributions():
    space = sweep.parse_space("lr=log:0.01..0.3, label_smoothing=0..0.2,batch_size=choice:64|128,"
                              "epochs=2..6,augment=choice:true|false")
    assert space == {"lr": FloatDistribution(0.01, 0.3, log=True),
                     "label_smoothing": FloatDistribution(0.0, 0.2),
                     "batch_size": CategoricalDistribution([64, 128]),
                     "epochs": IntDistribution(2, 6),
                     "augment": CategoricalDistribution([True, False])}
    assert sweep.parse_space(sweep.space_text(space)) == space  # what a study stores reads back the same
    precise = sweep.parse_space("lr=log:0.0001234567..0.3,label_smoothing=0..0.9999999")
    assert sweep.parse_space(sweep.space_text(precise)) == precise  # no bound rounded to 6 digits


@pytest.mark.parametrize("text, message", [
    ("", "the search space is empty"),
    ("lr", "write name=LOW..HIGH"),
    ("flavour=1..2", "unknown field 'flavour'; tunable fields: mode, stem, epochs, batch_size, lr"),
    ("seed=1..3", "seed cannot be tuned (it changes the validation images"),
    ("lr=20..30", "learning rate must be in [1e-07, 10] (got 20.0)"),
    ("lr=0.3..0.01", "the low end must be below the high end"),
    ("lr=0.1", "a range is written LOW..HIGH"),
    ("lr=abc..1", "'abc' is not a number"),
    ("batch_size=1.5..4", "'1.5' is not a whole number"),
    ("label_smoothing=0..1", "label smoothing must be in [0, 1) (got 1.0)"),
    ("optimizer=0..1", "optimizer is not a number; give choice:A|B (one of adamw, sgd)"),
    ("optimizer=choice:sgd|adam", "optimizer must be one of adamw, sgd (got 'adam')"),
    ("lr=exp:0.1..1", "unknown kind 'exp'"),
    ("amp=choice:yes|maybe", "'maybe' is not true or false"),
    ("lr=0.1..0.2,lr=0.1..0.3", "lr is given twice"),
])
def test_a_bad_search_space_names_the_bad_part_and_what_is_allowed(text, message):
    with pytest.raises(ConfigError) as error:
        sweep.parse_space(text)
    assert message in str(error.value)
    if text.strip():
        assert repr(text.split(",")[-1]) in str(error.value) or "twice" in str(error.value)


def test_a_range_must_fit_the_sweeps_other_settings(tmp_path):
    base = tiny_config("demo", tmp_path, epochs=2)
    with pytest.raises(ConfigError, match="warmup_epochs=5.0 with the sweep's settings: warm-up epochs must not "
                                          "exceed epochs"):
        sweep.check_space(base, sweep.parse_space("warmup_epochs=0..5"))
    with pytest.raises(ConfigError, match="epochs=2, warmup_epochs=3.0 with the sweep's settings"):
        sweep.check_space(base, sweep.parse_space("epochs=2..6,warmup_epochs=0..3"))  # both tuned: a corner
    with pytest.raises(ConfigError, match="ema_decay: 0 means off and values start at 0.5, so a range cannot "
                                          "span the gap"):
        sweep.check_space(base, sweep.parse_space("ema_decay=0..0.99"))
    sweep.check_space(base, sweep.parse_space("ema_decay=0.5..0.99,lr=log:0.001..0.01"))


def test_the_cli_refuses_a_bad_space_in_one_line_before_creating_anything(tmp_path, capsys):
    code = cli.main(["sweep", "--data", "demo", "--trials", "2", "--space", "lr=log:0..0.3",
                     "--runs-dir", str(tmp_path / "runs"), "--sweeps-dir", str(tmp_path / "sweeps")])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: search space part 'lr=log:0..0.3': learning rate must be "
                                               "in [1e-07, 10] (got 0.0)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("name", ["a?b", "50%25", "x#y"])
def test_a_study_name_that_would_change_its_database_url_is_refused(name):
    with pytest.raises(ConfigError, match="study name must not contain"):
        sweep.check_study_name(name)


def test_joining_a_study_that_does_not_exist_says_how_to_create_it(tmp_path):
    with pytest.raises(ConfigError, match="study 'nothing-here' does not exist in sqlite:.*give --space"):
        sweep.run_sweep("nothing-here", trials=1, sweeps_dir=tmp_path / "sweeps")
    assert not (tmp_path / "sweeps").exists()  # nor an empty database left behind


# ---- sweeps that train --------------------------------------------------------------------------

def test_a_three_trial_sweep_makes_three_tagged_runs_and_a_best_trial(tiny_demo, tmp_path):
    base = sweep_config(tiny_demo, tmp_path)
    started = time.perf_counter()
    result = sweep.run_sweep("tiny", trials=3, base=base, space=SPACE, pruner="none",
                             sweeps_dir=tmp_path / "sweeps")
    print(f"3-trial sweep: {time.perf_counter() - started:.1f} s")
    assert result.trials_run == 3 and result.stopped is None
    assert result.storage == f"sqlite:///{(tmp_path / 'sweeps' / 'tiny' / 'study.db').absolute()}"

    trials = study_trials(result.storage, "tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert sorted(run_dirs) == sorted(runs.find_run_dirs(tmp_path / "runs"))  # one normal run per trial
    for trial, run_dir in zip(trials, run_dirs):
        run = runs.load_run(run_dir)
        assert run.state == "completed" and run.experiment == f"tiny-t{trial.number}"
        assert trial.value == pytest.approx(run.best_val_acc)  # the objective: best validation accuracy
        assert list(trial.intermediate_values) == [1, 2]
        record = json.loads(runs.RunLayout(run_dir).trial_file.read_text())
        assert record["study"] == "tiny" and record["trial"] == trial.number and record["state"] == "completed"
        assert record["params"] == trial.params and run.config["lr"] == trial.params["lr"]
    best = max(trials, key=lambda t: t.value)
    assert result.best_value == best.value and result.best_run == best.user_attrs["run_dir"]
    study = optuna.load_study(study_name="tiny", storage=result.storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs["space"] == SPACE and study.user_attrs["base_config"]["epochs"] == 2

    # --trials is the study's total: asking again for 3 runs nothing more
    again = sweep.run_sweep("tiny", trials=3, sweeps_dir=tmp_path / "sweeps",
                            local={"runs_dir": str(tmp_path / "runs")})
    assert again.trials_run == 0 and len(study_trials(result.storage, "tiny")) == 3


def test_a_pruned_trial_stops_early_and_its_run_folder_says_so(tiny_demo, tmp_path):
    always = optuna.pruners.ThresholdPruner(lower=1.1)  # no accuracy reaches 1.1: pruned after epoch 1
    elsewhere = f"sqlite:///{tmp_path / 'server' / 'studies.db'}"  # as a PostgreSQL URL would be
    result = sweep.run_sweep("pruned", trials=1, base=sweep_config(tiny_demo, tmp_path, epochs=3), space=SPACE,
                             pruner=always, sweeps_dir=tmp_path / "sweeps", storage=elsewhere)
    (entry,) = sweep.list_studies(tmp_path / "sweeps")  # the Sweeps page of this machine lists it
    assert (entry.name, entry.storage) == ("pruned", elsewhere)
    (trial,) = study_trials(result.storage, "pruned")
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    layout = runs.RunLayout(Path(trial.user_attrs["run_dir"]))
    status = runs.read_json(layout.status_file)
    reason = "pruned by the sweep's ThresholdPruner pruner at epoch 1"
    assert status["early_stopped_at"] == 1 and status["stop_reason"] == reason
    run = runs.load_run(layout)
    assert run.status.stop_reason == reason and len(run.metrics) == 1
    assert run.state == "completed" and run.evaluation is not None  # the best model is still evaluated
    assert ui_data.runs_frame([run])["stopped early"].tolist() == [reason]  # the Runs table says why
    record = json.loads(layout.trial_file.read_text())
    assert record["state"] == "pruned" and record["stop_reason"] == reason
    assert result.best_trial is None


def test_the_next_trial_waits_while_a_train_page_job_runs_and_not_when_asked_to_stop(tmp_path):
    import os
    import threading
    runs_dir = tmp_path / "runs"
    job = runs.RunLayout.create(runs_dir, "from-the-train-page", "finetune")
    status = runs.TrainerStatusWriter.start(job, epochs=1, pid=os.getpid())
    finish = threading.Timer(1.0, status.finish, args=("completed",))
    finish.start()
    started = time.monotonic()
    assert sweep.wait_for_training_slot(runs_dir, lambda: False, poll_s=0.05) is False  # the slot is free
    assert time.monotonic() - started >= 0.9 and runs.run_status(job)[0].state == "completed"

    runs.TrainerStatusWriter.start(job, epochs=1, pid=os.getpid())  # running again: a stop does not wait
    started = time.monotonic()
    assert sweep.wait_for_training_slot(runs_dir, lambda: True, poll_s=0.05) is True  # stopped: no trial
    assert time.monotonic() - started < 0.5


def test_stop_pressed_while_the_sweep_waits_for_the_slot_starts_no_trial(tiny_demo, tmp_path):
    import os
    base = sweep_config(tiny_demo, tmp_path, epochs=1)
    busy = runs.RunLayout.create(Path(base.runs_dir), "from-the-train-page", "finetune")
    runs.TrainerStatusWriter.start(busy, epochs=1, pid=os.getpid())  # a Train-page job holds the slot
    stop = sweep.StudyLayout.of(tmp_path / "sweeps", "waiting").stop_file
    stop.parent.mkdir(parents=True)
    stop.write_text("{}")
    os.utime(stop, (time.time() + 3600,) * 2)  # pressed while the sweep waits
    result = sweep.run_sweep("waiting", trials=2, base=base, space=SPACE, pruner="none",
                             sweeps_dir=tmp_path / "sweeps")
    assert result.trials_run == 0 and result.stopped == "stopped on request while waiting for the training slot"
    assert study_trials(result.storage, "waiting") == []


def test_a_second_worker_process_joins_the_study_without_duplicates(tiny_demo, tmp_path):
    sweeps_dir = tmp_path / "sweeps"
    first = sweep.run_sweep("shared", trials=1, base=sweep_config(tiny_demo, tmp_path), space=SPACE,
                            pruner="none", sweeps_dir=sweeps_dir)
    # the second worker takes the space and settings from the study; only its folders are its own
    command = [sys.executable, "-m", "fer_core", "sweep", "--study", "shared", "--storage", first.storage,
               "--trials", "4", "--pruner", "none", "--runs-dir", str(tmp_path / "runs"),
               "--checkpoints-dir", str(tmp_path / "published"), "--num-threads", "1",
               "--sweeps-dir", str(sweeps_dir)]
    worker = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        local = {"runs_dir": str(tmp_path / "runs"), "checkpoints_dir": str(tmp_path / "published"), "num_threads": 1}
        here = sweep.run_sweep("shared", trials=4, sweeps_dir=sweeps_dir, pruner="none", local=local)
        output, _ = worker.communicate(timeout=300)
    finally:
        worker.kill()
    assert worker.returncode == 0, output
    trials = study_trials(first.storage, "shared")
    numbers = [t.number for t in trials]
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(numbers)) == len(numbers) and len(set(run_dirs)) == len(run_dirs)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # both workers stop at the total; two finishing at the same instant may each start one more
    assert 4 <= len(trials) <= 5, output
    assert here.trials_run >= 1 and "trial(s) run by this worker" in output
    assert sorted(map(Path, run_dirs)) == sorted(runs.find_run_dirs(tmp_path / "runs"))


def test_a_joining_worker_with_other_settings_is_refused(tmp_path):
    sweeps_dir = tmp_path / "sweeps"
    storage = sweep.default_storage(sweeps_dir, "strict")
    study = optuna.create_study(study_name="strict", storage=sweep.open_storage(storage), direction="maximize")
    study.set_user_attr("base_config", sweep_config("demo", tmp_path).to_dict())
    study.set_user_attr("space", SPACE)
    with pytest.raises(ConfigError, match="a joining worker must use the same space"):
        sweep.run_sweep("strict", trials=2, base=sweep_config("demo", tmp_path), space="lr=0.001..0.002",
                        sweeps_dir=sweeps_dir)
    with pytest.raises(ConfigError, match=r"created with other settings \(batch_size\)"):
        sweep.run_sweep("strict", trials=2, base=sweep_config("demo", tmp_path, batch_size=32), space=SPACE,
                        sweeps_dir=sweeps_dir)
    assert study.get_trials() == []


# ---- the Sweeps page -------------------------------------------------------------------------

def finished_study(env, app_data, name: str = "page-study") -> tuple[Path, list[Path]]:
    """A study in the page's sweeps folder with two complete trials and one pruned one, each with
    a copy of the session's trained run as its run folder: no training here."""
    from fer_core.config import TrainConfig
    folder = env.runs.parent / "sweeps" / name
    storage = sweep.default_storage(folder.parent, name)
    study = optuna.create_study(study_name=name, storage=sweep.open_storage(storage), direction="maximize")
    base = TrainConfig.from_dict(runs.read_json(app_data.run / runs.CONFIG_FILE))
    study.set_user_attr("base_config", base.to_dict())
    study.set_user_attr("space", SPACE)
    distributions = sweep.parse_space(SPACE)
    run_dirs = []
    for number, (lr, smoothing, value, state) in enumerate([(0.002, 0.05, 0.5, TrialState.COMPLETE),
                                                             (0.008, 0.15, 0.7, TrialState.COMPLETE),
                                                             (0.004, 0.10, None, TrialState.PRUNED)]):
        run_dir = copy_run_dir(app_data.run, env.runs / f"2030-01-01_00-00-0{number}" / f"{name}-t{number}"
                               / runs.MODEL_NAME / "finetune")
        run_dirs.append(run_dir)
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "label_smoothing": smoothing}, distributions=distributions, value=value, state=state,
            intermediate_values={1: 0.3, 2: value or 0.2}, user_attrs={"run_dir": str(run_dir)}))
    return folder, run_dirs


def sweeps_page(**state):
    from test_app_pages import open_page
    return open_page("sweeps", **state)


def test_the_sweeps_page_shows_a_finished_study_best_first_with_its_charts(env, app_data):
    from test_app_pages import page_text, table_with_columns
    finished_study(env, app_data)
    at = sweeps_page()
    assert [t.value for t in at.title] == ["Sweeps"]
    table = table_with_columns(at, "trial", "state", "value", "lr", "label_smoothing", "run").value
    assert list(table["trial"]) == [1, 0, 2] and list(table["state"]) == ["complete", "complete", "pruned"]
    text = page_text(at)
    assert "Best: trial 1 with lr=0.008, label\\_smoothing=0.15" in text  # as typed: no Markdown emphasis
    titles = {json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in at.get("plotly_chart")}
    assert {"Optimization History Plot", "Parallel Coordinate Plot", "Intermediate Values Plot"} <= titles
    assert any("Importance" in title for title in titles)
    assert at.button(key="sweep_train_best") and at.button(key="sweep_open_run")

    # open the best trial's run: the Train page shows it
    at.button(key="sweep_open_run").click().run()
    assert not at.exception and at.title[0].value == "Train"
    assert at.selectbox(key="train_run_picker").value.endswith("page-study-t1/resnet18/finetune")


def test_a_study_in_another_database_is_added_on_the_page_and_listed_from_then_on(env, tmp_path):
    from test_app_pages import page_text
    # another database file stands in for the PostgreSQL server other machines share
    elsewhere = f"sqlite:///{tmp_path / 'shared-server' / 'studies.db'}"
    remote = optuna.create_study(study_name="remote", storage=sweep.open_storage(elsewhere), direction="maximize")
    remote.set_user_attr("space", SPACE)
    remote.add_trial(optuna.trial.create_trial(params={"lr": 0.003, "label_smoothing": 0.1},
                                               distributions=sweep.parse_space(SPACE), value=0.6))
    sweeps_root = env.runs.parent / "sweeps"
    assert sweep.list_studies(sweeps_root) == []

    at = sweeps_page()
    at.text_input(key="sweeps_add_url").input(elsewhere).run()
    assert at.selectbox(key="sweeps_add_name").options == ["remote"]
    at.button(key="sweeps_add").click().run()
    assert not at.exception
    assert "Best: trial 0 with lr=0.003, label\\_smoothing=0.1" in page_text(at)
    (entry,) = sweep.list_studies(sweeps_root)
    assert (entry.name, entry.storage, entry.job) == ("remote", elsewhere, None)
    assert sweep.load_study_at(entry.folder).trials[0].value == 0.6

    at.text_input(key="sweeps_add_url").input("nonsense").run()  # not a URL: said in words
    assert "storage must be a database URL" in page_text(at) and not at.exception


def test_a_study_with_one_trial_explains_the_charts_it_cannot_draw_yet(env):
    from test_app_pages import page_text
    storage = sweep.default_storage(env.runs.parent / "sweeps", "lone")
    lone = optuna.create_study(study_name="lone", storage=sweep.open_storage(storage), direction="maximize")
    lone.set_user_attr("space", SPACE)
    lone.add_trial(optuna.trial.create_trial(params={"lr": 0.002, "label_smoothing": 0.1},
                                             distributions=sweep.parse_space(SPACE), value=0.5))
    at = sweeps_page()
    text = page_text(at)
    assert "Best: trial 0 with lr=0.002, label\\_smoothing=0.1" in text
    assert "The parallel coordinates appears when two trials have completed." in text
    assert "The parameter importances appears when two completed trials differ in their settings." in text
    assert "The validation accuracy per epoch (intermediate values) appears when a trial has finished an epoch." \
        in text
    assert len(at.get("plotly_chart")) == 1  # the optimisation history alone


def test_launching_from_the_page_starts_a_background_sweep_and_stop_asks_it_to_end(env, app_data, monkeypatch,
                                                                                     sleeper):
    spawned = []

    def fake_spawn(python_args, log_file):  # records what would start; a live sleeper stands in for it
        spawned.append(python_args)
        return sleeper.pid

    monkeypatch.setattr(jobs, "spawn_detached", fake_spawn)
    at = sweeps_page()
    assert "No sweeps yet." in "\n".join(i.value for i in at.info)
    form_name = next(t for t in at.text_input if t.label == "Study name")
    form_name.set_value("from-page")
    at.button(key="FormSubmitter:sweep_form-Launch sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (args,) = spawned
    assert args[:3] == ["-m", "fer_core", "sweep"] and args[args.index("--study") + 1] == "from-page"
    assert args[args.index("--space") + 1] == sweep.example_space(2e-3)
    folder = env.runs.parent / "sweeps" / "from-page"
    job = sweep.read_sweep_job(folder)
    assert job.running and job.pid == sleeper.pid and job.trials == 8
    base = json.loads(sweep.StudyLayout(folder).base_config_file.read_text())
    assert base["preset"] == "demo-quick" and base["epochs"] == 4 and base["runs_dir"] == str(env.runs.resolve())
    assert at.selectbox(key="sweeps_study").value == "from-page"

    at.button(key="sweep_stop").click().run()
    assert sweep.StudyLayout(folder).stop_file.exists() and sweep.read_sweep_job(folder).stop_requested


def test_a_stop_request_ends_the_sweep_after_its_current_trial(tiny_demo, tmp_path):
    import os
    stop = sweep.StudyLayout.of(tmp_path / "sweeps", "halted").stop_file
    stop.parent.mkdir(parents=True)
    stop.write_text("{}")
    os.utime(stop, (time.time() + 3600,) * 2)  # as if asked for while the first trial trains
    result = sweep.run_sweep("halted", trials=3, base=sweep_config(tiny_demo, tmp_path, epochs=1), space=SPACE,
                             pruner="none", sweeps_dir=tmp_path / "sweeps")
    assert result.trials_run == 1 and result.stopped == "stopped on request after the current trial"
    assert [t.state for t in study_trials(result.storage, "halted")] == [TrialState.COMPLETE]


def test_the_train_monitor_shows_why_a_trial_stopped_early_as_plain_text(env, app_data):
    from test_app_pages import add_finished, open_page, page_text
    run_dir = add_finished(app_data, env)
    status = runs.read_json(run_dir / runs.STATUS_FILE)
    status.update(early_stopped_at=1, stop_reason="pruned by the sweep's *median* pruner at epoch 1")
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, status)
    runs.atomic_write_json(runs.RunLayout(run_dir).trial_file, {"study": "s_1", "trial": 3, "state": "pruned"})
    text = page_text(open_page("train"))
    assert "Stopped early after epoch 1: pruned by the sweep's \\*median\\* pruner at epoch 1." in text
    assert "Trial 3 of the sweep s\\_1 (pruned); see the Sweeps page." in text


def test_a_study_named_like_markdown_shows_literally(env, app_data):
    from markdown_safety import active_markdown
    name = "![x](x.png)**bold**"
    finished_study(env, app_data, name)
    at = sweeps_page()
    assert not active_markdown(at), active_markdown(at)
    assert at.selectbox(key="sweeps_study").value == name


def test_train_this_config_fully_launches_the_best_settings_with_more_epochs(env, app_data, monkeypatch):
    launched = []

    def fake_launch(config, *, max_concurrent=1):  # a queued run folder, as jobs.launch leaves it
        layout = runs.RunLayout.create(Path(config.runs_dir), config.experiment, config.mode)
        runs.atomic_write_json(layout.config_file, config.to_dict())
        runs.atomic_write_json(layout.job_file, runs.JobRecord(queued_at=time.time()).to_dict())
        launched.append(config)
        return layout.path

    monkeypatch.setattr(jobs, "launch", fake_launch)
    monkeypatch.setattr(jobs, "pump_queue", lambda *a, **k: [])
    finished_study(env, app_data)
    at = sweeps_page()
    assert at.number_input(key="sweep_full_epochs::page-study").value == 4  # twice the trials' 2 epochs
    at.number_input(key="sweep_full_epochs::page-study").set_value(6)
    at.button(key="sweep_train_best").click().run()
    assert not at.exception and at.title[0].value == "Train"
    (config,) = launched
    assert (config.lr, config.label_smoothing, config.epochs) == (0.008, 0.15, 6)
    assert config.experiment == "page-study-best" and config.notes["from_sweep"] == {"study": "page-study",
                                                                                     "trial": 1}
    assert Path(config.runs_dir) == env.runs.resolve()  # the app's runs folder, not the one the study recorded
    assert "Queued: one job trains at a time" in "\n".join(i.value for i in at.info)


def test_a_trial_whose_worker_died_is_failed_and_not_counted_when_the_sweep_runs_again(tmp_path):
    import os
    import socket
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="crashed", storage=storage, direction="maximize")
    runs_dir = tmp_path / "runs"
    trials = {}
    for name, pid in (("dead", None), ("alive", os.getpid())):
        layout = runs.RunLayout.create(runs_dir, f"crashed-{name}", "finetune")
        runs.TrainerStatusWriter.start(layout, epochs=2, pid=pid or _gone_pid())  # "running", as a crash leaves it
        trial = study.ask()
        trial.set_user_attr("run_dir", str(layout.path))
        trial.set_user_attr("host", socket.gethostname())
        trials[name] = trial.number
    elsewhere = study.ask()  # another machine's worker sharing the storage: its pids mean nothing here
    layout = runs.RunLayout.create(runs_dir, "crashed-elsewhere", "finetune")
    runs.TrainerStatusWriter.start(layout, epochs=2, pid=_gone_pid())
    elsewhere.set_user_attr("run_dir", str(layout.path))
    elsewhere.set_user_attr("host", "another-machine")
    assert sweep.fail_abandoned_trials(study) == [trials["dead"]]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {trials["dead"]: TrialState.FAIL, trials["alive"]: TrialState.RUNNING,
                      elsewhere.number: TrialState.RUNNING}


def _gone_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid
