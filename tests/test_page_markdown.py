"""Names that come from folders, files and errors are shown as typed on the Data and
TensorBoard pages: never as a Markdown image or link (issue #12 item 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from PIL import Image  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from markdown_safety import active_markdown  # noqa: E402

APP = "../streamlit_app.py"
TIMEOUT = 60
FOLDER_IMAGE = "![x](x.png)"          # a folder name cannot hold '/', a relative image still loads
FOLDER_LINK = "[click](http:example.invalid)"
RUNS_FOLDER = "runs`" + FOLDER_IMAGE   # a backtick ends a code span: `...` alone is not enough


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FER_RUNS_DIR", str(tmp_path / RUNS_FOLDER))
    monkeypatch.setenv("FER_CHECKPOINTS_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FER_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("FER_DATA_HOME", str(tmp_path / "data_home"))
    return tmp_path


def open_page(page: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(f"pages/{page}.py").run(timeout=TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def unescaped(at: AppTest) -> str:
    return "\n".join(m.value for group in (at.markdown, at.caption, at.subheader) for m in group).replace("\\", "")


def test_class_folders_named_like_markdown_show_literally_on_the_data_page(env):
    dataset = env / "data_home" / FOLDER_LINK
    rng = np.random.default_rng(0)
    for name in (FOLDER_IMAGE, "**bold**", "sad"):
        (dataset / name).mkdir(parents=True)
        for k in range(4 if name != "sad" else 8):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(dataset / name / f"{k}.png")
    at = open_page("data", data_source=str(dataset))
    assert not active_markdown(at), active_markdown(at)
    text = unescaped(at)
    assert f"**{FOLDER_IMAGE}**" in text and f"Source: {dataset}" in text and FOLDER_LINK in text


def test_a_runs_folder_named_like_markdown_shows_literally_on_the_tensorboard_page(env, monkeypatch):
    from fer_core import tensorboard as tb
    monkeypatch.setattr(tb, "tensorboard_status", lambda runs_dir: None)
    at = open_page("tensorboard")
    assert not active_markdown(at), active_markdown(at)
    assert f"TensorBoard is **not running** for {env / RUNS_FOLDER}." in unescaped(at)


@pytest.mark.parametrize("typed, escaped", [
    ("www.example.invalid", "www\\.example.invalid"),     # GFM links a bare www. name
    ("WWW.example.invalid", "WWW\\.example.invalid"),
    ("me@example.invalid", "me\\@example.invalid"),       # ... and a bare e-mail address
    ("&lt;b&gt;", "\\&lt;b\\&gt;"),                       # an entity would show as '<b>'
    ("http://x.invalid", "http\\://x.invalid"),
    ("![x](y.png) *a* `c` $x$ :red[r]", "!\\[x\\](y.png) \\*a\\* \\`c\\` \\$x\\$ \\:red\\[r\\]"),
    ("two\nlines", "two lines"),
])
def test_literal_escapes_everything_markdown_would_turn_into_a_link_or_markup(typed, escaped):
    from pages._shared import literal
    assert literal(typed) == escaped
