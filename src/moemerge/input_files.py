"""What a path handed to moemerge is, before anything opens it: moemerge reads regular files only.

Opening a FIFO blocks until a writer comes (forever, if none does), a device may never end, and a
directory cannot be read as a file, so every input file is checked with ``os.stat`` first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moemerge.errors import MoemergeError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(path: str | Path) -> str | None:
    """None for a regular file (or a symlink to one); else what ``path`` is, as words: "missing",
    "a dangling symlink", "a directory", "a FIFO (named pipe)", "a socket", "a character device"
    or "a block device"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | Path, fix: str, role: str = "") -> None:
    """Raise MoemergeError, saying what ``path`` is (after ``role``, e.g. "recipe ") and then ``fix``, unless it
    is a regular file."""
    kind = file_kind(path)
    if kind == "missing":
        raise MoemergeError(f"{role}{path} does not exist; {fix}")
    if kind is not None:
        raise MoemergeError(f"{role}{path} is {kind}, not a regular file; {fix}")
