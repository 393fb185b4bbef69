"""Sweeps: search hyper-parameters with Optuna in a background process, compare its trials with
Optuna's own charts, then train the best settings fully or open any trial's run."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fer_core import jobs, runs, sweep, ui_data
from fer_core.config import FIELDS_BY_NAME, PRESET_DESCRIPTIONS, PRESETS, config_from_preset, require_dataset
from fer_core.errors import FerError
from pages._shared import (SELECTED_RUN_KEY, checkpoints_dir, known_datasets, literal, require_router,
                           runs_dir, state_badge)

require_router()

REFRESH_S = 2.0
MAX_EPOCHS = int(FIELDS_BY_NAME["epochs"].setting.max_value)
STUDY_KEY = "sweeps_study"          # the study shown (a launch selects its own)
NEW_NAME_KEY = "sweeps_new_name"    # the suggested name for the next sweep, stable across reruns

st.title("Sweeps")
st.caption("A sweep trains many short runs with different settings and keeps the best. It runs in a "
           "background process, one trial at a time; every trial is a normal run (named "
           + literal("<study>-t<number>") + ") on the Runs and Train pages.")

folder = runs_dir()
sweeps_root = sweep.sweeps_folder(runs_dir=folder)


# ---- a new sweep -----------------------------------------------------------------------

def default_epochs(preset: str) -> int:
    """Trials are short: half the recipe's epochs tells good settings from bad ones."""
    return max(2, int(PRESETS[preset].get("epochs", 10)) // 2)


def launch_form(first_sweep: bool) -> None:
    with st.expander("New sweep", expanded=first_sweep, icon=":material/add_circle:"):
        labels = known_datasets()
        left, right = st.columns(2)
        data = left.selectbox("Data", list(labels), format_func=labels.get, key="sweep_data")
        # trials are compared on a validation split: a recipe without one cannot be swept
        presets = [name for name, values in PRESETS.items() if values.get("val_fraction", 1) != 0]
        # keyed by the data: a kept choice would ignore the default that suits newly picked data
        preset = right.selectbox("Recipe (preset)", presets, key=f"sweep_preset::{data}",
                                 index=presets.index("demo-quick" if data == "demo" else "cpu-fast"),
                                 help="The settings every trial starts from; the space below varies some of them.")
        st.caption(PRESET_DESCRIPTIONS.get(preset, ""))
        st.session_state.setdefault(NEW_NAME_KEY, sweep.new_study_name())
        with st.form("sweep_form", border=False, enter_to_submit=False):
            name_col, trials_col, epochs_col, pruner_col = st.columns(4)
            study = name_col.text_input("Study name", value=st.session_state[NEW_NAME_KEY],
                                        max_chars=sweep.MAX_STUDY_NAME,
                                        help="An existing name continues that study.")
            trials = trials_col.number_input("Trials", min_value=1, max_value=1000, value=8, step=1,
                                             help="The study's total: a sweep continued later, or helped "
                                                  "by another worker, stops when the study holds this many.")
            epochs = epochs_col.number_input("Epochs per trial", min_value=1, max_value=10_000,
                                             value=default_epochs(preset), step=1)
            pruner = pruner_col.selectbox("Pruner", sweep.PRUNERS,
                                          help="Stops weak trials early: median (below the median of earlier "
                                               "trials at the same epoch), halving (successive halving), none.")
            space = st.text_area(
                "Search space", value=sweep.example_space(float(PRESETS[preset].get("lr", 1e-3))),
                key=f"sweep_space_{preset}",  # a new recipe brings a space around its own learning rate
                help="Comma-separated: name=LOW..HIGH (uniform), name=log:LOW..HIGH (log scale), "
                     "name=choice:A|B. Fields: " + ", ".join(sweep.tunable_fields()))
            submitted = st.form_submit_button("Launch sweep", type="primary", icon=":material/play_arrow:")
    if submitted:
        launch(data, preset, study.strip(), int(trials), int(epochs), pruner, space)


def launch(data: str, preset: str, study: str, trials: int, epochs: int, pruner: str, space: str) -> None:
    try:
        require_dataset(data)
        base = config_from_preset(preset, data=data, epochs=epochs, runs_dir=str(folder.resolve()),
                                  checkpoints_dir=str(checkpoints_dir().resolve()))
        sweep.launch_sweep(base, space, study=study, trials=trials, pruner=pruner, sweeps_dir=sweeps_root)
    except (FerError, OSError) as exc:
        st.error(f"Nothing was started: {literal(exc)}", icon=":material/error:")
        return
    st.session_state[STUDY_KEY] = study
    st.session_state.pop(NEW_NAME_KEY, None)
    st.toast(f"Sweep {literal(study)} started", icon=":material/rocket_launch:")
    st.rerun()


# ---- one study -------------------------------------------------------------------------

def study_view(entry: sweep.StudyEntry, was_running: bool) -> None:
    """What the study holds now: its job, trials, best settings and charts (live while it runs)."""
    job = sweep.read_sweep_job(entry.folder)
    running = job is not None and job.running
    if was_running and not running:
        st.rerun(scope="app")  # once more, statically, with the final trials
    with st.container(horizontal=True, vertical_alignment="center"):
        state_badge("running" if running else "finished" if job else "stored")
        if job is not None and job.stop_requested and running:
            st.badge("stopping after this trial", color="orange")
    st.caption(f"Storage: {literal(sweep.shown_storage(entry.storage))} · objective: {sweep.OBJECTIVE}, "
               f"{sweep.DIRECTION}d")
    try:
        study = sweep.load_study_at(entry.folder)
    except FerError as exc:
        st.warning(f"The study cannot be read: {literal(exc)}", icon=":material/report:")
        return
    if study is None:
        st.info("The sweep is starting: no trial is recorded yet.", icon=":material/hourglass_top:")
        return
    st.caption(f"Search space: {literal(study.user_attrs.get('space', '?'))}")
    frame = sweep.trials_frame(study)
    counts = frame["state"].value_counts().to_dict()
    best = sweep.best_trial(study)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Trials", len(frame), border=True)
    m2.metric("Complete", counts.get("complete", 0), border=True)
    m3.metric("Pruned", counts.get("pruned", 0), border=True)
    m4.metric("Best val accuracy", ui_data.format_percent(best.value if best else None), border=True)
    if best is not None:
        st.success(f"Best: trial {best.number} with {literal(format_params(best.params))}",
                   icon=":material/emoji_events:")
    st.dataframe(frame, hide_index=True, key=f"sweep_trials_{entry.name}", placeholder="—",
                 column_config={"value": st.column_config.NumberColumn("best val acc", format="percent"),
                                "duration": st.column_config.NumberColumn("s", format="%.0f"),
                                "run": st.column_config.TextColumn("run id", width="large")})
    charts = sweep.study_charts(study)
    for row in range(0, len(charts), 2):
        for column, chart in zip(st.columns(2), charts[row:row + 2]):
            with column:
                st.markdown(f"**{chart.title}**")
                if chart.figure is not None:
                    st.plotly_chart(chart.figure, key=f"sweep_chart_{entry.name}_{chart.title}")
                else:
                    st.caption(chart.note)


def format_params(params: dict) -> str:
    return ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in params.items())


def stop_controls(entry: sweep.StudyEntry) -> None:
    job = entry.job
    if job is None or not job.running:
        return
    left, right = st.columns(2)
    if left.button("Stop after this trial", icon=":material/stop_circle:", key="sweep_stop",
                   disabled=job.stop_requested, help="The running trial finishes; no new one starts."):
        try:
            sweep.stop_sweep(entry.folder)
        except (FerError, OSError) as exc:
            st.error(f"Cannot stop it: {literal(exc)}")
        else:
            st.rerun()
    if right.button("Stop now", icon=":material/cancel:", key="sweep_stop_now",
                    help="Cancels the running trial within a batch (its checkpoints are kept)."):
        try:
            sweep.stop_sweep(entry.folder, at_once=True)
        except (FerError, OSError) as exc:
            st.error(f"Cannot stop it: {literal(exc)}")
        else:
            st.rerun()


def follow_up_controls(entry: sweep.StudyEntry) -> None:
    """Train the best settings fully, or open one trial's run on the Train page."""
    try:
        study = sweep.load_study_at(entry.folder)
    except FerError:
        return
    if study is None:
        return
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("run_dir")]
    best = sweep.best_trial(study)
    left, right = st.columns(2)
    with left.container(border=True):
        st.markdown("**Train this config fully**")
        if best is None:
            st.caption("Available when a trial has completed.")
        else:
            base_epochs = int(study.user_attrs.get("base_config", {}).get("epochs") or 1)
            preset = study.user_attrs.get("base_config", {}).get("preset")
            suggested = min(max(int(PRESETS[preset]["epochs"]) if preset in PRESETS else 0, base_epochs * 2),
                            MAX_EPOCHS)
            # keyed by study: another study's choice must not carry over
            epochs = st.number_input("Epochs", min_value=1, max_value=MAX_EPOCHS, value=suggested, step=1,
                                     key=f"sweep_full_epochs::{study.study_name}")
            if st.button("Train this config fully", type="primary", icon=":material/model_training:",
                         key="sweep_train_best",
                         help="A normal training job with the best trial's settings and more epochs."):
                try:
                    config = sweep.full_training_config(study, epochs=int(epochs), runs_dir=folder.resolve(),
                                                        checkpoints_dir=checkpoints_dir().resolve())
                    run_dir = jobs.launch(config, max_concurrent=1)
                except (FerError, OSError) as exc:
                    st.error(f"Nothing was started: {literal(exc)}", icon=":material/error:")
                else:
                    st.session_state[SELECTED_RUN_KEY] = str(run_dir)
                    st.switch_page("pages/train.py")
    with right.container(border=True):
        st.markdown("**Open this trial's run**")
        if not trials:
            st.caption("Available when a trial has started.")
            return
        numbers = {t.number: t for t in trials}
        order = sorted(numbers, key=lambda n: (n != (best.number if best else None), n))
        chosen = st.selectbox("Trial", order, key="sweep_open_trial",
                              format_func=lambda n: f"trial {n} ({numbers[n].state.name.lower()})")
        if st.button("Open this trial's run", icon=":material/open_in_new:", key="sweep_open_run"):
            st.session_state[SELECTED_RUN_KEY] = numbers[chosen].user_attrs["run_dir"]
            st.switch_page("pages/train.py")


def add_study_form() -> None:
    """List a study kept in another database (e.g. PostgreSQL, started on another machine)."""
    with st.expander("Add a study from another database", icon=":material/database:"):
        st.caption("Sweeps on several machines share one database: give its URL (e.g. "
                   + literal("postgresql://user:password@host/db") + ") to follow a study started "
                   "elsewhere. It is listed here from then on; nothing in it is changed.")
        url = st.text_input("Database URL", key="sweeps_add_url", type="password")
        if not url:
            return
        try:
            names = sweep.study_names(url)
        except FerError as exc:
            st.error(literal(exc), icon=":material/error:")
            return
        if not names:
            st.info("That database holds no study yet.", icon=":material/info:")
            return
        name = st.selectbox("Study", names, key="sweeps_add_name")
        if st.button("Add this study", icon=":material/add:", key="sweeps_add"):
            try:
                sweep.remember_storage(sweeps_root, name, url)
            except (FerError, OSError) as exc:
                st.error(f"Not added: {literal(exc)}", icon=":material/error:")
            else:
                st.session_state[STUDY_KEY] = name
                st.rerun()


# ---- the page --------------------------------------------------------------------------

studies = sweep.list_studies(sweeps_root)
launch_form(first_sweep=not studies)
st.divider()
st.subheader("Studies")
add_study_form()
if not studies:
    st.info("No sweeps yet. Launch one above, or from a terminal: fer sweep --data demo --preset demo-quick "
            "--epochs 3 --trials 8 --space " + literal(sweep.example_space(2e-3)), icon=":material/info:")
    st.stop()

by_name = {entry.name: entry for entry in studies}
if st.session_state.get(STUDY_KEY) not in by_name:
    st.session_state[STUDY_KEY] = studies[0].name
chosen_name = st.selectbox("Study", list(by_name), key=STUDY_KEY,
                           format_func=lambda n: n + (" (running)" if by_name[n].job and by_name[n].job.running
                                                      else ""))
entry = by_name[chosen_name]
st.subheader(literal(entry.name))
stop_controls(entry)
if entry.job is not None and entry.job.running:
    st.fragment(study_view, run_every=REFRESH_S)(entry, True)
else:
    study_view(entry, False)
follow_up_controls(entry)
if entry.job is not None:
    with st.expander("Sweep log", icon=":material/description:"):
        st.code(runs.read_text_tail(Path(entry.job.log_file)) or "(no output yet)", language=None)
