"""How faces are stored: side in pixels and colour, one value type shared by datasets, runs,
prediction and export.

Kept free of torch and PIL so that the config (and with it `fer --help` and every refused
flag) loads in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STORE_SIZE = 48
"""Default side of the stored uint8 faces: FER2013's native 48 px."""
COLOURS = ("grey", "rgb")


@dataclass(frozen=True)
class ImageFormat:
    """How faces are stored, in datasets and in prediction crops alike: side in pixels and
    colour. Grey arrays are (side, side); RGB arrays are (side, side, 3), PIL's own layout."""

    size: int = STORE_SIZE
    colour: str = "grey"

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOURS}, got {self.colour!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 16 <= self.size <= 512:
            raise ValueError(f"stored image size must be an integer from 16 to 512 px, got {self.size!r}")

    @property
    def channels(self) -> int:
        return 1 if self.colour == "grey" else 3

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size, self.size) if self.colour == "grey" else (self.size, self.size, 3)

    def empty_batch(self) -> "torch.Tensor":
        import torch

        return torch.empty((0, *self.shape), dtype=torch.uint8)

    @classmethod
    def of(cls, config: Mapping | object) -> ImageFormat:
        """The format a run's config (a TrainConfig, or a checkpoint's config dict) names; runs
        from before the choice existed were 48 px grey."""
        get = config.get if isinstance(config, Mapping) else lambda key, default: getattr(config, key, default)
        return cls(size=get("store_size", STORE_SIZE), colour=get("colour", "grey"))


DEFAULT_FORMAT = ImageFormat()
"""48 px grey: FER2013's own format, and every run's before the choice existed."""
