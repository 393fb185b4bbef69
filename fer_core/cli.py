"""The command line: a thin argparse layer over fer_core.

python -m fer_core train --data {demo|DIR|FILE.csv} [options]     train a new run
python -m fer_core train --resume RUN_DIR [--epochs N]             continue a run
python -m fer_core evaluate RUN_DIR [--data DIR]                   re-score a run's best model
python -m fer_core download [--dataset SLUG] [--dest DIR]          fetch a dataset from Kaggle
python -m fer_core predict CHECKPOINT IMAGE_OR_URL... [--top-k K] [--json]
python -m fer_core runs [--runs-dir DIR]                           list runs
python -m fer_core demo-data                                       build the synthetic demo set
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import PRESETS

# Each train flag maps onto a TrainConfig field; None means "keep the preset's or default value".
TRAIN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--data", dict(help="demo, a folder of class folders, a folder with train/ and test/, or fer2013.csv")),
    ("--experiment", dict(help="experiment name (a folder in the run path)")),
    ("--mode", dict(choices=["head_only", "finetune"])),
    ("--stem", dict(choices=["imagenet", "small"], help="small = no max-pool, for 48-96 px inputs")),
    ("--epochs", dict(type=int)),
    ("--batch-size", dict(type=int)),
    ("--lr", dict(type=float)),
    ("--backbone-lr-scale", dict(type=float, help="backbone LR = lr x this when fine-tuning")),
    ("--weight-decay", dict(type=float)),
    ("--optimizer", dict(choices=["adamw", "sgd"])),
    ("--scheduler", dict(choices=["cosine", "onecycle", "none"])),
    ("--img-size", dict(type=int, help="input size in px (48-112 suit 48 px faces; 224 is the reference)")),
    ("--val-fraction", dict(type=float, help="validation share carved from train; 0 selects on test")),
    ("--test-fraction", dict(type=float, help="test share of a single pool (default 0.25)")),
    ("--warmup-epochs", dict(type=float, help="linear warm-up for the cosine schedule")),
    ("--seed", dict(type=int)),
    ("--patience", dict(type=int, help="early-stopping patience in epochs (0 = off)")),
    ("--max-per-class", dict(type=int, help="use at most N training images per class")),
    ("--label-smoothing", dict(type=float)),
    ("--weights", dict(help="local torchvision ResNet18 state dict instead of downloading ImageNet weights")),
    ("--runs-dir", dict(help="where run directories go (default runs/)")),
    ("--checkpoints-dir", dict(help="where finished best models are published (default checkpoints/)")),
    ("--num-threads", dict(type=int, help="torch CPU threads (0 = all cores)")),
]
TRAIN_SWITCHES = ["amp", "pretrained", "augment", "tta", "class_weights"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fer_core", description="Facial emotion recognition: "
                                     "train, evaluate and serve ResNet18 models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (or --resume one)")
    train.add_argument("--preset", choices=sorted(PRESETS), help="a recommended recipe; flags override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last.pt")
    train.add_argument("--run-dir", help=argparse.SUPPRESS)  # a queued run dir made by the job manager
    for flag, options in TRAIN_FLAGS:
        train.add_argument(flag, default=None, **options)
    for name in TRAIN_SWITCHES:
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           action=argparse.BooleanOptionalAction)

    evaluate = commands.add_parser("evaluate", help="score a run's best model on its test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="evaluate on another dataset with the same classes")

    download = commands.add_parser("download", help="download a dataset with the Kaggle API")
    download.add_argument("--dataset", default=None, help="Kaggle slug (default msambare/fer2013)")
    download.add_argument("--dest", default=None, help="target folder (default data/<owner>__<name>)")

    listing = commands.add_parser("runs", help="list runs")
    listing.add_argument("--runs-dir", default="runs")

    commands.add_parser("demo-data", help="generate the built-in synthetic demo dataset if missing")

    predict = commands.add_parser("predict", help="classify the faces in images or URLs")
    try:
        from .predict import add_predict_arguments
        add_predict_arguments(predict)
    except ImportError:  # prediction extras unavailable: the subcommand explains itself
        predict.add_argument("rest", nargs="*")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stdout)
    from .errors import FerError
    try:
        return COMMANDS[args.command](args)
    except FerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback with --verbose
        if args.verbose:
            raise
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first_line} (run with -v for the traceback)", file=sys.stderr)
        return 1


def train_command(args: argparse.Namespace) -> int:
    from .config import config_from_preset
    from .train import fit, resume

    progress = _terminal_progress()
    try:
        if args.resume:
            run_dir = resume(Path(args.resume), epochs=args.epochs, on_progress=progress)
        else:
            fields = {flag.lstrip("-").replace("-", "_"): None for flag, _ in TRAIN_FLAGS}
            overrides = {name: getattr(args, name) for name in [*fields, *TRAIN_SWITCHES]}
            config = config_from_preset(args.preset, **overrides)
            run_dir = fit(config, run_dir=Path(args.run_dir) if args.run_dir else None, on_progress=progress)
    finally:
        if progress is not None:
            progress.close()
    from . import runs
    state = runs.read_json(run_dir / runs.STATUS_FILE).get("state")
    evaluation_file = run_dir / runs.EVALUATION_FILE
    if state == "completed" and evaluation_file.exists():
        evaluation = runs.read_json(evaluation_file)
        print(f"test accuracy {evaluation['accuracy']:.4f}, macro-F1 {evaluation['macro_f1']:.4f}")
    else:
        print(f"run {state}")
    print(run_dir)
    return 0 if state in ("completed", "cancelled") else 1


class _TqdmProgress:
    """One tqdm bar per epoch, on a terminal only."""

    def __init__(self) -> None:
        self.bar = None
        self.epoch = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm
        if event["epoch"] != self.epoch:
            self.close()
            self.epoch = event["epoch"]
            self.bar = tqdm(total=event["batches"], desc=f"epoch {event['epoch']}/{event['epochs']}",
                            leave=False, unit="batch")
        self.bar.n = event["batch"]
        self.bar.set_postfix(loss=f"{event['train_loss']:.3f}", img_s=f"{event['images_per_second']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _terminal_progress() -> _TqdmProgress | None:
    return _TqdmProgress() if sys.stderr.isatty() else None


def evaluate_command(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    evaluation = evaluate_run(Path(args.run_dir), data=args.data)
    print(f"test accuracy {evaluation['accuracy']:.4f}, macro-F1 {evaluation['macro_f1']:.4f} "
          f"on {evaluation['num_images']} images")
    return 0


def download_command(args: argparse.Namespace) -> int:
    from .download import DEFAULT_DATASET, download_dataset
    folder = download_dataset(args.dataset or DEFAULT_DATASET, Path(args.dest) if args.dest else None)
    print(folder)
    return 0


def runs_command(args: argparse.Namespace) -> int:
    from .runs import list_runs
    for run in list_runs(Path(args.runs_dir)):
        accuracy = f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else "-"
        print(f"{run.state:10} test_acc={accuracy:6} epochs={len(run.metrics):3}  {run.path}"
              + (f"  DAMAGED: {'; '.join(run.problems)}" if run.damaged else ""))
    return 0


def demo_data_command(args: argparse.Namespace) -> int:
    from .demo import ensure_demo_dataset
    print(ensure_demo_dataset())
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from .predict import predict_command as run_predict
    return run_predict(args)


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "download": download_command,
            "runs": runs_command, "demo-data": demo_data_command, "predict": predict_command}
