"""The Predict page's live mode: the webcam over WebRTC (streamlit-webrtc), every face boxed and
read on the server, a per-face timeline of the last 30 s, frames per second and dropped frames.

Not a page (files starting with _ are not listed). The frame work is fer_core.live's; this module
connects it to the browser. streamlit_webrtc (with aiortc and PyAV: ~2 s to import) is imported
only once the user turns live mode on, so the Predict page stays as quick as before.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from fer_core import ui_data
from fer_core.live import TIMELINE_S, LiveAnnotator, TimelinePoint, ice_servers_from_env
from fer_core.predict import Predictor
from pages._shared import literal

STREAM_KEY = "predict_live_stream"
ANNOTATOR_KEY = "predict_live_annotator"
TOGGLE_KEY = "predict_live_on"
REFRESH_S = 1.0
MAX_TRACKS_SHOWN = 3
CLASS_COLOURS = qualitative.Plotly  # ten colours: one per class, the same in every face's chart
MEDIA_CONSTRAINTS = {"video": {"width": {"ideal": 640}, "height": {"ideal": 480}, "frameRate": {"ideal": 15}},
                     "audio": False}
VIDEO_ATTRS = {"autoPlay": True, "controls": False, "muted": True, "playsInline": True,
               "style": {"width": "100%"}}


def render_live_mode(predictor: Predictor, options: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> None:
    """The live tab: a switch, then the stream and its panel. `options` are the page's prediction
    options (`Predictor.predict` keywords: top-k, minimum face size, uncertain threshold,
    detector), applied to every frame and updated while the stream runs."""
    st.caption("Your camera's video goes to this app (this machine) and comes back with a box, a number "
               "and the emotion on every face (? marks a reading below the *Uncertain below* option; "
               "a frame without a face says so and is not read). The server reads frames as fast as "
               "its CPU allows and skips those that arrive while it is busy: the picture never lags.")
    if not st.toggle("Turn on live mode", key=TOGGLE_KEY,
                     help="Your browser asks for the camera; the video goes only to this app's server."):
        return
    try:
        ice_servers = ice_servers_from_env()
    except ValueError as exc:
        st.error(literal(exc), icon=":material/error:")
        return
    from streamlit_webrtc import WebRtcMode, webrtc_streamer

    annotator = session_annotator(predictor, dict(options))
    video_col, panel_col = st.columns([1, 1], gap="large")
    with video_col:
        context = webrtc_streamer(
            key=STREAM_KEY, mode=WebRtcMode.SENDRECV,
            # no STUN/TURN unless configured: the browser and this server meet on host addresses
            rtc_configuration={"iceServers": ice_servers},
            media_stream_constraints=MEDIA_CONSTRAINTS, video_html_attrs=VIDEO_ATTRS,
            video_processor_factory=functools.partial(processor_class(), annotator),
            async_processing=True)
    playing = bool(context.state.playing)
    with panel_col:
        panel = st.fragment(run_every=REFRESH_S if playing else None)(live_panel)
        panel(annotator, playing)


def session_annotator(predictor: Predictor, options: dict[str, Any]) -> LiveAnnotator:
    """This session's annotator, following the chosen model and options (a new model starts a
    new timeline: its classes may differ)."""
    annotator = st.session_state.get(ANNOTATOR_KEY)
    if not isinstance(annotator, LiveAnnotator):
        primary = st.get_option("theme.primaryColor") or ui_data.TRAIN_COLOR
        annotator = LiveAnnotator(predictor, options, colour=primary)  # uncertain: amber, as on photos
        st.session_state[ANNOTATOR_KEY] = annotator
    annotator.use(predictor, options)
    return annotator


@functools.cache
def processor_class() -> type:
    """streamlit-webrtc's processor for the annotator: in async mode its worker thread hands
    `recv_queued` every frame that arrived since the last call; only the newest is read."""
    import av
    from streamlit_webrtc import VideoProcessorBase

    class LiveProcessor(VideoProcessorBase):
        def __init__(self, annotator: LiveAnnotator) -> None:
            self.annotator = annotator
            annotator.reset()  # a new stream: new counters, tracks and timeline

        def recv(self, frame: av.VideoFrame) -> av.VideoFrame:
            return self._annotated(frame, dropped=0)

        async def recv_queued(self, frames: list[av.VideoFrame]) -> list[av.VideoFrame]:
            return [self._annotated(frames[-1], dropped=len(frames) - 1)]

        def _annotated(self, frame: av.VideoFrame, dropped: int) -> av.VideoFrame:
            image = self.annotator.process(frame.to_ndarray(format="rgb24"), dropped=dropped)
            return av.VideoFrame.from_ndarray(image, format="rgb24")

    return LiveProcessor


def live_panel(annotator: LiveAnnotator, playing: bool) -> None:
    """Frames per second, dropped frames and the timeline; redrawn every second while streaming."""
    stats = annotator.stats()
    m1, m2, m3 = st.columns(3)
    m1.metric("Processed fps", f"{stats.fps:.1f}",
              help="Frames read by the model per second, over the last few seconds: what the CPU "
                   "manages. The camera sends more; the rest are dropped, never queued.")
    m2.metric("Camera fps", f"{stats.input_fps:.1f}", help="Frames arriving from the camera per second.")
    m3.metric("Dropped frames", f"{stats.dropped:,}",
              help=f"Frames skipped because the previous one was still being read: "
                   f"{stats.dropped_share:.0%} of {stats.received:,} received.")
    latency = f"{stats.latency_ms:.0f} ms per frame" if stats.latency_ms is not None else "no frame yet"
    if stats.stages_ms:
        latency += f" ({', '.join(f'{stage} {ms:.0f}' for stage, ms in stats.stages_ms.items())})"
    st.caption(f"{stats.processed:,} frames read · {latency} · {stats.faces} face"
               f"{'s' if stats.faces != 1 else ''} in view")
    if stats.last_error:
        st.warning(f"{stats.errors} frame(s) could not be read: {literal(stats.last_error)}",
                   icon=":material/warning:")
    points = annotator.timeline()
    if points:
        st.plotly_chart(timeline_figure(points, annotator.class_names), key="predict_live_timeline",
                        config={"displayModeBar": False})
    elif playing:
        st.info("No face in the last 30 s. Face the camera, in good light, not too far away.",
                icon=":material/face:")
    else:
        st.caption("Press START under the video to begin; allow the camera when the browser asks.")


def timeline_figure(points: Sequence[TimelinePoint], class_names: Sequence[str]) -> go.Figure:
    """One chart per face (the MAX_TRACKS_SHOWN seen most recently): each class's probability
    stacked over the last 30 s, so a band's height is how much of the reading it holds."""
    tracks: dict[int, list[TimelinePoint]] = {}
    for point in points:
        tracks.setdefault(point.track, []).append(point)
    tracks = {track: series for track, series in tracks.items() if len(series) > 1} or tracks  # 1 point: no area
    shown = sorted(tracks, key=lambda t: tracks[t][-1].seconds_ago, reverse=True)[:MAX_TRACKS_SHOWN]
    shown.sort()
    titles = [f"Face {t}: {html.escape(tracks[t][-1].label)} {tracks[t][-1].confidence:.0%} now" for t in shown]
    figure = make_subplots(rows=len(shown), cols=1, shared_xaxes=True, subplot_titles=titles,
                           vertical_spacing=0.12 if len(shown) > 1 else 0.0)
    for row, track in enumerate(shown, start=1):
        series = tracks[track]
        seconds = [p.seconds_ago for p in series]
        for index, name in enumerate(class_names):
            colour = CLASS_COLOURS[index % len(CLASS_COLOURS)]
            figure.add_trace(go.Scatter(
                x=seconds, y=[100 * p.probabilities[index] for p in series], name=html.escape(name),
                legendgroup=html.escape(name), showlegend=row == 1, stackgroup=f"face{track}",
                mode="lines", line=dict(width=0.5, color=colour), fillcolor=colour,
                hovertemplate=f"Face {track} · {html.escape(name)}: %{{y:.0f}}%<extra></extra>"),
                row=row, col=1)
        figure.update_yaxes(range=[0, 100], tickvals=[0, 50, 100], ticktext=["0%", "50%", "100%"], row=row, col=1)
    figure.update_xaxes(range=[-TIMELINE_S, 0], title=None)
    figure.update_xaxes(title="seconds ago", row=len(shown), col=1)
    figure.update_layout(height=70 + 170 * len(shown), margin=dict(l=0, r=0, t=30, b=0),
                         legend=dict(traceorder="reversed"),  # top to bottom as the bands stack
                         hovermode="x unified")
    return figure
