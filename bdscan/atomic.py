"""Writing outputs so that nothing is ever lost: temp file + rename, never over an input."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bdscan.errors import UsageError


def refuse_input_overwrite(out: Path, inputs: Iterable[Path | None]) -> None:
    """Raises :class:`UsageError` if ``out`` is (or resolves to) one of ``inputs``."""
    out_r = out.resolve()
    for p in inputs:
        if p is None:
            continue
        p = Path(p)
        if p.resolve() == out_r or (p.exists() and out.exists() and os.path.samefile(p, out)):
            raise UsageError(f"refusing to write {out}: it is an input of this command", "choose another output path")
        if p.is_dir() and out.exists() and p.resolve() in out_r.parents:  # e.g. --json clean/3/img.png
            raise UsageError(f"refusing to write {out}: it is part of the input folder {p}", "choose another output path")


def check_output_path(out: Path, folder: bool = False) -> None:
    """Raises :class:`UsageError` now, not after a long scan, when ``out`` (a file, or a folder) cannot be written."""
    out = Path(out)
    kind = "folder" if folder else "file"
    if out.exists() and out.is_dir() != folder:
        raise UsageError(f"cannot write {out}: it is {'a file' if folder else 'a folder'}", f"give a {kind} path")
    parent = out if folder and out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: {parent} is a file, not a folder", f"give a {kind} path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: no permission to write in {parent}", "choose a writable output path")
    # permission bits do not tell everything (root, read-only mounts, /proc): create and remove a file there
    try:
        fd, probe = tempfile.mkstemp(prefix=".bdscan-probe.", dir=parent)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e} in {parent}", "choose a writable output path") from e
    os.close(fd)
    os.unlink(probe)


def check_outputs(outputs: Iterable[Path | None], inputs: Iterable[Path | None], folders: Iterable[Path] = ()) -> None:
    """Checks every given output before any work: it is not an input (:func:`refuse_input_overwrite`) and it can be
    written (:func:`check_output_path`; the paths in ``folders`` are checked as folders). ``None`` entries are skipped.

    Raises:
        UsageError: the first output that fails either check.
    """
    ins, dirs = list(inputs), set(folders)
    for o in outputs:
        if o is not None:
            refuse_input_overwrite(o, ins)
            check_output_path(o, folder=o in dirs)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it over ``path``, on error removes it.

    The rename is atomic on POSIX, so readers (and a Ctrl-C) see either the old file or the whole new one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a folder that is a file, no permission, read-only file system: the user's to fix
        raise UsageError(f"cannot write {path}: {e.strerror or e}", "choose a writable output path") from e
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        os.chmod(tmp_p, _mode_for(path))  # mkstemp makes 0600; the output gets the mode open() would give it
        yield tmp_p
        try:
            os.replace(tmp_p, path)
        except IsADirectoryError as e:
            raise UsageError(f"cannot write {path}: it is a folder", "choose a file path") from e
    except BaseException:  # KeyboardInterrupt too: leave no half-written file
        if tmp_p.is_dir():  # a folder writer (a model folder) replaced the temp file with a folder
            shutil.rmtree(tmp_p, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise


def _mode_for(path: Path) -> int:
    """An existing file's permission bits, else 0666 less the umask (what ``open(path, "w")`` gives)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp_path)`` and renames the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
