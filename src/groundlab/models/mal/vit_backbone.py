"""MAL's image encoder: a plain ViT from transformers (`ViTModel`, whose weights have the same layout as
`ViTMAEModel`, so MAE pretraining loads as it is), sized by `model.arch`, built for the crop size.

`ViTMAEModel` itself is not used for the forward pass: it always shuffles and masks patches (MAE
pretraining); MAL needs every patch in place."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

# TAO's `model.arch` names; the small ones let MAL train on a CPU. Fields are transformers ViTConfig fields.
VIT_PRESETS: Dict[str, Dict[str, int]] = {
    "vit-mae-base/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            patch_size=16),
    "vit-mae-large/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, patch_size=16),
    "vit-mae-huge/14": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                            intermediate_size=5120, patch_size=14),
    "vit-small/16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                         patch_size=16),
    "vit-tiny/16": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                        patch_size=16),
    "vit-micro/8": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                        patch_size=8),
}


def vit_config(arch: str, crop_size: int, overrides: Optional[Mapping[str, Any]] = None):
    """The transformers ViTConfig of `arch` for square `crop_size` inputs (MAE's LayerNorm eps 1e-6)."""
    from transformers import ViTConfig

    from groundlab.models.common.backbone import plain

    if arch not in VIT_PRESETS:
        raise ValueError(f"model.arch={arch!r} is not one of {list(VIT_PRESETS)}")
    fields = {**VIT_PRESETS[arch], "layer_norm_eps": 1e-6, "qkv_bias": True, **plain(overrides)}
    known = set(ViTConfig().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model.vit_overrides: {unknown} are not fields of ViTConfig")
    if crop_size % fields["patch_size"]:
        raise ValueError(f"dataset.crop_size={crop_size} is not a multiple of the patch size {fields['patch_size']} "
                         f"of model.arch={arch}")
    return ViTConfig(image_size=crop_size, **fields)


class DropPath(nn.Module):
    """Stochastic depth: zeroes a whole residual branch per sample (scaled by 1/keep) while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ViTBackbone(nn.Module):
    """forward(images (B, 3, S, S)) -> features (B, C, S/p, S/p) (the patch tokens, CLS dropped).

    `drop_path_rate` (TAO `vit_dpr`): stochastic depth rising linearly over the blocks, applied where
    transformers' ViTLayer applies dropout to each residual branch. `freeze(frozen_stages)`: see there."""

    def __init__(self, arch: str, crop_size: int, drop_path_rate: float = 0.0, overrides=None):
        super().__init__()
        from transformers import ViTModel

        self.config = vit_config(arch, crop_size, overrides)
        self.config._attn_implementation = "sdpa"
        self.vit = ViTModel(self.config, add_pooling_layer=False)
        self.patch_size = self.config.patch_size
        self.channels = self.config.hidden_size
        n = self.config.num_hidden_layers
        for i, layer in enumerate(self.vit.layers):
            if drop_path_rate > 0:
                layer.dropout = DropPath(drop_path_rate * i / max(1, n - 1))

    def freeze(self, frozen_stages) -> None:
        """TAO/MAL `frozen_stages`: [-1] or [0] trains everything; [k] freezes the patch embedding (with the
        CLS token and position embeddings) and blocks 0..k-1; [a, b] freezes blocks a..b-1 (and the embedding
        when a == 0)."""
        stages = [int(v) for v in frozen_stages]
        if len(stages) not in (1, 2):
            raise ValueError(f"model.frozen_stages takes [k] or [start, end], got {stages}")
        start, end = (0, stages[0]) if len(stages) == 1 else stages
        if end <= start or end <= 0:
            return
        if end > len(self.vit.layers):
            raise ValueError(f"model.frozen_stages={stages}: the backbone has {len(self.vit.layers)} blocks")
        self._frozen = ([self.vit.embeddings] if start == 0 else []) + list(self.vit.layers[start:end])
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.keep_frozen_eval()

    def keep_frozen_eval(self) -> None:
        for module in getattr(self, "_frozen", []):
            module.eval()

    def train(self, mode: bool = True):
        """Frozen blocks stay in eval mode (no drop path) whatever mode the rest is put in."""
        super().train(mode)
        self.keep_frozen_eval()
        return self

    def set_activation_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.vit.gradient_checkpointing_disable()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        # Other input sizes (e.g. a flip-test batch at another crop size) interpolate the grid on the fly.
        resize = (h, w) != (self.config.image_size, self.config.image_size)
        hidden = self.vit(pixel_values=images, interpolate_pos_encoding=resize).last_hidden_state
        tokens = hidden[:, 1:]
        gh, gw = h // self.patch_size, w // self.patch_size
        return tokens.transpose(1, 2).reshape(b, self.channels, gh, gw)


def resize_position_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, C) position embeddings (CLS first) -> (1, 1 + grid*grid, C), bicubic on the patch grid."""
    n = pos.shape[1] - 1
    g = int(math.isqrt(n))
    if g * g != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if g == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    c = patches.shape[-1]
    patches = patches.reshape(1, g, g, c).permute(0, 3, 1, 2).float()
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)], dim=1)
