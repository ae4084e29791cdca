"""The scan document is the same before and after the pipeline refactor (and any later one): a bundled model
scanned with a fixed seed gives the recorded ``scan.json`` apart from ``timings`` and ``invocation`` (the paths as
given, which depend on where the scan ran).

The recordings in tests/data/golden were made by ``bdscan scan MODEL --budget smoke --steps 3 --precision fp32
--seed 0 -q --json FILE`` with one torch thread, before the scan moved from the CLI into ``bdscan.pipeline``, and
re-recorded with the same settings (the call below, one torch thread) when the schema became ``bdscan.scan/2``
(issue 24: p-value verdict); ``schema1_cifar10_cnn6_badnets.json`` keeps the schema-1 recording for the tests that
``bdscan report`` still reads old documents (tests/detect/test_verdict.py).
Floating-point kernels differ between CPU generations, so on a host whose vector unit (``cpu_capability``)
differs from the recording's, numbers are compared to a relative 1e-3 and embedded PNGs are not compared; on
the same kind of host the document must be identical. Re-record only when a change is meant to alter results.
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
        return [] if math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6) else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10_cnn6_badnets", "cifar10_vit_badnets"])
def test_scan_document_unchanged_for_a_bundled_model(name: str, tmp_path: Path) -> None:
    want = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    assert torch.get_num_threads() == 1  # as recorded (tests run on one thread)
    req = ScanRequest(model=ROOT / "sample_models" / f"{name}.safetensors",
                      settings=ScanSettings(budget="smoke", steps=3, precision="fp32", seed=0),
                      outputs=Outputs(json=tmp_path / "scan.json"))
    run_scan(req)
    got = json.loads((tmp_path / "scan.json").read_text(encoding="utf-8"))
    same_host = got["versions"]["cpu_capability"] == want["versions"]["cpu_capability"]
    for d in (want, got):
        d.pop("timings")
        d.pop("versions")  # software versions and the host: compared below where they matter
        d.pop("invocation", None)  # paths as given on the command line: they depend on where the scan ran
    # the data source is an absolute path on the recording machine
    assert Path(got["data"].pop("source")).name == Path(want["data"].pop("source")).name
    diffs = _compare(got, want, exact=same_host)
    assert not diffs, "\n".join(diffs[:20])
