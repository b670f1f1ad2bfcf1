"""Reading people's CSV files (manifests, ISIC metadata.csv, truth files) with one-line errors that name the file:
an empty file, a header that repeats a column, an unclosed quote (with its line); cell text made printable.

Python's csv module reads a repeated header column by letting the last one win, and an unclosed quote by swallowing
the rest of the file into one cell; both would go on to confusing messages ("unknown label ''"), so both are refused
here. Text quoted from a file into a message goes through :func:`printable`: NUL bytes and other control characters
are shown as escapes, never echoed raw to a terminal or a log.
"""
from __future__ import annotations

import csv
import io
import os
import unicodedata
from pathlib import Path

from melanoma.core.errors import DataError
from melanoma.core.text import display_name

_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})  # control, format (bidi overrides), surrogates, separators
PROBLEMS_SHOWN = 20


def printable(text: object) -> str:
    """``text`` safe to print on one line: control and format characters (NUL, newlines, escape sequences, bidi
    overrides) as ``\\x00`` / ``\\u202e`` escapes, undecodable file-name bytes as ``\\xff``."""
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if text.isascii() and text.isprintable() or all(unicodedata.category(c) not in _UNPRINTABLE for c in text):
        return text
    try:
        text = display_name(text)  # undecodable file-name bytes first, as \xNN
    except UnicodeEncodeError:
        pass  # a lone surrogate that is not an escaped byte: escaped below like any other
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNPRINTABLE else c
                   for c in text)


def read_csv_rows(path: Path, what: str = "CSV file") -> tuple[list[str], list[dict]]:
    """(columns, rows) of a UTF-8 CSV file (a byte-order mark is fine); one-line errors for unreadable ones.

    Column names are stripped of spaces; a row shorter than the header has None in its missing cells, and cells
    beyond the header are dropped, as :class:`csv.DictReader` does. Blank lines are skipped."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{display_name(path)}: is a folder, not a {what}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{display_name(path)}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"{display_name(path)}: cannot read ({exc.strerror or exc})") from exc
    if not text.strip():
        raise DataError(f"{display_name(path)}: empty file (expected a {what} with a header line)")
    records = _records(text, path)
    columns = [cell.strip() for cell in records[0]]
    repeated = next((c for i, c in enumerate(columns) if c and c in columns[:i]), None)
    if repeated is not None:
        raise DataError(f"{display_name(path)}: column '{printable(repeated)}' appears more than once in the header; "
                        "keep one")
    rows = [dict(zip(columns, cells + [None] * (len(columns) - len(cells)))) for cells in records[1:]]
    return columns, rows


def _records(text: str, path: Path) -> list[list[str]]:
    """The non-blank records of ``text``. A strict parse finds an unclosed quote (and the line it opened on); any
    other strictness complaint (a stray quote inside a cell) is read leniently, as before."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[list[str]] = []
    start = 1
    try:
        for record in reader:
            if record:
                records.append(record)
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError(f"{display_name(path)}: unclosed quote at line {start}") from exc
        try:
            records = [record for record in csv.reader(io.StringIO(text, newline="")) if record]
        except csv.Error as lenient:
            raise DataError(f"{display_name(path)}: not a readable CSV file ({printable(lenient)})") from lenient
    return records


def listed_problems(problems: list[str], shown: int = PROBLEMS_SHOWN) -> str:
    """Unusable rows for an error message, one per line: the first ``shown``, then how many more."""
    more = len(problems) - shown
    return "\n  ".join(problems[:shown]) + (f"\n  ... and {more} more" if more > 0 else "")
