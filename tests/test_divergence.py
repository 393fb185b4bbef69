"""A diverged run (issue #12 item 4): a non-finite loss stops the run as failed with the epoch
and a hint; last.pt and best.pt keep the last finite epoch; nothing is published; a checkpoint
with NaN weights is refused by the Predictor and by `fer predict` (whose --json output is
always strict JSON)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fer_core import runs
from fer_core import train as train_module
from fer_core.errors import CheckpointError, FerError
from fer_core.models import build_model, weights_are_finite
from fer_core.predict import Predictor

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_a_loss_that_turns_nan_in_epoch_2_fails_the_run_and_keeps_epoch_1(tiny_demo, tmp_path, monkeypatch):
    """The loss is made NaN from the first batch of epoch 2 (the way `--lr 1e30` did before
    learning rates were bounded), in the real training loop."""
    real_epoch = train_module.train_one_epoch
    current = {"epoch": 0}

    def tracking_epoch(source, data, config, epoch, *args, **kwargs):
        current["epoch"] = epoch
        return real_epoch(source, data, config, epoch, *args, **kwargs)

    class DivergingLoss(nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            return loss * float("nan") if current["epoch"] >= 2 else loss

    monkeypatch.setattr(train_module, "train_one_epoch", tracking_epoch)
    monkeypatch.setattr(train_module.nn, "CrossEntropyLoss", DivergingLoss)
    config = tiny_config(tiny_demo, tmp_path, epochs=3)
    with pytest.raises(FerError, match=r"training diverged at epoch 2, batch 1: the loss became nan") as raised:
        train_module.fit(config)
    assert "Lower the learning rate" in str(raised.value)

    run_dir, = runs.find_run_dirs(tmp_path / "runs")
    run = runs.load_run(run_dir)
    assert run.state == "failed"
    assert "diverged at epoch 2" in run.status.error and "Lower the learning rate" in run.status.error
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and weights_are_finite(checkpoint["model_state"])
    assert [row["epoch"] for row in run.metrics] == [1]  # the diverged epoch is not logged
    published = Path(config.checkpoints_dir)
    assert not published.exists() or not list(published.iterdir())  # nothing offered for prediction
    assert not (run_dir / runs.EVALUATION_FILE).exists()


def test_publishing_refuses_a_model_with_non_finite_weights(trained_run, tmp_path):
    """The last line of defence: even a best.pt that holds NaN weights is never published."""
    from fer_core.config import TrainConfig
    run_copy = tmp_path / "runs" / "2030-01-01_00-00-00" / "x" / runs.MODEL_NAME / "finetune"
    run_copy.mkdir(parents=True)
    (run_copy / "checkpoints").mkdir()
    best = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    first = next(k for k, v in best["model_state"].items() if v.is_floating_point())
    best["model_state"][first] = torch.full_like(best["model_state"][first], float("nan"))
    torch.save(best, run_copy / "checkpoints" / "best.pt")
    (run_copy / runs.EVALUATION_FILE).write_bytes((trained_run / runs.EVALUATION_FILE).read_bytes())
    config = TrainConfig.from_dict({**runs.read_json(trained_run / runs.CONFIG_FILE),
                                    "checkpoints_dir": str(tmp_path / "published")})
    with pytest.raises(FerError, match="non-finite weights"):
        train_module.publish_best(run_copy, config)
    assert not (tmp_path / "published").exists() or not list((tmp_path / "published").iterdir())


def nan_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model, _, _ = build_model(3, stem="small", pretrained=False)
    state = model.state_dict()
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save({"model_state": state, "class_names": ["a", "b", "c"],
                "config": {"img_size": 48, "stem": "small"}}, path)
    return path


def face_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_a_checkpoint_with_nan_weights_is_refused_by_the_predictor_and_the_cli(tmp_path):
    checkpoint = nan_checkpoint(tmp_path / "diverged.pt")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        Predictor.from_checkpoint(checkpoint)
    image = face_png(tmp_path / "face.png")
    result = subprocess.run([sys.executable, "-m", "fer_core", "predict", str(checkpoint), str(image), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "NaN or inf" in result.stderr and result.stderr.startswith("error:")
    assert result.stdout.strip() == "" or json.loads(result.stdout)  # never half a document
    assert "nan" not in result.stdout.lower()


def test_predict_json_is_strict_even_if_a_model_outputs_nan(tmp_path, capsys, monkeypatch):
    """A model with finite weights whose output still is not a number (forced here): the JSON
    document is never printed with NaN in it; the command says why and exits non-zero."""
    import fer_core.predict as predict_module
    from test_predict import run_cli, save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ok.pt")
    image = face_png(tmp_path / "face.png")
    monkeypatch.setattr(predict_module.Predictor, "probabilities",
                        lambda self, batch: torch.full((len(batch), len(self.class_names)), float("nan")))
    assert run_cli([str(checkpoint), str(image), "--json", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "NaN" not in captured.out and "not numbers" in captured.err
