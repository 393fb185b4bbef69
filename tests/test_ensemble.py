"""fer_core.ensemble: runs averaged into one model that evaluates, predicts and exports like one."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fer_core import calibration, cli, ensemble, runs
from fer_core.data import display_path, load_dataset
from fer_core.errors import FerError
from fer_core.evaluate import read_predictions
from fer_core.predict import Predictor


@pytest.fixture(scope="module")
def second_run(tiny_demo, tmp_path_factory) -> Path:
    """Another finished run on the same split as `trained_run` (same seed), trained differently."""
    from fer_core.train import fit
    return fit(tiny_config(tiny_demo, tmp_path_factory.mktemp("second"), lr=6e-3))


def test_an_ensemble_is_a_run_scored_on_the_common_test_split_and_a_model_predict_loads(
        trained_run, second_run, tiny_demo, tmp_path):
    folder = ensemble.create_ensemble([trained_run, second_run], "pair", runs_dir=tmp_path / "runs",
                                      checkpoints_dir=tmp_path / "published")
    run = runs.load_run(folder)
    assert (run.state, run.mode, run.experiment, run.problems) == ("completed", "ensemble", "pair", [])
    members = [runs.load_run(d) for d in (trained_run, second_run)]
    assert run.evaluation["num_images"] == members[0].evaluation["num_images"]
    assert run.evaluation["members"] == [str(trained_run.resolve()), str(second_run.resolve())]

    # its probabilities are the average of the members' calibrated ones, face by face
    predictors = [Predictor.load(runs.RunLayout(d).best_checkpoint) for d in (trained_run, second_run)]
    assert all(p.calibration is not None for p in predictors)
    rows = read_predictions(runs.RunLayout(folder).predictions_file())
    dataset = load_dataset(str(tiny_demo))
    tested = {row["path"] for row in rows}
    images = dataset.images[[i for i, path in enumerate(dataset.paths) if display_path(path) in tested]]
    classes = run.evaluation["classes"]
    table = np.array([[r["probabilities"][c] for c in classes] for r in rows])
    expected = np.mean([p.probabilities(images).numpy() for p in predictors], axis=0)  # each with its temperature
    assert np.abs(table - expected).max() < 1e-4  # the csv keeps 5 decimals

    published = runs.RunLayout(folder).published_checkpoint(tmp_path / "published")
    assert run.status.published_checkpoint == str(published)  # Runs offers it; removing the run withdraws it
    predictor = Predictor.load(published)
    assert predictor.class_names == classes and predictor.calibration is not None
    faces = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    raw = np.mean([calibration.apply_temperature(Predictor(p.model, p.class_names, p.img_size, tta=p.tta, amp=p.amp)
                                                 .probabilities(faces).numpy(), p.calibration.temperature)
                   for p in predictors], axis=0)
    expected = calibration.apply_temperature(raw, predictor.calibration.temperature)
    assert np.abs(predictor.probabilities(faces).numpy() - expected).max() < 1e-4


def test_an_ensemble_exports_to_onnx_and_answers_as_on_pytorch(trained_run, second_run, tmp_path):
    from fer_core.export import export_model
    folder = ensemble.create_ensemble([trained_run, second_run], "exported", runs_dir=tmp_path / "runs",
                                      checkpoints_dir=tmp_path / "published")
    result = export_model(folder, "onnx")
    on_torch = Predictor.load(runs.RunLayout(folder).best_checkpoint)
    on_onnx = Predictor.load(result.path)
    assert on_onnx.calibration == on_torch.calibration
    faces = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8)
    assert torch.allclose(on_onnx.probabilities(faces), on_torch.probabilities(faces), atol=1e-4)


def test_runs_that_cannot_be_averaged_are_refused_in_words(trained_run, tiny_demo, tmp_path):
    from fer_core.train import fit
    with pytest.raises(FerError, match="at least 2 runs"):
        ensemble.create_ensemble([trained_run], "one", runs_dir=tmp_path)
    with pytest.raises(FerError, match="listed twice"):
        ensemble.create_ensemble([trained_run, trained_run], "twice", runs_dir=tmp_path)
    reseeded = fit(tiny_config(tiny_demo, tmp_path, epochs=1, seed=7))  # the demo has no given test split
    with pytest.raises(FerError, match="tested on different images"):
        ensemble.create_ensemble([trained_run, reseeded], "apart", runs_dir=tmp_path)
    bigger = fit(tiny_config(tiny_demo, tmp_path, epochs=1, img_size=40))
    with pytest.raises(FerError, match="different input sizes"):
        ensemble.create_ensemble([trained_run, bigger], "sizes", runs_dir=tmp_path)
    with pytest.raises(FerError, match="ensemble name"):
        ensemble.create_ensemble([trained_run, bigger], "../out", runs_dir=tmp_path)
    assert not list((tmp_path / "runs").glob("*/apart")) and not list(tmp_path.glob("*/sizes"))


def test_the_ensemble_command_prints_its_scores_and_the_folder_last(trained_run, second_run, tmp_path, capsys):
    assert cli.main(["ensemble", str(trained_run), str(second_run), "--name", "cli-pair",
                     "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "pub")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ensemble of 2: test accuracy ")
    assert runs.load_run(Path(lines[-1])).mode == "ensemble"


def test_the_runs_page_builds_an_ensemble_in_the_background(env, app_data):
    import time

    from conftest import copy_run_dir
    from test_app_pages import open_page
    stamp_dir = app_data.run.relative_to(app_data.run.parents[3])
    first = copy_run_dir(app_data.run, env.runs / stamp_dir)
    second = copy_run_dir(app_data.run, env.runs / "2030-01-01_00-00-00" / stamp_dir.relative_to(stamp_dir.parts[0]))
    at = open_page("runs")
    at.multiselect(key="runs_ensemble_members").set_value([str(first), str(second)]).run()
    at.text_input(key="runs_ensemble_name").input("page-pair")
    at.button(key="runs_ensemble_build").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Building page-pair in the background" in at.success[0].value
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        built = [r for r in runs.list_runs(env.runs) if r.mode == "ensemble"]
        if built and built[0].state in ("completed", "failed"):
            break
        time.sleep(1)
    (run,) = built
    assert run.state == "completed", run.status.error
    assert run.experiment == "page-pair" and run.test_accuracy == runs.load_run(first).test_accuracy  # same model twice
    assert any(p.suffix == ".pt" for p in env.ckpt.iterdir())  # published for Predict

    at.text_input(key="runs_ensemble_name").input("../escape")
    at.button(key="runs_ensemble_build").click().run()
    assert "ensemble name" in at.error[0].value
