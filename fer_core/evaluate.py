"""Predictions on a split, the confusion matrix and per-class report, and reading them back."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from torch import nn

from .data import display_path
from .transforms import eval_transform, tta_views


def autocast_context(device: torch.device, amp: bool):
    """float16 autocast on CUDA, bfloat16 on CPU, or nothing."""
    if not amp:
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, img_size: int, *,
                          device: torch.device | None = None, batch_size: int = 256,
                          amp: bool = False, tta: bool = False) -> np.ndarray:
    """Class probabilities (N, C) for uint8 grey images; `tta` averages ten mirrored and shifted views."""
    device = device or next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = eval_transform(images[start:start + batch_size], img_size).to(device)
        views = tta_views(x) if tta else [x]
        with autocast_context(device, amp):
            probabilities = torch.stack([model(view.contiguous(memory_format=torch.channels_last))
                                         .float().softmax(1) for view in views]).mean(0)
        chunks.append(probabilities.cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


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
    """Score a run's best.pt on the test images of its split manifest (or of another dataset
    with the same classes, given as `data`), and rewrite evaluation.json / predictions.csv."""
    from . import runs
    from .data import load_dataset, read_split_manifest
    from .errors import FerError
    from .models import load_checkpoint, model_from_checkpoint

    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / runs.CHECKPOINT_DIR / runs.BEST_CHECKPOINT)
    config = checkpoint["config"]
    classes = list(checkpoint["class_names"])
    dataset = load_dataset(data or config["data"], max_per_class=None if data else config.get("max_per_class"),
                           seed=config.get("seed", 0))
    if dataset.classes != classes:
        raise FerError(f"dataset classes {dataset.classes} differ from the model's {classes}")
    if data:
        # Another dataset: its own test split if it has one, otherwise every image.
        chosen = [i for i, s in enumerate(dataset.given_split or ["test"] * len(dataset)) if s == "test"]
    else:
        test_paths = {r["path"] for r in read_split_manifest(run_dir / runs.SPLIT_FILE) if r["split"] == "test"}
        chosen = [i for i, p in enumerate(dataset.paths) if display_path(p) in test_paths]
    if not chosen:
        raise FerError("no test images found to evaluate on")
    index = torch.tensor(chosen)
    model = model_from_checkpoint(checkpoint)
    probabilities = predict_probabilities(model, dataset.images[index], config["img_size"],
                                          tta=bool(config.get("tta")))
    y_true = dataset.labels[index].numpy()
    evaluation = evaluation_report(y_true, probabilities, classes)
    evaluation.update({"best_epoch": checkpoint.get("epoch"), "tta": bool(config.get("tta")),
                       "split": "test", "data": data or config["data"], "synthetic": dataset.synthetic})
    runs.atomic_write_json(run_dir / runs.EVALUATION_FILE, evaluation)
    runs.atomic_write_text(run_dir / runs.PREDICTIONS_FILE,
                           predictions_csv([dataset.paths[i] for i in chosen], y_true, probabilities, classes))
    return evaluation
