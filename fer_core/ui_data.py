"""Shape fer_core data into tables and figures for the app's pages (no streamlit here).

Pages stay thin: they read widgets, call these helpers and draw what comes back. Everything
here is a plain function of run directories, configs and evaluations, so it is testable
without a browser.
"""

from __future__ import annotations

import html
import math
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import fer2013_csv
from .runs import RunInfo

STATE_COLORS = {"queued": "gray", "running": "blue", "completed": "green", "failed": "red",
                "cancelled": "orange", "damaged": "red"}
STATE_ICONS = {"queued": ":material/schedule:", "running": ":material/progress_activity:",
               "completed": ":material/check_circle:", "failed": ":material/error:",
               "cancelled": ":material/cancel:", "damaged": ":material/report:"}
TRAIN_COLOR, VAL_COLOR = "#4f46e5", "#f97316"

# Config keys that describe where files go or how the machine was, not the experiment.
_BOOKKEEPING_KEYS = {"runs_dir", "checkpoints_dir", "notes", "weights_warning", "git_commit",
                     "torch_version", "torchvision_version", "python_version"}
# The keys shown first in a hyper-parameter diff, in this order; the rest follow sorted.
_HPARAM_ORDER = ["data", "preset", "mode", "stem", "pretrained", "weights_source", "epochs",
                 "batch_size", "lr", "optimizer", "scheduler", "weight_decay", "img_size", "amp",
                 "augment", "label_smoothing", "class_weights", "val_fraction", "test_fraction",
                 "patience", "tta", "seed", "max_per_class"]


# ---- small formatters -----------------------------------------------------------------

def format_duration(seconds: float | None) -> str:
    """12 s, 3 min 05 s, 1 h 02 min; an em dash when unknown."""
    try:
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            return "—"
    except (OverflowError, TypeError):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def image_count(evaluation: dict[str, Any]) -> int:
    """The images an evaluation scored: its `num_images`, else (an older or hand-edited file
    without it) the sum of its confusion matrix, which counts each image once."""
    count = evaluation.get("num_images")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    return int(sum(sum(row) for row in evaluation.get("confusion_matrix") or []))


def format_percent(value: float | None, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    try:
        return f"{100 * float(value):.{digits}f}%"
    except OverflowError:
        return "—"


def format_time(timestamp: float | None) -> str:
    """A local date and time; an em dash when unknown or not a time a clock can show."""
    if not timestamp:
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(timestamp)))
    except (OverflowError, OSError, ValueError, TypeError):
        return "—"


def dataset_label(spec: str | None, synthetic: bool | None = None) -> str:
    """A short name for a data source; the demo is always marked SYNTHETIC."""
    if not spec:
        return "—"
    if spec == "demo" or synthetic:
        return "demo (SYNTHETIC)" if spec == "demo" else f"{Path(spec).name} (SYNTHETIC)"
    path = Path(spec)
    if path.suffix.lower() == ".csv":
        return path.name
    return path.name or str(path)


# ---- datasets on disk -----------------------------------------------------------------

@dataclass(frozen=True)
class DatasetChoice:
    """A data source the user can pick: its spec for load_dataset and a label to show."""

    spec: str
    label: str
    kind: str          # "demo" | "folder" | "csv"
    synthetic: bool = False


def _looks_like_dataset_folder(path: Path) -> bool:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return True
    subdirs = [p for p in _listing(path) if p.is_dir() and not p.name.startswith(".")]
    return len(subdirs) >= 2 and all(_has_entries(d) for d in subdirs[:3])


def _listing(folder: Path) -> list[Path]:
    """The folder's entries, sorted; none when it cannot be read (e.g. a root-only lost+found
    in the data folder must not take every page that lists datasets down)."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _has_entries(folder: Path) -> bool:
    try:
        return next(iter(folder.iterdir()), None) is not None
    except OSError:
        return False


def discover_datasets(data_home: Path, demo_dir: Path | None = None) -> list[DatasetChoice]:
    """The built-in demo first, then dataset folders and fer2013-style .csv files found in
    data_home (two levels deep: a Kaggle download unpacks into data/<owner>__<name>/)."""
    choices = [DatasetChoice("demo", "Built-in demo (SYNTHETIC cartoon faces)", "demo", True)]
    data_home = Path(data_home)
    if not data_home.is_dir():
        return choices
    skip = {Path(demo_dir).resolve()} if demo_dir else set()
    found: list[DatasetChoice] = []
    candidates = [p for p in _listing(data_home) if not p.name.startswith(".")]
    for entry in candidates:
        if entry.resolve() in skip:
            continue
        if entry.is_file() and entry.suffix.lower() == ".csv":
            found.append(DatasetChoice(str(entry), f"{entry.name} (csv)", "csv"))
        elif entry.is_dir():
            if (entry / "DEMO_DATASET.json").is_file():
                found.append(DatasetChoice(str(entry), f"{entry.name} (SYNTHETIC demo folder)", "folder", True))
            elif _looks_like_dataset_folder(entry):
                found.append(DatasetChoice(str(entry), f"{entry.name} (folder)", "folder"))
            else:
                for inner in _listing(entry):
                    if inner.is_file() and inner.suffix.lower() == ".csv" and "fer" in inner.name.lower():
                        found.append(DatasetChoice(str(inner), f"{entry.name}/{inner.name} (csv)", "csv"))
                    elif inner.is_dir() and not inner.name.startswith(".") and _looks_like_dataset_folder(inner):
                        found.append(DatasetChoice(str(inner), f"{entry.name}/{inner.name} (folder)", "folder"))
    return choices + found


def split_frame(table: list[dict[str, Any]]) -> pd.DataFrame:
    """data.split_table rows as the reference's table: class, total, train, val, test, %."""
    columns = ["class", "total", "train", "val", "test", "train %", "test %"]
    return pd.DataFrame(table, columns=columns)


def class_distribution_figure(counts: dict[str, int], title: str = "Images per class") -> go.Figure:
    classes, values = [html.escape(c) for c in counts], list(counts.values())  # folder names, as typed
    total = max(sum(values), 1)
    figure = go.Figure(go.Bar(x=classes, y=values, marker_color=TRAIN_COLOR,
                              text=[f"{v} ({100 * v / total:.0f}%)" for v in values],
                              textposition="outside", cliponaxis=False,
                              hovertemplate="%{x}: %{y} images<extra></extra>"))
    figure.update_layout(title=title, yaxis_title="images", xaxis_title=None, height=340,
                         margin=dict(l=10, r=10, t=50, b=10), showlegend=False)
    return figure


def split_distribution_figure(table: list[dict[str, Any]]) -> go.Figure:
    """Stacked bars: train / val / test images for every class."""
    classes = [html.escape(row["class"]) for row in table]  # folder names, as typed
    figure = go.Figure()
    for part, color in (("train", TRAIN_COLOR), ("val", "#a5b4fc"), ("test", VAL_COLOR)):
        figure.add_bar(name=part, x=classes, y=[row[part] for row in table], marker_color=color,
                       hovertemplate=f"%{{x}}: %{{y}} {part} images<extra></extra>")
    figure.update_layout(barmode="stack", title="Images per class and split", height=340,
                         margin=dict(l=10, r=10, t=50, b=10), yaxis_title="images",
                         legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom",
                                     traceorder="normal"))
    return figure


# ---- runs -----------------------------------------------------------------------------

def run_row(run: RunInfo) -> dict[str, Any]:
    """One row of the runs table."""
    config = run.config
    planned = run.planned_epochs
    done = len(run.metrics)
    return {
        "run": run.id,
        "experiment": run.experiment,
        "state": run.state,
        "problems": "; ".join(run.problems),
        "dataset": dataset_label(config.get("data"), config.get("synthetic_data")),
        "mode": config.get("mode", "—"),
        "stem": config.get("stem", "—"),
        "img px": config.get("img_size"),
        "batch": config.get("batch_size"),
        "lr": config.get("lr"),
        "weights": config.get("weights_source", "—"),
        "epochs": f"{done}/{planned}" if planned else str(done),
        "stopped early": run.status.stop_reason,
        "best val acc": run.best_val_acc,
        "test acc": run.test_accuracy,
        "macro-F1": run.macro_f1,
        "duration": format_duration(run.duration_s),
        "started": format_time(run.status.started_at or run.status.queued_at),
        "path": str(run.path),
    }


def runs_frame(runs: Sequence[RunInfo]) -> pd.DataFrame:
    columns = ["started", "experiment", "state", "dataset", "mode", "img px", "epochs", "stopped early",
               "best val acc", "test acc", "macro-F1", "duration", "batch", "lr", "stem", "weights",
               "problems", "run", "path"]
    return pd.DataFrame([run_row(r) for r in runs], columns=columns)


def best_run(runs: Sequence[RunInfo]) -> RunInfo | None:
    """The completed run with the highest test accuracy, or None."""
    scored = [r for r in runs if r.state == "completed" and r.test_accuracy is not None]
    return max(scored, key=lambda r: r.test_accuracy) if scored else None


def hparam_diff(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """Hyper-parameters (rows) x runs (columns), only the keys whose values differ."""
    keys = set()
    for run in runs:
        keys.update(k for k in run.config if k not in _BOOKKEEPING_KEYS)
    ordered = [k for k in _HPARAM_ORDER if k in keys] + sorted(keys - set(_HPARAM_ORDER))
    rows = {}
    for key in ordered:
        values = [run.config.get(key) for run in runs]
        if len({_hashable(v) for v in values}) > 1:
            rows[key] = ["—" if v is None else str(v) for v in values]
    labels = _unique_labels(runs)
    return pd.DataFrame.from_dict(rows, orient="index", columns=labels) if rows else \
        pd.DataFrame(columns=labels)


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, (list, dict, set)) else value


def _unique_labels(runs: Sequence[RunInfo]) -> list[str]:
    labels, seen = [], {}
    for run in runs:
        label = run.id
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return labels


def metrics_frame(metrics: Sequence[dict[str, Any]]) -> pd.DataFrame:
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
               "images_per_second"]
    return pd.DataFrame(list(metrics), columns=columns)


def curves_figure(metrics: Sequence[dict[str, Any]], selection_split: str = "val",
                  height: int = 340) -> go.Figure:
    """Loss and accuracy per epoch, train vs validation, side by side."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"), horizontal_spacing=0.08)
    epochs = [m.get("epoch") for m in metrics]
    val_name = "validation" if selection_split == "val" else selection_split
    for col, (key, label) in enumerate((("loss", "loss"), ("acc", "accuracy")), start=1):
        for split, name, color, dash in (("train", "train", TRAIN_COLOR, "solid"),
                                         ("val", val_name, VAL_COLOR, "solid")):
            figure.add_trace(go.Scatter(
                x=epochs, y=[m.get(f"{split}_{key}") for m in metrics], name=name,
                mode="lines+markers", line=dict(color=color, dash=dash), legendgroup=split,
                showlegend=col == 1,
                hovertemplate=f"epoch %{{x}}<br>{name} {label} %{{y:.4f}}<extra></extra>"), row=1, col=col)
    figure.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 20 else None)
    figure.update_yaxes(tickformat=".0%", row=1, col=2, rangemode="tozero")
    figure.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), hovermode="x unified",
                         legend=dict(orientation="h", y=1.12, x=0, xanchor="left", yanchor="bottom"))
    return figure


def overlay_figure(runs: Sequence[RunInfo], key: str, title: str, percent: bool = False) -> go.Figure:
    """One line per run for one metric (e.g. val_acc) over epochs."""
    figure = go.Figure()
    for label, run in zip(_unique_labels(runs), runs):
        # run ids hold experiment names: escaped for plotly's <a>/<b>/<br>, and kept out of the
        # template (a '%{...}' in a name would be filled in); the hover box names the trace
        figure.add_trace(go.Scatter(x=[m.get("epoch") for m in run.metrics],
                                    y=[m.get(key) for m in run.metrics], mode="lines+markers",
                                    name=html.escape(label), hovertemplate="epoch %{x}: %{y:.4f}"))
    longest = max((len(run.metrics) for run in runs), default=0)
    figure.update_layout(title=title, height=360, xaxis_title="epoch", margin=dict(l=10, r=10, t=50, b=10),
                         legend=dict(orientation="h", y=-0.25))
    figure.update_xaxes(dtick=1 if longest <= 20 else None)
    if percent:
        figure.update_yaxes(tickformat=".0%")
    return figure


def job_progress(status: dict[str, Any] | Any) -> float:
    """Fraction of the whole run done, from epoch/batch counters (a dict or a RunStatus)."""
    get = status.get if isinstance(status, dict) else (lambda k, d=None: getattr(status, k, d))
    state = get("state")
    if state == "completed":
        return 1.0
    epoch, epochs = int(get("epoch") or 0), int(get("epochs") or 0)
    batch, batches = int(get("batch") or 0), int(get("batches") or 0)
    if epochs <= 0 or epoch <= 0:
        return 0.0
    within = batch / batches if batches > 0 else 0.0
    return float(min(1.0, max(0.0, (epoch - 1 + within) / epochs)))


# ---- evaluation -----------------------------------------------------------------------

def reliability_figure(report: dict[str, Any], height: int = 440) -> go.Figure:
    """The reliability diagram: per confidence bin, the share of right predictions against
    the mean confidence, before and after calibration; the diagonal is a perfectly honest
    model. Bars (right axis) count the test faces per bin after calibration."""
    figure = go.Figure()
    after = report["bins_after"]
    figure.add_trace(go.Bar(
        x=[(row["lower"] + row["upper"]) / 2 for row in after], y=[row["count"] for row in after],
        width=[(row["upper"] - row["lower"]) * 0.9 for row in after], yaxis="y2", name="faces per bin (after)",
        marker_color="rgba(120,120,120,0.25)", hovertemplate="%{y} faces<extra></extra>"))
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                                line=dict(color="gray", dash="dash"), hoverinfo="skip"))
    for key, name, color in (("bins_before", "before (raw softmax)", VAL_COLOR),
                             ("bins_after", "after (temperature scaling)", TRAIN_COLOR)):
        filled = [row for row in report[key] if row["count"]]
        figure.add_trace(go.Scatter(
            x=[row["confidence"] for row in filled], y=[row["accuracy"] for row in filled], mode="lines+markers",
            name=name, line=dict(color=color), customdata=[[row["count"]] for row in filled],
            hovertemplate="confidence %{x:.0%}: right %{y:.0%} of %{customdata[0]} faces<extra>" + name + "</extra>"))
    figure.update_layout(
        height=height, margin=dict(l=10, r=10, t=20, b=10), legend=dict(orientation="h", y=-0.18),
        xaxis=dict(title="confidence (top probability)", range=[0, 1], tickformat=".0%"),
        yaxis=dict(title="share right", range=[0, 1], tickformat=".0%"),
        yaxis2=dict(title="faces", overlaying="y", side="right", showgrid=False, rangemode="tozero"),
        bargap=0)
    return figure


def confusion_figure(evaluation: dict[str, Any], normalise: bool = False,
                     selected: tuple[str, str] | None = None, title: str | None = None,
                     height: int = 520, show_scale: bool = True) -> go.Figure:
    """Interactive heatmap: rows = true class, columns = predicted, class order as trained.
    Cells show counts (and the row share); hovering explains the cell in words."""
    classes = list(evaluation["classes"])
    counts = np.asarray(evaluation["confusion_matrix"], dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    z = shares if normalise else counts
    text = [[(f"{shares[i, j]:.0%}" if normalise else f"{counts[i, j]}") for j in range(len(classes))]
            for i in range(len(classes))]
    custom = np.dstack([counts, shares]).tolist()
    # plotly reads <a>, <b>, <br> in labels: class names are folder names, shown as typed
    labels = [html.escape(c) for c in classes]
    figure = go.Figure(go.Heatmap(
        z=z.tolist(), x=labels, y=labels, text=text, texttemplate="%{text}", customdata=custom,
        colorscale="Blues", zmin=0, zmax=1 if normalise else max(int(counts.max()), 1),
        showscale=show_scale, xgap=2, ygap=2,
        colorbar=dict(title="share" if normalise else "images", tickformat=".0%" if normalise else None),
        hoverinfo="skip"))
    # Heatmap cells cannot be selected in plotly, markers can: an invisible square marker on
    # every cell carries the hover text and makes a click select that cell.
    n = len(classes)
    cells = [(i, j) for i in range(n) for j in range(n)]
    figure.add_trace(go.Scatter(
        x=[labels[j] for _, j in cells], y=[labels[i] for i, _ in cells], mode="markers",
        marker=dict(symbol="square", size=max(8, int((height - 130) / max(n, 1) * 0.9)),
                    color="rgba(0,0,0,0)"),
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
        customdata=[[int(counts[i, j]), float(shares[i, j])] for i, j in cells], showlegend=False,
        name="cells", hovertemplate="true <b>%{y}</b> predicted as <b>%{x}</b><br>%{customdata[0]} images, "
                                    "%{customdata[1]:.1%} of %{y}<extra></extra>"))
    if selected and selected[0] in classes and selected[1] in classes:
        i, j = classes.index(selected[0]), classes.index(selected[1])
        figure.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                         line=dict(color=VAL_COLOR, width=3))
    figure.update_xaxes(title_text="predicted class", side="bottom", type="category", tickangle=-30)
    figure.update_yaxes(title_text="true class", autorange="reversed", type="category")
    figure.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=50 if title else 20, b=10),
                         clickmode="event+select", dragmode=False)
    return figure


def cell_from_selection(selection: Any, classes: Sequence[str]) -> tuple[str, str] | None:
    """(true, predicted) from a plotly chart selection event, or None."""
    cell = cell_index_from_selection(selection, classes)
    return None if cell is None else (classes[cell[0]], classes[cell[1]])


def cell_index_from_selection(selection: Any, classes: Sequence[str]) -> tuple[int, int] | None:
    """(true row, predicted column) from a plotly chart selection event, or None.

    A click lands on the invisible cell markers (`confusion_figure`'s second trace, one per
    cell in row order), so the point's index names the cell whatever the class names contain."""
    try:
        points = selection["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(selection, "selection", None), "points", None)
    if not points:
        return None
    point = points[0]
    n = len(classes)
    index = point.get("point_index")
    if point.get("curve_number") == 1 and isinstance(index, int) and 0 <= index < n * n:
        return divmod(index, n)
    labels = [html.escape(c) for c in classes]  # the axis labels as drawn
    true, predicted = point.get("y"), point.get("x")
    for names in (list(classes), labels):
        if true in names and predicted in names:
            return names.index(true), names.index(predicted)
    pair = point.get("point_indices") if index is None else index
    if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(0 <= int(v) < n for v in pair):
        return int(pair[0]), int(pair[1])
    return None


def confusion_cell_order(evaluation: dict[str, Any]) -> list[tuple[int, int, int]]:
    """Every cell as (true row, predicted column, count): mistakes first, largest first, then
    the correct cells, then the empty ones. Indices, so no class name can make two cells alike."""
    matrix = evaluation["confusion_matrix"]
    n = len(evaluation["classes"])
    cells = [(i, j, int(matrix[i][j])) for i in range(n) for j in range(n)]
    cells.sort(key=lambda c: (c[2] == 0, c[0] == c[1], -c[2]))
    return cells


def test_set_difference(a: RunInfo, b: RunInfo) -> str | None:
    """Why two runs' test scores are not comparable (different data, or a different test split
    of the same data), or None when they were tested on the same images."""
    def facts(run: RunInfo) -> dict[str, Any]:
        evaluation, config = run.evaluation or {}, run.config
        data = evaluation.get("data") or config.get("data")
        synthetic = bool(evaluation.get("synthetic", config.get("synthetic_data")) or data == "demo")
        return {"data": data, "synthetic": synthetic, "label": dataset_label(data, synthetic),
                "images": image_count(evaluation),
                "split": (config.get("seed"), config.get("test_fraction"), config.get("max_per_class"))}

    x, y = facts(a), facts(b)
    if x["data"] != y["data"] or x["synthetic"] != y["synthetic"]:
        return (f"Different test sets: this run was tested on {x['label']}, the other on {y['label']}. "
                "Their scores and matrices are not comparable.")
    if x["images"] != y["images"] or x["split"] != y["split"]:
        return (f"Different test splits of {x['label']} ({x['images'] or '?'} and {y['images'] or '?'} "
                "images; another seed, test share or per-class cap): the scores are only roughly comparable.")
    return None


def confusion_cells(evaluation: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every non-empty cell as (true, predicted, count): mistakes first, largest first."""
    classes = list(evaluation["classes"])
    matrix = evaluation["confusion_matrix"]
    cells = [(classes[i], classes[j], int(matrix[i][j])) for i in range(len(classes))
             for j in range(len(classes)) if matrix[i][j] > 0]
    cells.sort(key=lambda c: (c[0] == c[1], -c[2]))
    return cells


def per_class_frame(evaluation: dict[str, Any]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, from sklearn's report dict."""
    report = evaluation.get("report", {})
    rows = []
    for name in evaluation["classes"]:
        scores = report.get(name, {})
        rows.append({"class": name, "precision": scores.get("precision", 0.0),
                     "recall": scores.get("recall", 0.0), "f1": scores.get("f1-score", 0.0),
                     "support": int(scores.get("support", 0))})
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def cell_examples(predictions: Sequence[dict[str, Any]], true: str, predicted: str,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Test images with this true and predicted class, the most confident predictions first."""
    rows = [r for r in predictions if r["true"] == true and r["predicted"] == predicted]
    rows.sort(key=lambda r: -r["probabilities"].get(predicted, 0.0))
    return rows[:limit] if limit else rows


def load_image_array(path: str) -> np.ndarray | None:
    """A test image as a 48x48-ish grey uint8 array for display; None if it cannot be read.

    'file.csv#row' references (fer2013.csv rows) are decoded from the csv."""
    if "#" in path and path.rsplit("#", 1)[0].lower().endswith(".csv"):
        file, row = path.rsplit("#", 1)
        images = load_csv_rows(file, [int(row)]) if row.isdigit() else {}
        return images.get(int(row)) if row.isdigit() else None
    try:
        from PIL import Image
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    except Exception:  # a moved or unreadable file only loses its thumbnail
        return None


def load_image_arrays(paths: Sequence[str]) -> list[np.ndarray | None]:
    """load_image_array for many paths; rows of one fer2013.csv are decoded in a single pass."""
    wanted: dict[str, set[int]] = {}
    for path in paths:
        file, _, row = path.rpartition("#")
        if file.lower().endswith(".csv") and row.isdigit():
            wanted.setdefault(file, set()).add(int(row))
    decoded = {file: load_csv_rows(file, rows) for file, rows in wanted.items()}
    images: list[np.ndarray | None] = []
    for path in paths:
        file, _, row = path.rpartition("#")
        if file in decoded:
            images.append(decoded[file].get(int(row)))
        else:
            images.append(load_image_array(path))
    return images


def load_csv_rows(path: str, rows: Iterable[int]) -> dict[int, np.ndarray]:
    """Decode the given 1-based csv line numbers (the header is line 1) of a fer2013.csv.

    The lines are numbered and parsed exactly as `data.read_fer2013_csv` numbers its rows (one
    physical line each, byte-order mark accepted), so a dataset reference "file.csv#n" shows
    its own face even after a broken row.
    """
    wanted = set(rows)
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    # An unreadable csv shows no images rather than breaking the page; a malformed row has no
    # image to show, so the gallery skips it.
    with suppress(OSError), fer2013_csv.open_csv(path) as handle:
        lines = fer2013_csv.read_lines(handle)
        _, header, _ = next(lines, (1, None, None))
        pixels_column = fer2013_csv.header_columns(header).get("pixels")
        if pixels_column is None:
            return found
        last = max(wanted)
        for line_number, fields, _problem in lines:
            if line_number > last:
                break
            if line_number in wanted and fields is not None and len(fields) > pixels_column:
                with suppress(ValueError):
                    values = fer2013_csv.parse_pixels(fields[pixels_column])
                    side = int(round(math.sqrt(values.size)))
                    if values.size and side * side == values.size:
                        found[line_number] = np.clip(values, 0, 255).astype(np.uint8).reshape(side, side)
    return found


def probability_caption(row: dict[str, Any], top: int = 3) -> str:
    """'happy 81% · neutral 12% · sad 4%' for one prediction row."""
    probabilities = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])[:top]
    return " · ".join(f"{name} {p:.0%}" for name, p in probabilities)


def probability_frame(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> pd.DataFrame:
    data = [{"image": Path(r["path"]).name, "true": r["true"], "predicted": r["predicted"],
             **{c: r["probabilities"].get(c, 0.0) for c in classes}} for r in rows]
    return pd.DataFrame(data, columns=["image", "true", "predicted", *classes])
