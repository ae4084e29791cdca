"""The scan document is the same before and after the pipeline refactor (and any later one): a bundled model
scanned with a fixed seed gives the recorded ``scan.json`` apart from ``timings`` and ``invocation`` (the paths as
given, which depend on where the scan ran).

The recordings in tests/data/golden were made by ``bdscan scan MODEL --budget smoke --steps 3 --precision fp32
--seed 0 -q --json FILE`` with one torch thread, before the scan moved from the CLI into ``bdscan.pipeline``, and
re-recorded with the same settings (the call below, one torch thread) when the schema became ``bdscan.scan/2``
(issue 24: p-value verdict) and ``bdscan.scan/3`` (neuron noise a default detector, weighted verdict: the AVX-512/AMX
documents natively, the other two emulated); ``schema1_cifar10_cnn6_badnets.json`` keeps the schema-1 recording for the tests that
``bdscan report`` still reads old documents (tests/detect/test_verdict.py).
Floating-point kernels differ between CPU generations, so there is one recording per kind of host the project's
CI runs on (``versions.cpu_capability``, with ``-AMX`` where the CPU has AMX tiles, for which oneDNN picks other
float32 kernels: ``NAME.json`` was made on the AVX2 host, ``NAME.AVX512.json`` on an AVX-512 host without AMX, and
``NAME.AVX512-AMX.json`` on one with it), and the document must be identical to the recording of its own kind of host. On any other host,
numbers are compared to a relative 1e-2 (derived statistics such as the anomaly index amplify a last-digit
difference in the sizes: 1.1e-3 between the two hosts) and embedded PNGs are not compared. Re-record both
(``python tests/test_pipeline_golden.py``, once on each host) only when a change is meant to alter results.

A session on one kind of host can re-record another kind's documents by emulating its kernels
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python tests/test_pipeline_golden.py --as AVX2``; for the AVX-512
host ``ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 ... --as AVX512``). Emulation matches the real
host to about 1e-6, not bit for bit, so such a recording says so (``versions.emulated``) and is compared to the relative
1e-2, until a session on that host re-records it natively.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bdscan.detect import ScanSettings
from bdscan.pipeline import Outputs, ScanRequest, run_scan

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "data" / "golden"


def _compare(a: Any, b: Any, exact: bool, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))} differ"]
        return [d for k in a for d in _compare(a[k], b[k], exact, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _compare(x, y, exact, f"{path}[{i}]")]
    if exact:
        return [] if a == b else [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, str) and isinstance(b, str) and a.startswith("data:image/"):
        return []
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-6) else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


NAMES = ("cifar10_cnn6_badnets", "cifar10_vit_badnets")


def _host_kind(capability: str) -> str:
    """The kind of host a recording belongs to: torch's CPU capability, with ``-AMX`` where the CPU has AMX tiles."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""
    return f"{capability}-AMX" if " amx_tile" in flags else capability


def _golden(name: str, capability: str) -> tuple[dict[str, Any], bool]:
    """The recording made on this kind of host (and True, unless it was made by emulating this host's kernels) when
    there is one, else the nearest other (and False): the same capability's without AMX, else the AVX2 host's."""
    kind = _host_kind(capability)
    own = GOLDEN / (f"{name}.json" if kind == "AVX2" else f"{name}.{kind}.json")
    if own.is_file():
        doc = json.loads(own.read_text(encoding="utf-8"))
        return doc, not (doc.get("versions") or {}).get("emulated")
    near = GOLDEN / f"{name}.{capability}.json"
    return json.loads((near if near.is_file() else GOLDEN / f"{name}.json").read_text(encoding="utf-8")), False


def _record(name: str, out: Path) -> dict[str, Any]:
    """Scans a bundled model exactly as the recordings were made; returns the scan document."""
    req = ScanRequest(model=ROOT / "benchmarks" / "lab_zoo" / f"{name}.safetensors",
                      settings=ScanSettings(budget="smoke", steps=3, precision="fp32", seed=0, levels=("pixel", "patch")),
                      outputs=Outputs(json=out))
    run_scan(req)
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_scan_document_unchanged_for_a_bundled_model(name: str, tmp_path: Path) -> None:
    assert torch.get_num_threads() == 1  # as recorded (tests run on one thread)
    got = _record(name, tmp_path / "scan.json")
    want, same_host = _golden(name, got["versions"]["cpu_capability"])
    for d in (want, got):
        d.pop("timings")
        d.pop("versions")  # software versions and the host: compared below where they matter
        d.pop("invocation", None)  # paths as given on the command line: they depend on where the scan ran
    # the data source is an absolute path on the recording machine
    assert Path(got["data"].pop("source")).name == Path(want["data"].pop("source")).name
    diffs = _compare(got, want, exact=same_host)
    assert not diffs, "\n".join(diffs[:20])


if __name__ == "__main__":  # re-records this host's documents (one torch thread, as the tests run)
    import os
    import sys

    torch.set_num_threads(1)
    # --as KIND: another kind of host's documents, its kernels emulated (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
    as_kind = sys.argv[sys.argv.index("--as") + 1] if "--as" in sys.argv else None
    for n in NAMES:
        tmp = GOLDEN / f".{n}.tmp.json"
        doc = _record(n, tmp)
        kind = as_kind or _host_kind(doc["versions"]["cpu_capability"])
        if as_kind:
            env = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
            doc["versions"]["emulated"] = " ".join(f"{k}={v}" for k, v in env.items())
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        dest = GOLDEN / (f"{n}.json" if kind == "AVX2" else f"{n}.{kind}.json")
        tmp.replace(dest)
        print(f"recorded {dest.relative_to(ROOT)}")
