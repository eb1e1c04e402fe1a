"""Where moemerge writes, and how: every output path is checked before any work starts, and every output is
built beside its place under a temporary name and renamed into place only when complete.

The rules, one place for every command (``reduce``, ``apply``, ``plan``, ``inspect``, ``compare``, ``eval``):

- ``--out`` is not empty and not a symlink; it is not the filesystem root, the current directory or the home
  directory, nor a folder holding one of them; it is not, does not hold and does not lie inside any path the
  run reads (model, reference, recipe, calibration or evaluation text); it does not lie under a file; and its
  folder accepts new entries (probed by creating and removing a temporary there, which also catches /proc,
  read-only file systems and names too long).
- An existing output is replaced only with ``force``. Without it, an output that appeared while the run worked
  (another run of the same ``--out``) is left as it is and this run's result is removed, with an error. With
  ``force`` the old output is renamed aside, the new one renamed in, and only then the old one deleted.
- Temporaries are named ``.NAME.partial-HOST-PID-XXXXXXXX``; they are removed on any error, and on SIGINT,
  SIGTERM and SIGHUP (the CLI turns those into exceptions). After a SIGKILL the next run with the same output
  removes the ones of this host whose process is gone. ``reduce --stream``'s ``.NAME.moemerge-partial`` is
  resumable on purpose and not one of them.
- Finished outputs get the usual modes (folders 0777, files 0666, less the umask).
- A failed write (disk full, I/O error) is one :class:`MoemergeError` line naming the file and the reason.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from moemerge.errors import MoemergeError

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def check_output(out: str | Path, force: bool, reads: Iterable[str | Path | None] = (), file: bool = False) -> None:
    """Raise MoemergeError unless ``out`` may become this run's output folder (``file``: output file) under the
    rules of the module docstring; ``reads`` are the paths the run reads (None and missing ones are skipped)."""
    if not str(out).strip():
        raise MoemergeError(f"--out is empty; give the path of the output {'file' if file else 'directory'}")
    out = Path(out)
    if out.is_symlink():
        raise MoemergeError(f"--out {out} is a symlink; pass the real path instead")
    _check_apart(out, out.resolve(), reads)
    if out.exists():
        if file and out.is_dir():
            raise MoemergeError(f"--out {out} is a directory; give a file name")
        if file and not out.is_file():
            raise MoemergeError(f"--out {out} is not a regular file; choose another --out")
        if not file and not out.is_dir():
            raise MoemergeError(f"output path {out} is a file, not a directory; choose another --out")
        if not force:
            raise MoemergeError(f"--out {out} already exists; pass --force to replace it")
    anchor = _anchor(out)
    if not anchor.is_dir():
        raise MoemergeError(f"--out {out} lies under {anchor}, which is not a directory; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=anchor))
    except OSError as err:
        raise MoemergeError(f"cannot write --out {out}: {err.strerror} ({anchor}); choose another --out") from None


def _check_apart(out: Path, real: Path, reads: Iterable[str | Path | None]) -> None:
    """Raise MoemergeError if the resolved output ``real`` would replace a folder that must stay, or a path read."""
    for place, name in _kept_folders():
        if place.is_relative_to(real):
            relation = "is" if place == real else "contains"
            raise MoemergeError(f"--out {out} {relation} {name}; choose a new folder for the output")
    for read in reads:
        if read is None or not os.path.lexists(read):
            continue
        path = Path(read).resolve()
        relation = "is" if path == real else "contains" if path.is_relative_to(real) else None
        if relation is None and real.is_relative_to(path):
            relation = "lies inside"
        if relation:
            raise MoemergeError(f"--out {out} {relation} {read}, which this run reads; choose another --out")


def _kept_folders() -> list[tuple[Path, str]]:
    """The folders an output may never replace: the root, the current and the home directory."""
    kept = [(Path("/"), "the filesystem root")]
    for name, where in (("the current directory", Path.cwd), ("your home directory", Path.home)):
        with suppress(OSError, RuntimeError):  # a deleted current directory, no home directory
            kept.append((where().resolve(), f"{name} {where()}"))
    return kept


def _anchor(out: Path) -> Path:
    """The nearest existing folder (or what stands in its place) above ``out``: where its temporaries go."""
    anchor = out.absolute().parent
    while not os.path.lexists(anchor):
        anchor = anchor.parent
    return anchor


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.partial-{_HOST}-{os.getpid()}-"


def clear_stale(out: Path) -> None:
    """Remove the temporaries of ``out`` that a killed moemerge process of this host left (its pid is gone)."""
    pattern = re.compile(re.escape(f".{out.name}.partial-{_HOST}-") + r"(\d+)-[a-z0-9_]+")
    folder = _anchor(out)
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match and _gone(int(match.group(1))) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)


def _gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (a reused pid counts as running: nothing is removed)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


@contextmanager
def writing(out: str | Path) -> Iterator[None]:
    """Turn a failed write while producing ``out`` (disk full, I/O error) into one MoemergeError line."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise MoemergeError(f"could not write {out}: {err.strerror or err}{where}") from None
    except SafetensorError as err:
        raise MoemergeError(f"could not write {out}: {err}") from None


@contextmanager
def atomic_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error (see
    :func:`publish`); on any error or interruption it is removed and an old ``out`` stays as it was."""
    check_output(out, force)
    out = Path(out).resolve()
    with writing(out):
        clear_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=_anchor(out)))
        try:
            yield tmp
            publish(tmp, out, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Give the finished directory ``tmp`` the usual modes and rename it to ``out``.

    Without ``force`` an ``out`` that exists by now (a file or a non-empty folder: the rename refuses them
    atomically) is kept, and ``tmp`` removed with a MoemergeError. With ``force`` the old ``out`` is renamed
    aside, ``tmp`` renamed in (the old one renamed back if that fails), and only then the old one deleted."""
    _usual_modes(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            os.rename(tmp, out)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise _appeared(out, "this run's result was removed") from None
        return
    aside = None
    if os.path.lexists(out):
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
        try:
            os.rename(out, aside)  # onto the empty folder
        except BaseException:
            aside.rmdir()
            raise
    try:
        os.rename(tmp, out)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _appeared(out: Path, fate: str) -> MoemergeError:
    return MoemergeError(
        f"{out} appeared while this run worked (another run of the same --out?) and was left as it is; {fate}; "
        "pass --force to replace it"
    )


def _usual_modes(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask, throughout ``folder`` (mkdtemp and safetensors' atomic writes
    leave owner-only modes); symlinks are left alone."""
    umask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(obj, out: str | Path, force: bool = False) -> None:
    """Write ``obj`` as indented JSON to the file ``out`` atomically, creating its folder: a temporary beside it,
    renamed into place with ``force``, else linked, which refuses (MoemergeError) an ``out`` that exists by now."""
    out = Path(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(out)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out), dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
            os.chmod(tmp, 0o666 & ~_umask())
            if force:
                os.replace(tmp, out)
            else:
                try:
                    os.link(tmp, out)
                except FileExistsError:
                    raise _appeared(out, "nothing was written") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
