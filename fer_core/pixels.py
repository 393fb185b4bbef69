"""How any picture becomes the uint8 face a model is fed: a photo, a face crop or a dataset file.

The conversion rules, in order: honour EXIF orientation; composite transparency on white;
scale 16/32-bit and float grey to 8 bits by the range of their type (min-max only when the
values exceed it); convert to grey (or RGB); crop the centre square; resize bilinearly to the
stored side. The stored format (`ImageFormat`: 48 px grey by default, FER2013's own) is a
training choice recorded in the run's config, so prediction and export follow the run.

Pillow and numpy only: the processes that decode a large dataset import this module (and
`store`) and nothing heavier, so each costs tens of megabytes, not a copy of torch.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .image_format import DEFAULT_FORMAT, ImageFormat

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
MAX_SOURCE_PIXELS = 40_000_000
DECODE_SIDE = 1600
"""Large JPEGs decode at 1/2-1/8 scale down to this longest side, in datasets as in photos: the
DCT scaling changes pixels, so both paths must use the same scale to give the same crop. Face
detection never looks at more (its fallback works at 1280)."""

_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "PA", "LA", "La", "RGBa")
_SIXTEEN_BIT_FULL = 65535.0


def reduce_jpeg_decode(image: Image.Image, longest_side: int | None = DECODE_SIDE) -> None:
    """Before `load()`: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (much faster)
    while its longest side stays >= `longest_side`. Other formats are left alone."""
    width, height = image.size
    if longest_side and image.format == "JPEG" and max(width, height) > longest_side:
        ratio = longest_side / max(width, height)
        # the image's own mode: a grey draft would let libjpeg, not Pillow, compute the grey
        image.draft(image.mode, (math.ceil(width * ratio), math.ceil(height * ratio)))


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        if image.getexif().get(_ORIENTATION, 1) == 1:
            return image  # exif_transpose would copy every pixel for nothing
        turned = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user the picture
        return image
    return turned if turned is not None else image


def flatten(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit "L" or "RGB" without alpha, by the rules in the module docstring.

    "L" results turn into RGB and back into the same grey values (Pillow's grey weights sum
    to one exactly), so a photo decoded to RGB and a dataset file give the same crop.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if (mode == "P" and "transparency" in image.info) or mode in _ALPHA_MODES:
        return on_white(image.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return high_depth_to_grey(image)
    return image.convert("RGB")


def on_white(rgba: Image.Image) -> Image.Image:
    """Composite onto white: transparent areas of logos and stickers are meant as background."""
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def high_depth_to_grey(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit "L" (Pillow's own convert would clip at 255).

    Scaled by the range of the type, as a photo's sample values mean: 0..65535 for integer
    modes (16-bit PNG, TIFF and PGM open as I;16 or I), 0..1 for float. A dark 16-bit photo
    stays dark. Values outside that range (negative, beyond 16 bits, float beyond 1) carry
    no known scale, so they are stretched from their minimum to their maximum.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    full = 1.0 if image.mode == "F" else _SIXTEEN_BIT_FULL
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= full:
        scaled = values * (255.0 / full)
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8 is "L"


def to_stored(image: Image.Image, image_format: ImageFormat = DEFAULT_FORMAT) -> np.ndarray:
    """Any PIL image (a dataset file, a photo, a face crop) -> the uint8 array the model is fed:
    upright, flattened, grey or RGB, centre square, bilinear resize to the stored side."""
    side = image_format.size
    converted = flatten(upright(image)).convert("L" if image_format.colour == "grey" else "RGB")
    if converted.size != (side, side):
        converted = ImageOps.fit(converted, (side, side), method=Image.Resampling.BILINEAR)
    return np.asarray(converted, dtype=np.uint8).copy()


def decode_file(path: Path, image_format: ImageFormat = DEFAULT_FORMAT) -> tuple[np.ndarray | None, str | None]:
    """Decode one image file to its stored uint8 array, or return why it cannot be used.

    The pixels are `to_stored`'s, exactly what a photo of the same file gives the
    model at prediction time.
    """
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None, f"not an image file extension ({path.suffix or 'none'})"
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_SOURCE_PIXELS:
                    return None, f"image too large ({image.width}x{image.height})"
                reduce_jpeg_decode(image)  # the photo path's decode scale, so the pixels match
                return to_stored(image, image_format), None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"not a readable image ({type(exc).__name__})"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"unreadable ({str(exc).splitlines()[0][:120]})"
