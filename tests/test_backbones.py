"""Backbones from transformers configs (Swin-T/B/L presets, ResNet-50) at strides 8/16/32, and
`model.pretrained_backbone_path` in the layouts users have (HF directory, original Swin .pth, a whole
Grounding DINO checkpoint); mismatches are reported by name."""

from __future__ import annotations

import math

import pytest
import torch

from groundlab.models.common.backbone import BACKBONES, FrozenBatchNorm2d, ImageBackbone, backbone_config
from groundlab.models.common.backbone_weights import BackboneWeightError, load_backbone_weights

TINY_SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7)


# Each preset's own patch size, window and stage layout, made narrow and one block deep so it builds fast:
# the strides come from the architecture, not the widths.
NARROW = {"swin": {"embed_dim": 16, "num_heads": [1, 1, 2, 2], "depths": [1, 1, 1, 1]},
          "resnet": {"depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 8}}


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [(64, 96), (70, 100)])  # divisible by 32, and not (every stage rounds up)
def test_presets_return_feature_maps_at_strides_8_16_32(name, size):
    h, w = size
    bb = ImageBackbone(name, [1, 2, 3], NARROW["swin" if name.startswith("swin") else "resnet"]).eval()
    pad = torch.zeros(1, h, w, dtype=torch.bool)
    pad[:, :, w // 2:] = True  # the right half is padding
    with torch.no_grad():
        out = bb(torch.randn(1, 3, h, w), pad)
    assert [tuple(f.shape[-2:]) for f, _ in out] == [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32)]
    assert [f.shape[1] for f, _ in out] == bb.channels  # what the input projections are built for
    for f, m in out:  # each level's padding mask has its map's size and keeps the padded side
        assert m.shape == (1, *f.shape[-2:]) and m.dtype == torch.bool
        assert not m[0, :, 0].any() and m[0, :, -1].all()


def test_resnet_batch_norms_are_frozen():
    bb = ImageBackbone("resnet_50", [1, 2, 3], NARROW["resnet"])
    frozen = [m for m in bb.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert not any(True for m in frozen for _ in m.parameters())  # statistics and affine: nothing trains
    bb.train()
    x, pad = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        first = [f for f, _ in bb(x, pad)]
        second = [f for f, _ in bb(x[:1], pad[:1])]  # batch statistics would change image 0's features
    assert all(torch.allclose(a[:1], b, atol=1e-5) for a, b in zip(first, second))


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match="embed_dimm"):
        backbone_config("swin_tiny_224_1k", [1, 2, 3], {"embed_dimm": 3})


def _swin_pair():
    torch.manual_seed(0)
    src = ImageBackbone("swin_tiny_224_1k", [1, 2, 3], TINY_SWIN)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.1)
    dst = ImageBackbone("swin_tiny_224_1k", [1, 2, 3], TINY_SWIN)
    return src, dst


def _same_features(a, b):
    a.eval(), b.eval()  # drop path is on in training mode
    x, m = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        return all(torch.allclose(fa, fb, atol=1e-5) for (fa, _), (fb, _) in zip(a(x, m), b(x, m)))


def test_hf_directory_and_grounding_dino_checkpoint(tmp_path):
    src, dst = _swin_pair()
    src.body.save_pretrained(tmp_path / "hf_swin")
    load_backbone_weights(dst.body, str(tmp_path / "hf_swin"))
    assert _same_features(src, dst)
    _, dst2 = _swin_pair()
    torch.save({"model": {f"backbone.body.{k}": v for k, v in src.body.state_dict().items()}}, tmp_path / "gd.pth")
    load_backbone_weights(dst2.body, str(tmp_path / "gd.pth"))
    assert _same_features(src, dst2)


# original Swin block names -> ours, written out here (not taken from swin_keys) so the test checks the conversion
_BLOCK_NAMES = {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _microsoft_swin_layout(body) -> dict:
    """`body`'s weights in the original Microsoft Swin-Transformer classification checkpoint layout: fused
    qkv (rows q, k, v), the relative position index and shifted-window attn_mask buffers, patch merging, a
    final `norm` and a `head`, no per-stage output norms."""
    sd, out, ws = body.state_dict(), {}, TINY_SWIN["window_size"]
    for kind in ("weight", "bias"):
        out[f"patch_embed.proj.{kind}"] = sd[f"swin.embeddings.patch_embeddings.projection.{kind}"]
        out[f"patch_embed.norm.{kind}"] = sd[f"swin.embeddings.norm.{kind}"]
    for i, depth in enumerate(TINY_SWIN["depths"]):
        for j in range(depth):
            ours, orig = f"swin.encoder.layers.{i}.blocks.{j}.", f"layers.{i}.blocks.{j}."
            for kind in ("weight", "bias"):
                out[orig + f"attn.qkv.{kind}"] = torch.cat([sd[ours + f"attention.{n}_proj.{kind}"] for n in "qkv"])
                for o, n in _BLOCK_NAMES.items():
                    out[orig + f"{o}.{kind}"] = sd[ours + f"{n}.{kind}"]
            out[orig + "attn.relative_position_bias_table"] = sd[
                ours + "attention.relative_position_bias.relative_position_bias_table"]
            out[orig + "attn.relative_position_index"] = torch.zeros(ws * ws, ws * ws, dtype=torch.long)
            if j % 2:
                out[orig + "attn_mask"] = torch.zeros(4, ws * ws, ws * ws)
        if i < len(TINY_SWIN["depths"]) - 1:
            out[f"layers.{i}.downsample.reduction.weight"] = sd[f"swin.encoder.layers.{i}.downsample.reduction.weight"]
            for kind in ("weight", "bias"):
                out[f"layers.{i}.downsample.norm.{kind}"] = sd[f"swin.encoder.layers.{i}.downsample.norm.{kind}"]
    out["norm.weight"], out["norm.bias"] = torch.ones(256), torch.zeros(256)
    out["head.weight"], out["head.bias"] = torch.randn(10, 256), torch.zeros(10)
    return {"model": out}


def test_original_swin_classification_checkpoint_loads_every_stage(tmp_path):
    src, dst = _swin_pair()
    source = src.body.state_dict()
    before = {k: v.clone() for k, v in dst.body.state_dict().items()}
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(_microsoft_swin_layout(src.body), path)
    fresh = load_backbone_weights(dst.body, str(path))
    assert sorted(fresh) == sorted(k for k in before if k.startswith(("hidden_states_norms.", "swin.layernorm.")))

    loaded = dst.body.state_dict()
    checked = {k for k in loaded if k not in fresh}
    assert checked == set(source) - set(fresh)
    for key in sorted(checked):  # every tensor of every stage: the source's, and not what dst started with
        assert torch.equal(loaded[key], source[key]), key
        assert not torch.equal(before[key], source[key]), key
    stages = {k.split(".")[3] for k in checked if k.startswith("swin.encoder.layers.")}
    blocks = {k.split(".blocks.")[1].split(".")[0] for k in checked if ".layers.2.blocks." in k}
    assert stages == {"0", "1", "2", "3"} and blocks == {"0", "1"}
    assert any(k.startswith("swin.embeddings.") for k in checked)

    with torch.no_grad():  # with the output norms copied too, every stage's features agree
        for name, norm in src.body.hidden_states_norms.items():
            dst.body.hidden_states_norms[name].load_state_dict(norm.state_dict())
    assert _same_features(src, dst)


def test_wrong_backbone_weights_are_named(tmp_path):
    src, _ = _swin_pair()
    other = ImageBackbone("swin_tiny_224_1k", [1, 2, 3], dict(TINY_SWIN, embed_dim=48, num_heads=[2, 2, 4, 8]))
    src.body.save_pretrained(tmp_path / "hf_swin")
    with pytest.raises(BackboneWeightError, match="embeddings"):
        load_backbone_weights(other.body, str(tmp_path / "hf_swin"))
