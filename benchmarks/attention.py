"""Forward+backward throughput of a timm ViT with its attention written four other ways (same arithmetic).

The profile of a ViT inversion (``profile-inversion``) shows a share of ``aten::copy_`` and ``aten::cat``:
timm's ``Attention`` permutes q/k/v out of one ``[B, N, 3, H, d]`` tensor, so the backward stacks the three
gradients and copies them back into that layout. This measures whether an attention without those copies is
faster, before anyone patches a suspect model's forward for it:

* ``timm``: the model as built (``F.scaled_dot_product_attention``, flash kernel on CPU);
* ``views``: q/k/v unbound along the ``3`` axis and transposed as views, then the same kernel;
* ``views_math``: the same views, attention as ``softmax(q k^T) v`` in plain matrix products;
* ``split``: q, k and v from three slices of the qkv weight (no stack in the backward), flash kernel;
* ``split_math``: the three slices, plain matrix products, the scale folded into q's weights.

Every variant's logits are checked against the model's own on 16 images (max absolute difference printed).
Gradients flow to the input only, as in trigger inversion. The variants run interleaved, ``--rounds`` times,
and the best images/s of each is printed: this shared machine's speed drifts within a minute.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable

import timm.models.vision_transformer as vt
import torch
import torch.nn.functional as F

from benchmarks.common import add_threads, best_seconds, load_model, machine_line, new_parser, set_threads

Forward = Callable[..., torch.Tensor]


def _views(self: vt.Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


def _views_math(self: vt.Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
    q, k, v = q.transpose(1, 2) * self.scale, k.transpose(1, 2), v.transpose(1, 2)
    a = (q @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


def _qkv_slices(self: vt.Attention, x: torch.Tensor, q_scale: float = 1.0) -> list[torch.Tensor]:
    b, n, c = x.shape
    w, bias = self.qkv.weight, self.qkv.bias
    out = []
    for i, s in enumerate((q_scale, 1.0, 1.0)):
        wi, bi = w[i * c:(i + 1) * c], bias[i * c:(i + 1) * c]
        out.append(F.linear(x, wi * s, bi * s).view(b, n, self.num_heads, self.head_dim).transpose(1, 2))
    return out


def _split(self: vt.Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = _qkv_slices(self, x)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.attn_dim))


def _split_math(self: vt.Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
    b, n, _ = x.shape
    q, k, v = _qkv_slices(self, x, q_scale=self.scale)
    a = (q @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


VARIANTS: dict[str, Forward | None] = {"timm": None, "views": _views, "views_math": _views_math,
                                       "split": _split, "split_math": _split_math}


def images_per_s(model: torch.nn.Module, size: int, reps: int = 7) -> float:
    """Best forward+backward rate of ``reps`` calls after the first (a warm-up)."""
    x = torch.rand(size, 3, 32, 32, requires_grad=True)
    return size / best_seconds(lambda: model(x).sum().backward(), rounds=reps - 1)


def parser() -> argparse.ArgumentParser:
    ap = new_parser(__doc__)
    ap.add_argument("model")
    add_threads(ap, 1)
    ap.add_argument("--size", type=int, default=64, help="images per forward")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds over the variants")
    return ap


def run(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    probe = torch.rand(16, 3, 32, 32)
    reference = load_model(args.model).wrapper.eval()(probe)
    models = {}
    for name, forward in VARIANTS.items():
        m = load_model(args.model).wrapper.eval().requires_grad_(False)
        if forward is not None:
            n = 0
            for mod in m.modules():
                if isinstance(mod, vt.Attention):
                    mod.forward = types.MethodType(forward, mod)
                    n += 1
            if n == 0:
                raise SystemExit(f"{args.model}: no timm Attention module to replace")
        with torch.no_grad():
            diff = (m(probe) - reference).abs().max().item()
        print(f"{name}: max |logit difference| {diff:.2e}")
        models[name] = m
    best = dict.fromkeys(models, 0.0)
    for _ in range(args.rounds):
        for name, m in models.items():
            best[name] = max(best[name], images_per_s(m, args.size))
    print(f"{args.model} ({args.size} images, best of {args.rounds} rounds; {machine_line()}): "
          + ", ".join(f"{n} {v:.0f}" for n, v in best.items()) + " images/s")

