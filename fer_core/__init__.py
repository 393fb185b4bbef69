"""fer_core: train, track, evaluate and serve facial-emotion-recognition models.

Pure Python over PyTorch; never imports streamlit. See README.md for the CLI.
"""

__version__ = "0.1.0"

from .classes import CLASS_NAMES  # noqa: E402  (the canonical seven, defined with their aliases)

__all__ = ["CLASS_NAMES", "__version__"]
