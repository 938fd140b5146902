"""Backbones from transformers configs (Swin-T/B/L presets, ResNet-50) at strides 8/16/32, and
`model.pretrained_backbone_path` in the layouts users have (HF directory, original Swin .pth, a whole
Grounding DINO checkpoint); mismatches are reported by name."""

from __future__ import annotations

import pytest
import torch

from groundlab.models.common.backbone import BACKBONES, ImageBackbone, backbone_config
from groundlab.models.common.backbone_weights import BackboneWeightError, load_backbone_weights

TINY_SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7)


@pytest.mark.parametrize("name", BACKBONES)
def test_presets_build_configs_with_strides_8_16_32(name):
    cfg = backbone_config(name, [1, 2, 3])
    assert cfg.out_features == ["stage2", "stage3", "stage4"]


def test_resnet_backbone_features_and_frozen_bn():
    bb = ImageBackbone("resnet_50", [1, 2, 3], {"depths": [1, 1, 1, 1]})
    assert bb.channels == [512, 1024, 2048]
    out = bb(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert [tuple(f.shape[-2:]) for f, _ in out] == [(8, 12), (4, 6), (2, 3)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())


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


def test_original_swin_classification_checkpoint(tmp_path):
    from groundlab.models.common.swin_keys import hf_swin_to_idea

    src, dst = _swin_pair()
    original = hf_swin_to_idea(src.body.state_dict())
    original = {k: v for k, v in original.items() if not k.startswith("norm")}  # classifiers have no out norms
    original["head.weight"] = torch.zeros(10, 256)
    original["norm.weight"] = torch.ones(256)
    torch.save({"model": original}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    fresh = load_backbone_weights(dst.body, str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    assert fresh and all(k.startswith(("hidden_states_norms.", "swin.layernorm.")) for k in fresh)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the stages agree before the (fresh) output norms
        a = src.body.swin.embeddings(x)[0]
        b = dst.body.swin.embeddings(x)[0]
    assert torch.allclose(a, b)


def test_wrong_backbone_weights_are_named(tmp_path):
    src, _ = _swin_pair()
    other = ImageBackbone("swin_tiny_224_1k", [1, 2, 3], dict(TINY_SWIN, embed_dim=48, num_heads=[2, 2, 4, 8]))
    src.body.save_pretrained(tmp_path / "hf_swin")
    with pytest.raises(BackboneWeightError, match="embeddings"):
        load_backbone_weights(other.body, str(tmp_path / "hf_swin"))
