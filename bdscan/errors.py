"""The one exception family bdscan's domain code raises.

Only :mod:`bdscan.cli` turns these into messages and exit codes; library code raises them with a
message that says what went wrong *and what to do next* (fastapi-cli style: domain raises, CLI prints).
"""

from __future__ import annotations


class BdscanError(Exception):
    """Base of every error bdscan raises on purpose.

    Args:
        message: one line saying what went wrong.
        hint: one line saying what the user should do next (optional).
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(BdscanError):
    """The command line or configuration is wrong (bad option, missing data, output equal to input)."""


class NoSuspectError(UsageError):
    """A reversed trigger was asked for, but the scan named no suspected target (and no label was given)."""


class LoadError(BdscanError):
    """A model or data file cannot be loaded (corrupt, truncated, wrong shape, unknown architecture)."""


class ModelLoadError(LoadError):
    """The model file cannot be read or does not fit the stated architecture."""


class DataLoadError(LoadError):
    """The clean data cannot be read or does not fit the model (empty, wrong channels, bad labels)."""


class UnsafeModelError(BdscanError):
    """The static pickle scan found a dangerous import; the file was not (and will not be) unpickled.

    Attributes:
        findings: the scanner's findings as ``"module.name"`` strings.
        fmt: the file's format as the refusing loader read it (e.g. "state-dict", "torch-export").
        scanner: what found the problem (e.g. "picklescan 1.0.5 + bdscan deny-list").
    """

    def __init__(self, message: str, findings: list[str], hint: str | None = None, *, fmt: str = "pickle",
                 scanner: str = "picklescan") -> None:
        super().__init__(message, hint)
        self.findings = findings
        self.fmt = fmt
        self.scanner = scanner


class NumericalError(BdscanError):
    """The model produces NaN/inf or outputs of the wrong shape, so no scan result would mean anything."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, for one-line error reports.

    Third-party errors (parsers, exporters, runtimes) often carry pages of context after a useful first line.

    Args:
        e: the exception.
        limit: the most characters kept.

    Returns:
        the first line of ``str(e)`` (stripped, at most ``limit`` characters), or the exception's type name when
        its message is empty.
    """
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
