"""The research paper's six architecture families, sized to train on 2 CPU cores at 32×32.

Every architecture is registered into timm's registry (``@register_model``) so that
``timm.create_model("bdscan_vit", num_classes=43)`` builds ours exactly as it builds timm's own.
Transformer variants reuse timm's implementations (VisionTransformer, VisionTransformerDistilled,
ConVit, Block); only the 6-layer CNN and the Compact Convolutional Transformer's tokenizer and
sequence pooling are written here, because timm has no such models.

Reference: Raj, Roy, Das, Mondal, "We must protect the Transformers", section 3.1.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.convit import ConVit
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

#: default input size of every bdscan architecture (C, H, W)
DEFAULT_INPUT = (3, 32, 32)


#: keys timm's factory adds for pretrained weights, which our from-scratch models do not use
_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _img_size(kwargs: dict[str, Any]) -> int:
    """Pops ``img_size`` (int or (H, W)) and timm's pretrained-weight keys from ``kwargs``."""
    for key in _TIMM_FACTORY_KEYS:
        kwargs.pop(key, None)
    size = kwargs.pop("img_size", 32)
    return int(size[-1]) if isinstance(size, (tuple, list)) else int(size)


def _no_pretrained(pretrained: bool) -> None:
    if pretrained:
        # bdscan never downloads weights: models are trained from scratch or loaded from a file.
        raise ValueError("bdscan architectures have no pretrained weights; load a checkpoint instead")


class CNN6(nn.Module):
    """A 6-layer CNN (4 conv + 2 linear), the paper's "6 layer CNN" baseline.

    Input (N, 3, H, W) normalised; output logits (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc1 = nn.Linear(2 * w * 16, 128)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(128, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(torch.flatten(self.features(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.forward_features(x)))


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer: ``n`` × (conv 3×3 stride 1 → ReLU → max-pool 3×3 stride 2).

    Input (N, C, H, W); output tokens (N, H/2^n · W/2^n, dim). Unlike a ViT patch embedding its
    tokens overlap: :attr:`footprint`, :attr:`stride` and :attr:`offset` describe which pixels each
    token sees (the patch-level scan counts tokens through them).
    """

    def __init__(self, in_chans: int, dim: int, n_layers: int = 2, hidden: int = 64) -> None:
        super().__init__()
        chans = [in_chans] + [hidden] * (n_layers - 1) + [dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1, padding=1, bias=False),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        self.layers = nn.Sequential(*layers)
        # Receptive field arithmetic, done from the layers themselves so it stays right if they change.
        rf, jump, offset = 1, 1, 0
        for m in self.layers:
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k = m.kernel_size[0] if isinstance(m.kernel_size, tuple) else m.kernel_size
                s = m.stride[0] if isinstance(m.stride, tuple) else m.stride
                p = m.padding[0] if isinstance(m.padding, tuple) else m.padding
                offset -= p * jump
                rf += (k - 1) * jump
                jump *= s
        self.footprint, self.stride, self.offset = rf, jump, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(2).transpose(1, 2)


class CCT(nn.Module):
    """Compact Convolutional Transformer (Hassani et al. 2021): conv tokenizer + encoder + sequence pooling.

    Input (N, 3, H, W) normalised; output logits (N, num_classes).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 2.0,
        n_conv_layers: int = 2,
    ) -> None:
        super().__init__()
        self.tokenizer = ConvTokenizer(in_chans, embed_dim, n_conv_layers)
        grid = img_size // (2**n_conv_layers)
        self.grid_size = (grid, grid)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.attention_pool = nn.Linear(embed_dim, 1)  # sequence pooling weights
        self.head = nn.Linear(embed_dim, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.tokenizer(x) + self.pos_embed))
        w = torch.softmax(self.attention_pool(x), dim=1)  # (N, T, 1)
        return (w.transpose(1, 2) @ x).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model
def bdscan_cnn6(pretrained: bool = False, **kwargs: Any) -> CNN6:
    """6-layer CNN (4 conv, 2 linear), about 0.2 M parameters."""
    _no_pretrained(pretrained)
    return CNN6(img_size=_img_size(kwargs), **kwargs)


@register_model
def bdscan_resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a CIFAR stem (3×3 conv stride 1, no max-pool), base width 16 for 2-core training."""
    _no_pretrained(pretrained)
    _img_size(kwargs)
    model = ResNet(BasicBlock, [2, 2, 2, 2], base_width=64, **kwargs)
    # timm's ResNet has no width multiplier for BasicBlock, so rebuild at width 16 by swapping layers.
    width = 16
    in_chans = kwargs.get("in_chans", 3)
    model.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    inplanes = width
    for i, name in enumerate(["layer1", "layer2", "layer3", "layer4"]):
        planes = width * 2**i
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(inplanes, planes, stride=stride, downsample=down), BasicBlock(planes, planes)]
        setattr(model, name, nn.Sequential(*blocks))
        inplanes = planes
    model.num_features = model.head_hidden_size = inplanes
    model.fc = nn.Linear(inplanes, model.num_classes)
    model.feature_info = []
    return model


def _vit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    base = dict(img_size=_img_size(kwargs), patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)
    base.update(kwargs)
    return base


@register_model
def bdscan_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 4×4 patches (8×8 token grid at 32×32), dim 96, depth 4, 3 heads."""
    _no_pretrained(pretrained)
    return VisionTransformer(**_vit_kwargs(kwargs))


@register_model
def bdscan_deit(pretrained: bool = False, **kwargs: Any) -> VisionTransformerDistilled:
    """DeiT (with its distillation token and head), same trunk as :func:`bdscan_vit`."""
    _no_pretrained(pretrained)
    return VisionTransformerDistilled(**_vit_kwargs(kwargs))


@register_model
def bdscan_convit(pretrained: bool = False, **kwargs: Any) -> ConVit:
    """ConViT (gated positional self-attention in the first 3 of 4 blocks), 4×4 patches, 3 heads × 32."""
    _no_pretrained(pretrained)
    base = dict(
        img_size=_img_size(kwargs), patch_size=4, embed_dim=32, depth=4, num_heads=3, mlp_ratio=2.0,
        local_up_to_layer=3, locality_strength=1.0,
    )
    base.update(kwargs)
    return ConVit(**base)


@register_model
def bdscan_cct(pretrained: bool = False, **kwargs: Any) -> CCT:
    """Compact Convolutional Transformer: 2-layer conv tokenizer (8×8 tokens), 4 blocks, sequence pooling."""
    _no_pretrained(pretrained)
    return CCT(img_size=_img_size(kwargs), **kwargs)


#: the paper's six families, in the paper's order: registry name -> family label
BDSCAN_ARCHS: dict[str, str] = {
    "bdscan_cnn6": "6-layer CNN",
    "bdscan_resnet18": "ResNet-18",
    "bdscan_vit": "ViT",
    "bdscan_deit": "DeiT",
    "bdscan_convit": "ConViT",
    "bdscan_cct": "Compact Convolutional Transformer",
}
