"""Positive controls in the Hugging Face layout: a small ``transformers`` ViT or Swin trained here, clean or poisoned
(BadNets, Blended: :mod:`bdscan.lab.attacks`), written as a ``save_pretrained`` folder (needs ``bdscan[hf]``).

The model is trained at the size of the data it is given (e.g. 32×32 images, or 64×64 upsampled ones): a 224×224
ViT cannot be trained on 2 CPU cores in a test's time, and the loader, the token grid from the config and the scan
do not depend on the size. 20 % of each poisoned mini-batch is stamped with the trigger and relabelled to the
target (BadNets, Gu et al. 2017; Blended, Chen et al. 2017).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bdscan.atomic import atomic_path
from bdscan.data import CleanData
from bdscan.errors import UsageError
from bdscan.io.hf_folder import GRIDS, HFLogits, ModelFolderWriter, require_transformers
from bdscan.lab.attacks import AttackConfig, make_trigger
from bdscan.models.wrapper import ModelInfo, ModelWrapper, TokenGrid
from bdscan.trigger import Trigger


@dataclass
class HFControl:
    """A trained Hugging Face positive (or negative) control and where it was written."""

    wrapper: ModelWrapper
    trigger: Trigger | None
    folder: Path


def _config_grid(hf_model: torch.nn.Module, size: tuple[int, int, int]) -> TokenGrid | None:
    """The token grid the folder loader reads from this model's config (:data:`bdscan.io.hf_folder.GRIDS`), so that
    a model made here carries the grid it will have when its written folder is loaded."""
    cfg = hf_model.config.to_dict()
    rule = GRIDS.get(cfg.get("model_type", ""))
    return rule(cfg, size) if rule is not None else None


def _wrap(hf_model: torch.nn.Module, classes: int, size: int) -> ModelWrapper:
    """A transformers image classifier behind bdscan's wrapper: RGB ``size``×``size`` inputs, mean/std 0.5, classes
    named ``class<i>``, the token grid of its config."""
    info = ModelInfo(f"hf:{type(hf_model).__name__}", classes, (3, size, size), (0.5,) * 3, (0.5,) * 3, 1.0,
                     tuple(f"class{i}" for i in range(classes)), token_grid=_config_grid(hf_model, (3, size, size)))
    return ModelWrapper(HFLogits(hf_model), info)


def make_hf_vit(classes: int, size: int, patch: int = 4, hidden: int = 48, layers: int = 2, heads: int = 3) -> ModelWrapper:
    """A small, randomly initialised ``ViTForImageClassification`` behind bdscan's wrapper (mean/std 0.5)."""
    transformers = require_transformers()
    cfg = transformers.ViTConfig(image_size=size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=2 * hidden, num_labels=classes,
                                 id2label={i: f"class{i}" for i in range(classes)},
                                 label2id={f"class{i}": i for i in range(classes)})
    return _wrap(transformers.ViTForImageClassification(cfg), classes, size)


def make_hf_swin(classes: int, size: int, patch: int = 2, window: int = 4, embed: int = 48,
                 depths: tuple[int, ...] = (2, 2), heads: tuple[int, ...] = (3, 6)) -> ModelWrapper:
    """A small, randomly initialised ``SwinForImageClassification`` behind bdscan's wrapper (mean/std 0.5).

    Its token grid is the patch embedding's, as the loader gives a Swin folder (:func:`bdscan.io.hf_folder._swin`):
    ``size // patch`` tokens a side, attention within ``window``×``window``-token windows, merged 2× per stage.
    """
    transformers = require_transformers()
    cfg = transformers.SwinConfig(image_size=size, patch_size=patch, embed_dim=embed, depths=list(depths),
                                  num_heads=list(heads), window_size=window, drop_path_rate=0.0, num_labels=classes,
                                  id2label={i: f"class{i}" for i in range(classes)},
                                  label2id={f"class{i}": i for i in range(classes)})
    return _wrap(transformers.SwinForImageClassification(cfg), classes, size)


#: a transformers ViT layer's parameter names (5.x, 4.x): timm's fused qkv becomes q, k and v
_HF_VIT_LAYER_NAMES: tuple[dict[str, str], ...] = (
    {"prefix": "vit.layers.{i}.", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
     "o": "attention.o_proj", "ln1": "layernorm_before", "ln2": "layernorm_after", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    {"prefix": "vit.encoder.layer.{i}.", "q": "attention.attention.query", "k": "attention.attention.key",
     "v": "attention.attention.value", "o": "attention.output.dense", "ln1": "layernorm_before",
     "ln2": "layernorm_after", "fc1": "intermediate.dense", "fc2": "output.dense"},
)


def timm_vit_to_hf(wrapper: ModelWrapper) -> ModelWrapper:
    """The same network as a ``transformers`` ``ViTForImageClassification``: a timm ``VisionTransformer`` (class
    token, learned position embedding over the class token and the patches, pre-norm blocks with a fused qkv
    projection, exact GELU, final LayerNorm and a linear head on the class token) re-expressed parameter by
    parameter, as transformers' own ``convert_vit_timm_to_pytorch`` script maps them (fused qkv split into query,
    key and value). Input scaling, class names and metadata are kept; the logits agree to float rounding.

    Raises:
        UsageError: the network is not such a ViT (another timm model, a distilled DeiT, global average pooling).
    """
    transformers = require_transformers()
    from timm.models.vision_transformer import VisionTransformer

    net = wrapper.net
    if type(net) is not VisionTransformer or net.cls_token is None or net.global_pool != "token" or net.num_prefix_tokens != 1:
        raise UsageError(f"{wrapper.info.arch}: only a plain timm ViT with a class token converts to a Hugging Face ViT",
                         "convert a bdscan_vit (or timm vit_*) model")
    blocks = list(net.blocks)
    dim, heads = net.embed_dim, blocks[0].attn.num_heads
    patch = int(net.patch_embed.patch_size[0])
    c, h, _ = wrapper.info.input_size
    names = wrapper.info.class_names or tuple(str(i) for i in range(wrapper.num_classes))
    cfg = transformers.ViTConfig(
        image_size=h, patch_size=patch, num_channels=c, hidden_size=dim, num_hidden_layers=len(blocks),
        num_attention_heads=heads, intermediate_size=blocks[0].mlp.fc1.out_features, hidden_act="gelu",
        layer_norm_eps=float(net.norm.eps), qkv_bias=blocks[0].attn.qkv.bias is not None,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=wrapper.num_classes,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        architectures=["ViTForImageClassification"])
    hf = transformers.ViTForImageClassification(cfg)
    src = {k: v.detach().float() for k, v in net.state_dict().items()}
    dst: dict[str, torch.Tensor] = {
        "vit.embeddings.cls_token": src["cls_token"], "vit.embeddings.position_embeddings": src["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "vit.layernorm.weight": src["norm.weight"], "vit.layernorm.bias": src["norm.bias"],
        "classifier.weight": src["head.weight"], "classifier.bias": src["head.bias"],
    }
    have = set(hf.state_dict())
    # transformers 5 names a layer's parameters differently from 4.x; use whichever layout this version has
    layout = next((t for t in _HF_VIT_LAYER_NAMES if f"{t['prefix'].format(i=0)}{t['q']}.weight" in have), None)
    if layout is None:
        raise UsageError(f"transformers {transformers.__version__}: unknown ViT parameter names", "report this version")
    for i in range(len(blocks)):
        b, o = f"blocks.{i}.", layout["prefix"].format(i=i)
        for part, w, bias in zip("qkv", src[b + "attn.qkv.weight"].chunk(3, 0), src[b + "attn.qkv.bias"].chunk(3, 0), strict=True):
            dst[f"{o}{layout[part]}.weight"], dst[f"{o}{layout[part]}.bias"] = w, bias
        for key, timm_name in (("o", "attn.proj"), ("ln1", "norm1"), ("ln2", "norm2"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            for t in ("weight", "bias"):
                dst[f"{o}{layout[key]}.{t}"] = src[f"{b}{timm_name}.{t}"]
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    if unexpected or [k for k in missing if "pooler" not in k]:
        raise UsageError(f"{wrapper.info.arch}: the ViT did not map onto transformers' ViT "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})", "report this model's layout")
    hf.eval()
    info = wrapper.info.with_(arch="hf:ViTForImageClassification", token_grid=_config_grid(hf, wrapper.info.input_size),
                              arch_kwargs={})
    return ModelWrapper(HFLogits(hf), info)


#: converters of a trained base into another library's model (the zoo's folder rows name one): name -> function
CONVERTERS: dict[str, Callable[[ModelWrapper], ModelWrapper]] = {"timm-vit-to-hf": timm_vit_to_hf}


def convert(name: str, wrapper: ModelWrapper) -> ModelWrapper:
    """``wrapper`` converted by the registered converter ``name``."""
    if name not in CONVERTERS:
        raise UsageError(f"unknown model converter {name!r}", f"use one of: {', '.join(CONVERTERS)}")
    return CONVERTERS[name](wrapper)


#: ``train_hf_control``'s architectures: name -> (builder taking (classes, size, patch), default patch size)
ARCHS: dict[str, tuple[Callable[[int, int, int], ModelWrapper], int]] = {
    "vit": (lambda classes, size, patch: make_hf_vit(classes, size, patch), 4),
    "swin": (lambda classes, size, patch: make_hf_swin(classes, size, patch), 2),
}


def train_hf_control(data: CleanData, out: Path, attack: AttackConfig | None = None, epochs: int = 10, seed: int = 0,
                     patch: int | None = None, lr: float = 3e-3, arch: str = "vit") -> HFControl:
    """Trains a small HF model (``arch``: a key of :data:`ARCHS`, ViT or Swin) on ``data`` (poisoned with ``attack``
    when given) and writes it as a model folder ``out``. ``patch``: the patch size (default: 4 for ViT, 2 for Swin)."""
    if arch not in ARCHS:
        raise UsageError(f"unknown HF control architecture {arch!r}", f"use one of: {', '.join(ARCHS)}")
    build, default_patch = ARCHS[arch]
    torch.manual_seed(seed)
    classes = int(data.y.max()) + 1
    size = int(data.x.shape[-1])
    w = build(classes, size, patch if patch is not None else default_patch)
    trigger = make_trigger(attack, (3, size, size)) if attack is not None else None
    opt = torch.optim.Adam(w.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(data.y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, 32):
            idx = perm[s : s + 32]
            xb, yb = data.x[idx].float().clone(), data.y[idx].clone()
            if trigger is not None:
                k = max(1, len(idx) // 5)
                xb[:k] = trigger.stamp(xb[:k])
                yb[:k] = int(trigger.target)
            w.train()
            loss = F.cross_entropy(w(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    w.eval()
    w.requires_grad_(False)
    writer = ModelFolderWriter()
    with atomic_path(Path(out)) as tmp:
        writer.write(w, tmp, {"lab": {"attack": attack.name if attack else None, "epochs": epochs, "seed": seed, "arch": arch}}, trigger)
    return HFControl(w, trigger, Path(out))
