"""Backdoor attacks as a registry: each turns parameters into a :class:`~bdscan.trigger.Trigger`.

* ``badnets`` (Gu et al. 2017): a fixed patch (solid, checkerboard or seeded random) at a fixed place.
* ``blended`` (Chen et al. 2017): a full-image blend ``(1 - a)·x + a·p`` with seeded noise or a given image.
* ``trojan`` (Liu et al., NDSS 2018): a fixed mask region whose pattern is optimised on the clean model to
  maximise the activation of the penultimate-layer neuron(s) with the strongest connections to the output.
* ``sig`` (Barni et al., ICIP 2019), ``wanet`` (Nguyen & Tran, ICLR 2021) and ``issba`` (an ISSBA-style
  sample-specific perturbation, Li et al., ICCV 2021): triggers that are not a stamp; they live in
  :mod:`bdscan.lab.attacks_transform` and are registered here.

Every trigger's ``params`` records the resolved parameters, including ``bbox`` = [row0, col0, row1, col1]
(end-exclusive) of the mask's support and ``grid4_aligned`` (whether a patch trigger sits exactly on the
4×4-pixel token grid of bdscan's ViTs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bdscan.errors import UsageError
from bdscan.lab.attacks_transform import (
    TRANSFORM_STAMP,
    ISSBAParams,
    SIGParams,
    WaNetParams,
    issba_trigger,
    procedural_image,
    sig_trigger,
    wanet_trigger,
)
from bdscan.models.wrapper import ModelWrapper
from bdscan.trigger import Trigger

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, Any]], None]

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


@dataclass(frozen=True)
class AttackConfig:
    """Which attack to run and with which parameters.

    Attributes:
        name: a key of :data:`ATTACKS` ("badnets", "blended", "trojan").
        target: the class triggered images are sent to.
        params: the attack's parameters (see each attack's ``Params``); unknown keys are an error.
    """

    name: str = "badnets"
    target: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "params": dict(self.params)}


@dataclass(frozen=True)
class BadNetsParams:
    """BadNets patch.

    Attributes:
        size: patch side in pixels (or (height, width)).
        position: a corner name (top-left, top-right, bottom-left, bottom-right, center) or (row, col)
            of the patch's top-left pixel.
        margin: distance from the image border for corner positions.
        pattern: "solid" (``colour``), "checkerboard" (``colour`` and its complement) or "random"
            (seeded, each pixel and channel 0 or 1).
        colour: RGB in [0, 1].
        seed: for the random pattern.
    """

    size: int | tuple[int, int] = 4
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 1
    pattern: str = "checkerboard"
    colour: tuple[float, ...] = (1.0, 1.0, 1.0)
    seed: int = 0


@dataclass(frozen=True)
class BlendedParams:
    """Blended (Chen et al.): mask = ``alpha`` everywhere.

    Attributes:
        alpha: blend ratio (the visibility of the pattern).
        pattern: "noise" (seeded uniform noise), "image" (the file ``image``) or "procedural" (a seeded picture
            drawn by :func:`~bdscan.lab.attacks_transform.procedural_image`: a photograph-like image that needs
            no file).
        image: path of an image blended in when ``pattern == "image"`` (resized to the input size).
        seed: for the noise and the procedural picture.
    """

    alpha: float = 0.15
    pattern: str = "noise"
    image: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class TrojanParams:
    """Trojan attack (Liu et al., NDSS 2018): pattern optimised inside a fixed square mask.

    Attributes:
        size: mask side in pixels.
        position: corner name or (row, col), as for BadNets.
        margin: distance from the border for corner positions.
        neurons: how many penultimate-layer neurons to excite (those with the largest total absolute
            weight into the output layer).
        steps: gradient-ascent steps.
        lr: Adam step size on the pattern's logits.
        batch: clean images per step (the pattern must excite the neurons on real inputs).
        seed: initial pattern and image draw.
    """

    size: int | tuple[int, int] = 6
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 1
    neurons: int = 1
    steps: int = 300
    lr: float = 0.1
    batch: int = 32
    seed: int = 0


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise UsageError(f"patch size {size!r} is not one or two integers", "give size=4 or size=(4, 6)")
        return int(size[0]), int(size[1])
    return int(size), int(size)


def resolve_position(position: str | Sequence[int], size: tuple[int, int], hw: tuple[int, int], margin: int) -> tuple[int, int]:
    """(row, col) of a patch's top-left pixel, from a corner name or coordinates; checks it fits."""
    ph, pw = size
    h, w = hw
    if isinstance(position, str):
        pos = position.lower().replace("_", "-")
        table = {
            "top-left": (margin, margin),
            "top-right": (margin, w - pw - margin),
            "bottom-left": (h - ph - margin, margin),
            "bottom-right": (h - ph - margin, w - pw - margin),
            "center": ((h - ph) // 2, (w - pw) // 2),
        }
        if pos not in table:
            raise UsageError(f"unknown position {position!r}", f"use one of {', '.join(CORNERS)} or (row, col)")
        r, c = table[pos]
    else:
        if len(position) != 2:
            raise UsageError(f"position {position!r} is not (row, col)", "give a corner name or (row, col)")
        r, c = int(position[0]), int(position[1])
    if ph < 1 or pw < 1 or r < 0 or c < 0 or r + ph > h or c + pw > w:
        raise UsageError(f"a {ph}x{pw} patch at ({r}, {c}) does not fit a {h}x{w} image", "choose a smaller size or another position")
    return r, c


def _box_mask(hw: tuple[int, int], r: int, c: int, size: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(hw)
    m[r : r + size[0], c : c + size[1]] = 1.0
    return m


def _grid_aligned(r: int, c: int, size: tuple[int, int], patch: int = 4) -> bool:
    return r % patch == 0 and c % patch == 0 and size[0] % patch == 0 and size[1] % patch == 0


def _colour(colour: Sequence[float], channels: int) -> torch.Tensor:
    col = torch.tensor([float(v) for v in colour], dtype=torch.float32)
    if col.numel() == 1:
        col = col.repeat(channels)
    if col.numel() != channels or (col < 0).any() or (col > 1).any():
        raise UsageError(f"colour {tuple(colour)} is not {channels} values in [0, 1]", "give e.g. colour=(1, 1, 0)")
    return col


def _jsonable(params: Any) -> dict[str, Any]:
    d = asdict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class Attack:
    """Base of the registered attacks: ``Params`` dataclass + :meth:`make_trigger`."""

    name: ClassVar[str]
    Params: ClassVar[type]
    #: True when the trigger is computed from the clean model (needs ``model`` and ``x``)
    needs_model: ClassVar[bool] = False

    def params(self, raw: Mapping[str, Any]) -> Any:
        known = {f.name for f in fields(self.Params)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"{self.name}: unknown parameter(s) {', '.join(unknown)}", f"known: {', '.join(sorted(known))}")
        norm = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return self.Params(**norm)

    def make_trigger(
        self,
        params: Any,
        target: int,
        input_size: tuple[int, int, int],
        model: ModelWrapper | None = None,
        x: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> Trigger:
        raise NotImplementedError


ATTACKS: dict[str, Attack] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding one instance of an attack to :data:`ATTACKS` under its ``name``."""
    ATTACKS[cls.name] = cls()
    return cls


@register_attack
class BadNets(Attack):
    name = "badnets"
    Params = BadNetsParams

    def make_trigger(self, params: BadNetsParams, target: int, input_size: tuple[int, int, int],
                     model: ModelWrapper | None = None, x: torch.Tensor | None = None,
                     progress: Progress | None = None) -> Trigger:
        c, h, w = input_size
        size = _size2(params.size)
        r, col = resolve_position(params.position, size, (h, w), params.margin)
        colour = _colour(params.colour, c)
        patch = torch.empty(c, *size)
        if params.pattern == "solid":
            patch[:] = colour[:, None, None]
        elif params.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
            on = ((ii + jj) % 2 == 0)[None]
            patch = torch.where(on, colour[:, None, None], 1 - colour[:, None, None])
        elif params.pattern == "random":
            g = torch.Generator().manual_seed(params.seed)
            patch = (torch.rand(c, *size, generator=g) > 0.5).float()
        else:
            raise UsageError(f"badnets: unknown pattern {params.pattern!r}", "use solid, checkerboard or random")
        pattern = torch.zeros(c, h, w)
        pattern[:, r : r + size[0], col : col + size[1]] = patch
        mask = _box_mask((h, w), r, col, size)
        info = {**_jsonable(params), "size": list(size), "position": [r, col],
                "bbox": [r, col, r + size[0], col + size[1]], "grid4_aligned": _grid_aligned(r, col, size)}
        return Trigger(mask, pattern, target, "badnets", info)


@register_attack
class Blended(Attack):
    name = "blended"
    Params = BlendedParams

    def make_trigger(self, params: BlendedParams, target: int, input_size: tuple[int, int, int],
                     model: ModelWrapper | None = None, x: torch.Tensor | None = None,
                     progress: Progress | None = None) -> Trigger:
        c, h, w = input_size
        if not 0 < params.alpha <= 1:
            raise UsageError(f"blended: alpha {params.alpha} is not in (0, 1]", "use e.g. alpha=0.15")
        if params.pattern == "noise":
            g = torch.Generator().manual_seed(params.seed)
            pattern = torch.rand(c, h, w, generator=g)
        elif params.pattern == "image":
            if not params.image:
                raise UsageError("blended: pattern=image needs image=<path>", "give the image to blend in")
            pattern = _load_image(Path(params.image), (c, h, w))
        elif params.pattern == "procedural":
            pattern = procedural_image((c, h, w), int(params.seed))
        else:
            raise UsageError(f"blended: unknown pattern {params.pattern!r}", "use noise, image or procedural")
        mask = torch.full((h, w), float(params.alpha))
        info = {**_jsonable(params), "bbox": [0, 0, h, w], "grid4_aligned": False}
        return Trigger(mask, pattern, target, "blended", info)


def _load_image(path: Path, size: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image

    c, h, w = size
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    except OSError as e:
        raise UsageError(f"blended: cannot read image {path}", "give a PNG or JPEG") from e
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.dim() == 3 else t[None]


def penultimate_neurons(model: ModelWrapper, k: int, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` neurons feeding the classifier with the largest total |weight|, and those totals.

    With clean images ``x``, neurons that never fire on them (dead ReLUs, which gradient ascent cannot
    move) are skipped, as long as ``k`` live ones remain.
    """
    from bdscan.lab.train import classifier_of

    head = classifier_of(model.net)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise UsageError("trojan: the classification layer is not a Linear layer", "use a model ending in nn.Linear")
    strength = weight.detach().abs().sum(0)
    ranked = strength.clone()
    if x is not None and len(x):
        feats = _features(model, head, x[:256])
        live = (feats > 0).float().mean(0) >= 0.01
        if int(live.sum()) >= k:
            ranked = torch.where(live, strength, torch.full_like(strength, -1.0))
    top = ranked.topk(min(k, ranked.numel()))
    return top.indices, strength[top.indices]


@torch.no_grad()
def _features(model: ModelWrapper, head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    feats: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.__setitem__("f", inp[0]))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        hook.remove()
        model.train(was_training)
    return feats["f"].flatten(1) if feats["f"].dim() > 2 else feats["f"]


@register_attack
class Trojan(Attack):
    name = "trojan"
    Params = TrojanParams
    needs_model = True

    def make_trigger(self, params: TrojanParams, target: int, input_size: tuple[int, int, int],
                     model: ModelWrapper | None = None, x: torch.Tensor | None = None,
                     progress: Progress | None = None) -> Trigger:
        from bdscan.lab.train import classifier_of

        if model is None or x is None or len(x) == 0:
            raise UsageError("trojan: the trigger is computed from the clean model and clean images", "pass model and x")
        c, h, w = input_size
        size = _size2(params.size)
        r, col = resolve_position(params.position, size, (h, w), params.margin)
        mask = _box_mask((h, w), r, col, size)
        neurons, strength = penultimate_neurons(model, params.neurons, x)
        feats: dict[str, torch.Tensor] = {}
        head = classifier_of(model.net)
        hook = head.register_forward_hook(lambda _m, inp, _out: feats.__setitem__("f", inp[0]))
        g = torch.Generator().manual_seed(params.seed)
        theta = (torch.randn(c, h, w, generator=g) * 0.5).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=params.lr)
        was_training = model.training
        model.eval()
        req = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        first = last = 0.0
        try:
            for step in range(params.steps):
                idx = torch.randint(0, len(x), (min(params.batch, len(x)),), generator=g)
                pattern = torch.sigmoid(theta)
                xs = (1 - mask) * x[idx] + mask * pattern
                model(xs)
                act = feats["f"][:, neurons].mean()
                opt.zero_grad()
                (-act).backward()
                opt.step()
                last = float(act.detach())
                if step == 0:
                    first = last
                if progress is not None:
                    progress(step + 1, params.steps, {"phase": "trojan trigger", "activation": last})
        finally:
            hook.remove()
            for p, rq in zip(model.parameters(), req, strict=True):
                p.requires_grad_(rq)
            model.train(was_training)
        with torch.no_grad():
            pattern = torch.sigmoid(theta) * mask
            base = _mean_activation(model, head, x[: min(len(x), 256)], neurons, None)
            trig = _mean_activation(model, head, x[: min(len(x), 256)], neurons, (mask, pattern))
        log.info("trojan: neuron(s) %s activation %.3f on clean images -> %.3f with the trigger", neurons.tolist(), base, trig)
        info = {**_jsonable(params), "size": list(size), "position": [r, col],
                "bbox": [r, col, r + size[0], col + size[1]], "grid4_aligned": _grid_aligned(r, col, size),
                "layer": "input of the classification layer", "neuron_indices": neurons.tolist(),
                "neuron_weight_strength": [round(float(v), 4) for v in strength],
                "activation_clean": round(base, 4), "activation_triggered": round(trig, 4),
                "activation_first_step": round(first, 4)}
        return Trigger(mask, pattern.detach(), target, "trojan", info)


def _mean_activation(model: ModelWrapper, head: torch.nn.Module, x: torch.Tensor, neurons: torch.Tensor,
                     stamp: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    xs = x if stamp is None else (1 - stamp[0]) * x + stamp[0] * stamp[1]
    return float(_features(model, head, xs)[:, neurons].mean())


class _TransformAttack(Attack):
    """An attack whose trigger is a :class:`~bdscan.lab.attacks_transform.TransformTrigger` built by ``build``."""

    build: ClassVar[Callable[..., Trigger]]

    def make_trigger(self, params: Any, target: int, input_size: tuple[int, int, int],
                     model: ModelWrapper | None = None, x: torch.Tensor | None = None,
                     progress: Progress | None = None) -> Trigger:
        return type(self).build(params, target, tuple(input_size))


@register_attack
class SIG(_TransformAttack):
    name = "sig"
    Params = SIGParams
    build = staticmethod(sig_trigger)


@register_attack
class WaNet(_TransformAttack):
    name = "wanet"
    Params = WaNetParams
    build = staticmethod(wanet_trigger)


@register_attack
class ISSBA(_TransformAttack):
    name = "issba"
    Params = ISSBAParams
    build = staticmethod(issba_trigger)


def rebuild_trigger(stored: Trigger) -> Trigger:
    """The exact trigger of a lab model from the one its file stores.

    A file stores a trigger as mask and pattern; for the transform attacks (``params["stamp"] ==
    "transform"``: SIG, WaNet, ISSBA) those are only a picture, and the transform is rebuilt here from the
    recorded parameters. Stamp triggers are returned as they are.
    """
    if stored.params.get("stamp") != TRANSFORM_STAMP:
        return stored
    name = str(stored.params.get("attack", stored.kind))
    if name not in ATTACKS:
        raise UsageError(f"the stored trigger's attack {name!r} is not known to this bdscan", "upgrade bdscan")
    known = {f.name for f in fields(ATTACKS[name].Params)}
    params = {k: v for k, v in stored.params.items() if k in known}
    c, h, w = int(stored.pattern.shape[0]), int(stored.pattern.shape[1]), int(stored.pattern.shape[2])
    return make_trigger(AttackConfig(name, int(stored.target or 0), params), (c, h, w))


def parse_attack_params(name: str, items: Sequence[str]) -> dict[str, Any]:
    """``["size=4", "position=24,24", "colour=1,1,0"]`` -> ``{"size": 4, "position": (24, 24), ...}`` for the CLI.

    Values are read as JSON when they parse (numbers, lists), as tuples of numbers when comma-separated
    (parentheses optional), else as strings. Unknown keys raise :class:`UsageError` naming the known ones.
    """
    if name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}", f"use one of: {', '.join(sorted(ATTACKS))}")
    known = {f.name for f in fields(ATTACKS[name].Params)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"attack parameter {item!r} is not key=value", "write e.g. size=4 or position=bottom-right")
        if key not in known:
            raise UsageError(f"{name}: unknown parameter {key!r}", f"known: {', '.join(sorted(known))}")
        out[key] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    import json

    try:
        v = json.loads(raw)
        return tuple(v) if isinstance(v, list) else v
    except json.JSONDecodeError:
        pass
    inner = raw.strip("()[] ")
    if "," in inner:
        try:
            nums = [float(p) for p in inner.split(",")]
        except ValueError:
            return raw
        return tuple(int(n) if n.is_integer() and "." not in p else n for n, p in zip(nums, inner.split(","), strict=True))
    return raw


def attack_params_help(name: str) -> dict[str, Any]:
    """Each parameter of attack ``name`` with its default (for ``--help`` texts)."""
    if name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}", f"use one of: {', '.join(sorted(ATTACKS))}")
    return _jsonable(ATTACKS[name].Params())


def make_trigger(
    attack: AttackConfig,
    input_size: tuple[int, int, int],
    model: ModelWrapper | None = None,
    x: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> Trigger:
    """The trigger of ``attack`` for images of ``input_size`` (C, H, W).

    ``model`` (the clean model) and ``x`` (clean [0, 1] images) are needed by attacks whose trigger is
    computed from the model (``trojan``).
    """
    if attack.name not in ATTACKS:
        raise UsageError(f"unknown attack {attack.name!r}", f"use one of: {', '.join(sorted(ATTACKS))}")
    impl = ATTACKS[attack.name]
    return impl.make_trigger(impl.params(attack.params), int(attack.target), input_size, model, x, progress)
