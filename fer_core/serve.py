"""A REST service for a trained model: FastAPI over `Predictor`, served by uvicorn.

    python -m fer_core.serve MODEL [--host 127.0.0.1] [--port 8000] [--token T] ...

POST /predict (uploads), POST /predict/url (JSON), GET /model, GET /health; OpenAPI docs at
/docs. Each image's answer is `PredictionResult.to_dict()`, the document `predict --json` prints.
Untrusted input is bounded before it costs anything: body size, file count, decoded pixels,
time, and the number of requests waiting for the model.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run
# time, and those that name create_app's local dependencies cannot be resolved from strings.
import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, images
from .argtypes import non_negative_int, positive_int, positive_number
from .backends import BACKENDS as MODEL_BACKENDS
from .errors import FerError, ImageInputError
from .faces import DETECTORS
from .predict import PredictionResult, Predictor

log = logging.getLogger(__name__)

TOKEN_ENV = "FER_SERVE_TOKEN"
CONFIG_ENV = "FER_SERVE_CONFIG"
"""JSON that `serve_command` hands to each uvicorn worker process (all but the token, which
travels in TOKEN_ENV, the variable users set themselves)."""
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MiB = 2**20
DEFAULT_MAX_BODY_BYTES = images.MAX_FILE_BYTES + MiB
"""One image of the largest size image files may have (or a dozen phone photos), plus 1 MiB of
multipart framing. Uploads are held in memory while they are predicted, so every admitted
request may cost this much: keep it near what one request needs."""
DEFAULT_MAX_FILES = 16
DEFAULT_MAX_QUEUE = 8
DEFAULT_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
BODY_TIMEOUT_S = 30.0
"""The most seconds a request's body may take to arrive: a client trickling a byte now and then
would otherwise hold one of the few admission slots for as long as it likes."""
MAX_URL_LENGTH = 2048
MAX_MIN_FACE_SIZE = 10_000
PREDICT_PATHS = frozenset({"/predict", "/predict/url"})
"""The paths that run the model: admission control and the early token check apply to them."""
BACKENDS = ("auto", *MODEL_BACKENDS)
DetectorName = Literal[DETECTORS]  # type: ignore[valid-type]  # choices shown in /docs

T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """What a running service allows; the model itself is a ready `Predictor`."""

    token: str | None = None
    allow_private_urls: bool = False
    max_concurrency: int = 1
    """Predictions running at once (each in its own thread, with the model's own thread budget)."""
    max_queue: int = DEFAULT_MAX_QUEUE
    """Requests waiting (receiving their body, or queued for the model) beyond those running."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_files: int = DEFAULT_MAX_FILES
    """Images (uploaded files or URLs) per request."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_body_bytes < 1 or self.max_files < 1:
            raise ValueError("max_body_bytes and max_files must be at least 1")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token must not be empty")

    def public_dict(self) -> dict[str, Any]:
        """The settings without the token (for logs, worker processes and benchmarks)."""
        values = dataclasses.asdict(self)
        values["token"] = bool(self.token)
        return values


# ---------------------------------------------------------------------- the model, described

def model_description(predictor: Predictor) -> dict[str, Any]:
    """Facts about the served model (`Predictor.describe()`): classes, input size, test
    accuracy, run id, backend, tta and the model file's name (where the server keeps its
    files is none of the client's business)."""
    return predictor.describe()


def _short_description(description: dict[str, Any]) -> dict[str, Any]:
    return {key: description.get(key) for key in ("run_id", "backend", "input_size", "tta")}


# ---------------------------------------------------------------------- admission and body cap

class AdmissionGate:
    """Requests allowed inside the prediction endpoints at once: those running plus those
    waiting. Touched only from the event loop's thread, so a plain counter is enough."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.inside = capacity, 0

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


class RequestGuard:
    """Pure ASGI middleware: refusals that must come before a request body is read.

    For the prediction paths: a missing or wrong token (401), then a full house (503 with
    Retry-After). For every path: a declared Content-Length over the cap (413), and a body that
    streams past the cap without declaring it (413 as soon as the excess arrives).
    """

    def __init__(self, app: ASGIApp, *, settings: ServeSettings, gate: AdmissionGate) -> None:
        self.app, self.settings, self.gate = app, settings, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        gated = scope["path"] in PREDICT_PATHS
        refusal = self._refusal(headers, gated)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if gated and not self.gate.try_enter():
            busy = JSONResponse({"detail": "the server is busy: too many predictions are running or "
                                           "waiting; retry shortly"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
            await busy(scope, receive, send)
            return
        try:
            await self.app(scope, self._capped(receive), send)
        finally:
            if gated:
                self.gate.leave()

    def _refusal(self, headers: Headers, gated: bool) -> Response | None:
        # The endpoint's own token check runs only after FastAPI has parsed the body; a client
        # without the token must not get that far.
        if gated and self.settings.token and not token_matches(headers.get("authorization"),
                                                                 self.settings.token):
            return _unauthorised_response()
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return JSONResponse({"detail": _too_large_message(self.settings.max_body_bytes)},
                                status_code=413)
        return None

    def _capped(self, receive: Receive) -> Receive:
        limit, received, body_done = self.settings.max_body_bytes, 0, False
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S

        async def capped_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body only a disconnect can come; waiting for it is fine
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                # An HTTPException passes through FastAPI's body parsing untouched
                raise HTTPException(408, detail=f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
                                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, detail=_too_large_message(limit))
            return message
        return capped_receive


def _too_large_message(limit: int) -> str:
    return (f"the request body is larger than {limit / MiB:.1f} MiB, the most this server accepts; "
            "send fewer or smaller images per request")


# ---------------------------------------------------------------------- the token

def token_matches(authorization: str | None, token: str) -> bool:
    """True when an Authorization header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(credentials.strip().encode(),
                                                                 token.encode())


def _unauthorised_response() -> JSONResponse:
    return JSONResponse({"detail": "a valid bearer token is required (Authorization: Bearer <token>)"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _token_dependency(token: str) -> Callable[..., None]:
    bearer = HTTPBearer(auto_error=False, description="the token the server was started with "
                                                      f"(--token or ${TOKEN_ENV})")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                             Depends(bearer)]) -> None:
        if credentials is None or not token_matches(f"Bearer {credentials.credentials}", token):
            raise HTTPException(401, detail="a valid bearer token is required "
                                "(Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})
    return require_token


# ---------------------------------------------------------------------- running the model

class PredictionPool:
    """Runs predictions in `workers` threads with a time limit per request.

    A fixed-size executor rather than anyio's thread limiter: a thread cannot be stopped, so a
    request that timed out leaves its prediction running, and anyio would hand that slot to the
    next request at once (more models running than `max_concurrency`). Here the slot stays taken
    until the thread really finishes; work still queued when its request times out is dropped.
    """

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fer-predict")

    async def run(self, work: Callable[[], T]) -> T:
        job = asyncio.get_running_loop().run_in_executor(self._executor, work)
        try:
            return await asyncio.wait_for(job, self.timeout_s)
        except TimeoutError:
            raise HTTPException(504, detail=f"the prediction did not finish within {self.timeout_s:g} s; "
                                "send fewer or smaller images, or try again later") from None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class UrlRefused(Exception):
    """A URL the server will not fetch from; the message says why."""


def refuse_unusable_url(url: str, allow_private: bool) -> None:
    """Raise UrlRefused for a URL that would be refused before any byte is fetched: not
    http(s), malformed, an unknown host or (unless allowed) a private, loopback or link-local
    address. It is the check `images.fetch_image_bytes` makes on every hop (and makes again
    when it fetches); run first, a refusal is the request's answer rather than one result."""
    try:
        images.check_url(url.strip(), allow_private=allow_private)
    except ImageInputError as exc:
        raise UrlRefused(str(exc)) from exc


def _json_response(document: dict[str, Any]) -> Response:
    """Strict JSON: NaN or Infinity would make the answer unreadable to most parsers."""
    try:
        body = json.dumps(document, allow_nan=False)
    except ValueError:
        raise HTTPException(500, detail="the model produced probabilities that are not numbers "
                                        "(NaN or inf)") from None
    return Response(body, media_type="application/json")


class UrlRequest(BaseModel):
    """Images to fetch: one `url`, or several in `urls`."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, max_length=MAX_URL_LENGTH, examples=["https://example.com/face.jpg"])
    urls: list[Annotated[str, Field(max_length=MAX_URL_LENGTH)]] | None = Field(None, min_length=1)

    def all_urls(self) -> list[str]:
        return ([self.url] if self.url is not None else []) + list(self.urls or [])


# ---------------------------------------------------------------------- the app

APP_DESCRIPTION = """\
Facial-emotion predictions from a model trained with FER Studio.

Each image's answer is the object `python -m fer_core predict --json` prints per image: `ok`,
`error`, `face_found`, `message`, `image_size`, `faces` (box, label, confidence, top_k,
probabilities, uncertain) and `timings_ms`. When no face is found the whole image is classified.

**Errors.** An image that cannot be used (not an image, corrupt, too many pixels, an unreachable
URL) gives *its* result `ok: false` with the reason in `error`; the other images are still
predicted, and the answer is **200 even when every image failed**. The request as a whole is
refused with `{"detail": "..."}` when: no image was sent or a parameter is invalid (422); a URL
is refused before fetching, e.g. a private or loopback address (400); the body is too large or
there are too many images (413); the token is missing or wrong (401); the server is full (503,
with `Retry-After`); the prediction takes too long (504).
"""


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    """The service for one ready `predictor`."""
    description = model_description(predictor)
    classes = description["classes"]
    pool = PredictionPool(settings.max_concurrency, settings.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(title="FER Studio prediction service", description=APP_DESCRIPTION,
                  version=__version__, lifespan=lifespan)
    app.add_middleware(RequestGuard, settings=settings,
                       gate=AdmissionGate(settings.max_concurrency + settings.max_queue))
    app.add_exception_handler(Exception, _internal_error)
    protected = [Depends(_token_dependency(settings.token))] if settings.token else []

    def predict_options(
            top_k: Annotated[int, Query(ge=1, le=len(classes), description="emotions listed per face")
                             ] = min(3, len(classes)),
            min_face_size: Annotated[int, Query(ge=1, le=MAX_MIN_FACE_SIZE,
                                                description="ignore faces smaller than this (pixels)")] = 24,
            detector: Annotated[DetectorName, Query(description="face detector")] = "auto",
            uncertain_below: Annotated[float | None, Query(ge=0.0, le=1.0, description=(
                "flag a face as uncertain when its top probability is below this; default: the "
                "model's own threshold (GET /model)"))] = None,
    ) -> dict[str, Any]:
        return {"top_k": top_k, "min_face_size": min_face_size, "detector": detector,
                "uncertain_below": uncertain_below}

    async def answer(sources: Sequence[Any], names: Sequence[str], options: dict[str, Any],
                     check: Callable[[], None] | None = None) -> Response:
        deadline = time.monotonic() + settings.timeout_s  # the client hears 504 then: stop working too

        def work() -> list[PredictionResult]:
            if check is not None:
                check()
            return predictor.predict_many(list(sources), allow_private_urls=settings.allow_private_urls,
                                          pixel_budget=images.PixelBudget(), deadline=deadline, **options)
        try:
            results = await pool.run(work)
        except UrlRefused as exc:
            raise HTTPException(400, detail=str(exc)) from None
        shown = [dataclasses.replace(result, source=name) for result, name in zip(results, names)]
        return _json_response({"model": _short_description(description), "classes": classes,
                               "results": [result.to_dict() for result in shown]})

    def check_count(count: int, what: str) -> None:
        if count == 0:
            raise HTTPException(422, detail=f"no {what} in the request")
        if count > settings.max_files:
            raise HTTPException(413, detail=f"{count} {what} in one request; this server accepts at most "
                                f"{settings.max_files} per request")

    @app.post("/predict", dependencies=protected, summary="Predict uploaded images")
    async def predict_uploads(
            options: Annotated[dict[str, Any], Depends(predict_options)],
            files: Annotated[list[UploadFile] | None, File(description="one or more images")] = None,
            file: Annotated[UploadFile | None, File(description="a single image (or use files)")] = None,
    ) -> Response:
        uploads = list(files or []) + ([file] if file is not None else [])
        check_count(len(uploads), "files")
        # the file name is shown as plain data; empty or missing names get a stand-in
        names = [upload.filename or f"upload {number}" for number, upload in enumerate(uploads, start=1)]
        contents = [await upload.read() for upload in uploads]
        return await answer(contents, names, options)

    @app.post("/predict/url", dependencies=protected, summary="Predict images fetched from URLs")
    async def predict_urls(request: UrlRequest,
                           options: Annotated[dict[str, Any], Depends(predict_options)]) -> Response:
        urls = request.all_urls()
        check_count(len(urls), "URLs")

        def refuse_any() -> None:
            for url in urls:
                refuse_unusable_url(url, settings.allow_private_urls)
        return await answer(urls, urls, options, check=refuse_any)

    @app.get("/model", dependencies=protected, summary="The served model")
    async def model() -> dict[str, Any]:
        return description

    @app.get("/health", summary="Liveness (no token needed)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises `exc` after this answer, so the server logs its traceback; the client
    # learns nothing about the code.
    log.error("internal error answering %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse({"detail": "internal error"}, status_code=500)


# ---------------------------------------------------------------------- loading and CLI glue

def load_predictor(path: Path, *, backend: str = "auto", threads: int = 1) -> Predictor:
    """Open a .pt checkpoint or an .onnx file, with `threads` CPU threads for the model.

    Torch's and OpenCV's thread counts are process-wide, so they are set once here: every
    prediction thread then runs with the same count, and `max_concurrency` x `threads` bounds
    the cores in use.
    """
    import cv2
    import torch

    path = Path(path)
    if not path.is_file():
        raise FerError(f"model file not found: {path}")
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return Predictor.load(path, backend=None if backend == "auto" else backend, num_threads=threads)


def default_concurrency(threads: int, workers: int) -> int:
    """Predictions at once per worker process so that all of them together use each core once."""
    return max(1, (os.cpu_count() or 1) // max(1, threads * workers))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m fer_core serve MODEL`."""
    parser.add_argument("model", type=Path, help="a .pt checkpoint or an .onnx file")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=non_negative_int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="uvicorn worker processes, each with its own copy of the model (default 1)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: by the file's suffix (.onnx: ONNX Runtime, else torch)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads per prediction (default 1: requests run side by side instead)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="allow /predict/url to fetch from private, loopback or link-local addresses")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="predictions running at once per worker (default: CPU cores / (threads x workers))")
    parser.add_argument("--max-queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE,
                        help=f"requests waiting per worker before answering 503 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--timeout", type=positive_number, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds one request may take to predict (default {DEFAULT_TIMEOUT_S:g}; then 504)")
    parser.add_argument("--max-body-mb", type=positive_number, default=DEFAULT_MAX_BODY_BYTES / MiB,
                        help=f"largest request body in MiB (default {DEFAULT_MAX_BODY_BYTES / MiB:g}; then 413)")
    parser.add_argument("--max-files", type=positive_int, default=DEFAULT_MAX_FILES,
                        help=f"images per request (default {DEFAULT_MAX_FILES})")


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    concurrency = args.max_concurrency or default_concurrency(args.threads, args.workers)
    return ServeSettings(token=token, allow_private_urls=args.allow_private_urls,
                         max_concurrency=concurrency, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_body_bytes=round(args.max_body_mb * MiB), max_files=args.max_files)


def serve_command(args: argparse.Namespace) -> int:
    """Check the model loads, then serve it until interrupted: 0 on a clean stop, 2 for a
    missing or unusable model or invalid settings."""
    import uvicorn

    try:
        settings = settings_from_args(args)
        predictor = load_predictor(args.model, backend=args.backend, threads=args.threads)
    except (FerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a backend's own loader errors: still one line, not a traceback
        print(f"error: cannot load {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not settings.token and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without a token: anyone who can reach this address can "
              f"use the model; set --token or ${TOKEN_ENV}", file=sys.stderr)
    facts = model_description(predictor)
    print(f"serving {Path(args.model).name} ({facts.get('backend')}, {len(facts['classes'])} classes) at "
          f"http://{_url_host(args.host)}:{args.port} (docs at /docs, {args.workers} worker(s), "
          f"{settings.max_concurrency} prediction(s) at once each)", flush=True)
    options: dict[str, Any] = {"host": args.host, "port": args.port, "log_level": "info"}
    if args.workers == 1:
        uvicorn.run(create_app(predictor, settings), **options)
        return 0
    # Worker processes import the app by name, and each loads its own copy of the model; this
    # process only supervises them and need not keep the copy it checked.
    del predictor
    os.environ[CONFIG_ENV] = json.dumps({"model": str(Path(args.model).resolve()), "backend": args.backend,
                                         "threads": args.threads,
                                         "settings": {**settings.public_dict(), "token": None}})
    if settings.token:
        os.environ[TOKEN_ENV] = settings.token
    uvicorn.run("fer_core.serve:app_from_environment", factory=True, workers=args.workers, **options)
    return 0


def app_from_environment() -> FastAPI:
    """The app for a uvicorn worker process, from what `serve_command` put in the environment."""
    config = json.loads(os.environ[CONFIG_ENV])
    values = dict(config["settings"], token=os.environ.get(TOKEN_ENV) or None)
    predictor = load_predictor(Path(config["model"]), backend=config["backend"], threads=config["threads"])
    return create_app(predictor, ServeSettings(**values))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public address


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_core.serve",
                                     description="Serve a trained model over HTTP (REST, OpenAPI at /docs).")
    add_serve_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
