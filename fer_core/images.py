"""Safe image input: bytes, files, PIL images and http(s) URLs become one upright RGB image.

Everything that can go wrong with untrusted input (empty or truncated files, non-images, pixel
bombs, odd colour modes, hostile URLs) ends as an `ImageInputError` whose message says what is
wrong, so the CLI and the app can show it as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import ipaddress
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests.certs
import urllib3
from PIL import Image, UnidentifiedImageError
from urllib3.util import parse_url

from .errors import ImageInputError
from .pixels import flatten, reduce_jpeg_decode, upright

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image

MAX_PIXELS = 50_000_000
"""Refuse images with more pixels than this before decoding them (a 50 MP photo is ~150 MB RGB)."""
MAX_REQUEST_PIXELS = 120_000_000
"""Decoded pixels one request (one `Predictor.predict_many` call, one page submission) may cost
in all: a 372 KB 16-bit PNG can hold 7000x7000 px (3-4 s and ~470 MB to decode), so a cap per
image alone still lets one upload of many such files take minutes of CPU."""
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_URL_BYTES = 10 * 1024 * 1024
DEFAULT_TIMEOUT: tuple[float, float] = (3.05, 10.0)
"""(connect, read) seconds for URL fetches; the read timeout applies to each wait for data."""
DEFAULT_TOTAL_TIMEOUT = 30.0
MAX_REDIRECTS = 3
USER_AGENT = "fer_core-image-fetch/1"

_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_REFUSED_PREFIXES = ("data:", "javascript:", "mailto:", "blob:")
# Types that name no particular format: the bytes decide (many CDNs serve images like this).
_UNTYPED = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
_REDIRECT_CODES = {301, 302, 303, 307, 308}
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF",
               b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
               b"RIFF": "WebP"}
_MAGIC = tuple(_SIGNATURES)


# --------------------------------------------------------------------------- entry point

class PixelBudgetSpent(ImageInputError):
    """An image refused because the request it came in had already decoded its allowance: it is
    not at fault itself (alone, or in a smaller request, it is decoded)."""


class PixelBudget:
    """Decoded pixels left to one request; each image spends its (decoded) size before it is
    decoded, and an image that does not fit is refused without decoding it."""

    def __init__(self, pixels: int | None = None) -> None:
        self.limit, self.spent = int(MAX_REQUEST_PIXELS if pixels is None else pixels), 0

    def spend(self, pixels: int, name: str) -> None:
        if self.spent + pixels > self.limit:
            raise PixelBudgetSpent(
                f"{name} was not decoded: this request already decoded {self.spent / 1e6:.0f} of its "
                f"{self.limit / 1e6:.0f} megapixels, and it needs {pixels / 1e6:.0f} more. "
                "Send fewer or smaller images at a time.")
        self.spent += pixels


def load_image(source: ImageSource, *, allow_private_urls: bool = False,
               reduce_to: int | None = None, budget: PixelBudget | None = None,
               fetch_timeout: float = DEFAULT_TOTAL_TIMEOUT) -> Image.Image:
    """Return `source` as an upright RGB image, or raise ImageInputError saying why not.

    `source` is raw bytes, a PIL image, a path, or a string: http(s) URLs are fetched, any other
    scheme is refused, a string without a scheme is a path. With `reduce_to`, large JPEGs decode
    at 1/2, 1/4 or 1/8 scale (much faster) while the longest side stays >= `reduce_to`;
    `image.info["original_size"]` always holds the full upright size. With `budget`, the
    decoded pixels are spent from it first (`PixelBudget`: a cap per request). A URL's whole
    fetch takes at most `fetch_timeout` seconds.
    """
    if isinstance(source, Image.Image):
        with _pillow_warnings():
            return _normalise(source, "the image", budget=budget)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), reduce_to=reduce_to, budget=budget)
    if isinstance(source, str):
        text = source.strip()
        if is_url(text):
            return decode_image_bytes(fetch_image_bytes(text, allow_private=allow_private_urls,
                                                        total_timeout=fetch_timeout),
                                      name=_short(text), reduce_to=reduce_to, budget=budget)
        _refuse_other_schemes(text)
        return decode_image_bytes(read_image_file(Path(source)), name=Path(source).name,
                                  reduce_to=reduce_to, budget=budget)
    if isinstance(source, os.PathLike):
        path = Path(source)
        return decode_image_bytes(read_image_file(path), name=path.name, reduce_to=reduce_to,
                                  budget=budget)
    raise ImageInputError(f"cannot read an image from a {type(source).__name__}; "
                          "give bytes, a file path, an http(s) URL or a PIL image")


def is_url(text: str) -> bool:
    """True for strings this module fetches: http:// and https:// URLs (any case)."""
    return text.strip().lower().startswith(("http://", "https://"))


def _refuse_other_schemes(text: str) -> None:
    lowered = text.lower()
    if _URL_LIKE.match(text) or lowered.startswith(_REFUSED_PREFIXES):
        scheme = text.split(":", 1)[0]
        raise ImageInputError(f"{scheme}: addresses are not accepted; give an http:// or https:// "
                              "URL, or upload the file")


# --------------------------------------------------------------------------- files

def read_image_file(path: Path) -> bytes:
    """Read an image file's bytes, with clear errors for missing, unreadable or huge files."""
    if not path.exists():
        hint = ""
        if re.match(r"^(www\.)?[\w-]+(\.[\w-]+)+(/|$)", str(path)):
            hint = " (for a web address, start it with https://)"
        raise ImageInputError(f"file not found: {path}{hint}")
    if not path.is_file():
        raise ImageInputError(f"not a file: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageInputError(f"{path.name} is {size / 2**20:.0f} MiB; image files larger than "
                                  f"{MAX_FILE_BYTES // 2**20} MiB are refused")
        return path.read_bytes()
    except OSError as exc:
        raise ImageInputError(f"cannot read {path}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- decoding

def decode_image_bytes(data: bytes, *, name: str = "the image", reduce_to: int | None = None,
                       budget: PixelBudget | None = None) -> Image.Image:
    """Decode encoded image bytes (first frame) into an upright RGB image (see `load_image`)."""
    if not data:
        raise ImageInputError(f"{name} is empty (0 bytes)")
    with _pillow_warnings():
        return _normalise(_open(data, name), name, reduce_to, budget)


@contextlib.contextmanager
def _pillow_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # Pillow warns (not raises) between its own limit and twice that: treat both alike.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # "Corrupt EXIF data" and the like: the image is still usable, the log need not know
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageInputError(f"{name} is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        claimed = next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)
        if claimed:
            raise ImageInputError(f"{name} starts like a {claimed} file but its header is corrupt "
                                  "or unsupported") from exc
        raise ImageInputError(f"{name} is not an image in a format this tool reads "
                              f"(JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF){_describe_start(data)}") from exc
    except Exception as exc:  # hostile headers make Pillow's parsers raise all sorts of errors
        if "truncated" in str(exc).lower():
            raise ImageInputError(f"{name} is truncated: the file ends inside its header") from exc
        raise ImageInputError(f"{name} has a corrupt image header ({type(exc).__name__}: {exc})") from exc


def _describe_start(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "; it is an HTML page"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:512].lower()):
        return "; it is an SVG drawing, which is not supported"
    return ""


def _normalise(image: Image.Image, name: str, reduce_to: int | None = None,
               budget: PixelBudget | None = None) -> Image.Image:
    """Check the size, load the first frame, apply EXIF orientation, convert to RGB.

    The colour rules (transparency, 16-bit and float grey) are `pixels.flatten`'s, the ones
    the model's crops are made with, so a face's grey values match a dataset file's.
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels; "
                              f"images over {MAX_PIXELS / 1e6:.0f} megapixels are refused")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        reduce_jpeg_decode(image, reduce_to)  # libjpeg's DCT scaling: only the pixels asked for
    except Exception as exc:
        raise ImageInputError(f"{name} is corrupt: the image data cannot be decoded ({exc})") from exc
    if budget is not None:
        budget.spend(image.width * image.height, name)  # what the decode below will cost
    try:
        image.load()
    except Exception as exc:  # truncated streams and corrupt chunks surface here, as OSError & co
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageInputError(f"{name} is {reason}: the image data cannot be decoded ({exc})") from exc
    try:
        decoded_size = image.size
        image = upright(image)
        rgb = flatten(image).convert("RGB") if image.mode != "RGB" else image
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError(f"{name} uses a colour mode that cannot be converted "
                              f"({image.mode}: {exc})") from exc
    turned = rgb.size != decoded_size and rgb.size == decoded_size[::-1]
    rgb.info["original_size"] = (height, width) if turned else (width, height)
    return rgb


# --------------------------------------------------------------------------- URLs

def fetch_image_bytes(url: str, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                      max_bytes: int = MAX_URL_BYTES, max_redirects: int = MAX_REDIRECTS,
                      allow_private: bool = False,
                      total_timeout: float = DEFAULT_TOTAL_TIMEOUT) -> bytes:
    """Download an image, checking every redirect hop's host and capping size and time.

    Each hop's host is resolved once; every address it resolves to must be public (private,
    loopback, link-local, multicast and reserved ones are refused unless `allow_private`), and
    the connection goes to exactly those checked addresses, never to a second lookup's answer
    (DNS rebinding), while the Host header, TLS server name and certificate check stay the
    URL's. `total_timeout` bounds the whole fetch: lookups, connects, TLS, headers and body,
    over all hops. The body must be declared (or sniffed as) an image.
    """
    deadline = _Deadline(total_timeout)
    try:
        return _fetch(url.strip(), url, timeout, max_bytes, max_redirects, allow_private, deadline)
    finally:
        deadline.close()


def _fetch(current: str, url: str, timeout: tuple[float, float], max_bytes: int,
           max_redirects: int, allow_private: bool, deadline: _Deadline) -> bytes:
    seen: set[str] = set()
    for _hop in range(max_redirects + 1):
        deadline.check(url)
        target = _check_url(current, allow_private, deadline)
        seen.add(current)
        with _request(target, timeout, deadline, url) as response:
            if response.status in _REDIRECT_CODES:
                current = _next_hop(response, current, seen)
                continue
            _check_status(response, target.host)
            content_type = _check_content_type(response)
            body = _read_capped(response, max_bytes, deadline, target.host)
        if content_type in _UNTYPED and not body.startswith(_MAGIC) and not _opens(body):
            raise ImageInputError(f"{target.host} sent no image content type and the bytes are not "
                                  f"an image{_describe_start(body)}")
        return body
    raise ImageInputError(f"too many redirects (more than {max_redirects}) starting at {_short(url)}")


class _Deadline:
    """The total time a fetch may take, enforced while blocked inside the HTTP library.

    Per-read timeouts cannot stop a server that sends a byte just often enough, and the body
    loop cannot check the clock while the status line and headers are read. A timer thread
    shuts down every socket the fetch opened when the time is up, which wakes any blocked read
    or TLS handshake at once; the fetch then reports that it took too long.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        return self.expired or self.remaining() <= 0

    def check(self, url: str) -> None:
        if self.over():
            raise self.error(url)

    def error(self, url: str) -> ImageInputError:
        return ImageInputError(f"fetching {_short(url)} took too long (over {self.seconds:g} s "
                               "in all)")

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down when the time is up (a duplicate is kept: TLS detaches the original)."""
        twin = sock.dup()
        with self._lock:
            if not (self.expired or self._closed):
                self._sockets.append(twin)
                return
        _shut(twin)

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.expired = True
            for twin in self._sockets:
                with contextlib.suppress(OSError):
                    twin.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            twins, self._sockets = self._sockets, []
        for twin in twins:
            twin.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclasses.dataclass(frozen=True)
class _Target:
    """One hop: the URL's parts and the addresses its host resolved to (and was checked for)."""

    scheme: str
    host: str
    port: int
    request_uri: str
    addresses: tuple[str, ...]


def check_url(url: str, *, allow_private: bool = False,
              timeout: float = DEFAULT_TOTAL_TIMEOUT) -> None:
    """Raise ImageInputError for a URL that `fetch_image_bytes` would refuse before fetching a
    byte: not http(s), malformed, an unknown host, or (unless `allow_private`) a private,
    loopback or link-local address. The same check the fetch makes on every hop."""
    deadline = _Deadline(timeout)
    try:
        _check_url(url, allow_private, deadline)
    finally:
        deadline.close()


def _check_url(url: str, allow_private: bool, deadline: _Deadline) -> _Target:
    """Validate scheme and host; resolve the host once and refuse non-public addresses."""
    if not is_url(url):
        _refuse_other_schemes(url)
        raise ImageInputError(f"not an http(s) URL: {_short(url)}")
    try:
        parts = parse_url(url)  # urllib3's parser: the one that builds the request line too
    except Exception as exc:
        raise ImageInputError(f"not a valid URL: {_short(url)} ({exc})") from exc
    if not parts.host:
        raise ImageInputError(f"the URL has no host: {_short(url)}")
    if parts.auth:
        raise ImageInputError("URLs with a user name or password are not accepted")
    scheme = (parts.scheme or "http").lower()
    host = parts.host.strip("[]")
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = _resolve_within(host, port, deadline)
    # Refuse the host if any of its addresses is blocked, rather than using only the public
    # ones: a name that answers with both is either misconfigured or set up for rebinding.
    for address in addresses:
        _check_address(address, host, allow_private)
    return _Target(scheme, host, port, parts.request_uri, tuple(addresses))


def _resolve_within(host: str, port: int, deadline: _Deadline) -> list[str]:
    """`_resolve` bounded by the deadline (a stuck resolver is left behind in its thread)."""
    answer: dict[str, Any] = {}

    def lookup() -> None:
        try:
            answer["addresses"] = _resolve(host, port)
        except BaseException as exc:  # handed to the caller below
            answer["error"] = exc

    worker = threading.Thread(target=lookup, name="fer-image-dns", daemon=True)
    worker.start()
    worker.join(max(deadline.remaining(), 0.0))
    if worker.is_alive():
        raise ImageInputError(f"looking up {host} took too long (over {deadline.seconds:g} s in all)")
    if "error" in answer:
        raise answer["error"]
    if not answer.get("addresses"):
        raise ImageInputError(f"cannot find the host {host!r} (DNS lookup gave no address)")
    return answer["addresses"]


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ImageInputError(f"cannot find the host {host!r} (DNS lookup failed)") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # the resolver's order


def _check_address(address: str, host: str, allow_private: bool) -> None:
    if allow_private:
        return
    reason = blocked_address_reason(address)
    if reason:
        shown = host if host == address else f"{host} ({address})"
        raise ImageInputError(f"refusing to fetch from {shown}: it is a {reason} address; only public "
                              "internet addresses are allowed")


def blocked_address_reason(address: str) -> str | None:
    """Why an IP address must not be fetched from ("private", "loopback", ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return blocked_address_reason(str(embedded))
    for reason, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                         ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                         ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return reason
    return None if ip.is_global else "non-public"


class _PinnedConnectionMixin:
    """An urllib3 connection that connects to the checked addresses, not to a new lookup.

    urllib3 keeps `host` for the Host header, the TLS server name (SNI) and the certificate's
    host-name check; only the socket's destination is ours.
    """

    def __init__(self, *args: Any, fer_target: _Target, fer_deadline: _Deadline,
                 **kwargs: Any) -> None:
        self._fer_target = fer_target
        self._fer_deadline = fer_deadline
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        target, deadline = self._fer_target, self._fer_deadline
        failure: OSError | None = None
        for address in target.addresses:
            remaining = deadline.remaining()
            if remaining <= 0:
                break
            limit = remaining if self.timeout is None else min(float(self.timeout), remaining)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(limit)
                # a numeric address: the C library parses it, no lookup happens here
                sock.connect((address, target.port))
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            deadline.watch(sock)
            return sock
        if isinstance(failure, TimeoutError) or failure is None:
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"connecting to {target.host} timed out") from failure
        raise urllib3.exceptions.NewConnectionError(
            self, f"Failed to establish a new connection: {failure}") from failure


class _PinnedHTTPConnection(_PinnedConnectionMixin, urllib3.connection.HTTPConnection):
    """Plain HTTP to the checked address."""


class _PinnedHTTPSConnection(_PinnedConnectionMixin, urllib3.connection.HTTPSConnection):
    """HTTPS to the checked address; the certificate and SNI are still the URL's host name."""


class _PinnedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


@contextlib.contextmanager
def _request(target: _Target, timeout: tuple[float, float], deadline: _Deadline, url: str
             ) -> Iterator[urllib3.BaseHTTPResponse]:
    """GET one hop over a connection pinned to its checked addresses; no retries, no redirects."""
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*",
               # images are compressed already; asking for identity also avoids gzip bombs
               "Accept-Encoding": "identity"}
    host = target.host
    pinned = {"fer_target": target, "fer_deadline": deadline}
    if target.scheme == "https":
        # certifi's bundle, as requests used: the same trust as before pinning
        pool: urllib3.HTTPConnectionPool = _PinnedHTTPSPool(
            host, target.port, maxsize=1, cert_reqs="CERT_REQUIRED", ca_certs=requests.certs.where(),
            **pinned)
    else:
        pool = _PinnedHTTPPool(host, target.port, maxsize=1, **pinned)
    with pool:
        try:
            response = pool.urlopen("GET", target.request_uri, headers=headers, retries=False,
                                    redirect=False, assert_same_host=False, preload_content=False,
                                    timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
        except Exception as exc:
            raise _request_error(exc, host, timeout, deadline, url) from exc
        try:
            yield response
        finally:
            response.close()


def _request_error(exc: Exception, host: str, timeout: tuple[float, float], deadline: _Deadline,
                   url: str) -> ImageInputError:
    errors = urllib3.exceptions
    if deadline.over():
        return deadline.error(url)
    if isinstance(exc, errors.NewConnectionError):
        return ImageInputError(f"cannot connect to {host}: {_root_cause(exc)}")
    if isinstance(exc, errors.ConnectTimeoutError):
        return ImageInputError(f"timed out connecting to {host} (after {timeout[0]:g} s)")
    if isinstance(exc, errors.ReadTimeoutError):
        return ImageInputError(f"{host} did not answer within {timeout[1]:g} s")
    if isinstance(exc, errors.SSLError):
        return ImageInputError(f"secure connection to {host} failed (TLS certificate or handshake "
                               "error)")
    if isinstance(exc, errors.ProtocolError):
        return ImageInputError(f"the connection to {host} broke off: {_root_cause(exc)}")
    return ImageInputError(f"request to {host} failed: {exc}")


def _next_hop(response: urllib3.BaseHTTPResponse, current: str, seen: set[str]) -> str:
    location = response.headers.get("Location")
    if not location:
        raise ImageInputError(f"HTTP {response.status} redirect without a Location header")
    target = urljoin(current, location.strip())
    if target in seen:
        raise ImageInputError(f"redirect loop: {_short(target)} redirects back to itself")
    if not is_url(target):
        _refuse_other_schemes(target)
        raise ImageInputError(f"redirect to a non-http(s) address refused: {_short(target)}")
    return target


def _check_status(response: urllib3.BaseHTTPResponse, host: str) -> None:
    code = response.status
    if code == 200:
        return
    if code == 404:
        raise ImageInputError(f"the image was not found on {host} (HTTP 404)")
    if code in (401, 403):
        raise ImageInputError(f"{host} refused access to the image (HTTP {code})")
    if code == 429:
        raise ImageInputError(f"{host} is rate limiting requests (HTTP 429); try again later")
    if code >= 500:
        raise ImageInputError(f"{host} had a server error (HTTP {code}); try again later")
    raise ImageInputError(f"{host} answered HTTP {code} {response.reason or ''}".rstrip())


def _check_content_type(response: urllib3.BaseHTTPResponse) -> str:
    content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type == "image/svg+xml":
        raise ImageInputError("the URL is an SVG drawing, which is not supported; use a photo "
                              "(JPEG, PNG, WebP)")
    if content_type.startswith("image/") or content_type in _UNTYPED:
        return content_type
    raise ImageInputError(f"the URL is not an image: the server says it is {content_type}")


def _read_capped(response: urllib3.BaseHTTPResponse, max_bytes: int, deadline: _Deadline,
                 host: str) -> bytes:
    declared = response.headers.get("Content-Length", "").split(",")[0].strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(f"the image is {int(declared) / 2**20:.1f} MiB; downloads over "
                              f"{max_bytes / 2**20:.1f} MiB are refused")
    too_long = ImageInputError(f"downloading from {host} took too long (over "
                               f"{deadline.seconds:g} s in all)")
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            # read1 returns what has arrived; the deadline's timer ends a read that waits
            chunk = response.read1(64 * 1024, decode_content=True)
            if deadline.over():  # an end of data may be the timer's shutdown, not the server's
                raise too_long
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageInputError(f"the image is larger than {max_bytes / 2**20:.1f} MiB; "
                                      "larger downloads are refused")
            chunks.append(chunk)
    except ImageInputError:
        raise
    except Exception as exc:  # read timeouts and resets arrive as urllib3/socket errors here
        if deadline.over():
            raise too_long from exc
        if "timed out" in str(exc).lower():
            raise ImageInputError(f"{host} stopped sending data (read timed out)") from exc
        raise ImageInputError(f"the download from {host} broke off: {_root_cause(exc)}") from exc
    return b"".join(chunks)


def _opens(body: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(body)).close()
        return True
    except Exception:
        return False


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
    return text or type(exc).__name__


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
