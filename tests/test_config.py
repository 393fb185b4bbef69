import math

import pytest

from fer_core.config import PRESETS, TrainConfig, config_from_preset
from fer_core.errors import ConfigError


@pytest.mark.parametrize("field,value,words", [
    ("epochs", -1, "epochs"), ("epochs", 0, "epochs"), ("batch_size", 0, "batch size"),
    ("lr", 0.0, "learning rate"), ("lr", math.nan, "learning rate"), ("img_size", 8, "image size"),
    ("img_size", 4096, "image size"), ("val_fraction", 0.7, "validation"), ("mode", "all", "mode"),
    ("experiment", "../x", "experiment"), ("label_smoothing", 1.5, "smoothing"),
])
def test_invalid_values_are_refused_with_the_reason(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**{field: value}).validate()


def test_round_trip_through_dict_ignores_unknown_keys():
    config = TrainConfig(epochs=3, lr=0.01, mode="head_only")
    restored = TrainConfig.from_dict({**config.to_dict(), "weights_source": "random"})
    assert restored == config


def test_preset_values_apply_and_explicit_flags_override():
    config = config_from_preset("cpu-fast", epochs=3, data="demo")
    assert config.preset == "cpu-fast"
    assert config.optimizer == PRESETS["cpu-fast"]["optimizer"]
    assert config.epochs == 3
    assert config_from_preset("cpu-fast").epochs == PRESETS["cpu-fast"]["epochs"]


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown preset"):
        config_from_preset("turbo")
