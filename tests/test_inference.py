"""One conversion and one forward pass: a photo and a dataset file give the model the same input,
and training, the `evaluate` command and the Predictor give the same probabilities."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_core import runs
from fer_core.calibration import apply_temperature
from fer_core.cli import main as cli_main
from fer_core.data import display_path, load_dataset
from fer_core.evaluate import evaluate_run
from fer_core.images import load_image
from fer_core.image_format import STORE_SIZE
from fer_core.inference import autocast_context, probabilities
from fer_core.pixels import DECODE_SIDE, decode_file, to_stored
from fer_core.models import build_model
from fer_core.predict import Predictor


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth ramps plus noise: every resize or colour rule that differs shows in the pixels."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    base = 0.45 * x + 0.35 * y + 0.2 * np.sin(9 * x * y)
    return np.clip(base + rng.normal(0, 0.04, (height, width)), 0, 1)


def rgb(width: int, height: int) -> Image.Image:
    grey = pattern(width, height)
    channels = [grey, grey[::-1], np.roll(grey, width // 3, axis=1)]
    return Image.fromarray((np.stack(channels, axis=-1) * 255).astype(np.uint8))


def exif_rotated() -> tuple[Image.Image, dict]:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return rgb(120, 70), {"exif": exif.tobytes(), "quality": 95}


def palette_with_transparency() -> tuple[Image.Image, dict]:
    image = rgb(100, 64).quantize(colors=32)
    pixels = np.asarray(image).copy()
    pixels[:, :30] = 0  # the left band is the transparent index
    image = Image.fromarray(pixels, "P")
    image.putpalette(rgb(100, 64).quantize(colors=32).getpalette())
    return image, {"transparency": 0}


def rgba() -> tuple[Image.Image, dict]:
    image = rgb(90, 110).convert("RGBA")
    alpha = (pattern(90, 110, seed=1) * 255).astype(np.uint8)
    image.putalpha(Image.fromarray(alpha))
    return image, {}


def sixteen_bit() -> tuple[Image.Image, dict]:
    # a dark 16-bit photo: values up to ~30000 of 65535
    values = (pattern(80, 60) * 30000).astype(np.uint16)
    return Image.fromarray(values), {}


FILES = {
    "8-bit grey png": (lambda: (Image.fromarray((pattern(75, 90) * 255).astype(np.uint8)), {}), "png"),
    "8-bit rgb jpeg": (lambda: (rgb(130, 97), {"quality": 90}), "jpg"),
    "8-bit jpeg decoded at reduced scale": (lambda: (rgb(2 * DECODE_SIDE + 40, 900), {"quality": 85}), "jpg"),
    "16-bit png": (sixteen_bit, "png"),
    "palette png with transparency": (palette_with_transparency, "png"),
    "palette gif with transparency": (palette_with_transparency, "gif"),
    "rgba png": (rgba, "png"),
    "exif-rotated jpeg": (exif_rotated, "jpg"),
}


def dataset_and_photo(tmp_path: Path, kind: str) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    """The same file stored in a dataset folder and uploaded as a photo: both model inputs."""
    make, extension = FILES[kind]
    image, options = make()
    path = tmp_path / "dataset" / "happy" / f"face.{extension}"
    path.parent.mkdir(parents=True)
    image.save(path, **options)
    stored, problem = decode_file(path)
    assert problem is None
    photo = load_image(path.read_bytes(), reduce_to=DECODE_SIDE)  # as Predictor.predict decodes
    crops = Predictor.face_crops(photo, [])  # no face found: the whole image is classified
    model_input = Predictor.preprocess(crops)
    assert model_input.dtype == torch.uint8 and tuple(model_input.shape) == (1, STORE_SIZE, STORE_SIZE)
    return stored, model_input[0].numpy(), image


@pytest.mark.parametrize("kind", list(FILES))
def test_a_photo_and_the_same_file_in_a_dataset_give_the_same_model_input(tmp_path: Path, kind: str) -> None:
    stored, from_photo, _ = dataset_and_photo(tmp_path, kind)
    assert stored.dtype == np.uint8 and stored.shape == (STORE_SIZE, STORE_SIZE)
    assert stored.std() > 5  # a real picture, not a blank that would match anything
    assert np.array_equal(stored, from_photo)


def test_sixteen_bit_is_scaled_by_its_type_range_not_stretched(tmp_path: Path) -> None:
    stored, _, image = dataset_and_photo(tmp_path, "16-bit png")
    values = np.asarray(image, dtype=np.float64)[:, 10:70]  # the centre square of 80x60
    # at most 30000 of 65535 is a mid grey at brightest; a min-max stretch would reach white
    assert abs(stored.mean() - values.mean() / 257) < 1.5 and stored.max() < 130


def test_exif_orientation_and_transparency_reach_the_model(tmp_path: Path) -> None:
    rotated, _, stored = dataset_and_photo(tmp_path / "exif", "exif-rotated jpeg")
    upright = to_stored(stored.transpose(Image.Transpose.ROTATE_270)).astype(float)
    as_stored = to_stored(stored).astype(float)
    # JPEG noise aside, the model sees the picture turned as its EXIF says
    assert np.abs(rotated - upright).mean() < 3 < np.abs(rotated - as_stored).mean()
    palette, _, _ = dataset_and_photo(tmp_path / "palette", "palette png with transparency")
    assert (palette[:, :5] == 255).all()  # the transparent band is white, not the index's colour
    assert palette[:, -5:].max() < 255


# ---- one forward pass -----------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_autocast_is_bfloat16_only_on_a_cpu_that_computes_it_natively(native: bool, monkeypatch) -> None:
    from fer_core import inference
    monkeypatch.setattr(inference, "cpu_has_fast_bfloat16", lambda: native)
    cpu = torch.device("cpu")
    with autocast_context(cpu, True):
        # emulated bfloat16 (AVX2-only CPUs) is several times slower than float32: stay off there
        assert torch.is_autocast_enabled("cpu") is native
        if native:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    assert inference.amp_dtype(torch.device("cuda"), True) == torch.float16


@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_do_not_depend_on_the_batch_size(tta: bool) -> None:
    torch.manual_seed(0)
    model, _, _ = build_model(7, stem="small", pretrained=False)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8))
    whole = probabilities(model, images, 48, tta=tta)
    pieces = probabilities(model, images, 48, tta=tta, batch_size=2)
    assert tuple(whole.shape) == (5, 7) and torch.allclose(whole.sum(1), torch.ones(5))
    assert torch.allclose(whole, pieces, atol=1e-5)
    assert tuple(probabilities(model, images[:0], 48).shape) == (0, 7)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "2026-01-01_00-00-00" / "default" / "resnet18" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def read_probabilities(path: Path) -> dict[str, list[float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: [float(v) for k, v in row.items() if k.startswith("p_")]
                for row in csv.DictReader(handle)}


def test_training_the_evaluate_command_and_the_predictor_give_the_same_probabilities(
        trained_run: Path, tmp_path: Path) -> None:
    copy = copy_run(trained_run, tmp_path)
    layout = runs.RunLayout(copy)
    trained_predictions = layout.predictions_file().read_bytes()
    trained_evaluation = layout.evaluation_file().read_bytes()
    layout.predictions_file().unlink()
    layout.evaluation_file().unlink()

    evaluate_run(copy)
    assert layout.predictions_file().read_bytes() == trained_predictions
    assert layout.evaluation_file().read_bytes() == trained_evaluation

    from_training = read_probabilities(layout.predictions_file())
    config = runs.read_json(layout.config_file)
    dataset = load_dataset(config["data"])
    index = [i for i, p in enumerate(dataset.paths) if display_path(p) in from_training]
    assert len(index) == len(from_training) > 0
    predictor = Predictor.from_checkpoint(layout.best_checkpoint, num_threads=1)
    assert predictor.amp == config["amp"] and predictor.tta == config["tta"]
    faces = dataset.images[torch.tensor(index)]
    calibrated = predictor.probabilities(faces).numpy()
    temperature = predictor.calibration.temperature
    predictor.calibration = None  # the raw softmax, as the evaluation recorded it
    predicted = predictor.probabilities(faces).numpy()
    expected = np.array([from_training[display_path(dataset.paths[i])] for i in index])
    assert np.abs(predicted - expected).max() <= 6e-6  # the csv keeps 5 decimals
    # what the Predict page shows: the same, through the run's temperature
    assert np.abs(calibrated - apply_temperature(predicted, temperature)).max() <= 1e-5


def test_head_only_training_scores_its_cached_features_like_the_evaluate_command(tiny_demo: Path,
                                                                                tmp_path: Path) -> None:
    """Selecting on test, head-only training scores the test split from its cached backbone
    features instead of a second forward pass; the evaluate command must agree with it."""
    from conftest import tiny_config
    from fer_core.train import fit
    trained = fit(tiny_config(tiny_demo, tmp_path, mode="head_only", augment=False, val_fraction=0.0))
    copy = copy_run(trained, tmp_path / "copy")
    layout = runs.RunLayout(copy)
    evaluate_run(copy)
    assert runs.read_json(layout.evaluation_file())["confusion_matrix"] == \
        runs.read_json(runs.RunLayout(trained).evaluation_file())["confusion_matrix"]
    again = read_probabilities(layout.predictions_file())
    for path, row in read_probabilities(runs.RunLayout(trained).predictions_file()).items():
        assert again[path] == pytest.approx(row, abs=2e-3)  # bfloat16 on both paths


def test_scoring_another_dataset_keeps_the_runs_own_test_result(trained_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from fer_core.demo import generate_demo_dataset
    other = generate_demo_dataset(tmp_path / "other faces", per_class=3, seed=5)
    copy = copy_run(trained_run, tmp_path)
    layout = runs.RunLayout(copy)
    before = {path: path.read_bytes() for path in (layout.evaluation_file(), layout.predictions_file())}

    assert cli_main(["evaluate", str(copy), "--data", str(other)]) == 0

    assert {path: path.read_bytes() for path in before} == before
    written = layout.evaluation_file(str(other))
    assert written.parent == copy / "evaluations" and written.name.startswith("other_faces-")
    assert layout.other_evaluations() == [written]
    evaluation = runs.read_json(written)
    assert evaluation["data"] == str(other.resolve()) and evaluation["split"] == "all"
    assert evaluation["num_images"] == 7 * 3 and evaluation["synthetic"] is False
    assert sum(map(sum, evaluation["confusion_matrix"])) == 21
    rows = read_probabilities(layout.predictions_file(str(other)))
    assert len(rows) == 21 and all(str(other) in path for path in rows)
    assert f"written to {written}" in capsys.readouterr().out


def test_the_evaluate_page_shows_the_dataset_chosen(trained_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    app_test = pytest.importorskip("streamlit.testing.v1").AppTest
    from fer_core.demo import generate_demo_dataset
    from fer_core.ui_data import format_percent
    run = copy_run(trained_run, tmp_path / "runs")
    other = generate_demo_dataset(tmp_path / "other faces", per_class=3, seed=5)
    scored = evaluate_run(run, str(other))
    own = runs.read_json(runs.RunLayout(run).evaluation_file())
    monkeypatch.setenv("FER_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))

    def heatmap_total(at) -> int:
        import json
        (trace,) = [t for chart in at.get("plotly_chart") for t in json.loads(chart.proto.spec)["data"]
                    if t["type"] == "heatmap"]
        return sum(map(sum, trace["z"]))

    threads = torch.get_num_threads()  # the app limits torch to one thread in this process
    try:
        at = app_test.from_file("../streamlit_app.py", default_timeout=60)
        at.switch_page("pages/evaluate.py").run()
        assert not at.exception, [e.value for e in at.exception]
        run_id = runs.run_id(run)
        picker = at.selectbox(key=f"eval_on::{run_id}")
        assert len(picker.options) == 2 and picker.options[0] == "test split of its own data"
        assert heatmap_total(at) == own["num_images"]

        picker.set_value(str(runs.RunLayout(run).evaluation_file(str(other)))).run()
        assert not at.exception, [e.value for e in at.exception]
        assert [m.value for m in at.metric if m.label == "Accuracy"] == [format_percent(scored["accuracy"])]
        assert heatmap_total(at) == 21
        assert f"Scored on {other.resolve()}" in [t.value for t in at.text]
        cells = at.selectbox(key=f"eval_cell::{run_id}::{runs.RunLayout(run).evaluation_file(str(other)).stem}")
        row, column = cells.value  # cells are (true, predicted) class indices
        expected = scored["confusion_matrix"][row][column]
        (gallery,) = at.image or [None]
        assert (len(gallery.value) if gallery else 0) == expected  # faces of the other dataset
    finally:
        torch.set_num_threads(threads)
