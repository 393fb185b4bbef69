"""The decoded image store: round trip, reuse, continuing an interrupted build, parallel
decoding, damaged state, file-backed indexing and bounded memory."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_core.errors import ConfigError
from fer_core.store import DATA_FILE, STATE_FILE, ImageArray, build_store

BAD_AT = {5: b"not an image at all", 23: b""}  # a text file and an empty file among the images


def decode_png(path: Path, mode: str = "L") -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode)), None
    except OSError as exc:
        return None, f"not a readable image ({type(exc).__name__})"


def logged_decode(path: Path, log: Path, mode: str = "L", interrupt_at: str | None = None
                  ) -> tuple[np.ndarray | None, str | None]:
    """decode_png that appends "<pid> <file name>" to `log` (and raises KeyboardInterrupt at
    `interrupt_at`): the tests count decodes across processes with it."""
    if path.name == interrupt_at:
        raise KeyboardInterrupt
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {path.name}\n")
    return decode_png(path, mode)


def decoded_names(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


def pattern_decode(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, None]:
    """Rows that need no file: row i is (i + 0, i + 1, ...) mod 256."""
    return ((int(path.stem) + np.arange(np.prod(shape))) % 256).astype(np.uint8).reshape(shape), None


def make_images(folder: Path, count: int, shape: tuple[int, ...], seed: int = 0
                ) -> tuple[list[Path], dict[int, np.ndarray]]:
    """`count` PNG files (BAD_AT's indices planted unreadable) and the pixels of the readable ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files, pixels = [], {}
    for i in range(count):
        path = folder / f"{i:04d}.png"
        if i in BAD_AT:
            path.write_bytes(BAD_AT[i])
        else:
            pixels[i] = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels[i]).save(path)
        files.append(path)
    return files, pixels


def expected_tensor(pixels: dict[int, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([pixels[i] for i in sorted(pixels)]))


@pytest.fixture
def grey(tmp_path: Path) -> tuple[list[Path], dict[int, np.ndarray]]:
    return make_images(tmp_path / "grey", 40, (8, 8))


@pytest.mark.parametrize("shape, mode", [((8, 8), "L"), ((8, 8, 3), "RGB")])
@pytest.mark.parametrize("in_memory_bytes", [1 << 20, 0])
def test_round_trip_keeps_input_order_and_leaves_bad_files_out(tmp_path, shape, mode, in_memory_bytes):
    files, pixels = make_images(tmp_path / "images", 40, shape)
    result = build_store(files, functools.partial(decode_png, mode=mode), shape, tmp_path / "store",
                         chunk_size=8, in_memory_bytes=in_memory_bytes)
    assert isinstance(result.images, ImageArray if in_memory_bytes == 0 else torch.Tensor)
    assert result.images.shape == (38, *shape) and result.images.dtype == torch.uint8
    assert result.kept == sorted(pixels)
    assert [i for i, _ in result.bad] == sorted(BAD_AT)
    assert all(reason.startswith("not a readable image") for _, reason in result.bad)
    assert torch.equal(result.images[:], expected_tensor(pixels))
    assert (tmp_path / "store" / DATA_FILE).stat().st_size == 40 * int(np.prod(shape))


def test_second_build_reuses_the_store_without_decoding(tmp_path, grey):
    files, pixels = grey
    log = tmp_path / "decoded.log"
    decode = functools.partial(logged_decode, log=log)
    first = build_store(files, decode, (8, 8), tmp_path / "store", chunk_size=8)
    assert len(decoded_names(log)) == 40
    calls = []
    second = build_store(files, decode, (8, 8), tmp_path / "store", chunk_size=8,
                         progress=lambda done, total: calls.append((done, total)))
    assert len(decoded_names(log)) == 40
    assert calls == [(40, 40)]
    assert torch.equal(first.images, second.images) and torch.equal(second.images, expected_tensor(pixels))
    assert (second.kept, second.bad) == (first.kept, first.bad)


def test_interrupted_build_continues_with_the_chunks_not_done(tmp_path, grey):
    files, pixels = grey
    log = tmp_path / "decoded.log"
    with pytest.raises(KeyboardInterrupt):
        build_store(files, functools.partial(logged_decode, log=log, interrupt_at=files[19].name), (8, 8),
                    tmp_path / "store", chunk_size=8)
    state = json.loads((tmp_path / "store" / STATE_FILE).read_text())
    assert sorted(state["chunks"]) == ["0", "1"] and state["complete"] is False
    assert state["chunks"]["0"] == {"5": decode_png(files[5])[1]}

    log.unlink()
    calls = []
    result = build_store(files, functools.partial(logged_decode, log=log), (8, 8), tmp_path / "store",
                         chunk_size=8, progress=lambda done, total: calls.append((done, total)))
    assert decoded_names(log) == [f.name for f in files[16:]]
    assert calls == [(16, 40), (24, 40), (32, 40), (40, 40)]
    clean = build_store(files, decode_png, (8, 8), tmp_path / "clean", chunk_size=8)
    assert torch.equal(result.images, clean.images) and torch.equal(result.images, expected_tensor(pixels))
    assert (result.kept, result.bad) == (clean.kept, clean.bad)


def test_processes_give_the_same_bytes_as_one_process(tmp_path, grey):
    files, pixels = grey
    log = tmp_path / "decoded.log"
    calls = []
    parallel = build_store(files, functools.partial(logged_decode, log=log), (8, 8), tmp_path / "parallel",
                           chunk_size=4, workers=2, progress=lambda done, total: calls.append((done, total)))
    serial = build_store(files, decode_png, (8, 8), tmp_path / "serial", chunk_size=4, workers=1)
    pids = {line.split()[0] for line in log.read_text().splitlines()}
    # Which of the two workers decodes which chunk is up to the scheduler: on a loaded machine the
    # first one started can take every chunk before the second is up.
    assert str(os.getpid()) not in pids and 1 <= len(pids) <= 2
    assert ((tmp_path / "parallel" / DATA_FILE).read_bytes() == (tmp_path / "serial" / DATA_FILE).read_bytes())
    assert torch.equal(parallel.images, expected_tensor(pixels)) and parallel.bad == serial.bad
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and calls[-1] == (40, 40)


def test_a_decode_worker_needs_neither_torch_nor_scikit_learn(tmp_path, monkeypatch):
    """A spawned worker imports the store (for its chunk function) and the module of the decode
    function datasets use; with torch among them each worker held about 0.7 GB more."""
    import fer_core.data
    given = []

    def record_decode(files, decode, *args, **kwargs):
        given.append(decode)
        raise KeyboardInterrupt

    monkeypatch.setattr(fer_core.data, "build_store", record_decode)
    make_images(tmp_path / "faces" / "happy", 2, (8, 8))
    with pytest.raises(KeyboardInterrupt):
        fer_core.data.load_dataset(str(tmp_path / "faces"), cache_dir=tmp_path / "cache")
    (decode,) = given
    pickle.dumps(decode)  # it crosses to the worker by reference to its module
    code = (f"import sys, fer_core.store, {decode.func.__module__}\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'cv2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_interrupt_in_a_worker_stops_the_build_and_a_rerun_decodes_only_what_is_left(tmp_path, grey):
    files, pixels = grey
    log = tmp_path / "decoded.log"
    with pytest.raises(KeyboardInterrupt):
        build_store(files, functools.partial(logged_decode, log=log, interrupt_at=files[21].name), (8, 8),
                    tmp_path / "store", chunk_size=4, workers=2)
    state = json.loads((tmp_path / "store" / STATE_FILE).read_text())
    done = {int(chunk) for chunk in state["chunks"]}
    assert 5 not in done and state["complete"] is False  # chunk 5 holds files 20-23

    log.unlink()
    result = build_store(files, functools.partial(logged_decode, log=log), (8, 8), tmp_path / "store",
                         chunk_size=4, workers=1)
    assert sorted(decoded_names(log)) == [f.name for i, f in enumerate(files) if i // 4 not in done]
    assert torch.equal(result.images, expected_tensor(pixels)) and [i for i, _ in result.bad] == sorted(BAD_AT)


def test_progress_rises_chunk_by_chunk_to_the_total(tmp_path, grey):
    calls = []
    build_store(grey[0], decode_png, (8, 8), tmp_path / "store", chunk_size=16,
                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 40), (16, 40), (32, 40), (40, 40)]


def _break_json(store: Path) -> None:
    (store / STATE_FILE).write_text('{"version": 1, "chunks": {')


def _edit_state(**changes):
    def edit(store: Path) -> None:
        state = json.loads((store / STATE_FILE).read_text())
        (store / STATE_FILE).write_text(json.dumps({**state, **changes}))
    return edit


def _truncate_data(store: Path) -> None:
    os.truncate(store / DATA_FILE, 100)


@pytest.mark.parametrize("damage", [
    _break_json, _edit_state(version=99), _edit_state(count=41), _edit_state(chunks={"7": {}}),
    _edit_state(chunks={"0": {"30": "planted"}}), _edit_state(complete="yes"), _truncate_data,
], ids=["bad-json", "version", "count", "chunk-out-of-range", "bad-index-outside-chunk", "complete-type",
        "short-data"])
def test_damaged_or_mismatched_state_starts_over(tmp_path, grey, damage):
    files, pixels = grey
    build_store(files, decode_png, (8, 8), tmp_path / "store", chunk_size=8)
    damage(tmp_path / "store")
    log = tmp_path / "decoded.log"
    result = build_store(files, functools.partial(logged_decode, log=log), (8, 8), tmp_path / "store",
                         chunk_size=8)
    assert len(decoded_names(log)) == 40
    assert torch.equal(result.images, expected_tensor(pixels)) and [i for i, _ in result.bad] == sorted(BAD_AT)


def test_another_item_shape_in_the_same_folder_starts_over(tmp_path, grey):
    files, _ = grey
    build_store(files, decode_png, (8, 8), tmp_path / "store", chunk_size=8)
    result = build_store(files, functools.partial(decode_png, mode="RGB"), (8, 8, 3), tmp_path / "store",
                         chunk_size=8)
    grey_again = np.stack([decode_png(files[i])[0] for i in result.kept])
    assert result.images.shape == (38, 8, 8, 3)
    assert np.array_equal(result.images[..., 0].numpy(), grey_again)


def test_decode_of_the_wrong_shape_is_an_error(tmp_path, grey):
    with pytest.raises(ValueError, match="uint8"):
        build_store(grey[0], decode_png, (4, 4), tmp_path / "store")


def test_an_empty_file_list_gives_an_empty_store(tmp_path):
    result = build_store([], decode_png, (8, 8), tmp_path / "store")
    assert result.images.shape == (0, 8, 8) and result.kept == [] and result.bad == []


def test_environment_sets_the_in_memory_limit(tmp_path, grey, monkeypatch):
    monkeypatch.setenv("FER_STORE_IN_MEMORY_MB", "0")
    assert isinstance(build_store(grey[0], decode_png, (8, 8), tmp_path / "store").images, ImageArray)
    monkeypatch.setenv("FER_STORE_IN_MEMORY_MB", "0.5")
    assert isinstance(build_store(grey[0], decode_png, (8, 8), tmp_path / "store").images, torch.Tensor)
    monkeypatch.setenv("FER_STORE_IN_MEMORY_MB", "lots")
    with pytest.raises(ConfigError, match="FER_STORE_IN_MEMORY_MB"):
        build_store(grey[0], decode_png, (8, 8), tmp_path / "store")


# ---- ImageArray -----------------------------------------------------------------------------

@pytest.fixture
def backed(tmp_path, grey) -> tuple[ImageArray, torch.Tensor]:
    """A file-backed array of the 38 readable images and the same images as a tensor."""
    result = build_store(grey[0], decode_png, (8, 8), tmp_path / "store", chunk_size=8, in_memory_bytes=0)
    assert isinstance(result.images, ImageArray)
    return result.images, expected_tensor(grey[1])


@pytest.mark.parametrize("index", [0, 37, -1, -38, np.int64(7), torch.tensor(12)])
def test_an_int_gives_one_image(backed, index):
    images, reference = backed
    assert images[index].shape == (8, 8) and torch.equal(images[index], reference[index])


@pytest.mark.parametrize("index", [slice(None), slice(3, 17), slice(None, None, 3), slice(-5, None),
                                   slice(10, 2), slice(30, 100), slice(None, None, -2)])
def test_a_slice_gives_a_batch(backed, index):
    images, reference = backed
    expected = reference.numpy()[index].copy()  # numpy: a torch slice cannot step backwards
    assert torch.equal(images[index], torch.from_numpy(expected))


def test_indices_in_any_order_with_repeats_and_masks_give_batches(backed):
    images, reference = backed
    rng = np.random.default_rng(1)
    order = rng.integers(-38, 38, size=100)
    assert len(set(order.tolist())) < 100  # repeats
    for index in (order, torch.from_numpy(order), order.tolist(), []):
        assert torch.equal(images[index], reference[torch.as_tensor(index, dtype=torch.int64)])
    mask = rng.random(38) < 0.5
    assert torch.equal(images[mask], reference[torch.from_numpy(mask)])
    assert torch.equal(images[torch.from_numpy(mask)], reference[torch.from_numpy(mask)])
    assert torch.equal(images[mask.tolist()], reference[torch.from_numpy(mask)])


def test_a_batch_is_a_copy(backed):
    images, reference = backed
    batch = images[:4]
    batch.zero_()
    assert torch.equal(images[:4], reference[:4])


def test_a_subset_of_a_subset_reads_the_right_rows(backed):
    images, reference = backed
    split = np.array([30, 2, 2, 17, 5, 36, 11])
    inner = images.subset(torch.from_numpy(split)).subset(slice(1, None, 2))
    assert isinstance(inner, ImageArray) and inner.shape == (3, 8, 8)
    assert torch.equal(inner.materialize(), reference[split][1::2])
    assert torch.equal(inner[-1], reference[split[5]])
    assert np.array_equal(images.subset(np.arange(38) % 2 == 0).numpy(), reference.numpy()[::2])
    assert torch.equal(images.to("cpu"), reference)


@pytest.mark.parametrize("index", [38, -39, [0, 38], np.array([-39]), np.ones(37, dtype=bool)])
def test_out_of_range_is_an_index_error(backed, index):
    images, _ = backed
    with pytest.raises(IndexError):
        images[index]
    with pytest.raises(IndexError):
        images.subset(index)


@pytest.mark.parametrize("index", [1.5, "3", (0, 1), [0.5, 1.0], True, torch.zeros(2, 2, dtype=torch.int64), None])
def test_unsupported_indices_are_a_type_error(backed, index):
    images, _ = backed
    with pytest.raises(TypeError, match="ImageArray"):
        images[index]


def test_pickling_keeps_the_rows_and_reopens_the_file(backed):
    images, reference = backed
    split = images.subset([9, 1, 4])
    split[0]  # open the file before pickling: the descriptor must not travel
    copy = pickle.loads(pickle.dumps(split))
    assert copy._fd is None
    assert torch.equal(copy[:], reference[[9, 1, 4]])


def test_a_forked_child_reads_through_its_own_descriptor(backed):
    images, reference = backed
    images[0]  # the parent's descriptor is open before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send what it reads, then leave without running pytest's teardown
        try:
            os.write(write_end, images[[3, 1, 2]].numpy().tobytes() + bytes([images._fd_pid == os.getpid()]))
        finally:
            os._exit(0)
    os.close(write_end)
    received = b""
    while chunk := os.read(read_end, 4096):
        received += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    assert received[:-1] == reference[[3, 1, 2]].numpy().tobytes() and received[-1] == 1


def test_reading_a_store_larger_than_the_budget_keeps_memory_bounded(tmp_path):
    """Every row of a 64 MB file-backed store, gathered in shuffled batches, grows the process
    by far less than the store: the rows go through the page cache, not the process."""
    shape, count = (128, 128), 4096
    files = [tmp_path / "virtual" / f"{i}.png" for i in range(count)]  # pattern_decode reads no file
    images = build_store(files, functools.partial(pattern_decode, shape=shape), shape, tmp_path / "store",
                         workers=1, in_memory_bytes=0).images
    assert images.nbytes == 64 * 2**20
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    # measured from before the first read: a memmap maps whole page-cache folios on a fault, so
    # a few reads can map most of the file (np.memmap here grows RSS by the 64 MB; pread by ~2 MB)
    before = peak = resident_bytes()
    total = 0
    for start in range(0, count, 256):
        batch_index = order[start:start + 256]
        batch = images[batch_index]
        assert batch[0, 0, 0] == int(batch_index[0]) % 256 and batch[-1, 0, 1] == (int(batch_index[-1]) + 1) % 256
        total += len(batch)
        peak = max(peak, resident_bytes())
    assert total == count
    assert peak - before < 32 * 2**20


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
