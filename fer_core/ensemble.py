"""Ensembles: two or more finished runs with the same classes, test images and input size,
averaged into one model that evaluates, predicts and exports like a single run's.

Members' probabilities are averaged after each member's own temperature (fer_core.calibration),
so an overconfident member does not outvote the others. `EnsembleNetwork` is an ordinary
nn.Module whose output is the log of that average: every path that takes a model
(`inference.probabilities`, `Predictor` on PyTorch or ONNX Runtime, export) uses it unchanged,
since softmax(log p) = p.

An ensemble is a run folder of its own, mode "ensemble", written by `create_ensemble` alone:
config.json (its members), environment.json, status.json (running while it is scored, then
completed or failed), split.csv (the members' common split), evaluation.json and
predictions.csv on the common test split, calibration.json (a temperature for the average,
fitted on the common validation split), checkpoints/best.pt; its model is published to
checkpoints/ like a trained run's.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import runs
from .calibration import (MIN_PROBABILITY, Calibration, apply_temperature, calibration_report, fit_calibration,
                          record_calibration)
from .errors import FerError
from .image_format import ImageFormat
from .store import select_rows
from .runs import RunLayout

log = logging.getLogger(__name__)

MODE = "ensemble"
MIN_MEMBERS = 2


class EnsembleNetwork(nn.Module):
    """Members' temperature-scaled softmaxes, averaged; returns log probabilities (N, classes)."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float]) -> None:
        super().__init__()
        if len(members) != len(temperatures) or not members:
            raise ValueError("an ensemble needs one temperature per member, and members")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))
        self.num_classes = int(members[0].fc.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the temperature acts on the softmax exactly as `Predictor` applies it to one member
        # (clamped log-probabilities): a member's calibration means the same in both places
        average = torch.stack([apply_temperature(member(x).float().softmax(dim=1), self.temperatures[i])
                               for i, member in enumerate(self.members)]).mean(dim=0)
        return average.clamp_min(MIN_PROBABILITY).log()


def network_from_checkpoint(checkpoint: dict[str, Any]) -> EnsembleNetwork:
    """Rebuild an ensemble's network (members from their stems, then the saved weights)."""
    from .models import resnet_from_state

    described = checkpoint.get("ensemble")
    stems = described.get("stems") if isinstance(described, dict) else None
    if not isinstance(stems, list) or len(stems) < MIN_MEMBERS:
        raise ValueError("the ensemble record lists no member stems")
    classes = len(checkpoint["class_names"])
    image_format = ImageFormat.of(checkpoint["config"])
    members = [resnet_from_state(checkpoint["model_state"], classes, stem, image_format, prefix=f"members.{i}.")
               for i, stem in enumerate(stems)]
    network = EnsembleNetwork(members, [1.0] * len(members))
    network.load_state_dict(checkpoint["model_state"])  # the members' weights again, and the ensemble's buffers
    return network.eval()


# ---- building one ---------------------------------------------------------------------------

def check_members(run_dirs: Sequence[Path | str]) -> list[dict[str, Any]]:
    """Each member's checkpoint and split, after checking that they can be averaged: finished,
    not ensembles themselves, the same classes in the same order, the same input size, and
    tested on exactly the same images (else their scores would not be comparable)."""
    from .data import read_split_manifest
    from .models import load_checkpoint

    folders = [Path(d).expanduser().resolve() for d in run_dirs]
    if len(set(folders)) != len(folders):
        raise FerError("a run is listed twice: an ensemble needs different runs")
    if len(folders) < MIN_MEMBERS:
        raise FerError(f"an ensemble needs at least {MIN_MEMBERS} runs (got {len(folders)})")
    members = []
    for folder in folders:
        layout = RunLayout(folder)
        run = runs.load_run(layout)
        if run.state != "completed" or run.evaluation is None:
            raise FerError(f"run {layout.id} is {run.state}, not a completed and evaluated run")
        if run.mode == MODE:
            raise FerError(f"run {layout.id} is an ensemble itself: list its members instead")
        if not layout.best_checkpoint.is_file() or not layout.split_file.is_file():
            raise FerError(f"run {layout.id} has no best model or no split file")
        checkpoint = load_checkpoint(layout.best_checkpoint)
        split = {row["path"]: row["split"] for row in read_split_manifest(layout.split_file)}
        members.append({"layout": layout, "run": run, "checkpoint": checkpoint, "split": split})
    first = members[0]
    for other in members[1:]:
        _check_same(first, other)
    return members


def _check_same(first: dict[str, Any], other: dict[str, Any]) -> None:
    a, b = first["checkpoint"], other["checkpoint"]
    names = f"runs {first['layout'].id} and {other['layout'].id}"
    if list(a["class_names"]) != list(b["class_names"]):
        raise FerError(f"{names} have different classes ({list(a['class_names'])} and {list(b['class_names'])})")
    if a["config"].get("img_size") != b["config"].get("img_size"):
        raise FerError(f"{names} take different input sizes ({a['config'].get('img_size')} and "
                       f"{b['config'].get('img_size')} px): the ensemble is one network with one input")
    formats = [ImageFormat.of(c["config"]) for c in (a, b)]
    if formats[0] != formats[1]:
        raise FerError(f"{names} store faces differently ({formats[0].size} px {formats[0].colour} and "
                       f"{formats[1].size} px {formats[1].colour}): the ensemble is one network with one input")
    tests = [{path for path, split in member["split"].items() if split == "test"} for member in (first, other)]
    if tests[0] != tests[1]:
        differ = len(tests[0] ^ tests[1])
        raise FerError(f"{names} were tested on different images ({differ} differ): an ensemble is "
                       "scored on the members' common test split, so their splits must be the same "
                       "(same data, seed and fractions)")


def create_ensemble(run_dirs: Sequence[Path | str], name: str, *, runs_dir: Path | str | None = None,
                    checkpoints_dir: Path | str | None = None) -> Path:
    """Check the members, then write the ensemble's run folder (scored on the common test split,
    calibrated on the common validation split) and publish its model; return the folder."""
    from .config import folder_name_problem

    problem = folder_name_problem("ensemble name", name, 100)
    if problem:
        raise FerError(problem)
    members = check_members(run_dirs)
    first_config = members[0]["checkpoint"]["config"]
    runs_root = Path(runs_dir) if runs_dir else members[0]["layout"].runs_dir
    published_dir = Path(checkpoints_dir or first_config.get("checkpoints_dir") or "checkpoints")
    layout = RunLayout.create(runs_root, name, MODE)
    config = ensemble_config(name, members)
    runs.atomic_write_json(layout.config_file, config)  # the creator writes it, once
    status = runs.TrainerStatusWriter.start(layout, epochs=0)
    status.update(phase="scoring the ensemble on the members' common test split")
    try:
        _score_and_publish(layout, config, members, published_dir)
    except BaseException as exc:
        status.finish("failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    else:
        # recorded as a trained run's is: Runs offers its download and export, and archiving or
        # deleting the ensemble withdraws it from Predict
        status.finish("completed", published_checkpoint=str(layout.published_checkpoint(published_dir)))
    finally:
        from .jobs import hand_on_slot
        hand_on_slot(runs_root)  # the queue counted the ensemble as a running run
    return layout.path


def ensemble_config(name: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    configs = [member["checkpoint"]["config"] for member in members]
    first = configs[0]
    image_format = ImageFormat.of(first)
    return {"experiment": name, "mode": MODE, "data": first["data"], "img_size": first["img_size"],
            "store_size": image_format.size, "colour": image_format.colour,
            "tta": all(bool(c.get("tta")) for c in configs), "amp": all(bool(c.get("amp")) for c in configs),
            "stem": MODE, "seed": first.get("seed"), "test_fraction": first.get("test_fraction"),
            "val_fraction": first.get("val_fraction"),
            "members": [str(member["layout"].path) for member in members],
            "checkpoints_dir": first.get("checkpoints_dir")}


def _score_and_publish(layout: RunLayout, config: dict[str, Any], members: list[dict[str, Any]],
                       published_dir: Path) -> None:
    from .data import display_path, load_dataset, write_split_manifest
    from .evaluate import evaluate_model
    from .inference import probabilities
    from .models import CHECKPOINT_FORMAT, model_from_checkpoint, save_checkpoint_file

    checkpoints = [member["checkpoint"] for member in members]
    temperatures = [(Calibration.from_dict(c.get("calibration")) or Calibration(1.0, 0.0, 0)).temperature
                    for c in checkpoints]
    network = EnsembleNetwork([model_from_checkpoint(c, f"run {m['layout'].id}") for c, m in zip(checkpoints, members)],
                              temperatures).eval()
    classes = list(checkpoints[0]["class_names"])
    dataset = load_dataset(config["data"], image_format=ImageFormat.of(config))
    if dataset.classes != classes:
        raise FerError(f"the dataset's classes {dataset.classes} differ from the members' {classes}")
    # the test split is the members' common one (checked); "val" only where every member kept the
    # image out of training (different seeds choose different validation images)
    split_of = {path: split for path, split in members[0]["split"].items() if split != "val"}
    split_of.update({path: "val" for path in set.intersection(*[
        {p for p, s in member["split"].items() if s == "val"} for member in members])})
    splits = np.array([split_of.get(display_path(path), "unused") for path in dataset.paths])
    write_split_manifest(layout.split_file, dataset, splits)
    runs.atomic_write_json(layout.environment_file, {
        "classes": classes, "synthetic_data": bool(dataset.synthetic), "weights_source": "ensemble",
        "members": [{"run_id": m["layout"].id, "test_accuracy": m["run"].test_accuracy,
                     "temperature": t} for m, t in zip(members, temperatures)]})

    def images_of(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        index = np.flatnonzero(splits == split)
        if len(index) == 0:
            raise FerError(f"none of the members' {split} images are in {config['data']} any more")
        chosen = torch.from_numpy(index)
        return select_rows(dataset.images, chosen), dataset.labels[chosen], [dataset.paths[i] for i in index]

    def scored(images: torch.Tensor) -> np.ndarray:
        return probabilities(network, images, config["img_size"], amp=config["amp"], tta=config["tta"]).numpy()

    test_images, test_labels, test_paths = images_of("test")
    test_probs = scored(test_images)
    evaluation = evaluate_model(network, test_images, test_labels, test_paths, classes,
                                img_size=config["img_size"], amp=config["amp"], tta=config["tta"],
                                evaluation_file=layout.evaluation_file(),
                                predictions_file=layout.predictions_file(),
                                facts={"split": "test", "data": config["data"], "synthetic": bool(dataset.synthetic),
                                       "members": config["members"]},
                                probabilities=test_probs)
    log.info("ensemble of %d: test accuracy %.4f, macro-F1 %.4f", len(members), evaluation["accuracy"],
             evaluation["macro_f1"])
    checkpoint = {"format": CHECKPOINT_FORMAT, "model_state": {k: v.detach().cpu() for k, v in
                                                               network.state_dict().items()},
                  "config": config, "class_names": classes, "epoch": None, "best_val_acc": None,
                  "ensemble": {"stems": [c["config"].get("stem", "imagenet") for c in checkpoints],
                               "members": [{"run_dir": str(m["layout"].path), "run_id": m["layout"].id,
                                            "temperature": t} for m, t in zip(members, temperatures)]},
                  "evaluation": {"accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]},
                  "run_dir": str(layout.path)}
    save_checkpoint_file(layout.best_checkpoint, checkpoint)
    save_checkpoint_file(layout.published_checkpoint(published_dir), checkpoint)
    if (splits == "val").any():
        val_images, val_labels, _ = images_of("val")
        calibration = fit_calibration(scored(val_images), val_labels.numpy())
        record_calibration(layout.path, calibration, calibration_report(calibration, test_probs, test_labels.numpy()),
                           published_dir)


def launch_ensemble(run_dirs: Sequence[Path | str], name: str, *, runs_dir: Path | str,
                    checkpoints_dir: Path | str) -> Path:
    """Check the members and the name here (the caller hears at once what is wrong), then build
    the ensemble in a background process, as the app's other long jobs run; return its log
    file. Its run folder appears at once, running, and ends completed or failed."""
    from . import jobs, settings
    from .config import folder_name_problem

    problem = folder_name_problem("ensemble name", name, 100)
    if problem:
        raise FerError(problem)
    members = check_members(run_dirs)
    log_file = settings.cache_dir() / "logs" / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}-{name}.log"
    jobs.spawn_detached(["-m", "fer_core", "ensemble", *[str(m["layout"].path) for m in members],
                         "--name", name, "--runs-dir", str(Path(runs_dir).resolve()),
                         "--checkpoints-dir", str(Path(checkpoints_dir).resolve())], log_file)
    return log_file


# ---- the command ----------------------------------------------------------------------------

def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more completed runs")
    parser.add_argument("--name", required=True, help="the ensemble's experiment name (its run folder's)")
    parser.add_argument("--runs-dir", default=None, help="where its run folder goes (default: the first member's)")
    parser.add_argument("--checkpoints-dir", default=None,
                        help="where its model is published (default: the first member's)")


def ensemble_command(args: argparse.Namespace) -> int:
    started = time.monotonic()
    folder = create_ensemble(args.run_dirs, args.name, runs_dir=args.runs_dir, checkpoints_dir=args.checkpoints_dir)
    evaluation = runs.read_json(RunLayout(folder).evaluation_file())
    print(f"ensemble of {len(args.run_dirs)}: test accuracy {evaluation['accuracy']:.4f}, macro-F1 "
          f"{evaluation['macro_f1']:.4f} on {evaluation['num_images']} images ({time.monotonic() - started:.0f} s)")
    print(folder)  # last, alone on its line: scripts take the folder from here
    return 0
