"""Grad-CAM on the pages: the "Why?" toggle, the emotion picker and the heat maps, for one face
on the Predict page and for the faces of a cell on the Evaluate page.

Not a page (the router lists pages explicitly). The maps are `fer_core.explain`'s; this module
only asks for them when a toggle is on, caches them and draws them. Names from checkpoints and
files are shown as plain text or escaped with `literal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from fer_core.errors import FerError
from pages._shared import literal

FACE_SHOWN_PX = 144           # the 48 px face enlarged 3x, as the Predict page shows it
PHOTO_SHOWN_PX = 216          # the face's neighbourhood in the photo
GALLERY_PX = 140              # the Evaluate gallery's thumbnail width
PHOTO_SIDE = 1024             # the photo under the heat map (as the Predict page's own)
TOGGLE_LABEL = "Why? Show the Grad-CAM heat map"
TOGGLE_HELP = ("Grad-CAM colours the parts of the face that pushed the model towards an emotion: "
               "red and yellow the most, blue not at all. It follows the model's gradients back to "
               "one of its last blocks of layers, so the map is coarse (6×6 cells on the face for "
               "48 px models). Computed only while this is on.")
LEGEND = ("Red and yellow: the places that raised the score of {name} most; green: some; blue: "
          "none. Each map is scaled to its own strongest place, so compare places within a map, "
          "not colours across faces.")


# ---- models and maps, cached ---------------------------------------------------------------

@st.cache_resource(max_entries=2, show_spinner="Preparing Grad-CAM…")
def predictor_cam(_predictor, model_key: str):
    """Grad-CAM for the Predict page's model (its own copy of the network), per model version.
    An ONNX-only model raises ExplainError, which is not cached (it costs nothing to raise)."""
    from fer_core.explain import GradCam
    return GradCam.for_predictor(_predictor)


@st.cache_resource(max_entries=2, show_spinner="Loading the model for Grad-CAM…")
def checkpoint_cam(path: str, mtime_ns: int):
    """Grad-CAM for a run's checkpoint file, per file version."""
    from fer_core.explain import GradCam
    return GradCam.from_checkpoint(path)


@st.cache_data(max_entries=512, show_spinner="Computing the heat maps…")
def heat_maps(_cam, model_key: str, faces: bytes, count: int, targets: tuple[int, ...]) -> np.ndarray:
    """(count, side, side) maps in [0, 1] for `count` uint8 faces in the model's stored format
    (their raw bytes: the cache key, with `model_key`) and one class index each; one batch."""
    import torch
    stored = torch.frombuffer(bytearray(faces), dtype=torch.uint8).view(count, *_cam.image_format.shape)
    maps, _ = _cam.heatmaps(stored, list(targets))
    return maps


@st.cache_data(max_entries=8, show_spinner=False)
def photo_and_scale(data: bytes) -> tuple[Image.Image, float] | None:
    """The upright photo at most PHOTO_SIDE px and its scale from original pixels (boxes)."""
    from fer_core.images import load_image
    try:
        image = load_image(data, reduce_to=PHOTO_SIDE)
    except FerError:
        return None
    original = image.info.get("original_size", image.size)
    image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
    return image, image.width / original[0]


def _as_stored(faces: Sequence[Image.Image | np.ndarray], image_format) -> np.ndarray:
    """Faces as the model sees them: `pixels.to_stored` in the run's format, uint8."""
    from fer_core.pixels import to_stored
    return np.stack([to_stored(face if isinstance(face, Image.Image) else Image.fromarray(face), image_format)
                     for face in faces])


def _enlarged(face: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(face).resize((side, side), Image.Resampling.NEAREST)


def colour_bar(width: int = FACE_SHOWN_PX + PHOTO_SHOWN_PX, height: int = 12) -> Image.Image:
    """The colour scale, from no evidence (left) to the strongest (right)."""
    from fer_core.explain import heat_colours
    return Image.fromarray(heat_colours(np.tile(np.linspace(0, 1, width), (height, 1))))


def class_picker(classes: Sequence[str], default: int, key: str, notes: dict[int, str]) -> int:
    """A selectbox of class indices (names may hold any character: shown as plain text)."""
    options = list(range(len(classes)))
    if st.session_state.get(key) not in options:
        st.session_state[key] = default
    return st.selectbox("Heat map for", options, key=key,
                        format_func=lambda i: classes[i] + (f" ({notes[i]})" if i in notes else ""),
                        help="The emotion whose evidence is shown: the predicted one first; "
                             "pick another to see what would have spoken for it.")


# ---- Predict: one face ------------------------------------------------------------------------

def explain_face(predictor, model_key: str, face, key: str, photo: bytes | None = None) -> None:
    """The toggle and, when on, the face's heat map over its stored crop (48x48 by default) and
    over its box in the photo (`photo`: the image's bytes; None shows only the crop)."""
    if not st.toggle(TOGGLE_LABEL, key=f"{key}_gradcam", help=TOGGLE_HELP):
        return
    from fer_core.explain import ExplainError, overlay, overlay_on_box
    try:
        cam = predictor_cam(predictor, model_key)
    except ExplainError as exc:
        st.text(str(exc))  # e.g. "Grad-CAM needs the PyTorch checkpoint (.pt)…"
        return
    except FerError as exc:
        st.text(f"Grad-CAM is not available for this model: {exc}")
        return
    classes = cam.class_names
    predicted = classes.index(face.label) if face.label in classes else 0
    target = class_picker(classes, predicted, f"{key}_gradcam_class", {predicted: "predicted"})
    stored = _as_stored([face.crop], cam.image_format)
    heat = heat_maps(cam, model_key, stored.tobytes(), 1, (target,))[0]
    crop_col, photo_col = st.columns(2, vertical_alignment="top")
    side = cam.image_format.size
    with crop_col:
        st.image(overlay(_enlarged(stored[0], FACE_SHOWN_PX), heat),
                 caption=f"On the {side}×{side} face", width=FACE_SHOWN_PX)
    with photo_col:
        shown = photo_and_scale(photo) if photo is not None and face.box is not None else None
        if shown is not None:
            image, scale = shown
            painted = overlay_on_box(image, face.box, heat, scale=scale)
            st.image(painted.crop(around(face.box, scale, painted.size)), caption="On the photo",
                     width=PHOTO_SHOWN_PX, output_format="JPEG")
    _legend(classes[target], cam.layer, empty=not heat.any())


def around(box, scale: float, size: tuple[int, int], context: float = 0.75) -> tuple[int, int, int, int]:
    """The face's box with `context` box sides of the photo around it (clipped to the photo),
    in the pixels of a photo shown at `scale`: where the map lies, with enough to place it."""
    side = max(box.w, box.h) * scale
    cx, cy = (box.x + box.w / 2) * scale, (box.y + box.h / 2) * scale
    half = side * (0.5 + context)
    return (max(0, round(cx - half)), max(0, round(cy - half)),
            min(size[0], round(cx + half)), min(size[1], round(cy + half)))


def _legend(name: str, layer: str, empty: bool = False) -> None:
    if empty:
        st.text(f"Nothing in this face raised the score of {name}: the map is empty.")
    st.image(colour_bar(), caption="no evidence → strongest evidence")
    st.caption(literal(LEGEND.format(name=name)) + f" Layer: {layer}.")


# ---- Evaluate: the faces of one cell ------------------------------------------------------------

def explain_gallery(checkpoint: Path, faces: Sequence[np.ndarray], true_class: str,
                    predicted_class: str, key: str) -> list:
    """The toggle above a confusion-matrix cell's faces and, when it is on, the emotion picker and
    the colour scale; returns what the gallery shows: each face under its heat map (the 48 px
    face the model saw, enlarged), or the faces as given when the toggle is off or Grad-CAM
    cannot run (`checkpoint`: the run's best.pt)."""
    if not faces or not st.toggle("Why? Show Grad-CAM heat maps on these faces", key=f"{key}_gradcam",
                                  help=TOGGLE_HELP):
        return list(faces)
    if not checkpoint.is_file():
        st.text("Grad-CAM needs the run's PyTorch checkpoint (checkpoints/best.pt), and this run "
                "has none.")
        return list(faces)
    try:
        cam = checkpoint_cam(str(checkpoint), checkpoint.stat().st_mtime_ns)
    except (FerError, OSError) as exc:
        st.text(f"Grad-CAM is not available for this run's checkpoint: {exc}")
        return list(faces)
    classes = cam.class_names
    notes: dict[int, str] = {}
    if true_class in classes:
        notes[classes.index(true_class)] = "true"
    if predicted_class in classes:
        index = classes.index(predicted_class)
        notes[index] = "predicted" if index not in notes else "true and predicted"
    default = classes.index(predicted_class) if predicted_class in classes else 0
    target = class_picker(classes, default, f"{key}_gradcam_class", notes)
    from fer_core.explain import overlay
    stored = _as_stored(faces, cam.image_format)
    model_key = f"{checkpoint}:{checkpoint.stat().st_mtime_ns}"
    maps = heat_maps(cam, model_key, stored.tobytes(), len(stored), (target,) * len(stored))
    _legend(classes[target], cam.layer, empty=not maps.any())
    return [overlay(_enlarged(face, GALLERY_PX), heat) for face, heat in zip(stored, maps, strict=True)]
