"""Boxes and labels drawn on a photo: on a group photo no label may cover another (issue #11.9)."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from fer_core.annotate import annotate, intersects, place_labels
from fer_core.faces import FaceBox
from fer_core.predict import FacePrediction, PredictionResult


def group_photo_result(boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> PredictionResult:
    crop = Image.new("L", (48, 48))
    faces = [FacePrediction(box=FaceBox(x, y, w, h, score=1.0, detector="test"),
                            probabilities={"happy": 0.42, "fear": 0.58},
                            top_k=[("fear", 0.58), ("happy", 0.42)], uncertain=False, crop=crop)
             for x, y, w, h in boxes]
    return PredictionResult(source="group.jpg", faces=faces, face_found=True, message="5 faces found",
                            image_size=size)


FIVE_CLOSE = [(100, 60, 70, 70), (160, 70, 70, 70), (220, 55, 70, 70), (130, 140, 70, 70),
              (200, 150, 70, 70)]  # a tight group: boxes touch and overlap, as on the reported photo


@pytest.mark.parametrize("boxes", [
    FIVE_CLOSE,
    [(x, 10, 40, 40) for x in range(0, 400, 42)],            # a row of small faces along the top edge
    [(150, 150, 60, 60)] * 4,                                 # the detector returned the same box 4 times
])
def test_labels_of_faces_close_together_never_overlap(boxes):
    width, height = 480, 320
    rects = place_labels([(x, y, x + w, y + h) for x, y, w, h in boxes], [(120, 24)] * len(boxes),
                         width, height)
    assert len(rects) == len(boxes)
    for a, b in itertools.combinations(rects, 2):
        assert not intersects(a, b), (a, b)
    assert all(0 <= r[0] and r[2] <= width and r[1] >= 0 for r in rects)


def test_labels_that_find_no_room_go_below_the_photo_and_the_image_grows():
    boxes = [(0, 0, 100, 100)] * 6   # a tiny photo and six labels: no room inside it
    rects = place_labels(boxes, [(90, 30)] * 6, 100, 100)
    for a, b in itertools.combinations(rects, 2):
        assert not intersects(a, b)
    assert max(r[3] for r in rects) > 100

    photo = Image.new("RGB", (480, 320), "grey")
    drawn = annotate(photo, group_photo_result(FIVE_CLOSE, (480, 320)), "#4f46e5", "#d97706")
    assert drawn.width == 480 and drawn.height >= 320
    assert drawn.tobytes() != photo.tobytes()  # boxes and labels were drawn
