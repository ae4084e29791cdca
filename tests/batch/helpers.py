"""Test-only models and files for the batch tests.

:class:`DiesOnce` is how a test kills a Ray worker mid-task without any hook in bdscan: it is an ordinary
``nn.Module`` saved whole with ``torch.save`` (a "full pickled model"), which bdscan loads only with
``--trust-pickle`` after a clean static pickle scan (README, "Safe loading"): the one path on which a model's
own Python code runs, and so where a real model can crash its process. Its ``forward`` ends the worker process
with ``os._exit`` the first time it runs and leaves a marker file, so the retry (a new worker, which finds the
marker) scans normally. The marker's path is an attribute of the module, pickled with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class DiesOnce(nn.Module):
    """A classifier that kills its own process on its first forward (when ``marker`` does not exist yet)."""

    def __init__(self, inner: nn.Module, marker: str) -> None:
        super().__init__()
        self.inner = inner
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)  # what a segfaulting extension or the OOM killer does to a worker: no exception, no cleanup
        return self.inner(x)


def save_dies_once(wrapper_net: nn.Module, path: Path, marker: Path) -> Path:
    """``torch.save`` of a :class:`DiesOnce` around ``wrapper_net`` (a full pickled model)."""
    torch.save(DiesOnce(wrapper_net, str(marker)), path)
    return path


def corrupt_safetensors(path: Path) -> Path:
    """A .safetensors file whose header promises more bytes than the file has."""
    path.write_bytes((10_000).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')
    return path
