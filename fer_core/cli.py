"""The command line: a thin argparse layer over fer_core.

python -m fer_core train --data {demo|DIR|FILE.csv} [options]     train a new run
python -m fer_core train --config FILE.json [options]              train from a config file (flags override it)
python -m fer_core train --resume RUN_DIR [--epochs N]             continue a run
python -m fer_core train --run-dir RUN_DIR                         train a queued run from its config.json
python -m fer_core train ... --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
                                                                   several processes (DDP under torchrun)
python -m fer_core evaluate RUN_DIR [--data DIR]                   re-score a run's best model
python -m fer_core calibrate RUN_DIR                               fit a finished run's temperature
python -m fer_core ensemble RUN_DIR RUN_DIR... --name NAME         average runs into one model
python -m fer_core download [--dataset SLUG] [--dest DIR]          fetch a dataset from Kaggle
python -m fer_core predict CHECKPOINT IMAGE_OR_URL... [--top-k K] [--json]
python -m fer_core export RUN_DIR_OR_CHECKPOINT [--format onnx|torchscript] [--out FILE]
python -m fer_core serve MODEL [--host 127.0.0.1 --port 8000 --workers N]    a REST service
python -m fer_core sweep --space SPACE --trials N [--study NAME] [--storage URL] [--pruner P] [train options]
                                                                   a hyper-parameter sweep with Optuna
python -m fer_core runs [--runs-dir DIR]                           list runs
python -m fer_core demo-data                                       build the synthetic demo set
python -m fer_core doctor DATA [--json] [--near-threshold N] [--write-exclusions]
                                                                   find blank, duplicate, leaked, mislabelled images
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import CONFIG_FIELDS, LAUNCH_FIELDS, PRESETS, ConfigField, require_dataset, require_new_run_inputs
from .errors import ConfigError, FerError

if TYPE_CHECKING:
    from .config import TrainConfig


def _train_flag_options(item: ConfigField) -> dict[str, Any]:
    """argparse options for one config field, from its setting: type, choices, help."""
    extra = item.range_text() if item.kind in (int, float) else ""
    options: dict[str, Any] = dict(dest=item.name, default=None,  # None = keep the preset's or file's value
                                   help=item.setting.help + (f" ({extra})" if extra else ""))
    if item.kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif item.setting.choices:
        options["choices"] = list(item.setting.choices)
    else:
        options["type"] = item.kind
        options["metavar"] = item.setting.metavar or item.name.upper()
    return options


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """How to get a config: a preset, a file, and one flag per config field (they override both)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a recommended recipe; flags override it")
    parser.add_argument("--config", metavar="FILE.json",
                        help="start from this config file (a run's config.json works); flags override it")
    for item in CONFIG_FIELDS:
        if item.setting.cli:
            parser.add_argument(item.flag, **_train_flag_options(item))


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """The `train` options: how to get a config (preset, file, run folder) and one flag per field."""
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last.pt (with --epochs N)")
    train.add_argument("--run-dir", metavar="RUN_DIR",
                       help="train the queued run in RUN_DIR from its config.json (what the job runner starts)")
    add_config_arguments(train)


def add_sweep_arguments(sweep: argparse.ArgumentParser) -> None:
    """`sweep`: the space, the study and its storage; the training options fix everything else."""
    from .sweep import PRUNERS, example_space
    sweep.add_argument("--space", metavar="SPACE",
                       help=f"what to tune, e.g. {example_space()},batch_size=choice:64|128 "
                            "(LOW..HIGH uniform, log:LOW..HIGH, choice:A|B); leave out to join an existing study")
    sweep.add_argument("--trials", type=int, required=True, metavar="N",
                       help="the study's total of complete or pruned trials, shared by all its workers")
    sweep.add_argument("--study", metavar="NAME", help="the study to create or join (default: sweep-<time>)")
    sweep.add_argument("--storage", metavar="URL",
                       help="Optuna storage, e.g. postgresql://user:pass@host/db (default: sqlite in "
                            "SWEEPS_DIR/NAME/study.db); workers sharing it share the study")
    sweep.add_argument("--pruner", choices=PRUNERS, default="median",
                       help="stop weak trials early: median (default), halving (successive halving), none")
    sweep.add_argument("--sweeps-dir", metavar="DIR",
                       help="where studies live (default: $FER_SWEEPS_DIR, else sweeps/ beside the runs folder)")
    add_config_arguments(sweep)
    sweep.set_defaults(run_dir=None, resume=None)


def add_doctor_arguments(doctor: argparse.ArgumentParser) -> None:
    from .doctor import MAX_NEAR_THRESHOLD, NEAR_THRESHOLD
    doctor.add_argument("data", metavar="DATA", help="demo, a folder of class folders, a folder with train/ and "
                                                     "test/, or fer2013.csv")
    doctor.add_argument("--json", action="store_true", help="the whole report as one JSON object")
    doctor.add_argument("--near-threshold", type=int, default=NEAR_THRESHOLD, metavar="N",
                        help=f"near duplicates: phash Hamming distance at most N bits of 64 "
                             f"(default {NEAR_THRESHOLD}; 0 to {MAX_NEAR_THRESHOLD})")
    doctor.add_argument("--write-exclusions", action="store_true",
                        help="write the exclusion list (into the cache folder) that `train --exclude` reads")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. `command` is the subcommand a command line names ("" for none): the options
    of the other subcommands whose declaration loads torch, FastAPI or scikit-learn are left
    out, so `fer --help` and a refused flag answer in a fraction of a second. None declares
    every subcommand's options."""
    def declared(name: str) -> bool:
        return command is None or command == name

    # the console script says `fer`; `python -m fer_core` runs __main__.py
    prog = "fer" if Path(sys.argv[0]).name == "fer" else "python -m fer_core"
    parser = argparse.ArgumentParser(prog=prog, description="Facial emotion recognition: "
                                     "train, evaluate and serve ResNet18 models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (or --resume one)")
    add_train_arguments(train)

    sweep = commands.add_parser("sweep", help="search hyper-parameters with Optuna (one run per trial)")
    if declared("sweep"):
        add_sweep_arguments(sweep)

    evaluate = commands.add_parser("evaluate", help="score a run's best model on its test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="evaluate on another dataset with the same classes")

    calibrate = commands.add_parser(
        "calibrate", help="fit temperature scaling on a finished run's validation split (runs trained "
                          "before calibration existed); training does it by itself")
    calibrate.add_argument("run_dir")

    combining = commands.add_parser("ensemble", help="average two or more completed runs into one model, "
                                                     "scored on their common test split and published")
    if declared("ensemble"):
        from .ensemble import add_ensemble_arguments
        add_ensemble_arguments(combining)

    download = commands.add_parser("download", help="download a dataset with the Kaggle API")
    download.add_argument("--dataset", default=None, help="Kaggle slug (default msambare/fer2013)")
    download.add_argument("--dest", default=None, help="target folder (default data/<owner>__<name>)")

    listing = commands.add_parser("runs", help="list runs and their states (as the app shows them)")
    listing.add_argument("--runs-dir", default=None, help="default: $FER_RUNS_DIR, else runs/")
    listing.add_argument("--json", action="store_true", help="one JSON object per run")

    commands.add_parser("demo-data", help="generate the built-in synthetic demo dataset if missing")

    doctor = commands.add_parser("doctor", help="find unreadable, blank, duplicate, leaked and conflicting "
                                                "images and class imbalance in a dataset")
    if declared("doctor"):
        add_doctor_arguments(doctor)

    exporting = commands.add_parser("export", help="export a run's best model as ONNX or TorchScript")
    exporting.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                           help="a run folder (its best model) or a .pt checkpoint")
    exporting.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                           help="onnx (ONNX Runtime and most runtimes) or torchscript (libtorch); default onnx")
    exporting.add_argument("--out", metavar="FILE", default=None,
                           help="default: RUN_DIR/exports/model.onnx, or beside the checkpoint")

    serving = commands.add_parser("serve", help="serve a model over HTTP (REST; OpenAPI docs at /docs)")
    if declared("serve"):
        from .serve import add_serve_arguments
        add_serve_arguments(serving)

    predict = commands.add_parser("predict", help="classify the faces in images or URLs")
    if declared("predict"):
        try:
            from .predict import add_predict_arguments
            add_predict_arguments(predict)
        except ImportError:  # prediction extras unavailable: the subcommand explains itself
            predict.add_argument("rest", nargs="*")
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The subcommand a command line names: its first word that is not an option (the only
    top-level option, -v, takes no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(named_command(given) or "").parse_args(given)
    args.argv = given  # other machines' ranks get them as given
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stdout)
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


def given_config_flags(args: argparse.Namespace) -> list[str]:
    """The config-field flags given on the command line (argparse leaves the others None)."""
    return [item.flag for item in CONFIG_FIELDS if item.setting.cli and getattr(args, item.name, None) is not None]


def read_config_file(path: Path, *, warn_unknown: bool = False) -> dict[str, Any]:
    """A config file's values. Keys that are not config fields (a run's recorded device,
    versions, ...) are left out; `warn_unknown` names them, so a misspelt key is not lost unseen."""
    import json
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"the config file {path} must hold a JSON object")
    known = {item.name for item in CONFIG_FIELDS}
    ignored = sorted(set(values) - known)
    if ignored and warn_unknown:
        print(f"warning: {path}: ignoring keys that are not training settings: {', '.join(ignored)}",
              file=sys.stderr)
    return {k: v for k, v in values.items() if k in known}


def config_from_args(args: argparse.Namespace) -> "TrainConfig":
    """The validated config that `train` args describe: a preset, then a config file, then flags."""
    from . import runs
    from .config import TrainConfig, config_from_preset
    if args.run_dir:
        others = given_config_flags(args) + [f"--{name}" for name in ("preset", "config", "resume")
                                             if getattr(args, name, None)]
        if others:
            raise ConfigError(f"--run-dir trains from RUN_DIR/config.json; it takes no other options "
                              f"(got {', '.join(others)})")
        config_file = Path(args.run_dir) / runs.CONFIG_FILE
        if not config_file.is_file():
            raise ConfigError(f"--run-dir {args.run_dir}: it has no config.json")
        return TrainConfig.from_dict(read_config_file(config_file)).validate()
    values = read_config_file(Path(args.config), warn_unknown=True) if args.config else {}
    file_preset = values.pop("preset", None)  # a name recorded in the file: its values are already there
    values.update({item.name: getattr(args, item.name) for item in CONFIG_FIELDS
                   if item.setting.cli and getattr(args, item.name, None) is not None})
    config = config_from_preset(args.preset, **values)
    if file_preset and not args.preset:
        config = dataclasses.replace(config, preset=file_preset).validate()
    return config


def train_command(args: argparse.Namespace) -> int:
    from . import distributed

    launch = {name: getattr(args, name) for name in LAUNCH_FIELDS if getattr(args, name, None) is not None}
    if args.resume:
        launch_flags = {"--" + name.replace("_", "-") for name in LAUNCH_FIELDS}
        others = [flag for flag in given_config_flags(args) if flag != "--epochs" and flag not in launch_flags]
        others += [f"--{name.replace('_', '-')}" for name in ("preset", "config", "run_dir") if getattr(args, name)]
        if others:
            raise ConfigError(f"--resume continues a run with its own config; only --epochs and where it runs "
                              f"(--nproc-per-node, --nnodes, --node-rank, --rdzv-endpoint) may change "
                              f"(got {', '.join(others)})")
        config = resumed_config(Path(args.resume), launch)
    else:
        # before the progress bar, so a bad value is one line and nothing is created
        config = config_from_args(args)
    if args.resume or args.run_dir:
        refuse_a_second_trainer(Path(args.resume or args.run_dir))
    if args.resume:
        require_dataset(config.data)
    else:
        require_new_run_inputs(config)
    if distributed.needs_launcher(config):
        return launch_command(args, config)
    from .train import fit, resume  # after the config: a refused value need not wait for the trainer

    worker_of_many = distributed.under_torchrun() and os.environ.get("RANK", "0") != "0"
    progress = None if worker_of_many else _terminal_progress()
    try:
        if args.resume:
            run_dir = resume(Path(args.resume), epochs=args.epochs, on_progress=progress, launch=launch)
        else:
            run_dir = fit(config, run_dir=Path(args.run_dir) if args.run_dir else None, on_progress=progress)
    finally:
        if progress is not None:
            progress.close()
        if not distributed.under_torchrun():  # the launcher moves the queue on for its ranks
            given = args.run_dir or args.resume
            _start_next_job(Path(given) if given else None, config)
    return 0 if worker_of_many else _report_run(run_dir)


def _report_run(run_dir: Path) -> int:
    from . import runs
    run = runs.load_run(run_dir)
    if run.status.state == "completed" and run.evaluation is not None:
        print(f"test accuracy {run.test_accuracy:.4f}, macro-F1 {run.macro_f1:.4f}")
    else:
        print(f"run {run.status.state}" + (f": {run.status.error}" if run.status.error else ""))
    print(run_dir)
    return 0 if run.status.state in ("completed", "cancelled") else 1


def refuse_a_second_trainer(run_dir: Path) -> None:
    """One trainer per run folder: a queued or running run is trained by its job (or by the
    terminal that started it), never also by a second `train --resume/--run-dir`."""
    from . import distributed, runs
    if distributed.under_torchrun():
        return  # a rank of a launch that passed this check
    status, _ = runs.run_status(run_dir)
    if not status.active:
        return
    job, _ = runs.read_record(run_dir / runs.JOB_FILE, runs.JobRecord)
    if job is not None and job.runner_pid == os.getppid():
        return  # the job's own trainer, started by its runner
    raise ConfigError(f"{run_dir} is {status.state}: it already has a trainer (or is queued for one). "
                      "Cancel it first (Train page, or wait for it to end), then resume it")


def resumed_config(run_dir: Path, launch: dict[str, Any]) -> "TrainConfig":
    """The config a resume of `run_dir` trains with: its own, placed where `launch` says.
    Refused here, before the trainer is imported, when the folder is not a run."""
    from . import runs
    from .config import TrainConfig
    if not (run_dir / runs.CONFIG_FILE).is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no {runs.CONFIG_FILE}, so it is not a run folder")
    values = read_config_file(run_dir / runs.CONFIG_FILE)
    return dataclasses.replace(TrainConfig.from_dict(values), **launch).validate()


def launch_command(args: argparse.Namespace, config: "TrainConfig") -> int:
    """`train` asking for several processes: create the run folder once (on machine 0), then run
    this machine's ranks under torchrun with arguments that point them at it."""
    from .train import create_run, run_processes
    run_dir = Path(args.resume or args.run_dir) if (args.resume or args.run_dir) else None
    if run_dir is None and config.node_rank == 0:
        run_dir = create_run(config).path
    failure = None
    try:
        failure = run_processes(config, worker_arguments(args, run_dir, config), run_dir)
    finally:
        _start_next_job(run_dir, config)
    if run_dir is None or config.node_rank != 0:  # another machine: machine 0 has the run folder
        print(failure or "this machine's training processes finished")
        return 1 if failure else 0
    if failure is None:  # rank 0 has printed the result
        return 0
    return _report_run(run_dir)


def worker_arguments(args: argparse.Namespace, run_dir: Path | None, config: "TrainConfig") -> list[str]:
    """What each rank runs after `python -m fer_core`. On machine 0 the run folder says it all;
    another machine's ranks get the command line as given (they write nothing)."""
    verbose = ["-v"] if args.verbose else []
    if args.resume:
        placement = [f"--{name.replace('_', '-')}={getattr(config, name)}" for name in LAUNCH_FIELDS]
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        return [*verbose, "train", "--resume", str(run_dir), *epochs, *placement]
    if run_dir is not None:
        return [*verbose, "train", "--run-dir", str(run_dir)]
    return list(args.argv)


def sweep_command(args: argparse.Namespace) -> int:
    """Create or join a study and run trials until it holds --trials of them."""
    from .sweep import LOCAL_FIELDS, new_study_name, run_sweep, shown_storage
    if args.experiment is not None:
        raise ConfigError("--experiment: a sweep names its trial runs <study>-t<number>; name it with --study")
    local_flags = {"--" + name.replace("_", "-") for name in LOCAL_FIELDS}
    shared = [flag for flag in given_config_flags(args) if flag not in local_flags]
    creating = bool(args.space or args.preset or args.config or shared)
    local = {name: getattr(args, name) for name in LOCAL_FIELDS if getattr(args, name, None) is not None}
    result = run_sweep(args.study or new_study_name(), trials=args.trials, space=args.space,
                       base=config_from_args(args) if creating else None, local=local,
                       storage=args.storage, pruner=args.pruner,
                       sweeps_dir=Path(args.sweeps_dir) if args.sweeps_dir else None)
    print(f"study {result.study} in {shown_storage(result.storage)}: {result.trials_run} trial(s) run by this worker")
    if result.stopped:
        print(result.stopped)
    if result.best_trial is None:
        print("no completed trial yet")
        return 0
    params = ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in result.best_params.items())
    print(f"best trial {result.best_trial}: validation accuracy {result.best_value:.4f} with {params}")
    print(result.best_run)  # last, alone on its line: scripts take the run folder from here
    return 0


def _start_next_job(run_dir: Path | None, config: "TrainConfig") -> None:
    """A trainer hands its slot on when it ends (`jobs.hand_on_slot`): one started as a job, so
    the queue moves even if its runner was killed, and one started from a terminal, which the
    queue counts as running too."""
    from . import jobs, runs
    try:
        runs_dir = runs.RunLayout.of(run_dir).runs_dir if run_dir is not None else Path(config.runs_dir)
    except FerError:
        return
    jobs.hand_on_slot(runs_dir)


class _TqdmProgress:
    """A bar while the dataset is decoded the first time, then one per epoch; on a terminal only."""

    def __init__(self) -> None:
        self.bar = None
        self.epoch = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm
        if event.get("phase") == "decoding":
            self._decoding(event["done"], event["total"])
            return
        if event["epoch"] != self.epoch:
            self.close()
            self.epoch = event["epoch"]
            self.bar = tqdm(total=event["batches"], desc=f"epoch {event['epoch']}/{event['epochs']}",
                            leave=False, unit="batch")
        self.bar.n = event["batch"]
        self.bar.set_postfix(loss=f"{event['train_loss']:.3f}", img_s=f"{event['images_per_second']:.0f}")

    def _decoding(self, done: int, total: int) -> None:
        from tqdm import tqdm
        if self.bar is None:
            if done >= total:
                return  # decoded by an earlier run: nothing to wait for
            self.bar = tqdm(total=total, desc="decoding images", unit="img")
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _terminal_progress() -> _TqdmProgress | None:
    return _TqdmProgress() if sys.stderr.isatty() else None


def evaluate_command(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .runs import RunLayout
    evaluation = evaluate_run(Path(args.run_dir), data=args.data)
    scores = f"accuracy {evaluation['accuracy']:.4f}, macro-F1 {evaluation['macro_f1']:.4f}"
    if args.data:  # another dataset: its own result file, the run's test result stays as it was
        part = "its test split" if evaluation["split"] == "test" else "all its images"
        print(f"{scores} on {evaluation['num_images']} images of {evaluation['data']} ({part})")
    else:
        print(f"test {scores} on {evaluation['num_images']} images")
    where = RunLayout(Path(args.run_dir)).evaluation_file(evaluation["data"] if args.data else None)
    print(f"written to {where}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    from .calibration import calibrate_run
    report = calibrate_run(Path(args.run_dir))
    print(f"temperature {report['temperature']:.3f} (fitted on {report['images']} validation images); "
          f"uncertain below {report['uncertain_below']:.0%}")
    print(f"test ({report['scored_images']} images): ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}, "
          f"NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f}")
    return 0


def ensemble_command(args: argparse.Namespace) -> int:
    from .ensemble import ensemble_command as run_ensemble
    return run_ensemble(args)


def download_command(args: argparse.Namespace) -> int:
    from .download import DEFAULT_DATASET, download_dataset
    folder = download_dataset(args.dataset or DEFAULT_DATASET, Path(args.dest) if args.dest else None)
    print(folder)
    return 0


def runs_command(args: argparse.Namespace) -> int:
    import json

    from .runs import list_runs
    from .settings import runs_dir
    for run in list_runs(Path(args.runs_dir) if args.runs_dir else runs_dir()):
        if args.json:
            print(json.dumps({"id": run.id, "path": str(run.path), "state": run.state,
                              "epochs_done": len(run.metrics), "epochs": run.planned_epochs,
                              "test_accuracy": run.test_accuracy, "macro_f1": run.macro_f1,
                              "error": run.status.error, "problems": run.problems}))
            continue
        accuracy = f"{run.test_accuracy:.3f}" if run.test_accuracy is not None else "-"
        print(f"{run.state:10} test_acc={accuracy:6} epochs={len(run.metrics):3}  {run.path}"
              + (f"  DAMAGED: {'; '.join(run.problems)}" if run.damaged else ""))
    return 0


def demo_data_command(args: argparse.Namespace) -> int:
    from .demo import ensure_demo_dataset
    print(ensure_demo_dataset())
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    import json
    import shlex

    from .doctor import examine_spec, write_exclusions
    _, report = examine_spec(args.data, near_threshold=args.near_threshold)
    written = write_exclusions(report) if args.write_exclusions else None
    if args.json:
        print(json.dumps({**report.to_dict(), "exclusion_list": str(written) if written else None}))
        return 0
    print("\n".join(report.summary_lines()))
    if written:
        print(f"exclusion list: {written}")
        print(f"train with: fer train --data {shlex.quote(args.data)} --exclude {shlex.quote(str(written))}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from .predict import predict_command as run_predict
    return run_predict(args)


def serve_command(args: argparse.Namespace) -> int:
    from .serve import serve_command as run_serve
    return run_serve(args)


def export_command(args: argparse.Namespace) -> int:
    from .export import export_model
    result = export_model(args.source, args.format, args.out)
    card = result.card
    accuracy = f"{card.test_accuracy:.1%}" if card.test_accuracy is not None else "not tested"
    opset = f", opset {card.opset}" if card.opset else ""
    print(f"exported {card.run_id or args.source} ({len(card.classes)} classes, input {card.input_size} px, "
          f"test accuracy {accuracy}) as {args.format}{opset}")
    print(f"model card: {result.card_path}")
    print(result.path)  # last, alone on its line: scripts take the file from here
    return 0


COMMANDS = {"train": train_command, "evaluate": evaluate_command, "calibrate": calibrate_command,
            "ensemble": ensemble_command,
            "download": download_command,
            "runs": runs_command, "demo-data": demo_data_command, "predict": predict_command,
            "export": export_command, "serve": serve_command, "sweep": sweep_command,
            "doctor": doctor_command}
