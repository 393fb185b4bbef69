"""Built-in synthetic demo dataset: procedurally drawn grey faces, one folder per emotion.

It lets the app and the CLI be tried offline with no download. Each expression is a point in a
small space of facial parameters (brow height and slant, eye opening, mouth curve, width,
opening, asymmetry, nose wrinkle, cheek raise). An image moves from the neutral point towards
its class by a random intensity and adds per-face jitter, so weak expressions overlap their
neighbours (fear/surprise, sad/neutral, angry/disgust) and a model cannot reach 100%.

Output is bit-identical for the same (per_class, seed): every image draws from its own RNG
seeded by (seed, class index, image index).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import CLASS_NAMES, settings
from .errors import DataError

IMAGE_SIZE = 48
DEFAULT_PER_CLASS = 250
MARKER_NAME = "DEMO_DATASET.json"
# Bump whenever the drawing changes, so cached datasets made by older code are regenerated.
DEMO_VERSION = 2

_SCALE = 4  # faces are drawn at 4x and downsampled, which antialiases every stroke
_CANVAS = IMAGE_SIZE * _SCALE
_DESCRIPTION = ("Synthetic demo data: procedurally drawn cartoon faces, generated offline by "
                "fer_core.demo. Not photographs; results on it say nothing about real faces.")


@dataclass(frozen=True)
class _Expression:
    """Facial parameters; the neutral face is all defaults."""

    brow_raise: float = 0.0     # + raises both brows
    brow_slant: float = 0.0     # + raises the inner ends (sad, fear); - lowers them (angry)
    brow_arch: float = 0.2      # curvature of each brow
    eye_open: float = 1.0       # vertical opening relative to a relaxed eye
    mouth_curve: float = 0.0    # + corners up (smile); - corners down
    mouth_width: float = 1.0
    mouth_open: float = 0.0     # 0 closed line ... 1 wide open
    mouth_asym: float = 0.0     # one-sided raised upper lip and wavy line (disgust)
    nose_wrinkle: float = 0.0
    cheek_raise: float = 0.0    # nasolabial folds and lifted cheeks (happy)


_NEUTRAL = _Expression()
# Targets at full intensity. Neighbouring classes share components on purpose (fear and
# surprise both raise brows and widen eyes), which is what makes weak expressions ambiguous.
_TARGETS: dict[str, _Expression] = {
    "angry": _Expression(brow_raise=-0.9, brow_slant=-1.0, brow_arch=0.0, eye_open=0.6,
                         mouth_curve=-0.25, mouth_width=0.8),
    "disgust": _Expression(brow_raise=-0.6, brow_slant=-0.4, eye_open=0.7, mouth_curve=-0.35,
                           mouth_open=0.2, mouth_asym=1.2, nose_wrinkle=1.2),
    "fear": _Expression(brow_raise=0.9, brow_slant=0.9, brow_arch=0.1, eye_open=1.6,
                        mouth_curve=-0.3, mouth_width=1.35, mouth_open=0.55),
    "happy": _Expression(eye_open=0.8, mouth_curve=1.0, mouth_width=1.2, cheek_raise=1.0),
    "neutral": _NEUTRAL,
    "sad": _Expression(brow_raise=0.15, brow_slant=1.0, eye_open=0.8, mouth_curve=-0.9,
                       mouth_width=0.9),
    "surprise": _Expression(brow_raise=1.2, brow_arch=1.0, eye_open=1.7, mouth_width=0.55,
                            mouth_open=1.1),
}
# Per-face jitter of each parameter (in parameter units), independent of the class.
_JITTER: dict[str, float] = {
    "brow_raise": 0.15, "brow_slant": 0.15, "brow_arch": 0.15, "eye_open": 0.12,
    "mouth_curve": 0.15, "mouth_width": 0.1, "mouth_open": 0.06, "mouth_asym": 0.1,
    "nose_wrinkle": 0.1, "cheek_raise": 0.1,
}
_INTENSITY = (0.55, 1.0)


# --------------------------------------------------------------------------- public API


def demo_dataset_dir() -> Path:
    """Where the default demo dataset lives: $FER_DEMO_DIR, else <repo root>/data/demo."""
    return settings.demo_dir()


def ensure_demo_dataset(per_class: int = DEFAULT_PER_CLASS, seed: int = 0) -> Path:
    """Generate the default demo dataset if it is missing or stale; return its folder."""
    return generate_demo_dataset(demo_dataset_dir(), per_class=per_class, seed=seed)


def generate_demo_dataset(dest: Path, per_class: int = DEFAULT_PER_CLASS, seed: int = 0) -> Path:
    """Write `dest/<class>/<class>_<index:04d>.png` (48x48 grey) for every class; return dest.

    A no-op when dest already holds a complete dataset with the same per_class and seed.
    The data is built in a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a partial dataset at dest.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    dest = Path(dest)
    marker = _marker(per_class, seed)
    if _is_complete(dest, marker):
        return dest
    _check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for class_idx, name in enumerate(CLASS_NAMES):
            class_dir = tmp / name
            class_dir.mkdir()
            for index in range(per_class):
                image = render_face(name, seed, class_idx, index)
                image.save(class_dir / f"{name}_{index:04d}.png", optimize=False)
        # The marker goes in last: its presence is what declares the folder complete.
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, dest, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def render_face(class_name: str, seed: int, class_idx: int, index: int) -> Image.Image:
    """Draw one 48x48 "L" face of `class_name`, fully determined by its three seeds."""
    rng = np.random.default_rng([seed, class_idx, index])
    expr = _sample_expression(class_name, rng)
    big = _background(rng)
    face, mask = _draw_face(expr, rng)
    matrix = _pose_matrix(rng)
    face = face.transform(big.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)
    mask = mask.transform(big.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)
    big.paste(face, (0, 0), mask)
    small = big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    blur = float(rng.uniform(0.0, 0.8))
    if blur > 0.25:
        small = small.filter(ImageFilter.GaussianBlur(blur))
    return Image.fromarray(_photometric(np.asarray(small, dtype=np.float32), rng), mode="L")


# --------------------------------------------------------------------------- dataset files


def _marker(per_class: int, seed: int) -> dict[str, object]:
    return {
        "version": DEMO_VERSION, "per_class": per_class, "seed": seed, "synthetic": True,
        "description": _DESCRIPTION, "classes": list(CLASS_NAMES), "image_size": IMAGE_SIZE,
    }


def _read_marker(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(dest: Path, marker: dict[str, object]) -> bool:
    found = _read_marker(dest)
    return found is not None and all(found.get(k) == marker[k]
                                     for k in ("version", "per_class", "seed", "classes"))


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace a folder that is not ours: dest may be a user's real dataset."""
    if dest.exists() and not dest.is_dir():
        raise DataError(f"{dest} exists and is not a folder; cannot write the demo dataset there.")
    if dest.is_dir() and any(dest.iterdir()) and _read_marker(dest) is None:
        raise DataError(f"{dest} already holds files that are not a demo dataset; "
                        "choose an empty folder for the demo data.")


def _move_into_place(tmp: Path, dest: Path, marker: dict[str, object]) -> None:
    """Rename tmp to dest; an older demo dataset at dest is moved aside first and deleted."""
    if _is_complete(dest, marker):
        return  # another process finished the same dataset while we were drawing
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / "data")  # renaming a non-empty folder onto dest would fail
    try:
        os.replace(tmp, dest)
    except OSError:
        if not _is_complete(dest, marker):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- sampling


def _sample_expression(class_name: str, rng: np.random.Generator) -> _Expression:
    """Interpolate from neutral towards the class target by a random intensity, plus jitter."""
    target = _TARGETS[class_name]
    intensity = float(rng.uniform(*_INTENSITY))
    values: dict[str, float] = {}
    for f in fields(_Expression):
        base, goal = getattr(_NEUTRAL, f.name), getattr(target, f.name)
        values[f.name] = base + intensity * (goal - base) + float(rng.normal(0.0, _JITTER[f.name]))
    # Some happy faces are an open laugh showing teeth rather than a closed smile.
    laugh = float(rng.uniform(0.0, 1.0))
    if class_name == "happy" and laugh < 0.4:
        values["mouth_open"] += intensity * 0.6
    values["mouth_open"] = max(0.0, values["mouth_open"])
    values["mouth_asym"] = max(0.0, values["mouth_asym"])
    values["nose_wrinkle"] = max(0.0, values["nose_wrinkle"])
    values["cheek_raise"] = max(0.0, values["cheek_raise"])
    values["eye_open"] = max(0.25, values["eye_open"])
    values["mouth_width"] = max(0.4, values["mouth_width"])
    return _Expression(**values)


def _pose_matrix(rng: np.random.Generator) -> tuple[float, ...]:
    """Inverse affine map (output -> input pixel) for PIL: rotation, scale, yaw squash, shift."""
    angle = math.radians(rng.uniform(-15.0, 15.0))
    scale = rng.uniform(0.85, 1.15)
    squash = rng.uniform(0.85, 1.0)  # a turned head looks narrower
    tx, ty = rng.uniform(-0.05, 0.05, size=2) * _CANVAS
    c = _CANVAS / 2
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = scale * squash, scale
    # forward: out = R @ diag(sx, sy) @ (in - c) + c + t; PIL wants the inverse.
    a, b = cos / sx, sin / sx
    d, e = -sin / sy, cos / sy
    ox, oy = -(c + tx), -(c + ty)
    return (a, b, a * ox + b * oy + c, d, e, d * ox + e * oy + c)


# --------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator) -> Image.Image:
    """A linear grey gradient in a random direction with a few random shapes as clutter."""
    ys, xs = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32) / _CANVAS - 0.5
    theta = rng.uniform(0, 2 * math.pi)
    level, slope = rng.uniform(40, 215), rng.uniform(-80, 80)
    grad = level + slope * (xs * math.cos(theta) + ys * math.sin(theta))
    img = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-20, _CANVAS, size=2)
        w, h = rng.uniform(15, 90, size=2)
        # Low contrast against the background, so clutter never outshines the face.
        grey = int(np.clip(level + rng.uniform(-60, 60), 0, 255))
        kind = int(rng.integers(0, 3))
        box = (x0, y0, x0 + w, y0 + h)
        if kind == 0:
            draw.rectangle(box, fill=grey)
        elif kind == 1:
            draw.ellipse(box, fill=grey)
        else:
            draw.line(box, fill=grey, width=int(rng.integers(3, 12)))
    return img


@dataclass(frozen=True)
class _Layout:
    """Per-face geometry at 4x scale, in canonical (upright, centred) coordinates."""

    cx: float
    skin: int
    ink: int           # colour of dark strokes (brows, lid lines, lips)
    eye_dx: float      # half distance between the eyes
    eye_y: float
    eye_w: float
    eye_h: float
    brow_y: float
    brow_w: float
    mouth_y: float
    mouth_w: float
    nose_y: float
    stroke: int


def _draw_face(expr: _Expression, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Return (face, mask) on a canvas-sized pair of "L" images."""
    c = _CANVAS / 2
    skin = int(rng.integers(100, 230))
    # Strokes stay visibly darker than the skin even for dark skin, but by a random margin.
    ink = int(max(0, skin - rng.uniform(70, 130)))
    face_w, face_h = rng.uniform(0.34, 0.40) * _CANVAS, rng.uniform(0.43, 0.49) * _CANVAS
    lay = _Layout(
        cx=c, skin=skin, ink=ink,
        eye_dx=rng.uniform(0.36, 0.44) * face_w, eye_y=c - rng.uniform(0.12, 0.20) * face_h,
        eye_w=rng.uniform(0.30, 0.36) * face_w, eye_h=rng.uniform(0.17, 0.21) * face_w,
        brow_y=c - rng.uniform(0.38, 0.44) * face_h, brow_w=rng.uniform(0.30, 0.38) * face_w,
        mouth_y=c + rng.uniform(0.42, 0.50) * face_h, mouth_w=rng.uniform(0.32, 0.40) * face_w,
        nose_y=c + rng.uniform(0.15, 0.22) * face_h, stroke=int(rng.integers(8, 11)),
    )
    face = Image.new("L", (_CANVAS, _CANVAS), 0)
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    oval = (c - face_w, c - face_h, c + face_w, c + face_h)
    ImageDraw.Draw(mask).ellipse(oval, fill=255)
    draw = ImageDraw.Draw(face)
    draw.ellipse(oval, fill=skin, outline=max(0, skin - 40), width=3)
    _draw_hair(draw, oval, rng)
    _draw_cheeks(draw, lay, expr)
    _draw_nose(draw, lay, expr)
    _draw_eyes(draw, lay, expr, rng)
    _draw_brows(draw, lay, expr)
    _draw_mouth(draw, lay, expr, rng)
    return face, mask


def _draw_hair(draw: ImageDraw.ImageDraw, oval: tuple[float, ...],
               rng: np.random.Generator) -> None:
    """A hair cap over the top of the oval, of random darkness and depth (or none)."""
    style = float(rng.uniform(0, 1))
    grey = int(rng.integers(10, 120))
    x0, y0, x1, y1 = oval
    depth = rng.uniform(0.06, 0.14) * (y1 - y0)
    if style < 0.75:  # some faces are bald, which also varies the forehead
        draw.chord((x0, y0, x1, y0 + 2 * depth + (y1 - y0) * 0.1), 180, 360, fill=grey)


def _draw_brows(draw: ImageDraw.ImageDraw, lay: _Layout, expr: _Expression) -> None:
    """Each brow is a 3-point polyline from its inner end to its outer end."""
    lift = expr.brow_raise * lay.eye_h * 1.0
    slant = expr.brow_slant * lay.eye_h * 0.8
    arch = expr.brow_arch * lay.eye_h * 0.6
    for side in (-1, 1):
        inner_x = lay.cx + side * (lay.eye_dx - lay.brow_w * 0.45)
        outer_x = lay.cx + side * (lay.eye_dx + lay.brow_w * 0.55)
        y = lay.brow_y - lift
        inner = (inner_x, y - slant)
        outer = (outer_x, y + slant * 0.4)
        mid = ((inner_x + outer_x) / 2, y - slant * 0.3 - arch)
        draw.line([inner, mid, outer], fill=lay.ink, width=lay.stroke + 3, joint="curve")


def _draw_eyes(draw: ImageDraw.ImageDraw, lay: _Layout, expr: _Expression,
               rng: np.random.Generator) -> None:
    """Light sclera ellipse, a dark iris squashed to fit the opening, and an upper lid line."""
    half_h = lay.eye_h * expr.eye_open * 0.5
    sclera = int(min(255, lay.skin + rng.uniform(20, 60)))
    gaze = rng.uniform(-0.25, 0.25) * lay.eye_w
    for side in (-1, 1):
        x = lay.cx + side * lay.eye_dx
        w = lay.eye_w / 2 * (1.0 + 0.1 * (expr.eye_open - 1))
        draw.ellipse((x - w, lay.eye_y - half_h, x + w, lay.eye_y + half_h), fill=sclera)
        r = lay.eye_h * 0.4
        ir_h = min(r, half_h)
        draw.ellipse((x + gaze - r, lay.eye_y - ir_h, x + gaze + r, lay.eye_y + ir_h), fill=lay.ink)
        draw.arc((x - w, lay.eye_y - half_h, x + w, lay.eye_y + half_h), 180, 360,
                 fill=lay.ink, width=max(3, lay.stroke - 2))


def _draw_nose(draw: ImageDraw.ImageDraw, lay: _Layout, expr: _Expression) -> None:
    """Nostril hint, plus horizontal wrinkle lines on the bridge when wrinkled (disgust)."""
    shade = max(0, lay.skin - 45)
    w = lay.eye_w * 0.35
    draw.arc((lay.cx - w, lay.nose_y - w * 0.6, lay.cx + w, lay.nose_y + w * 0.6), 20, 160,
             fill=shade, width=3)
    lines = min(3, int(round(expr.nose_wrinkle * 3)))
    for i in range(lines):
        y = lay.eye_y + (i - 0.5) * lay.eye_h * 0.6
        draw.arc((lay.cx - w, y - w * 0.4, lay.cx + w, y + w * 0.4), 200, 340,
                 fill=max(0, lay.skin - 60), width=3)


def _draw_cheeks(draw: ImageDraw.ImageDraw, lay: _Layout, expr: _Expression) -> None:
    """Nasolabial folds from beside the nose towards the mouth corners (smiles, sneers)."""
    strength = max(expr.cheek_raise, 0.6 * expr.nose_wrinkle)
    if strength < 0.3:
        return
    shade = int(max(0, lay.skin - 25 - 30 * min(strength, 1.5)))
    for side in (-1, 1):
        top = (lay.cx + side * lay.eye_w * 0.55, lay.nose_y - lay.eye_h * 0.3)
        mid = (lay.cx + side * lay.mouth_w * 1.05, lay.nose_y + (lay.mouth_y - lay.nose_y) * 0.5)
        bottom = (lay.cx + side * lay.mouth_w * 1.15, lay.mouth_y + lay.eye_h * 0.2)
        draw.line([top, mid, bottom], fill=shade, width=3, joint="curve")


def _draw_mouth(draw: ImageDraw.ImageDraw, lay: _Layout, expr: _Expression,
                rng: np.random.Generator) -> None:
    """Mouth from a centre curve y(x) and an opening h(x); open mouths show a dark interior."""
    half_w = lay.mouth_w * expr.mouth_width
    side = 1 if rng.uniform(0, 1) < 0.5 else -1  # which side a sneer lifts
    xs = np.linspace(-1.0, 1.0, 25)
    centre = (lay.mouth_y - expr.mouth_curve * lay.eye_h * 1.6 * xs ** 2
              - expr.mouth_asym * lay.eye_h * 0.5 * np.clip(side * xs, 0, None)
              + expr.mouth_asym * lay.eye_h * 0.15 * np.sin(3 * math.pi * xs))
    opening = expr.mouth_open * lay.eye_h * 1.8 * np.sqrt(np.clip(1 - xs ** 2, 0, None))
    # A sneer lifts only the upper lip on one side, baring teeth there.
    sneer = expr.mouth_asym * lay.eye_h * 0.5 * np.clip(side * xs, 0, None) ** 1.5
    upper = centre - 0.45 * opening - sneer
    lower = centre + 0.55 * opening
    px = lay.cx + xs * half_w
    if float(opening.max() + sneer.max()) < lay.stroke * 0.8:
        draw.line(list(zip(px, centre)), fill=lay.ink, width=lay.stroke, joint="curve")
        return
    outline = list(zip(px, upper)) + list(zip(px[::-1], lower[::-1]))
    draw.polygon(outline, fill=max(0, lay.ink - 30))
    if expr.mouth_curve > 0.4 or expr.mouth_asym > 0.4:
        teeth = int(min(255, lay.skin + 40))
        band = upper + np.minimum(0.3 * (lower - upper), lay.eye_h * 0.4)
        draw.polygon(list(zip(px, upper)) + list(zip(px[::-1], band[::-1])), fill=teeth)
    draw.line(outline + [outline[0]], fill=lay.ink, width=max(3, lay.stroke - 2), joint="curve")


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, global brightness/contrast and Gaussian noise on the 48 px image."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE - 0.5
    theta = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(0.0, 0.5) * (xs * math.cos(theta) + ys * math.sin(theta))
    contrast, brightness = rng.uniform(0.8, 1.25), rng.uniform(-25, 25)
    img = (img * light - 128.0) * contrast + 128.0 + brightness
    img = img + rng.normal(0.0, rng.uniform(2.0, 6.0), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
