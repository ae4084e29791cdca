"""Which layer the guard watches, and reading one feature vector per image from it.

The guard watches one layer of ``wrapper.net`` (the raw network, which takes normalised input):

* ``penultimate``: the input of the final classification layer, found exactly as pruning finds it
  (:func:`bdscan.repair.find_classifier`: timm's ``get_classifier()``, else the last ``nn.Linear`` with one
  output per class). A model with several heads of the same width (DeiT's class and distillation heads) gives
  the heads' inputs side by side. This is the layer Neural Cleanse's input filter watches (Wang et al. 2019,
  section VI-A: "the second to last layer").
  This is the default for every model. For a transformer it is what its pooling hands the head: the class
  token of a ViT or ConViT, the class and distillation tokens of a DeiT, the attention-pooled sequence of a CCT
  (and the token average of a model that pools by averaging).
* ``tokens``: for a transformer, the last token sequence (N, T, D) of the classifier's width computed before
  the classifier runs (the final norm of a ViT, DeiT, ConViT or CCT), **averaged over its tokens**. It is
  not the default: on the lab zoo's transformers and on the tests' tiny ViT it flagged fewer triggered
  inputs at the same false-positive rate than ``penultimate`` (benchmarks/README.md, "Input guard"): a small
  trigger moves the few tokens it covers, and the average over all tokens dilutes that, while the class token
  has already gathered it.
* any module name of ``wrapper.net`` (``bdscan inspect`` does not list them; ``dict(net.named_modules())``
  does): that module's output.

Whatever the layer, a feature vector is one row per image: an output (N, D) is taken as it is, a token
sequence (N, T, D) is averaged over its T tokens, a convolutional map (N, C, H, W) over its H×W positions
(one neuron per channel, as global average pooling would give).

Features are read with forward hooks, so the network runs unchanged and its logits are exactly the model's;
the same hooks run inside the exported guard (:mod:`bdscan.guard.export`), which is traced with them.
TorchScript modules take no Python hooks: a guard needs a model loaded from safetensors, a state dict, ONNX or
``.pt2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdscan.errors import UsageError
from bdscan.models.wrapper import ModelWrapper
from bdscan.repair import find_classifier

#: the layer choices besides a module name (the first is the default)
LAYERS = ("penultimate", "tokens")


@dataclass(frozen=True)
class FeatureLayer:
    """The layer a guard watches.

    Attributes:
        kind: "penultimate", "tokens" or "module".
        modules: names (in ``net.named_modules()``) of the hooked modules: the classification head(s) for
            ``penultimate`` (their *input* is read), else the one module whose *output* is read.
        width: features per image after the reduction (D, or C for a convolutional map).
        reduce: how one hooked tensor becomes (N, width): "none" (N, D), "tokens" (mean over dim 1 of
            (N, T, D)) or "spatial" (mean over H, W of (N, C, H, W)).
    """

    kind: str
    modules: tuple[str, ...]
    width: int
    reduce: str

    @property
    def reads_input(self) -> bool:
        return self.kind == "penultimate"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "modules": list(self.modules), "width": self.width, "reduce": self.reduce}


def reduce_features(a: torch.Tensor, how: str) -> torch.Tensor:
    """One hooked tensor -> (N, features) (see :class:`FeatureLayer`)."""
    if how == "tokens":
        return a.mean(dim=1)
    if how == "spatial":
        return a.mean(dim=(2, 3))
    return a.reshape(a.shape[0], -1).clone()  # a copy: a later in-place op (ReLU) must not change what was read


def _reduction(shape: tuple[int, ...], name: str) -> tuple[str, int]:
    if len(shape) == 2:
        return "none", shape[1]
    if len(shape) == 3:
        return "tokens", shape[2]
    if len(shape) == 4:
        return "spatial", shape[1]
    raise UsageError(f"layer {name!r} gives a tensor of shape {tuple(shape)} per batch, not (N, D), (N, T, D) or (N, C, H, W)",
                     "choose another --layer")


def _no_hooks() -> UsageError:
    return UsageError("cannot observe this model's layers (a TorchScript module takes no hooks), so it cannot be guarded",
                      "load the model from safetensors, a state dict, ONNX or .pt2")


def _names(net: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in net.named_modules()}


def _device(wrapper: ModelWrapper) -> torch.device:
    return next(wrapper.parameters(), torch.empty(0)).device


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


@torch.no_grad()
def _probe(wrapper: ModelWrapper, heads: list[nn.Module]) -> tuple[list[tuple[int, ...]], list[tuple[str, tuple[int, ...]]]]:
    """One forward on a grey image: the heads' input shapes, and every module output computed before the first
    head ran, as (name, shape) in completion order."""
    names = _names(wrapper.net)
    head_shapes: list[tuple[int, ...]] = []
    before: list[tuple[str, tuple[int, ...]]] = []

    def pre(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        head_shapes.append(tuple(inputs[0].shape))

    def post(m: nn.Module, _inp: Any, out: Any) -> None:
        out = _first(out)
        if not head_shapes and isinstance(out, torch.Tensor) and m is not wrapper.net:
            before.append((names.get(id(m), ""), tuple(out.shape)))

    handles = []
    try:
        handles = [h.register_forward_pre_hook(pre) for h in heads]
        handles += [m.register_forward_hook(post) for m in wrapper.net.modules()]
    except Exception as e:  # TorchScript modules take no Python hooks
        for h in handles:
            h.remove()
        raise _no_hooks() from e
    wrapper.eval()
    try:
        wrapper(torch.full((2, *wrapper.input_size), 0.5, device=_device(wrapper)))
    finally:
        for h in handles:
            h.remove()
    return head_shapes, before


def resolve_layer(wrapper: ModelWrapper, layer: str = "penultimate") -> FeatureLayer:
    """The :class:`FeatureLayer` named by ``layer`` (see the module docstring).

    Raises:
        UsageError: no classification layer, no token sequence (``tokens`` on a CNN), an unknown module name,
            or a model whose layers cannot be observed (TorchScript).
    """
    net = wrapper.net
    if isinstance(net, torch.jit.ScriptModule):
        raise _no_hooks()
    if layer not in LAYERS:
        mods = dict(net.named_modules())
        if layer not in mods or layer == "":
            some = [n for n in mods if n][-6:]
            raise UsageError(f"--layer {layer!r} is neither {', '.join(LAYERS)} nor a module of this model",
                             f"e.g. one of: {', '.join(some)}")
        shapes: list[tuple[int, ...]] = []
        try:
            h = mods[layer].register_forward_hook(lambda _m, _i, o: shapes.append(tuple(_first(o).shape)))
        except Exception as e:  # TorchScript modules take no Python hooks
            raise _no_hooks() from e
        try:
            with torch.no_grad():
                wrapper.eval()
                wrapper(torch.full((2, *wrapper.input_size), 0.5, device=_device(wrapper)))
        finally:
            h.remove()
        if not shapes:
            raise UsageError(f"module {layer!r} does not run in the model's forward pass", "choose another --layer")
        how, width = _reduction(shapes[0], layer)
        return FeatureLayer("module", (layer,), width, how)
    try:
        heads = find_classifier(net, wrapper.num_classes)
    except UsageError as e:
        raise UsageError(f"cannot find the final nn.Linear classification layer of this {type(net).__name__} model, so its "
                         "penultimate layer is unknown", "name the layer to watch with --layer MODULE") from e
    head_shapes, before = _probe(wrapper, heads)
    if not head_shapes:
        raise UsageError("the classification layer was never called, so its input cannot be watched", "choose a --layer by module name")
    names = _names(net)
    if layer == "tokens":
        found = _token_module(before, heads[0].in_features)
        if found is None:
            raise UsageError("this model computes no token sequence (N, T, D) before its classifier",
                             "use --layer penultimate (a CNN has no tokens)")
        return FeatureLayer("tokens", (found,), heads[0].in_features, "tokens")
    hows = {_reduction(s, "the classifier's input") for s in head_shapes[: len(heads)]}
    if len(hows) != 1:
        raise UsageError("the classification heads read inputs of different shapes", "choose a --layer by module name")
    how, width = hows.pop()
    return FeatureLayer("penultimate", tuple(names[id(h)] for h in heads), width * len(heads), how)


def _token_module(before: list[tuple[str, tuple[int, ...]]], width: int) -> str | None:
    """The last module whose output is a token sequence (N, T, ``width``), among those run before the head."""
    for name, shape in reversed(before):
        if name and len(shape) == 3 and shape[-1] == width and shape[1] > 1:
            return name
    return None


class FeatureTap:
    """Forward hooks on ``net`` that collect the features of :class:`FeatureLayer` ``layer`` on every forward.

    After each forward of ``net``, :meth:`take` returns (N, width) and empties the buffer. Used both to read
    features from a model (:func:`features`) and inside the exported guard, where the hooks are traced into
    the graph.
    """

    def __init__(self, net: nn.Module, layer: FeatureLayer) -> None:
        self.layer = layer
        self.buf: list[torch.Tensor] = []
        mods = dict(net.named_modules())
        missing = [m for m in layer.modules if m not in mods]
        if missing:
            raise UsageError(f"the model has no module {missing[0]!r} (the guard's layer)", "build the guard from this model")
        self.handles: list[Any] = []
        try:
            for name in layer.modules:
                if layer.reads_input:
                    self.handles.append(mods[name].register_forward_pre_hook(self._pre))
                else:
                    self.handles.append(mods[name].register_forward_hook(self._post))
        except Exception as e:
            self.close()
            raise _no_hooks() from e

    def _pre(self, _m: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.buf.append(reduce_features(inputs[0], self.layer.reduce))

    def _post(self, _m: nn.Module, _inp: Any, out: Any) -> None:
        self.buf.append(reduce_features(_first(out), self.layer.reduce))

    def take(self) -> torch.Tensor:
        """The features of the last forward (N, width); raises when the layer did not run."""
        if not self.buf:
            raise UsageError("the guard's layer did not run in the forward pass", "choose another --layer")
        n = len(self.layer.modules)
        got, self.buf = self.buf[:n], []
        return got[0] if n == 1 else torch.cat(got, dim=1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextmanager
def tapped(net: nn.Module, layer: FeatureLayer) -> Iterator[FeatureTap]:
    tap = FeatureTap(net, layer)
    try:
        yield tap
    finally:
        tap.close()


@torch.no_grad()
def features(wrapper: ModelWrapper, layer: FeatureLayer, x: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, width) and logits (N, classes) of images ``x`` (N, C, H, W) in [0, 1], in eval mode, batched."""
    wrapper.eval()
    dev = _device(wrapper)
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    with tapped(wrapper.net, layer) as tap:
        for i in range(0, len(x), batch_size):
            out = wrapper(x[i : i + batch_size].to(dev))
            feats.append(tap.take().float().cpu())
            logits.append(out.float().cpu())
    width = layer.width
    if not feats:
        return torch.empty(0, width), torch.empty(0, wrapper.num_classes)
    return torch.cat(feats), torch.cat(logits)
