"""Full pickled models (``torch.save(model)``): loaded only with ``--trust-pickle`` after a clean scan.

Unpickling a full ``nn.Module`` imports and calls whatever the file names, so it *is* running code from
the file. bdscan does it only when both hold:

* the user said so with ``--trust-pickle`` (:attr:`LoadOptions.trust_pickle`), and
* the static scan (:func:`~bdscan.io.picklescan_io.scan_pickles`, picklescan plus bdscan's denylist)
  found no dangerous import and finished without error.

Then ``torch.load(weights_only=False)`` runs. The denylist is the only barrier on this path and a
denylist is never complete: ``--trust-pickle`` means "I trust where this file came from". Converting the
model once to safetensors, in a throw-away environment, removes the need::

    python -c "import torch; from safetensors.torch import save_file; \\
               m = torch.load('model.pt', weights_only=False); save_file(m.state_dict(), 'model.safetensors')"

The loader is never picked by sniffing: the ``state-dict`` loader hands such files over (or refuses
them), and ``--format pickle`` names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdscan.errors import ModelLoadError, UsageError
from bdscan.io.base import LoadedModel, LoadOptions, PickleScan, guarded, one_line, register_loader, sha256_file
from bdscan.io.build import TORCH_SUFFIXES, build_from_state, extract_state_dict
from bdscan.io.picklescan_io import refuse_if_unsafe, scan_pickles
from bdscan.io.selfdescribing import describe
from bdscan.models.grid import find_token_grid


def untrusted_pickle_error(path: Path, detail: str = "") -> UsageError:
    """The refusal for a pickle that holds Python objects, when ``--trust-pickle`` was not given."""
    what = f" (e.g. {one_line(detail, 80)})" if detail else ""
    return UsageError(
        f"{one_line(path.name)} is a full pickled model: it holds Python objects{what} besides tensors, "
        "and unpickling them can run code from the file",
        "convert it once to .safetensors in a throw-away environment (torch.load(..., weights_only=False), then "
        "safetensors.torch.save_file(model.state_dict(), ...)), or pass --trust-pickle if you trust its source",
    )


@register_loader
class PickleModuleLoader:
    """Loads a full pickled ``nn.Module`` (or a checkpoint with Python objects) under ``--trust-pickle``."""

    name = "pickle"
    suffixes = TORCH_SUFFIXES

    def sniff(self, path: Path, head: bytes) -> bool:
        return False  # reached through the state-dict loader or --format pickle only

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        return self.load_scanned(path, options, scan_pickles(path))

    def load_scanned(self, path: Path, options: LoadOptions, scan: PickleScan) -> LoadedModel:
        refuse_if_unsafe(path, scan, "a pickled model", "pickle")
        if not options.trust_pickle:
            raise untrusted_pickle_error(path)

        def _load() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(str(path), map_location="cpu", weights_only=False)

        obj = guarded("pickle", path, _load)
        if isinstance(obj, dict) and not options.arch:
            obj = next((v for v in obj.values() if isinstance(v, nn.Module)), obj)  # {"model": <nn.Module>, ...}
        if isinstance(obj, nn.Module):
            notes = ["loaded a full pickled model with --trust-pickle (its code ran during loading)"]
            arch = f"pickle:{type(obj).__name__}"
            wrapper = describe(obj.float(), "pickle", path, options, {}, notes, grid_fn=find_token_grid, arch=arch)
            return LoadedModel(wrapper, self.name, path, sha256_file(path), scan, None, notes)
        if isinstance(obj, dict):
            module = next((v for v in obj.values() if isinstance(v, nn.Module)), None)
            if module is not None:
                obj = module.state_dict()
            loaded = build_from_state(extract_state_dict(obj, path), path, options, self.name, scan)
            loaded.notes.append("loaded a pickled checkpoint with --trust-pickle")
            return loaded
        raise ModelLoadError(
            f"{one_line(path.name)} holds a {type(obj).__name__}, not a model or a state dict",
            "save the model (or its state_dict()) instead",
        )
