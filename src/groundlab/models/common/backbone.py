"""Image backbones (Swin-T/B/L, ResNet-50) returning the feature maps at strides 8/16/32 (TAO's
`return_interm_indices` [1, 2, 3] = stages 2..4) with their padding masks.

No timm and no torchvision: both build offline from a transformers config and load real weights from a local
path. Swin is groundlab's own implementation (groundlab.models.common.swin: transformers' SwinBackbone keys
and outputs, faster to train on CPU); ResNet-50 is transformers' ResNetBackbone."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

# Architectures by TAO's `model.backbone` names; `backbone_overrides` may change any field.
SWIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "swin_tiny_224_1k": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=224),
    "swin_base_224_22k": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, image_size=224),
    "swin_base_384_22k": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384),
    "swin_large_224_22k": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=7, image_size=224),
    "swin_large_384_22k": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, image_size=384),
}
RESNET_PRESETS: Dict[str, Dict[str, Any]] = {
    "resnet_50": dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64, layer_type="bottleneck"),
}
BACKBONES = tuple(SWIN_PRESETS) + tuple(RESNET_PRESETS)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (detection batches are too small to
    estimate them); same state-dict keys as nn.BatchNorm2d."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                            ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]


def freeze_batch_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d holding its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


def plain(mapping: Mapping[str, Any] | None) -> Dict[str, Any]:
    """A plain dict of Python values (configs hand us OmegaConf containers; transformers' strict configs
    want lists and ints)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(mapping, DictConfig):
        return OmegaConf.to_container(mapping, resolve=True)
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ValueError(f"expected a mapping of config fields, got {mapping!r}")
    return dict(mapping or {})


def backbone_config(name: str, out_indices: Sequence[int], overrides: Mapping[str, Any] | None = None):
    """The transformers config of backbone `name` returning stages out_indices + 1 (stage1 = stride 4)."""
    from transformers import ResNetConfig, SwinConfig

    out_features = [f"stage{i + 1}" for i in out_indices]
    overrides = plain(overrides)
    if name in SWIN_PRESETS:
        config_cls, fields = SwinConfig, {**SWIN_PRESETS[name], "drop_path_rate": 0.2}
    elif name in RESNET_PRESETS:
        config_cls, fields = ResNetConfig, dict(RESNET_PRESETS[name])
    else:
        raise ValueError(f"model.backbone={name!r} is not one of {list(BACKBONES)}")
    known = set(config_cls().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model.backbone_overrides: {unknown} are not fields of {config_cls.__name__}")
    return config_cls(out_features=out_features, **{**fields, **overrides})


class ImageBackbone(nn.Module):
    """Backbone (`body`: groundlab's SwinBackbone or transformers' ResNetBackbone) + padding masks per level.

    forward(images (B, 3, H, W), padding_mask (B, H, W) True on padding) -> [(feature (B, C_l, H_l, W_l),
    mask (B, H_l, W_l))] for the stages in out_indices. `channels` lists C_l."""

    def __init__(self, name: str, out_indices: Sequence[int], overrides: Mapping[str, Any] | None = None):
        super().__init__()
        config = backbone_config(name, out_indices, overrides)
        if name in SWIN_PRESETS:
            from groundlab.models.common.swin import SwinBackbone

            self.body = SwinBackbone(config)
        else:
            from transformers import AutoBackbone

            self.body = AutoBackbone.from_config(config)
            freeze_batch_norm(self.body)
        self.channels: List[int] = list(self.body.channels)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the Swin blocks in backward (training only); ResNet keeps its activations."""
        if hasattr(self.body, "use_checkpoint"):
            self.body.use_checkpoint = enabled

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        maps = self.body(images)
        if not isinstance(maps, tuple):  # transformers' BackboneOutput
            maps = maps.feature_maps
        return [(f, F.interpolate(padding_mask[None].float(), size=f.shape[-2:])[0].bool()) for f in maps]
