"""The time estimate: measured speeds, kept per machine and setting, and the arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from fer_core import estimate
from fer_core.config import TrainConfig


def tiny(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(img_size=32, batch_size=4, stem="small", pretrained=False,
                                           num_threads=1), **changes)


def test_a_measured_speed_is_kept_for_this_machine_and_the_settings_that_change_it(tmp_path):
    config = tiny()
    assert estimate.known_speed(config, tmp_path) is None
    speed = estimate.measure_speed(config, steps=1, folder=tmp_path)
    assert speed.train_images_per_second > 0 and speed.eval_images_per_second > 0
    assert estimate.known_speed(config, tmp_path) == speed
    assert estimate.known_speed(tiny(lr=0.5, seed=7, epochs=99), tmp_path) == speed  # same speed
    assert estimate.known_speed(tiny(batch_size=8), tmp_path) is None                # another speed
    assert estimate.known_speed(tiny(colour="rgb"), tmp_path) is None


def test_all_cores_is_timed_with_the_trainers_threads_not_the_apps_one(tmp_path, monkeypatch):
    import torch
    used = []
    timed = estimate._timed
    monkeypatch.setattr(estimate, "_timed", lambda *a: used.append(torch.get_num_threads()) or timed(*a))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    estimate.measure_speed(tiny(num_threads=0), steps=1, folder=tmp_path)  # "all cores"
    assert used == [3, 3] and torch.get_num_threads() == before
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert estimate.trainer_default_threads() >= 1


def test_an_rgb_head_only_recipe_can_be_timed(tmp_path):
    speed = estimate.measure_speed(tiny(colour="rgb", store_size=40, mode="head_only", augment=False),
                                   steps=1, folder=tmp_path)
    assert speed.train_images_per_second > 0


def test_a_damaged_speed_file_means_not_measured_yet(tmp_path):
    (tmp_path / estimate.SPEED_FILE).write_text("{not json")
    assert estimate.known_speed(tiny(), tmp_path) is None
    (tmp_path / estimate.SPEED_FILE).write_text('{"%s": {"old": 1}}' % estimate.speed_key(tiny()))
    assert estimate.known_speed(tiny(), tmp_path) is None


def test_the_estimate_adds_epochs_validation_and_the_test_views():
    speed = estimate.Speed(train_images_per_second=100.0, eval_images_per_second=300.0, device="cpu",
                           measured_at=0.0)
    counts = {"train": 1000, "val": 300, "test": 600}
    # 2 x (1000/100 + 300/300) + 600 x 10 views / 300
    assert estimate.estimate_seconds(tiny(epochs=2, tta=True), counts, speed) == pytest.approx(42.0)
    assert estimate.estimate_seconds(tiny(epochs=2, tta=False), counts, speed) == pytest.approx(24.0)
    # head-only without augmentation: the backbone's features once, whatever the epochs
    assert estimate.estimate_seconds(tiny(epochs=50, tta=False, mode="head_only", augment=False),
                                     counts, speed) == pytest.approx(1300 / 300 + 2)


@pytest.mark.parametrize("seconds,shown", [(0.2, "1 s"), (42, "42 s"), (720, "12 min"),
                                           (3 * 3600 + 300, "3 h 05 min"), (8 * 3600, "8 h 00 min")])
def test_durations_read_as_an_estimate_should(seconds, shown):
    assert estimate.format_duration(seconds) == shown
