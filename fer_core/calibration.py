"""Calibrated confidence: temperature scaling fitted on the validation split, the threshold
below which a prediction is flagged uncertain, and the scores that show what it changed
(expected calibration error, negative log-likelihood, reliability bins) on the test split.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one number T > 0 fitted to minimise the validation negative log-likelihood; the
predicted class never changes, only how sure the model claims to be. Softmax probabilities are
enough to apply it: log p differs from the logits by one constant per row, which the softmax
ignores, so softmax(log p / T) = softmax(z / T). Every backend (PyTorch, ONNX Runtime with the
softmax inside the graph) and test-time-augmented averages are calibrated the same way.

A run's calibration lives in `calibration.json` (this module is its only writer) and, as
`{"temperature", "uncertain_below", ...}`, in its best.pt and the published checkpoint, which
is what `Predictor` reads.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import FerError
from .runs import is_finite_number

BINS = 15
"""Equal-width confidence bins of the expected calibration error and the reliability diagram."""
MIN_PROBABILITY = 1e-12  # log(0) guard: a stored probability may be rounded to 0
LOG_TEMPERATURE_BOUNDS = (math.log(0.05), math.log(20.0))
MORE_OFTEN_WRONG = 0.5
"""Readings this sure were right less often than this on the validation split (the fitted rate)."""
UNCERTAIN_RULE = "isotonic"
"""calibration.json's name for how `uncertain_threshold` chose the threshold; reports without
it were chosen by the rule before it (the faces below the cut, taken together)."""

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What prediction needs: the temperature, and the calibrated confidence below which a
    prediction is flagged uncertain, both fitted on `images` validation faces."""

    temperature: float
    uncertain_below: float
    images: int
    fitted_on: str = "validation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Calibration | None:
        """The calibration recorded in a checkpoint or model card; None when there is none or it
        does not hold together (an uncalibrated model is used as it is, never wrongly scaled)."""
        if not isinstance(values, dict):
            return None
        temperature, threshold = values.get("temperature"), values.get("uncertain_below")
        if not (is_finite_number(temperature) and is_finite_number(threshold)):
            return None
        if temperature <= 0 or not 0.0 <= threshold <= 1.0:
            return None
        images = values.get("images")
        return cls(float(temperature), float(threshold), int(images) if isinstance(images, int) else 0,
                   str(values.get("fitted_on", "validation")))


# ---- the method -----------------------------------------------------------------------------

def apply_temperature(probabilities: ArrayOrTensor, temperature: float) -> ArrayOrTensor:
    """softmax(log p / T) row by row: the calibrated probabilities, in the type given."""
    if isinstance(probabilities, torch.Tensor):
        logits = probabilities.float().clamp_min(MIN_PROBABILITY).log()
        return (logits / temperature).softmax(dim=1)
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), MIN_PROBABILITY, None))
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class): lower is better; it punishes confident mistakes hardest."""
    probabilities, labels = _checked(probabilities, labels)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, MIN_PROBABILITY, None)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of `apply_temperature(probabilities, T)`
    (a one-dimensional convex problem in log T: scipy's bounded Brent search)."""
    from scipy.optimize import minimize_scalar  # fitting only: prediction never loads scipy

    probabilities, labels = _checked(probabilities, labels)
    logits = np.log(np.clip(probabilities, MIN_PROBABILITY, None))

    def nll(log_temperature: float) -> float:
        scaled = logits / math.exp(log_temperature)
        scaled -= scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(scaled).sum(axis=1))
        return float((log_norm - scaled[np.arange(len(labels)), labels]).mean())

    result = minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
                             options={"xatol": 1e-4})
    return float(math.exp(result.x))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: its range, how many predictions fell in it, their mean
    confidence and their accuracy (None for an empty bin)."""
    probabilities, labels = _checked(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds (edge_i, edge_i+1]; a confidence of exactly 0 joins the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        chosen = index == i
        count = int(chosen.sum())
        rows.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": count,
                     "confidence": float(confidence[chosen].mean()) if count else None,
                     "accuracy": float(correct[chosen].mean()) if count else None})
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (share of predictions in the bin) x |accuracy - mean confidence|."""
    total = len(np.asarray(labels))
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"])
                     for row in reliability_bins(probabilities, labels, bins) if row["count"]))


def uncertain_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The confidence below which readings were more often wrong than right: on the validation
    faces, how often a reading was right is fitted as a non-decreasing function of its
    confidence (isotonic regression), and the cut falls where that fit first reaches 50%.
    0 when it never falls below (nothing is flagged).

    A fit rather than the faces taken together below a cut: for a weak model the many unsure,
    mostly wrong faces outweigh the few sure ones, and every face up to 95% was once flagged,
    a 90% "happy" that such models almost always get right included. The fit pools adjacent
    faces until rightness rises with confidence, so one noisy stretch of a few faces cannot
    move the cut far either.
    """
    from sklearn.isotonic import IsotonicRegression

    probabilities, labels = _checked(probabilities, labels)
    confidence = probabilities.max(axis=1)
    order = np.argsort(confidence, kind="stable")
    sorted_confidence = confidence[order]
    correct = (probabilities.argmax(axis=1) == labels)[order].astype(np.float64)
    rightness = IsotonicRegression(increasing=True).fit_transform(sorted_confidence, correct)
    below = np.flatnonzero(rightness < MORE_OFTEN_WRONG)  # a prefix: the fit never decreases
    if len(below) == 0:
        return 0.0
    last = int(below[-1])  # faces 0..last are flagged; the cut lies between them and the next
    if last + 1 < len(sorted_confidence):
        return float((sorted_confidence[last] + sorted_confidence[last + 1]) / 2)
    return float(min(1.0, sorted_confidence[last] + 1e-6))


def fit_calibration(probabilities: np.ndarray, labels: np.ndarray) -> Calibration:
    """Temperature, then the uncertainty threshold on the calibrated validation probabilities."""
    probabilities, labels = _checked(probabilities, labels)
    temperature = fit_temperature(probabilities, labels)
    threshold = uncertain_threshold(apply_temperature(probabilities, temperature), labels)
    return Calibration(temperature=temperature, uncertain_below=threshold, images=int(len(labels)))


def calibration_report(calibration: Calibration, probabilities: np.ndarray, labels: np.ndarray,
                       split: str = "test") -> dict[str, Any]:
    """calibration.json: the fitted values and, on `split`, ECE and NLL before and after with
    both reliability diagrams' bins."""
    probabilities, labels = _checked(probabilities, labels)
    calibrated = apply_temperature(probabilities, calibration.temperature)
    return {**calibration.to_dict(), "uncertain_rule": UNCERTAIN_RULE, "scored_on": split,
            "scored_images": int(len(labels)), "bins": BINS,
            "ece_before": expected_calibration_error(probabilities, labels),
            "ece_after": expected_calibration_error(calibrated, labels),
            "nll_before": negative_log_likelihood(probabilities, labels),
            "nll_after": negative_log_likelihood(calibrated, labels),
            "flagged_share_after": float((calibrated.max(axis=1) < calibration.uncertain_below).mean()),
            "bins_before": reliability_bins(probabilities, labels),
            "bins_after": reliability_bins(calibrated, labels)}


REPORT_NUMBERS = ("temperature", "uncertain_below", "ece_before", "ece_after", "nll_before", "nll_after")
REPORT_COUNTS = ("images", "bins", "scored_images")


def read_report(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """calibration.json for the pages: (report, None), (None, None) when the run has none (it is
    uncalibrated), or (None, why) when the file is damaged."""
    from .runs import read_json_object

    report, problem = read_json_object(Path(path))
    if problem or report is None:
        return None, problem
    bad = [key for key in REPORT_NUMBERS if not is_finite_number(report.get(key))]
    bad += [key for key in REPORT_COUNTS if key in report and not _is_count(report[key])]
    for key in ("bins_before", "bins_after"):
        bins = report.get(key)
        if not isinstance(bins, list) or not all(_valid_bin(row) for row in bins):
            bad.append(key)
    if bad:
        return None, f"{path.name} is damaged ({', '.join(bad)} missing or not numbers)"
    return report, None


def _valid_bin(row: Any) -> bool:
    if not isinstance(row, dict) or not isinstance(row.get("count"), int) or row["count"] < 0:
        return False
    numbers = [row.get(key) for key in ("lower", "upper")] + \
        ([row.get("confidence"), row.get("accuracy")] if row["count"] else [])
    return all(is_finite_number(v) for v in numbers)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked(probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or len(labels) == 0:
        raise FerError(f"calibration needs probabilities (N, classes) and N labels, N > 0 "
                       f"(got {probabilities.shape} and {labels.shape})")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise FerError("a label is outside the model's classes")
    return probabilities, labels


# ---- a run's calibration --------------------------------------------------------------------

def record_calibration(run_dir: Path, calibration: Calibration, report: dict[str, Any],
                       checkpoints_dir: Path | None = None) -> None:
    """Write calibration.json, put the calibration into best.pt and, when it exists, the run's
    published checkpoint (all atomically), so `Predictor` and export pick it up."""
    from .models import load_checkpoint, save_checkpoint_file
    from .runs import RunLayout, atomic_write_json

    layout = RunLayout(Path(run_dir))
    atomic_write_json(layout.calibration_file, report)
    targets = [layout.best_checkpoint]
    if checkpoints_dir is not None:
        published = layout.published_checkpoint(Path(checkpoints_dir))
        if published.is_file():
            targets.append(published)
    for target in targets:
        checkpoint = load_checkpoint(target)
        checkpoint["calibration"] = calibration.to_dict()
        # best.pt may be a hard link of last.pt: the new file replaces the link, last.pt is kept
        save_checkpoint_file(target, checkpoint)


def calibrate_run(run_dir: Path, *, checkpoints_dir: Path | None = None) -> dict[str, Any]:
    """"Calibrate now" for a finished run: the best model's probabilities on the run's own
    validation split (fit) and test split (report), with its recorded TTA setting; returns
    the report written to calibration.json."""
    from .data import display_path, load_dataset, read_split_manifest
    from .image_format import ImageFormat
    from .inference import probabilities as model_probabilities
    from .models import load_checkpoint, model_from_checkpoint
    from .runs import RunLayout, refuse_while_training
    from .store import select_rows

    layout = RunLayout(Path(run_dir))
    refuse_while_training(layout.path, "calibrated")  # its trainer replaces best.pt and calibrates at the end
    checkpoint = load_checkpoint(layout.best_checkpoint)
    config = checkpoint["config"]
    if not layout.split_file.is_file():
        raise FerError("this run has no split file: its validation images are not known")
    split_of = {row["path"]: row["split"] for row in read_split_manifest(layout.split_file)}
    if "val" not in split_of.values():
        raise FerError("this run has no validation split (it was trained with validation fraction 0), "
                       "so there is nothing to fit a temperature on without touching the test images")
    dataset = load_dataset(config["data"], image_format=ImageFormat.of(config))
    if dataset.classes != list(checkpoint["class_names"]):
        raise FerError(f"the dataset's classes {dataset.classes} differ from the model's "
                       f"{list(checkpoint['class_names'])}")
    splits = np.array([split_of.get(display_path(path), "unused") for path in dataset.paths])
    model = model_from_checkpoint(checkpoint, layout.best_checkpoint.name)

    def scored(split: str) -> tuple[np.ndarray, np.ndarray]:
        index = torch.from_numpy(np.flatnonzero(splits == split))
        if len(index) == 0:
            raise FerError(f"none of the run's {split} images are in {config['data']} any more")
        probs = model_probabilities(model, select_rows(dataset.images, index), config["img_size"],
                                    amp=bool(config.get("amp")), tta=bool(config.get("tta")))
        return probs.numpy(), dataset.labels[index].numpy()

    calibration = fit_calibration(*scored("val"))
    report = calibration_report(calibration, *scored("test"))
    published_in = checkpoints_dir or config.get("checkpoints_dir")
    record_calibration(layout.path, calibration, report, Path(published_in) if published_in else None)
    return report
