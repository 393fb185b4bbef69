import shutil

import numpy as np
import pytest

from fer_core import runs
from fer_core.evaluate import evaluate_run, evaluation_report, normalise_rows, read_predictions, top_confusions


def test_report_matrix_accuracy_and_top_confusions_in_words():
    classes = ["happy", "sad", "neutral"]
    y_true = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2, 2, 2])
    probabilities = np.eye(3, dtype=np.float32)[predicted]
    report = evaluation_report(y_true, probabilities, classes)
    assert report["confusion_matrix"] == [[2, 1, 0], [1, 1, 2], [0, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 8)
    assert report["report"]["sad"]["recall"] == pytest.approx(0.25)
    confusions = top_confusions(report, k=2)
    assert confusions[0]["text"] == "sad predicted as neutral: 2, 50% of sad"
    assert np.allclose(normalise_rows(report["confusion_matrix"]).sum(axis=1), 1.0)


def test_evaluate_run_reproduces_the_training_time_evaluation(trained_run, tmp_path):
    copy = tmp_path / "2026-01-01_00-00-00" / "default" / "resnet18" / "finetune"
    shutil.copytree(trained_run, copy)
    original = runs.read_json(copy / "evaluation.json")
    (copy / "evaluation.json").unlink()
    again = evaluate_run(copy)
    assert again["confusion_matrix"] == original["confusion_matrix"]
    assert again["accuracy"] == pytest.approx(original["accuracy"])
    rows = read_predictions(copy / "predictions.csv")
    assert len(rows) == again["num_images"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in rows)


def test_a_run_still_training_is_not_evaluated_on_its_own_test_split(trained_run, tmp_path):
    import os

    from conftest import copy_run_dir
    from fer_core.errors import FerError
    run_dir = copy_run_dir(trained_run, tmp_path / "runs" / "2030-01-01_00-00-00" / "busy" / "resnet18" / "finetune")
    status = runs.read_json(run_dir / runs.STATUS_FILE)
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, {**status, "state": "running", "pid": os.getpid(),
                                                        "finished_at": None})
    before = (run_dir / runs.EVALUATION_FILE).read_bytes()
    with pytest.raises(FerError, match="is running: it can be evaluated on its test split once"):
        evaluate_run(run_dir)
    assert (run_dir / runs.EVALUATION_FILE).read_bytes() == before
