"""The machine a scan runs on: the one place bdscan describes it.

Reports, study results, zoo rows and benchmarks record what a run's speed and precision depend on (software
versions, torch threads, the CPU's vector features). Callers use the functions through this module
(``machine.cpu_has_native_bf16()``), so a test that patches one of them here changes what every caller sees.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch

import bdscan


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions oneDNN uses (AVX512-BF16 or AMX).

    Without them bf16 is emulated and slower than float32, so ``--precision auto`` never picks it there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Sets torch's intra-op threads to ``n`` (at least 1) for the duration, a process-wide setting restored after;
    None leaves them as they are."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def versions() -> dict[str, str]:
    """Software versions and the CPU features a scan's speed and precision depend on (every report's ``versions``)."""
    import timm  # here: timm's import is slow and only reports need it

    return {"bdscan": bdscan.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_threads": str(torch.get_num_threads()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": "native" if cpu_has_native_bf16() else "emulated"}


def info() -> dict[str, object]:
    """The host in structured form (study results, benchmark outputs)."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_has_native_bf16(),
            "cuda": torch.cuda.is_available()}


def describe() -> str:
    """One line for logs and tables, e.g. ``x86_64 2-core CPU (AVX2, bf16 emulated), torch 2.14.1, 2 thread(s)``."""
    bf16 = "native" if cpu_has_native_bf16() else "emulated"
    return (f"{platform.machine()} {os.cpu_count()}-core CPU ({torch.backends.cpu.get_cpu_capability()}, bf16 {bf16}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
