"""TensorBoard management with a real TensorBoard process on 127.0.0.1 (no TensorFlow needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fer_core import runs
from fer_core import tensorboard as tb
from fer_core.errors import FerError

pytestmark = pytest.mark.subprocess  # a real TensorBoard process

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def runs_dir(tmp_path: Path):
    """A runs folder whose TensorBoard, if a test started one, is always stopped afterwards."""
    folder = tmp_path / "runs"
    folder.mkdir()
    yield folder
    pid = tb._read_state(folder.resolve()).get("pid")
    tb.stop_tensorboard(folder)
    if isinstance(pid, int) and runs.pid_alive(pid):  # the state file was lost: stop it anyway
        tb._stop_process(pid)


def http_get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.status, response.read()


def test_start_serves_reuses_and_stop_kills(runs_dir: Path):
    assert tb.tensorboard_status(runs_dir) is None
    info = tb.start_tensorboard(runs_dir)
    assert not info.reused and info.url == f"http://127.0.0.1:{info.port}/"
    status, body = http_get(info.url)
    assert status == 200 and b"<html" in body.lower()
    assert json.loads(http_get(info.url + "data/logdir")[1])["logdir"] == str(runs_dir.resolve())
    recorded = runs.read_json(runs_dir / tb.STATE_FILE)
    assert (recorded["pid"], recorded["port"], recorded["url"]) == (info.pid, info.port, info.url)

    again = tb.start_tensorboard(runs_dir)
    assert again.reused and (again.pid, again.port) == (info.pid, info.port)
    assert tb.tensorboard_status(runs_dir) == again

    # a restarted app (a new interpreter) finds and reuses the same process
    code = ("import sys; from fer_core.tensorboard import start_tensorboard; "
            "i = start_tensorboard(sys.argv[1]); print(i.pid, i.port, i.reused)")
    out = subprocess.run([sys.executable, "-c", code, str(runs_dir)], cwd=PROJECT_ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out == [str(info.pid), str(info.port), "True"]

    assert tb.stop_tensorboard(runs_dir) is True
    assert not runs.pid_alive(info.pid)
    assert tb.tensorboard_status(runs_dir) is None and not (runs_dir / tb.STATE_FILE).exists()
    with pytest.raises(OSError):
        http_get(info.url)
    assert tb.stop_tensorboard(runs_dir) is False  # nothing left to stop


def test_a_busy_port_gives_a_clear_error(runs_dir: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(FerError, match=f"port {port} .*already in use"):
            tb.start_tensorboard(runs_dir, port=port)
    assert not (runs_dir / tb.STATE_FILE).exists()


def test_a_stale_record_is_not_reused(runs_dir: Path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    runs.atomic_write_json(runs_dir / tb.STATE_FILE, {"pid": gone.pid, "port": 6006,
                                                       "logdir": str(runs_dir), "url": "x"})
    assert tb.tensorboard_status(runs_dir) is None
    assert tb.stop_tensorboard(runs_dir) is False


def test_missing_tensorboard_is_explained(runs_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tb, "TENSORBOARD_PACKAGE", "tensorboard_that_is_not_installed")
    with pytest.raises(FerError, match="not installed.*pip install tensorboard"):
        tb.start_tensorboard(runs_dir)


def test_an_early_exit_reports_the_log_tail(runs_dir: Path, monkeypatch: pytest.MonkeyPatch):
    crash = [sys.executable, "-c", "import sys; print('bad things happened'); sys.exit(3)"]
    monkeypatch.setattr(tb, "_command", lambda runs_dir, port: crash)
    with pytest.raises(FerError, match=r"exited during start-up \(exit code 3\)[\s\S]*bad things happened"):
        tb.start_tensorboard(runs_dir)
    assert not (runs_dir / tb.STATE_FILE).exists()


def test_asking_for_another_port_moves_it_there(runs_dir: Path):
    first = tb.start_tensorboard(runs_dir)
    port = tb._free_port()
    moved = tb.start_tensorboard(runs_dir, port=port)
    assert not moved.reused and moved.port == port and moved.pid != first.pid
    assert not runs.pid_alive(first.pid)  # the old one does not linger
    assert http_get(moved.url)[0] == 200
    assert tb.start_tensorboard(runs_dir, port=0).pid == moved.pid  # 0 = any port: reuse
