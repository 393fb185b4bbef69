"""Evaluate: test scores, the confusion matrix, the faces behind each cell, per-class scores,
and two runs side by side. A run scored on other datasets (`evaluate RUN --data OTHER`) can
show those results instead of its own test split."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

import streamlit as st

from fer_core import runs, ui_data
from fer_core.errors import FerError
from fer_core.evaluate import read_predictions, top_confusions
from pages._explain import explain_gallery
from pages._shared import (checkpoints_dir, literal, require_router, run_label, runs_dir, synthetic_badge,
                           take_selected_run)

require_router()

GALLERY_LIMIT = 30

st.title("Evaluate")
st.caption("How the best checkpoint of a run does on its held-out test images (or on another "
           "dataset it was scored on), and where it goes wrong.")
OWN_TEST = "own test split"


@st.cache_data(show_spinner=False, max_entries=16)
def load_predictions(path: str, mtime_ns: int) -> list[dict]:
    return read_predictions(Path(path))


@st.cache_data(show_spinner="Loading the faces…", max_entries=256)
def load_thumbnails(paths: tuple[str, ...]):
    return ui_data.load_image_arrays(list(paths))


@st.cache_data(show_spinner=False, max_entries=64)
def load_evaluation(path: str, mtime_ns: int) -> dict | None:
    try:
        evaluation = runs.read_json(Path(path))
    except (OSError, ValueError):
        return None
    return evaluation if runs.evaluation_problem(evaluation) is None else None  # a damaged file is skipped


def other_evaluations(run: runs.RunInfo) -> dict[str, dict]:
    """This run's readable results on other datasets, by file."""
    found = {}
    for path in runs.RunLayout(run.path).other_evaluations():
        with suppress(OSError):
            evaluation = load_evaluation(str(path), path.stat().st_mtime_ns)
            if evaluation and evaluation.get("data") and evaluation.get("classes"):
                found[str(path)] = evaluation
    return found


def describe_scoring(evaluation: dict) -> str:
    """'other-faces: all 21 images' for a picker option (shown as plain text)."""
    part = "its test split" if evaluation.get("split") == "test" else "all"
    label = ui_data.dataset_label(evaluation.get("data"), evaluation.get("synthetic"))
    return f"{label}: {part} ({ui_data.image_count(evaluation):,} images)"


def confidence_section(run: runs.RunInfo) -> None:
    """Temperature scaling: the reliability diagram before and after, ECE and NLL, the
    uncertainty threshold; for a run without calibration, "Calibrate now"."""
    from fer_core import calibration

    report, problem = calibration.read_report(runs.RunLayout(run.path).calibration_file)
    if problem:
        st.warning(literal(problem), icon=":material/report:")
    if report is None:
        st.badge("uncalibrated", icon=":material/help:", color="gray")
        st.caption("This run's confidences are the network's raw softmax, which a model trained with "
                   "label smoothing or for many epochs reads too high or too low. Calibration fits one "
                   "temperature on the run's validation images (never the test images) and reports "
                   "what it changes on the test split; Predict then shows calibrated confidences.")
        if (run.config.get("val_fraction") or 0) <= 0:
            st.info("This run has no validation split, so it cannot be calibrated without touching its "
                    "test images.", icon=":material/info:")
        else:
            calibrate_button(run, "Calibrate now", "eval_calibrate")
        return
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Temperature", f"{report['temperature']:.2f}", border=True,
              help="Logits are divided by this before the softmax: above 1 the raw model was too sure, "
                   f"below 1 too unsure. Fitted on {report.get('images', 0):,} validation images.")
    c2.metric("ECE after", f"{report['ece_after']:.1%}", f"{report['ece_after'] - report['ece_before']:+.1%}",
              delta_color="inverse", border=True,
              help=f"Expected calibration error on the test split ({report.get('bins', 15)} bins): the "
                   f"average gap between confidence and the share right. Before: {report['ece_before']:.1%}.")
    c3.metric("NLL after", f"{report['nll_after']:.3f}", f"{report['nll_after'] - report['nll_before']:+.3f}",
              delta_color="inverse", border=True,
              help=f"Negative log-likelihood of the true class on the test split (lower is better; it "
                   f"punishes confident mistakes). Before: {report['nll_before']:.3f}.")
    c4.metric("Uncertain below", f"{report['uncertain_below']:.0%}", border=True,
              help="Predict flags a face uncertain below this calibrated confidence: on the validation "
                   "images, readings this unsure were more often wrong than right.")
    if report.get("uncertain_rule") != calibration.UNCERTAIN_RULE:
        st.info("**Uncertain below** was chosen by the rule used before 2026-12-02 (the validation faces "
                "below it were, taken together, right less than half the time). For a weak model it can "
                "flag even sure readings. Refitting keeps the temperature and chooses the threshold where "
                "readings this sure were more often wrong than right.", icon=":material/update:")
        calibrate_button(run, "Refit with today's rule", "eval_recalibrate")
    st.plotly_chart(ui_data.reliability_figure(report), key=f"eval_reliability::{run.id}",
                    config={"displayModeBar": False})
    st.caption("Each point is a confidence bin: how sure the model said it was (across) against how often "
               "it was right (up). On the dashed line a confidence of 70% means right 70% of the time.")


def calibrate_button(run: runs.RunInfo, label: str, key: str) -> None:
    """A button that (re)calibrates the run on its validation split, then redraws the page."""
    from fer_core import calibration

    if st.button(label, icon=":material/tune:", key=f"{key}::{run.id}", disabled=run.status.active,
                 help="Runs the best model on the validation and test splits (about as long as "
                      "evaluating them) and updates its checkpoint and published model."):
        with st.spinner("Calibrating on the validation split…"):
            try:
                calibration.calibrate_run(run.path, checkpoints_dir=checkpoints_dir())
            except (FerError, OSError) as exc:
                st.error(f"Not calibrated: {literal(exc)}", icon=":material/error:")
                return
        st.rerun()


def predictions_of(run: runs.RunInfo, data: str | None = None) -> list[dict]:
    path = runs.RunLayout(run.path).predictions_file(data)
    try:
        return load_predictions(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, KeyError):
        return []


folder = runs_dir()
scored = [r for r in runs.list_runs(folder) if r.evaluation and r.evaluation.get("confusion_matrix")]
if not scored:
    st.info("No evaluated run yet. A run is evaluated on its test split when training completes: "
            "start one on the **Train** page.", icon=":material/info:")
    st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
    st.stop()

by_path = {str(r.path): r for r in scored}
options = list(by_path)
requested = take_selected_run()
if requested in options:
    st.session_state["eval_run"] = requested
elif st.session_state.get("eval_run") not in options:
    st.session_state["eval_run"] = options[0]
chosen = st.selectbox("Run", options, key="eval_run", format_func=lambda p: run_label(by_path[p]))
run = by_path[chosen]
elsewhere = other_evaluations(run)
scoring = OWN_TEST
if elsewhere:
    scoring = st.selectbox("Scored on", [OWN_TEST, *elsewhere], key=f"eval_on::{run.id}",
                           format_func=lambda key: "test split of its own data" if key == OWN_TEST
                           else describe_scoring(elsewhere[key]),
                           help="Other datasets are scored with `python -m fer_core evaluate RUN --data "
                                "OTHER`; their results are kept apart from the run's own test result.")
own = scoring == OWN_TEST
evaluation = run.evaluation if own else elsewhere[scoring]
other_data = None if own else evaluation["data"]
if not own:
    st.text(f"Scored on {evaluation['data']}")  # a path: shown as it is, never as Markdown
classes = list(evaluation["classes"])
synthetic = bool(evaluation.get("synthetic") or (own and run.config.get("synthetic_data")))
# widget state per result: a cell chosen on one dataset means nothing on another
view = run.id if own else f"{run.id}::{Path(scoring).stem}"

if synthetic:
    synthetic_badge()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Test accuracy" if own else "Accuracy", ui_data.format_percent(evaluation.get("accuracy")),
          border=True, help="Share of the images whose top prediction is the true class.")
m2.metric("Macro-F1", ui_data.format_percent(evaluation.get("macro_f1")), border=True,
          help="F1 averaged over classes with equal weight: rare classes count as much as common ones.")
m3.metric("Test images" if own else "Images", f"{ui_data.image_count(evaluation):,}", border=True)
m4.metric("Best epoch", evaluation.get("best_epoch", "—"), border=True,
          help="The checkpoint with the best validation accuracy; it is the one evaluated."
               + (" Predictions average the face and its mirror image (TTA)." if evaluation.get("tta") else ""))

mistakes_tab, classes_tab, confidence_tab, compare_tab = st.tabs(
    ["Mistakes", "Per-class scores", "Confidence", "Compare two runs"])

# ---- confusion matrix and the faces behind a cell ----------------------------------------
with mistakes_tab:
    chart_key = f"eval_cm::{view}"
    cell_key = f"eval_cell::{view}"
    click_key = f"eval_click::{view}"
    # a cell is (true row, predicted column): indices, since a class name may hold any character
    order = ui_data.confusion_cell_order(evaluation)
    all_cells = [(i, j) for i, j, _ in order]
    counts_by_cell = {(i, j): n for i, j, n in order}
    clicked = ui_data.cell_index_from_selection(st.session_state.get(chart_key), classes)
    if clicked and clicked != st.session_state.get(click_key):
        st.session_state[click_key] = clicked
        st.session_state[cell_key] = clicked
    if st.session_state.get(cell_key) not in all_cells:
        st.session_state[cell_key] = all_cells[0]
    true_index, predicted_index = st.session_state[cell_key]
    true_class, predicted_class = classes[true_index], classes[predicted_index]

    left, right = st.columns([3, 2], gap="large")
    with left:
        normalise = st.toggle("Row-normalised (share of each true class)", key="eval_normalise",
                              help="Off: image counts. On: each row sums to 100%, so rare classes "
                                   "are as readable as common ones.")
        st.plotly_chart(ui_data.confusion_figure(evaluation, normalise, (true_class, predicted_class)),
                        key=chart_key, on_select="rerun", selection_mode=("points",),
                        config={"displayModeBar": False})
        st.caption("Rows: the true emotion. Columns: what the model predicted. The diagonal is "
                   "correct. **Click a cell** to see those faces below.")
    with right:
        st.markdown("**Most common mistakes**")
        confusions = top_confusions(evaluation, k=6)
        if confusions:
            for item in confusions:
                true, predicted = literal(item["true"]), literal(item["predicted"])
                st.markdown(f"- **{true}** predicted as **{predicted}**: "
                            f"{item['count']} images, {item['share_of_true']:.0%} of {true}")
        else:
            st.success("No mistakes on the test split." if own else "No mistakes on these images.")
        report = evaluation.get("report", {})
        f1 = {c: report.get(c, {}).get("f1-score", 0.0) for c in classes}
        hardest = min(f1, key=f1.get)
        easiest = max(f1, key=f1.get)
        st.markdown(f"**Easiest class:** {literal(easiest)} (F1 {f1[easiest]:.0%}).  \n"
                    f"**Hardest class:** {literal(hardest)} (F1 {f1[hardest]:.0%}).")

    def describe_cell(cell: tuple[int, int]) -> str:
        t, p = cell
        n = counts_by_cell.get(cell, 0)
        kind = "correct" if t == p else "mistake"
        return f"true {classes[t]} → predicted {classes[p]} · {n} image{'s' if n != 1 else ''} ({kind})"

    st.selectbox("Cell to inspect", all_cells, key=cell_key, format_func=describe_cell,
                 help="The same as clicking a cell of the matrix.")
    predictions = predictions_of(run, other_data)
    examples = ui_data.cell_examples(predictions, true_class, predicted_class)
    heading = (f"{len(examples)} {'test ' if own else ''}face(s) that are **{literal(true_class)}** and "
               f"were predicted **{literal(predicted_class)}**")
    st.markdown(heading + (" (correct)" if true_class == predicted_class else ""))
    if not predictions:
        st.warning(f"This run has no readable {literal(runs.RunLayout(run.path).predictions_file(other_data).name)}, "
                   "so the faces cannot be shown.")
    elif examples:
        shown = examples[:GALLERY_LIMIT]
        images, captions, missing = [], [], 0
        for row, array in zip(shown, load_thumbnails(tuple(r["path"] for r in shown))):
            if array is None:
                missing += 1
                continue
            images.append(array)
            captions.append(literal(ui_data.probability_caption(row, top=2)))  # Markdown
        if images:  # with Grad-CAM heat maps over them when its toggle is on
            images = explain_gallery(run.best_checkpoint, images, true_class, predicted_class,
                                     f"eval_cam::{view}")
            st.image(images, caption=captions, width=140)
        if missing:
            st.caption(f"{missing} image(s) could not be loaded (moved or deleted since training).")
        if len(examples) > GALLERY_LIMIT:
            st.caption(f"Showing the {GALLERY_LIMIT} most confident of {len(examples)}.")
        with st.expander("Probabilities of these faces"):
            st.dataframe(ui_data.probability_frame(shown, classes), hide_index=True,
                         key=f"eval_probs::{view}",
                         column_config={c: st.column_config.ProgressColumn(c, min_value=0.0, max_value=1.0,
                                                                           format="percent")
                                        for c in classes})
    else:
        st.caption("No image falls in this cell.")

# ---- per-class report --------------------------------------------------------------------
with classes_tab:
    frame = ui_data.per_class_frame(evaluation)
    bar = {c: st.column_config.ProgressColumn(c, min_value=0.0, max_value=1.0, format="percent")
           for c in ("precision", "recall", "f1")}
    st.dataframe(frame, hide_index=True, key=f"eval_report::{view}",
                 column_config={**bar, "support": st.column_config.NumberColumn("test images" if own else "images")})
    st.caption("**Precision**: of the faces predicted as this class, the share that really are. "
               "**Recall**: of the faces of this class, the share found. **F1**: their harmonic mean.")

# ---- two runs side by side ----------------------------------------------------------------
with compare_tab:
    if not own:
        st.caption("Runs are compared on the test split of their own data.")
    others = [p for p in options if p != chosen and list(by_path[p].evaluation["classes"]) == classes]
    if not others:
        st.caption("Train another run on the same classes to compare their confusion matrices.")
    else:
        other_path = st.selectbox("Compare with", others, key="eval_compare",
                                  format_func=lambda p: run_label(by_path[p]))
        other = by_path[other_path]
        difference = ui_data.test_set_difference(run, other)
        if difference:
            st.warning(literal(difference), icon=":material/compare_arrows:")
        shared_normalise = st.toggle("Row-normalised", value=True, key="eval_compare_normalise")
        a, b = st.columns(2)
        for column, item in ((a, run), (b, other)):
            with column:
                ev = item.evaluation
                st.markdown(f"**{literal(item.id)}**")
                st.caption(f"test accuracy {ui_data.format_percent(ev.get('accuracy'))} · macro-F1 "
                           f"{ui_data.format_percent(ev.get('macro_f1'))}")
                st.plotly_chart(ui_data.confusion_figure(ev, shared_normalise, height=420, show_scale=False),
                                key=f"eval_compare_cm::{item.id}", config={"displayModeBar": False})
        delta = ui_data.per_class_frame(run.evaluation)[["class", "f1"]].merge(
            ui_data.per_class_frame(other.evaluation)[["class", "f1"]], on="class", suffixes=(" (this)", " (other)"))
        delta["difference"] = delta["f1 (this)"] - delta["f1 (other)"]
        st.dataframe(delta, hide_index=True, key="eval_compare_f1",
                     column_config={c: st.column_config.NumberColumn(format="percent")
                                    for c in ("f1 (this)", "f1 (other)", "difference")})


# ---- calibrated confidence ----------------------------------------------------------------
with confidence_tab:
    if not own:
        st.caption("Calibration is fitted and scored on the run's own validation and test splits.")
    confidence_section(run)
