"""Train: configure and launch a run, then watch it learn (live), cancel or resume it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from fer_core import config_form, distributed, doctor, jobs, runs, settings, ui_data
from fer_core.config import PRESET_DESCRIPTIONS, PRESETS, TrainConfig, config_from_preset, require_dataset
from fer_core.errors import FerError
from pages._shared import (DATA_SOURCE_KEY, SELECTED_RUN_KEY, checkpoints_dir, known_datasets,
                           literal, load_source, require_router, runs_dir, state_badge, synthetic_badge,
                           take_selected_run)

require_router()

REFRESH_S = 1.5
LOG_LINES_SHOWN = 12
FINAL_STATES = ("completed", "failed", "cancelled")

# The form's values live here, and every widget is drawn with its value from here as its
# default. A value given only through a widget's session-state key reaches the browser once,
# as a "set value" instruction: a widget inside the folded expander is not mounted then, and
# when it mounts later it shows its own default, the minimum (issue #11: a form of zeros when
# the form was opened while the page was still loading). A default is part of the widget
# itself, so the browser always has it.
FORM_VALUES_KEY = "train_form_values"
FORM_SOURCE_KEY = "train_form_for"  # the (preset, data, exclusion list) the values were filled for

st.title("Train")
st.caption("Training runs in a background process: you can leave this page or close the browser. "
           "Everything it does is written to its run folder.")

folder = runs_dir()


# ---- new run ---------------------------------------------------------------------------

def default_preset(data: str) -> str:
    return "demo-quick" if data == "demo" else "cpu-fast"


def fill_form_from_preset() -> None:
    """Fill the form with the chosen preset's values (on preset or data change), and the
    dataset doctor's exclusion list for the chosen data when there is one."""
    preset, data = st.session_state["train_preset"], st.session_state.get("train_data")
    exclusions = doctor.default_exclusions(data)
    st.session_state[FORM_VALUES_KEY] = {**config_form.preset_form_values(preset), "exclude": exclusions}
    st.session_state[FORM_SOURCE_KEY] = (preset, data, exclusions)
    # and into the mounted widgets at once: they keep their own state, whatever their default
    for field in config_form.form_fields():
        st.session_state[field.key] = st.session_state[FORM_VALUES_KEY][field.name]


def on_data_change() -> None:
    st.session_state["train_preset"] = default_preset(st.session_state["train_data"])
    fill_form_from_preset()


def keep_submitted_values() -> None:
    """The submit button's callback: what the user submitted becomes the form's values."""
    values = st.session_state[FORM_VALUES_KEY]
    for field in config_form.form_fields():
        if field.key in st.session_state:
            values[field.name] = st.session_state[field.key]


def time_estimate(preset: str, data: str, values: dict[str, Any]) -> None:
    """How long the run in the form would take here: a speed measured on this machine (a few
    training steps, on request, then kept) times the dataset's split counts."""
    from fer_core import estimate
    try:
        config = config_from_preset(preset, data=data, **config_form.overrides_from_form(values))
    except FerError:
        return  # the form says what is wrong when it is submitted
    speed = estimate.known_speed(config)
    if speed is None:
        if st.button("Estimate the time on this machine", icon=":material/timer:", key="train_estimate",
                     help="Times a few training steps of this recipe here (seconds on a fast machine, a "
                          "minute on a slow one): machines differ too much for a quoted figure."):
            try:
                with st.spinner("Timing a few training steps on this machine…"):
                    estimate.measure_speed(config)
            except OSError as exc:  # speed.json lives in the cache folder, which may be read-only
                st.error(f"The measured speed could not be recorded: {literal(exc)}", icon=":material/error:")
            else:
                st.rerun()
        return
    counts = split_counts(data, config)
    if counts is None:
        return
    seconds = estimate.estimate_seconds(config, counts, speed)
    st.caption(f"About **{estimate.format_duration(seconds)}** on this machine: {config.epochs} epochs of "
               f"{counts['train']:,} training images at {speed.train_images_per_second:,.0f} img/s (measured "
               "here for these settings), validation and the final test included.")


def split_counts(data: str, config: TrainConfig) -> dict[str, int] | None:
    """Images per split for this config, as training will split them (exclusions aside)."""
    from fer_core.data import assign_splits, cap_training_images
    try:
        dataset = load_source(data, str(settings.cache_dir()))
        splits = assign_splits(dataset, test_fraction=config.test_fraction, val_fraction=config.val_fraction,
                               seed=config.seed)
    except (FerError, OSError):
        return None
    if config.max_per_class:
        splits = cap_training_images(dataset, splits, config.max_per_class, config.seed)
    return {split: int((splits == split).sum()) for split in ("train", "val", "test")}


def draw_field(field: config_form.FormField, value: Any) -> None:
    """One widget, entirely as the field's setting describes it, starting at `value`."""
    if field.widget == "toggle":
        st.toggle(field.label, value=bool(value), key=field.key, help=field.help)
    elif field.widget in ("radio", "select"):
        draw = st.radio if field.widget == "radio" else st.selectbox
        index = field.options.index(value) if value in field.options else 0
        draw(field.label, field.options, index=index, format_func=field.option_label, key=field.key,
             help=field.help)
    elif field.widget == "number":
        st.number_input(field.label, value=field.kind(value), min_value=field.min_value, max_value=field.max_value,
                        step=field.step, format=field.format, key=field.key, help=field.help)
    else:
        st.text_input(field.label, value=value, max_chars=field.max_chars, key=field.key, help=field.help)


all_runs = runs.list_runs(folder)
active_runs = [r for r in all_runs if r.status.active]

FORM_OPEN_KEY = "train_form_open"
if st.session_state.pop("collapse_train_form", False):
    st.session_state[FORM_OPEN_KEY] = False  # a run was just launched: make room for the monitor
form_label = ("Start another run (it waits for the current one)" if active_runs else "New training run")
with st.expander(form_label, expanded=not all_runs, icon=":material/add_circle:", key=FORM_OPEN_KEY,
                 on_change="rerun"):
    labels = known_datasets()
    remembered = st.session_state.get(DATA_SOURCE_KEY)
    options = list(labels)
    # The two pickers' own keys can be dropped like any widget's: fall back to what the form
    # was last filled for before falling back to the defaults.
    filled_for = st.session_state.get(FORM_SOURCE_KEY) or (None, None)
    if "train_data" not in st.session_state or st.session_state["train_data"] not in options:
        st.session_state["train_data"] = next(
            (spec for spec in (filled_for[1], remembered) if spec in options), "demo")
    top_left, top_right = st.columns(2)
    data = top_left.selectbox("Data", options, format_func=labels.get, key="train_data",
                              on_change=on_data_change,
                              help="Add datasets on the Data page (Kaggle, a folder, fer2013.csv).")
    if st.session_state.get("train_preset") not in PRESETS:
        st.session_state["train_preset"] = (filled_for[0] if filled_for[1] == data and filled_for[0] in PRESETS
                                            else default_preset(data))
    preset = top_right.selectbox("Recipe (preset)", list(PRESETS), key="train_preset",
                                 on_change=fill_form_from_preset,
                                 help="A tested starting point; every value below can be changed.")
    filled = (preset, data, doctor.default_exclusions(data))  # a list written or removed since: refill
    if st.session_state.get(FORM_SOURCE_KEY) != filled or FORM_VALUES_KEY not in st.session_state:
        fill_form_from_preset()
    form_values = st.session_state[FORM_VALUES_KEY]
    st.info(f"**{preset}**: {PRESET_DESCRIPTIONS.get(preset, '')}", icon=":material/tune:")
    time_estimate(preset, data, form_values)
    if form_values.get("exclude"):
        left_out, problem = doctor.exclusion_summary(form_values["exclude"])
        if problem:
            st.warning(f"Exclusion list (Advanced): {literal(problem)}", icon=":material/warning:")
        else:
            st.info(f"{left_out:,} images left out by the dataset doctor (the exclusion list under Advanced; "
                    "empty that field to train on every image).", icon=":material/healing:")
    if data == "demo":
        synthetic_badge()

    with st.form("train_form", border=False, enter_to_submit=False):
        for column, group in zip(st.columns(len(config_form.COLUMN_GROUPS)), config_form.COLUMN_GROUPS):
            with column:
                st.markdown(f"**{config_form.GROUP_TITLES[group]}**")
                for field in config_form.form_fields(group):
                    draw_field(field, form_values[field.name])
        with st.expander(config_form.GROUP_TITLES[config_form.FOLDED_GROUP], icon=":material/settings:"):
            columns = st.columns(3)
            for index, field in enumerate(config_form.form_fields(config_form.FOLDED_GROUP)):
                with columns[index % len(columns)]:
                    draw_field(field, form_values[field.name])
        submitted = st.form_submit_button("Launch training", type="primary", icon=":material/play_arrow:",
                                          on_click=keep_submitted_values)

    if submitted:
        values = config_form.overrides_from_form(st.session_state[FORM_VALUES_KEY])
        try:
            require_dataset(data)
            config = config_from_preset(preset, data=data, runs_dir=str(folder.resolve()),
                                        checkpoints_dir=str(checkpoints_dir().resolve()), **values)
            run_dir = jobs.launch(config, max_concurrent=1)
        except FerError as exc:
            st.error(f"Nothing was started: {literal(exc)}", icon=":material/error:")
        except OSError as exc:
            st.error(f"Nothing was started: could not create the run ({literal(exc)})", icon=":material/error:")
        else:
            st.session_state[SELECTED_RUN_KEY] = str(run_dir)
            st.session_state["collapse_train_form"] = True
            st.toast(f"Launched {literal(runs.run_id(run_dir))}", icon=":material/rocket_launch:")
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
    # resolved paths: a launch names its run absolutely, the runs folder may be relative
    options = [str(r.path.resolve()) for r in fresh]
    by_path = dict(zip(options, fresh))
    requested = take_selected_run()
    requested = str(Path(requested).resolve()) if requested else None
    if requested in options:
        st.session_state["train_run_picker"] = requested
    elif st.session_state.get("train_run_picker") not in options:
        active = [r for r in fresh if r.status.active]
        st.session_state["train_run_picker"] = str((active or fresh)[0].path.resolve())
    # A label that never changes: the picker's text does not reliably redraw when a label
    # changes under a kept selection, and the state is shown (live) by the monitor below.
    chosen = st.selectbox("Run", options, key="train_run_picker",
                          format_func=lambda p: stable_label(by_path[p]))
    return by_path[chosen]


def resume_controls(run_dir: Path, run: runs.RunInfo, state: str) -> None:
    done = len(run.metrics)
    planned = run.planned_epochs or done or 1  # the latest attempt's total: a resume may have extended it
    suggested = planned + 5 if state == "completed" else max(planned, done + 1)
    with st.popover("Resume", icon=":material/replay:", help="Continue from the last checkpoint"):
        total = st.number_input("Train until epoch", min_value=done + 1, value=max(suggested, done + 1),
                                step=1, key=f"resume_epochs_{run.id}",
                                help=f"{done} epoch(s) done. The schedule stretches to the new total.")
        if st.button("Resume training", type="primary", key=f"resume_{run.id}", icon=":material/play_arrow:"):
            try:
                jobs.resume_job(run_dir, epochs=int(total), max_concurrent=1)
            except (FerError, OSError) as exc:
                st.error(f"Cannot resume: {literal(exc)}")
            else:
                st.session_state[SELECTED_RUN_KEY] = str(run_dir)
                st.rerun(scope="app")


def other_machines(config: dict[str, Any]) -> None:
    """A run on several machines waits for the others: what to start on each of them."""
    try:
        commands = distributed.other_machine_commands(TrainConfig.from_dict(config))
    except (FerError, TypeError) as exc:  # a config.json edited or damaged by hand
        st.warning(f"The other machines' command cannot be made from this run's config: {literal(exc)}",
                   icon=":material/report:")
        return
    with st.expander(f"Other machines: start this on each of the {len(commands)}", expanded=True,
                     icon=":material/dns:"):
        st.caption("This machine is machine 0 and writes the run folder. Each other machine needs fer "
                   "installed and the dataset at the same path; the run starts when all have joined.")
        for command in commands:
            st.code(command, language="bash")


def monitor(run_dir: Path, was_active: bool) -> None:
    run = runs.load_run(run_dir)
    status, state = run.status, run.status.state
    if was_active and state in FINAL_STATES:
        st.rerun(scope="app")  # redraw once, statically, with the final numbers
    config = run.config

    head, badges = st.columns([3, 2], vertical_alignment="center")
    with head:
        st.subheader(f"{literal(run.experiment)} · {literal(run.mode)}")
        facts = [f"{literal(run.id)}",
                 f"data: {literal(ui_data.dataset_label(config.get('data'), config.get('synthetic_data')))}",
                 f"preset: {literal(config.get('preset') or '—')}", literal(config.get("device") or ""),
                 f"world size {config['world_size']}" if (config.get("world_size") or 1) > 1 else ""]
        st.caption(" · ".join(f for f in facts if f))
    with badges:
        with st.container(horizontal=True, horizontal_alignment="right"):
            state_badge(state)
            if config.get("synthetic_data") or config.get("data") == "demo":
                synthetic_badge()
            if config.get("weights_source"):
                st.badge(f"weights: {literal(config['weights_source'])}", color="gray")

    if config.get("weights_source") == "random" and config.get("pretrained"):
        st.info("ImageNet weights were requested but are not available (no network?), so this run "
                "started from random weights: expect lower accuracy, especially in head-only mode. "
                "The log has the details; a local weights file can be given with --weights.",
                icon=":material/cloud_off:")
    if run.problems:
        st.warning("This run folder is damaged: " + literal("; ".join(run.problems)), icon=":material/report:")
    if state == "failed":
        st.error(f"Training failed: {literal(status.error or 'the process ended unexpectedly')}",
                 icon=":material/error:")
    elif state == "running" and status.cancel_requested:
        st.info("Stopping: cancel requested. The run stops after the current batch and keeps its "
                "checkpoints.", icon=":material/hourglass_top:")
    elif state == "queued":
        st.info("Queued: one job trains at a time; this one starts when the current job ends.",
                icon=":material/schedule:")
    elif state == "cancelled" and run.last_checkpoint.is_file():
        st.info(f"Cancelled after {status.epoch} epoch(s). Its checkpoints are kept: resume it below.",
                icon=":material/cancel:")
    elif state == "cancelled":
        st.info("Cancelled before its first epoch finished, so there is no checkpoint to resume from. "
                "Start it again below with the same settings.", icon=":material/cancel:")

    if status.early_stopped_at:
        st.info(f"Stopped early after epoch {status.early_stopped_at}: "
                f"{literal(status.stop_reason or 'no improvement within the patience')}.",
                icon=":material/content_cut:")
    if (config.get("nnodes") or 1) > 1 and state in ("queued", "running"):
        other_machines(config)
    trial, _ = runs.read_json_object(run.layout.trial_file)
    if trial is not None:
        st.caption(f"Trial {literal(trial.get('trial', '?'))} of the sweep {literal(trial.get('study', '?'))} "
                   f"({literal(trial.get('state', '?'))}); see the Sweeps page.")

    epoch, epochs = status.epoch, run.planned_epochs or 0
    batch, batches = status.batch, status.batches or 0
    fraction = ui_data.job_progress(status)
    st.progress(fraction, text=f"Run: epoch {epoch}/{epochs} · {fraction:.0%}")
    if state == "running" and batches:
        st.progress(min(batch / batches, 1.0), text=f"Epoch {epoch}: batch {batch}/{batches}")
    if status.phase and status.phase != "training":
        st.caption(f"Now: {literal(status.phase)}…")

    if state in runs.ACTIVE_STATES:
        if not status.cancel_requested and st.button(
                "Cancel run", icon=":material/stop_circle:", key=f"cancel_{run.id}",
                help="Stops after the current batch; checkpoints are kept and it can be resumed."):
            try:
                jobs.cancel(run_dir)
            except (FerError, OSError) as exc:
                st.error(f"Cannot cancel: {literal(exc)}")
            else:
                st.rerun(scope="app")
    elif run.last_checkpoint.is_file():
        resume_controls(run_dir, run, state)
    elif state in ("cancelled", "failed"):
        start_again_button(run)

    m1, m2, m3, m4 = st.columns(4)
    if state in runs.ACTIVE_STATES:
        m1.metric("Time left", ui_data.format_duration(status.eta_s) if state == "running" else "—", border=True)
        m2.metric("Speed", f"{status.images_per_second:,.0f} img/s" if status.images_per_second else "—",
                  border=True)
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
                           if status.published_checkpoint else ""))
            if st.button("See which faces it gets wrong", icon=":material/grid_on:", key=f"to_eval_{run.id}"):
                st.session_state[SELECTED_RUN_KEY] = str(run_dir)
                st.switch_page("pages/evaluate.py")

    if run.metrics:
        st.plotly_chart(ui_data.curves_figure(run.metrics, config.get("selection_split", "val")),
                        key=f"curves_{run.id}")
    elif state in runs.ACTIVE_STATES:
        st.caption("Loss and accuracy curves appear after the first epoch.")

    table_col, log_col = st.columns([3, 2])
    with table_col:
        st.markdown("**Metrics per epoch**")
        if run.metrics:
            st.dataframe(ui_data.metrics_frame(run.metrics), hide_index=True, height=240, placeholder="—",
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
        log_view(run.log_tail())

    queued = [r for r in jobs.active_runs(folder) if r.state == "queued" and r.path != run_dir]
    if queued:
        st.markdown("**Queue**")
        st.dataframe([{"run": r.id, "experiment": r.experiment, "mode": r.mode,
                       "queued": ui_data.format_time(r.status.queued_at)} for r in queued],
                     hide_index=True, key="train_queue")


def log_view(tail: str) -> None:
    """The log's newest lines, newest at the bottom and in view: a box sized to what it shows,
    so nothing needs scrolling to see the latest epoch."""
    lines = tail.splitlines()[-LOG_LINES_SHOWN:] if tail else ["(no output yet)"]
    st.code("\n".join(lines), language=None, wrap_lines=False)


def start_again_button(run: runs.RunInfo) -> None:
    """A new run with the same config, for a run that cannot be resumed."""
    if st.button("Start again", icon=":material/restart_alt:", key=f"again_{run.id}",
                 help="Launch a new run with exactly the same settings."):
        try:
            run_dir = jobs.launch(TrainConfig.from_dict(run.config), max_concurrent=1)
        except (FerError, OSError, TypeError) as exc:
            st.error(f"Nothing was started: {literal(exc)}", icon=":material/error:")
        else:
            st.session_state[SELECTED_RUN_KEY] = str(run_dir)
            st.rerun(scope="app")


st.divider()
st.subheader("Monitor")
selected = pick_run()
if selected is None:
    st.info("No runs yet. Launch one above, or use **Train a quick model** on the Home page.",
            icon=":material/info:")
else:
    # the same reading as the picker's label, so the two never disagree
    if selected.status.active:
        st.fragment(monitor, run_every=REFRESH_S)(selected.path, True)
    else:
        monitor(selected.path, False)
