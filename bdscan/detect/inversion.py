"""The one trigger-inversion core every detector reuses (Neural Cleanse's optimisation, batched).

For each candidate label ``t`` Neural Cleanse (Wang et al., S&P 2019, section IV-B) solves

    min_{m, p}  CE(f((1 - m) * x + m * p), t) + λ · |m|

over clean images ``x`` of other classes, with ``m`` and ``p`` tanh-parametrised into [0, 1] and λ
adapted so the attack keeps succeeding (≥ 99 %) while the mask shrinks. Here the masks of many labels
are stacked and optimised in one batched forward: every label has its own parameters, Adam state, λ
schedule and early stopping, and all labels see the same mini-batches in the same order, so batched
results equal label-by-label results (up to float summation order in the model's batched kernels).

What the mask *is* (pixels, tokens) is a :class:`~bdscan.detect.params.TriggerParam`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bdscan import machine
from bdscan.data import CleanData, balanced_sample
from bdscan.detect.config import InversionConfig
from bdscan.detect.params import TriggerParam, squash
from bdscan.errors import DataLoadError, NumericalError
from bdscan.models.wrapper import ModelWrapper

log = logging.getLogger(__name__)

#: progress(done, total, stats) in label-steps: ``total`` = labels × the budget's maximum steps, ``done`` = the steps
#: each label has run, a finished label (early stop or success schedule done) counting as all its steps, so the
#: count moves with every optimisation step and reaches ``total`` when the inversion ends. stats has "step",
#: "steps" (the maximum), "labels_done", "labels", and in the batched core "active", "mean_lambda", "mean_success"
Progress = Callable[[int, int, dict[str, float]], None]


@dataclass
class PhaseSnapshot:
    """The best trigger of a label at the end of one third of its run (research paper, section 5.3)."""

    step: int
    norm: float | None
    mask: torch.Tensor | None  # (H, W) pixel mask
    pattern: torch.Tensor | None  # (C, H, W)


@dataclass
class LabelResult:
    """Outcome of inverting one label.

    Attributes:
        label: the candidate target class.
        norm: size statistic of the smallest mask that reached the success threshold; None if none did.
        success_rate: attack success of that mask during its step (share of other-class images sent to label).
        steps: optimisation steps run before stopping.
        stopped_early: the early-stopping rule ended it (else the budget did).
        final_lambda: λ at the end.
        mask: (H, W) best pixel mask (or the last one when it never succeeded).
        pattern: (C, H, W) best pattern.
        raw_mask: the parametrisation's own mask at the best step, e.g. (gh, gw) token mask.
        phases: best trigger at the end of each third of the run.
        history: best norm after each step (None before the first success), for pace-of-learning plots.
        param: name of the parametrisation that produced it.
    """

    label: int
    norm: float | None
    success_rate: float
    steps: int
    stopped_early: bool
    final_lambda: float
    mask: torch.Tensor
    pattern: torch.Tensor
    raw_mask: torch.Tensor
    phases: list[PhaseSnapshot] = field(default_factory=list)
    history: list[float | None] = field(default_factory=list)
    param: str = "pixel"

    @property
    def succeeded(self) -> bool:
        return self.norm is not None


@dataclass
class InversionResult:
    """All labels' results for one parametrisation."""

    param: dict[str, object]
    labels: list[LabelResult]
    config: InversionConfig
    samples_used: int
    seconds: float


class _LabelState:
    """Neural Cleanse's per-label λ schedule and early-stopping bookkeeping (``visualizer.py``)."""

    def __init__(self, cfg: InversionConfig) -> None:
        self.cfg = cfg
        self.cost = 0.0
        self.cost_set_counter = 0
        self.up_counter = 0
        self.down_counter = 0
        self.up_flag = False
        self.down_flag = False
        self.reg_best = math.inf
        self.es_reg_best = math.inf
        self.es_counter = 0
        self.best_step = -1
        self.best_acc = 0.0
        self.steps = 0
        self.done = False
        self.stopped_early = False

    def update(self, acc: float, reg: float) -> bool:
        """Applies one step's mean success ``acc`` and mean norm ``reg``; returns True if a new best."""
        c = self.cfg
        self.steps += 1
        improved = False
        if acc >= c.success and reg < self.reg_best:
            self.reg_best, self.best_acc, self.best_step, improved = reg, acc, self.steps, True
        if c.early_stop:
            if self.reg_best < math.inf:
                if self.reg_best >= c.early_stop_threshold * self.es_reg_best:
                    self.es_counter += 1
                else:
                    self.es_counter = 0
            self.es_reg_best = min(self.reg_best, self.es_reg_best)
            if self.down_flag and self.up_flag and self.es_counter >= c.early_stop_patience:
                self.done = self.stopped_early = True
        if self.cost == 0 and acc >= c.success:
            self.cost_set_counter += 1
            if self.cost_set_counter >= c.patience:
                self.cost = c.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.cost_set_counter = 0
        if acc >= c.success:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= c.patience:
            self.up_counter = 0
            self.cost *= c.cost_up
            self.up_flag = True
        elif self.down_counter >= c.patience:
            self.down_counter = 0
            self.cost /= c.cost_down
            self.down_flag = True
        if self.steps >= c.steps:
            self.done = True
        return improved


def bf16_emulated(precision: str, device: torch.device | str) -> bool:
    """Whether a forced ``precision="bf16"`` would run emulated: on a CPU without native bf16 instructions.

    There oneDNN falls back to slow reference kernels, an order of magnitude slower than float32
    (benchmarks/README.md, "An AVX2-only host"). "auto" never picks bf16 there; this is for warning a user who
    forced it.

    Args:
        precision: the requested precision, before :func:`resolve_precision`.
        device: where the inversion runs.
    """
    return precision == "bf16" and torch.device(device).type == "cpu" and not machine.cpu_has_native_bf16()


def resolve_precision(precision: str, model: ModelWrapper, device: torch.device | str) -> str:
    """The precision "auto" stands for on this model and device: "bf16" or "fp32".

    bf16 autocast (with channels-last weights) made the zoo's CNN scans faster on a CPU with native bf16, with
    the same verdicts, and its transformers slower (benchmarks/README.md, "bf16 for CNNs"), so "auto" picks it
    only for a model without a token grid (what bdscan scans as a CNN) on a CPU that
    has the instructions. The GPU path stays float32 under "auto" until it has been measured.

    Args:
        precision: "auto", "fp32" or "bf16"; the latter two are returned unchanged.
        model: the model to scan; only its token grid is looked at.
        device: where the inversion runs.

    Returns:
        "bf16" or "fp32".
    """
    if precision != "auto":
        return precision
    on_cpu = torch.device(device).type == "cpu"
    return "bf16" if on_cpu and model.token_grid is None and machine.cpu_has_native_bf16() else "fp32"


def _batch_order(n: int, cfg: InversionConfig, step: int) -> torch.Tensor:
    """Mini-batch indices for one step: a permutation seeded by (seed, step), the same for every label."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    need = cfg.resolved_batches_per_step(n) * cfg.batch_size
    reps = math.ceil(need / n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:need]


def prepare_samples(data: CleanData, cfg: InversionConfig, num_classes: int) -> CleanData:
    """Draws ``cfg.samples`` clean images balanced over classes (seeded), as Neural Cleanse's 1000 samples."""
    if len(data) == 0:
        raise DataLoadError("no clean images to optimise on", "give clean samples with --data")
    classes = int(torch.unique(data.y).numel())
    per_class = max(1, math.ceil(cfg.samples / max(classes, 1)))
    sub = balanced_sample(data, per_class, cfg.seed)
    if len(sub) > cfg.samples:
        g = torch.Generator().manual_seed(cfg.seed)
        sub = sub.subset(torch.randperm(len(sub), generator=g)[: cfg.samples].sort().values)
    return sub


def invert(
    model: ModelWrapper,
    data: CleanData,
    param: TriggerParam,
    labels: Sequence[int],
    cfg: InversionConfig,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> InversionResult:
    """Reverse-engineers the smallest trigger for each label in ``labels``.

    Args:
        model: the suspect model ([0, 1] images (N, C, H, W) in, logits (N, classes) out).
        data: clean images; ``cfg.samples`` of them are drawn, balanced over classes.
        param: the mask parametrisation (pixel or patch).
        labels: candidate target labels.
        cfg: optimisation hyper-parameters (see :class:`InversionConfig`).
        progress: optional callback ``(labels_done, labels_total, stats)``.
        device: where to run.

    Returns:
        :class:`InversionResult` with one :class:`LabelResult` per label, in the order of ``labels``.
    """
    cfg = cfg.validate().with_(precision=resolve_precision(cfg.precision, model, device))
    with prepared(model, cfg.precision, device):
        return invert_prepared(model, data, param, labels, cfg, progress, device)


@contextlib.contextmanager
def prepared(model: torch.nn.Module, precision: str, device: torch.device | str) -> Iterator[None]:
    """Readies the model for inversions at ``precision`` ("fp32" or "bf16") on ``device`` (eval mode, there,
    frozen, channels-last for bf16) and restores its gradients and layout afterwards.

    Several inversions may run inside one ``prepared`` block at once (the scan runs its levels in parallel
    threads): the model's state is changed once, here, never by the inversions themselves.
    """
    model.to(torch.device(device)).eval()
    with frozen(model), channels_last(model, precision == "bf16"):
        yield


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Turns off the model's parameter gradients for the duration: inversion differentiates the input only,
    and weight gradients would cost about a third of every backward pass (and a .grad per weight)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rq in saved:
            p.requires_grad_(rq)


@contextlib.contextmanager
def channels_last(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Holds the model's 4-D weights channels-last for the duration: with bf16, oneDNN's convolutions run
    faster in that layout (benchmarks/README.md, "bf16 for CNNs"); values are unchanged."""
    if not enabled:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def invert_prepared(
    model: ModelWrapper,
    data: CleanData,
    param: TriggerParam,
    labels: Sequence[int],
    cfg: InversionConfig,
    progress: Progress | None,
    device: torch.device | str,
) -> InversionResult:
    """:func:`invert` for a caller that holds :func:`prepared` and has resolved ``cfg.precision``; safe to run
    in several threads at once on the same model."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"invert_prepared needs a resolved precision, not {cfg.precision!r}")
    order = list(labels)
    if not cfg.batched:
        # label by label, as the original: each run sees the same batches, so results equal batched ones
        n = len(prepare_samples(data, cfg, model.num_classes))
        results: list[LabelResult] = []
        for i, lab in enumerate(order):
            sub = invert_prepared(model, data, param, [lab], cfg.with_(batched=True), None, dev)
            results.extend(sub.labels)
            if progress:
                progress((i + 1) * cfg.steps, len(order) * cfg.steps,
                         {"step": sub.labels[0].steps, "steps": cfg.steps, "labels_done": i + 1, "labels": len(order)})
        return InversionResult(param.describe(), results, cfg, n, time.perf_counter() - t0)

    run = Inversion(model, data, param, order, cfg, device)
    run.advance(progress=progress)
    return run.result()


class Inversion:
    """One batched inversion over ``labels`` that can be stopped after any step and continued (a second look).

    ``advance(until)`` runs optimisation steps until every label has finished its ``cfg.steps`` (or stopped early)
    or until step ``until``; ``result()`` reports every label's best trigger so far. A run advanced to step ``s``
    reports exactly what a run with ``cfg.steps = s`` reports, and continuing it gives exactly what an
    uninterrupted run gives (the same parameters, Adam state, λ schedules and mini-batches; tested), so a scan
    can look at its 30-step sizes and run on only when it needs to.

    Args:
        model, data, param, labels, cfg, device: as :func:`invert_prepared` (``cfg.precision`` resolved, the model
            held by :func:`prepared`).
    """

    def __init__(self, model: ModelWrapper, data: CleanData, param: TriggerParam, labels: Sequence[int],
                 cfg: InversionConfig, device: torch.device | str) -> None:
        t0 = time.perf_counter()
        dev = torch.device(device)
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"Inversion needs a resolved precision, not {cfg.precision!r}")
        self.model, self.param, self.cfg, self.dev = model, param, cfg, dev
        samples = prepare_samples(data, cfg, model.num_classes)
        self.x_all, self.y_all = samples.x.to(dev), samples.y.to(dev)
        self.n = len(samples)
        c, h, w = model.input_size
        self.order = list(labels)
        # Per-label parameters, initialised like the original (uniform random mask and pattern in [0, 1]
        # mapped through atanh), each seeded by (seed, label) so a label's start does not depend on the others.
        self.mask_raw: list[torch.Tensor] = []
        self.pat_raw: list[torch.Tensor] = []
        for lab in self.order:
            g = torch.Generator().manual_seed(cfg.seed * 7919 + int(lab))
            m0 = torch.rand(param.mask_shape, generator=g)
            p0 = torch.rand((c, h, w), generator=g)
            self.mask_raw.append(torch.atanh((m0 - 0.5) * (2 - 1e-7)).to(dev).requires_grad_(True))
            self.pat_raw.append(torch.atanh((p0 - 0.5) * (2 - 1e-7)).to(dev).requires_grad_(True))
        self.opt = torch.optim.Adam([*self.mask_raw, *self.pat_raw], lr=cfg.lr, betas=cfg.betas)
        self.states = [_LabelState(cfg) for _ in self.order]
        self.best_mask = [torch.zeros(h, w) for _ in self.order]
        self.best_pat = [torch.zeros(c, h, w) for _ in self.order]
        self.best_raw = [mr.detach().cpu().clone() for mr in self.mask_raw]
        self.history: list[list[float | None]] = [[] for _ in self.order]
        self.snaps: list[list[PhaseSnapshot]] = [[] for _ in self.order]
        self.targets = torch.tensor(self.order, device=dev)
        self.step = 0
        self.done_count = 0
        self.seconds = time.perf_counter() - t0

    @property
    def finished(self) -> bool:
        """Every label has run its ``cfg.steps`` or stopped early."""
        return all(s.done for s in self.states)

    def advance(self, until: int | None = None, progress: Progress | None = None) -> None:
        """Runs steps until every label is done or ``until`` steps have run in all (None: to the end)."""
        t0 = time.perf_counter()
        try:
            self._advance(until, progress)
        finally:
            self.seconds += time.perf_counter() - t0

    def _advance(self, until: int | None, progress: Progress | None) -> None:
        cfg, param, dev, order, states = self.cfg, self.param, self.dev, self.order, self.states
        mask_raw, pat_raw, opt, targets = self.mask_raw, self.pat_raw, self.opt, self.targets
        c, h, w = self.model.input_size
        n, model = self.n, self.model
        bps = cfg.resolved_batches_per_step(n)
        chunk_len = cfg.resolved_label_chunk(dev.type)
        # bf16 runs the model's arithmetic only: stamping, the trigger's size, λ and Adam stay float32
        bf16 = cfg.precision == "bf16"
        layout = torch.channels_last if bf16 else torch.contiguous_format
        while until is None or self.step < until:
            active = [i for i, s in enumerate(states) if not s.done]
            if not active:
                break
            idx_all = _batch_order(n, cfg, self.step).to(dev)
            acc_sum = torch.zeros(len(order), device=dev)
            acc_den = torch.zeros(len(order), device=dev)
            reg_sum = torch.zeros(len(order), device=dev)
            for b in range(bps):
                bidx = idx_all[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                xb, yb = self.x_all[bidx], self.y_all[bidx]
                opt.zero_grad(set_to_none=True)
                for start in range(0, len(active), chunk_len):
                    chunk = active[start : start + chunk_len]
                    raw = torch.stack([mask_raw[i] for i in chunk])
                    m = param.pixel_mask(raw)  # (k, 1, H, W)
                    p = squash(torch.stack([pat_raw[i] for i in chunk]))  # (k, C, H, W)
                    stamped = (1 - m).unsqueeze(1) * xb.unsqueeze(0) + (m * p).unsqueeze(1)  # (k, B, C, H, W)
                    k, bsz = len(chunk), xb.shape[0]
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = model(stamped.reshape(k * bsz, c, h, w).contiguous(memory_format=layout))
                    logits = logits.float()
                    tgt = targets[chunk].repeat_interleave(bsz)
                    ce = F.cross_entropy(logits, tgt, reduction="none").view(k, bsz)
                    # Only images of *other* classes count: an image already of class t says nothing about a trigger.
                    wgt = (yb.unsqueeze(0) != targets[chunk].unsqueeze(1)).float()  # (k, B)
                    den = wgt.sum(1).clamp_min(1.0)
                    ce_k = (ce * wgt).sum(1) / den
                    reg = param.norm(raw)
                    lam = torch.tensor([states[i].cost for i in chunk], device=dev)
                    loss = (ce_k + lam * reg).sum()
                    if not torch.isfinite(loss):
                        raise NumericalError("the model produced NaN/inf during trigger optimisation",
                                             "check the model's weights and input scaling (--mean/--std)")
                    loss.backward()
                    with torch.no_grad():
                        hit = (logits.argmax(1).view(k, bsz) == targets[chunk].unsqueeze(1)).float()
                        ci = torch.tensor(chunk, device=dev)
                        acc_sum.index_add_(0, ci, (hit * wgt).sum(1))
                        acc_den.index_add_(0, ci, wgt.sum(1))
                        reg_sum.index_add_(0, ci, reg.detach())
                opt.step()
            self.step += 1
            with torch.no_grad():
                for i in active:
                    acc = float(acc_sum[i] / acc_den[i].clamp_min(1.0))
                    reg_mean = float(reg_sum[i] / bps)
                    if states[i].update(acc, reg_mean):
                        raw_i = mask_raw[i].detach()
                        self.best_raw[i] = raw_i.cpu().clone()
                        self.best_mask[i] = param.pixel_mask(raw_i.unsqueeze(0))[0, 0].cpu().clone()
                        self.best_pat[i] = squash(pat_raw[i].detach()).cpu().clone()
                        self.snaps[i].append(PhaseSnapshot(states[i].steps, None, self.best_mask[i].half(), self.best_pat[i].half()))
                    self.history[i].append(_saved_norm(param, self.best_raw[i]) if states[i].best_step > 0 else None)
                    if states[i].done:
                        self.done_count += 1
            if progress:
                act = [i for i in active if not states[i].done] or active
                progress(sum(cfg.steps if st.done else st.steps for st in states), len(order) * cfg.steps, {
                    "step": self.step, "steps": cfg.steps, "labels_done": self.done_count, "labels": len(order),
                    "active": len(act),
                    "mean_lambda": sum(states[i].cost for i in act) / len(act),
                    "mean_success": float(sum(float(acc_sum[i] / acc_den[i].clamp_min(1)) for i in act) / len(act)),
                })

    def result(self) -> InversionResult:
        """Every label's best trigger after the steps run so far (a label that never succeeded: its last state,
        marked as such); the run itself is not changed, so it can be advanced further."""
        param = self.param
        results = []
        for i, lab in enumerate(self.order):
            st = self.states[i]
            succeeded = st.best_step > 0
            best_raw, best_mask, best_pat = self.best_raw[i], self.best_mask[i], self.best_pat[i]
            if not succeeded:  # report the last state, clearly marked as never successful
                best_raw = self.mask_raw[i].detach().cpu().clone()
                best_mask = param.pixel_mask(best_raw.unsqueeze(0))[0, 0].clone()
                best_pat = squash(self.pat_raw[i].detach()).cpu().clone()
            # Neural Cleanse's detection statistic is the size of the *saved* mask (mad_outlier_detection.py)
            norm = _saved_norm(param, best_raw) if succeeded else None
            results.append(LabelResult(
                label=int(lab), norm=norm, success_rate=st.best_acc, steps=st.steps, stopped_early=st.stopped_early,
                final_lambda=st.cost, mask=best_mask, pattern=best_pat, raw_mask=squash(best_raw),
                phases=_phases(self.snaps[i], list(self.history[i]), param), history=list(self.history[i]), param=param.name,
            ))
        return InversionResult(param.describe(), results, self.cfg, self.n, self.seconds)


def _saved_norm(param: TriggerParam, raw: torch.Tensor) -> float:
    with torch.no_grad():
        return float(param.norm(raw.unsqueeze(0))[0])


def _phases(snaps: list[PhaseSnapshot], history: list[float | None], param: TriggerParam) -> list[PhaseSnapshot]:
    """The best trigger at the end of each third of the label's own run (paper: phases 1-3)."""
    total = len(history)
    out = []
    for k in (1, 2, 3):
        end = math.ceil(total * k / 3)
        before = [s for s in snaps if s.step <= end]
        if before:
            s = before[-1]
            out.append(PhaseSnapshot(end, history[end - 1], s.mask.float(), s.pattern.float()))
        else:
            out.append(PhaseSnapshot(end, None, None, None))
    return out
