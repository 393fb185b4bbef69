"""Safe image input: bytes, files, PIL images and http(s) URLs become one upright RGB image.

Everything that can go wrong with untrusted input (empty or truncated files, non-images, pixel
bombs, odd colour modes, hostile URLs) ends as an `ImageInputError` whose message says what is
wrong, so the CLI and the app can show it as it is.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from urllib3.util import parse_url

from .errors import ImageInputError

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image

MAX_PIXELS = 50_000_000
"""Refuse images with more pixels than this before decoding them (a 50 MP photo is ~150 MB RGB)."""
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_URL_BYTES = 10 * 1024 * 1024
DEFAULT_TIMEOUT: tuple[float, float] = (3.05, 10.0)
"""(connect, read) seconds for URL fetches; the read timeout applies to each wait for data."""
DEFAULT_TOTAL_TIMEOUT = 30.0
MAX_REDIRECTS = 3
USER_AGENT = "fer_core-image-fetch/1"

_ORIENTATION = 0x0112
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

def load_image(source: ImageSource, *, allow_private_urls: bool = False,
               reduce_to: int | None = None) -> Image.Image:
    """Return `source` as an upright RGB image, or raise ImageInputError saying why not.

    `source` is raw bytes, a PIL image, a path, or a string: http(s) URLs are fetched, any other
    scheme is refused, a string without a scheme is a path. With `reduce_to`, large JPEGs decode
    at 1/2, 1/4 or 1/8 scale (much faster) while the longest side stays >= `reduce_to`;
    `image.info["original_size"]` always holds the full upright size.
    """
    if isinstance(source, Image.Image):
        with _pillow_warnings():
            return _normalise(source, "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(source), reduce_to=reduce_to)
    if isinstance(source, str):
        text = source.strip()
        if is_url(text):
            return decode_image_bytes(fetch_image_bytes(text, allow_private=allow_private_urls),
                                      name=_short(text), reduce_to=reduce_to)
        _refuse_other_schemes(text)
        return decode_image_bytes(read_image_file(Path(source)), name=Path(source).name,
                                  reduce_to=reduce_to)
    if isinstance(source, os.PathLike):
        path = Path(source)
        return decode_image_bytes(read_image_file(path), name=path.name, reduce_to=reduce_to)
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

def decode_image_bytes(data: bytes, *, name: str = "the image", reduce_to: int | None = None
                       ) -> Image.Image:
    """Decode encoded image bytes (first frame) into an upright RGB image (see `load_image`)."""
    if not data:
        raise ImageInputError(f"{name} is empty (0 bytes)")
    with _pillow_warnings():
        return _normalise(_open(data, name), name, reduce_to)


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


def _normalise(image: Image.Image, name: str, reduce_to: int | None = None) -> Image.Image:
    """Check the size, load the first frame, apply EXIF orientation, convert to RGB."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels; "
                              f"images over {MAX_PIXELS / 1e6:.0f} megapixels are refused")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        if reduce_to and image.format == "JPEG" and max(width, height) > reduce_to:
            ratio = reduce_to / max(width, height)
            # libjpeg's DCT scaling: decodes only the pixels asked for
            image.draft(image.mode, (math.ceil(width * ratio), math.ceil(height * ratio)))
        image.load()
    except Exception as exc:  # truncated streams and corrupt chunks surface here, as OSError & co
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageInputError(f"{name} is {reason}: the image data cannot be decoded ({exc})") from exc
    try:
        decoded_size = image.size
        image = _exif_upright(image)
        rgb = _to_rgb(image)
    except ImageInputError:
        raise
    except Exception as exc:
        raise ImageInputError(f"{name} uses a colour mode that cannot be converted "
                              f"({image.mode}: {exc})") from exc
    turned = rgb.size != decoded_size and rgb.size == decoded_size[::-1]
    rgb.info["original_size"] = (height, width) if turned else (width, height)
    return rgb


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(_ORIENTATION, 1) == 1:
            return image  # exif_transpose would copy every pixel for nothing
        upright = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user the picture
        return image
    return upright if upright is not None else image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        return _on_white(image)
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_grey(image).convert("RGB")
    return image.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite onto white: transparent areas of logos and stickers are meant as background."""
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """16/32-bit and float grey to 8 bits by the range the values use (Pillow would clip at 255)."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8 is "L"


# --------------------------------------------------------------------------- URLs

def fetch_image_bytes(url: str, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                      max_bytes: int = MAX_URL_BYTES, max_redirects: int = MAX_REDIRECTS,
                      allow_private: bool = False,
                      total_timeout: float = DEFAULT_TOTAL_TIMEOUT) -> bytes:
    """Download an image, checking every redirect hop's host and capping size and time.

    Private, loopback, link-local, multicast and reserved addresses are refused unless
    `allow_private`; the body must be declared (or sniffed as) an image.
    """
    deadline = time.monotonic() + total_timeout
    seen: set[str] = set()
    current = url.strip()
    with requests.Session() as session:
        # No proxies or .netrc from the environment: the address we check is the one we connect to.
        session.trust_env = False
        for _hop in range(max_redirects + 1):
            if time.monotonic() > deadline:
                raise ImageInputError(f"fetching {_short(url)} took too long")
            host, _port = _check_url(current, allow_private)
            seen.add(current)
            response = _get(session, current, timeout, host)
            with response:
                if response.status_code in _REDIRECT_CODES:
                    current = _next_hop(response, current, seen)
                    continue
                _check_peer(response, host, allow_private)
                _check_status(response, host)
                content_type = _check_content_type(response)
                body = _read_capped(response, max_bytes, deadline, host)
            if content_type in _UNTYPED and not body.startswith(_MAGIC) and not _opens(body):
                raise ImageInputError(f"{host} sent no image content type and the bytes are not an "
                                      f"image{_describe_start(body)}")
            return body
    raise ImageInputError(f"too many redirects (more than {max_redirects}) starting at {_short(url)}")


def _check_url(url: str, allow_private: bool) -> tuple[str, int]:
    """Validate scheme and host; resolve the host and refuse non-public addresses."""
    if not is_url(url):
        _refuse_other_schemes(url)
        raise ImageInputError(f"not an http(s) URL: {_short(url)}")
    try:
        parts = parse_url(url)  # the parser requests itself uses: no disagreement on the host
    except Exception as exc:
        raise ImageInputError(f"not a valid URL: {_short(url)} ({exc})") from exc
    if not parts.host:
        raise ImageInputError(f"the URL has no host: {_short(url)}")
    if parts.auth:
        raise ImageInputError("URLs with a user name or password are not accepted")
    host = parts.host.strip("[]")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in _resolve(host, port):
        _check_address(address, host, allow_private)
    return host, port


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ImageInputError(f"cannot find the host {host!r} (DNS lookup failed)") from exc
    return sorted({info[4][0] for info in infos})


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


def _get(session: requests.Session, url: str, timeout: tuple[float, float], host: str
         ) -> requests.Response:
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*",
               # images are compressed already; asking for identity also avoids gzip bombs
               "Accept-Encoding": "identity"}
    try:
        return session.get(url, stream=True, allow_redirects=False, timeout=timeout, headers=headers)
    except requests.exceptions.ConnectTimeout as exc:
        raise ImageInputError(f"timed out connecting to {host} (after {timeout[0]:g} s)") from exc
    except requests.exceptions.ReadTimeout as exc:
        raise ImageInputError(f"{host} did not answer within {timeout[1]:g} s") from exc
    except requests.exceptions.SSLError as exc:
        raise ImageInputError(f"secure connection to {host} failed (TLS certificate or handshake "
                              "error)") from exc
    except requests.exceptions.ConnectionError as exc:
        raise ImageInputError(f"cannot connect to {host}: {_root_cause(exc)}") from exc
    except requests.exceptions.RequestException as exc:
        raise ImageInputError(f"request to {host} failed: {exc}") from exc


def _next_hop(response: requests.Response, current: str, seen: set[str]) -> str:
    location = response.headers.get("Location")
    if not location:
        raise ImageInputError(f"HTTP {response.status_code} redirect without a Location header")
    target = urljoin(current, location.strip())
    if target in seen:
        raise ImageInputError(f"redirect loop: {_short(target)} redirects back to itself")
    if not is_url(target):
        _refuse_other_schemes(target)
        raise ImageInputError(f"redirect to a non-http(s) address refused: {_short(target)}")
    return target


def _check_peer(response: requests.Response, host: str, allow_private: bool) -> None:
    """Check the address actually connected to, in case DNS answered differently the second time."""
    if allow_private:
        return
    peer = _peer_address(response)
    if peer is None:  # fail closed: an unverified connection might be anywhere
        raise ImageInputError(f"cannot verify which address {host} connected to; not fetching")
    _check_address(peer, host, allow_private)


def _peer_address(response: requests.Response) -> str | None:
    # urllib3 drops conn.sock once a "Connection: close" response arrives; the body's reader
    # (http.client's buffered socket file) still holds the socket then.
    conn = getattr(response.raw, "connection", None)
    body = getattr(getattr(response.raw, "_fp", None), "fp", None)
    for sock in (getattr(conn, "sock", None), getattr(getattr(body, "raw", None), "_sock", None)):
        if sock is None:
            continue
        try:
            return str(sock.getpeername()[0])
        except OSError:
            continue
    return None


def _check_status(response: requests.Response, host: str) -> None:
    code = response.status_code
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


def _check_content_type(response: requests.Response) -> str:
    content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type == "image/svg+xml":
        raise ImageInputError("the URL is an SVG drawing, which is not supported; use a photo "
                              "(JPEG, PNG, WebP)")
    if content_type.startswith("image/") or content_type in _UNTYPED:
        return content_type
    raise ImageInputError(f"the URL is not an image: the server says it is {content_type}")


def _read_capped(response: requests.Response, max_bytes: int, deadline: float, host: str) -> bytes:
    declared = response.headers.get("Content-Length", "").split(",")[0].strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(f"the image is {int(declared) / 2**20:.1f} MiB; downloads over "
                              f"{max_bytes / 2**20:.1f} MiB are refused")
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            # read1 returns what has arrived, so a slow trickle cannot outlast the deadline
            chunk = response.raw.read1(64 * 1024, decode_content=True)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise ImageInputError(f"the image is larger than {max_bytes / 2**20:.1f} MiB; "
                                      "larger downloads are refused")
            if time.monotonic() > deadline:
                raise ImageInputError(f"downloading from {host} took too long")
            chunks.append(chunk)
    except ImageInputError:
        raise
    except Exception as exc:  # read timeouts and resets arrive as urllib3/socket errors here
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
