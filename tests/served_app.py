"""The app in its own Streamlit process on a free 127.0.0.1 port, and the Chromium that opens
it: shared by the browser test, docs/screenshots.py (which shoots the real-model pictures) and
bench/app_large_dataset.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; nothing here downloads a browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Chromium's stand-in camera, allowed without asking (as a user who clicked Allow)
FAKE_CAMERA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_app(folders: dict[str, str], log: Path) -> Iterator[str]:
    """`streamlit run streamlit_app.py` with `folders` (FER_RUNS_DIR, ...) in its environment and
    its output in `log`; yields its URL once /_stcore/health answers, and stops it afterwards."""
    with serving(folders, log) as (url, _):
        yield url


@contextlib.contextmanager
def serving(folders: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """served_app, yielding the server process too (bench/app_large_dataset.py reads its memory)."""
    port = free_port()
    env = {**os.environ, **folders, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, server, log)
        yield url, server
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass


def stop_training_processes(runs_dir: Path) -> None:
    """Kill the trainers and job runners the app started (each leads a session of its own)."""
    for status_file in [*runs_dir.glob("*/*/*/*/status.json"), *runs_dir.glob("*/*/*/*/job.json")]:
        try:
            record = json.loads(status_file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("pid", "runner_pid", "trainer_pid"):
            pid = record.get(key)
            if isinstance(pid, int) and pid > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer /_stcore/health in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
