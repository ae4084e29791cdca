"""What a trigger does to a model's neurons (research paper, section 5.1 and 5.2).

**What a neuron is.** The paper "considered outputs of all Linear and Conv2D layer neurons". We attach a
forward hook to every ``nn.Conv2d`` and ``nn.Linear`` of ``wrapper.net`` (in ``named_modules()`` order,
which fixes the order of the flattened ranking) and call each *element* of a hooked layer's output for
one image a neuron: a conv layer with output (C, H, W) has C·H·W neurons (one channel at one spatial
position), a Linear applied to tokens (T, D) has T·D, a classifier head has ``num_classes``. A neuron's
activation is the layer's raw output (before any BatchNorm or ReLU that follows it), averaged over the
images. With this definition a 6-layer CNN on 32 px images has about 10^5 neurons, the scale at which the
paper reports precision@k for k up to 100,000. A module that runs more than once in one forward pass
(shared weights) is counted at its first call.

**Activated by a trigger** (section 5.1). A neuron is activated when its mean activation on the stamped
images exceeds its mean activation on the same clean images by more than ``threshold × M``, where ``M``
is the largest absolute activation of the neuron's layer on the clean images (any image, any neuron of
that layer). That is the paper's "small percentage of the maximum possible activation value", taken per
layer because layers' scales differ by orders of magnitude. The default threshold is 0.1 (10 % of the
layer's clean maximum); the paper suggests values such as 1 % or 5 %, which count many more neurons whose
activation only drifts a little.

**Ranking** (section 5.2). Neurons of all hooked layers together, ordered by that increase (mean on stamped
minus mean on clean images), largest first. Two rankings are compared by precision@k: the share of the
top-k neurons of one ranking that are also in the top k of the other.

**Memory.** Images go through the model in batches; each hook immediately adds its batch's outputs to a
per-layer running sum, so what is kept is O(neurons) (one float64 sum per neuron) whatever the number of
images; the layer outputs of a batch are never stored.

This module is an algorithm: it takes a model wrapper, images and triggers, returns dataclasses (or, for
:func:`activations_section`, the JSON-able dict a scan document stores under ``"activations"``) and never
prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bdscan.data import CleanData
from bdscan.jsonnum import json_number
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

if TYPE_CHECKING:  # pragma: no cover - typing only
    from bdscan.detect.inversion import LabelResult
    from bdscan.detect.scan import ScanFindings

#: default share of a layer's largest clean activation that a neuron's mean must rise by to count as activated
DEFAULT_THRESHOLD = 0.1
#: default cap on the images pushed through the model (clean and stamped each)
DEFAULT_MAX_IMAGES = 256
#: the k of the paper's precision@k tables (tables 7-9)
PAPER_KS = (10, 100, 1000, 10000, 50000, 100000)
HOOKED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One hooked layer: its module name, type and the per-image shape of its output."""

    name: str
    type: str
    shape: tuple[int, ...]

    @property
    def neurons(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ActivationProfile:
    """Mean activation of every hooked neuron over a set of images.

    Attributes:
        layers: the hooked layers that ran, in ``named_modules()`` order.
        means: per layer, the flattened mean activation (neurons,) float32.
        max_abs: per layer, the largest absolute activation seen (any image, any neuron).
        images: how many images were averaged.
    """

    layers: tuple[LayerInfo, ...]
    means: tuple[torch.Tensor, ...]
    max_abs: tuple[float, ...]
    images: int

    @property
    def neurons(self) -> int:
        return sum(layer.neurons for layer in self.layers)

    def flat(self) -> torch.Tensor:
        """All layers' means, concatenated in layer order (neurons,)."""
        return torch.cat(list(self.means)) if self.means else torch.empty(0)


@dataclass(frozen=True)
class LayerStats:
    """How one layer reacts to a trigger.

    Attributes:
        name: module name inside ``wrapper.net``.
        type: "Conv2d" or "Linear".
        shape: per-image output shape.
        neurons: number of neurons (elements of that shape).
        activated: neurons whose mean activation rose by more than the threshold.
        fraction: activated / neurons.
        max_abs_clean: the layer's largest absolute clean activation (the threshold's reference).
        mean_increase: mean over the layer's neurons of the increase.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    neurons: int
    activated: int
    fraction: float
    max_abs_clean: float
    mean_increase: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "shape": list(self.shape), "neurons": self.neurons,
                "activated": self.activated, "fraction": json_number(self.fraction), "max_abs_clean": json_number(self.max_abs_clean),
                "mean_increase": json_number(self.mean_increase)}


@dataclass(frozen=True)
class NeuronIncrease:
    """One neuron and how much a trigger raised its mean activation.

    Attributes:
        layer: module name.
        type: "Conv2d" or "Linear".
        index: flat index of the neuron within its layer's per-image output.
        position: the same index unravelled over the layer's output shape (e.g. (channel, row, col)).
        clean: mean activation on clean images.
        triggered: mean activation on stamped images.
        increase: triggered - clean.
        relative: increase / the layer's largest absolute clean activation.
    """

    layer: str
    type: str
    index: int
    position: tuple[int, ...]
    clean: float
    triggered: float
    increase: float
    relative: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.type, "index": self.index, "position": list(self.position),
                "clean": json_number(self.clean), "triggered": json_number(self.triggered), "increase": json_number(self.increase),
                "relative": json_number(self.relative)}


@dataclass(frozen=True)
class ActivationStats:
    """The neurons a trigger activates (paper, section 5.1).

    Attributes:
        trigger: the trigger's kind ("badnets", "reversed-pixel", ...).
        target: the trigger's target class, if known.
        threshold: share of each layer's largest clean activation a neuron's mean must rise by.
        images: images averaged (clean and stamped alike).
        neurons: hooked neurons in all.
        activated: activated neurons in all.
        fraction: activated / neurons.
        layers: per-layer figures, in layer order.
        top: the neurons with the largest increase, largest first.
    """

    trigger: str
    target: int | None
    threshold: float
    images: int
    neurons: int
    activated: int
    fraction: float
    layers: tuple[LayerStats, ...]
    top: tuple[NeuronIncrease, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "target": self.target, "threshold": self.threshold, "images": self.images,
                "neurons": self.neurons, "activated": self.activated, "fraction": json_number(self.fraction),
                "layers": [layer.to_dict() for layer in self.layers], "top": [n.to_dict() for n in self.top]}


class PrecisionAtK(dict[int, float]):
    """``k -> precision@k``, a plain dict, plus how each k was capped.

    Attributes:
        k_used: requested k -> the k actually used, ``min(k, neurons)`` (a model with fewer neurons than k
            can only be compared on all of them, which makes precision 1 by construction at ``k_used == neurons``).
        neurons: number of neurons ranked.
    """

    def __init__(self, values: dict[int, float], k_used: dict[int, int], neurons: int) -> None:
        super().__init__(values)
        self.k_used = dict(k_used)
        self.neurons = neurons

    @property
    def capped(self) -> tuple[int, ...]:
        """The requested k that exceeded the neuron count."""
        return tuple(k for k, u in self.k_used.items() if u < k)

    def to_list(self) -> list[dict[str, Any]]:
        return [{"k": k, "k_used": self.k_used[k], "capped": self.k_used[k] < k, "precision": json_number(v)}
                for k, v in self.items()]


def hooked_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` of ``net``, in ``named_modules()`` order (shared modules once)."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, HOOKED_TYPES)]


def _device(wrapper: ModelWrapper) -> torch.device:
    p = next(wrapper.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Recorder:
    """Forward hooks that add each batch's layer outputs to per-layer float64 sums (O(neurons) memory)."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.max_abs: dict[str, float] = {}
        self.order: list[str] = []
        self.seen: set[str] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        try:
            for name, m in self.layers:
                self.handles.append(m.register_forward_hook(self._hook(name, type(m).__name__)))
        except Exception as e:  # e.g. TorchScript modules take no Python hooks
            self.close()
            raise ValueError(f"cannot attach forward hooks to this model ({type(e).__name__}: {e})") from e
        self.types = {name: type(m).__name__ for name, m in self.layers}
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str, _type: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or name in self.seen:
                return
            self.seen.add(name)
            o = out.detach()
            shape = tuple(o.shape[1:])
            if name not in self.sums:
                self.sums[name] = torch.zeros(max(1, o[0].numel()), dtype=torch.float64, device=o.device)
                self.shapes[name] = shape
                self.max_abs[name] = 0.0
                self.order.append(name)
            elif self.shapes[name] != shape:
                return  # a later batch of a different shape cannot happen with fixed-size images; ignore it
            self.sums[name] += o.reshape(o.shape[0], -1).sum(0, dtype=torch.float64)
            self.max_abs[name] = max(self.max_abs[name], float(o.abs().max()) if o.numel() else 0.0)

        return hook

    def new_batch(self) -> None:
        self.seen = set()


def _take(x: torch.Tensor, max_images: int | None) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("no images to measure activations on")
    return x if max_images is None else x[:max_images]


@torch.no_grad()
def activation_profile(wrapper: ModelWrapper, x: torch.Tensor, trigger: Trigger | None = None,
                       max_images: int | None = DEFAULT_MAX_IMAGES, batch_size: int = 64) -> ActivationProfile:
    """Mean activation of every hooked neuron over ``x`` (stamped with ``trigger`` when given).

    Args:
        wrapper: the model.
        x: images (N, C, H, W) in [0, 1]; the first ``max_images`` are used.
        trigger: stamped onto every image first, if given.
        max_images: cap on N (None: all).
        batch_size: images per forward pass.

    Raises:
        ValueError: no images, or the model has no hookable Conv2d/Linear layer.
    """
    x = _take(x, max_images)
    layers = hooked_layers(wrapper.net)
    if not layers:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to hook (activation statistics need them)")
    dev = _device(wrapper)
    was_training = wrapper.training
    wrapper.eval()
    try:
        with _Recorder(layers) as rec:
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(dev)
                if trigger is not None:
                    xb = trigger.stamp(xb).clamp(0, 1)
                rec.new_batch()
                wrapper(xb)
    finally:
        wrapper.train(was_training)
    if not rec.order:
        raise ValueError("no Conv2d or Linear layer ran in the forward pass (cannot measure activations)")
    n = len(x)
    infos = tuple(LayerInfo(name, rec.types[name], rec.shapes[name]) for name in rec.order)
    means = tuple((rec.sums[name] / n).float().cpu() for name in rec.order)
    return ActivationProfile(infos, means, tuple(rec.max_abs[name] for name in rec.order), n)


def _check_same(clean: ActivationProfile, trig: ActivationProfile) -> None:
    if [layer.name for layer in clean.layers] != [layer.name for layer in trig.layers] or clean.images != trig.images:
        raise ValueError("clean and triggered activation profiles come from different models or image sets")


def compare_profiles(clean: ActivationProfile, triggered: ActivationProfile, trigger: Trigger,
                     threshold: float = DEFAULT_THRESHOLD, top_k: int = 10) -> tuple[ActivationStats, torch.Tensor]:
    """Statistics and the flattened increases (the ranking) from two profiles over the same images."""
    _check_same(clean, triggered)
    per_layer: list[LayerStats] = []
    incs = []
    for info, c, t, m in zip(clean.layers, clean.means, triggered.means, clean.max_abs, strict=True):
        inc = torch.nan_to_num(t - c, nan=float("-inf"))
        incs.append(inc)
        activated = int((inc > threshold * m).sum()) if m > 0 else int((inc > 0).sum())
        finite = inc[torch.isfinite(inc)]
        per_layer.append(LayerStats(info.name, info.type, info.shape, info.neurons, activated,
                                    activated / max(1, info.neurons), m,
                                    float(finite.mean()) if finite.numel() else 0.0))
    ranking = torch.cat(incs)
    total = int(ranking.numel())
    activated = sum(s.activated for s in per_layer)
    top = _top_neurons(clean, triggered, ranking, top_k)
    stats = ActivationStats(trigger.kind, trigger.target, threshold, clean.images, total, activated,
                            activated / max(1, total), tuple(per_layer), top)
    return stats, ranking


def _top_neurons(clean: ActivationProfile, triggered: ActivationProfile, ranking: torch.Tensor,
                 k: int) -> tuple[NeuronIncrease, ...]:
    if k <= 0 or ranking.numel() == 0:
        return ()
    order = _order(ranking)[:k]
    starts = []
    s = 0
    for info in clean.layers:
        starts.append(s)
        s += info.neurons
    out = []
    for flat in order.tolist():
        li = max(i for i, st in enumerate(starts) if st <= flat)
        info = clean.layers[li]
        idx = flat - starts[li]
        pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(idx), info.shape)) if info.shape else (idx,)
        c = float(clean.means[li][idx])
        t = float(triggered.means[li][idx])
        m = clean.max_abs[li]
        out.append(NeuronIncrease(info.name, info.type, idx, pos, c, t, t - c, (t - c) / m if m > 0 else 0.0))
    return tuple(out)


def activation_stats(wrapper: ModelWrapper, x: torch.Tensor, trigger: Trigger, threshold: float = DEFAULT_THRESHOLD,
                     max_images: int | None = DEFAULT_MAX_IMAGES, top_k: int = 10, batch_size: int = 64,
                     clean: ActivationProfile | None = None) -> ActivationStats:
    """Mean activation of every hooked neuron on clean ``x`` versus ``trigger.stamp(x)`` (paper, section 5.1).

    Args:
        wrapper: the model.
        x: images (N, C, H, W) in [0, 1].
        trigger: the trigger to stamp.
        threshold: a neuron is activated when its mean rises by more than ``threshold`` × its layer's largest
            absolute clean activation (see the module docstring).
        max_images: use the first ``max_images`` images (None: all).
        top_k: how many most-increased neurons to list.
        batch_size: images per forward pass.
        clean: a precomputed clean profile of the same images (saves one pass when comparing several triggers).

    Returns:
        :class:`ActivationStats`.
    """
    clean = clean or activation_profile(wrapper, x, None, max_images, batch_size)
    trig = activation_profile(wrapper, x, trigger, max_images, batch_size)
    return compare_profiles(clean, trig, trigger, threshold, top_k)[0]


def neuron_ranking(wrapper: ModelWrapper, x: torch.Tensor, trigger: Trigger, max_images: int | None = DEFAULT_MAX_IMAGES,
                   batch_size: int = 64, clean: ActivationProfile | None = None) -> torch.Tensor:
    """Increase of every hooked neuron's mean activation when ``trigger`` is stamped (paper, section 5.2).

    Returns:
        (neurons,) float32, layers in ``named_modules()`` order and each layer's output flattened, so two
        rankings of the same model and images line up element by element. Higher = more important.
    """
    clean = clean or activation_profile(wrapper, x, None, max_images, batch_size)
    trig = activation_profile(wrapper, x, trigger, max_images, batch_size)
    return compare_profiles(clean, trig, trigger, DEFAULT_THRESHOLD, 0)[1]


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; ties keep index order (deterministic)."""
    s = torch.nan_to_num(scores.detach().float().cpu(), nan=float("-inf"))
    return torch.argsort(s, descending=True, stable=True)


def precision_at_k(rank_a: torch.Tensor, rank_b: torch.Tensor, ks: Iterable[int] = PAPER_KS) -> PrecisionAtK:
    """Overlap of the top-k neurons of two rankings, divided by k (paper, section 5.2, tables 7-9).

    Args:
        rank_a: per-neuron scores (e.g. :func:`neuron_ranking` of the original trigger), higher = more important.
        rank_b: the same neurons' scores under another trigger (e.g. the reversed one).
        ks: the k to evaluate; each is capped at the number of neurons (see :class:`PrecisionAtK`).

    Returns:
        :class:`PrecisionAtK`: ``{k: |top_k(a) ∩ top_k(b)| / min(k, neurons)}``, with ``k_used`` and ``capped``.

    Raises:
        ValueError: the rankings differ in length, or a k is not positive.
    """
    a, b = rank_a.flatten(), rank_b.flatten()
    if a.numel() != b.numel():
        raise ValueError(f"rankings differ in length ({a.numel()} vs {b.numel()} neurons)")
    n = int(a.numel())
    ks = list(ks)
    if any(int(k) <= 0 for k in ks):
        raise ValueError("every k of precision@k must be positive")
    if n == 0:
        return PrecisionAtK({int(k): 0.0 for k in ks}, {int(k): 0 for k in ks}, 0)
    oa, ob = _order(a), _order(b)
    values: dict[int, float] = {}
    used: dict[int, int] = {}
    for k in ks:
        k = int(k)
        ku = min(k, n)
        mark = torch.zeros(n, dtype=torch.bool)
        mark[oa[:ku]] = True
        values[k] = float(mark[ob[:ku]].sum()) / ku
        used[k] = ku
    return PrecisionAtK(values, used, n)


# ---------------------------------------------------------------------------------------------------------------
# The scan document's "activations" section


def probe_images(data: CleanData, avoid: Sequence[int], max_images: int) -> torch.Tensor:
    """Up to ``max_images`` clean images, none of a class in ``avoid``, taken class by class in turn.

    Round-robin over classes (each class's images in file order) keeps the sample balanced even when the
    data is sorted by class, and makes it deterministic without a seed.
    """
    keep = [c for c in torch.unique(data.y).tolist() if c not in set(avoid)]
    if not keep:  # a one-class data set of the target class: better these than nothing
        keep = torch.unique(data.y).tolist()
    per = [(data.y == c).nonzero().flatten().tolist() for c in keep]
    idx: list[int] = []
    depth = 0
    while len(idx) < max_images and any(depth < len(p) for p in per):
        idx.extend(p[depth] for p in per if depth < len(p))
        depth += 1
    return data.x[torch.tensor(idx[:max_images], dtype=torch.long)]


def _pick_label(mode_labels: list[LabelResult], target: int | None, min_label: int | None) -> tuple[LabelResult | None, str]:
    by = {r.label: r for r in mode_labels}
    if target is not None and target in by and by[target].succeeded:
        return by[target], "suspected target"
    if min_label is not None and min_label in by and by[min_label].succeeded:
        return by[min_label], "smallest norm"
    ok = [r for r in mode_labels if r.succeeded]
    if ok:
        return min(ok, key=lambda r: (r.norm, r.label)), "smallest norm"
    return None, "no label's inversion succeeded"


def activations_section(wrapper: ModelWrapper, data: CleanData, findings: ScanFindings, original_trigger: Trigger | None,
                        threshold: float = DEFAULT_THRESHOLD, max_images: int = 128, top_k: int = 10,
                        ks: Iterable[int] = PAPER_KS, batch_size: int = 64) -> dict[str, Any]:
    """The scan document's ``"activations"`` section (JSON-able; documented in the returned ``"method"``).

    Per scan mode it measures the reversed trigger of the suspected target (or, when nothing is suspected or
    that label failed in this mode, of the label with the smallest trigger): per-layer and total fraction of
    activated neurons and the 10 most increased neurons. When the original trigger is known (lab models) it
    measures that too, and compares the neuron rankings of the original and the reversed trigger by
    precision@k, for the final reversed trigger and for the best trigger at the end of each third of the
    inversion (``LabelResult.phases``; paper, tables 7-9). All triggers are stamped on the same clean images,
    none of the suspected (or original) target class.

    Returns:
        ``{"computed": True, "method": {...}, "images": n, "neurons": N, "layers": L, "original": stats | None,
        "modes": {mode: {"label", "name", "label_basis", "norm", "reversed": stats,
        "precision_at_k": {"final": [{"k", "k_used", "capped", "precision"}], "phases": [...]} | None}}}``,
        or ``{"computed": False, "reason": ...}`` when the model cannot be hooked.
    """
    ks = tuple(ks)
    v = findings.verdict
    avoid = sorted({t for t in (v.target, original_trigger.target if original_trigger else None) if t is not None})
    x = probe_images(data, avoid, max_images)
    try:
        clean = activation_profile(wrapper, x, None, None, batch_size)
    except ValueError as e:
        return {"computed": False, "reason": str(e)}

    def measure(t: Trigger, k: int = top_k) -> tuple[ActivationStats, torch.Tensor]:
        return compare_profiles(clean, activation_profile(wrapper, x, t, None, batch_size), t, threshold, k)

    original: dict[str, Any] | None = None
    orig_rank: torch.Tensor | None = None
    if original_trigger is not None:
        st, orig_rank = measure(original_trigger)
        original = st.to_dict()

    modes: dict[str, Any] = {}
    for mode, m in findings.modes.items():
        r, basis = _pick_label(m.labels, v.target, m.anomaly.min_label)
        if r is None:
            modes[mode] = {"label": None, "name": None, "label_basis": basis, "norm": None, "reversed": None,
                           "precision_at_k": None}
            continue
        t = Trigger(r.mask, r.pattern, r.label, f"reversed-{mode}", {"norm": r.norm, "param": r.param})
        st, rank = measure(t)
        entry: dict[str, Any] = {"label": r.label, "name": wrapper.info.class_name(r.label), "label_basis": basis,
                                 "norm": None if r.norm is None else json_number(r.norm), "reversed": st.to_dict(),
                                 "precision_at_k": None}
        if orig_rank is not None:
            phases = []
            for i, p in enumerate(r.phases):
                ph: dict[str, Any] = {"phase": i + 1, "step": p.step, "norm": None if p.norm is None else json_number(p.norm)}
                if p.mask is None or p.pattern is None:
                    ph["precision"] = None
                    ph["reason"] = "no trigger had reached the success threshold by the end of this phase"
                else:
                    pt = Trigger(p.mask, p.pattern, r.label, f"reversed-{mode}-phase{i + 1}")
                    ph["precision"] = precision_at_k(orig_rank, measure(pt, 0)[1], ks).to_list()
                phases.append(ph)
            entry["precision_at_k"] = {"final": precision_at_k(orig_rank, rank, ks).to_list(), "phases": phases}
        modes[mode] = entry

    return {
        "computed": True,
        "method": {
            "layers": "every nn.Conv2d and nn.Linear of the network, in module order",
            "neuron": "one element of a hooked layer's output for one image (a conv channel at one position; "
                      "a linear unit at one token), averaged over the images",
            "activated": f"the mean activation rises by more than {threshold:g} × the layer's largest absolute clean activation",
            "ranking": "neurons ordered by the rise of their mean activation when the trigger is stamped",
            "precision_at_k": "share of the original trigger's top-k neurons also in the reversed trigger's top k; "
                              "k is capped at the number of neurons",
            "threshold": threshold,
            "excluded_classes": avoid,
        },
        "images": clean.images,
        "neurons": clean.neurons,
        "layers": len(clean.layers),
        "original": original,
        "modes": modes,
    }
