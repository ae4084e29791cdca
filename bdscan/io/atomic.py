"""Writing outputs so that nothing is ever lost: temp file + rename, never over an input."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it over ``path``, on error removes it.

    The rename is atomic on POSIX, so readers (and a Ctrl-C) see either the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        os.replace(tmp_p, path)
    except BaseException:  # KeyboardInterrupt too: leave no half-written file
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Calls ``writer(tmp_path)`` and renames the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
