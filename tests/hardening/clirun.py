"""Running bdscan's command line in-process (typer's CliRunner) or as the real console script, and the checks
every hardening test makes on what comes back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from bdscan.cli import app

#: the cheapest scan that still runs the whole pipeline (load, data, inversion, verdict, outputs)
TINY_SCAN = ["--budget", "smoke", "--steps", "2", "--levels", "pixel", "--no-activations"]


@dataclass
class Ran:
    code: int
    out: str  # stdout
    err: str  # stderr
    exception: BaseException | None  # an exception that escaped bdscan (CliRunner catches it), else None

    @property
    def text(self) -> str:
        return self.out + self.err


def bdscan(*args: str | Path) -> Ran:
    """``bdscan ARGS`` in-process; an exception escaping the command is kept, not raised."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return Ran(r.exit_code, r.stdout, r.stderr, exc)


def bdscan_process(*args: str | Path, timeout: float = 240) -> Ran:
    """``bdscan ARGS`` through the installed console script, in a fresh process (real stdout/stderr)."""
    exe = shutil.which("bdscan") or str(Path(sys.executable).parent / "bdscan")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    env.pop("BDSCAN_DEBUG", None)
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    return Ran(p.returncode, p.stdout, p.stderr, None)


def lines(s: str) -> list[str]:
    return [ln for ln in s.strip().splitlines() if ln.strip()]


def no_crash(r: Ran) -> None:
    """No exception escaped, no traceback was printed, no internal error (exit 4)."""
    assert r.exception is None, f"{type(r.exception).__name__}: {r.exception}"
    assert "Traceback" not in r.text, r.text
    assert r.code != 4, r.text
    assert "internal error" not in r.text, r.text


def one_line(r: Ran, code: int, label: str = "error") -> str:
    """Exit ``code`` with exactly one line on stderr, ``bdscan <label>: ...``, and nothing on stdout; returns it."""
    no_crash(r)
    assert r.code == code, (r.code, r.text)
    errs = lines(r.err)
    assert len(errs) == 1, r.err
    assert errs[0].startswith(f"bdscan {label}:"), r.err
    assert not r.out.strip(), r.out
    return errs[0]
