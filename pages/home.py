"""Home: what is here, and one click to a first trained model."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fer_core import runs, ui_data
from pages._shared import (SELECTED_RUN_KEY, checkpoints_dir, data_home, known_datasets, literal,
                           require_router, runs_dir, state_badge)

require_router()

st.title("FER Studio")
st.markdown("Train a **ResNet18** to recognise seven facial emotions, watch it learn, and see "
            "exactly which faces it gets wrong. Everything runs on this machine.")

folder = runs_dir()
all_runs = runs.list_runs(folder)
datasets = known_datasets()
active = [r for r in all_runs if r.status.active]
best = ui_data.best_run(all_runs)


def launch_quick_demo() -> str:
    """Queue a demo-quick run and return its folder."""
    from fer_core import jobs
    from fer_core.config import config_from_preset
    config = config_from_preset("demo-quick", data="demo", experiment="demo-quick",
                                runs_dir=str(folder.resolve()),
                                checkpoints_dir=str(checkpoints_dir().resolve()))
    return str(jobs.launch(config, max_concurrent=1))


with st.container(border=True):
    left, right = st.columns([3, 2], vertical_alignment="center")
    with left:
        st.subheader(":material/rocket_launch: Start here")
        st.markdown("No dataset needed: the built-in **demo** draws :orange-badge[SYNTHETIC] cartoon "
                    "faces for each emotion. The *demo-quick* recipe fine-tunes ResNet18 on them "
                    "at 48 px in a few minutes on a CPU. You will land on the **Train** page to "
                    "watch the loss fall, then **Evaluate** shows which faces it confuses.")
    with right:
        quick = st.button("Train a quick model on the demo dataset", type="primary",
                          icon=":material/play_arrow:", width="stretch", key="home_quick_train")
        st.caption("Or pick your own data and settings on **Data** and **Train**.")
if quick:
    from fer_core.errors import FerError
    try:
        st.session_state[SELECTED_RUN_KEY] = launch_quick_demo()
    except (FerError, OSError) as exc:
        st.error(f"Could not start training: {literal(exc)}")
    else:
        st.switch_page("pages/train.py")

st.space("small")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Datasets found", len(datasets), border=True,
          help="The built-in demo plus folders and fer2013.csv files under " + literal(data_home()))
c2.metric("Runs", len(all_runs), border=True, help=f"Run folders under {literal(folder)}")
c3.metric("Best test accuracy", ui_data.format_percent(best.test_accuracy) if best else "—",
          border=True, help="Highest test accuracy of any completed run")
c4.metric("Jobs running or queued", len(active), border=True)

left, right = st.columns(2, gap="large")
with left:
    st.subheader("Datasets")
    for spec, label in datasets.items():
        icon = ":material/science:" if spec == "demo" or "SYNTHETIC" in label else (
            ":material/description:" if spec.lower().endswith(".csv") else ":material/folder:")
        st.markdown(f"{icon} {literal(label)}" + ("" if spec == "demo" else f"  \n{literal(spec)}"))
    if len(datasets) == 1:
        st.caption("Only the demo so far. Get FER2013 on the **Data** page (Kaggle download) or put "
                   f"a folder of class folders under {literal(data_home())}.")
    st.page_link("pages/data.py", label="Explore data", icon=":material/photo_library:")

with right:
    st.subheader("Models")
    if best is not None:
        with st.container(border=True):
            st.markdown(f"**Best so far:** {literal(best.id)}")
            st.markdown(f"Test accuracy **{ui_data.format_percent(best.test_accuracy)}**, "
                        f"macro-F1 **{ui_data.format_percent(best.macro_f1)}** on "
                        f"{literal(ui_data.dataset_label(best.config.get('data'), best.config.get('synthetic_data')))}")
            if st.button("See its mistakes", icon=":material/grid_on:", type="tertiary", key="home_best_eval"):
                st.session_state[SELECTED_RUN_KEY] = str(best.path)
                st.switch_page("pages/evaluate.py")
    else:
        st.caption("No trained model yet.")
    for run in active:
        with st.container(border=True):
            cols = st.columns([4, 1], vertical_alignment="center")
            cols[0].markdown(f"{literal(run.id)}")
            with cols[1]:
                state_badge(run.state)
            st.progress(ui_data.job_progress(run.status))
    if all_runs:
        st.page_link("pages/runs.py", label=f"All runs ({len(all_runs)})", icon=":material/table_rows:")

with st.expander("How FER Studio works", icon=":material/help:"):
    st.markdown(
        "- **Data**: choose a source (Kaggle FER2013, a local folder of class folders, a "
        "`fer2013.csv`, or the synthetic demo), see the class balance, the train/val/test split and "
        "unreadable files.\n"
        "- **Train**: pick a recipe (preset), adjust it, launch. Training runs as a background "
        "process; you can leave the page, close the browser, or cancel and resume later.\n"
        "- **Runs**: every run with its scores; overlay curves and diff hyper-parameters.\n"
        "- **Evaluate**: the confusion matrix; click a cell to see those test faces.\n"
        "- **TensorBoard**: the same runs in TensorBoard.\n\n"
        f"Runs are written to {literal(Path(folder))}; finished best models to {literal(checkpoints_dir())}.")
