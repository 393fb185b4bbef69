"""fit(config) -> run directory: the training loop, AMP, checkpoints, TensorBoard, cancel, resume.

Reads top to bottom: prepare data -> build model -> for each epoch train, validate, log,
checkpoint -> evaluate the best model on the test split -> publish it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter

from . import distributed, runs
from .calibration import calibration_report, fit_calibration, record_calibration
from .config import TrainConfig
from .data import (Dataset, assign_splits, cap_training_images, display_path, load_dataset,
                   read_split_manifest, split_table, write_split_manifest)
from .distributed import Processes
from .ema import weight_average
from .memory import keep_freed_memory_for_reuse, peak_rss_mb
from .errors import FerError
from .runs import RunLayout, TrainerStatusWriter
from .store import Progress, select_rows
from .evaluate import confusion_figure, evaluate_model
from .image_format import ImageFormat
from .inference import amp_dtype, autocast_context
from .inference import probabilities as model_probabilities
from .models import (CHECKPOINT_FORMAT, build_model, freeze_batchnorm_if_head_only, load_checkpoint, load_weights,
                     parameter_groups, resnet_from_state, save_checkpoint_file, set_trainable,
                     weights_are_finite)
from .transforms import BatchMixer, denormalise, eval_transform, train_transform

log = logging.getLogger("fer_core.train")
STATUS_INTERVAL_S = 1.0


class Cancelled(Exception):
    """Raised between batches when a cancel was requested."""


@dataclass
class SplitTensors:
    """The decoded images of each split, ready for batch transforms."""

    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_paths: list[str]
    synthetic: bool
    selection_split: str  # "val", or "test" when --val-fraction 0 (as the reference did)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float


@dataclass
class TrainState:
    """What a checkpoint restores."""

    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# Called with {"phase": "decoding", "done", "total"} while the dataset's files are decoded the
# first time, then with {"epoch", "epochs", "batch", "batches", ...} after each training batch.
ProgressCallback = Callable[[dict[str, Any]], None]
# Called with each epoch's metrics row (after its checkpoint is saved): None to go on, or the
# reason to stop now (a sweep's pruner). The run then ends like a patience early stop.
EpochEndCallback = Callable[[dict[str, Any]], "str | None"]


# ---- entry points ---------------------------------------------------------------------

def fit(config: TrainConfig, *, run_dir: Path | None = None,
        on_progress: ProgressCallback | None = None, on_epoch_end: EpochEndCallback | None = None) -> Path:
    """Train a new run and return its directory. `run_dir` may be pre-created (queued, with its
    config.json) by the job manager; otherwise a new one is made under config.runs_dir."""
    config.validate()
    processes = distributed.join()
    try:
        if run_dir is None and processes.is_main:
            layout: RunLayout | None = create_run(config)
        else:  # a rank other than 0 on another machine has no run folder, and needs none
            layout = RunLayout(Path(run_dir)) if run_dir is not None else None
        status = start_status(layout, config, processes)
        _guarded(layout, status, processes,
                 lambda: _train(config, layout, status, processes, None, on_progress, on_epoch_end))
    finally:
        distributed.leave(processes)
    return layout.path if layout is not None else Path(config.runs_dir)


def create_run(config: TrainConfig) -> RunLayout:
    """A new run folder with its config.json (the run's creator writes it, once)."""
    layout = RunLayout.create(Path(config.runs_dir), config.experiment, config.mode)
    runs.atomic_write_json(layout.config_file, config.to_dict())
    return layout


def run_processes(config: TrainConfig, worker_argv: list[str], run_dir: Path | None) -> str | None:
    """Train with several processes: this machine's ranks run `python -m fer_core <worker_argv>`
    under torchrun (this process is its agent). Returns why they failed, or None. Where the run
    folder lives (machine 0) and rank 0 could not record an outcome (it died), this records it."""
    launched_at = time.time()
    log.info("starting %d training processes: %s", config.nproc_per_node,
             distributed.shown_command(config, worker_argv))
    failure = distributed.run_torchrun(config, worker_argv)
    if run_dir is not None and config.node_rank == 0:
        record_outcome_rank_0_could_not(RunLayout(run_dir), config, launched_at, failure)
    return failure


def record_outcome_rank_0_could_not(layout: RunLayout, config: TrainConfig, launched_at: float,
                                    failure: str | None) -> None:
    """After torchrun: a final state of this attempt in status.json was written by rank 0, which
    owns the file while it lives; if there is none, rank 0 died and its launcher writes it."""
    record, _ = runs.read_record(layout.status_file, runs.TrainerStatus)
    this_attempt = record is not None and (record.attempt_started_at or 0.0) >= launched_at
    if this_attempt and record.state in runs.FINAL_STATES:
        return
    status = TrainerStatusWriter(layout, record) if this_attempt else \
        TrainerStatusWriter.start(layout, epochs=config.epochs, world_size=config.nproc_per_node * config.nnodes)
    if runs.cancel_request(layout) is not None:
        status.finish("cancelled")
    else:
        _record_failure(status, f"{failure or 'rank 0 ended without recording an outcome'} (see train.log)")


def resume(run_dir: Path, *, epochs: int | None = None, on_progress: ProgressCallback | None = None,
           launch: dict[str, Any] | None = None) -> Path:
    """Continue a run from its last.pt with the same config and split; more epochs if asked.
    `launch` may change where it runs (config.LAUNCH_FIELDS: e.g. 2 processes, then 1)."""
    layout = RunLayout(Path(run_dir))
    try:
        config = TrainConfig.from_dict(runs.read_json(layout.config_file))
    except (OSError, ValueError, TypeError) as exc:
        raise FerError(f"cannot resume {run_dir}: config.json unreadable ({exc})") from exc
    checkpoint = load_checkpoint(layout.last_checkpoint)
    # config.json keeps the first plan; a resume that extended it trained towards the total in
    # last.pt, so that is where its schedule ends unless a new total is given
    planned = checkpoint.get("config", {}).get("epochs") if isinstance(checkpoint.get("config"), dict) else None
    if epochs is not None:
        config.epochs = epochs
    elif isinstance(planned, int) and not isinstance(planned, bool) and planned > 0:
        config.epochs = planned
    config = dataclasses.replace(config, **(launch or {})).validate()
    processes = distributed.join()
    try:
        if processes.is_main:
            drop_spent_cancel_request(layout)
        status = start_status(layout, config, processes)
        _guarded(layout, status, processes,
                 lambda: _train(config, layout, status, processes, checkpoint, on_progress))
    finally:
        distributed.leave(processes)
    return layout.path


def drop_spent_cancel_request(layout: RunLayout) -> None:
    """A resume consumes a cancel request left by an earlier attempt. One made after the job
    runner that started this trainer queued the resume stands: the user pressed Cancel while
    this trainer was starting, and it stops at its first batch."""
    request = runs.cancel_request(layout)
    if request is None:
        return
    job, _ = runs.read_record(layout.job_file, runs.JobRecord)
    ours = job is not None and job.resume and not job.outcome and job.runner_pid == os.getppid()
    if not ours or request[0] < job.queued_at:
        layout.cancel_file.unlink(missing_ok=True)


def start_status(layout: RunLayout | None, config: TrainConfig, processes: Processes) -> TrainerStatusWriter:
    if not processes.is_main or layout is None:
        return TrainerStatusWriter.in_memory(epochs=config.epochs)  # rank 0 alone writes status.json
    # under torchrun the agent's pid stands for the run: it lives until every rank has ended,
    # and the job runner's SIGTERM to it reaches every rank (torchrun forwards it)
    return TrainerStatusWriter.start(layout, epochs=config.epochs, pid=processes.agent_pid,
                                     world_size=processes.world_size)


def _guarded(layout: RunLayout | None, status: TrainerStatusWriter, processes: Processes,
             body: Callable[[], None]) -> None:
    """Run the body; record completed / cancelled / failed in status.json whatever happens."""
    on_sigterm = distributed.note_termination if processes.several else _raise_cancel_on_sigterm
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
    folder = str(layout.path) if layout is not None else "the run folder"
    try:
        body()
        status.finish("completed")
    except Cancelled:
        status.finish("cancelled")
        if processes.is_main:
            log.info("cancelled; checkpoints kept in %s", Path(folder) / runs.CHECKPOINT_DIR)
    except OSError as exc:  # disk full, folder removed or read-only: say so in words
        message = f"could not write to {folder}: {exc.strerror or exc}"
        _record_failure(status, message)
        raise FerError(message) from exc
    except BaseException as exc:
        if processes.several and distributed.is_peer_failure(exc):
            message = distributed.peer_lost_message(processes, exc)
        else:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _record_failure(status, message)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _record_failure(status: TrainerStatusWriter, message: str) -> None:
    try:
        status.finish("failed", error=message)
    except OSError as exc:
        # e.g. the disk is still full: the state still reads as failed once this process exits
        log.error("could not record the failure in status.json (%s): %s", exc.strerror or exc, message)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _raise_cancel_on_sigterm(signum: int, frame: Any) -> None:
    raise Cancelled()


# ---- the run --------------------------------------------------------------------------

def _train(config: TrainConfig, layout: RunLayout | None, status: TrainerStatusWriter, processes: Processes,
           checkpoint: dict[str, Any] | None, on_progress: ProgressCallback | None,
           on_epoch_end: EpochEndCallback | None = None) -> None:
    """One code path for one process and for each of N (DDP) processes. Rank 0 alone writes
    `layout` (None: a rank on another machine, which has no run folder)."""
    run_dir = layout.path if layout is not None else None
    writer_rank = processes.is_main and layout is not None
    threads = distributed.threads_per_process(config.num_threads, processes)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    device = distributed.device_of(processes)
    if device.type == "cpu" and keep_freed_memory_for_reuse():
        log.info("glibc malloc: heap only, no trimming (freed activations are reused, not re-faulted)")
    if writer_rank:
        remove_unfinished_saves(layout)

    status.update(phase="loading data")

    def decoding(done: int, total: int) -> None:
        status.update(phase=f"decoding images {done:,}/{total:,}")
        if on_progress is not None:
            on_progress({"phase": "decoding", "done": done, "total": total})

    data = prepare_data(config, run_dir, resuming=checkpoint is not None, writes=writer_rank, progress=decoding)
    if device.type == "cuda":
        data = images_on_device(data, device)
    if checkpoint is None:
        model, weights_source, weights_warning = build_model(
            len(data.classes), config.mode, config.stem, pretrained=config.pretrained,
            weights_path=config.weights, in_channels=ImageFormat.of(config).channels)
        if writer_rank:
            write_environment(layout, config, device, weights_source, weights_warning, data, processes)
    else:  # the network the checkpoint was trained as (an old grey run: a 3-channel first layer)
        model = resnet_from_state(checkpoint["model_state"], len(data.classes), config.stem, ImageFormat.of(config))
        set_trainable(model, config.mode)
    model = prepare_batchnorm(model.to(device, memory_format=torch.channels_last), config, device, processes)

    steps_per_epoch = distributed.steps_per_epoch(len(data.train_x), config.batch_size, processes.world_size)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    averaged = weight_average(model, config.ema_decay) if config.ema_decay else None
    mixer = BatchMixer(len(data.classes), config.mixup, config.cutmix) if config.mixup or config.cutmix else None
    weights = class_weights(data, config)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=config.label_smoothing)
    state = TrainState()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, model, optimizer, scheduler, scaler, averaged)
        if writer_rank:
            runs.rewrite_metrics(run_dir, state.history)  # drop any epoch logged after last.pt

    writer = None
    if writer_rank:
        writer = SummaryWriter(log_dir=str(run_dir), purge_step=state.epoch + 1 if checkpoint else None)
        if checkpoint is None:
            log_run_start(writer, model, data, config, device)

    if uses_feature_cache(config):
        status.update(phase="computing the frozen backbone's features (once)")
    source = batch_source(model, config, device, data, processes, averaged)
    status.update(phase="training")
    for epoch in range(state.epoch + 1, config.epochs + 1):
        progress = _ProgressReporter(status, epoch, config.epochs, steps_per_epoch, on_progress)
        train_result = train_one_epoch(source, data, config, epoch, optimizer, scheduler, scaler,
                                       criterion, device, run_dir, progress, processes, mixer)
        stop_reason = None
        if writer_rank:  # the model is replicated: rank 0 validates, logs and saves for all
            stop_reason = _end_epoch_on_rank_0(source, data, config, device, epoch, steps_per_epoch, train_result,
                                               optimizer, scheduler, scaler, state, run_dir, writer, status,
                                               on_epoch_end)
        # also where the other ranks wait for rank 0's validation and checkpoint
        if distributed.any_process_stops(processes, bool(stop_reason)):
            break
    if not writer_rank:
        return  # rank 0 evaluates and publishes; the others' work is done

    status.update(phase="evaluating the best model on the test split")
    evaluation, test_probabilities = evaluate_best(run_dir, model, data, config, device, source)
    if data.selection_split == "val":  # no validation split: nothing to fit on but the test images
        status.update(phase="calibrating the confidence on the validation split")
        calibrate_best(run_dir, model, data, config, test_probabilities)
    log_run_end(writer, config, evaluation, state)
    writer.close()
    status.update(published_checkpoint=str(publish_best(run_dir, config)))


def _end_epoch_on_rank_0(source: "BatchSource", data: SplitTensors, config: TrainConfig, device: torch.device,
                         epoch: int, steps_per_epoch: int, train_result: EpochResult, optimizer: torch.optim.Optimizer,
                         scheduler: Any, scaler: torch.amp.GradScaler, state: TrainState, run_dir: Path,
                         writer: SummaryWriter, status: TrainerStatusWriter,
                         on_epoch_end: EpochEndCallback | None) -> str | None:
    """Validate, log, checkpoint; return why training stops early (None: go on)."""
    val_loss, val_acc = validate(source, data, config, device)
    row = {"epoch": epoch, "train_loss": train_result.loss, "train_acc": train_result.accuracy,
           "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
           "seconds": train_result.seconds,
           "images_per_second": train_result.images / max(train_result.seconds, 1e-9),
           "peak_rss_mb": peak_rss_mb()}
    state.epoch = epoch
    state.history.append(row)
    improved = val_acc > state.best_val_acc
    if improved:
        state.best_val_acc, state.best_epoch, state.epochs_without_improvement = val_acc, epoch, 0
    else:
        state.epochs_without_improvement += 1
    # Logs before the checkpoint: a kill between the two loses nothing, because a resume
    # from the previous last.pt rewrites metrics.jsonl and purges TensorBoard from there.
    runs.append_metrics(run_dir, row)
    log_epoch(writer, row)
    save_checkpoints(run_dir, source.model, optimizer, scheduler, scaler, state, config, data.classes,
                     val_loss, improved, source.averaged)
    status.update(epoch=epoch, batch=steps_per_epoch, best_val_acc=state.best_val_acc, best_epoch=state.best_epoch)
    log.info("epoch %d/%d  train loss %.4f acc %.3f | %s loss %.4f acc %.3f | %.0f img/s",
             epoch, config.epochs, row["train_loss"], row["train_acc"], data.selection_split,
             val_loss, val_acc, row["images_per_second"])
    stop_reason = on_epoch_end(row) if on_epoch_end is not None else None
    if stop_reason is None and config.patience and state.epochs_without_improvement >= config.patience:
        stop_reason = f"no {data.selection_split} improvement for {config.patience} epochs"
    if stop_reason:
        log.info("early stop: %s", stop_reason)
        status.update(early_stopped_at=epoch, stop_reason=stop_reason)
    return stop_reason


def remove_unfinished_saves(layout: RunLayout) -> None:
    """Temp files of atomic saves that a kill interrupted (`.last.pt.*.tmp`): never valid data."""
    for folder in (layout.path, layout.checkpoint_dir):
        for leftover in folder.glob(".*.tmp") if folder.is_dir() else ():
            leftover.unlink(missing_ok=True)


# ---- data -----------------------------------------------------------------------------

def prepare_data(config: TrainConfig, run_dir: Path | None, *, resuming: bool, writes: bool = True,
                 progress: Progress | None = None) -> SplitTensors:
    """Load (`progress` follows the first decoding of the files), split (or re-read the run's
    split on resume) and slice into split tensors. Only the writer (rank 0) records the split;
    the seeded split is the same in every process."""
    dataset = load_dataset(config.data, image_format=ImageFormat.of(config), progress=progress)
    manifest = run_dir / runs.SPLIT_FILE if run_dir is not None else None
    if resuming and manifest is not None and manifest.is_file():
        by_path = {row["path"]: row["split"] for row in read_split_manifest(manifest)}
        splits = np.array([by_path.get(display_path(p), "unused") for p in dataset.paths])
    else:
        exclusions = excluded = None
        if config.exclude:  # the dataset doctor's list: 'excluded' in split.csv, the split made on the rest
            from .doctor import excluded_mask, read_exclusions
            exclusions = read_exclusions(config.exclude)
            excluded = excluded_mask(dataset, config.data, exclusions)
            log.info("exclusion list %s: %d of %d images left out", config.exclude, excluded.sum(), len(dataset))
        splits = assign_splits(dataset, test_fraction=config.test_fraction,
                               val_fraction=config.val_fraction, seed=config.seed, excluded=excluded)
        if config.max_per_class:
            splits = cap_training_images(dataset, splits, config.max_per_class, config.seed)
        if writes and manifest is not None:
            write_split_manifest(manifest, dataset, splits)
            if exclusions is not None:  # the run keeps the list it used, whatever becomes of the original
                runs.atomic_write_json(manifest.parent / runs.EXCLUSIONS_FILE, exclusions)
            runs.atomic_write_json(manifest.parent / runs.DATA_REPORT_FILE, {
                "source": dataset.source, "synthetic": dataset.synthetic, "classes": dataset.classes,
                "num_images": len(dataset), "split_table": split_table(dataset, splits),
                "bad_files": dataset.bad_files, "num_bad_files": len(dataset.bad_files),
                "num_excluded": int(excluded.sum()) if excluded is not None else 0})
    return split_tensors(dataset, splits, config.val_fraction > 0)


def split_tensors(dataset: Dataset, splits: np.ndarray, has_val: bool) -> SplitTensors:
    def take(name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        index = np.flatnonzero(splits == name)
        t = torch.from_numpy(index)
        return select_rows(dataset.images, t), dataset.labels[t], [dataset.paths[i] for i in index]

    train_x, train_y, _ = take("train")
    test_x, test_y, test_paths = take("test")
    val_x, val_y, _ = take("val") if has_val else (test_x, test_y, test_paths)
    return SplitTensors(dataset.classes, train_x, train_y, val_x, val_y, test_x, test_y, test_paths,
                        dataset.synthetic, "val" if has_val else "test")


def images_on_device(data: SplitTensors, device: torch.device) -> SplitTensors:
    """The splits' images moved to the GPU once (FER2013 is 66 MB), so batches and their
    augmentation never cross the bus again; labels stay on the CPU, where the reports read them.
    A file-backed store (a dataset larger than memory) is read batch by batch as on the CPU."""
    moved: dict[int, torch.Tensor] = {}  # val_x is test_x when there is no validation split

    def move(images: Any) -> Any:
        if not isinstance(images, torch.Tensor):
            return images
        if id(images) not in moved:
            moved[id(images)] = images.to(device)
        return moved[id(images)]

    return dataclasses.replace(data, train_x=move(data.train_x), val_x=move(data.val_x), test_x=move(data.test_x))


def class_weights(data: SplitTensors, config: TrainConfig) -> torch.Tensor | None:
    """Inverse-frequency weights (mean 1) so rare classes such as disgust count as much."""
    if not config.class_weights:
        return None
    counts = torch.bincount(data.train_y, minlength=len(data.classes)).float().clamp(min=1)
    weights = counts.sum() / (len(counts) * counts)
    return weights / weights.mean()


# ---- model, optimiser, schedule ------------------------------------------------------

def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.lr, config.backbone_lr_scale)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, scheduler: str, warmup_steps: int) -> float:
    """Multiplier of the base LR at `step`. One-cycle: 30% warm-up from 1/25, then cosine to ~0."""
    if scheduler == "none" or total_steps <= 0:
        return 1.0
    progress = min(step / total_steps, 1.0)
    if scheduler == "onecycle":
        peak = 0.3
        if progress < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / peak)) / 2
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (progress - peak) / (1 - peak))) / 2
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    rest = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped per batch; a pure function of the step, so resuming with more epochs just works."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, config.scheduler, warmup))


# ---- one epoch ------------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling and augmentation depend only on (seed, epoch): a resumed run replays exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def augmentation_generator(order_generator: torch.Generator, seed: int, epoch: int,
                           processes: Processes) -> torch.Generator:
    """Rank 0 goes on drawing from the epoch's generator, exactly as one process does; every
    other rank draws from its own, so that no two ranks augment their shares alike."""
    if processes.rank == 0:
        return order_generator
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000 + processes.rank)


def prepare_batchnorm(model: nn.Module, config: TrainConfig, device: torch.device,
                      processes: Processes) -> nn.Module:
    """SyncBatchNorm on CUDA with several processes: each rank then normalises with the global
    batch's statistics, as one process does, however small its share. On the CPU plain
    BatchNorm (per-rank statistics): PyTorch's SyncBatchNorm refuses CPU tensors. Head-only runs
    keep BatchNorm frozen, so there is nothing to synchronise. The parameters and state-dict keys
    stay the same, so checkpoints load into the plain model."""
    if processes.several and device.type == "cuda" and config.mode != "head_only":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def data_parallel(model: nn.Module, device: torch.device, processes: Processes) -> nn.Module:
    """The module a training step calls: DDP around the model (gradients averaged over the
    ranks in backward) when there are several processes, the model itself otherwise."""
    if not processes.several:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class ImageBatches:
    """Batches of images through the whole network, augmented on the fly when training."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, data: SplitTensors,
                 processes: Processes = distributed.ONE_PROCESS, averaged: AveragedModel | None = None):
        # validation, evaluation and checkpoints use the plain model (or its moving average):
        # no collective in them, so rank 0 can run them alone
        self.model, self.config, self.device, self.data = model, config, device, data
        self.averaged = averaged
        self.evaluated: nn.Module = averaged.module if averaged is not None else model
        self.trainer = data_parallel(model, device, processes)

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = self.data.train_x[index]
        if self.config.augment:
            return train_transform(images, self.config.img_size, generator).to(self.device, non_blocking=True)
        return eval_transform(images, self.config.img_size).to(self.device, non_blocking=True)

    def val_batch(self, start: int, stop: int) -> torch.Tensor:
        return eval_transform(self.data.val_x[start:stop], self.config.img_size).to(self.device, non_blocking=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.evaluated(inputs)

    def train_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.trainer(inputs)

    def set_train_mode(self) -> None:
        self.model.train()
        freeze_batchnorm_if_head_only(self.model, self.config.mode)


class FeatureBatches:
    """Head-only training without augmentation: the frozen backbone's output never changes, so
    it is computed once per image and every epoch only trains the linear head on it."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, data: SplitTensors,
                 averaged: AveragedModel | None = None):
        self.model, self.config, self.device = model, config, device
        self.averaged = averaged
        self.evaluated: nn.Module = averaged.module if averaged is not None else model
        self.train_features = self._backbone_features(data.train_x)
        self.val_features = self._backbone_features(data.val_x)

    @torch.inference_mode()
    def _backbone_features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        head, self.model.fc = self.model.fc, nn.Identity()
        self.model.eval()
        try:
            chunks = []
            for start in range(0, len(images), batch_size):
                x = eval_transform(images[start:start + batch_size], self.config.img_size).to(self.device)
                with autocast_context(self.device, self.config.amp):
                    chunks.append(self.model(x))
            return torch.cat(chunks)
        finally:
            self.model.fc = head

    def train_batch(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.train_features[index]

    def val_batch(self, start: int, stop: int) -> torch.Tensor:
        return self.val_features[start:stop]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.evaluated.fc(inputs)

    def train_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.fc(inputs)  # one process only (TrainConfig.validate)

    @torch.inference_mode()
    def test_probabilities(self, data: SplitTensors) -> np.ndarray:
        """Test-split probabilities from the head alone; selecting on test reuses its features."""
        features = self.val_features if data.selection_split == "test" else self._backbone_features(data.test_x)
        self.evaluated.eval()
        with autocast_context(self.device, self.config.amp):
            return self.forward(features).float().softmax(1).cpu().numpy()

    def set_train_mode(self) -> None:
        self.model.eval()
        self.model.fc.train()


BatchSource = ImageBatches | FeatureBatches


def uses_feature_cache(config: TrainConfig) -> bool:
    return config.mode == "head_only" and not config.augment


def batch_source(model: nn.Module, config: TrainConfig, device: torch.device, data: SplitTensors,
                 processes: Processes = distributed.ONE_PROCESS, averaged: AveragedModel | None = None) -> BatchSource:
    if uses_feature_cache(config):
        return FeatureBatches(model, config, device, data, averaged)
    return ImageBatches(model, config, device, data, processes, averaged)


def train_one_epoch(source: BatchSource, data: SplitTensors, config: TrainConfig, epoch: int,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                    criterion: nn.Module, device: torch.device, run_dir: Path | None,
                    progress: "_ProgressReporter", processes: Processes = distributed.ONE_PROCESS,
                    mixer: BatchMixer | None = None) -> EpochResult:
    """One pass over the epoch's seeded permutation in global batches; each rank trains on its
    share of every batch, so N processes take the steps one process takes. Accuracy counts the
    faces' own labels, also when MixUp/CutMix trains on mixed ones."""
    source.set_train_mode()
    generator = epoch_generator(config.seed, epoch)
    order = torch.randperm(len(data.train_x), generator=generator)
    augmentation = augmentation_generator(generator, config.seed, epoch, processes)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    batches = distributed.global_batches(order, config.batch_size, processes.world_size)
    for batch_index, batch in enumerate(batches, start=1):
        if distributed.any_process_stops(processes, stop_requested(run_dir, processes)):
            raise Cancelled()
        index = distributed.rank_share(batch, processes)
        x = source.train_batch(index, augmentation)
        y = data.train_y[index].to(device, non_blocking=True)
        targets = y
        if mixer is not None:
            x, targets = mixer(x, y, augmentation)
        with autocast_context(device, config.amp):
            logits = source.train_forward(x)
            loss = criterion(logits.float(), targets) * distributed.share_weight(len(index), len(batch), processes)
        # the global batch's mean loss, the same on every rank: all stop together if it is not finite
        loss_value = distributed.global_sums(processes, [loss.item()])[0] / processes.world_size
        if not math.isfinite(loss_value):  # before the step: last.pt and the weights stay finite
            raise FerError(diverged_message(epoch, batch_index, loss_value, config))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if source.averaged is not None:
            source.averaged.update_parameters(source.model)
        total_loss += loss_value * len(batch)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(batch)
        progress.batch_done(batch_index, seen, time.perf_counter() - started, total_loss / seen)
    seconds = time.perf_counter() - started
    correct = round(distributed.global_sums(processes, [float(correct)])[0])
    return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), seen, seconds)


def stop_requested(run_dir: Path | None, processes: Processes) -> bool:
    """This process's reason to stop before the next batch: the run's cancel file (rank 0
    reads it), a SIGTERM forwarded by torchrun, or torchrun's agent gone."""
    cancelled = processes.is_main and run_dir is not None and (run_dir / runs.CANCEL_FILE).exists()
    return cancelled or distributed.TERMINATION_REQUESTED.is_set() or processes.agent_gone()


def diverged_message(epoch: int, batch: int, loss: float, config: TrainConfig) -> str:
    return (f"training diverged at epoch {epoch}, batch {batch}: the loss became {loss} "
            f"(learning rate {config.lr:g}). Lower the learning rate (e.g. {config.lr / 10:g}), "
            "or resume from the last good epoch with a smaller one.")


@torch.inference_mode()
def validate(source: BatchSource, data: SplitTensors, config: TrainConfig,
             device: torch.device) -> tuple[float, float]:
    source.evaluated.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data.val_x), 256):
        x = source.val_batch(start, start + 256)
        y = data.val_y[start:start + 256].to(device)
        with autocast_context(device, config.amp):
            logits = source.forward(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    n = max(len(data.val_x), 1)
    return total_loss / n, correct / n


class _ProgressReporter:
    """Throttled batch progress into status.json (for the app) and a callback (for tqdm)."""

    def __init__(self, status: TrainerStatusWriter, epoch: int, epochs: int, batches: int,
                 callback: ProgressCallback | None):
        self.status, self.epoch, self.epochs, self.batches = status, epoch, epochs, batches
        self.callback = callback
        self.last_write = 0.0

    def batch_done(self, batch: int, images: int, seconds: float, loss: float) -> None:
        rate = images / max(seconds, 1e-9)
        remaining_batches = (self.batches - batch) + (self.epochs - self.epoch) * self.batches
        eta = remaining_batches * seconds / batch
        event = {"epoch": self.epoch, "epochs": self.epochs, "batch": batch, "batches": self.batches,
                 "images_per_second": rate, "eta_s": eta, "train_loss": loss}
        if self.callback:
            self.callback(event)
        now = time.monotonic()
        if now - self.last_write >= STATUS_INTERVAL_S or batch == self.batches:
            self.last_write = now
            self.status.update(**event)


# ---- checkpoints ----------------------------------------------------------------------

def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                       scaler: torch.amp.GradScaler, state: TrainState, config: TrainConfig,
                       classes: list[str], val_loss: float,
                       averaged: AveragedModel | None = None) -> dict[str, Any]:
    """Everything needed to resume or to predict; only tensors and plain types (weights_only).
    `model_state` holds the weights that predict: the moving average when there is one, with
    the trained weights beside it for a resume."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_state": _cpu_state(averaged.module if averaged is not None else model),
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict(),
        "epoch": state.epoch,
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "epochs_without_improvement": state.epochs_without_improvement,
        "val_loss": val_loss,
        "training_history": list(state.history),
        "config": config.to_dict(),
        "class_names": list(classes),
    }
    if averaged is not None:
        payload["trained_model_state"] = _cpu_state(model)
        payload["average_updates"] = int(averaged.n_averaged)
    return payload


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoints(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: torch.amp.GradScaler, state: TrainState, config: TrainConfig,
                     classes: list[str], val_loss: float, improved: bool,
                     averaged: AveragedModel | None = None) -> None:
    payload = checkpoint_payload(model, optimizer, scheduler, scaler, state, config, classes, val_loss, averaged)
    folder = run_dir / runs.CHECKPOINT_DIR
    save_checkpoint_file(folder / runs.LAST_CHECKPOINT, payload)
    if improved:  # the same bytes: a hard link instead of a second 45 MB write
        runs.atomic_link(folder / runs.LAST_CHECKPOINT, folder / runs.BEST_CHECKPOINT)


def restore_checkpoint(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, scaler: torch.amp.GradScaler,
                       averaged: AveragedModel | None = None) -> TrainState:
    load_weights(model, checkpoint.get("trained_model_state", checkpoint["model_state"]))
    if averaged is not None:
        load_weights(averaged.module, checkpoint["model_state"])
        averaged.n_averaged.fill_(int(checkpoint.get("average_updates", 0)))
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    scheduler.load_state_dict(checkpoint["scheduler_state"])
    if checkpoint.get("scaler_state"):
        scaler.load_state_dict(checkpoint["scaler_state"])
    return TrainState(epoch=checkpoint["epoch"], best_val_acc=checkpoint["best_val_acc"],
                      best_epoch=checkpoint.get("best_epoch", checkpoint["epoch"]),
                      epochs_without_improvement=checkpoint.get("epochs_without_improvement", 0),
                      history=list(checkpoint["training_history"]))


# ---- after training -------------------------------------------------------------------

def evaluate_best(run_dir: Path, model: nn.Module, data: SplitTensors, config: TrainConfig,
                  device: torch.device, source: BatchSource) -> tuple[dict[str, Any], np.ndarray]:
    """Reload best.pt and score it once on the untouched test split, with the code the
    `evaluate` command uses (`evaluate.evaluate_model`); also return its test probabilities."""
    layout = RunLayout(run_dir)
    best = torch.load(layout.best_checkpoint, map_location="cpu", weights_only=True)
    load_weights(model, best["model_state"])
    source.evaluated = model  # the best weights (averaged ones, when averaging) are now the model's
    if isinstance(source, FeatureBatches) and not config.tta and data.selection_split == "test":
        # the test split's backbone features are already cached (they were the selection
        # split): the head alone scores them, a whole forward pass saved
        precomputed = source.test_probabilities(data)
    else:
        precomputed = model_probabilities(model, data.test_x, config.img_size, device=device, amp=config.amp,
                                          tta=config.tta).numpy()
    evaluation = evaluate_model(model, data.test_x, data.test_y, data.test_paths, data.classes,
                                img_size=config.img_size, amp=config.amp, tta=config.tta, device=device,
                                evaluation_file=layout.evaluation_file(),
                                predictions_file=layout.predictions_file(),
                                facts={"best_epoch": best["epoch"], "split": "test", "data": config.data,
                                       "synthetic": data.synthetic},
                                probabilities=precomputed)
    log.info("test accuracy %.4f  macro-F1 %.4f  (best epoch %d, %d images)",
             evaluation["accuracy"], evaluation["macro_f1"], best["epoch"], evaluation["num_images"])
    return evaluation, precomputed


def calibrate_best(run_dir: Path, model: nn.Module, data: SplitTensors, config: TrainConfig,
                   test_probabilities: np.ndarray) -> None:
    """Temperature scaling for the best model (already loaded in `model`): fitted on the
    validation split with the run's TTA setting, reported on the test split, recorded in
    calibration.json and best.pt (`publish_best` carries it on)."""
    val_probabilities = model_probabilities(model, data.val_x, config.img_size, amp=config.amp,
                                            tta=config.tta).numpy()
    calibration = fit_calibration(val_probabilities, data.val_y.numpy())
    report = calibration_report(calibration, test_probabilities, data.test_y.numpy())
    record_calibration(run_dir, calibration, report)
    log.info("calibration: temperature %.3f, uncertain below %.2f; test ECE %.4f -> %.4f, NLL %.4f -> %.4f",
             calibration.temperature, calibration.uncertain_below, report["ece_before"], report["ece_after"],
             report["nll_before"], report["nll_after"])


def publish_best(run_dir: Path, config: TrainConfig) -> Path:
    """Copy the best model (weights, classes, config, scores; no optimizer) to checkpoints/."""
    layout = RunLayout(run_dir)
    best = torch.load(layout.best_checkpoint, map_location="cpu", weights_only=True)
    if not weights_are_finite(best["model_state"]):
        raise FerError("the best model has non-finite weights (NaN or inf): it was not published")
    evaluation = runs.read_json(layout.evaluation_file())
    slim = {key: best[key] for key in ("format", "model_state", "epoch", "best_val_acc", "config", "class_names")}
    if "calibration" in best:
        slim["calibration"] = best["calibration"]
    slim["evaluation"] = {"accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"]}
    slim["run_dir"] = str(layout.path.resolve())
    target = layout.published_checkpoint(Path(config.checkpoints_dir))
    save_checkpoint_file(target, slim)
    return target


# ---- records and TensorBoard ----------------------------------------------------------

def write_environment(layout: RunLayout, config: TrainConfig, device: torch.device, weights_source: str,
                      weights_warning: str | None, data: SplitTensors,
                      processes: Processes = distributed.ONE_PROCESS) -> None:
    """environment.json: what the trainer found and ran with, beside the config it was given."""
    runs.atomic_write_json(layout.environment_file, {
        "weights_source": weights_source, "weights_warning": weights_warning,
        "classes": data.classes, "synthetic_data": data.synthetic,
        "selection_split": data.selection_split,
        "num_train": len(data.train_x), "num_val": len(data.val_x) if data.selection_split == "val" else 0,
        "num_test": len(data.test_x),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "amp_dtype": str(amp_dtype(device, config.amp)).removeprefix("torch.") if amp_dtype(device, config.amp)
        else None,
        "world_size": processes.world_size,
        "per_rank_batch": math.ceil(config.batch_size / processes.world_size),
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(), "git_commit": _git_commit(),
    })


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_run_start(writer: SummaryWriter, model: nn.Module, data: SplitTensors, config: TrainConfig,
                  device: torch.device) -> None:
    """A grid of what the model is fed, and the model graph."""
    sample = data.train_x[:32]
    x = (train_transform(sample, config.img_size, torch.Generator().manual_seed(0)) if config.augment
         else eval_transform(sample, config.img_size))
    writer.add_image("inputs/train_batch", torchvision.utils.make_grid(denormalise(x), nrow=8), 0)
    try:
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.trace deprecation; TB still needs it
            writer.add_graph(model, x[:1].to(device))
    except Exception as exc:  # graph tracing is a nicety; never let it stop training
        log.warning("model graph not written to TensorBoard: %s", exc)


def log_epoch(writer: SummaryWriter, row: dict[str, Any]) -> None:
    epoch = row["epoch"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_second"):
        writer.add_scalar(f"epoch/{key}", row[key], epoch)
    writer.flush()


def log_run_end(writer: SummaryWriter, config: TrainConfig, evaluation: dict[str, Any],
                state: TrainState) -> None:
    writer.add_figure("test/confusion_matrix",
                      confusion_figure(evaluation["confusion_matrix"], evaluation["classes"],
                                       f"best epoch {state.best_epoch}: test"), state.epoch)
    hparams = {k: v for k, v in config.to_dict().items()
               if k in ("mode", "stem", "epochs", "batch_size", "lr", "img_size", "optimizer", "scheduler",
                        "label_smoothing", "class_weights", "augment", "amp", "pretrained", "seed",
                        "val_fraction", "weight_decay", "tta")}
    writer.add_hparams(hparams, {"hparam/test_accuracy": evaluation["accuracy"],
                                 "hparam/test_macro_f1": evaluation["macro_f1"],
                                 "hparam/best_val_acc": state.best_val_acc}, run_name=".")
    writer.flush()
