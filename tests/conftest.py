"""Shared fixtures: tiny generated datasets and one tiny trained run per session.

Nothing here touches the network; every path lives under pytest's tmp folders.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("FER_TEST", "1")

# `make test` runs two pytest workers (pytest-xdist). Each gets its share of the cores, and so
# do the trainers it starts: oversubscribed OpenMP threads spin and crawl on a 2-core machine.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(scope="session", autouse=True)
def worker_threads() -> None:
    import torch
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep caches and the default demo folder out of the user's home and the repo."""
    root = tmp_path_factory.mktemp("fer_home")
    os.environ["FER_CACHE_DIR"] = str(root / "cache")
    os.environ["FER_DEMO_DIR"] = str(root / "demo_default")
    os.environ["FER_DATA_HOME"] = str(root / "data")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset: 7 classes x 12 images of 48x48 grey PNGs."""
    from fer_core.demo import generate_demo_dataset
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "tiny", per_class=12, seed=0)


def write_class_folders(root: Path, counts: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    """Random-noise images in class folders (fast; content does not matter for data tests)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{name}_{i:03d}.png")
    return root


def tiny_config(data: Path | str, tmp_path: Path, **overrides):
    from fer_core.config import TrainConfig
    values = dict(data=str(data), epochs=2, img_size=32, batch_size=16, val_fraction=0.2,
                  pretrained=False, runs_dir=str(tmp_path / "runs"),
                  checkpoints_dir=str(tmp_path / "published"), num_threads=THREADS, lr=2e-3)
    values.update(overrides)
    return TrainConfig(**values).validate()


@pytest.fixture(scope="session")
def trained_run(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch run, shared read-only by the tests that inspect a run directory."""
    from fer_core.train import fit
    return fit(tiny_config(tiny_demo, tmp_path_factory.mktemp("trained")))


# ---- markers ----------------------------------------------------------------------------
# Registered in pyproject.toml; `make test-fast` deselects train, subprocess, browser and slow.
# Modules of one kind say so in a `pytestmark` line at their top (test_browser,
# test_reliability, test_tensorboard) or in MODULE_MARKS. Here the rest: tests that use a
# fixture that trains (or the tiny dataset that exists to be trained on) are `train`, and a
# short list names single tests. A throwaway process spawned only for a dead or live pid (as
# in test_runs, test_app_pages) does not make a test `subprocess`.

TRAINING_FIXTURES = frozenset({"trained_run", "tiny_demo", "app_data"})

MODULE_MARKS: dict[str, tuple[str, ...]] = {
    "test_cli": ("subprocess",),  # every test runs `python -m fer_core`
    "test_jobs": ("subprocess",),  # job runners, trainers and helper processes throughout
}

MARKS_BY_TEST: dict[str, dict[str, tuple[str, ...]]] = {
    "test_cli": {"test_train_on_demo_end_to_end_prints_the_run_dir_last": ("train",)},
    "test_data": {"test_demo_source_is_generated_on_first_use_and_labelled_synthetic": ("slow",)},  # 1,750 faces
    "test_demo": {"test_classes_differ_where_the_expression_is": ("slow",)},  # 700 faces
    "test_doctor": {"test_training_leaves_out_the_listed_images_and_keeps_the_list_in_the_run": ("train",)},
    "test_jobs": {name: ("train",) for name in (
        "test_queued_jobs_run_one_at_a_time_in_order_and_continue_without_the_app",
        "test_cancel_stops_a_running_job_keeps_last_pt_and_resume_finishes_it",
        "test_a_killed_trainer_shows_failed_with_its_log_and_the_queue_moves_on",
        "test_threads_launching_at_once_start_exactly_one_job",
        "test_a_killed_runner_does_not_stall_the_queue")},
    "test_reliability": {name: ("subprocess",) for name in (
        "test_kill_9_mid_epoch_loses_nothing_and_resume_logs_every_epoch_once",
        "test_repeated_kill_9_at_many_points_never_loses_or_repeats_an_epoch",
        "test_a_real_full_disk_fails_the_run_in_words_and_keeps_the_earlier_checkpoint",
        "test_a_kill_right_after_the_checkpoint_rename_loses_no_tensorboard_epoch")},
    "test_explain": {name: ("train",) for name in (  # the module's mouth_model: 4 steps of ResNet18
        "test_the_map_lies_on_the_mouth_when_only_the_mouth_tells_the_classes_apart",
        "test_maps_are_48_px_in_0_1_and_another_class_gets_another_map",
        "test_the_explained_model_is_a_copy_and_the_original_keeps_its_gradients")},
    "test_divergence": {"test_a_checkpoint_with_nan_weights_is_refused_by_the_predictor_and_the_cli":
                        ("subprocess",)},
    "test_run_files_fuzz": {"test_the_runs_command_as_a_process_lists_a_damaged_run_beside_a_good_one":
                            ("subprocess",)},
    "test_serve": {"test_a_real_server_process_answers_over_http": ("subprocess",)},
    "test_ensemble": {"test_the_runs_page_builds_an_ensemble_in_the_background": ("subprocess",)},
    "test_train": {"test_training_allocator_reuses_freed_activations_instead_of_faulting_them_in_again":
                   ("subprocess",)},
    "test_sweep": {"test_a_second_worker_process_joins_the_study_without_duplicates": ("subprocess",)},
    "test_store": {name: ("subprocess",) for name in (  # two spawned workers, each importing torch: ~7 s
        "test_processes_give_the_same_bytes_as_one_process",
        "test_an_interrupt_in_a_worker_stops_the_build_and_a_rerun_decodes_only_what_is_left")},
    "test_ddp": {name: ("subprocess",) for name in (  # torchrun and its ranks (gloo, 2 processes)
        "test_a_two_process_run_records_its_world_and_loads_and_resumes_in_one_process",
        "test_one_and_two_processes_follow_the_same_losses",
        "test_a_rank_killed_with_sigkill_fails_the_run_in_words_and_leaves_no_process",
        "test_sigterm_to_the_launcher_cancels_every_rank_and_keeps_last_pt",
        "test_a_queued_two_process_job_runs_under_torchrun_and_its_cancel_file_stops_it")},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checked: set[str] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        name = module.__name__.rpartition(".")[2]
        listed = MARKS_BY_TEST.get(name, {})
        if name not in checked:  # a renamed test must not silently lose its marker
            checked.add(name)
            missing = [test for test in listed if not hasattr(module, test)]
            if missing:
                raise pytest.UsageError(f"tests/conftest.py MARKS_BY_TEST names tests that {name} lacks: {missing}")
        marks = set(MODULE_MARKS.get(name, ())) | set(listed.get(getattr(item, "originalname", item.name), ()))
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            marks.add("train")
        for mark in sorted(marks):
            item.add_marker(getattr(pytest.mark, mark))


# ---- the app's pages (AppTest): shared by test_app_pages and test_walkthrough ----------

@pytest.fixture(scope="session")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A data home holding a tiny synthetic dataset (7 classes x 8 faces), and one finished
    2-epoch run trained on it, to be copied into each test's runs folder."""
    from fer_core.config import TrainConfig
    from fer_core.demo import generate_demo_dataset
    from fer_core.train import fit

    root = tmp_path_factory.mktemp("app_pages")
    data_home = root / "data_home"
    tiny = generate_demo_dataset(data_home / "tiny-demo", per_class=8, seed=0)
    run_dir = fit(TrainConfig(data=str(tiny), experiment="tinyexp", epochs=2, img_size=32, batch_size=16,
                              pretrained=False, runs_dir=str(root / "template_runs"),
                              checkpoints_dir=str(root / "template_ckpt"), num_threads=1))
    from fer_core import runs
    assert runs.load_run(run_dir).state == "completed"
    return SimpleNamespace(root=root, data_home=data_home, tiny=tiny, run=run_dir,
                           demo_dir=root / "demo", cache=root / "cache")


@pytest.fixture
def env(app_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Point the app at empty per-test runs/checkpoints folders and the session's data."""
    folders = SimpleNamespace(runs=tmp_path / "runs", ckpt=tmp_path / "checkpoints")
    monkeypatch.setenv("FER_RUNS_DIR", str(folders.runs))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(folders.ckpt))
    monkeypatch.setenv("FER_CACHE_DIR", str(app_data.cache))
    monkeypatch.setenv("FER_DEMO_DIR", str(app_data.demo_dir))
    monkeypatch.setenv("FER_DATA_HOME", str(app_data.data_home))
    return folders


@pytest.fixture
def sleeper():
    """A live process (in its own session, so signalling its group is harmless) to own a run."""
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def copy_run_dir(source: Path, target: Path) -> Path:
    """Copy a run folder for a test, hard-linking its checkpoints (read-only here, 100+ MB each):
    page tests make dozens of copies, and full copies once filled the disk."""
    import shutil

    def link_checkpoints(src: str, dst: str) -> None:
        if src.endswith(".pt"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=link_checkpoints)
    return target
