"""Streamlit bits every page shares: the folders in session state, the sidebar, badges.

Not a page (the router lists pages explicitly). Anything that is not drawing lives in
fer_core.ui_data instead.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import streamlit as st

from fer_core import settings, ui_data

ROUTER = Path(__file__).resolve().parent.parent / "streamlit_app.py"
RUNS_DIR_KEY = "runs_dir"
CHECKPOINTS_DIR_KEY = "checkpoints_dir"
SELECTED_RUN_KEY = "selected_run"          # a one-shot request: "show this run" (Train, Evaluate)
DATA_SOURCE_KEY = "data_source"            # the data source last chosen on the Data page


def require_router() -> None:
    """Make sure this page runs inside streamlit_app.py's router.

    Because the folder is called pages/, Streamlit starts in its old folder-based mode: until
    the router has called st.navigation once in this process, a visit to /predict executes
    pages/predict.py directly, with Streamlit's own file list as navigation and without our
    page config or sidebar. Such a run executes the router instead (which switches that mode
    off and runs this page in its place, in this same script run, so no click is lost) and
    then ends.
    """
    from streamlit.runtime.pages_manager import PagesManager  # no public switch for this mode

    if getattr(PagesManager, "uses_pages_directory", False):
        runpy.run_path(str(ROUTER), run_name="__main__")
        st.stop()


def init_settings() -> None:
    """Folders start as fer_core.settings says (FER_RUNS_DIR etc.), as the CLI's do."""
    st.session_state.setdefault(RUNS_DIR_KEY, str(settings.runs_dir()))
    st.session_state.setdefault(CHECKPOINTS_DIR_KEY, str(settings.checkpoints_dir()))


def runs_dir() -> Path:
    return Path(st.session_state.get(RUNS_DIR_KEY) or settings.runs_dir())


def checkpoints_dir() -> Path:
    return Path(st.session_state.get(CHECKPOINTS_DIR_KEY) or settings.checkpoints_dir())


def known_datasets() -> dict[str, str]:
    """Every dataset the app knows, spec -> label: the demo, what lies under the data folder,
    and the source last chosen on the Data page (wherever it is)."""
    labels = {c.spec: c.label for c in ui_data.discover_datasets(data_home(), demo_dir())}
    remembered = st.session_state.get(DATA_SOURCE_KEY)
    if remembered and remembered not in labels and (remembered == "demo" or Path(remembered).exists()):
        labels[remembered] = f"{ui_data.dataset_label(remembered)} (chosen on the Data page)"
    return labels


# The app process holds at most this much of a dataset's decoded images in memory (FER2013 at
# 48 px grey is 66 MB). A larger dataset's images stay in their store on disk and are read as
# a page needs them: up to four datasets are kept loaded for every session, and training runs
# in its own process with the store's own, larger limit.
APP_IN_MEMORY_BYTES = 256 << 20


@st.cache_resource(show_spinner="Loading the decoded images…", max_entries=4)
def load_source(spec: str, cache_dir: str):
    """The decoded dataset for a source string; one copy shared by every session. A progress
    bar follows the first decoding of the files (created here: a cached function may only
    update what it created, and its replay shows the bar's last, empty state)."""
    from fer_core.data import load_dataset
    bar = st.empty()

    def progress(done: int, total: int) -> None:
        if done < total:
            bar.progress(done / total, text=f"Decoding images: {done:,} of {total:,} "
                                            "(once: the decoded images are kept in the cache folder)")
    try:
        return load_dataset(spec, cache_dir=cache_dir or None, progress=progress, in_memory_bytes=APP_IN_MEMORY_BYTES)
    finally:
        bar.empty()


def data_home() -> Path:
    return settings.data_home()


def demo_dir() -> Path:
    return settings.demo_dir()


@st.cache_resource(show_spinner=False)
def limit_app_threads() -> None:
    """One torch thread in the app process; the training process gets the cores."""
    import torch
    torch.set_num_threads(1)


@st.cache_resource(show_spinner=False)
def device_description() -> str:
    import torch
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def _copy_setting(widget_key: str, setting_key: str) -> None:
    value = str(st.session_state.get(widget_key, "")).strip()
    if value:
        st.session_state[setting_key] = value


def settings_panel(device: str) -> None:
    """Folders (editable) and the device, at the bottom of the sidebar."""
    st.caption(f":material/memory: Device: **{device}**")
    with st.expander("Folders", icon=":material/folder:"):
        st.text_input("Runs folder", value=str(runs_dir()), key="_runs_dir_input",
                      on_change=_copy_setting, args=("_runs_dir_input", RUNS_DIR_KEY),
                      help="Where run directories are written and read. Default: runs/ "
                           "(or $FER_RUNS_DIR).")
        st.text_input("Checkpoints folder", value=str(checkpoints_dir()), key="_ckpt_dir_input",
                      on_change=_copy_setting, args=("_ckpt_dir_input", CHECKPOINTS_DIR_KEY),
                      help="Where finished best models are published. Default: checkpoints/ "
                           "(or $FER_CHECKPOINTS_DIR).")


@st.fragment(run_every=2)
def active_job_panel() -> None:
    """The running job's progress, refreshed every 2 s (it only reads: jobs advance by themselves)."""
    folder = runs_dir()
    st.markdown("**Training job**")
    if not folder.is_dir():
        st.caption("No runs yet.")
        return
    try:
        from fer_core import jobs
        active = jobs.active_runs(folder)
    except Exception as exc:  # the sidebar must never take the page down
        st.caption(f"Job status unavailable: {literal(exc)}")
        return
    running = [r for r in active if r.state == "running"]
    queued = [r for r in active if r.state == "queued"]
    if not running and not queued:
        st.caption("Idle: no job running.")
        return
    for run in running[:1]:
        status = run.status
        epoch = f"epoch {status.epoch}/{status.epochs or run.planned_epochs or '?'}"
        eta = f" · {ui_data.format_duration(status.eta_s)} left" if status.eta_s else ""
        st.caption(f":material/progress_activity: {literal(run.experiment)} ({literal(run.mode)})")
        st.progress(ui_data.job_progress(status), text=f"{epoch}{eta}")
    if queued:
        st.caption(f":material/schedule: {len(queued)} job(s) queued")
    st.page_link("pages/train.py", label="Open monitor", icon=":material/monitoring:")


def literal(text: object) -> str:
    """Any user- or file-controlled string, made safe to put inside Markdown: it shows as
    typed (no emphasis, links, images, icons, HTML, entities or LaTeX). GitHub-flavoured
    Markdown also links bare `www.` names and e-mail addresses: the dot after `www` and every
    `@` are escaped too (`http://` needs a colon, which is)."""
    escaped = re.sub(r"([\\`*_\[\]<>|~$:#&@])", r"\\\1", str(text))
    return re.sub(r"(?i)(www)\.", r"\1\\.", escaped).replace("\n", " ")


def state_badge(state: str) -> None:
    st.badge(state, icon=ui_data.STATE_ICONS.get(state), color=ui_data.STATE_COLORS.get(state, "gray"))


def synthetic_badge(help_text: str | None = None) -> None:
    st.badge("SYNTHETIC data", icon=":material/science:", color="orange",
             help=help_text or "The built-in demo: procedurally drawn cartoon faces, not photographs. "
                               "Scores on it say nothing about real faces.")


def run_label(run) -> str:
    """How a run is named in pickers: its id, state and (when scored) test accuracy."""
    state = run.state
    accuracy = f" · test {ui_data.format_percent(run.test_accuracy)}" if run.test_accuracy is not None else ""
    synthetic = " · SYNTHETIC" if run.config.get("synthetic_data") else ""
    return f"{run.id}  [{state}{accuracy}{synthetic}]"


def take_selected_run() -> str | None:
    """Pop the one-shot 'show this run' request set by another page."""
    return st.session_state.pop(SELECTED_RUN_KEY, None)
