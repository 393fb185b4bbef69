"""Train: configure and launch a run, then watch it learn (live), cancel or resume it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from fer_core import jobs, runs, ui_data
from fer_core.cli import TRAIN_FLAGS, TRAIN_SWITCHES
from fer_core.config import PRESET_DESCRIPTIONS, PRESETS, TrainConfig, config_from_preset
from fer_core.errors import FerError
from pages._shared import (DATA_SOURCE_KEY, SELECTED_RUN_KEY, checkpoints_dir, data_home, demo_dir,
                           require_router, runs_dir, state_badge, synthetic_badge, take_selected_run)

require_router()

REFRESH_S = 1.5
# Background jobs rebuild the config from `python -m fer_core train` flags: offer only those.
CLI_FIELDS = {flag[2:].replace("-", "_") for flag, _ in TRAIN_FLAGS}
CLI_SWITCHES = set(TRAIN_SWITCHES)
FINAL_STATES = ("completed", "failed", "cancelled")

MODE_LABELS = {"finetune": "Fine-tune all layers", "head_only": "Head only (frozen backbone)"}
STEM_LABELS = {"small": "Small: no max-pool (48-96 px faces)", "imagenet": "ImageNet: standard (112-224 px)"}
# Form fields: widget key suffix -> help text. Values come from TrainConfig + the preset.
HELP = {
    "experiment": "A folder name grouping related runs, e.g. 'lr-sweep'.",
    "mode": "Head only trains just the final layer on top of a frozen backbone: fast, but it "
            "needs ImageNet weights to be any good. Fine-tuning trains every layer: slower, better.",
    "stem": "The small stem drops ResNet's max-pool so 48 px faces keep enough resolution; "
            "use the ImageNet stem for 112-224 px inputs.",
    "epochs": "Passes over the training images.",
    "batch_size": "Images per optimisation step. Larger is faster per image but needs more memory.",
    "lr": "Peak learning rate. SGD likes ~0.05-0.1, AdamW ~1e-3.",
    "img_size": "Faces are stored at 48 px and resized to this. 48-64 px is fast on a CPU (hundreds "
                "of images/s); 224 px is the reference setting, about 10-30x slower on a CPU, and "
                "rarely better for 48 px source images.",
    "amp": "Mixed precision: bfloat16 on the CPU, float16 on CUDA. Faster, same accuracy.",
    "pretrained": "Start from ImageNet weights (downloaded; if that fails the run says so and "
                  "starts from random weights).",
    "seed": "Fixes the split, the shuffling and the augmentation: same seed, same run.",
    "val_fraction": "Share of the training images held out to pick the best epoch. 0 selects on "
                    "the test split (the reference's way, optimistic).",
    "label_smoothing": "Softens the targets (e.g. 0.1); helps with noisy labels like FER2013's.",
    "class_weights": "Weight the loss by inverse class frequency so rare classes (disgust) count.",
    "patience": "Stop after this many epochs without validation improvement (0 = never).",
    "tta": "Test-time augmentation: average the prediction over ten views (the face and its mirror, "
           "centred and shifted); evaluation takes 10x as long.",
    "optimizer": "SGD with Nesterov momentum, or AdamW.",
    "scheduler": "One-cycle warms up then anneals; cosine anneals; none keeps the LR fixed.",
    "weight_decay": "L2 regularisation strength.",
    "augment": "Random crops, flips, small rotations, brightness/contrast and erasing while training.",
    "max_per_class": "Use at most this many training images per class (0 = all): for quick trials.",
    "test_fraction": "Share of all images kept for the test (ignored when the source has its own split).",
    "warmup_epochs": "Epochs of linear LR warm-up before the cosine schedule (one-cycle has its own).",
    "num_threads": "Threads the training process may use on the CPU. Fewer is faster when other "
                   "programs keep the cores busy: oversubscribed cores slow training sharply.",
    "backbone_lr_scale": "When fine-tuning, the backbone learns at LR x this (the new head at LR).",
}

st.title("Train")
st.caption("Training runs in a background process: you can leave this page or close the browser. "
           "Everything it does is written to its run folder.")

folder = runs_dir()


# ---- new run ---------------------------------------------------------------------------

def default_preset(data: str) -> str:
    return "demo-quick" if data == "demo" else "cpu-fast"


def preset_values(preset: str) -> dict[str, Any]:
    defaults = TrainConfig().to_dict()
    values = dict(defaults)
    values.update(PRESETS[preset])
    for name, value in values.items():  # number inputs refuse an int where a float is expected
        if isinstance(defaults.get(name), float) and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
    values["experiment"] = preset
    values["max_per_class"] = values.get("max_per_class") or 0
    return values


def apply_preset() -> None:
    """Fill the form with the chosen preset's values (on preset or data change)."""
    preset = st.session_state["train_preset"]
    for name, value in preset_values(preset).items():
        st.session_state[f"tf_{name}"] = value
    st.session_state["tf_applied"] = (preset, st.session_state.get("train_data"))


def on_data_change() -> None:
    st.session_state["train_preset"] = default_preset(st.session_state["train_data"])
    apply_preset()


all_runs = runs.list_runs(folder)
active_runs = [r for r in all_runs if r.state in ui_data.ACTIVE_STATES]

FORM_OPEN_KEY = "train_form_open"
if st.session_state.pop("collapse_train_form", False):
    st.session_state[FORM_OPEN_KEY] = False  # a run was just launched: make room for the monitor
form_label = ("Start another run (it waits for the current one)" if active_runs else "New training run")
with st.expander(form_label, expanded=not all_runs, icon=":material/add_circle:", key=FORM_OPEN_KEY,
                 on_change="rerun"):
    choices = ui_data.discover_datasets(data_home(), demo_dir())
    labels = {c.spec: c.label for c in choices}
    remembered = st.session_state.get(DATA_SOURCE_KEY)
    if remembered and remembered not in labels:
        labels[remembered] = f"{ui_data.dataset_label(remembered)} (chosen on the Data page)"
    options = list(labels)
    if "train_data" not in st.session_state or st.session_state["train_data"] not in options:
        st.session_state["train_data"] = remembered if remembered in options else "demo"
    top_left, top_right = st.columns(2)
    data = top_left.selectbox("Data", options, format_func=labels.get, key="train_data",
                              on_change=on_data_change,
                              help="Add datasets on the Data page (Kaggle, a folder, fer2013.csv).")
    if "train_preset" not in st.session_state:
        st.session_state["train_preset"] = default_preset(data)
    preset = top_right.selectbox("Recipe (preset)", list(PRESETS), key="train_preset",
                                 on_change=apply_preset,
                                 help="A tested starting point; every value below can be changed.")
    if st.session_state.get("tf_applied") != (preset, data) or "tf_epochs" not in st.session_state:
        apply_preset()
    st.info(f"**{preset}**: {PRESET_DESCRIPTIONS.get(preset, '')}", icon=":material/tune:")
    if data == "demo":
        synthetic_badge()

    with st.form("train_form", border=False, enter_to_submit=False):
        c1, c2, c3 = st.columns(3)
        with c1:
            st.text_input("Experiment name", key="tf_experiment", help=HELP["experiment"])
            st.radio("Mode", list(MODE_LABELS), format_func=MODE_LABELS.get, key="tf_mode",
                     help=HELP["mode"])
            st.radio("Stem", list(STEM_LABELS), format_func=STEM_LABELS.get, key="tf_stem",
                     help=HELP["stem"])
            st.toggle("Start from ImageNet weights", key="tf_pretrained", help=HELP["pretrained"])
        with c2:
            st.number_input("Epochs", min_value=0, max_value=10_000, step=1, key="tf_epochs",
                            help=HELP["epochs"])
            st.number_input("Batch size", min_value=0, max_value=65_536, step=16, key="tf_batch_size",
                            help=HELP["batch_size"])
            st.number_input("Learning rate", min_value=0.0, max_value=10.0, step=1e-4, format="%g",
                            key="tf_lr", help=HELP["lr"])
            st.number_input("Image size (px)", min_value=1, max_value=4096, step=16, key="tf_img_size",
                            help=HELP["img_size"])
            st.toggle("Mixed precision (AMP)", key="tf_amp", help=HELP["amp"])
        with c3:
            st.number_input("Validation fraction", min_value=0.0, max_value=1.0, step=0.05,
                            key="tf_val_fraction", help=HELP["val_fraction"])
            st.number_input("Label smoothing", min_value=0.0, max_value=1.0, step=0.05,
                            key="tf_label_smoothing", help=HELP["label_smoothing"])
            st.number_input("Early-stopping patience (epochs)", min_value=0, max_value=1000, step=1,
                            key="tf_patience", help=HELP["patience"])
            st.number_input("Seed", min_value=0, step=1, key="tf_seed", help=HELP["seed"])
            st.toggle("Class weights", key="tf_class_weights", help=HELP["class_weights"])
            st.toggle("Test-time augmentation (10 views)", key="tf_tta", help=HELP["tta"])
        with st.expander("Advanced", icon=":material/settings:"):
            a1, a2, a3 = st.columns(3)
            a1.selectbox("Optimizer", ["sgd", "adamw"], key="tf_optimizer", help=HELP["optimizer"])
            a1.selectbox("LR schedule", ["onecycle", "cosine", "none"], key="tf_scheduler",
                         help=HELP["scheduler"])
            a2.number_input("Weight decay", min_value=0.0, step=1e-4, format="%g", key="tf_weight_decay",
                            help=HELP["weight_decay"])
            a2.number_input("Backbone LR scale", min_value=0.0, step=0.1, format="%g",
                            key="tf_backbone_lr_scale", help=HELP["backbone_lr_scale"])
            a3.number_input("Max images per class (0 = all)", min_value=0, step=50,
                            key="tf_max_per_class", help=HELP["max_per_class"])
            if "test_fraction" in CLI_FIELDS:
                a3.number_input("Test fraction", min_value=0.0, max_value=1.0, step=0.05,
                                key="tf_test_fraction", help=HELP["test_fraction"])
            if "warmup_epochs" in CLI_FIELDS:
                a2.number_input("Warm-up epochs", min_value=0.0, step=0.5, format="%g",
                                key="tf_warmup_epochs", help=HELP["warmup_epochs"])
            if "num_threads" in CLI_FIELDS:
                a3.number_input("CPU threads (0 = all cores)", min_value=0, max_value=256, step=1,
                                key="tf_num_threads", help=HELP["num_threads"])
            a1.toggle("Augmentation", key="tf_augment", help=HELP["augment"])
        submitted = st.form_submit_button("Launch training", type="primary", icon=":material/play_arrow:")

    if submitted:
        names = ["experiment", "mode", "stem", "pretrained", "epochs", "batch_size", "lr", "img_size",
                 "amp", "val_fraction", "label_smoothing", "patience", "seed", "class_weights", "tta",
                 "optimizer", "scheduler", "weight_decay", "backbone_lr_scale", "max_per_class",
                 "test_fraction", "augment", "num_threads", "warmup_epochs"]
        values = {name: st.session_state[f"tf_{name}"] for name in names
                  if name in CLI_FIELDS or name in CLI_SWITCHES}
        values["experiment"] = str(values["experiment"]).strip()
        values["max_per_class"] = int(values["max_per_class"]) or None
        try:
            if data != "demo" and not Path(data).exists():
                raise FerError(f"dataset not found: {data}")
            config = config_from_preset(preset, data=data, runs_dir=str(folder.resolve()),
                                        checkpoints_dir=str(checkpoints_dir().resolve()), **values)
            run_dir = jobs.launch(config, max_concurrent=1)
        except FerError as exc:
            st.error(f"Nothing was started: {exc}", icon=":material/error:")
        except OSError as exc:
            st.error(f"Nothing was started: could not create the run ({exc})", icon=":material/error:")
        else:
            st.session_state[SELECTED_RUN_KEY] = str(run_dir)
            st.session_state["collapse_train_form"] = True
            st.toast(f"Launched {runs.run_id(run_dir)}", icon=":material/rocket_launch:")
            st.rerun()


# ---- monitor ---------------------------------------------------------------------------

def stable_label(run: runs.RunInfo) -> str:
    data = ui_data.dataset_label(run.config.get("data"), run.config.get("synthetic_data"))
    return f"{run.id} · {data}"


def pick_run() -> runs.RunInfo | None:
    """The run to watch: a requested one, else the picker's, else newest active, else newest."""
    fresh = runs.list_runs(folder)
    if not fresh:
        return None
    options = [str(r.path) for r in fresh]
    by_path = {str(r.path): r for r in fresh}
    requested = take_selected_run()
    if requested in options:
        st.session_state["train_run_picker"] = requested
    elif st.session_state.get("train_run_picker") not in options:
        active = [r for r in fresh if r.state in ui_data.ACTIVE_STATES]
        st.session_state["train_run_picker"] = str((active or fresh)[0].path)
    # A label that never changes: the picker's text does not reliably redraw when a label
    # changes under a kept selection, and the state is shown (live) by the monitor below.
    chosen = st.selectbox("Run", options, key="train_run_picker",
                          format_func=lambda p: stable_label(by_path[p]))
    return by_path[chosen]


def resume_controls(run_dir: Path, run: runs.RunInfo, state: str) -> None:
    done = len(run.metrics)
    planned = int(run.config.get("epochs") or run.status.get("epochs") or done or 1)
    suggested = planned + 5 if state == "completed" else max(planned, done + 1)
    with st.popover("Resume", icon=":material/replay:", help="Continue from the last checkpoint"):
        total = st.number_input("Train until epoch", min_value=done + 1, value=max(suggested, done + 1),
                                step=1, key=f"resume_epochs_{run.id}",
                                help=f"{done} epoch(s) done. The schedule stretches to the new total.")
        if st.button("Resume training", type="primary", key=f"resume_{run.id}", icon=":material/play_arrow:"):
            try:
                jobs.resume_job(run_dir, epochs=int(total), max_concurrent=1)
            except (FerError, OSError) as exc:
                st.error(f"Cannot resume: {exc}")
            else:
                st.session_state[SELECTED_RUN_KEY] = str(run_dir)
                st.rerun(scope="app")


def monitor(run_dir: Path, was_active: bool) -> None:
    try:
        job = jobs.job_info(run_dir)
    except (FerError, OSError) as exc:
        st.error(f"Cannot read this run: {exc}")
        return
    run = runs.load_run(run_dir)
    state = job.state
    if was_active and state in FINAL_STATES:
        st.rerun(scope="app")  # redraw once, statically, with the final numbers
    config = run.config

    head, badges = st.columns([3, 2], vertical_alignment="center")
    with head:
        st.subheader(f"{job.experiment or config.get('experiment', '')} · {job.mode or config.get('mode', '')}")
        facts = [f"`{run.id}`", f"data: {ui_data.dataset_label(config.get('data'), config.get('synthetic_data'))}",
                 f"preset: {config.get('preset') or '—'}", config.get("device") or ""]
        st.caption(" · ".join(f for f in facts if f))
    with badges:
        with st.container(horizontal=True, horizontal_alignment="right"):
            state_badge(state)
            if config.get("synthetic_data") or config.get("data") == "demo":
                synthetic_badge()
            if config.get("weights_source"):
                st.badge(f"weights: {config['weights_source']}", color="gray")

    if config.get("weights_source") == "random" and config.get("pretrained"):
        st.warning("**ImageNet weights were requested but are not available**, so this run started "
                   "from random weights: expect lower accuracy, especially in head-only mode."
                   + (f"  \nDetails: {config['weights_warning']}" if config.get("weights_warning") else ""),
                   icon=":material/cloud_off:")
    if run.problems:
        st.warning("This run folder is damaged: " + "; ".join(run.problems), icon=":material/report:")
    if state == "failed":
        st.error(f"Training failed: {job.error or run.status.get('error') or 'the process ended unexpectedly'}",
                 icon=":material/error:")
    elif state == "running" and job.cancel_requested:
        st.info("Stopping: cancel requested. The run stops after the current batch and keeps its "
                "checkpoints.", icon=":material/hourglass_top:")
    elif state == "queued":
        st.info("Queued: one job trains at a time; this one starts when the current job ends.",
                icon=":material/schedule:")
    elif state == "cancelled":
        st.info("Cancelled. Its checkpoints are kept: resume it below.", icon=":material/cancel:")

    epoch, epochs = int(job.epoch or 0), int(job.epochs or config.get("epochs") or 0)
    batch, batches = int(job.batch or 0), int(job.batches or 0)
    fraction = ui_data.job_progress(job)
    st.progress(fraction, text=f"Run: epoch {epoch}/{epochs} · {fraction:.0%}")
    if state == "running" and batches:
        st.progress(min(batch / batches, 1.0), text=f"Epoch {epoch}: batch {batch}/{batches}")
    if job.phase and job.phase != "training":
        st.caption(f"Now: {job.phase}…")

    if state in ui_data.ACTIVE_STATES:
        if not job.cancel_requested and st.button(
                "Cancel run", icon=":material/stop_circle:", key=f"cancel_{run.id}",
                help="Stops after the current batch; checkpoints are kept and it can be resumed."):
            try:
                jobs.cancel(run_dir)
            except (FerError, OSError) as exc:
                st.error(f"Cannot cancel: {exc}")
            else:
                st.rerun(scope="app")
    elif run.last_checkpoint.is_file():
        resume_controls(run_dir, run, state)

    m1, m2, m3, m4 = st.columns(4)
    if state in ui_data.ACTIVE_STATES:
        m1.metric("Time left", ui_data.format_duration(job.eta_s) if state == "running" else "—", border=True)
        m2.metric("Speed", f"{job.images_per_second:,.0f} img/s" if job.images_per_second else "—", border=True)
    else:
        m1.metric("Test accuracy", ui_data.format_percent(run.test_accuracy), border=True)
        m2.metric("Macro-F1", ui_data.format_percent(run.macro_f1), border=True)
    m3.metric("Best val accuracy", ui_data.format_percent(run.best_val_acc), border=True)
    m4.metric("Duration", ui_data.format_duration(run.duration_s), border=True)

    if state == "completed":
        with st.container(border=True):
            st.markdown(f":material/check_circle: **Finished.** Test accuracy "
                        f"**{ui_data.format_percent(run.test_accuracy)}**, macro-F1 "
                        f"**{ui_data.format_percent(run.macro_f1)}** on {config.get('num_test', '?')} test images."
                        + (" The best model was published to the checkpoints folder."
                           if run.status.get("published_checkpoint") else ""))
            if st.button("See which faces it gets wrong", icon=":material/grid_on:", key=f"to_eval_{run.id}"):
                st.session_state[SELECTED_RUN_KEY] = str(run_dir)
                st.switch_page("pages/evaluate.py")

    if run.metrics:
        st.plotly_chart(ui_data.curves_figure(run.metrics, config.get("selection_split", "val")),
                        key=f"curves_{run.id}")
    elif state in ui_data.ACTIVE_STATES:
        st.caption("Loss and accuracy curves appear after the first epoch.")

    table_col, log_col = st.columns([3, 2])
    with table_col:
        st.markdown("**Metrics per epoch**")
        if run.metrics:
            st.dataframe(ui_data.metrics_frame(run.metrics), hide_index=True, height=240,
                         column_config={
                             "train_acc": st.column_config.NumberColumn("train acc", format="percent"),
                             "val_acc": st.column_config.NumberColumn("val acc", format="percent"),
                             "train_loss": st.column_config.NumberColumn("train loss", format="%.4f"),
                             "val_loss": st.column_config.NumberColumn("val loss", format="%.4f"),
                             "lr": st.column_config.NumberColumn(format="%.2e"),
                             "seconds": st.column_config.NumberColumn("s", format="%.1f"),
                             "images_per_second": st.column_config.NumberColumn("img/s", format="%.0f")})
        else:
            st.caption("No epoch finished yet.")
    with log_col:
        st.markdown("**Log**")
        st.code(job.log_tail or "(no output yet)", language=None,
                height=240, wrap_lines=True)

    queued = [j for j in jobs.list_jobs(folder) if j.state == "queued" and Path(j.run_dir) != run_dir]
    if queued:
        st.markdown("**Queue**")
        st.dataframe([{"run": runs.run_id(Path(j.run_dir)), "experiment": j.experiment, "mode": j.mode,
                       "queued": ui_data.format_time(j.queued_at)} for j in queued],
                     hide_index=True, key="train_queue")


st.divider()
st.subheader("Monitor")
selected = pick_run()
if selected is None:
    st.info("No runs yet. Launch one above, or use **Train a quick model** on the Home page.",
            icon=":material/info:")
else:
    # the same reading as the picker's label, so the two never disagree
    if selected.state in ui_data.ACTIVE_STATES:
        st.fragment(monitor, run_every=REFRESH_S)(selected.path, True)
    else:
        monitor(selected.path, False)
