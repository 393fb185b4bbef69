"""Kaggle's fer2013.csv, read one physical line at a time so a broken line costs only itself.

No fer2013.csv field spans lines (emotion code, space-separated pixels, Usage word), so each
line is parsed as a csv record on its own: an unclosed quote cannot swallow the rows after it
or grow one field past csv's size limit. Lines are numbered as a text editor numbers them (the
header is line 1); the dataset reader (`data.read_fer2013_csv`) and the gallery
(`ui_data.load_csv_rows`) share this numbering, so "fer2013.csv#7" means the same face in both.
Light on purpose (csv and numpy only): the app's pages import it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

MAX_LINE_CHARS = 64 * 1024
"""A 48x48 row is about 9.3 KB (2304 values of up to 3 digits); longer lines are skipped unread."""


def open_csv(path: str | Path) -> TextIO:
    """Open for reading as UTF-8, with or without a byte-order mark; bad bytes become U+FFFD."""
    return open(path, newline="", encoding="utf-8-sig", errors="replace")


def read_lines(handle: TextIO, max_chars: int = MAX_LINE_CHARS
               ) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line number, fields, None) per non-empty line, or (line number, None, why) when unusable.

    Raises OSError (and only that) when the file itself cannot be read.
    """
    number = 0
    while True:
        line = handle.readline(max_chars + 1)
        if not line:
            return
        number += 1
        if len(line) > max_chars and not line.endswith(("\n", "\r")):
            while True:  # skip the rest of the line in bounded pieces
                rest = handle.readline(max_chars)
                if not rest or rest.endswith(("\n", "\r")):
                    break
            yield number, None, f"line too long (over {max_chars} characters)"
            continue
        if not line.strip("\r\n"):
            continue  # blank lines carry nothing
        try:
            fields = next(csv.reader([line]), [])
        except csv.Error as exc:
            yield number, None, f"not valid csv ({exc})"
            continue
        yield number, fields, None


def header_columns(fields: list[str] | None) -> dict[str, int]:
    """Column name (stripped, lower case) -> index."""
    return {name.strip().lstrip("\ufeff").strip().lower(): index
            for index, name in enumerate(fields or [])}


def parse_pixels(text: str) -> np.ndarray:
    """Space-separated integers as int64; ValueError for anything else (huge numbers included)."""
    try:
        return np.array(text.split(), dtype=np.int64)
    except OverflowError as exc:
        raise ValueError("a pixel value is far out of range") from exc
