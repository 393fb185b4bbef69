"""Image input: every way a user can hand us a picture, and every way that can go wrong."""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fer_core import images
from fer_core.errors import ImageInputError
from fer_core.images import blocked_address_reason, decode_image_bytes, fetch_image_bytes, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def deep(mode: str, top: float) -> Image.Image:
    """A 64x48 horizontal ramp 0..top in a 16-bit, 32-bit or float mode."""
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.tile(np.linspace(0, top, 64), (48, 1)).astype(dtype))
    assert image.mode == mode
    return image


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (height, 1)), np.tile(x[::-1], (height, 1)),
                    np.full((height, width), 90, np.uint8)], axis=-1)
    return Image.fromarray(rgb)


JPEG = encode(gradient(), "JPEG", quality=90)
PNG = encode(gradient(), "PNG")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims any size: signature, IHDR, a few bytes of IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------- good inputs

@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA"])
def test_every_pil_mode_becomes_rgb(mode: str) -> None:
    if mode in ("I;16", "I", "F"):
        source = deep(mode, 1.0 if mode == "F" else 65535)
    else:
        source = gradient().convert(mode)
    loaded = load_image(source)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(loaded)[:, :, 0]
        # the full 16-bit / float range maps onto 0..255 instead of clipping to white
        assert grey[0, 0] <= 2 and grey[0, -1] >= 253 and 100 < grey[0, 32] < 155


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                       ("LA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"),
                                       ("CMYK", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
                                       ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "GIF")])
def test_encoded_modes_and_formats_decode(mode: str, fmt: str) -> None:
    image = deep(mode, 60000) if mode in ("I;16", "I", "F") else gradient().convert(mode)
    loaded = decode_image_bytes(encode(image, fmt))
    assert loaded.mode == "RGB" and loaded.size == (64, 48)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((5, 5), (255, 0, 0, 255))
    loaded = decode_image_bytes(encode(rgba, "PNG"))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((5, 5)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.info["transparency"] = 0
    assert decode_image_bytes(encode(palette, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_honoured() -> None:
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 40))  # stored left third is red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    loaded = decode_image_bytes(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (40, 60)
    red, green, blue = loaded.getpixel((20, 5))  # the stored left edge is now the top
    assert red > 200 and blue < 60


def test_large_jpeg_can_decode_at_reduced_scale() -> None:
    big = encode(gradient(64, 48).resize((3200, 2400)), "JPEG", quality=80)
    full = decode_image_bytes(big)
    assert full.size == (3200, 2400) and full.info["original_size"] == (3200, 2400)
    reduced = decode_image_bytes(big, reduce_to=1000)
    assert reduced.size == (1600, 1200)  # 1/2 scale: 1/4 would fall below 1000
    assert reduced.info["original_size"] == (3200, 2400)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_image_bytes(encode(gradient(64, 48).resize((3200, 2400)), "JPEG",
                                       exif=exif.tobytes()), reduce_to=1000)
    assert turned.size == (1200, 1600) and turned.info["original_size"] == (2400, 3200)
    assert decode_image_bytes(PNG, reduce_to=10).size == (64, 48)  # only JPEG can do this


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    red, _, blue = decode_image_bytes(buffer.getvalue()).getpixel((8, 8))
    assert red > 200 and blue < 60


def test_paths_as_str_and_path(tmp_path: Path) -> None:
    path = tmp_path / "face.jpg"
    path.write_bytes(JPEG)
    assert load_image(path).size == (64, 48)
    assert load_image(str(path)).size == (64, 48)
    # the content decides, not the name
    (tmp_path / "really-a-png.txt").write_bytes(PNG)
    assert load_image(tmp_path / "really-a-png.txt").mode == "RGB"


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (np.random.default_rng(0).bytes(5000), "not an image"),
    (JPEG[: len(JPEG) // 2], "truncated"),
    (PNG[: len(PNG) // 2], "cannot be decoded"),
    (png_header(100_000, 100_000), "too large"),
    (png_header(8000, 8000), "megapixels"),
    (png_header(0, 10), "header is corrupt"),
    (b"<!DOCTYPE html><html><body>hello</body></html>", "HTML page"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
])
def test_malformed_bytes_raise_clear_errors(data: bytes, words: str) -> None:
    with pytest.raises(ImageInputError, match=words):
        decode_image_bytes(data)


def test_bad_files(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture at all\n")
    with pytest.raises(ImageInputError, match="notes.txt is not an image"):
        load_image(notes)
    with pytest.raises(ImageInputError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageInputError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageInputError, match="start it with https://"):
        load_image("example.com/face.jpg")
    with pytest.raises(ImageInputError, match="cannot read an image from a int"):
        load_image(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/face.jpg",
                                 "data:image/png;base64,iVBORw0KGgo=", "gopher://x/1"])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(ImageInputError, match="not accepted"):
        load_image(url)


def test_truncated_images_are_not_loaded_half(tmp_path: Path) -> None:
    for cut in (100, 400, len(JPEG) - 50):
        with pytest.raises(ImageInputError):
            decode_image_bytes(JPEG[:cut])


_SAMPLES = [JPEG, PNG, encode(gradient(), "GIF"), encode(gradient(), "BMP"),
            encode(gradient(), "WEBP"), encode(gradient().convert("L"), "TIFF")]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_images(), st.binary(max_size=2048)))
def test_any_bytes_give_an_image_or_an_image_input_error(data: bytes) -> None:
    try:
        image = decode_image_bytes(data)
    except ImageInputError as exc:
        assert str(exc)
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


# --------------------------------------------------------------------------- URLs

@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.4", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_blocked_address_reasons(address: str, reason: str | None) -> None:
    assert blocked_address_reason(address) == reason


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for byte in JPEG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
            return
        if self.path == "/unsized":  # no Content-Length: the body ends when the connection does
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"\x00" * 5000)
            return
        status, headers, body = self.routes.get(self.path, (404, {}, b"nothing here"))
        self.send_response(status)
        for name, value in headers.items():
            if name != "Content-Length":
                self.send_header(name, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.routes = {
        "/face.jpg": (200, {"Content-Type": "image/jpeg"}, JPEG),
        "/untyped": (200, {}, PNG),
        "/untyped-text": (200, {"Content-Type": "application/octet-stream"}, b"just words here"),
        "/error": (500, {"Content-Type": "text/plain"}, b"boom"),
        "/page": (200, {"Content-Type": "text/html; charset=utf-8"}, b"<html></html>"),
        "/drawing.svg": (200, {"Content-Type": "image/svg+xml"}, b"<svg/>"),
        "/big.jpg": (200, {"Content-Type": "image/jpeg"}, JPEG + b"\x00" * 3000),
        "/liar.jpg": (200, {"Content-Type": "image/jpeg", "Content-Length": "999999999"}, b""),
        "/hop": (302, {"Location": "/face.jpg"}, b""),
        "/loop-a": (302, {"Location": "/loop-b"}, b""),
        "/loop-b": (302, {"Location": "/loop-a"}, b""),
        "/chain-1": (302, {"Location": "/chain-2"}, b""),
        "/chain-2": (302, {"Location": "/chain-3"}, b""),
        "/chain-3": (302, {"Location": "/hop"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (302, {"Location": "http://10.0.0.7/face.jpg"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield base
    httpd.shutdown()
    httpd.server_close()


def fetch(url: str, **options) -> bytes:
    options.setdefault("allow_private", True)
    options.setdefault("timeout", (1.0, 2.0))
    return fetch_image_bytes(url, **options)


def test_url_image_is_fetched_and_decoded(server: str) -> None:
    assert fetch(f"{server}/face.jpg") == JPEG
    assert load_image(f"{server}/face.jpg", allow_private_urls=True).size == (64, 48)
    assert fetch(f"{server}/hop") == JPEG  # a redirect within the limits
    assert fetch(f"{server}/untyped") == PNG  # no Content-Type: the bytes are sniffed


@pytest.mark.parametrize("path, words", [
    ("/missing.jpg", "not found .*HTTP 404"),
    ("/error", "server error .*HTTP 500"),
    ("/page", "not an image: the server says it is text/html"),
    ("/drawing.svg", "SVG"),
    ("/untyped-text", "bytes are not an image"),
    ("/liar.jpg", "refused"),
    ("/loop-a", "redirect loop"),
    ("/chain-1", "too many redirects"),
    ("/to-file", "not accepted"),
])
def test_url_failures_have_clear_messages(server: str, path: str, words: str) -> None:
    with pytest.raises(ImageInputError, match=words):
        fetch(server + path)


def test_body_larger_than_cap_is_refused(server: str) -> None:
    with pytest.raises(ImageInputError, match="refused"):
        fetch(f"{server}/big.jpg", max_bytes=len(JPEG) + 100)  # Content-Length says too big
    with pytest.raises(ImageInputError, match="larger than"):
        fetch(f"{server}/unsized", max_bytes=1000)  # no Content-Length: counted while reading


def test_slow_trickle_hits_the_total_deadline(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageInputError, match="too long"):
        fetch(f"{server}/trickle", total_timeout=0.5)
    assert time.monotonic() - start < 1.9


def test_server_that_never_answers_times_out() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel completes the handshake; nobody ever reads or replies
    try:
        start = time.monotonic()
        with pytest.raises(ImageInputError, match="did not answer within 0.3 s"):
            fetch(f"http://127.0.0.1:{silent.getsockname()[1]}/x.jpg", timeout=(1.0, 0.3))
        assert time.monotonic() - start < 3
    finally:
        silent.close()


def test_connection_refused_is_explained() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ImageInputError, match="cannot connect to 127.0.0.1"):
        fetch(f"http://127.0.0.1:{port}/x.jpg")


def test_private_addresses_are_refused_by_default(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    for url in (f"{server}/face.jpg", f"http://localhost:{port}/face.jpg",
                f"http://2130706433:{port}/face.jpg", "http://[::1]/face.jpg",
                "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(ImageInputError, match="refusing to fetch"):
            fetch_image_bytes(url)
    with pytest.raises(ImageInputError, match="loopback"):
        load_image(f"{server}/face.jpg")
    with pytest.raises(ImageInputError, match="user name or password"):
        fetch_image_bytes("http://user:secret@example.com/face.jpg")


def test_redirect_to_private_address_is_refused(server: str, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    real = images.blocked_address_reason

    def pretend_test_server_is_public(address: str) -> str | None:
        return None if address == "127.0.0.1" else real(address)

    monkeypatch.setattr(images, "blocked_address_reason", pretend_test_server_is_public)
    assert fetch_image_bytes(f"{server}/face.jpg", timeout=(1.0, 2.0)) == JPEG  # guard is on
    with pytest.raises(ImageInputError, match=r"169\.254\.169\.254.*link-local"):
        fetch_image_bytes(f"{server}/to-metadata", timeout=(1.0, 2.0))
    with pytest.raises(ImageInputError, match=r"10\.0\.0\.7.*private"):
        fetch_image_bytes(f"{server}/to-private", timeout=(1.0, 2.0))


class _RecordingHandler(_Handler):
    """The module server's routes, plus a log of every request line that arrives."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append(f"{self.headers.get('Host')} {self.path}")
        super().do_GET()


@pytest.fixture
def recorder(server: str) -> Iterator[tuple[int, list[str]]]:
    """A local server (127.0.0.1 only) that records whether any request reached it."""
    seen: list[str] = []
    handler = type("Recorder", (_RecordingHandler,), {"requests": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    port = httpd.server_address[1]
    handler.routes = {
        **_Handler.routes,
        "/go-rebind": (302, {"Location": f"http://evil.test:{port}/face.jpg"}, b""),
        "/go-rebind-hop": (302, {"Location": f"http://evil.test:{port}/hop"}, b""),
        "/go-local": (302, {"Location": f"http://local.test:{port}/face.jpg"}, b""),
    }
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield port, seen
    httpd.shutdown()
    httpd.server_close()


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> dict[str, int]:
    """Make socket.getaddrinfo answer `answers[name]` in turn (the last answer repeats).

    Every lookup anywhere in the process goes through it, so a second lookup by a library
    (the classic DNS-rebinding gap) gets the later answer. Returns the lookups per name.
    """
    real = socket.getaddrinfo
    calls: dict[str, int] = {}

    def lookup(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 (socket's names)
        if host not in answers:
            return real(host, port, family, type, proto, flags)
        turn = calls.get(host, 0)
        calls[host] = turn + 1
        address = answers[host][min(turn, len(answers[host]) - 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return calls


def test_a_name_that_rebinds_to_loopback_never_reaches_the_local_server(
        recorder: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the checked lookup says public, any later lookup says 127.0.0.1.

    The fetch connects to exactly the address it checked (public, unreachable here), so the
    local service hears nothing, not even a request that is refused afterwards.
    """
    port, seen = recorder
    calls = fake_dns(monkeypatch, {"rebind.test": ["93.184.216.34", "127.0.0.1"]})
    start = time.monotonic()
    with pytest.raises(ImageInputError):
        fetch_image_bytes(f"http://rebind.test:{port}/face.jpg", timeout=(1.0, 2.0),
                          total_timeout=5.0)
    assert time.monotonic() - start < 5
    assert seen == []
    assert calls["rebind.test"] == 1  # resolved once, and that answer was used


def test_every_redirect_hop_connects_to_the_address_it_checked(
        recorder: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A redirect to a name that rebinds: neither the image nor another redirect is requested."""
    port, seen = recorder
    real_check = images._check_address

    def origin_is_public(address: str, host: str, allow_private: bool) -> None:
        if host != "origin.test":  # the test server stands in for a public web site
            real_check(address, host, allow_private)

    monkeypatch.setattr(images, "_check_address", origin_is_public)
    fake_dns(monkeypatch, {"origin.test": ["127.0.0.1"],
                           "evil.test": ["93.184.216.34", "127.0.0.1"]})
    for path in ("/go-rebind", "/go-rebind-hop"):
        seen.clear()
        with pytest.raises(ImageInputError):
            fetch_image_bytes(f"http://origin.test:{port}{path}", timeout=(1.0, 2.0),
                              total_timeout=5.0)
        assert seen == [f"origin.test:{port} {path}"]  # the origin only; nothing for evil.test


def test_a_redirect_to_a_name_on_loopback_is_refused_before_any_request(
        recorder: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    port, seen = recorder
    real_check = images._check_address
    monkeypatch.setattr(images, "_check_address", lambda address, host, allow_private: None
                        if host == "origin.test" else real_check(address, host, allow_private))
    fake_dns(monkeypatch, {"origin.test": ["127.0.0.1"], "local.test": ["127.0.0.1"]})
    with pytest.raises(ImageInputError, match=r"local\.test \(127\.0\.0\.1\).*loopback"):
        fetch_image_bytes(f"http://origin.test:{port}/go-local", timeout=(1.0, 2.0))
    assert seen == [f"origin.test:{port} /go-local"]


def test_a_name_with_one_blocked_address_among_public_ones_is_refused(
        recorder: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse the host rather than pick its public addresses: mixed answers are a rebinding set-up."""
    port, seen = recorder
    monkeypatch.setattr(images, "_resolve", lambda host, port: ["93.184.216.34", "127.0.0.1"])
    with pytest.raises(ImageInputError, match=r"mixed\.test \(127\.0\.0\.1\).*loopback"):
        fetch_image_bytes(f"http://mixed.test:{port}/face.jpg", timeout=(1.0, 2.0))
    assert seen == []


def test_allow_private_still_connects_to_the_resolved_name(
        recorder: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning keeps the Host header of the URL (virtual hosts keep working)."""
    port, seen = recorder
    fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    assert fetch(f"http://images.test:{port}/face.jpg") == JPEG
    assert fetch(f"http://images.test:{port}/hop") == JPEG
    assert seen == [f"images.test:{port} /face.jpg", f"images.test:{port} /hop",
                    f"images.test:{port} /face.jpg"]


@contextlib.contextmanager
def trickling_server(payload: bytes, interval: float) -> Iterator[tuple[str, dict]]:
    """A raw socket server on 127.0.0.1 that sends `payload` one byte every `interval` s.

    One connection, bounded: it stops at the end of the payload, when the client goes away, or
    after 20 s in all.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    state: dict = {"sent": 0, "closed_early": False}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(65536)  # the request
            stop = time.monotonic() + 20
            for byte in payload:
                if time.monotonic() > stop:
                    break
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    state["closed_early"] = True
                    break
                state["sent"] += 1
                time.sleep(interval)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", state
    finally:
        listener.close()
        thread.join(timeout=25)


def test_headers_sent_a_byte_at_a_time_hit_the_total_deadline() -> None:
    """Each byte arrives well within the read timeout; only the total deadline can stop this."""
    headers = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: " + b"z" * 20 + b"\r\n\r\n"
    with trickling_server(headers + JPEG, interval=0.15) as (base, _state):
        start = time.monotonic()
        with pytest.raises(ImageInputError, match="too long"):
            fetch(f"{base}/face.jpg", timeout=(1.0, 1.0), total_timeout=2.0)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0 + 2.0, f"the fetch lasted {elapsed:.1f} s"


@pytest.fixture
def tls_recorder(server: str, tmp_path: Path) -> Iterator[tuple[int, list[str], Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for images.test.

    Records the TLS server name (SNI) and the Host header of each request.
    """
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=images.test", "-addext",
                    "subjectAltName=DNS:images.test"], check=True, capture_output=True, timeout=30)
    seen: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen.append(f"sni {name}")
    handler = type("TLSRecorder", (_RecordingHandler,), {"requests": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], seen, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_to_a_pinned_address_verifies_the_url_host_name(
        tls_recorder: tuple[int, list[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Connecting to the checked IP keeps SNI, Host and certificate checks on the URL's name."""
    port, seen, cert = tls_recorder
    monkeypatch.setattr(images.requests.certs, "where", lambda: str(cert))  # trust the test CA
    fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    assert fetch(f"https://images.test:{port}/face.jpg") == JPEG
    assert seen == ["sni images.test", f"images.test:{port} /face.jpg"]
    seen.clear()
    with pytest.raises(ImageInputError, match="secure connection to 127.0.0.1 failed"):
        fetch(f"https://127.0.0.1:{port}/face.jpg")  # the certificate is not for 127.0.0.1
    assert not [line for line in seen if "/face.jpg" in line]
