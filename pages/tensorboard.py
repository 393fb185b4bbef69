"""TensorBoard: start (or reuse) a TensorBoard over the runs folder, link or embed it, stop it."""

from __future__ import annotations

import streamlit as st

from pages._shared import literal, require_router, runs_dir

require_router()

st.title("TensorBoard")
st.caption("Every run also logs to TensorBoard: scalars per epoch, the images the model is fed, "
           "the model graph, the test confusion matrix and the hyper-parameters of all runs.")

folder = runs_dir()
try:
    from fer_core import tensorboard as tb
except ImportError as exc:  # the helper module ships separately; say so rather than crash
    st.error(f"TensorBoard support is not available: {literal(exc)}", icon=":material/error:")
    st.stop()

try:
    has_runs = folder.is_dir() and any(folder.iterdir())
except OSError:  # unreadable: TensorBoard says more when it starts
    has_runs = False
if not has_runs:
    st.info(f"{literal(folder)} has no runs yet. TensorBoard will still start and show runs as they appear.",
            icon=":material/info:")

try:
    info = tb.tensorboard_status(folder)
except Exception as exc:  # a broken record must not hide the start button
    st.warning(f"Could not check whether TensorBoard is running: {literal(exc)}", icon=":material/warning:")
    info = None

if info is None:
    with st.container(border=True):
        st.markdown(f"TensorBoard is **not running** for {literal(folder)}.")
        port = st.number_input("Port (0 = pick a free one)", min_value=0, max_value=65535, value=0,
                               step=1, key="tb_port")
        if st.button("Start TensorBoard", type="primary", icon=":material/play_arrow:", key="tb_start"):
            with st.spinner("Starting TensorBoard (a few seconds)…"):
                try:
                    started = tb.start_tensorboard(folder, port=int(port) or None)
                except Exception as exc:  # port busy, tensorboard missing, timeout: all shown as text
                    st.error(f"TensorBoard did not start: {literal(exc)}", icon=":material/error:")
                else:
                    st.toast(f"TensorBoard {'reused' if started.reused else 'started'} at {started.url}",
                             icon=":material/monitoring:")
                    st.rerun()
else:
    with st.container(border=True):
        st.markdown(f":material/check_circle: TensorBoard is **running** at [{info.url}]({info.url}) "
                    f"(pid {info.pid}, port {info.port}) for {literal(folder)}.")
        with st.container(horizontal=True):
            st.link_button("Open in a new tab", info.url, icon=":material/open_in_new:", type="primary")
            if st.button("Stop TensorBoard", icon=":material/stop_circle:", key="tb_stop"):
                try:
                    stopped = tb.stop_tensorboard(folder)
                except Exception as exc:
                    st.error(f"Could not stop TensorBoard: {literal(exc)}", icon=":material/error:")
                else:
                    if stopped:
                        st.toast("TensorBoard stopped", icon=":material/stop_circle:")
                    st.rerun()
    embed = st.toggle("Embed it here", key="tb_embed",
                      help="Shows TensorBoard inside this page. Works when your browser can reach "
                           f"{info.url} (the app and the browser on the same machine).")
    if embed:
        st.iframe(info.url, height=900)
