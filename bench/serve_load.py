"""Throughput and latency of the REST service (fer_core.serve) under concurrent clients.

    .venv/bin/python bench/serve_load.py [MODEL.pt] [--clients 1 2 4 8] [--requests 40]
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 [--token T]

Starts `python -m fer_core.serve` on 127.0.0.1 (a randomly initialised checkpoint when no model
is given: latency does not depend on the weights), unless --url names a running server. Each
client is a thread with its own HTTP session sending POST /predict back to back; every level
sends the same number of requests. Prints one Markdown table row per client count.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

# bench/ is the script's folder, so it is on sys.path: reuse the latency benchmark's helpers
from predict_latency import jpeg_bytes, make_checkpoint, percentile, portrait_640x480

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from served_app import free_port  # noqa: E402  (the servers' free 127.0.0.1 port, as the tests pick it)

FER_TEST_DIR = Path("/work/shared/datasets/fer2013/test")
STARTUP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- the server

@contextlib.contextmanager
def local_server(model: Path, server_args: list[str]) -> Iterator[str]:
    """A `fer_core.serve` process on 127.0.0.1 for the duration of the block; yields its URL."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "fer_core.serve", str(model), "--host", "127.0.0.1",
                                "--port", str(port), *server_args],
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def wait_until_healthy(url: str, process: subprocess.Popen, log: io.TextIOBase) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log.read()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not answer /health within {STARTUP_TIMEOUT_S:g} s")


# --------------------------------------------------------------------------- the images

def request_images(kind: str) -> tuple[str, list[tuple[str, bytes]]]:
    """(description, [(file name, bytes)]): FER2013 test faces when asked for and present, else
    a 640x480 JPEG photo of a person (skimage's astronaut on a real backdrop)."""
    if kind == "fer" and FER_TEST_DIR.is_dir():
        files = sorted(FER_TEST_DIR.glob("*/*.jpg"))
        chosen = random.Random(0).sample(files, min(16, len(files)))
        if chosen:
            return (f"{len(chosen)} FER2013 test faces (48x48 JPEG)",
                    [(path.name, path.read_bytes()) for path in chosen])
        print(f"note: no JPEGs under {FER_TEST_DIR}; using the generated photo", file=sys.stderr)
    elif kind == "fer":
        print(f"note: {FER_TEST_DIR} is missing; using the generated photo", file=sys.stderr)
    data = jpeg_bytes(portrait_640x480())
    return f"a 640x480 JPEG photo with one face ({len(data) // 1024} KiB)", [("portrait.jpg", data)]


# --------------------------------------------------------------------------- the load

def run_level(url: str, clients: int, total: int, images: list[tuple[str, bytes]],
              headers: dict[str, str]) -> dict[str, float]:
    """`total` POST /predict requests from `clients` threads; latency per request and throughput."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    remaining = iter(range(total))

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    number = next(remaining, None)
                if number is None:
                    return
                name, data = images[number % len(images)]
                start = time.perf_counter()
                answer = session.post(f"{url}/predict", files={"files": (name, data, "image/jpeg")},
                                      headers=headers, timeout=120)
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = statuses.count(200)
    return {"clients": clients, "requests": total, "ok": ok, "busy": statuses.count(503),
            "other": total - ok - statuses.count(503), "req_per_s": ok / wall,
            "p50_ms": percentile(latencies, 50) if latencies else float("nan"),
            "p99_ms": percentile(latencies, 99) if latencies else float("nan")}


def print_table(rows: list[dict[str, float]]) -> None:
    print("| clients | requests | 200 | 503 | other | req/s | p50 ms | p99 ms |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['ok']} | {row['busy']} | {row['other']} | "
              f"{row['req_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")


def measure(url: str, args: argparse.Namespace, settings: str) -> None:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    description, images = request_images(args.image)
    model = requests.get(f"{url}/model", headers=headers, timeout=10).json()
    print(f"server: {url}; {settings}")
    print(f"model: {model.get('source')} ({model.get('backend')}, input {model.get('input_size')} px); "
          f"images: {description}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start\n")
    run_level(url, 1, args.warmup, images, headers)
    rows = [run_level(url, clients, args.requests, images, headers) for clients in args.clients]
    print_table(rows)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a .pt checkpoint (default: a random one)")
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--token", default=os.environ.get("FER_SERVE_TOKEN"),
                        help="bearer token for the server (default $FER_SERVE_TOKEN)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=40, help="requests per client count (default 40)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--image", choices=("portrait", "fer"), default="portrait")
    parser.add_argument("--threads", type=int, default=1, help="server: CPU threads per prediction")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="server: predictions at once (default: the server's, CPU cores / threads)")
    parser.add_argument("--max-queue", type=int, default=None, help="server: waiting requests (default 8)")
    args = parser.parse_args(argv)

    if args.url:
        measure(args.url.rstrip("/"), args, "settings as that server was started")
        return 0
    server_args = ["--threads", str(args.threads)]
    if args.max_concurrency:
        server_args += ["--max-concurrency", str(args.max_concurrency)]
    if args.max_queue is not None:
        server_args += ["--max-queue", str(args.max_queue)]
    if args.token:
        server_args += ["--token", args.token]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp), 48)
        with local_server(model, server_args) as url:
            settings = " ".join(server_args).replace(args.token or "\0", "***")
            measure(url, args, f"started with `fer_core.serve {settings}` (1 worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
