"""Draw a prediction on its photo: a box per face and a '<n> <emotion> <p>%' label that never
covers another label (issue #11 item 9: on group photos labels used to collide).

Labels go next to their face (above, below, inside the top or bottom edge, then further away
with a leader line); one that finds no free place in the photo goes on a strip added below it.
Pure PIL: no Streamlit, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .predict import PredictionResult

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1
STRIP_COLOUR = "#f1f5f9"
LINE_COLOUR = "white"


def intersects(a: Rect, b: Rect) -> bool:
    """Whether two rectangles share any area (touching edges do not count)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _candidates(box: Rect, w: float, h: float, width: float, height: float) -> list[Rect]:
    """Places for a w x h label near `box`, nearest first, inside the width x height canvas."""
    x0, y0, x1, y1 = box
    rows = [y0 - h, y1, y0, y1 - h]
    steps = int(height // max(h, 1)) + 1
    for k in range(1, steps):  # further away, alternately above and below
        rows += [y0 - h - k * h, y1 + k * h]
    columns = [x0, x1 - w, (x0 + x1 - w) / 2]
    columns += [x0 + k * w for k in (1, -1, 2, -2)]
    found, seen = [], set()
    for top in rows:
        if top < 0 or top + h > height:
            continue
        for left in columns:
            left = max(0.0, min(left, width - w))
            rect = (left, top, left + w, top + h)
            if rect not in seen:
                seen.add(rect)
                found.append(rect)
    return found


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], width: float,
                 height: float) -> list[Rect]:
    """A rectangle for each label (w, h) of each box, none overlapping another.

    First choice: near its own box without covering any other face; then anywhere free of
    other labels; failing both, a row of its own below the canvas (y >= height), so the caller
    extends the image to the largest bottom returned.
    """
    placed: list[Rect] = []
    strip_top = float(height)
    for index, (box, (w, h)) in enumerate(zip(boxes, sizes, strict=True)):
        others = [b for i, b in enumerate(boxes) if i != index]
        options = _candidates(box, w, h, width, height)
        rect = next((r for r in options if not any(intersects(r, p) for p in placed)
                     and not any(intersects(r, b) for b in others)), None)
        if rect is None:
            rect = next((r for r in options if not any(intersects(r, p) for p in placed)), None)
        if rect is None:
            rect = (0.0, strip_top, float(w), strip_top + h)
            strip_top += h
        placed.append(rect)
    return placed


def label_text(number: int, face) -> str:
    return f"{number} {face.label} {face.confidence:.0%}" + (" ?" if face.uncertain else "")


def annotate(image: Image.Image, result: PredictionResult, colour: str,
             uncertain_colour: str) -> Image.Image:
    """A copy of `image` (taller when labels needed a strip below it) with each face's box and
    label drawn; the image itself when no face was found."""
    out = image.copy().convert("RGB")
    faces = [(n, f) for n, f in enumerate(result.faces, start=1) if f.box is not None]
    if not result.face_found or not result.image_size or not faces:
        return out
    sx, sy = out.width / result.image_size[0], out.height / result.image_size[1]
    line = max(2, round(max(out.size) / 250))
    font = ImageFont.load_default(size=max(14, round(max(out.size) / 30)))
    pad = line + 2
    measure = ImageDraw.Draw(out)
    boxes, sizes, texts = [], [], []
    for number, face in faces:
        boxes.append((face.box.x * sx, face.box.y * sy, (face.box.x + face.box.w) * sx,
                      (face.box.y + face.box.h) * sy))
        text = label_text(number, face)
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
        texts.append((text, left, top))
    rects = place_labels(boxes, sizes, out.width, out.height)
    bottom = max(out.height, int(max(r[3] for r in rects) + 0.999))
    if bottom > out.height:
        canvas = Image.new("RGB", (out.width, bottom), STRIP_COLOUR)
        canvas.paste(out, (0, 0))
        out = canvas
    draw = ImageDraw.Draw(out)
    colours = [uncertain_colour if face.uncertain else colour for _, face in faces]
    for box, tint in zip(boxes, colours):
        draw.rectangle(box, outline=tint, width=line)
    for box, rect, tint in zip(boxes, rects, colours):
        if not _touches(rect, box):  # moved away from its face: a leader line shows whose it is
            centre = ((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)
            target = (min(max(centre[0], box[0]), box[2]), min(max(centre[1], box[1]), box[3]))
            draw.line((centre, target), fill=tint, width=max(1, line // 2))
    for rect, tint, (text, left, top) in zip(rects, colours, texts):
        draw.rectangle(rect, fill=tint)
        draw.text((rect[0] + pad - left, rect[1] + pad - top), text, fill=LINE_COLOUR, font=font)
    return out


def _touches(rect: Rect, box: Rect) -> bool:
    return rect[0] <= box[2] and box[0] <= rect[2] and rect[1] <= box[3] and box[1] <= rect[3]
