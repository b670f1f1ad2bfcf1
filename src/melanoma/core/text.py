"""Text helpers shared by every stage: a path or name made printable for a one-line message."""
from __future__ import annotations

import os


def display_name(path: str | os.PathLike) -> str:
    """A printable file name, with undecodable bytes shown as escapes instead of crashing a print."""
    text = os.fspath(path)
    if not has_surrogates(text):
        return text
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
