"""fer_core: train, track, evaluate and serve facial-emotion-recognition models.

Pure Python over PyTorch; never imports streamlit. See README.md for the CLI.
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
