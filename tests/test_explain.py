"""Grad-CAM (fer_core.explain): where the map lies on a model that can only look at the mouth,
what the maps and overlays look like, and the "Why?" toggles of the Predict and Evaluate pages.

The mouth model is the project's ResNet18 (small stem, 48 px, as the demo-quick and cpu-fast
recipes build it) trained for a few AdamW steps on synthetic faces: grey noise everywhere, and a
bright mouth in the lower middle whose shape (a smile, a frown, a straight line) is the class.
The mouth pixels are the same count and brightness in every class, so nothing but its shape, in
that place, tells the classes apart.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from fer_core import explain
from fer_core.explain import ExplainError, GradCam, mass_share, overlay, overlay_on_box
from fer_core.faces import FaceBox
from fer_core.image_format import DEFAULT_FORMAT, ImageFormat
from fer_core.models import build_model
from markdown_safety import MALICIOUS_IMAGE, active_markdown
from test_app_pages import keep_torch_threads  # noqa: F401  (the pages set torch's threads: restored per module)

MOUTH_CLASSES = ["smile", "frown", "line"]
MOUTH_COLUMNS = np.arange(14, 35)
_BEND = np.rint(4 * ((MOUTH_COLUMNS - 24) / 10) ** 2).astype(int)
MOUTH_ROWS = {"smile": 39 - _BEND, "frown": 35 + _BEND, "line": np.full_like(_BEND, 37)}
MOUTH_THICKNESS = 2
NOISE_SD = 10.0
# The mouth region: the lower middle of the face, rows 28-47 and columns 8-39, 27.8% of it. It
# is the mouth (rows 35-42, columns 14-34) widened to the resolution of the map: Grad-CAM reads a
# 6x6 feature map (8 px cells) and upsamples it bilinearly, so a map with only the mouth's cells
# lit puts 94% of its mass here; a map blind to position puts 27.8%; one upside down about 7%.
REGION = (slice(28, 48), slice(8, 40))
MIN_MOUTH_MASS = 0.5
"""Over half of each map's mass, on average, on 27.8% of the face: 1.8x a uniform map's share."""


def mouth_faces(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 48, 48) uint8 faces and their class indices, the classes in turn."""
    labels = rng.permutation(np.arange(count) % len(MOUTH_CLASSES))
    pixels = rng.normal(128, NOISE_SD, (count, 48, 48))
    for face, label in zip(pixels, labels):
        rows = MOUTH_ROWS[MOUTH_CLASSES[label]]
        for offset in range(MOUTH_THICKNESS):
            face[rows + offset, MOUTH_COLUMNS] = 235
    return (torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8)),
            torch.from_numpy(labels.astype(np.int64)))


def region_mask() -> np.ndarray:
    mask = np.zeros((48, 48), bool)
    mask[REGION] = True
    return mask


def train_mouth_model(seed: int = 0) -> torch.nn.Module:
    """The project's model after 4 AdamW steps of 16 mouth faces (the loss is ~0 after 3), its
    BatchNorm statistics then re-estimated on 64 faces (4 steps of momentum 0.1 would leave them
    mostly at their initial values)."""
    from fer_core.transforms import eval_transform

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, _, _ = build_model(len(MOUTH_CLASSES), stem="small", pretrained=False)
    model = model.to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):
        faces, labels = mouth_faces(16, rng)
        loss = torch.nn.functional.cross_entropy(model(eval_transform(faces, 48)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over what follows
    with torch.no_grad():
        model(eval_transform(mouth_faces(64, rng)[0], 48))
    return model.eval()


@pytest.fixture(scope="module")
def mouth_model() -> torch.nn.Module:
    return train_mouth_model()


@pytest.fixture(scope="module")
def mouth_cam(mouth_model) -> GradCam:
    return GradCam(mouth_model, MOUTH_CLASSES, 48)


@pytest.fixture(scope="module")
def test_faces() -> tuple[torch.Tensor, torch.Tensor]:
    return mouth_faces(24, np.random.default_rng(100))


# ---- the method ----------------------------------------------------------------------------

def test_the_map_lies_on_the_mouth_when_only_the_mouth_tells_the_classes_apart(mouth_model, mouth_cam,
                                                                               test_faces):
    faces, labels = test_faces
    with torch.no_grad():
        from fer_core.transforms import eval_transform
        predicted = mouth_model(eval_transform(faces, 48)).argmax(1)
    assert (predicted == labels).float().mean() >= 0.9, "the model did not learn the mouths"
    assert mouth_cam.layer == "layer3"  # 48 px, small stem: layer4's map would be 3x3

    maps, _ = mouth_cam.heatmaps(faces, labels.tolist())
    mask = region_mask()
    shares = np.array([mass_share(heat, mask) for heat in maps])
    assert mask.mean() == pytest.approx(0.278, abs=0.001)
    assert shares.mean() > MIN_MOUTH_MASS, shares.round(2)
    assert shares.mean() > 1.8 * mask.mean()
    assert np.median(shares) > MIN_MOUTH_MASS, shares.round(2)
    # the same maps turned upside down land on the forehead: the test can tell
    assert np.mean([mass_share(heat[::-1], mask) for heat in maps]) < mask.mean()
    # layer4 (3x3 cells at 48 px) cannot say where the mouth is: why layer_for picks layer3
    coarse, _ = GradCam(mouth_model, MOUTH_CLASSES, 48, layer="layer4").heatmaps(faces, labels.tolist())
    assert np.mean([mass_share(heat, mask) for heat in coarse]) < shares.mean()


def test_maps_are_48_px_in_0_1_and_another_class_gets_another_map(mouth_cam, test_faces):
    faces, labels = test_faces
    explanations = mouth_cam.explain([Image.fromarray(face.numpy()) for face in faces[:3]])
    for explanation, label in zip(explanations, labels[:3].tolist()):
        assert explanation.heatmap.shape == (48, 48) and explanation.heatmap.dtype == np.float32
        assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() == pytest.approx(1.0)
        assert explanation.class_name == MOUTH_CLASSES[label]  # unasked: the predicted class
        assert explanation.layer == "layer3" and 0.0 <= explanation.probability <= 1.0

    face = faces[:1].numpy()[0]
    own, other = mouth_cam.explain([face, face], [None, "line" if explanations[0].class_name != "line" else "smile"])
    assert other.class_name != own.class_name and other.probability < own.probability
    assert np.abs(own.heatmap - other.heatmap).mean() > 0.02
    with pytest.raises(ValueError, match="not one of this model's classes: smile, frown, line"):
        mouth_cam.explain([face], ["surprise"])


def test_the_explained_model_is_a_copy_and_the_original_keeps_its_gradients(mouth_model, mouth_cam, test_faces):
    mouth_cam.heatmaps(test_faces[0][:2], [0, 1])
    assert mouth_cam.model is not mouth_model
    assert all(p.requires_grad and p.grad is None for p in mouth_model.parameters())
    assert not mouth_model._forward_hooks and not mouth_model.layer3._forward_hooks


def test_a_model_without_the_layer_is_refused_in_words():
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))
    with pytest.raises(ExplainError, match="this model has no layer3 block .*needs the ResNet18"):
        GradCam(tiny, ["a", "b"], 48)
    model, _, _ = build_model(2, stem="small", pretrained=False)
    with pytest.raises(ExplainError, match="reads one of layer3, layer4, not 'fc'"):
        GradCam(model, ["a", "b"], 48, layer="fc")


def test_layer4_is_read_only_where_its_map_is_large_enough():
    small, _, _ = build_model(2, stem="small", pretrained=False)
    imagenet, _, _ = build_model(2, stem="imagenet", pretrained=False)
    assert explain.feature_map_sides(small, 48) == {"layer3": 6, "layer4": 3}
    assert explain.layer_for(small, 48) == "layer3"
    assert explain.layer_for(small, 96) == "layer4"    # 6x6
    assert explain.layer_for(imagenet, 160) == "layer3"  # layer4 5x5, layer3 10x10
    assert explain.layer_for(imagenet, 224) == "layer4"  # 7x7


def test_a_bare_onnx_model_needs_its_checkpoint_and_an_onnx_predictor_of_a_checkpoint_uses_it(tmp_path):
    onnx_only = SimpleNamespace(model=None, info={"path": str(tmp_path / "model.onnx")},
                                class_names=["a", "b"], img_size=48, image_format=ImageFormat())
    with pytest.raises(ExplainError, match=r"Grad-CAM needs the PyTorch checkpoint \(\.pt\)"):
        GradCam.for_predictor(onnx_only)
    checkpoint = save_checkpoint(tmp_path / "net.pt", ["a", "b"], img_size=64)
    from_checkpoint = SimpleNamespace(model=None, info={"path": str(checkpoint)}, class_names=["a", "b"],
                                      img_size=64, image_format=ImageFormat())
    cam = GradCam.for_predictor(from_checkpoint)
    assert cam.img_size == 64 and cam.class_names == ["a", "b"]
    assert cam.explain([np.zeros((60, 50), np.uint8)])[0].heatmap.shape == (48, 48)


def test_overlays_keep_the_size_of_the_face_and_of_the_photo():
    heat = np.zeros((48, 48), np.float32)
    heat[30:40, 10:30] = 1.0
    face = overlay(Image.new("L", (144, 144), 128), heat)
    assert face.size == (144, 144) and face.mode == "RGB"
    hot, cold = np.asarray(face)[105, 60], np.asarray(face)[10, 10]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where the map is high, blue where it is 0

    photo = Image.new("RGB", (400, 300), (128, 128, 128))
    box = FaceBox(x=200, y=100, w=96, h=96, score=0.9, detector="haar-alt2")
    shown = overlay_on_box(photo, box, heat, scale=0.5, outline=None)
    assert shown.size == photo.size
    changed = np.argwhere(np.any(np.asarray(shown) != 128, axis=2))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    assert (left, top, right, bottom) == (100, 50, 147, 97)  # the box, at half size
    tilted = overlay_on_box(photo, FaceBox(x=200, y=100, w=96, h=96, score=0.9, detector="haar-alt2",
                                           angle=20.0), heat)
    assert tilted.size == photo.size


def save_checkpoint(path: Path, classes: list[str], img_size: int = 48,
                    image_format: ImageFormat = DEFAULT_FORMAT) -> Path:
    torch.manual_seed(0)
    model, _, _ = build_model(len(classes), stem="small", pretrained=False, in_channels=image_format.channels)
    torch.save({"model_state": model.state_dict(), "class_names": classes,
                "config": {"img_size": img_size, "stem": "small", "store_size": image_format.size,
                           "colour": image_format.colour}}, path)
    return path


def test_a_colour_model_is_explained_on_its_own_stored_faces(tmp_path):
    """An RGB run stored at 64 px: the map covers its 64x64 colour crop, and a colour face and
    the same face in grey are different inputs to it."""
    checkpoint = save_checkpoint(tmp_path / "rgb.pt", ["a", "b"], img_size=64,
                                 image_format=ImageFormat(size=64, colour="rgb"))
    cam = GradCam.from_checkpoint(checkpoint)
    assert cam.image_format == ImageFormat(64, "rgb")
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)
    colour, grey = cam.explain([face, np.asarray(Image.fromarray(face).convert("L"))], classes=["a", "a"])
    assert colour.heatmap.shape == grey.heatmap.shape == (64, 64)
    assert colour.probability != pytest.approx(grey.probability, abs=1e-6)


# ---- the pages -------------------------------------------------------------------------------

APP = "../streamlit_app.py"
TIMEOUT = 60


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    folders = SimpleNamespace(runs=tmp_path / "runs", ckpt=tmp_path / "checkpoints", cache=tmp_path / "cache")
    folders.ckpt.mkdir()
    monkeypatch.setenv("FER_RUNS_DIR", str(folders.runs))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(folders.ckpt))
    monkeypatch.setenv("FER_CACHE_DIR", str(folders.cache))
    return folders


def run_page(at: AppTest) -> AppTest:
    at.run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def image_captions(at: AppTest) -> list[str]:
    found: list[str] = []

    def visit(node) -> None:
        if getattr(node, "type", "") == "image":
            found.extend(image.caption for image in node.proto.imgs)
        for child in getattr(node, "children", {}).values():
            visit(child)

    visit(at._tree)
    return found


def test_the_predict_toggle_shows_the_face_s_heat_map_on_the_crop_and_on_the_photo(env):
    import fer_core
    from skimage import data as skdata

    save_checkpoint(env.ckpt / "model.pt", list(fer_core.CLASS_NAMES))
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, "JPEG", quality=90)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/predict.py")
    run_page(at)
    [uploader] = [u for u in at.file_uploader if u.label == "Drop one or more photos here"]
    uploader.set_value(("astronaut.jpg", buffer.getvalue(), "image/jpeg"))
    run_page(at)
    assert "On the 48×48 face" not in image_captions(at)  # nothing computed until asked

    at.toggle(key="upload_0_1_gradcam").set_value(True)
    run_page(at)
    captions = image_captions(at)
    assert "On the 48×48 face" in captions and "On the photo" in captions
    picker = at.selectbox(key="upload_0_1_gradcam_class")
    label = [line for line in (m.value for m in at.markdown) if line.startswith("**Face 1**")][0]
    predicted = picker.value
    assert picker.options[predicted] == f"{fer_core.CLASS_NAMES[predicted]} (predicted)"
    assert fer_core.CLASS_NAMES[predicted] in label
    legend = " ".join(c.value for c in at.caption)
    assert f"raised the score of {fer_core.CLASS_NAMES[predicted]} most" in legend and "Layer: layer3" in legend

    other = (predicted + 1) % len(fer_core.CLASS_NAMES)
    picker.set_value(other)
    run_page(at)
    assert f"raised the score of {fer_core.CLASS_NAMES[other]} most" in " ".join(c.value for c in at.caption)

    # on ONNX Runtime the map comes from the .pt checkpoint the model was exported from
    at.button_group(key="predict_backend").set_value("onnx")
    run_page(at)
    assert "on ONNX Runtime" in " ".join(t.value for t in at.text)
    assert {"On the 48×48 face", "On the photo"} <= set(image_captions(at))


def write_scored_run(runs_dir: Path, classes: list[str], faces: list[np.ndarray]) -> Path:
    """A completed run with a best checkpoint, evaluation.json and predictions.csv whose faces
    (real files) all are class 0 predicted as class 1."""
    from fer_core import runs
    layout = runs.RunLayout(runs_dir / "2030-01-01_00-00-00" / "exp" / runs.MODEL_NAME / "finetune")
    layout.checkpoint_dir.mkdir(parents=True)
    save_checkpoint(layout.best_checkpoint, classes)
    rows = []
    for number, face in enumerate(faces):
        path = layout.path / f"face{number}.png"
        Image.fromarray(face).save(path)
        rows.append({"path": str(path), "true": classes[0], "predicted": classes[1],
                     **{f"p_{c}": (0.8 if c == classes[1] else 0.2 / (len(classes) - 1)) for c in classes}})
    with open(layout.predictions_file(), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    matrix = [[0] * len(classes) for _ in classes]
    matrix[0][1] = len(faces)
    report = {c: {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": len(faces) if i == 0 else 0}
              for i, c in enumerate(classes)}
    runs.atomic_write_json(layout.evaluation_file(), {
        "accuracy": 0.0, "macro_f1": 0.0, "classes": classes, "confusion_matrix": matrix, "report": report,
        "num_images": len(faces), "best_epoch": 1, "split": "test", "data": "/data/x", "synthetic": False})
    runs.atomic_write_json(layout.config_file, {"data": "/data/x", "experiment": "exp", "mode": "finetune",
                                                "img_size": 48})
    runs.atomic_write_json(layout.status_file, {"state": "completed", "started_at": time.time() - 60,
                                                "finished_at": time.time()})
    return layout.path


def test_the_evaluate_gallery_toggle_puts_a_heat_map_on_every_face(env):
    from fer_core import runs
    classes = [MALICIOUS_IMAGE, "sad", "happy"]
    faces = [face.numpy() for face in mouth_faces(3, np.random.default_rng(5))[0]]
    run_dir = write_scored_run(env.runs, classes, faces)
    view = runs.RunLayout(run_dir).id
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/evaluate.py")
    run_page(at)
    assert at.selectbox(key=f"eval_cell::{view}").value == (0, 1)
    shown = len(image_captions(at))

    at.toggle(key=f"eval_cam::{view}_gradcam").set_value(True)
    run_page(at)
    assert shown == len(faces)
    captions = image_captions(at)  # each face now under its map, with its caption; the colour bar
    assert len(captions) == len(faces) + 1 and "no evidence → strongest evidence" in captions
    picker = at.selectbox(key=f"eval_cam::{view}_gradcam_class")
    assert picker.value == 1 and picker.options[:2] == [f"{MALICIOUS_IMAGE} (true)", "sad (predicted)"]
    picker.set_value(0)
    run_page(at)
    assert not active_markdown(at), active_markdown(at)
    assert f"raised the score of {MALICIOUS_IMAGE} most" in " ".join(c.value for c in at.caption).replace("\\", "")

    runs.RunLayout(run_dir).best_checkpoint.unlink()
    run_page(at)
    assert any("this run has none" in t.value for t in at.text)


def test_an_ensemble_adds_up_the_maps_of_its_members(test_faces):
    class Average(torch.nn.Module):  # the shape fer_core.ensemble gives: `members`, one output
        def __init__(self, members):
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):
            return torch.stack([m(x).softmax(1) for m in self.members]).mean(0).log()

    torch.manual_seed(1)
    members = [build_model(3, stem="small", pretrained=False)[0].eval() for _ in range(2)]
    ensemble = GradCam(Average(members), MOUTH_CLASSES, 48)
    assert ensemble.layer == "layer3" and len(ensemble.blocks) == 2
    maps, probabilities = ensemble.heatmaps(test_faces[0][:2], [0, 2])
    assert maps.shape == (2, 48, 48) and 0.0 <= maps.min() and maps.max() <= 1.0
    assert probabilities.shape == (2,) and np.all((probabilities > 0) & (probabilities < 1))
