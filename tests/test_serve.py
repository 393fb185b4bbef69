"""The REST service (fer_core.serve): answers, refusals and limits, with an untrained tiny model.

Everything binds 127.0.0.1 and nothing reaches the network. One test starts a real server
process; the rest drive the app in-process (TestClient, or the raw ASGI interface where the
test must see how much of a body was read).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data

from fer_core import images, serve
from fer_core.predict import NO_FACE_MESSAGE, Predictor
from fer_core.serve import ServeSettings, create_app

from served_app import free_port
from test_predict import jpeg, save_checkpoint

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "random.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, num_threads=1)  # one thread: the machine is shared


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return jpeg(Image.fromarray(data.astronaut()))


@pytest.fixture(scope="module")
def grey_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (160, 120), (180, 180, 180)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor, ServeSettings())) as test_client:
        yield test_client


def client_for(predictor: Predictor, **settings: Any) -> TestClient:
    # raise_server_exceptions=False: see the answer a real client gets, not the test's exception
    return TestClient(create_app(predictor, ServeSettings(**settings)), raise_server_exceptions=False)


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key not in ("timings_ms", "source")}


# --------------------------------------------------------------------------- answers

def test_health_and_model_describe_the_served_model(client: TestClient, predictor: Predictor) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/model").json()
    assert model["classes"] == predictor.class_names and model["input_size"] == 48
    assert model["backend"] == "torch" and model["tta"] is False
    assert model["run_id"] is None and model["test_accuracy"] is None
    assert model["source"] == "random.pt"  # the name only: not where the server keeps it


def test_an_uploaded_photo_is_answered_exactly_as_predict_json_would(client: TestClient,
                                                                     predictor: Predictor,
                                                                     astronaut_jpeg: bytes) -> None:
    answer = client.post("/predict", files={"files": ("astronaut.jpg", astronaut_jpeg, "image/jpeg")})
    assert answer.status_code == 200
    document = answer.json()
    assert document["classes"] == predictor.class_names
    assert document["model"] == {"run_id": None, "backend": "torch", "input_size": 48, "tta": False}
    (result,) = document["results"]
    expected = json.loads(json.dumps(predictor.predict(astronaut_jpeg).to_dict()))
    assert without_timings(result) == without_timings(expected)
    assert result["source"] == "astronaut.jpg" and result["face_found"] and result["ok"]
    assert set(result["timings_ms"]) == {"load", "detect", "crop", "classify"}


def test_a_single_file_without_a_face_is_classified_as_a_whole(client: TestClient, grey_png: bytes) -> None:
    answer = client.post("/predict", files={"file": ("grey.png", grey_png, "image/png")},
                         params={"top_k": 1})
    (result,) = answer.json()["results"]
    assert result["ok"] and not result["face_found"] and result["message"] == NO_FACE_MESSAGE
    (face,) = result["faces"]
    assert face["box"] is None and len(face["top_k"]) == 1


def test_a_bad_file_fails_alone_and_a_batch_of_bad_files_is_still_answered(
        client: TestClient, astronaut_jpeg: bytes) -> None:
    text = ("notes.txt", b"these are words, not pixels", "text/plain")
    html = ("<script>alert(1)</script>.jpg", b"<html><body>hi</body></html>", "image/jpeg")
    answer = client.post("/predict", files=[("files", ("a.jpg", astronaut_jpeg, "image/jpeg")),
                                            ("files", text)])
    good, bad = answer.json()["results"]
    assert answer.status_code == 200 and good["ok"] and good["faces"]
    assert not bad["ok"] and bad["faces"] == [] and bad["source"] == "notes.txt"
    assert "is not an image in a format this tool reads" in bad["error"]
    answer = client.post("/predict", files=[("files", text), ("files", html)])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    results = answer.json()["results"]
    assert [r["ok"] for r in results] == [False, False]
    assert results[1]["source"] == "<script>alert(1)</script>.jpg"  # data in JSON, never markup
    assert "it is an HTML page" in results[1]["error"]


def test_query_options_are_validated_by_their_declared_bounds(client: TestClient, grey_png: bytes) -> None:
    upload = {"files": ("grey.png", grey_png, "image/png")}
    for params in ({"top_k": 0}, {"top_k": 8}, {"detector": "yolo"}, {"min_face_size": 0},
                   {"uncertain_below": 1.5}):
        answer = client.post("/predict", files=upload, params=params)
        assert answer.status_code == 422, params
    answer = client.post("/predict", files=upload, params={"top_k": 7, "detector": "haar-default"})
    assert answer.status_code == 200 and len(answer.json()["results"][0]["faces"][0]["top_k"]) == 7
    schema = client.get("/openapi.json").json()
    detector = next(p for p in schema["paths"]["/predict"]["post"]["parameters"] if p["name"] == "detector")
    assert detector["schema"]["enum"] == ["auto", "haar-alt2", "haar-default"]


# --------------------------------------------------------------------------- request limits

def test_no_image_is_422_and_too_many_files_is_413(predictor: Predictor, grey_png: bytes) -> None:
    client = client_for(predictor, max_files=2)
    assert client.post("/predict", data={"note": "x"}).status_code == 422
    answer = client.post("/predict", files=[("files", (f"{i}.png", grey_png, "image/png")) for i in range(3)])
    assert answer.status_code == 413
    assert answer.json()["detail"] == "3 files in one request; this server accepts at most 2 per request"
    answer = client.post("/predict/url", json={"urls": [f"https://example.com/{i}.jpg" for i in range(3)]})
    assert answer.status_code == 413 and "3 URLs in one request" in answer.json()["detail"]


def _call_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """POST /predict straight through the ASGI interface: (status, JSON body, chunks read).
    TestClient hands an app the whole body at once; a server hands it over piece by piece."""
    read = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": next(chunks), "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body), read


def test_a_body_declared_too_large_is_refused_before_any_of_it_is_read(predictor: Predictor) -> None:
    app = create_app(predictor, ServeSettings(max_body_bytes=100_000))
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"5000000000")]
    status, body, read = _call_asgi(app, headers, iter([b"x" * 65536] * 100_000))
    assert status == 413 and read == 0
    assert body["detail"].startswith("the request body is larger than 0.1 MiB")


def test_a_body_streaming_past_the_cap_without_a_length_is_cut_off_at_the_cap(predictor: Predictor) -> None:
    app = create_app(predictor, ServeSettings(max_body_bytes=1_000_000))
    opening = (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n")
    chunks = iter([opening] + [b"\xff" * 65536] * 10_000)  # 650 MB if it were all read
    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"transfer-encoding", b"chunked")]
    status, body, read = _call_asgi(app, headers, chunks)
    assert status == 413 and "larger than 1.0 MiB" in body["detail"]
    assert read <= 1 + 1_000_000 // 65536 + 1


def test_a_body_trickling_in_past_its_time_is_refused_and_frees_its_slot(predictor: Predictor,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fer_core import serve
    monkeypatch.setattr(serve, "BODY_TIMEOUT_S", 0.3)
    app = create_app(predictor, ServeSettings(max_concurrency=1, max_queue=0))
    opening = (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"slow.jpg\"\r\n"
               b"Content-Type: image/jpeg\r\n\r\n")

    def trickle() -> Iterator[bytes]:
        yield opening
        while True:
            time.sleep(0.05)  # a byte now and then: each read answers, the body never ends
            yield b"\xff"

    headers = [(b"content-type", b"multipart/form-data; boundary=x"), (b"transfer-encoding", b"chunked")]
    begun = time.perf_counter()
    status, body, _ = _call_asgi(app, headers, trickle())
    assert status == 408 and body["detail"] == "the request body did not arrive within 0.3 s"
    assert time.perf_counter() - begun < 5
    status, _, _ = _call_asgi(app, headers, trickle())
    assert status == 408  # not 503: the one slot was given back


def test_the_pixel_budget_is_per_request(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_REQUEST_PIXELS", 1_000_000)
    buffer = io.BytesIO()
    Image.new("RGB", (800, 800), (90, 90, 90)).save(buffer, "PNG")  # 0.64 MP
    upload = [("files", (f"{i}.png", buffer.getvalue(), "image/png")) for i in range(2)]
    client = client_for(predictor)
    for _ in range(2):  # the second request starts with a full budget again
        first, second = client.post("/predict", files=upload).json()["results"]
        assert first["ok"] and not second["ok"]
        assert "was not decoded: this request already decoded 1 of its 1 megapixels" in second["error"]


# --------------------------------------------------------------------------- URLs

class _ImageHandler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_image_url(astronaut_jpeg: bytes) -> Iterator[str]:
    _ImageHandler.body = astronaut_jpeg
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    worker = threading.Thread(target=httpd.serve_forever, daemon=True)
    worker.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/face.jpg"
    httpd.shutdown()
    httpd.server_close()


def test_urls_on_private_addresses_are_refused_unless_the_server_allows_them(
        predictor: Predictor, local_image_url: str) -> None:
    client = client_for(predictor)
    answer = client.post("/predict/url", json={"url": local_image_url})
    assert answer.status_code == 400
    assert answer.json()["detail"] == ("refusing to fetch from 127.0.0.1: it is a loopback address; "
                                       "only public internet addresses are allowed")
    for url, words in (("http://169.254.169.254/latest/meta-data", "link-local"),
                       ("http://10.1.2.3/a.jpg", "private"), ("file:///etc/passwd", "file: addresses"),
                       ("ftp://example.com/a.jpg", "ftp: addresses")):
        answer = client.post("/predict/url", json={"urls": [url]})
        assert answer.status_code == 400 and words in answer.json()["detail"], url
    assert client.post("/predict/url", json={}).status_code == 422
    assert client.post("/predict/url", json={"url": "x", "extra": 1}).status_code == 422

    allowing = client_for(predictor, allow_private_urls=True)
    answer = allowing.post("/predict/url", json={"urls": [local_image_url]}, params={"top_k": 2})
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    assert result["ok"] and result["face_found"] and result["source"] == local_image_url
    assert len(result["faces"][0]["top_k"]) == 2


# --------------------------------------------------------------------------- the token

def test_a_token_guards_everything_but_health_and_the_docs(predictor: Predictor, grey_png: bytes) -> None:
    client = client_for(predictor, token=TOKEN)
    upload = {"files": ("grey.png", grey_png, "image/png")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for answer in (client.post("/predict", files=upload, headers=headers),
                       client.post("/predict/url", json={"url": "https://example.com/a.jpg"}, headers=headers),
                       client.get("/model", headers=headers)):
            assert answer.status_code == 401, (answer.request.url, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert "bearer token is required" in answer.json()["detail"]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/predict", files=upload, headers=good).status_code == 200
    assert client.get("/model", headers=good).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["info"]["version"] == serve.__version__
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in schema["paths"]["/predict"]["post"] and "security" not in schema["paths"]["/health"]["get"]


# --------------------------------------------------------------------------- concurrency, time, failures

def _blocking_predict_many(started: threading.Event, release: threading.Event):
    def predict_many(sources: list, **options: Any) -> list:
        started.set()
        release.wait(10)
        return []
    return predict_many


def test_requests_beyond_the_running_and_waiting_bound_get_503_at_once(
        predictor: Predictor, grey_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(predictor, "predict_many", _blocking_predict_many(started, release))
    upload = {"files": ("grey.png", grey_png, "image/png")}
    answers: list[httpx.Response] = []
    with TestClient(create_app(predictor, ServeSettings(max_concurrency=1, max_queue=0))) as client:
        first = threading.Thread(target=lambda: answers.append(client.post("/predict", files=upload)))
        first.start()
        try:
            assert started.wait(10)
            begun = time.perf_counter()
            busy = client.post("/predict", files=upload)
            assert time.perf_counter() - begun < 2
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "the server is busy" in busy.json()["detail"]
            assert client.get("/health").status_code == 200  # the bound is for predictions only
        finally:
            release.set()
            first.join(10)
        assert answers[0].status_code == 200
        assert client.post("/predict", files=upload).status_code == 200  # the slot came back


def test_a_prediction_that_takes_too_long_answers_504(predictor: Predictor, grey_png: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(predictor, "predict_many", _blocking_predict_many(started, release))
    try:
        client = client_for(predictor, timeout_s=0.3)
        answer = client.post("/predict", files={"files": ("grey.png", grey_png, "image/png")})
    finally:
        release.set()
    assert answer.status_code == 504
    assert answer.json()["detail"].startswith("the prediction did not finish within 0.3 s")


def test_an_internal_error_answers_500_without_a_trace_of_the_code(predictor: Predictor, grey_png: bytes,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sources: list, **options: Any) -> list:
        raise RuntimeError("secret detail from /srv/models/internal.pt")
    monkeypatch.setattr(predictor, "predict_many", broken)
    answer = client_for(predictor).post("/predict", files={"files": ("grey.png", grey_png, "image/png")})
    assert answer.status_code == 500 and answer.json() == {"detail": "internal error"}
    assert "Traceback" not in answer.text and "secret" not in answer.text


# --------------------------------------------------------------------------- the command

@pytest.fixture
def restore_threads() -> Iterator[None]:
    """serve_command sets torch's and OpenCV's process-wide thread counts: undo it for the
    tests that run after."""
    import cv2
    import torch
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_refuses_a_missing_or_unusable_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               restore_threads: None) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path, words in ((tmp_path / "missing.pt", "model file not found"),
                        (garbage, "garbage.pt is not a safe fer_core checkpoint")):
        assert serve.serve_command(_serve_args(str(path))) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err


def test_serve_says_where_it_serves_warns_when_public_and_hands_workers_their_settings(
        checkpoint: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, restore_threads: None) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: calls.append((app, options)))
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    monkeypatch.setenv(serve.CONFIG_ENV, "")  # restored (removed) after the test

    assert serve.serve_command(_serve_args(str(checkpoint), "--port", "8123")) == 0
    out, err = capsys.readouterr()
    assert "at http://127.0.0.1:8123" in out and err == ""
    assert calls[-1][1]["host"] == "127.0.0.1" and calls[-1][1]["port"] == 8123

    monkeypatch.setenv(serve.TOKEN_ENV, TOKEN)
    assert serve.serve_command(_serve_args(str(checkpoint), "--host", "0.0.0.0", "--workers", "2",
                                           "--max-concurrency", "1", "--max-queue", "3")) == 0
    out, err = capsys.readouterr()
    assert err == ""  # a token is set: no warning
    app, options = calls[-1]
    assert app == "fer_core.serve:app_from_environment" and options["factory"] and options["workers"] == 2
    assert TOKEN not in os.environ[serve.CONFIG_ENV]
    with TestClient(serve.app_from_environment()) as worker:  # what each worker process builds
        assert worker.get("/model").status_code == 401
        assert worker.get("/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()["classes"] == \
            predictor.class_names

    monkeypatch.delenv(serve.TOKEN_ENV)
    assert serve.serve_command(_serve_args(str(checkpoint), "--host", "0.0.0.0")) == 0
    assert "warning: serving on 0.0.0.0 without a token" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real server

def test_a_real_server_process_answers_over_http(checkpoint: Path, grey_png: bytes) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "fer_core.serve", str(checkpoint), "--port", str(port),
                                "--max-body-mb", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start within 60 s"
            time.sleep(0.2)
        answer = httpx.post(f"{base}/predict", files={"files": ("grey.png", grey_png, "image/png")}, timeout=30)
        assert answer.status_code == 200 and answer.json()["results"][0]["ok"]
        # a huge declared body is answered at once, from the headers alone
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                        b"Content-Length: 10000000000\r\n\r\n")
            assert raw.recv(200).startswith(b"HTTP/1.1 413 ")
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"at http://127.0.0.1:{port}" in output


def test_a_trained_run_exported_to_onnx_is_served_with_the_predict_pages_answer(
        trained_run: Path, tmp_path: Path, astronaut_jpeg: bytes) -> None:
    """Issue #13's path end to end: a trained run, exported to ONNX as the Runs page does,
    served, and asked about a photo: the same faces and emotions as the Predict page reads
    with the run's PyTorch checkpoint."""
    from fer_core.export import export_model
    from fer_core.runs import RunLayout

    exported = export_model(trained_run, "onnx", tmp_path / "model.onnx")
    served = Predictor.load(exported.path, num_threads=1)
    with TestClient(create_app(served, ServeSettings())) as client:
        answer = client.post("/predict", files={"files": ("photo.jpg", astronaut_jpeg, "image/jpeg")})
        model = client.get("/model").json()
    assert answer.status_code == 200
    assert model["backend"] == "onnx" and model["run_id"] == RunLayout(trained_run).id
    (result,) = answer.json()["results"]
    page = Predictor.load(RunLayout(trained_run).best_checkpoint, backend="torch", num_threads=1)
    expected = page.predict(astronaut_jpeg).to_dict()
    assert result["face_found"] and [f["box"] for f in result["faces"]] == [f["box"] for f in expected["faces"]]
    for got, want in zip(result["faces"], expected["faces"], strict=True):
        assert got["label"] == want["label"]
        assert max(abs(got["probabilities"][c] - p) for c, p in want["probabilities"].items()) <= 1e-4
