"""Runs: every run with its scores; compare curves and settings; download, archive, delete."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fer_core import ensemble, export, run_admin, runs, ui_data
from fer_core.errors import FerError
from pages._shared import SELECTED_RUN_KEY, checkpoints_dir, literal, require_router, run_label, runs_dir

require_router()

st.title("Runs")
folder = runs_dir()
all_runs = runs.list_runs(folder)
st.caption(f"Every run folder under {literal(folder)}, newest first.")

if not all_runs:
    st.info("No runs yet. Start one on the **Train** page, or with one click on **Home**.",
            icon=":material/info:")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

states = [r.state for r in all_runs]
counts = {s: states.count(s) for s in dict.fromkeys(states)}
st.markdown(" ".join(f":{ui_data.STATE_COLORS.get(s, 'gray')}-badge[{s}: {n}]" for s, n in counts.items()))

frame = ui_data.runs_frame(all_runs)
st.dataframe(
    frame, hide_index=True, key="runs_table", placeholder="—",
    column_order=["started", "experiment", "state", "dataset", "mode", "img px", "epochs", "stopped early",
                  "best val acc",
                  "test acc", "macro-F1", "duration", "batch", "lr", "stem", "weights", "problems", "run"],
    column_config={
        "started": st.column_config.TextColumn(pinned=True),
        "experiment": st.column_config.TextColumn(pinned=True),
        "run": st.column_config.TextColumn("run id", width="large"),
        "best val acc": st.column_config.NumberColumn(format="percent"),
        "test acc": st.column_config.NumberColumn(format="percent"),
        "macro-F1": st.column_config.NumberColumn(format="percent"),
        "lr": st.column_config.NumberColumn(format="%g"),
        "stopped early": st.column_config.TextColumn(
            help="Why training ended before its last epoch: early stopping, or a sweep pruning the trial"),
        "problems": st.column_config.TextColumn(width="large"),
    })
damaged = [r for r in all_runs if r.damaged]
if damaged:
    with st.expander(f"{len(damaged)} damaged run folder(s)", icon=":material/report:"):
        for run in damaged:
            st.markdown(f"- {literal(run.id)}: " + literal("; ".join(run.problems)))

# ---- compare ---------------------------------------------------------------------------
st.subheader("Compare runs")
by_path = {str(r.path): r for r in all_runs}
with_metrics = [str(r.path) for r in all_runs if r.metrics]
default = with_metrics[:2]
chosen = st.multiselect("Runs to compare", with_metrics, default=default, key="runs_compare",
                        format_func=lambda p: run_label(by_path[p]),
                        help="Overlay their validation curves and list the settings that differ.")
picked = [by_path[p] for p in chosen]
if picked:
    left, right = st.columns(2)
    left.plotly_chart(ui_data.overlay_figure(picked, "val_acc", "Validation accuracy", percent=True),
                      key="runs_overlay_acc")
    right.plotly_chart(ui_data.overlay_figure(picked, "val_loss", "Validation loss"), key="runs_overlay_loss")
    if len(picked) >= 2:
        diff = ui_data.hparam_diff(picked)
        st.markdown("**Settings that differ**")
        if diff.empty:
            st.caption("These runs used identical settings.")
        else:
            st.dataframe(diff, key="runs_diff")
else:
    st.caption("Pick runs with at least one finished epoch to compare them.")

# ---- ensembles -------------------------------------------------------------------------
with st.expander("Combine runs into an ensemble", icon=":material/merge:"):
    st.caption("Averages the calibrated probabilities of two or more completed runs with the same classes, "
               "input size and test images (e.g. the same recipe with different seeds on a dataset with "
               "its own test split). The ensemble is scored on their common test split, shown like a run "
               "on Evaluate, and published, so Predict and export can use it.")
    completed = [str(r.path) for r in all_runs if r.state == "completed" and r.evaluation and r.mode != "ensemble"]
    members = st.multiselect("Runs to combine", completed, key="runs_ensemble_members",
                             format_func=lambda p: run_label(by_path[p]))
    name = st.text_input("Ensemble name", value="ensemble", key="runs_ensemble_name", max_chars=100)
    if st.button("Build the ensemble", icon=":material/merge:", key="runs_ensemble_build",
                 disabled=len(members) < 2, help="Runs in the background: each member reads the test and "
                                                 "validation images once."):
        try:
            ensemble.launch_ensemble(members, name, runs_dir=folder, checkpoints_dir=checkpoints_dir())
        except (FerError, OSError) as exc:
            st.error(f"Nothing was started: {literal(exc)}", icon=":material/error:")
        else:
            st.success(f"Building {literal(name)} in the background: it is listed above as running, then "
                       "completed (reload to follow it).", icon=":material/hourglass_top:")

# ---- one run ---------------------------------------------------------------------------
st.subheader("Manage a run")
paths = [str(r.path) for r in all_runs]
target = st.selectbox("Run", paths, format_func=lambda p: run_label(by_path[p]), key="runs_manage")
run = by_path[target]
busy = run.state in run_admin.BUSY_STATES

with st.container(horizontal=True):
    published = Path(run.status.published_checkpoint) if run.status.published_checkpoint else None
    if published is not None and published.is_file():
        st.download_button("Download model", data=published.read_bytes, file_name=published.name,
                           mime="application/octet-stream", icon=":material/download:", type="primary",
                           key="runs_download", on_click="ignore",
                           help="The best model's weights, classes and scores (no optimizer state): "
                                "what `fer predict` and the Predict page load.")
    else:
        st.button("Download model", disabled=True, key="runs_download_none",
                  help="Only a completed run publishes its best model.")
    if run.best_checkpoint.is_file():
        st.download_button("Full checkpoint (for resuming elsewhere)", data=run.best_checkpoint.read_bytes,
                           file_name=f"{run.id.replace('/', '_')}_best_full.pt",
                           mime="application/octet-stream", icon=":material/save:",
                           key="runs_download_full", on_click="ignore",
                           help="best.pt with the optimizer and scheduler state: about three times larger.")
    exported = runs.RunLayout(run.path).export_file(export.SUFFIXES["onnx"])
    if published is None or not published.is_file():
        st.button("Export to ONNX", disabled=True, key="runs_export_none", icon=":material/deployed_code:",
                  help="Only a completed run's best model is exported.")
    elif export.is_current(exported, run.best_checkpoint):
        st.download_button("Download ONNX", data=exported.read_bytes, file_name=f"{run.id.replace('/', '_')}.onnx",
                           mime="application/octet-stream", icon=":material/deployed_code:",
                           key="runs_download_onnx", on_click="ignore",
                           help=f"The best model as ONNX (opset {export.OPSET}, any batch size) for ONNX "
                                "Runtime and other engines, with its model card in the file's metadata: "
                                "classes, input size, preprocessing, test accuracy, run id. "
                                "Serve it with `fer serve`.")
    elif st.button("Export to ONNX", icon=":material/deployed_code:", key="runs_export",
                   help="Write the best model as ONNX into the run's exports/ folder (a few seconds), "
                        "then download it."):
        with st.spinner("Exporting to ONNX…"):
            try:
                export.export_model(run.path, "onnx")
            except FerError as exc:
                st.error(f"Export failed: {literal(exc)}", icon=":material/error:")
            else:
                st.rerun()
    if st.button("Open in Train", icon=":material/monitoring:", key="runs_open_train"):
        st.session_state[SELECTED_RUN_KEY] = target
        st.switch_page("pages/train.py")
    if run.evaluation and st.button("Open in Evaluate", icon=":material/grid_on:", key="runs_open_eval"):
        st.session_state[SELECTED_RUN_KEY] = target
        st.switch_page("pages/evaluate.py")
    archive = st.button("Archive…", icon=":material/archive:", key="runs_archive", disabled=busy,
                        help="Refused while the run is queued or running." if busy
                        else f"Move it to {literal(folder / run_admin.ARCHIVE_DIR)}/ (hidden from the app).")
    delete = st.button("Delete…", icon=":material/delete:", key="runs_delete", disabled=busy,
                       help="Refused while the run is queued or running." if busy
                       else "Delete the run folder and its checkpoints for good.")

if archive or delete:
    st.session_state["runs_pending"] = ("archive" if archive else "delete", target)

pending = st.session_state.get("runs_pending")
if pending and pending[1] == target:
    action, path = pending
    with st.container(border=True):
        verb = "Archive" if action == "archive" else "Permanently delete"
        st.warning(f"{verb} {literal(run.id)}?" + (
            " Its checkpoints, including the published best model, are deleted too; this cannot be undone."
            if action == "delete" else " Its published best model is withdrawn from Predict; the archived "
            "folder keeps its checkpoints."), icon=":material/warning:")
        yes, no = st.columns(2)
        if yes.button(f"Yes, {action}", type="primary", key="runs_confirm", width="stretch"):
            st.session_state.pop("runs_pending", None)
            try:
                if action == "archive":
                    moved = run_admin.archive_run(Path(path), folder)
                    st.toast(f"Archived to {literal(moved)}", icon=":material/archive:")
                else:
                    run_admin.delete_run(Path(path), folder)
                    st.toast(f"Deleted {literal(run.id)}", icon=":material/delete:")
            except (FerError, OSError) as exc:
                st.error(f"Could not {action} the run: {literal(exc)}", icon=":material/error:")
            else:
                st.rerun()
        if no.button("Keep it", key="runs_cancel_action", width="stretch"):
            st.session_state.pop("runs_pending", None)
            st.rerun()
elif busy:
    st.caption(f"This run is {run.state}: cancel it on the Train page before archiving or deleting it.")
