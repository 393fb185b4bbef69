"""Exported models (ONNX, TorchScript) and the ONNX Runtime backend: what the files carry, and
that they answer as PyTorch does."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from skimage import data

import fer_core
from conftest import copy_run_dir
from fer_core import cli, export
from fer_core.errors import CheckpointError, FerError
from fer_core.demo import render_face
from fer_core.backends import OnnxClassifier
from fer_core.pixels import to_stored
from fer_core.models import GreyAsRGB, build_model, load_checkpoint
from fer_core.predict import Predictor
from fer_core.runs import RunLayout, read_json
from fer_core.transforms import GREY_MEAN, eval_transform

PARITY_TOLERANCE = 1e-4
"""Max absolute difference allowed between exported and PyTorch probabilities: float32 kernels
that add in another order differ by ~1e-6; a wrong preprocessing or layer differs by > 1e-2."""
CLASSES = list(fer_core.CLASS_NAMES)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """200 synthetic face images, stored as the model sees them: uint8 (200, 48, 48)."""
    return torch.from_numpy(np.stack([to_stored(render_face(CLASSES[i % 7], 1, i % 7, i))
                                      for i in range(200)]))


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, export.ExportResult]:
    folder = tmp_path_factory.mktemp("exports")
    return {fmt: export.export_model(trained_run, fmt, folder / f"model{export.SUFFIXES[fmt]}")
            for fmt in export.FORMATS}


def torch_probabilities(run: Path, faces: torch.Tensor, img_size: int) -> torch.Tensor:
    network = export.exportable_network(load_checkpoint(RunLayout(run).best_checkpoint))
    with torch.inference_mode():
        return network(eval_transform(faces, img_size))


def test_the_onnx_file_passes_the_checker_and_carries_its_model_card(exported, trained_run: Path) -> None:
    result = exported["onnx"]
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == export.OPSET
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    card = json.loads(metadata[export.METADATA_KEY])
    evaluation = read_json(RunLayout(trained_run).evaluation_file())
    config = read_json(RunLayout(trained_run).config_file)
    assert card["classes"] == CLASSES and card["input_size"] == config["img_size"] == 32
    assert card["run_id"] == RunLayout(trained_run).id
    assert card["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert card["preprocessing"]["mean"] == [pytest.approx(GREY_MEAN)] and card["preprocessing"]["channels"] == 1
    assert card["preprocessing"]["face_size"] == 48 and card["preprocessing"]["colour"] == "grey"
    assert [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 32, 32]
    assert json.loads(metadata["fer.classes"]) == CLASSES and metadata["fer.run_id"] == card["run_id"]
    assert json.loads(result.card_path.read_text()) == card, "the card beside the file is the one inside"
    assert result.card_path.name == "model.onnx.json"
    assert export.read_card(result.path) == result.card


def test_onnx_matches_pytorch_on_200_faces_at_any_batch_size(exported, trained_run: Path,
                                                             faces: torch.Tensor) -> None:
    expected = torch_probabilities(trained_run, faces, 32)
    session = ort.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    (input_meta,) = session.get_inputs()
    assert input_meta.name == "input" and not isinstance(input_meta.shape[0], int), "dynamic batch"
    batch = eval_transform(faces, 32).contiguous().numpy()
    for size in (1, 7, 200):
        got = np.concatenate([session.run(["probabilities"], {"input": batch[i:i + size]})[0]
                              for i in range(0, len(batch), size)])
        assert got.shape == (200, 7)
        assert np.abs(got - expected.numpy()).max() <= PARITY_TOLERANCE
    assert np.allclose(got.sum(1), 1.0, atol=1e-5), "the file outputs probabilities"
    assert expected.std(0).max() > 0.05, "answers that do not depend on the face would prove little"


def test_torchscript_matches_pytorch_on_200_faces_and_carries_the_card(exported, trained_run: Path,
                                                                       faces: torch.Tensor) -> None:
    result = exported["torchscript"]
    extra = {export.METADATA_KEY + ".json": ""}
    scripted = torch.jit.load(str(result.path), map_location="cpu", _extra_files=extra)
    assert json.loads(extra[export.METADATA_KEY + ".json"])["classes"] == CLASSES
    with torch.inference_mode():
        got = scripted(eval_transform(faces, 32))
    difference = (got - torch_probabilities(trained_run, faces, 32)).abs().max().item()
    assert difference <= PARITY_TOLERANCE
    assert export.read_card(result.path).format == "torchscript"


def test_a_run_exports_into_its_own_exports_folder_by_default(trained_run: Path, tmp_path: Path) -> None:
    run = copy_run_dir(trained_run, tmp_path / "runs" / RunLayout(trained_run).path.relative_to(
        RunLayout(trained_run).runs_dir))
    result = export.export_model(run, "onnx")
    assert result.path == RunLayout(run).export_file(".onnx") and result.path.is_file()
    assert result.path.parent == run / "exports"


def test_a_run_stopped_before_its_test_evaluation_exports_without_scores(trained_run: Path, tmp_path: Path) -> None:
    run = copy_run_dir(trained_run, tmp_path / "runs" / RunLayout(trained_run).path.relative_to(
        RunLayout(trained_run).runs_dir))
    RunLayout(run).evaluation_file().unlink()
    result = export.export_model(run, "onnx")
    assert result.path.is_file() and result.card.test_accuracy is None and result.card.macro_f1 is None


def test_the_onnx_backend_predicts_what_the_torch_backend_does(exported, trained_run: Path) -> None:
    photo = io.BytesIO()
    Image.fromarray(data.astronaut()).save(photo, "JPEG", quality=92)
    checkpoint = RunLayout(trained_run).best_checkpoint
    for tta in (False, True):
        on_torch = Predictor.load(checkpoint, tta=tta, num_threads=1)
        on_onnx = Predictor.load(exported["onnx"].path, tta=tta, num_threads=1)
        assert (on_torch.backend, on_onnx.backend) == ("torch", "onnx")
        first, second = on_torch.predict(photo.getvalue()), on_onnx.predict(photo.getvalue())
        assert first.face_found and second.face_found
        assert [f.box for f in first.faces] == [f.box for f in second.faces]
        for a, b in zip(first.faces, second.faces, strict=True):
            assert a.label == b.label
            assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES) <= PARITY_TOLERANCE
    described = on_onnx.describe()
    assert described["classes"] == CLASSES and described["input_size"] == 32
    assert described["run_id"] == RunLayout(trained_run).id and described["backend"] == "onnx"


def test_a_checkpoint_runs_on_onnx_runtime_when_asked(trained_run: Path, faces: torch.Tensor) -> None:
    checkpoint = RunLayout(trained_run).best_checkpoint
    on_onnx = Predictor.load(checkpoint, backend="onnx", num_threads=1)
    assert on_onnx.backend == "onnx"
    difference = (on_onnx.probabilities(faces[:20]) - Predictor.load(checkpoint).probabilities(faces[:20]))
    assert difference.abs().max().item() <= PARITY_TOLERANCE


def test_exporting_something_else_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FerError, match="nothing to export"):
        export.export_model(tmp_path / "missing")
    with pytest.raises(FerError, match="not a run directory"):
        export.export_model(tmp_path)
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safe fer_core checkpoint"):
        export.export_model(tmp_path / "notes.pt")
    with pytest.raises(ValueError, match="format"):
        export.export_model(tmp_path / "notes.pt", "tflite")


@pytest.mark.parametrize("field, value", [("class_names", 5), ("class_names", [1, 2]), ("colour", "purple")])
def test_a_checkpoint_that_is_not_one_of_ours_is_refused_in_words(trained_run: Path, tmp_path: Path,
                                                                   field: str, value: object) -> None:
    from fer_core.models import load_checkpoint, save_checkpoint_file
    checkpoint = load_checkpoint(RunLayout(trained_run).best_checkpoint)
    if field == "colour":
        checkpoint["config"] = {**checkpoint["config"], "colour": value}
    else:
        checkpoint[field] = value
    odd = tmp_path / "odd.pt"
    save_checkpoint_file(odd, checkpoint)
    with pytest.raises(CheckpointError):
        export.export_model(odd, "onnx", tmp_path / "odd.onnx")
    assert not (tmp_path / "odd.onnx").exists()


@pytest.mark.parametrize("change, said", [
    ({"classes": CLASSES + ["contempt"]}, f"gives {len(CLASSES)} probabilities for the card's {len(CLASSES) + 1}"),
    ({"input_size": 64}, "takes 32x32 px images, the card says 64"),
])
def test_an_onnx_model_that_does_not_match_its_card_is_refused_in_words(exported, tmp_path: Path,
                                                                        change: dict, said: str) -> None:
    model = onnx.load(str(exported["onnx"].path))
    for entry in model.metadata_props:
        if entry.key == export.METADATA_KEY:
            entry.value = json.dumps({**json.loads(entry.value), **change})
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    with pytest.raises(CheckpointError, match="does not match its model card: it " + said):
        Predictor.load(edited)


def test_an_onnx_file_from_elsewhere_is_refused_in_words(tmp_path: Path) -> None:
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(CheckpointError, match="no fer_core model card"):
        Predictor.load(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        Predictor.load(tmp_path / "junk.onnx")
    with pytest.raises(CheckpointError, match="ONNX Runtime"):
        Predictor.load(tmp_path / "foreign.onnx", backend="torch")


def test_the_export_command_writes_the_file_and_says_where(trained_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "emotions.onnx"
    assert cli.main(["export", str(trained_run), "--format", "onnx", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert str(target) in printed and target.is_file() and (tmp_path / "out" / "emotions.onnx.json").is_file()
    assert cli.main(["export", str(tmp_path / "nothing-here")]) == 2
    assert "nothing to export" in capsys.readouterr().err


def test_the_export_cache_keeps_only_the_newest_few(tmp_path: Path) -> None:
    folder = tmp_path / "onnx"
    folder.mkdir()
    for age in range(export.CACHED_EXPORTS + 3):
        model = folder / f"{age:02d}.onnx"
        model.write_bytes(b"x")
        export.card_path_for(model).write_text("{}")
        os.utime(model, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))  # 00 is the newest
    export._prune_cache(folder, keep=export.CACHED_EXPORTS)
    kept = sorted(path.name for path in folder.glob("*.onnx"))
    assert kept == [f"{age:02d}.onnx" for age in range(export.CACHED_EXPORTS)]
    assert len(list(folder.glob("*.json"))) == export.CACHED_EXPORTS, "cards go with their models"


def test_an_onnx_export_from_before_the_colour_choice_still_takes_grey_faces(tmp_path: Path,
                                                                            faces: torch.Tensor) -> None:
    """Exports made before grey runs had a one-channel first layer take three ImageNet-normalised
    channels; ONNX Runtime is given exactly those from today's one-channel grey input."""
    torch.manual_seed(0)
    old, _, _ = build_model(len(CLASSES), stem="small", pretrained=False, in_channels=3)
    softmax = torch.nn.Sequential(old, torch.nn.Softmax(dim=1)).eval()
    path = tmp_path / "old.onnx"
    with torch.no_grad():
        torch.onnx.export(softmax, (torch.zeros(2, 3, 48, 48),), str(path), input_names=["input"],
                          output_names=["probabilities"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    grey = eval_transform(faces[:16], 48)
    with torch.no_grad():
        expected = softmax(GreyAsRGB()(grey))
    assert torch.allclose(OnnxClassifier(path, num_threads=1)(grey), expected, atol=1e-4)
