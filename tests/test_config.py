import argparse
import dataclasses
import json
import math
import subprocess
import sys

import pytest

from fer_core import cli, config_form
from fer_core.config import (CONFIG_FIELDS, FIELDS_BY_NAME, FORM_GROUPS, PRESET_DESCRIPTIONS, PRESETS, WIDGETS,
                             TrainConfig, config_from_preset)
from fer_core.errors import ConfigError


@pytest.mark.parametrize("field,value,words", [
    ("epochs", -1, "epochs"), ("epochs", 0, "epochs"), ("batch_size", 0, "batch size"),
    ("lr", 0.0, "learning rate"), ("lr", math.nan, "learning rate"), ("img_size", 8, "image size"),
    ("img_size", 4096, "image size"), ("val_fraction", 0.7, "validation"), ("mode", "all", "mode"),
    ("experiment", "../x", "experiment"), ("label_smoothing", 1.5, "smoothing"),
    ("ema_decay", 1.0, "EMA decay"), ("ema_decay", 0.2, "EMA decay"), ("mixup", -0.2, "MixUp alpha"),
    ("cutmix", 11.0, "CutMix alpha"),
])
def test_invalid_values_are_refused_with_the_reason(field, value, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**{field: value}).validate()


def test_mixing_is_refused_where_training_sees_cached_features_and_not_images():
    with pytest.raises(ConfigError, match="MixUp and CutMix mix images"):
        TrainConfig(mode="head_only", augment=False, cutmix=1.0).validate()
    TrainConfig(mode="head_only", augment=True, cutmix=1.0, mixup=0.2).validate()
    TrainConfig(mode="finetune", augment=False, mixup=0.2).validate()


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


# ---- one declaration per field: validate, the CLI and the form all come from it ----------

NUMBER_FIELDS = [f for f in CONFIG_FIELDS if f.kind in (int, float)]
# A value that another field must allow, for the bounds of one field to be reachable.
ROOM_FOR = {"warmup_epochs": {"epochs": 10_000},
            # several machines need an endpoint, and a node rank needs that many machines
            "nnodes": {"rdzv_endpoint": "host:29500"},
            "node_rank": {"nnodes": 1024, "rdzv_endpoint": "host:29500"}}


def below(item, value):
    """The nearest value under `value` that the field's type can hold."""
    return value - 1 if item.kind is int else math.nextafter(value, -math.inf)


def above(item, value):
    return value + 1 if item.kind is int else math.nextafter(value, math.inf)


@pytest.mark.parametrize("field,value,words", [
    ("lr", 11.0, "learning rate"), ("lr", math.inf, "learning rate"), ("weight_decay", 1.5, "weight decay"),
    ("weight_decay", -0.1, "weight decay"), ("warmup_epochs", math.nan, "warm-up"),
    ("warmup_epochs", 11.0, "warm-up epochs must not exceed epochs"), ("epochs", 10_001, "epochs"),
    ("batch_size", 65_537, "batch size"), ("num_threads", 257, "CPU threads"), ("seed", -1, "seed"),
    ("seed", 2**32, "seed"), ("label_smoothing", 1.0, "smoothing"), ("max_per_class", 1, "max per class"),
    ("epochs", 2.5, "whole number"), ("epochs", True, "whole number"), ("amp", "yes", "AMP"),
    ("optimizer", "adam", "optimizer"), ("data", "", "data"), ("runs_dir", "runs\x00x", "runs folder"),
])
def test_absurd_values_are_refused_naming_the_field(field, value, words):
    with pytest.raises(ConfigError, match=words) as refused:
        TrainConfig(**{field: value}).validate()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name", ["", "-rf", ".hidden", "..", "a/b", "a\\b", "c:", "a\nb", "a\x00b", "x" * 101,
                                  " padded "])
def test_experiment_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match="experiment name must be a plain folder name"):
        TrainConfig(experiment=name).validate()


@pytest.mark.parametrize("name", ["lr-sweep", "x" * 100, "run 2", "visage_é"])
def test_plain_folder_names_are_accepted(name):
    assert TrainConfig(experiment=name).validate().experiment == name


def test_nan_and_infinity_are_refused_by_every_number_field():
    for item in NUMBER_FIELDS:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=item.noun):
                TrainConfig(**{item.name: value}).validate()


@pytest.mark.parametrize("item", NUMBER_FIELDS, ids=lambda f: f.name)
def test_validate_takes_its_bounds_from_the_field_settings(item):
    s = item.setting
    room = ROOM_FOR.get(item.name, {})
    low = s.min_value if not s.min_open else above(item, s.min_value)
    high = s.max_value if not s.max_open else below(item, s.max_value)
    for value in (low, high):
        TrainConfig(**room, **{item.name: item.kind(value)}).validate()
    for value in (below(item, low), above(item, high)):
        if s.zero_means and value == 0:
            continue  # 0 is allowed on purpose: it means off
        with pytest.raises(ConfigError, match=item.noun):
            TrainConfig(**room, **{item.name: item.kind(value)}).validate()


def test_every_field_is_described():
    for item in CONFIG_FIELDS:
        assert item.setting.help.strip(), item.name
        assert item.setting.group in (*FORM_GROUPS, None), item.name
        assert item.widget in WIDGETS, item.name
        if item.kind in (int, float):
            assert item.setting.min_value is not None and item.setting.max_value is not None, item.name
        if item.setting.choices:
            assert item.default() in (*item.setting.choices, None), item.name
        assert item.problem(item.default()) is None, item.name  # the defaults are valid
    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    for preset in PRESETS:
        assert config_from_preset(preset).preset == preset


def test_values_are_stored_in_one_form():
    config = TrainConfig(lr=1, max_per_class=0, warmup_epochs=2)
    assert isinstance(config.lr, float) and isinstance(config.warmup_epochs, float)
    assert config.max_per_class is None  # 0 = all
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_folders_default_to_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("FER_RUNS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(tmp_path / "c"))
    config = TrainConfig()
    assert (config.runs_dir, config.checkpoints_dir) == (str(tmp_path / "r"), str(tmp_path / "c"))


def train_args(*args: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", *args])


def test_cli_flags_are_generated_from_the_fields():
    train = argparse.ArgumentParser()
    cli.add_train_arguments(train)
    by_dest = {a.dest: a for a in train._actions}
    for item in CONFIG_FIELDS:
        if not item.setting.cli:
            assert item.name not in by_dest or item.name == "preset"  # --preset applies a recipe
            continue
        action = by_dest[item.name]
        assert item.flag in action.option_strings and item.setting.help in action.help
        if item.kind is bool:
            assert f"--no-{item.flag[2:]}" in action.option_strings
        elif item.setting.choices:
            assert list(action.choices) == list(item.setting.choices)
        else:
            assert action.type is item.kind
    assert train_args("--no-amp", "--tta").amp is False


@pytest.mark.parametrize("item", NUMBER_FIELDS, ids=lambda f: f.name)
def test_the_cli_accepts_each_minimum_and_refuses_below_it(item):
    s = item.setting
    room = [arg for name, value in ROOM_FOR.get(item.name, {}).items()
            for arg in (FIELDS_BY_NAME[name].flag, str(value))]
    low = s.min_value if not s.min_open else above(item, s.min_value)
    config = cli.config_from_args(train_args(*room, f"{item.flag}={item.kind(low)!r}"))
    assert getattr(config, item.name) == item.kind(low)
    refused = item.kind(below(item, low)) if not s.zero_means else (-1 if low == 0 else low - 1)
    with pytest.raises(ConfigError, match=item.noun):  # `=`: argparse takes "-5e-324" for an option
        cli.config_from_args(train_args(*room, f"{item.flag}={refused!r}"))


def test_a_choice_the_field_does_not_have_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train_args("--optimizer", "adam")
    assert "invalid choice" in capsys.readouterr().err


def test_config_file_then_flags(tmp_path, capsys):
    source = TrainConfig(epochs=4, lr=0.01, experiment="from-file", max_per_class=20, preset="cpu-fast")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**source.to_dict(), "device": "recorded extra"}))
    config = cli.config_from_args(train_args("--config", str(path), "--epochs", "6"))
    assert config == dataclasses.replace(source, epochs=6)  # the file's values, the flag on top
    assert "device" in capsys.readouterr().err  # an ignored key is named
    path.write_text(json.dumps({"lr": -1}))
    with pytest.raises(ConfigError, match="learning rate"):
        cli.config_from_args(train_args("--config", str(path)))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        cli.config_from_args(train_args("--config", str(path)))


def test_run_dir_takes_its_config_from_the_folder_and_no_flags(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(epochs=3, experiment="queued").to_dict()))
    assert cli.config_from_args(train_args("--run-dir", str(tmp_path))).epochs == 3
    for extra in (["--epochs", "4"], ["--preset", "cpu-fast"], ["--no-amp"]):
        with pytest.raises(ConfigError, match="--run-dir"):
            cli.config_from_args(train_args("--run-dir", str(tmp_path), *extra))
    (tmp_path / "config.json").write_text(json.dumps({**TrainConfig().to_dict(), "epochs": 0}))
    with pytest.raises(ConfigError, match="epochs"):
        cli.config_from_args(train_args("--run-dir", str(tmp_path)))


def test_the_form_lists_the_grouped_fields_with_the_same_bounds():
    grouped = [f.name for f in CONFIG_FIELDS if f.setting.group]
    assert [f.name for f in config_form.form_fields()] == grouped
    assert sum(len(config_form.form_fields(g)) for g in FORM_GROUPS) == len(grouped)
    for field in config_form.form_fields():
        item = FIELDS_BY_NAME[field.name]
        assert field.label == item.label and field.help == item.setting.help
        assert field.options == item.setting.choices
        if field.widget != "number":
            continue
        assert type(field.min_value) is item.kind and type(field.max_value) is item.kind
        # the widget's range is exactly what validate takes
        for value in (field.min_value, field.max_value):
            TrainConfig(**ROOM_FOR.get(field.name, {}), **{field.name: value}).validate()
        for value in (below(item, field.min_value), above(item, field.max_value)):
            with pytest.raises(ConfigError, match=item.noun):
                TrainConfig(**ROOM_FOR.get(field.name, {}), **{field.name: value}).validate()


def test_the_form_starts_from_the_preset_and_gives_back_a_valid_config():
    for preset in PRESETS:
        values = config_form.preset_form_values(preset)
        assert set(values) == {f.name for f in config_form.form_fields()}
        assert values["experiment"] == preset
        expected = config_from_preset(preset, experiment=preset)
        assert config_from_preset(preset, **config_form.overrides_from_form(values)) == expected


@pytest.mark.subprocess
def test_fer_core_form_helpers_do_not_import_streamlit():
    code = "import sys, fer_core.config_form, fer_core.cli; sys.exit('streamlit' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("gpus, processes", [(0, 1), (1, 1), (4, 4)])
def test_processes_per_machine_default_to_one_per_visible_gpu(monkeypatch, tmp_path, gpus, processes):
    import torch

    from fer_core import config

    driver = tmp_path / "nvidiactl"
    driver.touch()
    monkeypatch.setattr(config, "GPU_DEVICE_NODES", (str(tmp_path / "kfd"), str(driver)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert TrainConfig().nproc_per_node == processes
    assert TrainConfig(nproc_per_node=2).nproc_per_node == 2


def test_without_a_gpu_driver_on_linux_torch_is_not_asked(monkeypatch, tmp_path):
    """No driver device node: one process, and no 4-second torch import to learn it."""
    import torch

    from fer_core import config

    monkeypatch.setattr(config, "GPU_DEVICE_NODES", (str(tmp_path / "nvidiactl"), str(tmp_path / "kfd")))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("torch was asked"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert TrainConfig().nproc_per_node == 1
    monkeypatch.setattr(sys, "platform", "win32")  # no /dev there: torch is the one to ask
    with pytest.raises(pytest.fail.Exception, match="torch was asked"):
        TrainConfig()
