"""How fast a scan could be on this CPU: the model's arithmetic against what the CPU does with it.

For one forward+backward pass of the model (gradients to the input only, weights frozen, float32, as in trigger
inversion) on ``--images`` images it prints:

* the floating-point operations per image, by operator (``torch.utils.flop_counter``; the CPU flash-attention
  kernels, which it does not count, are registered with its own attention formulas);
* images/s of the real pass (best of ``--rounds``);
* images/s if only the counted operators (matrix products, attention, convolutions) ran, each replayed alone on
  the pass's own tensors at its best of ``--rounds`` (everything else free: a floor for fused kernels);
* images/s if every counted operation ran at this core's large-GEMM rate (a 1024³ float32 ``mm``; a floor for
  perfect kernels).

Then it turns each rate into a default scan's inversion time: the label-steps the recorded default scan of that
model ran (``--hist``, a ``detect --histories`` output, both levels) × images per step, spread over ``--workers`` side-by-side
inversions of ``--threads`` threads each (the default scan's layout on 2 cores: 2 × 1).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from benchmarks.common import (
    RESULTS,
    add_threads,
    best_seconds,
    budget_config,
    load_model,
    machine_line,
    new_parser,
    read_json,
    set_threads,
)

aten = torch.ops.aten


# torch's counter knows the CUDA flash kernels only; the CPU ones do the same arithmetic.
@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_bwd_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class _Recorder(TorchDispatchMode):
    """Keeps a copy of every call to the operators ``ops`` (their packets), to replay them one by one."""

    def __init__(self, ops: set[Any]) -> None:
        super().__init__()
        self.ops = ops
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket in self.ops:
            def copy(t: Any) -> Any:
                return t.detach().clone() if isinstance(t, torch.Tensor) else t
            self.calls.append((func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)


def _label_steps(hist: Path, model: str) -> int | None:
    """Label-steps a default scan of ``model`` runs, both levels, as recorded (``None`` if not recorded).

    ``detect_hist.json`` recorded a CNN's patch level with the full 4-grid sweep (for ``schedule --sweep``);
    the default runs only its first member, the 4-pixel grid (``ScanConfig.cnn_patch_sizes``), so
    only that one is counted.
    """
    for row in read_json(hist, {"rows": []})["rows"]:
        if row["model"] == model:
            return sum(len(h) for level in row["histories"].values()
                       for inv in list(level.values())[:1] for h in inv.values())
    return None


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=32, help="images per pass")
    add_threads(ap, 1)
    ap.add_argument("--rounds", type=int, default=7, help="timed calls of each measurement (best kept)")
    ap.add_argument("--workers", type=int, default=2, help="inversions side by side, --threads each")
    ap.add_argument("--hist", type=Path, default=RESULTS / "detect_hist.json",
                    help="recorded default scans (default: benchmarks/results/detect_hist.json)")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    torch.manual_seed(0)
    m = load_model(args.model).wrapper.eval()
    m.requires_grad_(False)
    x = torch.rand(args.images, 3, *m.info.input_size[-2:], requires_grad=True)

    def step() -> None:
        m(x).sum().backward()
        x.grad = None

    with FlopCounterMode(display=False) as fc:
        step()
    counts = fc.get_flop_counts()["Global"]
    flops = sum(counts.values()) / args.images

    rec = _Recorder(set(counts))
    with rec:
        step()
    t_pass = best_seconds(step, args.rounds)
    by_op: dict[str, float] = defaultdict(float)
    for f, a, k in rec.calls:
        by_op[str(f.overloadpacket)] += best_seconds(lambda f=f, a=a, k=k: f(*a, **k), args.rounds)
    t_ops = sum(by_op.values())

    a = torch.rand(1024, 1024)
    b = torch.rand(1024, 1024)
    gflops_peak = 2 * 1024**3 / best_seconds(lambda: torch.mm(a, b), args.rounds) / 1e9

    rates = {
        "real pass": args.images / t_pass,
        "counted operators only, replayed alone": args.images / t_ops,
        "every counted FLOP at the 1024^3 GEMM rate": gflops_peak * 1e9 / flops,
    }
    name = Path(args.model).name.split(".")[0]
    print(f"{name}: {args.images} images per pass; {machine_line()}")
    print(f"  {flops / 1e6:.1f} MFLOP per image (forward + input gradient):")
    for op, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"    {op!s:60s} {n / args.images / 1e6:7.1f} MFLOP   alone {by_op.get(str(op), 0) * 1e3:7.2f} ms")
    print(f"  real pass {t_pass * 1e3:.2f} ms; the counted operators alone {t_ops * 1e3:.2f} ms "
          f"({t_ops / t_pass:.0%} of it); 1024^3 GEMM {gflops_peak:.1f} GFLOP/s per {args.threads} thread(s); "
          f"the real pass runs at {flops * args.images / t_pass / 1e9:.1f} GFLOP/s")
    steps = _label_steps(args.hist, name)
    fast = budget_config("fast")
    per_step = fast.batch_size * (fast.batches_per_step or 1)
    for what, rate in rates.items():
        line = f"  {what:45s} {rate:7.0f} images/s"
        if steps:
            line += (f"  -> default scan ({steps} label-steps x {per_step} images, {args.workers} side by side): "
                     f"{steps * per_step / (rate * args.workers):6.1f} s of inversion")
        print(line)

