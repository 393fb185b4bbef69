"""Scoring a model on labelled images: the report, the confusion matrix, the result files, and
reading them back. The forward pass itself is `inference.probabilities`, shared with prediction.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from torch import nn

from .data import display_path
from .image_format import ImageFormat
from .store import select_rows
from .inference import probabilities as model_probabilities
from .runs import RunLayout, atomic_write_json, atomic_write_text


def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, paths: Sequence[str],
                   classes: list[str], *, img_size: int, amp: bool, tta: bool,
                   evaluation_file: Path, predictions_file: Path, facts: dict[str, Any],
                   device: torch.device | None = None,
                   probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """Score `model` on uint8 grey images with known labels and write the result files.

    Probabilities (`inference.probabilities`) -> `evaluation_report` plus `facts` (which split,
    which data, best epoch) -> predictions csv, then evaluation json, both atomic. Training's
    test evaluation and the `evaluate` command both come here. `probabilities`, when given, are
    the caller's own for the same model and images (training's head-only feature cache).
    """
    if probabilities is None:
        probabilities = model_probabilities(model, images, img_size, device=device, amp=amp,
                                            tta=tta).numpy()
    y_true = labels.numpy()
    evaluation = evaluation_report(y_true, probabilities, classes)
    evaluation.update({"tta": bool(tta), **facts})
    # predictions first: a reader that finds the evaluation also finds the faces behind it
    atomic_write_text(predictions_file, predictions_csv(list(paths), y_true, probabilities, classes))
    atomic_write_json(evaluation_file, evaluation)
    return evaluation


def evaluation_report(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, confusion matrix (rows = true class) and scikit-learn's report."""
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    return {
        "classes": list(classes),
        "num_images": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "report": classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                        output_dict=True, zero_division=0),
    }


def predictions_csv(paths: list[str], y_true: np.ndarray, probabilities: np.ndarray,
                    classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
    for path, true, probs in zip(paths, y_true, probabilities):
        writer.writerow([display_path(path), classes[int(true)], classes[int(probs.argmax())],
                         *[f"{p:.5f}" for p in probs]])
    return buffer.getvalue()


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """predictions.csv back as dicts with float probabilities."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            probs = {k[2:]: float(v) for k, v in row.items() if k.startswith("p_")}
            rows.append({"path": row["path"], "true": row["true"], "predicted": row["predicted"],
                         "probabilities": probs})
    return rows


def normalise_rows(matrix: list[list[int]]) -> np.ndarray:
    """Row-normalised confusion matrix: each row is the share of that true class."""
    array = np.asarray(matrix, dtype=np.float64)
    totals = array.sum(axis=1, keepdims=True)
    return np.divide(array, totals, out=np.zeros_like(array), where=totals > 0)


def top_confusions(evaluation: dict[str, Any], k: int = 5) -> list[dict[str, Any]]:
    """The largest off-diagonal cells, e.g. sad predicted as neutral: 80, 21% of sad."""
    matrix = np.asarray(evaluation["confusion_matrix"])
    classes = evaluation["classes"]
    shares = normalise_rows(matrix.tolist())
    cells = [(int(matrix[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
             if i != j and matrix[i, j] > 0]
    cells.sort(reverse=True)
    return [{"true": classes[i], "predicted": classes[j], "count": count,
             "share_of_true": float(shares[i, j]),
             "text": f"{classes[i]} predicted as {classes[j]}: {count}, "
                     f"{shares[i, j]:.0%} of {classes[i]}"}
            for count, i, j in cells[:k]]


def confusion_figure(matrix: list[list[int]], classes: list[str], title: str = "Confusion matrix"):
    """A matplotlib figure of the row-normalised matrix with counts, for TensorBoard."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    shares = normalise_rows(matrix)
    figure, axes = plt.subplots(figsize=(6, 5.5))
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(j, i, str(counts[i, j]), ha="center", va="center",
                      color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    figure.tight_layout()
    return figure


def evaluate_run(run_dir: Path, data: str | None = None) -> dict[str, Any]:
    """Score a run's best.pt on the test images of its split manifest (rewriting evaluation.json
    and predictions.csv), or on another dataset with the same classes, given as `data`: its own
    test split if it has one, else every image, written to `RunLayout.evaluation_file(data)` and
    `.predictions_file(data)` so the run's own test result is never overwritten."""
    from .data import load_dataset, read_split_manifest
    from .errors import FerError
    from .models import load_checkpoint, model_from_checkpoint
    from .runs import refuse_while_training

    if not data:  # its trainer writes the run's own evaluation.json (and replaces best.pt)
        refuse_while_training(Path(run_dir), "evaluated on its test split")

    if data and data != "demo":  # recorded and named by the folder itself, not how it was typed
        data = str(Path(data).expanduser().resolve())
    layout = RunLayout(Path(run_dir))
    checkpoint = load_checkpoint(layout.best_checkpoint)
    config = checkpoint["config"]
    classes = list(checkpoint["class_names"])
    dataset = load_dataset(data or config["data"], image_format=ImageFormat.of(config))
    if dataset.classes != classes:
        raise FerError(f"dataset classes {dataset.classes} differ from the model's {classes}")
    if data:
        split = "test" if dataset.given_split else "all"
        chosen = [i for i, s in enumerate(dataset.given_split or ["test"] * len(dataset)) if s == "test"]
    else:
        split = "test"
        test_paths = {r["path"] for r in read_split_manifest(layout.split_file) if r["split"] == "test"}
        chosen = [i for i, p in enumerate(dataset.paths) if display_path(p) in test_paths]
    if not chosen:
        raise FerError("no test images found to evaluate on")
    index = torch.tensor(chosen)
    # the device and memory format training evaluated with, so the scores reproduce
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(checkpoint).to(device, memory_format=torch.channels_last)
    facts: dict[str, Any] = {"best_epoch": checkpoint.get("epoch"), "split": split,
                             "data": data or config["data"], "synthetic": dataset.synthetic}
    if data:
        facts["source"] = dataset.source
    return evaluate_model(model, select_rows(dataset.images, index), dataset.labels[index],
                          [dataset.paths[i] for i in chosen], classes, img_size=config["img_size"],
                          amp=bool(config.get("amp")), tta=bool(config.get("tta")), device=device,
                          evaluation_file=layout.evaluation_file(data),
                          predictions_file=layout.predictions_file(data), facts=facts)
