"""Hyper-parameter sweeps with Optuna: a search space over TrainConfig fields, one normal run
folder per trial, per-epoch pruning, several workers sharing one study through its storage.

    fer sweep --data demo --preset demo-quick --epochs 3 --trials 8 \\
              --space "lr=log:0.0005..0.01,label_smoothing=0..0.2,batch_size=choice:32|64"

The objective is the trial's best validation accuracy, maximised. Each trial is a run created
here and trained by `train.fit` in this process, one trial at a time (two trainings on the
same cores only halve each other's speed). A trial's run is named `<study>-t<number>`, holds a
`trial.json` (written by this module only) and is recorded as the trial's `run_dir` user
attribute, so every page of the app shows it like any other run.

`--trials N` is the study's total: a worker runs trials until the study holds N complete or
pruned trials (running ones of other workers included), using Optuna's MaxTrialsCallback; a
failed trial does not count, but no worker starts more than N trials itself. So a second
`fer sweep --study NAME --storage URL --trials N` on another machine joins the same study and
the two finish N between them, and running the same command again after a crash finishes
what is missing.

A sweep's folder, `<sweeps_dir>/<study>/` (FER_SWEEPS_DIR, default sweeps/ beside the runs
folder), holds the default SQLite storage `study.db`, and for a sweep launched from the app
`sweep.json` (its process, command, log; written once by `launch_sweep`), `base_config.json`
and `sweep.log`. A study kept elsewhere (another SQLite file, PostgreSQL) is listed through
`storage.json`, which names its storage (`remember_storage`: a worker on this machine, or the
Sweeps page adding a study started on another one). `stop` is a request (from `stop_sweep`):
workers that started before it end after their current trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from . import jobs, runs, settings
from .config import FIELDS_BY_NAME, TrainConfig, folder_name_problem, require_new_run_inputs
from .errors import ConfigError, FerError
from .runs import RunLayout

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

log = logging.getLogger("fer_core.sweep")

DIRECTION = "maximize"  # the objective: the trial's best validation accuracy
OBJECTIVE = "best validation accuracy"
PRUNERS = ("median", "halving", "none")
MAX_STUDY_NAME = 80  # leaves room for the trial suffix in the 100-character experiment name
# Trial runs are named by the sweep; these settings fix which images a trial is scored on, so
# tuning them would compare trials on different validation images.
NOT_TUNABLE = {"data": "the dataset is the sweep's, not a hyper-parameter",
               "experiment": "trial runs are named <study>-t<number>",
               "runs_dir": "a folder, not a hyper-parameter", "checkpoints_dir": "a folder, not a hyper-parameter",
               "weights": "a file, not a hyper-parameter", "preset": "a recipe name, not a hyper-parameter",
               "notes": "notes, not a hyper-parameter", "num_threads": "a machine setting, not a hyper-parameter",
               "val_fraction": "it changes the validation images trials are compared on",
               "test_fraction": "it changes the validation images trials are compared on",
               "seed": "it changes the validation images trials are compared on"}
# What a worker may set for itself when it joins a study: where it keeps runs, its cores, where the data lies.
LOCAL_FIELDS = ("data", "runs_dir", "checkpoints_dir", "num_threads")
SQLITE_TIMEOUT_S = 60  # two workers on one SQLite file wait for each other's writes
SLOT_POLL_S = 5.0  # how often a sweep waiting for the training slot looks again
HEARTBEAT_S, GRACE_S = 60, 180  # a worker that died mid-trial: its trial turns FAIL, not RUNNING forever


# ---- the search space -----------------------------------------------------------------

def tunable_fields() -> list[str]:
    return [name for name, item in FIELDS_BY_NAME.items()
            if name not in NOT_TUNABLE and item.kind in (int, float, str, bool)]


def parse_space(text: str) -> dict[str, BaseDistribution]:
    """`lr=log:0.01..0.3,label_smoothing=0..0.2,batch_size=choice:64|128` -> Optuna distributions.

    LOW..HIGH is uniform (whole numbers for whole-number fields), log:LOW..HIGH log-uniform,
    choice:A|B|... categorical. Every value must be allowed for its field (TrainConfig's bounds)."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"the search space is empty; give name=range pairs, e.g. {example_space()}")
    space: dict[str, BaseDistribution] = {}
    for part in parts:
        name, distribution = _parse_part(part)
        if name in space:
            raise ConfigError(f"search space part {part!r}: {name} is given twice")
        space[name] = distribution
    return space


def _parse_part(part: str) -> tuple[str, BaseDistribution]:
    name, equals, spec = (piece.strip() for piece in part.partition("="))
    if not equals or not name or not spec:
        raise ConfigError(f"search space part {part!r}: write name=LOW..HIGH, name=log:LOW..HIGH or "
                          f"name=choice:A|B")
    if name not in FIELDS_BY_NAME:
        raise ConfigError(f"search space part {part!r}: unknown field {name!r}; tunable fields: "
                          f"{', '.join(tunable_fields())}")
    if name in NOT_TUNABLE:
        raise ConfigError(f"search space part {part!r}: {name} cannot be tuned ({NOT_TUNABLE[name]})")
    item = FIELDS_BY_NAME[name]
    kind, _, rest = spec.partition(":") if ":" in spec else ("", "", spec)
    if kind == "choice":
        return name, _choices(part, name, rest)
    if kind not in ("", "log"):
        raise ConfigError(f"search space part {part!r}: unknown kind {kind!r}; use log:LOW..HIGH, choice:A|B "
                          "or LOW..HIGH")
    if item.kind not in (int, float):
        allowed = item.range_text() or "true or false"
        raise ConfigError(f"search space part {part!r}: {name} is not a number; give choice:A|B ({allowed})")
    low, high = _bounds(part, item.kind, rest)
    for value in (low, high):
        if problem := item.problem(value):
            raise ConfigError(f"search space part {part!r}: {problem}")
    if low >= high:
        raise ConfigError(f"search space part {part!r}: the low end must be below the high end")
    log_scale = kind == "log"
    if log_scale and low <= 0:
        raise ConfigError(f"search space part {part!r}: a log scale needs a low end above 0")
    if item.kind is int:
        return name, IntDistribution(int(low), int(high), log=log_scale)
    return name, FloatDistribution(float(low), float(high), log=log_scale)


def _bounds(part: str, kind: type, text: str) -> tuple[float, float]:
    low_text, dots, high_text = text.partition("..")
    if not dots:
        raise ConfigError(f"search space part {part!r}: a range is written LOW..HIGH (e.g. 0.01..0.3)")
    return _number(part, kind, low_text), _number(part, kind, high_text)


def _number(part: str, kind: type, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"search space part {part!r}: {text.strip()!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"search space part {part!r}: {text.strip()!r} is not a whole number")
        return int(value)
    return value


def _choices(part: str, name: str, text: str) -> CategoricalDistribution:
    item = FIELDS_BY_NAME[name]
    values = [_choice_value(part, item.kind, piece.strip()) for piece in text.split("|") if piece.strip()]
    if not values:
        raise ConfigError(f"search space part {part!r}: list the choices as choice:A|B")
    if len(set(values)) != len(values):
        raise ConfigError(f"search space part {part!r}: a choice is listed twice")
    for value in values:
        if problem := item.problem(item.normalise(value)):
            raise ConfigError(f"search space part {part!r}: {problem}")
    return CategoricalDistribution(values)


def _choice_value(part: str, kind: type, text: str) -> Any:
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text.lower() not in words:
            raise ConfigError(f"search space part {part!r}: {text!r} is not true or false")
        return words[text.lower()]
    if kind in (int, float):
        return _number(part, kind, text)
    return text


MAX_CORNERS = 4096


def check_space(base: TrainConfig, space: dict[str, BaseDistribution]) -> None:
    """Every combination of the ranges' ends and the choices must make a valid config with the
    sweep's other settings (e.g. warm-up epochs within epochs, also when both are tuned), and no
    range may span the gap between 0 ("off") and a field's smallest real value (an EMA decay
    of 0..0.99 would sample refused decays half the time): refused before any trial starts."""
    for name, distribution in space.items():
        setting = FIELDS_BY_NAME[name].setting
        if (not isinstance(distribution, CategoricalDistribution) and setting.zero_means
                and (setting.min_value or 0) > 0 and distribution.low < setting.min_value < distribution.high):
            raise ConfigError(f"search space {name}: 0 means {setting.zero_means} and values start at "
                              f"{setting.min_value:g}, so a range cannot span the gap between; give "
                              f"{_exact(setting.min_value)}..{_exact(distribution.high)}, or a choice such as "
                              f"choice:0|{_exact(distribution.high)}")
    ends = {name: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
            for name, d in space.items()}
    corners = math.prod(len(values) for values in ends.values())
    combinations = (dict(zip(ends, values)) for values in itertools.product(*ends.values())) \
        if corners <= MAX_CORNERS else ({name: value} for name, values in ends.items() for value in values)
    for values in combinations:
        try:
            dataclasses.replace(base, **values).validate()
        except ConfigError as exc:
            shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
            raise ConfigError(f"search space {shown} with the sweep's settings: {exc}") from None


def space_text(space: dict[str, BaseDistribution]) -> str:
    """The canonical text of a parsed space (what parse_space reads back to the same space)."""
    def one(distribution: BaseDistribution) -> str:
        if isinstance(distribution, CategoricalDistribution):
            return "choice:" + "|".join(str(c).lower() if isinstance(c, bool) else str(c)
                                         for c in distribution.choices)
        prefix = "log:" if distribution.log else ""
        return f"{prefix}{_exact(distribution.low)}..{_exact(distribution.high)}"
    return ",".join(f"{name}={one(distribution)}" for name, distribution in space.items())


def _exact(number: float) -> str:
    """The shortest text that reads back as exactly `number` (':g' keeps 6 digits: a bound of
    0.0001234567 would come back as another space, and 0.9999999 as 1, out of range)."""
    short = f"{number:g}"
    return short if float(short) == number else repr(float(number))


def example_space(lr: float = 0.1) -> str:
    """A sensible first space around a recipe's learning rate: a decade below to 3x above it,
    and label smoothing from off to 0.2."""
    return f"lr=log:{lr / 10:g}..{min(lr * 3, 10.0):g},label_smoothing=0..0.2"


# ---- studies and storage ---------------------------------------------------------------

URL_SPECIAL = "?#%"
"""Characters a study name must not hold: its SQLite file's path is part of a database URL, where
SQLAlchemy reads '?' as the start of options and '%XX' as an escape."""


def check_study_name(name: str) -> str:
    problem = folder_name_problem("study name", name, MAX_STUDY_NAME)
    if problem:
        raise ConfigError(problem)
    if any(char in name for char in URL_SPECIAL):
        raise ConfigError(f"study name must not contain {' '.join(URL_SPECIAL)} (its database file's "
                          f"path is part of a URL), got {name!r}")
    return name


def new_study_name() -> str:
    return datetime.now().strftime("sweep-%Y%m%d-%H%M%S")


def sweeps_folder(sweeps_dir: Path | None = None, runs_dir: Path | str | None = None) -> Path:
    return Path(sweeps_dir) if sweeps_dir else settings.sweeps_dir(Path(runs_dir) if runs_dir else None)


@dataclass(frozen=True)
class StudyLayout:
    """<sweeps_dir>/<study>/: the one place that knows the names of a sweep's files."""

    path: Path

    @classmethod
    def of(cls, sweeps_dir: Path, study: str) -> "StudyLayout":
        return cls(Path(sweeps_dir) / check_study_name(study))

    db_file = property(lambda self: self.path / "study.db")                 # Optuna writes it
    job_file = property(lambda self: self.path / "sweep.json")              # launch_sweep, once
    base_config_file = property(lambda self: self.path / "base_config.json")  # launch_sweep, once
    log_file = property(lambda self: self.path / "sweep.log")               # the sweep process's output
    stop_file = property(lambda self: self.path / "stop")                   # stop_sweep: a request
    storage_file = property(lambda self: self.path / "storage.json")        # remember_storage

    @property
    def default_storage(self) -> str:
        """SQLite in the study's folder: enough for several workers on one machine (or a shared disk)."""
        return f"sqlite:///{self.db_file.absolute()}"


def default_storage(sweeps_dir: Path, study: str) -> str:
    return StudyLayout.of(sweeps_dir, study).default_storage


def shown_storage(url: str) -> str:
    """The storage URL with any password hidden, for logs, records and pages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's database storage; a worker's heartbeat lets others fail its trials if it dies."""
    if "://" not in url:
        raise ConfigError(f"storage must be a database URL such as sqlite:///sweeps/NAME.db or "
                          f"postgresql://user@host/db (got {url!r})")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    beats = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if heartbeat else {}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9; we rely on them knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **beats)
    except Exception as exc:  # a bad URL, a missing driver, a server that does not answer
        raise FerError(f"cannot open the storage {shown_storage(url)}: {str(exc).splitlines()[0]}") from exc


def load_study(name: str, storage: str | optuna.storages.BaseStorage) -> optuna.Study | None:
    """The study if it exists in that storage, else None."""
    store = open_storage(storage) if isinstance(storage, str) else storage
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        return None


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The --pruner choices. Median waits for 3 finished trials and 2 epochs (one-cycle's
    warm-up makes the first epoch's accuracy say little); halving is Successive Halving."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


# ---- running a sweep ------------------------------------------------------------------

@dataclass(frozen=True)
class SweepResult:
    study: str
    storage: str
    trials_run: int               # by this worker
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_run: str | None
    stopped: str | None = None    # why this worker stopped early (a stop request, a cancel)


@dataclass
class _Plan:
    """What one worker runs: the study's base config and space, resolved and checked."""

    study: str
    storage_url: str
    base: TrainConfig
    space: dict[str, BaseDistribution]
    trials: int
    pruner_name: str
    sweeps_dir: Path


def run_sweep(study: str, *, trials: int, base: TrainConfig | None = None, space: str | None = None,
              storage: str | None = None, pruner: str | optuna.pruners.BasePruner = "median",
              sweeps_dir: Path | None = None, local: dict[str, Any] | None = None) -> SweepResult:
    """Create or join `study` and run trials until it holds `trials` complete or pruned ones.

    base/space None: join an existing study with the settings it was created with; `local`
    sets this worker's own data path, folders and threads (LOCAL_FIELDS) on top of them."""
    check_study_name(study)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"trials must be a whole number of at least 1 (got {trials!r})")
    pruner_name = pruner if isinstance(pruner, str) else type(pruner).__name__
    pruner_object = make_pruner(pruner) if isinstance(pruner, str) else pruner
    folder = sweeps_folder(sweeps_dir, (local or {}).get("runs_dir") or (base.runs_dir if base else None))
    url = storage or default_storage(folder, study)
    if base is not None and space is not None:  # bad input is refused before a database is created
        check_space(jobs.with_absolute_paths(base).validate(), parse_space(space))
    elif _missing_sqlite(url):
        raise ConfigError(f"study {study!r} does not exist in {shown_storage(url)}: give --space (and the "
                          "training settings) to create it")
    store = open_storage(url, heartbeat=True)
    existing = load_study(study, store)
    plan = _resolve_plan(study, url, existing, base, space, trials, pruner_name, folder, local or {})
    if existing is None:
        optuna_study = _create_study(plan, store, pruner_object)
    else:
        optuna_study = optuna.load_study(study_name=study, storage=store, pruner=pruner_object)
    remember_storage(folder, study, url)
    return _optimize(plan, optuna_study)


def _resolve_plan(study: str, url: str, existing: optuna.Study | None, base: TrainConfig | None,
                  space: str | None, trials: int, pruner_name: str, folder: Path,
                  local: dict[str, Any]) -> _Plan:
    if existing is None and (base is None or space is None):
        raise ConfigError(f"study {study!r} does not exist in {shown_storage(url)}: give --space (and the "
                          "training settings) to create it")
    stored_base = _stored_base(existing) if existing is not None else None
    if base is None:
        base = dataclasses.replace(stored_base, runs_dir=str(settings.runs_dir()),
                                   checkpoints_dir=str(settings.checkpoints_dir()))
    base = jobs.with_absolute_paths(dataclasses.replace(base, **local)).validate()
    if base.val_fraction == 0:
        raise ConfigError("a sweep needs a validation split (val_fraction above 0): choosing settings by "
                          "their test score would make that score optimistic")
    parsed = parse_space(space) if space is not None else parse_space(existing.user_attrs.get("space", ""))
    if existing is not None:
        _check_same_as_stored(existing, stored_base, base, parsed)
    check_space(base, parsed)
    return _Plan(study, url, base, parsed, trials, pruner_name, folder)


def _stored_base(study: optuna.Study) -> TrainConfig:
    values = study.user_attrs.get("base_config")
    if not isinstance(values, dict):
        raise FerError(f"study {study.study_name!r} was not created by `fer sweep` (it has no base config)")
    return TrainConfig.from_dict(values)


def _check_same_as_stored(study: optuna.Study, stored: TrainConfig, base: TrainConfig,
                          space: dict[str, BaseDistribution]) -> None:
    """A joining worker must sweep the same space over the same settings (its own folders aside)."""
    if space != parse_space(study.user_attrs.get("space", "")):
        raise ConfigError(f"study {study.study_name!r} searches {study.user_attrs.get('space')}; a joining "
                          "worker must use the same space (or leave out --space to take the study's)")
    ignored = set(LOCAL_FIELDS) | {"experiment"}
    theirs, ours = stored.to_dict(), base.to_dict()
    differing = sorted(k for k in ours if k not in ignored and theirs.get(k) != ours.get(k))
    if differing:
        raise ConfigError(f"study {study.study_name!r} was created with other settings ({', '.join(differing)}); "
                          "a joining worker takes them from the study: leave out --space, --preset and the "
                          "training flags other than --data, --runs-dir, --checkpoints-dir, --num-threads")


def _create_study(plan: _Plan, store: optuna.storages.BaseStorage,
                  pruner: optuna.pruners.BasePruner) -> optuna.Study:
    study = optuna.create_study(study_name=plan.study, storage=store, direction=DIRECTION, pruner=pruner,
                                load_if_exists=True)  # a second worker may create it at the same moment
    if "base_config" not in study.user_attrs:
        study.set_user_attr("base_config", plan.base.to_dict())
        study.set_user_attr("space", space_text(plan.space))
        study.set_user_attr("pruner", plan.pruner_name)
        study.set_user_attr("objective", f"{OBJECTIVE} ({DIRECTION})")
    return study


COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


ABANDONED_AFTER_S = 60.0
"""A trial whose run completed this long ago but is still RUNNING in the study lost its worker
between the two records (a live worker tells the study within milliseconds)."""


def fail_abandoned_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker died (killed, or its machine restarted): their
    run folder says its trainer is gone. They would otherwise count as running for ever, and a
    rerun of the sweep would finish short of its trials. Optuna does this itself only for
    storages with heartbeats. Returns the trial numbers failed."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir, host = trial.user_attrs.get("run_dir"), trial.user_attrs.get("host")
        if not isinstance(run_dir, str) or not Path(run_dir).is_dir() or host not in (None, socket.gethostname()):
            continue  # not training yet, or another machine's worker (its pid means nothing here)
        status, _ = runs.run_status(Path(run_dir))
        if status.active or (status.state == "completed"
                             and time.time() - (status.finished_at or 0.0) < ABANDONED_AFTER_S):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        failed.append(trial.number)
    if failed:
        log.info("trial(s) %s had lost their worker: marked failed", ", ".join(map(str, failed)))
    return failed


def _optimize(plan: _Plan, study: optuna.Study) -> SweepResult:
    layout = StudyLayout.of(plan.sweeps_dir, plan.study)
    since = _started_at(layout.path)
    fail_abandoned_trials(study)
    counted = len(study.get_trials(deepcopy=False, states=COUNTED_STATES))
    remaining = plan.trials - counted
    log.info("study %s in %s: %d of %d trials done or running; objective: %s (%s)", plan.study,
             shown_storage(plan.storage_url), counted, plan.trials, OBJECTIVE, DIRECTION)
    stopped: list[str] = []
    ran = 0
    if remaining > 0:
        def stop_when_asked(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if _requested_since(layout.stop_file, since):
                stopped.append("stopped on request after the current trial")
                study.stop()

        def objective(trial: optuna.Trial) -> float:
            nonlocal ran
            ran += 1
            return _run_trial(plan, trial, stopped)

        def wait_for_the_slot(study: optuna.Study, trial: object = None) -> None:
            if stopped or ran >= remaining or \
                    len(study.get_trials(deepcopy=False, states=COUNTED_STATES)) >= plan.trials:
                return  # no trial follows
            if wait_for_training_slot(Path(plan.base.runs_dir), lambda: _requested_since(layout.stop_file, since)):
                # "Stop after this trial" pressed while waiting: no trial is running, none starts
                stopped.append("stopped on request while waiting for the training slot")
                if trial is not None:  # a callback inside optimize; before it, optimize is not called
                    study.stop()

        wait_for_the_slot(study)
        if not stopped:
            study.optimize(objective, n_trials=remaining, catch=(FerError,),
                           callbacks=[optuna.study.MaxTrialsCallback(plan.trials, states=COUNTED_STATES),
                                      stop_when_asked, wait_for_the_slot])
    return _summary(plan, study, ran, stopped[0] if stopped else None)


def wait_for_training_slot(runs_dir: Path, stop_asked: Callable[[], bool], *,
                           poll_s: float = SLOT_POLL_S) -> bool:
    """Trials and the Train page's jobs share one training slot (two trainings at once halve
    each other's speed on a CPU): a run queued or running in the runs folder goes first, and
    the next trial starts when none is left. True when a stop was asked for while a run was
    still in the way (then no trial should start), False when the slot is free."""
    announced = False
    while True:
        busy = [layout for layout in runs.find_runs(runs_dir)
                if runs.run_status(layout)[0].state in ("queued", "running")]
        if not busy:
            return False
        if stop_asked():
            return True
        if not announced:
            log.info("waiting for %s to finish before the next trial", busy[0].id)
            announced = True
        _start_queued_jobs(runs_dir)
        time.sleep(poll_s)


def _started_at(folder: Path) -> float:
    """When this worker began: its launch time if the app launched it (a stop asked for while the
    process was still starting counts), else now (an older request was for an earlier sweep)."""
    job = read_sweep_job(folder)
    return job.started_at if job is not None and job.pid == os.getpid() else time.time()


def _requested_since(request: Path, since: float) -> bool:
    try:
        return request.stat().st_mtime >= since
    except OSError:
        return False


def _summary(plan: _Plan, study: optuna.Study, ran: int, stopped: str | None) -> SweepResult:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = max(complete, key=lambda t: t.value) if complete else None
    return SweepResult(plan.study, plan.storage_url, ran, best.number if best else None,
                       best.value if best else None, dict(best.params) if best else {},
                       best.user_attrs.get("run_dir") if best else None, stopped)


def trial_config(base: TrainConfig, params: dict[str, Any], study: str, number: int) -> TrainConfig:
    """One trial's config: the sweep's base with the sampled values, named <study>-t<number>."""
    notes = {**base.notes, "sweep": {"study": study, "trial": number}}
    return dataclasses.replace(base, experiment=f"{study}-t{number}", notes=notes, **params).validate()


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, list(distribution.choices))
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def _run_trial(plan: _Plan, trial: optuna.Trial, stopped: list[str]) -> float:
    """Train one trial as a normal run; its best validation accuracy is the objective."""
    from .train import fit  # torch: only in the process that trains

    params = {name: _suggest(trial, name, distribution) for name, distribution in plan.space.items()}
    config = trial_config(plan.base, params, plan.study, trial.number)
    layout = RunLayout.create(Path(config.runs_dir), config.experiment, config.mode)
    runs.atomic_write_json(layout.config_file, config.to_dict())  # the run's creator writes it, once
    trial.set_user_attr("run_dir", str(layout.path))
    trial.set_user_attr("host", socket.gethostname())  # whose processes the run's pids are
    record = {"study": plan.study, "trial": trial.number, "storage": shown_storage(plan.storage_url),
              "params": params, "objective": f"{OBJECTIVE} ({DIRECTION})", "state": "running",
              "started_at": time.time()}
    _write_trial(layout, record)
    log.info("trial %d: %s -> %s", trial.number, params, layout.path)
    reason: list[str] = []

    def report(row: dict[str, Any]) -> str | None:
        trial.report(float(row["val_acc"]), int(row["epoch"]))
        if trial.should_prune():
            reason.append(f"pruned by the sweep's {plan.pruner_name} pruner at epoch {row['epoch']}")
            return reason[0]
        return None

    try:
        fit(config, run_dir=layout.path, on_epoch_end=report)
    except BaseException as exc:
        _write_trial(layout, {**record, "state": "failed", "error": str(exc).splitlines()[0] if str(exc) else
                              type(exc).__name__, "finished_at": time.time()})
        raise
    finally:
        _start_queued_jobs(Path(config.runs_dir))
    run = runs.load_run(layout)
    value = run.best_val_acc
    if run.status.state == "cancelled":
        _write_trial(layout, {**record, "state": "cancelled", "finished_at": time.time()})
        stopped.append(f"cancelled during trial {trial.number}")
        trial.study.stop()
        raise FerError(f"trial {trial.number} was cancelled")  # recorded as FAIL; the sweep stops
    state = "pruned" if reason else "completed"
    _write_trial(layout, {**record, "state": state, "value": value, "stop_reason": reason[0] if reason else None,
                          "finished_at": time.time()})
    if reason:
        raise optuna.TrialPruned(reason[0])
    if value is None or not math.isfinite(value):
        raise FerError(f"trial {trial.number} has no validation accuracy")
    return float(value)


def _write_trial(layout: RunLayout, record: dict[str, Any]) -> None:
    runs.atomic_write_json(layout.trial_file, record)


def _start_queued_jobs(runs_dir: Path) -> None:
    """A trial occupies the training slot like a job does; when it ends, a job queued meanwhile
    (from the Train page) must not wait for something else to start it."""
    try:
        jobs.pump_queue(runs_dir)
    except (FerError, OSError) as exc:
        log.warning("could not start the next queued job: %s", exc)


# ---- background sweeps (launched from the app) ----------------------------------------

@dataclass(frozen=True)
class SweepJob:
    """sweep.json: a sweep process launched by launch_sweep (its only writer)."""

    study: str
    storage: str
    pid: int
    command: list[str]
    log_file: str
    started_at: float
    trials: int
    stop_requested: bool = False

    @property
    def running(self) -> bool:
        return runs.pid_alive(self.pid)


def launch_sweep(base: TrainConfig, space: str, *, study: str, trials: int, pruner: str = "median",
                 storage: str | None = None, sweeps_dir: Path | None = None) -> Path:
    """Check everything, then start `python -m fer_core sweep ...` in its own session (it
    survives page reloads and app restarts); return the study's folder."""
    check_study_name(study)
    base = jobs.with_absolute_paths(base).validate()
    require_new_run_inputs(base)  # every trial is a new run that reads them
    if base.val_fraction == 0:
        raise ConfigError("a sweep needs a validation split (val_fraction above 0)")
    check_space(base, parse_space(space))
    make_pruner(pruner)
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a whole number of at least 1 (got {trials!r})")
    folder_root = sweeps_folder(sweeps_dir, base.runs_dir).absolute()
    layout = StudyLayout.of(folder_root, study)
    previous = read_sweep_job(layout.path)
    if previous is not None and previous.running:
        raise FerError(f"sweep {study!r} is already running (pid {previous.pid})")
    url = storage or default_storage(folder_root, study)
    layout.path.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(layout.base_config_file, base.to_dict())
    layout.stop_file.unlink(missing_ok=True)  # an old request was for an earlier sweep
    args = ["-m", "fer_core", "sweep", "--study", study, "--storage", url, "--space", space,
            "--trials", str(trials), "--pruner", pruner, "--sweeps-dir", str(folder_root),
            "--config", str(layout.base_config_file)]
    pid = jobs.spawn_detached(args, layout.log_file)
    runs.atomic_write_json(layout.job_file, {
        "study": study, "storage": url, "pid": pid, "command": ["python", *args], "log_file": str(layout.log_file),
        "started_at": time.time(), "trials": trials})
    return layout.path


def read_sweep_job(folder: Path) -> SweepJob | None:
    layout = StudyLayout(Path(folder))
    values, _ = runs.read_json_object(layout.job_file)
    if values is None:
        return None
    try:
        return SweepJob(study=str(values["study"]), storage=str(values["storage"]), pid=int(values["pid"]),
                        command=[str(a) for a in values.get("command", [])], log_file=str(values["log_file"]),
                        started_at=float(values["started_at"]), trials=int(values["trials"]),
                        stop_requested=layout.stop_file.exists())
    except (KeyError, TypeError, ValueError):
        return None  # a damaged record: the page shows the study without its job


def stop_sweep(folder: Path, *, at_once: bool = False) -> None:
    """Ask a sweep to end after its current trial; `at_once` also cancels that trial's run
    (the trainer stops within a batch and the sweep ends)."""
    runs.atomic_write_json(StudyLayout(Path(folder)).stop_file, {"requested_at": time.time()})
    if not at_once:
        return
    study = load_study_at(Path(folder))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else ():
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and Path(run_dir).is_dir():
            jobs.cancel(Path(run_dir))


# ---- reading studies back (the Sweeps page) -------------------------------------------

@dataclass(frozen=True)
class StudyEntry:
    name: str
    folder: Path
    storage: str
    job: SweepJob | None


def remember_storage(sweeps_dir: Path, study: str, url: str) -> None:
    """Record where `study` lives when that is not its folder's own study.db, so the Sweeps page
    of this machine lists it (a study in PostgreSQL, or one another machine started)."""
    layout = StudyLayout.of(Path(sweeps_dir), study)
    if url == layout.default_storage or _recorded_storage(layout) == url:
        return
    layout.path.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(layout.storage_file, {"study": study, "storage": url})


def _recorded_storage(layout: StudyLayout) -> str | None:
    values, _ = runs.read_json_object(layout.storage_file)
    storage = values.get("storage") if values else None
    return storage if isinstance(storage, str) and storage else None


def study_storage(folder: Path, job: SweepJob | None = None) -> str | None:
    """Where the study of a sweep folder lives: its launch record's storage, else the one
    `remember_storage` recorded, else its own study.db; None when the folder names none."""
    layout = StudyLayout(Path(folder))
    if job is not None:
        return job.storage
    return _recorded_storage(layout) or (layout.default_storage if layout.db_file.is_file() else None)


def study_names(url: str) -> list[str]:
    """The studies a storage holds, for adding one started on another machine."""
    return sorted(optuna.study.get_all_study_names(storage=open_storage(url)))


def list_studies(sweeps_dir: Path) -> list[StudyEntry]:
    """Studies in the sweeps folder (a study.db, or a record naming their storage), newest first."""
    root = Path(sweeps_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        job = read_sweep_job(folder)
        storage = study_storage(folder, job)
        if storage is None:
            continue
        found.append((folder.stat().st_mtime, StudyEntry(folder.name, folder, storage, job)))
    return [entry for _, entry in sorted(found, key=lambda item: item[0], reverse=True)]


def load_study_at(folder: Path) -> optuna.Study | None:
    """The study kept in (or named by) a sweep folder; None when it is not there (yet)."""
    storage = study_storage(folder, read_sweep_job(folder)) or StudyLayout(Path(folder)).default_storage
    if _missing_sqlite(storage):
        return None  # not created yet: opening it would create an empty database (reading never writes)
    return load_study(Path(folder).name, storage)


def _missing_sqlite(url: str) -> bool:
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()


def trials_frame(study: optuna.Study) -> "pd.DataFrame":
    """One row per trial, best first: complete trials by value, then pruned, running, failed."""
    import pandas as pd
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3}
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: (order.get(t.state, 4), -(t.value if t.value is not None else -1.0), t.number))
    names = list(dict.fromkeys(name for t in trials for name in t.params))
    rows = []
    for t in trials:
        run_dir = t.user_attrs.get("run_dir")
        row = {"trial": t.number, "state": t.state.name.lower(), "value": t.value,
               "epochs": len(t.intermediate_values),
               **{name: t.params.get(name) for name in names},
               "run": runs.run_id(Path(run_dir)) if run_dir else None,
               "duration": (t.duration.total_seconds() if t.duration else None)}
        rows.append(row)
    return pd.DataFrame(rows, columns=["trial", "state", "value", *names, "epochs", "run", "duration"])


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


@dataclass(frozen=True)
class StudyChart:
    title: str
    figure: "go.Figure | None"
    note: str = ""   # why there is no figure yet


def study_charts(study: optuna.Study) -> list[StudyChart]:
    """Optuna's own charts, each only when the study has enough trials for it to mean something."""
    from optuna import visualization as vis
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with_steps = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    varying = [name for name in dict.fromkeys(n for t in complete for n in t.params)
               if len({repr(t.params.get(name)) for t in complete}) > 1]
    wanted = [
        ("Optimisation history", vis.plot_optimization_history,
         None if complete else "appears when a trial has completed"),
        ("Parallel coordinates", vis.plot_parallel_coordinate,
         None if len(complete) >= 2 else "appears when two trials have completed"),
        ("Parameter importances", vis.plot_param_importances,
         None if len(complete) >= 2 and varying else "appears when two completed trials differ in their settings"),
        ("Validation accuracy per epoch (intermediate values)", vis.plot_intermediate_values,
         None if with_steps else "appears when a trial has finished an epoch"),
    ]
    charts = []
    for title, plot, missing in wanted:
        if missing:
            charts.append(StudyChart(title, None, f"The {title.lower()} {missing}."))
            continue
        try:
            charts.append(StudyChart(title, plot(study)))
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of identical values
            charts.append(StudyChart(title, None, f"The {title.lower()} cannot be drawn yet ({exc})."))
    return charts


def full_training_config(study: optuna.Study, *, epochs: int, runs_dir: Path | None = None,
                         checkpoints_dir: Path | None = None) -> TrainConfig:
    """The best trial's settings over the sweep's base config, for a full-length training run
    (into these folders: the study may have been created on another machine)."""
    best = best_trial(study)
    if best is None:
        raise FerError(f"study {study.study_name!r} has no completed trial yet")
    base = _stored_base(study)
    changes = {**best.params, "epochs": epochs, "experiment": f"{study.study_name}-best",
               "notes": {**base.notes, "from_sweep": {"study": study.study_name, "trial": best.number}}}
    changes.update({name: str(folder) for name, folder in (("runs_dir", runs_dir), ("checkpoints_dir", checkpoints_dir))
                    if folder is not None})
    return dataclasses.replace(base, **changes).validate()
