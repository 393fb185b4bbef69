"""FER Studio: the router. Page modules live in pages/; this file only sets up navigation,
the shared sidebar (folders, device, the active training job) and hands over to the page."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages._shared import (active_job_panel, device_description, init_settings, limit_app_threads,
                           settings_panel)

# The icon is a file in the repo (served by this app; a ":material/..." icon would be fetched from
# a font CDN, which fails offline). "auto" opens the sidebar on wide screens and keeps it
# collapsed on narrow ones (a phone), where it would cover most of the page.
APP_ICON = Path(__file__).parent / "assets" / "favicon.png"
st.set_page_config(page_title="FER Studio", page_icon=APP_ICON, layout="wide",
                   initial_sidebar_state="auto")

limit_app_threads()  # training runs in its own process; the app must not compete for cores
init_settings()

PAGES_DIR = Path(__file__).parent / "pages"
pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/data.py", title="Data", icon=":material/photo_library:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/table_rows:"),
    st.Page("pages/sweeps.py", title="Sweeps", icon=":material/tune:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/grid_on:"),
]
if (PAGES_DIR / "predict.py").is_file():
    pages.append(st.Page("pages/predict.py", title="Predict", icon=":material/face:"))
pages.append(st.Page("pages/tensorboard.py", title="TensorBoard", icon=":material/monitoring:"))

page = st.navigation(pages)

with st.sidebar:
    active_job_panel()
    settings_panel(device_description())

page.run()
