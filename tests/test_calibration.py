"""fer_core.calibration: temperature scaling, ECE/NLL/reliability bins, the uncertainty
threshold, and a run's calibration from training to `Predictor`."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_run_dir, tiny_config
from fer_core import calibration, runs
from fer_core.calibration import Calibration
from fer_core.errors import FerError
from fer_core.models import load_checkpoint, save_checkpoint_file
from fer_core.predict import DEFAULT_UNCERTAIN_BELOW, Predictor


def overconfident_predictions(n: int = 20_000, classes: int = 7, true_temperature: float = 2.0, seed: int = 0):
    """Probabilities softmax(z) for labels drawn from softmax(z / T): a model `T` times too sure."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, classes))
    truth = calibration.apply_temperature(_softmax(logits), true_temperature)
    labels = np.array([rng.choice(classes, p=row) for row in truth])
    return _softmax(logits), labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# ---- the method -----------------------------------------------------------------------------

def test_a_temperature_changes_how_sure_the_model_is_never_what_it_predicts():
    probs, _ = overconfident_predictions(500)
    assert np.allclose(calibration.apply_temperature(probs, 1.0), probs, atol=1e-9)
    for temperature in (0.5, 2.0, 7.0):
        scaled = calibration.apply_temperature(probs, temperature)
        assert np.allclose(scaled.sum(axis=1), 1.0)
        assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
        assert (scaled.max(axis=1) < probs.max(axis=1) + 1e-12).all() == (temperature > 1)
        as_tensor = calibration.apply_temperature(torch.from_numpy(probs), temperature)  # the predictor's type
        assert np.allclose(as_tensor.numpy(), scaled, atol=1e-5)


def test_fitting_recovers_the_temperature_that_made_the_model_overconfident():
    probs, labels = overconfident_predictions(true_temperature=2.0)
    assert calibration.fit_temperature(probs, labels) == pytest.approx(2.0, rel=0.08)
    probs, labels = overconfident_predictions(true_temperature=0.6, seed=1)  # an underconfident model
    assert calibration.fit_temperature(probs, labels) == pytest.approx(0.6, rel=0.08)


def test_calibration_lowers_the_error_and_the_nll_of_an_overconfident_model():
    val_probs, val_labels = overconfident_predictions(seed=2)
    test_probs, test_labels = overconfident_predictions(seed=3)
    fitted = calibration.fit_calibration(val_probs, val_labels)
    report = calibration.calibration_report(fitted, test_probs, test_labels)
    assert report["ece_before"] > 0.1 and report["ece_after"] < 0.02
    assert report["nll_after"] < report["nll_before"]
    assert sum(row["count"] for row in report["bins_after"]) == len(test_labels) == report["scored_images"]
    assert len(report["bins_before"]) == calibration.BINS == 15


def test_reliability_bins_and_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.62, 0.38], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1])  # right, wrong, right, right
    bins = calibration.reliability_bins(probs, labels, bins=5)
    assert [b["count"] for b in bins] == [0, 0, 1, 1, 2]  # 0.55 | 0.62 | 0.92, 0.95
    assert bins[4]["confidence"] == pytest.approx(0.935) and bins[4]["accuracy"] == 0.5
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    # |1 - .55| * 1/4 + |1 - .62| * 1/4 + |.5 - .935| * 2/4
    expected = 0.45 / 4 + 0.38 / 4 + 0.435 / 2
    assert calibration.expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected)
    assert calibration.negative_log_likelihood(probs, labels) == pytest.approx(
        -np.mean(np.log([0.95, 0.08, 0.62, 0.55])))


def test_the_uncertain_threshold_flags_the_faces_that_were_more_often_wrong_than_right():
    confidence = np.array([0.20, 0.25, 0.30, 0.35, 0.50, 0.60, 0.70, 0.90])
    right = np.array([0, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    probs = np.column_stack([confidence, *[(1 - confidence) / 9] * 9])  # class 0 is always the top
    labels = np.where(right, 0, 1)
    # rightness fitted non-decreasing in confidence: 0, 0, then 1, 0 pooled to 1/2, 1/2, then 1s;
    # below 1/2 are the first two faces, so the cut lies between 0.25 and 0.30
    threshold = calibration.uncertain_threshold(probs, labels)
    assert threshold == pytest.approx(0.275)
    flagged = confidence < threshold
    assert flagged.sum() == 2 and right[flagged].mean() < 0.5 <= right[~flagged].mean()
    assert calibration.uncertain_threshold(probs, np.zeros(8, dtype=int)) == 0.0  # never wrong: nothing flagged
    assert calibration.uncertain_threshold(probs, np.ones(8, dtype=int)) > confidence.max()  # never right: all


def test_a_weak_models_sure_readings_are_not_flagged_for_its_many_unsure_mistakes():
    """A 2-epoch FER2013 model (41% right) once flagged every reading below 95%, a 90% "happy"
    included: its many unsure faces, mostly wrong, outweighed the few sure ones taken together."""
    unsure = np.linspace(0.20, 0.40, 40)
    sure = np.linspace(0.85, 0.95, 10)
    confidence = np.concatenate([unsure, sure])
    right = np.concatenate([np.arange(40) % 5 == 0, np.ones(10, dtype=bool)])  # 20% of the unsure right
    assert right.mean() < 0.5  # taken together, every face is more often wrong than right
    probs = np.column_stack([confidence, *[(1 - confidence) / 9] * 9])
    labels = np.where(right, 0, 1)
    threshold = calibration.uncertain_threshold(probs, labels)
    assert unsure.max() < threshold < sure.min()


@pytest.mark.parametrize("values", [None, [], {"temperature": -1, "uncertain_below": 0.3},
                                    {"temperature": float("nan"), "uncertain_below": 0.3},
                                    {"temperature": True, "uncertain_below": 0.3},
                                    {"temperature": 1.5, "uncertain_below": 1.5}, {"temperature": 1.5},
                                    {"temperature": 10 ** 400, "uncertain_below": 0.3}])  # raised OverflowError
def test_a_recorded_calibration_that_does_not_hold_together_is_ignored(values):
    assert Calibration.from_dict(values) is None


@pytest.mark.parametrize("change, named", [
    ({"images": "many"}, "images"), ({"bins": None}, "bins"), ({"scored_images": -1}, "scored_images"),
    ({"ece_after": 10 ** 400}, "ece_after"), ({"temperature": float("nan")}, "temperature"),
])
def test_a_damaged_calibration_report_is_refused_in_words_never_raised(tmp_path, change, named):
    rng = np.random.default_rng(0)
    probabilities, labels = rng.dirichlet(np.ones(4), 200), rng.integers(0, 4, 200)
    report = calibration.calibration_report(calibration.fit_calibration(probabilities, labels), probabilities, labels)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(report))
    assert calibration.read_report(path) == (report, None)
    path.write_text(json.dumps({**report, **change}))
    refused, problem = calibration.read_report(path)
    assert refused is None and named in problem and "damaged" in problem


def test_calibration_refuses_mismatched_inputs_in_words():
    with pytest.raises(FerError, match="N labels"):
        calibration.fit_calibration(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(FerError, match="outside the model's classes"):
        calibration.fit_calibration(np.full((2, 2), 0.5), np.array([0, 2]))


# ---- a run, from training to prediction -------------------------------------------------

def test_training_fits_the_temperature_on_validation_and_prediction_uses_it(trained_run):
    layout = runs.RunLayout(trained_run)
    report = runs.read_json(layout.calibration_file)
    assert report["fitted_on"] == "validation" and report["scored_on"] == "test"
    assert report["scored_images"] == runs.read_json(layout.evaluation_file())["num_images"]
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        assert math.isfinite(report[key])
    stored = load_checkpoint(layout.best_checkpoint)["calibration"]
    assert stored == {key: report[key] for key in ("temperature", "uncertain_below", "images", "fitted_on")}
    published = layout.published_checkpoint(Path(runs.read_json(layout.config_file)["checkpoints_dir"]))
    assert load_checkpoint(published)["calibration"] == stored

    predictor = Predictor.load(published)
    assert predictor.calibration == Calibration.from_dict(stored)
    assert predictor.uncertain_below == stored["uncertain_below"]
    assert predictor.describe()["calibration"] == stored
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    raw = Predictor(predictor.model, predictor.class_names, predictor.img_size, tta=predictor.tta,
                    amp=predictor.amp)  # bfloat16 where the CPU computes it, as the run was evaluated
    assert raw.uncertain_below == DEFAULT_UNCERTAIN_BELOW
    expected = calibration.apply_temperature(raw.probabilities(faces), stored["temperature"])
    assert torch.allclose(predictor.probabilities(faces), expected, atol=1e-5)


def test_calibrate_now_refits_an_old_run_and_republishes_its_model(trained_run, tmp_path):
    run = copy_run_dir(trained_run, tmp_path / "old" / "run")
    layout = runs.RunLayout(run)
    trained = runs.read_json(layout.calibration_file)
    layout.calibration_file.unlink()  # as a run from before calibration existed
    checkpoint = load_checkpoint(layout.best_checkpoint)
    del checkpoint["calibration"]
    save_checkpoint_file(layout.best_checkpoint, checkpoint)
    published_dir = tmp_path / "published"
    published = layout.published_checkpoint(published_dir)
    published.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint_file(published, {key: checkpoint[key] for key in ("model_state", "config", "class_names")})
    assert Predictor.load(published).calibration is None

    report = calibration.calibrate_run(run, checkpoints_dir=published_dir)
    assert report["temperature"] == pytest.approx(trained["temperature"], rel=1e-3)
    assert runs.read_json(layout.calibration_file)["ece_after"] == report["ece_after"]
    assert Predictor.load(published).calibration.temperature == report["temperature"]
    assert Predictor.load(layout.best_checkpoint).calibration.temperature == report["temperature"]


def test_a_run_still_training_is_not_calibrated(trained_run, tmp_path):
    import os
    run_dir = copy_run_dir(trained_run, tmp_path / "runs" / "2030-01-01_00-00-00" / "busy" / "resnet18" / "finetune")
    status = runs.read_json(run_dir / runs.STATUS_FILE)
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, {**status, "state": "running", "pid": os.getpid(),
                                                        "finished_at": None})
    with pytest.raises(FerError, match="is running: it can be calibrated once its training has ended"):
        calibration.calibrate_run(run_dir)


def test_a_run_without_a_validation_split_cannot_be_calibrated_and_says_why(tiny_demo, tmp_path):
    from fer_core.train import fit
    run = fit(tiny_config(tiny_demo, tmp_path, epochs=1, val_fraction=0.0))
    layout = runs.RunLayout(run)
    assert not layout.calibration_file.exists()
    assert Predictor.load(layout.best_checkpoint).calibration is None
    with pytest.raises(FerError, match="no validation split"):
        calibration.calibrate_run(run)
    shutil.rmtree(run)


# ---- the Evaluate page ----------------------------------------------------------------------

def test_the_evaluate_page_shows_the_reliability_diagram_and_calibrates_an_old_run(env, app_data):
    from test_app_pages import metric, open_page, page_text
    run = copy_run_dir(app_data.run, env.runs / app_data.run.relative_to(app_data.run.parents[3]))
    layout = runs.RunLayout(run)
    report = runs.read_json(layout.calibration_file)
    at = open_page("evaluate")
    assert metric(at, "Temperature") == f"{report['temperature']:.2f}"
    assert metric(at, "Uncertain below") == f"{report['uncertain_below']:.0%}"
    assert metric(at, "ECE after") == f"{report['ece_after']:.1%}"
    (chart,) = [c for c in at.get("plotly_chart") if "eval_reliability" in str(c.proto.id)]
    names = {trace["name"] for trace in json.loads(chart.proto.spec)["data"]}
    assert {"before (raw softmax)", "after (temperature scaling)", "perfectly calibrated"} <= names

    layout.calibration_file.unlink()  # a run from before calibration existed
    at = open_page("evaluate")
    assert "uncalibrated" in [b.proto.label for b in at.get("badge")] or "uncalibrated" in page_text(at)
    button = at.button(key=f"eval_calibrate::{layout.id}")
    button.click().run(timeout=120)
    assert not at.exception
    refitted = runs.read_json(layout.calibration_file)
    assert metric(at, "Temperature") == f"{refitted['temperature']:.2f}"
    assert refitted["uncertain_rule"] == calibration.UNCERTAIN_RULE
    assert not [b for b in at.button if b.key == f"eval_recalibrate::{layout.id}"]  # today's rule: nothing to refit

    # a threshold chosen by the rule before 2026-12-02: said, and one click refits it
    old = {key: value for key, value in refitted.items() if key != "uncertain_rule"}
    layout.calibration_file.write_text(json.dumps({**old, "uncertain_below": 0.95}))
    at = open_page("evaluate")
    assert "rule used before 2026-12-02" in page_text(at)
    assert metric(at, "Uncertain below") == "95%"
    at.button(key=f"eval_recalibrate::{layout.id}").click().run(timeout=120)
    assert not at.exception
    assert runs.read_json(layout.calibration_file)["uncertain_rule"] == calibration.UNCERTAIN_RULE
    assert metric(at, "Uncertain below") == f"{refitted['uncertain_below']:.0%}"

    layout.calibration_file.write_text('{"temperature": "hot"}')  # damaged: said, not raised
    at = open_page("evaluate")
    assert "calibration.json is damaged" in page_text(at)
