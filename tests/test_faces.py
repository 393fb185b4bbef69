"""Face detection on real faces (skimage's astronaut) placed in harder compositions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage import data

from fer_core import faces
from fer_core.faces import FaceBox, crop_face, detect_faces, non_max_suppression

ASTRONAUT_FACE = FaceBox(177, 66, 95, 95, 1.0, "reference")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def backdrop(width: int, height: int) -> Image.Image:
    """A real face-free photo (skimage's coffee) stretched to size."""
    return Image.fromarray(data.coffee()).resize((width, height), Image.Resampling.BILINEAR)


def head(astronaut: Image.Image, side: int) -> Image.Image:
    """Head and shoulders; the face is about half the side."""
    return astronaut.crop((127, 16, 322, 211)).resize((side, side), Image.Resampling.LANCZOS)


def iou(a: FaceBox, b: FaceBox) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    return ix * iy / (a.w * a.h + b.w * b.h - ix * iy)


def assert_inside(boxes: list[FaceBox], image: Image.Image) -> None:
    for box in boxes:
        assert box.x >= 0 and box.y >= 0 and box.w > 0 and box.h > 0
        assert box.x + box.w <= image.width and box.y + box.h <= image.height


def test_finds_the_astronaut(astronaut: Image.Image) -> None:
    boxes = detect_faces(astronaut)
    assert len(boxes) == 1
    assert_inside(boxes, astronaut)
    assert iou(boxes[0], ASTRONAUT_FACE) > 0.6
    assert 0 < boxes[0].score < 1 and boxes[0].detector == "haar-alt2" and boxes[0].angle == 0


def test_named_detectors_find_the_astronaut(astronaut: Image.Image) -> None:
    assert [b.detector for b in detect_faces(astronaut, detector="haar-alt2")] == ["haar-alt2"]
    boxes = detect_faces(astronaut, detector="haar-default")
    assert any(iou(b, ASTRONAUT_FACE) > 0.5 for b in boxes)
    # the default cascade also "finds" a face on the suit: why alt2 is the default
    assert len(boxes) == 2


def test_boxes_are_in_original_pixels_of_a_large_photo(astronaut: Image.Image) -> None:
    photo = backdrop(2400, 1800)
    photo.paste(astronaut.resize((1024, 1024), Image.Resampling.BICUBIC), (700, 400))
    expected = FaceBox(700 + 177 * 2, 400 + 66 * 2, 190, 190, 1.0, "reference")
    boxes = detect_faces(photo)
    assert len(boxes) == 1 and iou(boxes[0], expected) > 0.5
    assert_inside(boxes, photo)


@pytest.mark.parametrize("colour", [(0, 0, 0), (200, 200, 200), (255, 255, 255)])
def test_blank_images_have_no_faces(colour: tuple[int, int, int]) -> None:
    assert detect_faces(Image.new("RGB", (640, 480), colour)) == []


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (19, 19), (3000, 2)])
def test_tiny_and_thin_images_have_no_faces(size: tuple[int, int]) -> None:
    assert detect_faces(Image.new("RGB", size, (10, 10, 10))) == []


def test_face_free_photo_has_no_faces() -> None:
    assert detect_faces(backdrop(640, 480)) == []


def test_several_faces_largest_first(astronaut: Image.Image) -> None:
    canvas = backdrop(1280, 720)
    for side, x, y in ((300, 40, 200), (240, 480, 120), (200, 900, 330)):
        canvas.paste(head(astronaut, side), (x, y))
    boxes = detect_faces(canvas)
    assert len(boxes) == 3
    assert [b.w for b in boxes] == sorted((b.w for b in boxes), reverse=True)
    assert all(iou(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert_inside(boxes, canvas)


def test_dark_low_contrast_photo(astronaut: Image.Image) -> None:
    dark = ImageEnhance.Contrast(ImageEnhance.Brightness(astronaut).enhance(0.18)).enhance(0.5)
    assert np.asarray(dark.convert("L")).max() < 70
    boxes = detect_faces(dark)
    assert len(boxes) == 1 and iou(boxes[0], ASTRONAUT_FACE) > 0.5


def test_tilted_head_is_found_by_a_rotated_pass(astronaut: Image.Image) -> None:
    canvas = backdrop(640, 480)
    canvas.paste(head(astronaut, 300).rotate(-20, resample=Image.Resampling.BICUBIC,
                                             fillcolor=(120, 120, 120)), (170, 90))
    assert detect_faces(canvas, detector="haar-alt2") == []  # one upright pass misses it
    boxes = detect_faces(canvas)
    assert len(boxes) == 1 and boxes[0].angle == pytest.approx(20.0)
    assert_inside(boxes, canvas)
    cx, cy = boxes[0].center
    assert abs(cx - 320) < 40 and abs(cy - 220) < 50  # the face, in original coordinates
    crop = crop_face(canvas, boxes[0])
    assert crop.width == crop.height


def test_small_face_in_a_large_photo_is_found_by_the_fine_pass(astronaut: Image.Image) -> None:
    photo = backdrop(2400, 1800)
    photo.paste(head(astronaut, 150), (1500, 600))  # a ~73 px face: 10 px in the fast pass
    boxes = detect_faces(photo)
    assert len(boxes) == 1 and boxes[0].detector.endswith("@fine")
    assert 1500 < boxes[0].center[0] < 1650 and 600 < boxes[0].center[1] < 750


def test_min_face_size_ignores_smaller_faces(astronaut: Image.Image) -> None:
    assert len(detect_faces(astronaut, min_face_size=80)) == 1
    assert detect_faces(astronaut, min_face_size=200) == []


def test_grey_input_and_bad_arguments(astronaut: Image.Image) -> None:
    assert len(detect_faces(astronaut.convert("L"))) == 1
    with pytest.raises(ValueError, match="detector"):
        detect_faces(astronaut, detector="mediapipe")
    with pytest.raises(ValueError, match="min_face_size"):
        detect_faces(astronaut, min_face_size=0)


def test_detection_is_thread_safe_and_deterministic(astronaut: Image.Image) -> None:
    expected = detect_faces(astronaut)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: detect_faces(astronaut), range(8)))
    assert all(result == expected for result in results)


def test_cascade_is_loaded_once_per_thread() -> None:
    assert faces._cascade("alt2") is faces._cascade("alt2")


def test_non_max_suppression_merges_duplicates() -> None:
    a = FaceBox(10, 10, 100, 100, 0.9, "x")
    near = FaceBox(15, 12, 100, 100, 0.5, "x")
    nested = FaceBox(30, 30, 50, 50, 0.95, "x")
    apart = FaceBox(300, 10, 100, 100, 0.4, "x")
    kept = non_max_suppression([near, a, apart, nested])
    assert apart in kept and len(kept) == 2


# --------------------------------------------------------------------------- cropping

def test_crop_is_a_centred_square_with_margin(astronaut: Image.Image) -> None:
    crop = crop_face(astronaut, ASTRONAUT_FACE, margin=0.2)
    assert crop.size == (133, 133)  # 95 * 1.4
    assert crop_face(astronaut, ASTRONAUT_FACE, margin=0.0).size == (95, 95)


def test_crop_near_the_edge_stays_square_and_inside() -> None:
    image = Image.new("RGB", (200, 100))
    corner = FaceBox(0, 0, 40, 40, 1.0, "x")
    crop = crop_face(image, corner, margin=0.5)
    assert crop.size == (40, 40)  # no room for a margin: the box itself
    edge = FaceBox(150, 30, 40, 40, 1.0, "x")
    assert crop_face(image, edge, margin=0.5).size == (60, 60)  # margin shrunk to fit


def test_crop_rejects_negative_margin(astronaut: Image.Image) -> None:
    with pytest.raises(ValueError):
        crop_face(astronaut, ASTRONAUT_FACE, margin=-0.1)
