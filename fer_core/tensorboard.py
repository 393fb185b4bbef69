"""One TensorBoard per runs folder, started on demand and found again after an app restart.

start_tensorboard() launches `python -m tensorboard.main --logdir RUNS --host 127.0.0.1 --port P`
in a session of its own (so stopping it also stops its data-server helper), logs to
<runs_dir>/.tensorboard.log, waits until it answers HTTP, and records pid, port, logdir and url
in <runs_dir>/.tensorboard.json. A later call, from this process or a restarted app, reuses the
recorded instance while that process is alive, is really TensorBoard, and answers for the same
logdir; otherwise it starts a fresh one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import runs
from .errors import FerError

HOST = "127.0.0.1"
STATE_FILE = ".tensorboard.json"
LOG_FILE = ".tensorboard.log"
LOCK_FILE = ".tensorboard.lock"
TENSORBOARD_PACKAGE = "tensorboard"
START_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 5.0
_AUTO_PORT_ATTEMPTS = 3  # a free port can be taken between choosing it and TensorBoard binding it
_BIND_FAILURE_WORDS = ("could not bind", "already in use")


@dataclass(frozen=True)
class TensorBoardInfo:
    """A TensorBoard serving a runs folder. `reused`: it was already running."""

    url: str
    port: int
    pid: int
    reused: bool = False
    logdir: str = ""


class _PortTaken(Exception):
    """TensorBoard exited because its port was taken."""


def start_tensorboard(runs_dir: Path, port: int | None = None, *,
                      timeout_s: float = START_TIMEOUT_S) -> TensorBoardInfo:
    """Return the runs folder's TensorBoard, starting one (on `port`, or a free one) if needed.

    An explicit port different from the running instance's moves TensorBoard to that port.

    Raises FerError if TensorBoard is not installed, the requested port is busy, or it exits
    or stays silent during start-up (with the end of its log).
    """
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    port = port or None  # 0 means "any free port", as it does for bind()
    with _lock(runs_dir):
        current = tensorboard_status(runs_dir)
        if current and port in (None, current.port):
            return current
        _stop_recorded(runs_dir)  # on another port than asked, or alive but not answering
        _require_installed()
        if port is not None:
            _require_free(port)
        info = _start_on_some_port(runs_dir, port, timeout_s)
        runs.atomic_write_json(_state_path(runs_dir), {
            "pid": info.pid, "port": info.port, "logdir": info.logdir, "url": info.url,
            "started_at": time.time()})
        return info


def tensorboard_status(runs_dir: Path) -> TensorBoardInfo | None:
    """The recorded TensorBoard if it is alive and answering for this runs folder, else None."""
    runs_dir = Path(runs_dir).resolve()
    state = _read_state(runs_dir)
    pid, port = state.get("pid"), state.get("port")
    if not isinstance(pid, int) or not isinstance(port, int) or not _is_our_tensorboard(pid, runs_dir):
        return None
    if _served_logdir(port, PROBE_TIMEOUT_S) != str(runs_dir):
        return None
    return TensorBoardInfo(url=_url(port), port=port, pid=pid, reused=True, logdir=str(runs_dir))


def stop_tensorboard(runs_dir: Path) -> bool:
    """Stop the runs folder's TensorBoard; True if a running one was stopped."""
    runs_dir = Path(runs_dir).resolve()
    with _lock(runs_dir):
        return _stop_recorded(runs_dir)


# ---- starting -------------------------------------------------------------------------

def _start_on_some_port(runs_dir: Path, port: int | None, timeout_s: float) -> TensorBoardInfo:
    attempts = 1 if port is not None else _AUTO_PORT_ATTEMPTS
    for _ in range(attempts):
        chosen = port if port is not None else _free_port()
        try:
            return _launch(runs_dir, chosen, timeout_s)
        except _PortTaken:
            if port is not None:
                raise FerError(_busy_message(port)) from None
    raise FerError(f"TensorBoard could not find a free port after {attempts} attempts")


def _launch(runs_dir: Path, port: int, timeout_s: float) -> TensorBoardInfo:
    """Start TensorBoard on `port` and wait until it answers for runs_dir."""
    log_path = runs_dir / LOG_FILE
    with open(log_path, "wb") as log:
        process = subprocess.Popen(_command(runs_dir, port), cwd=runs_dir, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # reap it when it ends so it never lingers as a zombie of the app
    threading.Thread(target=process.wait, name=f"fer-tensorboard-{process.pid}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = _log_tail(log_path)
            if any(words in tail.lower() for words in _BIND_FAILURE_WORDS):
                raise _PortTaken()
            raise FerError(f"TensorBoard exited during start-up (exit code {process.returncode}). "
                           f"Its log ends with:\n{tail}")
        if _served_logdir(port, 1.0) == str(runs_dir):
            return TensorBoardInfo(url=_url(port), port=port, pid=process.pid, reused=False,
                                   logdir=str(runs_dir))
        time.sleep(0.25)
    _stop_process(process.pid)
    raise FerError(f"TensorBoard did not answer on {_url(port)} within {timeout_s:.0f} s. "
                   f"Its log ends with:\n{_log_tail(log_path)}")


def _command(runs_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs_dir), "--host", HOST,
            "--port", str(port)]


def _require_installed() -> None:
    if importlib.util.find_spec(TENSORBOARD_PACKAGE) is None:
        raise FerError(f"TensorBoard is not installed for {sys.executable}; "
                       "install it with `pip install tensorboard`")


def _require_free(port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise FerError(f"port must be a whole number from 1 to 65535 (got {port!r})")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as TensorBoard's server sets it: a port in TIME_WAIT counts as free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise FerError(_busy_message(port)) from None


def _busy_message(port: int) -> str:
    return (f"port {port} on {HOST} is already in use; choose another port, or leave it empty "
            "to pick a free one")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# ---- checking and stopping ------------------------------------------------------------

def _served_logdir(port: int, timeout_s: float) -> str | None:
    """The logdir TensorBoard on `port` reports, or None if nothing (TensorBoard) answers."""
    # no proxies: an http_proxy setting must not capture requests to 127.0.0.1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{_url(port)}data/logdir", timeout=timeout_s) as response:
            value = json.loads(response.read().decode("utf-8")).get("logdir")
    except (OSError, ValueError, AttributeError, urllib.error.URLError):
        return None
    return str(Path(value).resolve()) if isinstance(value, str) else None


def _is_our_tensorboard(pid: int, runs_dir: Path) -> bool:
    """The pid is alive and is TensorBoard for this folder (not a recycled pid)."""
    if not runs.pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"tensorboard" in arg for arg in argv) and str(runs_dir).encode() in argv


def _stop_recorded(runs_dir: Path) -> bool:
    """Stop the recorded TensorBoard if it is still ours, and forget it (caller holds the lock)."""
    pid = _read_state(runs_dir).get("pid")
    stopped = isinstance(pid, int) and _is_our_tensorboard(pid, runs_dir) and _stop_process(pid)
    _state_path(runs_dir).unlink(missing_ok=True)
    return bool(stopped)


def _stop_process(pid: int) -> bool:
    """SIGTERM its process group, SIGKILL if still alive after a while. True if it was alive."""
    if not runs.pid_alive(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # started with start_new_session: pgid == pid, data server included
        except ProcessLookupError:
            return True
        except PermissionError as exc:
            raise FerError(f"not allowed to stop TensorBoard (pid {pid}): {exc}") from exc
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while runs.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not runs.pid_alive(pid):
            break
    return True


# ---- small helpers --------------------------------------------------------------------

def _lock(runs_dir: Path) -> "AbstractContextManager[None]":
    """Two tabs pressing "start" together get one TensorBoard."""
    return runs.exclusive_lock(runs_dir / LOCK_FILE)


def _state_path(runs_dir: Path) -> Path:
    return runs_dir / STATE_FILE


def _read_state(runs_dir: Path) -> dict[str, Any]:
    try:
        value = runs.read_json(_state_path(runs_dir))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _url(port: int) -> str:
    return f"http://{HOST}:{port}/"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
