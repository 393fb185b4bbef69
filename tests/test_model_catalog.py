"""The Predict page's model list: one entry per model, with scores and tags, and a default
that is the best completed model on real data (issue #11 items 2 and 8)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fer_core import runs
from fer_core.model_catalog import list_models


def make_run(runs_dir: Path, ckpt_dir: Path, stamp: str, experiment: str, *, state: str = "completed",
             accuracy: float | None = None, synthetic: bool = False, publish: bool = True,
             pid: int | None = None, age_s: float = 0.0) -> runs.RunInfo:
    """A run folder as the trainer leaves it (no training): records, a best.pt, maybe published."""
    layout = runs.RunLayout(runs_dir / stamp / experiment / runs.MODEL_NAME / "finetune")
    layout.checkpoint_dir.mkdir(parents=True)
    runs.atomic_write_json(layout.config_file, {"data": "demo" if synthetic else "/data/fer2013",
                                                "experiment": experiment, "mode": "finetune"})
    runs.atomic_write_json(layout.environment_file, {"synthetic_data": synthetic, "classes": ["a", "b"]})
    layout.best_checkpoint.write_bytes(b"best")
    status = {"state": state, "started_at": time.time() - 60, "pid": pid}
    if state == "completed" and publish:
        target = layout.published_checkpoint(ckpt_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"published")
        status["published_checkpoint"] = str(target)
    if state != "running":
        status["finished_at"] = time.time()
    runs.atomic_write_json(layout.status_file, status)
    if accuracy is not None:
        runs.atomic_write_json(layout.evaluation_file(), {
            "accuracy": accuracy, "macro_f1": accuracy - 0.05, "classes": ["a", "b"],
            "confusion_matrix": [[1, 0], [0, 1]]})
    for path in (layout.best_checkpoint, layout.published_checkpoint(ckpt_dir)):
        if path.exists():  # newer files for newer runs, older by age_s
            os.utime(path, (time.time() - age_s, time.time() - age_s))
    return runs.load_run(layout)


@pytest.fixture
def folders(tmp_path):
    return tmp_path / "runs", tmp_path / "checkpoints"


def test_default_is_the_best_completed_real_model_not_the_newest_file(folders):
    runs_dir, ckpt_dir = folders
    good = make_run(runs_dir, ckpt_dir, "2030-01-01_00-00-00", "cpu-fast", accuracy=0.683, age_s=3000)
    make_run(runs_dir, ckpt_dir, "2030-01-02_00-00-00", "weaker", accuracy=0.55, age_s=2000)
    make_run(runs_dir, ckpt_dir, "2030-01-03_00-00-00", "demo-quick", accuracy=0.874, synthetic=True,
             age_s=1000)
    live = make_run(runs_dir, ckpt_dir, "2030-01-04_00-00-00", "demo-live", state="running",
                    synthetic=True, pid=os.getpid())  # the newest file of all: an unfinished best.pt
    ckpt_dir.mkdir(exist_ok=True)
    (ckpt_dir / "deleted-run.pt").write_bytes(b"left over")  # newest of all, no run any more

    catalog = list_models(runs_dir, ckpt_dir)
    assert catalog.default.run.id == good.id
    assert catalog.default.path == good.layout.published_checkpoint(ckpt_dir)
    assert catalog.reason == "Chosen: the best completed model on real data (68.3% test accuracy)."
    # the running synthetic run and the left-over file are listed, last
    names = [e.name for e in catalog.entries]
    assert names.index("deleted-run.pt") > names.index(good.id)
    assert names[-1] == live.id
    assert "running: unfinished best.pt" in catalog.entries[-1].label


def test_one_entry_per_model_with_its_scores_and_tags(folders):
    runs_dir, ckpt_dir = folders
    real = make_run(runs_dir, ckpt_dir, "2030-01-01_00-00-00", "cpu-fast", accuracy=0.683)
    demo = make_run(runs_dir, ckpt_dir, "2030-01-02_00-00-00", "demo-quick", accuracy=0.874, synthetic=True)
    catalog = list_models(runs_dir, ckpt_dir)
    assert len(catalog.entries) == 2  # not the published .pt and the run's best.pt each
    by_run = {e.run.id: e for e in catalog.entries}
    assert by_run[real.id].label == f"{real.id} · test 68.3% · macro-F1 63.3%"
    assert by_run[demo.id].label == f"{demo.id} · test 87.4% · macro-F1 82.4% · SYNTHETIC"
    assert all(":material/" not in e.label for e in catalog.entries)


def test_a_synthetic_or_running_model_is_the_default_only_when_nothing_else_exists(folders):
    runs_dir, ckpt_dir = folders
    assert list_models(runs_dir, ckpt_dir).default is None
    live = make_run(runs_dir, ckpt_dir, "2030-01-04_00-00-00", "live", state="running", pid=os.getpid())
    catalog = list_models(runs_dir, ckpt_dir)
    assert catalog.default.run.id == live.id and catalog.default.path == live.best_checkpoint
    assert "still in progress" in catalog.reason
    demo = make_run(runs_dir, ckpt_dir, "2030-01-01_00-00-00", "demo-quick", accuracy=0.874, synthetic=True)
    catalog = list_models(runs_dir, ckpt_dir)
    assert catalog.default.run.id == demo.id
    assert "synthetic demo" in catalog.reason
    cancelled = make_run(runs_dir, ckpt_dir, "2030-01-02_00-00-00", "stopped", state="cancelled")
    assert list_models(runs_dir, ckpt_dir).default.run.id == cancelled.id
