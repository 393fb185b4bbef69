"""The decoded image store: every image of a dataset decoded once into a file in the cache folder.

A dataset larger than memory trains from this file with bounded memory; a small one is loaded
into one uint8 tensor, as before. The caller names the store's folder after a key of the file
list and the decode format (e.g. `<cache>/store-<key>/`); the store is reused while that holds.

<folder>/
    images.u8    N rows of prod(item_shape) uint8 bytes: row i is files[i] decoded, in input
                 order (a bad file's row stays zeros and is never handed out)
    state.json   format version, item_shape, count, chunk_size, the chunks done with their bad
                 files (index -> reason), and `complete`; rewritten atomically after each chunk
    lock         held while a build runs, so two processes never decode one store at once

Decoding goes chunk by chunk. A chunk's rows are written and fsynced before the state file
records the chunk done, so a crash or Ctrl-C never marks unwritten rows done, and a rerun
decodes only the chunks not yet recorded. Anything in the folder that does not match (damaged
JSON, another shape or count, a short data file) starts the store over.

Large builds decode in worker processes started with "spawn": a forked child would inherit the
parent's torch/OpenMP thread pools in whatever state they were, which can deadlock. A worker
imports this module and the decode function's (`pixels`), so neither imports torch at the top:
torch is imported where tensors are made, and a worker costs tens of megabytes, not a torch.

Reads use os.preadv into fresh buffers, not np.memmap: every memmap page a process touches counts
in its resident memory until unmapped, so an epoch over a memmap grows RSS to the size of the
store; pread goes through the page cache, which the kernel can drop and is not the process's.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import ConfigError
from .runs import atomic_write_json, exclusive_lock, read_json

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
DATA_FILE = "images.u8"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
DEFAULT_IN_MEMORY_BYTES = 1 << 30
IN_MEMORY_ENV = "FER_STORE_IN_MEMORY_MB"
MAX_DEFAULT_WORKERS = 8
# Starting a spawned worker costs about a second (it imports numpy and Pillow) while an image
# decodes in about a millisecond, so by default a build of fewer images than this stays in-process.
MIN_FILES_FOR_PROCESSES = 2048

# A picklable top-level function (or functools.partial of one): (uint8 array of item_shape, None)
# for a usable file, (None, reason) for one that is not.
Decode = Callable[[Path], tuple[np.ndarray | None, str | None]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class StoreResult:
    images: torch.Tensor | ImageArray  # the readable files' rows only, in input order
    kept: list[int]                    # the index in `files` of each of those rows
    bad: list[tuple[int, str]]         # (index in `files`, why it could not be decoded)


def in_memory_limit() -> int:
    """Bytes of decoded images that `build_store` loads into memory rather than reading from the
    file: FER_STORE_IN_MEMORY_MB, read at each call so a job's own environment applies, or 1 GiB."""
    value = os.environ.get(IN_MEMORY_ENV, "").strip()
    if not value:
        return DEFAULT_IN_MEMORY_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = math.nan
    if not (megabytes >= 0 and math.isfinite(megabytes)):
        raise ConfigError(f"{IN_MEMORY_ENV} must be a number of megabytes (0 or more), not {value!r}")
    return int(megabytes * 2**20)


def build_store(files: Sequence[Path], decode: Decode, item_shape: tuple[int, ...], folder: Path, *,
                workers: int | None = None, chunk_size: int = 512, progress: Progress | None = None,
                in_memory_bytes: int | None = None) -> StoreResult:
    """Decode `files` into the store in `folder`, or reuse or continue the one there.

    `workers`: processes that decode (default: the CPU count, at most 8, and 1 for a small
    build). `progress(done, total)` is called in this process as chunks finish. The images come
    back as one tensor when their size is at most `in_memory_bytes` (default `in_memory_limit()`),
    otherwise as a file-backed `ImageArray`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    files = [Path(f) for f in files]
    item_shape = tuple(int(size) for size in item_shape)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / LOCK_FILE):
        state = _open_state(folder, item_shape, len(files), chunk_size)
        if state["complete"]:
            if progress:
                progress(len(files), len(files))
        else:
            _decode_pending(files, decode, item_shape, folder, state, workers, progress)
    bad = {int(i): reason for chunk_bad in state["chunks"].values() for i, reason in chunk_bad.items()}
    kept = [i for i in range(len(files)) if i not in bad]
    images = ImageArray(folder / DATA_FILE, np.asarray(kept, dtype=np.int64), item_shape)
    limit = in_memory_limit() if in_memory_bytes is None else in_memory_bytes
    return StoreResult(images.materialize() if images.nbytes <= limit else images, kept, sorted(bad.items()))


def _open_state(folder: Path, item_shape: tuple[int, ...], count: int, chunk_size: int) -> dict[str, Any]:
    """The state of the store in `folder` when it matches, else a fresh one over a fresh data file.

    A half-built store keeps the chunk size it was started with: its done chunks are defined by it.
    """
    data_file, state_file = folder / DATA_FILE, folder / STATE_FILE
    size = count * math.prod(item_shape)
    state = _read_state(state_file, item_shape, count)
    if state is not None and data_file.is_file() and data_file.stat().st_size == size:
        return state
    state_file.unlink(missing_ok=True)  # first: a crash from here on leaves no state to trust
    data_file.unlink(missing_ok=True)  # a new sparse file, so no row of an older store survives
    with open(data_file, "wb") as handle:
        handle.truncate(size)
    return {"version": FORMAT_VERSION, "item_shape": list(item_shape), "count": count,
            "chunk_size": chunk_size, "chunks": {}, "complete": False}


def _read_state(state_file: Path, item_shape: tuple[int, ...], count: int) -> dict[str, Any] | None:
    """The state file's contents when they describe a store of this shape and count; None when the
    file is missing, damaged or describes another store."""
    try:
        state = read_json(state_file)
        chunk_size = state["chunk_size"]
        if (state["version"] != FORMAT_VERSION or state["item_shape"] != list(item_shape)
                or state["count"] != count or type(chunk_size) is not int or chunk_size < 1):
            return None
        chunks = {str(int(c)): {str(int(i)): str(reason) for i, reason in bad.items()}
                  for c, bad in state["chunks"].items()}
        chunk_count = math.ceil(count / chunk_size)
        in_range = all(0 <= int(c) < chunk_count and all(int(i) in _chunk_range(int(c), chunk_size, count)
                                                         for i in bad) for c, bad in chunks.items())
        complete = state["complete"]
        if not in_range or not isinstance(complete, bool) or (complete and len(chunks) != chunk_count):
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return {**state, "chunks": chunks}


def _chunk_range(chunk: int, chunk_size: int, count: int) -> range:
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, count))


def _decode_pending(files: list[Path], decode: Decode, item_shape: tuple[int, ...], folder: Path,
                    state: dict[str, Any], workers: int | None, progress: Progress | None) -> None:
    """Decode the chunks the state does not list as done, recording each as it finishes, then
    mark the store complete."""
    count, chunk_size = len(files), state["chunk_size"]
    pending = [c for c in range(math.ceil(count / chunk_size)) if str(c) not in state["chunks"]]
    done = count - sum(len(_chunk_range(c, chunk_size, count)) for c in pending)
    if progress:
        progress(done, count)

    def job(chunk: int) -> tuple[Any, ...]:
        rows = _chunk_range(chunk, chunk_size, count)
        return folder / DATA_FILE, files[rows.start:rows.stop], rows.start, decode, item_shape

    def record(chunk: int, bad: dict[int, str]) -> None:
        nonlocal done
        state["chunks"][str(chunk)] = {str(i): reason for i, reason in bad.items()}
        atomic_write_json(folder / STATE_FILE, state)
        done += len(_chunk_range(chunk, chunk_size, count))
        if progress:
            progress(done, count)

    processes = _worker_count(workers, len(pending), count - done)
    if processes > 1:
        _decode_in_processes({chunk: job(chunk) for chunk in pending}, processes, record)
    else:
        for chunk in pending:
            record(chunk, _decode_chunk(*job(chunk)))
    state["complete"] = True
    atomic_write_json(folder / STATE_FILE, state)


def _worker_count(workers: int | None, pending_chunks: int, pending_files: int) -> int:
    if workers is None:
        if pending_files < MIN_FILES_FOR_PROCESSES:
            return 1
        workers = min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)
    return max(1, min(workers, pending_chunks))


def _decode_in_processes(jobs: dict[int, tuple[Any, ...]], processes: int,
                         record: Callable[[int, dict[int, str]], None]) -> None:
    """Run `_decode_chunk` for every job in a pool of spawned processes; record each chunk here,
    in the order they finish. On an error or Ctrl-C the chunks not started are cancelled, the
    running ones finish unrecorded, and the exception goes on."""
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_interrupts)
    try:
        futures: dict[Future[dict[int, str]], int] = {
            pool.submit(_decode_chunk, *args): chunk for chunk, args in jobs.items()}
        for future in as_completed(futures):
            record(futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """Ctrl-C reaches the whole process group; only the parent acts on it, so a worker is never
    killed mid-chunk and the pool shuts down in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_chunk(data_file: Path, files: Sequence[Path], start: int, decode: Decode,
                  item_shape: tuple[int, ...]) -> dict[int, str]:
    """Decode one chunk, write its rows at their place in the data file and fsync them; return its
    bad files (index in the whole file list -> reason).

    The worker writes its rows itself rather than sending them back: no pixels cross a pipe, the
    parent never holds decoded images, and a chunk's rows are contiguous, so it is one write.
    """
    block = np.zeros((len(files), *item_shape), dtype=np.uint8)
    bad: dict[int, str] = {}
    for offset, path in enumerate(files):
        array, reason = decode(path)
        if array is None:
            bad[start + offset] = reason or "could not be decoded"
        elif array.dtype != np.uint8 or array.shape != item_shape:
            raise ValueError(f"decode returned {array.dtype} {array.shape} for {path}; "
                             f"the store holds uint8 {item_shape}")
        else:
            block[offset] = array
    fd = os.open(data_file, os.O_WRONLY)
    try:
        view, position = memoryview(block.reshape(-1)), start * math.prod(item_shape)
        while view:
            written = os.pwrite(fd, view, position)
            view, position = view[written:], position + written
        os.fsync(fd)
    finally:
        os.close(fd)
    return bad


class ImageArray:
    """Some rows of a store's data file, read like a read-only uint8 tensor of shape
    (len, *item_shape): indexing returns a tensor copied from the file, `subset` narrows lazily.

    Only the path, the rows and the shape are pickled; each process opens the file on first read.
    """

    _fd: int | None = None  # opened on first read, by the process that reads
    _fd_pid = 0

    def __init__(self, path: Path, rows: np.ndarray, item_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.item_shape = tuple(item_shape)
        self._row_bytes = math.prod(self.item_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.item_shape)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self._row_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ImageArray(shape={self.shape}, dtype=uint8, path={str(self.path)!r})"

    @property
    def dtype(self) -> torch.dtype:
        import torch
        return torch.uint8

    def __getitem__(self, index: Any) -> torch.Tensor:
        """An int gives one image; a slice, integer indices (tensor, numpy array or list, any order,
        repeats allowed) or a boolean mask give a (k, *item_shape) batch."""
        rows, single = self._file_rows(index)
        images = self._read(rows)
        import torch
        return torch.from_numpy(images[0] if single else images)

    def subset(self, index: Any) -> ImageArray:
        """The rows `index` selects as another ImageArray; nothing is read."""
        return ImageArray(self.path, self._file_rows(index)[0], self.item_shape)

    def numpy(self) -> np.ndarray:
        return self._read(self.rows)

    def materialize(self) -> torch.Tensor:
        import torch
        return torch.from_numpy(self.numpy())

    def to(self, device: torch.device | str) -> torch.Tensor:
        return self.materialize().to(device)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "item_shape": self.item_shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __del__(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            with suppress(OSError):
                os.close(self._fd)

    def _file_rows(self, index: Any) -> tuple[np.ndarray, bool]:
        """The file rows `index` selects, and whether it names a single image."""
        if isinstance(index, slice):
            return self.rows[index], False
        if not isinstance(index, (slice, int, list, np.ndarray, np.integer)):
            import torch
            if isinstance(index, torch.Tensor):
                index = index.detach().cpu().numpy()
        if isinstance(index, np.ndarray) and index.ndim == 0:
            index = index.item()
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            positions, single = np.array([index], dtype=np.int64), True
        elif isinstance(index, (list, np.ndarray)):
            positions, single = self._positions(np.asarray(index)), False
        else:
            raise TypeError(f"an ImageArray is indexed by an int, a slice, or a 1-D integer or boolean "
                            f"tensor, numpy array or list, not {type(index).__name__}")
        count = len(self.rows)
        if positions.size and (positions.min() < -count or positions.max() >= count):
            raise IndexError(f"index out of range for {count} images")
        return self.rows[positions], single

    def _positions(self, index: np.ndarray) -> np.ndarray:
        if index.dtype == np.bool_:
            if index.shape != (len(self.rows),):
                raise IndexError(f"a boolean mask of shape {index.shape} for {len(self.rows)} images")
            return np.flatnonzero(index)
        if index.size == 0:
            return np.empty(0, dtype=np.int64)  # np.asarray([]) is float
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"ImageArray indices must be 1-D integers, not {index.ndim}-D {index.dtype}")
        return index.astype(np.int64)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Gather file rows into a new array: each run of consecutive rows is one read, in file
        order; unsorted and repeated rows are put in place afterwards."""
        unique, inverse = np.unique(rows, return_inverse=True)
        images = np.empty((len(unique), *self.item_shape), dtype=np.uint8)
        if not len(unique):
            return images
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        starts, stops = np.concatenate(([0], breaks)), np.concatenate((breaks, [len(unique)]))
        buffer, fd, size = memoryview(images.reshape(-1)), self._file(), self._row_bytes
        for first, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            view, position = buffer[first * size:stop * size], int(unique[first]) * size
            while view:
                got = os.preadv(fd, [view], position)
                if got == 0:
                    raise OSError(f"{self.path} is shorter than its rows: the store is incomplete")
                view, position = view[got:], position + got
        return images if np.array_equal(unique, rows) else images[inverse]

    def _file(self) -> int:
        """This process's descriptor for the data file: a forked child opens its own."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd


def select_rows(images: torch.Tensor | ImageArray, index: Any) -> torch.Tensor | ImageArray:
    """Rows of a dataset's images (a split): for a file-backed store a view that reads nothing
    until a batch is taken from it, for a tensor its own indexing."""
    return images.subset(index) if isinstance(images, ImageArray) else images[index]
