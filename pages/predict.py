"""Predict: pick a trained model, give it photos (upload, URL or camera) and see the emotion it
reads on every face, next to the 48x48 grey crop it actually looked at.

Thin: loading, fetching, detection and classification are fer_core's (`Predictor`,
`fetch_image_bytes`, `load_image`); this page only picks inputs and draws what comes back.
"""

from __future__ import annotations

import html
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from fer_core import runs, ui_data, uploads
from fer_core.annotate import annotate
from fer_core.data import default_cache_dir
from fer_core.errors import FerError
from fer_core.faces import DETECTORS
from fer_core.images import PixelBudget, PixelBudgetSpent, fetch_image_bytes, load_image
from fer_core.model_catalog import ModelEntry, list_models
from fer_core.predict import PredictionResult, Predictor, failed_result
from pages._explain import explain_face
from pages._shared import checkpoints_dir, literal, require_router, runs_dir, synthetic_badge

require_router()

UPLOAD_OPTION = "__upload__"
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif"]
TABS = ("Upload images", "Image URL", "Camera", "Live")
EXPANDED_CARDS = 4            # more images than this: a grid of the photos, details in expanders
GRID_COLUMNS = 4
NO_FACE = "no face found"
WHOLE_IMAGE_LABEL = "Whole-image reading (no face: not a face reading)"
DISPLAY_SIDE = 1024           # the photo shown with its boxes: sharp in a half-page column
CROP_SHOWN_PX = 144           # the 48 px crop, enlarged 3x with nearest-neighbour
GREY = "#cbd5e1"
UNCERTAIN_COLOUR = "#d97706"
PRIMARY = st.get_option("theme.primaryColor") or ui_data.TRAIN_COLOR
URL_STATE = "predict_url_fetched"   # {"url", "data", "error"} of the last URL fetched
UPLOADED_CKPTS = "predict_uploaded_ckpts"  # uploaded checkpoint file_id -> stored path

st.title("Predict")
st.caption("Give a trained model a photo: it finds each face, crops it to the 48×48 grey square "
           "it learnt from, and reads the emotion. Nothing leaves this machine.")


# ---- models ------------------------------------------------------------------------------

UPLOAD_LABEL = "Upload a checkpoint file…"


BACKEND_LABELS = {"torch": "PyTorch", "onnx": "ONNX Runtime"}
UNCERTAIN_HELP_CALIBRATED = (
    "A face whose top emotion has less calibrated confidence than this is flagged uncertain. The "
    "default was chosen on this model's validation images: readings less sure than this were "
    "more often wrong than right there.")
UNCERTAIN_HELP = (
    "A face whose top emotion has less probability than this is flagged uncertain. This model is "
    "not calibrated (calibrate its run on the Evaluate page), so 40% is only a rule of thumb.")


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def load_predictor(path: str, mtime_ns: int, backend: str = "torch") -> Predictor:
    """One model per checkpoint file version and backend, shared by every rerun and session."""
    return Predictor.load(path, backend=backend, num_threads=1)


def store_uploaded_checkpoint(uploaded) -> Path:
    """Write an uploaded .pt once (per upload); fer_core names it and keeps only the newest few."""
    stored = st.session_state.setdefault(UPLOADED_CKPTS, {})
    if uploaded.file_id in stored and Path(stored[uploaded.file_id]).is_file():
        return Path(stored[uploaded.file_id])
    path = uploads.store_uploaded_checkpoint(uploaded.getvalue(), uploaded.name,
                                             default_cache_dir() / uploads.UPLOADS_FOLDER)
    stored[uploaded.file_id] = str(path)
    return path


def run_of(entry: ModelEntry | None, info: dict) -> runs.RunInfo | None:
    if entry is not None and entry.run is not None:
        return entry.run
    run_dir = info.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        return runs.load_run(Path(run_dir))
    return None


def model_section() -> Predictor:
    """The model picker and its facts; stops the page when there is no usable model."""
    catalog = list_models(runs_dir(), checkpoints_dir())
    with st.container(border=True):
        if catalog.entries:
            options = [e.key for e in catalog.entries] + [UPLOAD_OPTION]
            if st.session_state.get("predict_model") not in options:
                st.session_state["predict_model"] = catalog.default.key
            chosen = st.selectbox(
                "Model", options, key="predict_model",
                format_func=lambda key: UPLOAD_LABEL if key == UPLOAD_OPTION else catalog.get(key).label,
                help="One entry per run (its published model, or its best checkpoint so far) and "
                     "any other checkpoint file in the checkpoints folder; the best completed "
                     "model on real data first.")
            if chosen == catalog.default.key:
                st.caption(catalog.reason)
        else:
            st.info("**No trained model yet.** Train one on the **Train** page (the quick demo "
                    "takes a few minutes), or upload a checkpoint file below.",
                    icon=":material/model_training:")
            st.page_link("pages/train.py", label="Go to Train", icon=":material/model_training:")
            chosen = UPLOAD_OPTION

        entry = catalog.get(chosen)
        if chosen == UPLOAD_OPTION:
            uploaded = st.file_uploader(
                "Upload a checkpoint file (.pt)", type=["pt"], key="predict_ckpt_upload",
                max_upload_size=200,
                help="A checkpoint written by FER Studio's training (checkpoints/*.pt or a run's "
                     "checkpoints/best.pt). It is loaded safely: weights only, never code.")
            if uploaded is None:
                st.stop()
            try:
                path = store_uploaded_checkpoint(uploaded)
            except OSError as exc:
                st.error(f"Could not store {literal(uploaded.name)}: {literal(exc.strerror or exc)}")
                st.stop()
            shown_name = uploaded.name
        else:
            path, shown_name = entry.path, entry.path.name

        backend = st.segmented_control(
            "Run the model on", list(BACKEND_LABELS), format_func=BACKEND_LABELS.get, default="torch",
            key="predict_backend", required=True,
            help="The same model, preprocessing and answers either way. ONNX Runtime is the engine "
                 "an exported model (`fer export`) runs on elsewhere; the first use exports this "
                 "checkpoint once, which takes a few seconds.")
        try:
            exporting = st.spinner("Exporting the model to ONNX (once per checkpoint)…")
            with exporting if backend == "onnx" else nullcontext():
                predictor = load_predictor(str(path), path.stat().st_mtime_ns, backend)
        except FerError as exc:
            st.error(f"This checkpoint cannot be used: {literal(exc)}", icon=":material/error:")
            st.stop()
        except OSError as exc:  # deleted or replaced between listing and loading
            st.error(f"Could not read {literal(shown_name)}: {literal(exc.strerror or exc)}",
                     icon=":material/error:")
            st.stop()

        info = predictor.info
        run = run_of(entry, info)
        accuracy = info.get("accuracy")
        macro_f1 = info.get("macro_f1")
        if accuracy is None and run is not None:
            accuracy, macro_f1 = run.test_accuracy, run.macro_f1
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("Test accuracy", ui_data.format_percent(accuracy),
                  help="Share of the run's held-out test images it got right (— when the run "
                       "has not been tested yet).")
        m2.metric("Macro-F1", ui_data.format_percent(macro_f1),
                  help="F1 averaged over classes with equal weight.")
        m3.metric("Image size", f"{info['img_size']} px",
                  help="Each face is cropped to 48×48 grey, then resized to this for the network.")
        m4.metric("Classes", info["num_classes"], help=literal(", ".join(info["classes"])))
        # names come from files (run folders, checkpoints): shown as plain text, never Markdown
        where = f"Run {run.id}" if run is not None else (
            f"Uploaded {shown_name}" if chosen == UPLOAD_OPTION else f"{shown_name} (no run record)")
        calibrated = (f"calibrated (temperature {predictor.calibration.temperature:.2f})"
                      if predictor.calibration else "uncalibrated (raw softmax)")
        extras = ([f"{info['stem']} stem"] + (["ten-view TTA"] if info.get("tta") else [])
                  + [calibrated, f"on {BACKEND_LABELS[predictor.backend]}"])
        st.text(f"{where} · classes: {', '.join(info['classes'])} · {' · '.join(extras)}")
        if run is not None and run.config.get("synthetic_data"):
            synthetic_badge("This model learnt from the synthetic demo's cartoon faces: its "
                            "readings of real photographs mean little.")
    return predictor


# ---- drawing -----------------------------------------------------------------------------

def probability_figure(face) -> go.Figure:
    """All class probabilities as horizontal bars, highest on top, top-k in the primary colour."""
    ranked = sorted(face.probabilities.items(), key=lambda item: item[1], reverse=True)
    highlighted = {name for name, _ in face.top_k}
    names = [html.escape(name) for name, _ in ranked]  # plotly reads <a>, <b>...: show as typed
    values = [100 * p for _, p in ranked]
    figure = go.Figure(go.Bar(
        x=values, y=names, orientation="h",
        marker_color=[PRIMARY if n in highlighted else GREY for n, _ in ranked],
        text=[f"{v:.1f}%" for v in values], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.1f}%<extra></extra>"))
    figure.update_layout(height=40 + 26 * len(names), margin=dict(l=0, r=48, t=8, b=8),
                         showlegend=False, bargap=0.3)
    figure.update_xaxes(range=[0, 100], showgrid=True, title=None, tickvals=[0, 50, 100],
                        ticktext=["0%", "50%", "100%"])
    figure.update_yaxes(autorange="reversed", title=None)
    return figure


# ---- predicting ----------------------------------------------------------------------------

@st.cache_data(max_entries=256, show_spinner=False)
def analyse(_predictor: Predictor, model_key: str, data: bytes, options: tuple,
            _budget: PixelBudget | None = None) -> PredictionResult:
    """The library's prediction for one image; a bad image gives a result with `error` set.
    `_budget` (not part of the cache key) is the submission's decoded-pixel allowance: only an
    image that is really decoded (not a cached result) spends from it, and a refusal for want of
    it is raised, not cached (on its own, or in a smaller submission, the image is decoded)."""
    try:
        return _predictor.predict(data, pixel_budget=_budget or PixelBudget(), **dict(options))
    except PixelBudgetSpent:
        raise
    except FerError as exc:
        return failed_result(data, exc)


@st.cache_data(max_entries=24, show_spinner=False)
def display_image(data: bytes) -> Image.Image | None:
    """The upright photo, at most DISPLAY_SIDE px (boxes are scaled to it when drawn)."""
    try:
        image = load_image(data, reduce_to=DISPLAY_SIDE)
    except FerError:
        return None
    image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return image


def predict_items(predictor: Predictor, model_key: str, items: list[tuple[str, bytes]],
                  options: tuple) -> list[tuple[str, bytes, PredictionResult]]:
    progress = st.progress(0.0) if len(items) > 1 else None
    budget = PixelBudget()  # one allowance for the whole submission, not one per image
    done = []
    for index, (name, data) in enumerate(items):
        if progress is not None:
            progress.progress(index / len(items),
                              text=f"Analysing {literal(name)} ({index + 1}/{len(items)})…")
        try:
            with st.spinner(f"Analysing {literal(name)}…") if progress is None else nullcontext():
                result = analyse(predictor, model_key, data, options, budget)
        except PixelBudgetSpent as exc:
            result = failed_result(data, exc)
        except Exception as exc:  # one strange image must not take the others down
            result = PredictionResult(source=name, faces=[], face_found=False, message=str(exc),
                                      error=f"could not analyse this image ({type(exc).__name__}: {exc})")
        done.append((name, data, result))
    if progress is not None:
        progress.empty()
    return done


def results_frame(done: list[tuple[str, bytes, PredictionResult]], classes: list[str]) -> pd.DataFrame:
    """One row per face (or per failed image): file, face, top emotion, probability, all classes."""
    rows = []
    for name, _, result in done:
        if not result.ok:
            rows.append({"file": name, "face": "", "top emotion": None, "probability": None,
                         "uncertain": None, **{c: None for c in classes}, "box": "",
                         "error": result.error})
            continue
        for number, face in enumerate(result.faces, start=1):
            box = face.box
            rows.append({"file": name, "face": str(number) if box else "none: whole image",
                         "top emotion": face.label, "probability": face.confidence,
                         "uncertain": face.uncertain,
                         **{c: face.probabilities.get(c) for c in classes},
                         "box": f"{box.x},{box.y},{box.w},{box.h}" if box else "", "error": ""})
    columns = ["file", "face", "top emotion", "probability", "uncertain", *classes, "box", "error"]
    return pd.DataFrame(rows, columns=columns)


def show_table(done, classes: list[str], key: str) -> None:
    frame = results_frame(done, classes)
    percent = {c: st.column_config.ProgressColumn(c, min_value=0.0, max_value=1.0, format="percent")
               for c in ["probability", *classes]}
    hidden = [] if (frame["error"] != "").any() else ["error"]
    st.dataframe(frame, hide_index=True, key=f"{key}_table",
                 column_order=[c for c in frame.columns if c not in hidden],
                 column_config={**percent, "box": st.column_config.TextColumn(
                     "box", help="x, y, width, height in the original image's pixels")})
    st.download_button("Download CSV", frame.to_csv(index=False).encode("utf-8"),
                       file_name="fer_predictions.csv", mime="text/csv", icon=":material/download:",
                       key=f"{key}_csv", on_click="ignore")


def uncertain_help(uncertain_below: float) -> str:
    """What the flag means, in plain words: for a calibrated model at its own threshold, what
    its validation faces showed."""
    said = f"The top emotion has less than {uncertain_below:.0%} confidence"
    if predictor.calibration and round(uncertain_below, 2) == round(predictor.uncertain_below, 2):
        return (said + ". On this model's validation faces, readings this unsure were more often wrong "
                "than right: treat it as a guess.")
    return said + ": the model is not sure."


def show_face(number: int, face, uncertain_below: float, key: str, photo: bytes | None = None) -> None:
    title = "Whole image (no face)" if face.box is None else f"Face {number}"
    badge = (" :orange-badge[:material/help: uncertain]" if face.uncertain else "")
    st.markdown(f"**{title}** · {literal(face.label)} **{face.confidence:.1%}**{badge}",
                help=uncertain_help(uncertain_below) if face.uncertain else None)
    crop_col, chart_col = st.columns([1, 2], vertical_alignment="center")
    with crop_col:
        st.image(face.crop.resize((CROP_SHOWN_PX, CROP_SHOWN_PX), Image.Resampling.NEAREST),
                 caption="What the model saw (48×48)", width=CROP_SHOWN_PX)
    with chart_col:
        st.plotly_chart(probability_figure(face), key=f"{key}_chart_{number}",
                        config={"displayModeBar": False})
    explain_face(predictor, model_key, face, key, photo)  # Grad-CAM, behind a toggle


def annotated(data: bytes, result: PredictionResult) -> Image.Image | None:
    image = display_image(data)
    return None if image is None else annotate(image, result, PRIMARY, UNCERTAIN_COLOUR)


def show_card(name: str, data: bytes, result: PredictionResult, uncertain_below: float,
              key: str, with_image: bool = True) -> None:
    if not result.ok:
        st.error(f"**{literal(name)}**: {literal(result.error)}", icon=":material/broken_image:")
        return
    details = [result.message if result.face_found else NO_FACE]
    if result.image_size:
        details.append(f"{result.image_size[0]}×{result.image_size[1]} px")
    if result.timings_ms:
        details.append(f"{sum(result.timings_ms.values()):.0f} ms")
    st.markdown(f"**{literal(name)}**  \n:gray[{' · '.join(details)}]")
    if not result.face_found:
        # the whole-image reading is not an answer about a face: say so first, show it below, folded
        st.warning("**No face found** in this image, so there is no emotion to read. Crop the photo "
                   "closer to the face, or lower the minimum face size in Options.",
                   icon=":material/face_retouching_off:")
        if with_image and (image := display_image(data)) is not None:
            st.image(image, width=320, output_format="JPEG")
        with st.expander(WHOLE_IMAGE_LABEL, icon=":material/image:"):
            st.caption("The whole picture squeezed to 48×48 grey, as if it were a face. The model "
                       "only learnt faces, so this reading means little.")
            show_face(1, result.faces[0], uncertain_below, f"{key}_1")
        return
    if not with_image:
        for number, face in enumerate(result.faces, start=1):
            with st.container(border=True):
                show_face(number, face, uncertain_below, f"{key}_{number}", photo=data)
        return
    left, right = st.columns([5, 6], gap="large")
    with left:
        if (image := annotated(data, result)) is not None:
            st.image(image, width="stretch", output_format="JPEG")
    with right:
        for number, face in enumerate(result.faces, start=1):
            with st.container(border=True):
                show_face(number, face, uncertain_below, f"{key}_{number}", photo=data)


def summary(result: PredictionResult) -> str:
    """One line per image, plain text: '2 faces found · happy 63%'."""
    if not result.ok:
        return "could not be read"
    if not result.face_found:
        return NO_FACE
    best = max(result.faces, key=lambda f: f.confidence)
    return f"{result.message} · {best.label} {best.confidence:.0%}"


def show_grid(done: list[tuple[str, bytes, PredictionResult]]) -> None:
    """Every annotated photo at a glance, GRID_COLUMNS a row, captioned with its file and summary."""
    readable = [(name, data, result) for name, data, result in done if result.ok]
    for start in range(0, len(readable), GRID_COLUMNS):
        columns = st.columns(GRID_COLUMNS)
        for column, (name, data, result) in zip(columns, readable[start:start + GRID_COLUMNS]):
            with column:
                image = annotated(data, result) if result.face_found else display_image(data)
                if image is not None:
                    st.image(image, width="stretch", output_format="JPEG")
                st.text(f"{name}\n{summary(result)}")


def show_results(predictor: Predictor, model_key: str, items: list[tuple[str, bytes]],
                 options: tuple, key: str) -> None:
    done = predict_items(predictor, model_key, items, options)
    classes = predictor.class_names
    uncertain_below = dict(options)["uncertain_below"]
    grid = len(done) > EXPANDED_CARDS
    if len(done) > 1:
        faces = sum(len(r.faces) for _, _, r in done if r.ok and r.face_found)
        failed = sum(1 for _, _, r in done if not r.ok)
        st.markdown(f"**{len(done)} images** · {faces} face{'s' if faces != 1 else ''} found"
                    + (f" · :red[{failed} could not be read]" if failed else ""))
        if grid:
            show_grid(done)
        show_table(done, classes, key)
    if grid:
        st.caption("Details per image:")
    for index, (name, data, result) in enumerate(done):
        card_key = f"{key}_{index}"
        if grid and result.ok:
            with st.expander(f"{literal(name)} · {literal(summary(result))}"):
                show_card(name, data, result, uncertain_below, card_key, with_image=False)
        elif result.ok:
            with st.container(border=True):
                show_card(name, data, result, uncertain_below, card_key)
        else:
            show_card(name, data, result, uncertain_below, card_key)
    if len(done) == 1 and done[0][2].ok:
        with st.expander("As a table (CSV)", icon=":material/table:"):
            show_table(done, classes, key)


# ---- the page ------------------------------------------------------------------------------

predictor = model_section()
model_path = Path(predictor.info["path"])
model_key = (f"{model_path}:{model_path.stat().st_mtime_ns if model_path.exists() else 0}"
             f":{predictor.backend}")
classes = predictor.class_names

with st.expander("Options", icon=":material/tune:"):
    if st.session_state.get("predict_top_k", 3) > len(classes):
        st.session_state["predict_top_k"] = len(classes)
    o1, o2, o3, o4 = st.columns(4)
    top_k = o1.slider("Top-k emotions", 1, len(classes), min(3, len(classes)), key="predict_top_k",
                      help="How many of the most likely emotions to highlight on each chart.")
    min_face = o2.number_input("Minimum face size (px)", min_value=8, max_value=2048, value=24,
                               step=4, key="predict_min_face",
                               help="Faces smaller than this (in the photo's pixels) are ignored.")
    # a slider per model: each brings its own threshold (a calibrated one chose it on validation data)
    uncertain_pct = o3.slider("Uncertain below", 0, 100, round(predictor.uncertain_below * 100), step=1,
                              format="%d%%", key=f"predict_uncertain::{model_key}",
                              help=UNCERTAIN_HELP_CALIBRATED if predictor.calibration else UNCERTAIN_HELP)
    detector = o4.selectbox("Face detector", DETECTORS, key="predict_detector",
                            help="auto: a fast upright search, then tilted heads and smaller "
                                 "faces when that finds nothing.")
options = (("top_k", int(top_k)), ("min_face_size", int(min_face)),
           ("uncertain_below", uncertain_pct / 100), ("detector", detector))

upload_tab, url_tab, camera_tab, live_tab = st.tabs([f":material/upload: {TABS[0]}", f":material/link: {TABS[1]}",
                                                     f":material/photo_camera: {TABS[2]}",
                                                     f":material/videocam: {TABS[3]}"])

with upload_tab:
    files = st.file_uploader("Drop one or more photos here", type=IMAGE_TYPES,
                             accept_multiple_files=True, key="predict_images",
                             help="JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF. Each face in each "
                                  "photo is found and read.")
    if files:
        show_results(predictor, model_key, [(f.name, f.getvalue()) for f in files], options, "upload")
    else:
        st.caption("Tip: photos where the face is upright and at least ~50 px wide work best.")

with url_tab:
    with st.form("predict_url_form", border=False, enter_to_submit=True):
        url = st.text_input("Image URL", key="predict_url", placeholder="https://example.com/photo.jpg")
        fetch = st.form_submit_button("Fetch and predict", type="primary", icon=":material/download:")
    with st.expander("Local use"):
        allow_private = st.checkbox(
            "Allow local/private URLs", key="predict_allow_private",
            help="Fetch from localhost and private networks (192.168.x.x, 10.x.x.x, …). Leave off "
                 "when others can use this app: it would let them reach your internal network.")
    if fetch:
        address = url.strip()
        if not address:
            st.session_state[URL_STATE] = {"url": "", "data": None, "error": "Enter an image URL first."}
        else:
            with st.spinner(f"Downloading {literal(address)}…"):
                try:
                    data = fetch_image_bytes(address, allow_private=allow_private)
                    st.session_state[URL_STATE] = {"url": address, "data": data, "error": None}
                except FerError as exc:
                    st.session_state[URL_STATE] = {"url": address, "data": None, "error": str(exc)}
    fetched = st.session_state.get(URL_STATE)
    if fetched and fetched["error"]:
        shown = f"**{literal(fetched['url'])}**: " if fetched["url"] else ""
        st.error(shown + literal(fetched["error"]), icon=":material/link_off:")
        if "refusing to fetch" in fetched["error"] and not allow_private:
            st.caption("Using this app only on your own machine? Tick **Allow local/private URLs** "
                       "under *Local use* to fetch from it.")
    elif fetched and fetched["data"] is not None:
        show_results(predictor, model_key, [(fetched["url"], fetched["data"])], options, "url")

with camera_tab:
    if st.toggle("Turn on the camera", key="predict_camera_on",
                 help="Your browser asks for permission; the photo stays on this machine."):
        photo = st.camera_input("Take a photo", key="predict_camera")
        if photo is not None:
            show_results(predictor, model_key, [("camera photo", photo.getvalue())], options, "camera")

with live_tab:
    from pages._live import render_live_mode  # streamlit_webrtc loads only once live mode is on
    render_live_mode(predictor, options)
