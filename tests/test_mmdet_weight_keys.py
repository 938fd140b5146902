"""mmdetection GroundingDINO (MM-Grounding-DINO) checkpoints load into our Grounding DINO, without mmengine, on a
tiny random model, offline.

The mmdetection-layout file is made independently of groundlab.models.gdino.mmdet_keys: our state dict goes to
IDEA's layout (weight_keys.ours_to_idea, proven by the HF parity tests), then through a re-implementation of
mmdetection's own `tools/model_converters/groundingdino_to_mmdet.py` (its string replacements, in its order),
plus the tensors that converter never sees because IDEA has none (from mmdet's module structure: the
contrastive heads' `bias` in `bbox_head.cls_branches`, the denoising `dn_query_generator.label_embedding`, the
persistent buffers)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from conftest import TINY_GDINO
from groundlab.models.gdino import mmdet_keys as M
from groundlab.models.gdino import weight_keys as W
from groundlab.models.gdino.weights import WeightLoadError, load_state, load_weights

# MM-Grounding-DINO's head (configs/mm_grounding_dino/grounding_dino_swin-t_pretrain_obj365.py): contrastive
# log_scale 'auto' + bias, separate per-layer heads (with_box_refine), denoising table of 256 rows
MM_HEAD = ["model.log_scale=auto", "model.class_embed_bias=true", "model.dec_pred_bbox_embed_share=false",
           "model.dec_pred_class_embed_share=false", "model.dn_number=10", "model.dn_labelbook_size=255"]
N_DEC = 2  # TINY_GDINO's decoder layers
MM_CFG_TEXT = ("model = dict(\n    type='GroundingDINO',\n    bbox_head=dict(\n        type='GroundingDINOHead',\n"
               "        num_classes=256,\n        contrastive_cfg=dict(max_text_len=256, log_scale='auto', bias=True),\n"
               "    ))\n")


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():  # distinct values everywhere (zero-initialised heads would hide swaps)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_mm(compose):
    from groundlab.models.gdino.build import build_gdino

    return _random(build_gdino(compose(TINY_GDINO + MM_HEAD).model).model)


def _fresh(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.uniform_(-1, 1)
    return other


# ------------------------------------------------ mmdetection's groundingdino_to_mmdet.py, re-implemented


def _correct_unfold_reduction_order(x):
    out_channel, in_channel = x.shape
    x = x.reshape(out_channel, 4, in_channel // 4)
    return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)


def _correct_unfold_norm_order(x):
    in_channel = x.shape[0]
    x = x.reshape(4, in_channel // 4)
    return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)


def _groundingdino_to_mmdet(ckpt, n_dec):
    """convert() of mmdetection's tools/model_converters/groundingdino_to_mmdet.py (its `reg_branches.6` is the
    number of decoder layers there); keys it skips are returned apart."""
    new_ckpt, skipped = {}, []
    for k, v in ckpt.items():
        new_v = v
        if "module" not in k:
            k = "module." + k
        if "module.bbox_embed" in k:
            k = k.replace("module.bbox_embed", "module.transformer.decoder.bbox_embed")
        if "module.backbone.0" in k:
            new_k = k.replace("module.backbone.0", "backbone")
            if "patch_embed.proj" in new_k:
                new_k = new_k.replace("patch_embed.proj", "patch_embed.projection")
            elif "pos_drop" in new_k:
                new_k = new_k.replace("pos_drop", "drop_after_pos")
            if "layers" in new_k:
                new_k = new_k.replace("layers", "stages")
                if "mlp.fc1" in new_k:
                    new_k = new_k.replace("mlp.fc1", "ffn.layers.0.0")
                elif "mlp.fc2" in new_k:
                    new_k = new_k.replace("mlp.fc2", "ffn.layers.1")
                elif "attn" in new_k:
                    new_k = new_k.replace("attn", "attn.w_msa")
                if "downsample" in k:
                    if "reduction." in k:
                        new_v = _correct_unfold_reduction_order(v)
                    elif "norm." in k:
                        new_v = _correct_unfold_norm_order(v)
        elif "module.bert" in k:
            new_k = k.replace("module.bert", "language_model.language_backbone.body.model")
        elif "module.feat_map" in k:
            new_k = k.replace("module.feat_map", "text_feat_map")
        elif "module.input_proj" in k:
            new_k = k.replace("module.input_proj", "neck.convs")
            if "neck.convs.3" in new_k:
                new_k = new_k.replace("neck.convs.3", "neck.extra_convs.0")
            for a, b in (("0.weight", "conv.weight"), ("0.bias", "conv.bias"), ("1.weight", "gn.weight"),
                         ("1.bias", "gn.bias")):
                if a in new_k:
                    new_k = new_k.replace(a, b)
        elif "module.transformer.level_embed" in k:
            new_k = k.replace("module.transformer.level_embed", "level_embed")
        elif "module.transformer.encoder" in k:
            new_k = k.replace("module.transformer.encoder", "encoder")
            for a, b in (("norm1", "norms.0"), ("norm2", "norms.1"), ("norm3", "norms.2"),
                         ("linear1", "ffn.layers.0.0"), ("linear2", "ffn.layers.1")):
                if a in new_k:
                    new_k = new_k.replace(a, b)
            if "text_layers" in new_k and "self_attn" in new_k:
                new_k = new_k.replace("self_attn", "self_attn.attn")
        elif "module.transformer.enc_output" in k:
            if "norm" not in k:
                new_k = k.replace("module.transformer.enc_output", "memory_trans_fc")
            if "module.transformer.enc_output_norm" in k:
                new_k = k.replace("module.transformer.enc_output_norm", "memory_trans_norm")
        elif "module.transformer.enc_out_bbox_embed.layers" in k:
            for layer in range(3):
                if f"module.transformer.enc_out_bbox_embed.layers.{layer}" in k:
                    new_k = k.replace(f"module.transformer.enc_out_bbox_embed.layers.{layer}",
                                      f"bbox_head.reg_branches.{n_dec}.{2 * layer}")
        elif "module.transformer.tgt_embed" in k:
            new_k = k.replace("module.transformer.tgt_embed", "query_embedding")
        elif "module.transformer.decoder" in k:
            new_k = k.replace("module.transformer.decoder", "decoder")
            for a, b in (("norm1", "norms.2"), ("catext_norm", "norms.1"), ("norm2", "norms.0"), ("norm3", "norms.3")):
                if a in new_k:
                    new_k = new_k.replace(a, b)
            if "ca_text" in new_k:
                new_k = new_k.replace("ca_text", "cross_attn_text")
                for a in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                    if a in new_k:
                        new_k = new_k.replace(a, "attn." + a)
            if "linear1" in new_k:
                new_k = new_k.replace("linear1", "ffn.layers.0.0")
            if "linear2" in new_k:
                new_k = new_k.replace("linear2", "ffn.layers.1")
            if "self_attn" in new_k:
                new_k = new_k.replace("self_attn", "self_attn.attn")
            if "bbox_embed" in new_k:
                parts = new_k.split(".")
                new_k = f"bbox_head.reg_branches.{parts[2]}.{2 * int(parts[4])}.{parts[-1]}"
        else:
            skipped.append(k[len("module."):])
            continue
        new_ckpt[new_k] = new_v
    return new_ckpt, skipped


def _mmdet_relative_position_index(ws):
    """mmdet/models/backbones/swin.py WindowMSA: double_step_seq + flip(1)."""
    seq1 = torch.arange(0, (2 * ws - 1) * ws, 2 * ws - 1)
    seq2 = torch.arange(0, ws, 1)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def _mmdet_state(model):
    """Our model's weights laid out exactly as mmdetection's GroundingDINO.state_dict()."""
    idea, unused = W.ours_to_idea(model.state_dict())
    assert unused == []
    # mmdet's SwinTransformer has output norms norm{i} only, no final `norm` (our SwinBackbone's unused
    # swin.layernorm, which ours_to_idea writes as IDEA's `norm`)
    idea = {k: v for k, v in idea.items() if not k.startswith("backbone.0.norm.")}
    mm, skipped = _groundingdino_to_mmdet(idea, N_DEC)
    # IDEA has no contrastive-head parameters nor denoising table: mmdet's names from its modules
    extra = {f"class_embed.{i}.bias": f"bbox_head.cls_branches.{i}.bias" for i in range(N_DEC)}
    extra.update({"transformer.enc_out_class_embed.bias": f"bbox_head.cls_branches.{N_DEC}.bias",
                  "label_enc.weight": "dn_query_generator.label_embedding.weight"})
    assert sorted(skipped) == sorted(extra)
    for ours_name, mm_name in extra.items():
        mm[mm_name] = idea[ours_name]
    # persistent buffers mmdet's modules hold (recomputed by ours)
    for i, depth in enumerate([1, 1, 2, 1]):
        for j in range(depth):
            mm[f"backbone.stages.{i}.blocks.{j}.attn.w_msa.relative_position_index"] = _mmdet_relative_position_index(7)
    mm["language_model.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    return mm


def _save(tmp_path, state, name="grounding_dino_swin-t_pretrain_obj365_goldg_grit9m_v3det.pth", **extra):
    """A published mmdetection checkpoint (publish_model.py: meta + state_dict, legacy serialization)."""
    path = str(tmp_path / name)
    meta = {"cfg": MM_CFG_TEXT, "epoch": 30, "iter": 1000, "seed": 0, "mmengine_version": "0.10.4",
            "dataset_meta": {"classes": ("cat", "dog")}}
    torch.save({"meta": meta, "state_dict": state, **extra}, path, _use_new_zipfile_serialization=False)
    return path


def _predict(model):
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[101, 2000, 2001, 1012, 2003, 1012, 102]])
    with torch.no_grad():
        return model(images, ids, torch.ones_like(ids))


UNUSED_LAYERNORM = ["backbone.body.swin.layernorm.bias", "backbone.body.swin.layernorm.weight"]


def _assert_same_weights(model, reference):
    """Equal tensors everywhere but SwinBackbone's unused final layernorm (not in mmdet files: left as it was)."""
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        if key not in UNUSED_LAYERNORM:
            assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------------------------------------------- tests


def test_mmdet_relative_position_index_is_the_original_formula():
    """So the Swin bias tables copy unchanged (the index buffer itself is dropped and recomputed)."""
    ws = 7
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    assert torch.equal(_mmdet_relative_position_index(ws), rel[..., 0] * (2 * ws - 1) + rel[..., 1])


def test_mmdet_checkpoint_loads_every_tensor_and_predicts_the_same(tiny_mm, tmp_path):
    mm = _mmdet_state(tiny_mm)
    assert M.is_mmdet_state(mm) and not any(k.startswith(("backbone.0.", "transformer.", "bert.")) for k in mm)
    path = _save(tmp_path, mm)
    model = _fresh(tiny_mm)
    report = load_weights(model, path)
    assert report.source == "mmdet" and report.ignored == UNUSED_LAYERNORM and report.new == []
    _assert_same_weights(model, tiny_mm)
    got, want = _predict(model), _predict(tiny_mm)
    assert torch.equal(got["pred_boxes"], want["pred_boxes"])
    assert torch.equal(got["pred_logits"], want["pred_logits"])


def test_mmdet_names_map_where_mmdetection_says(tiny_mm):
    mm = _mmdet_state(tiny_mm)
    ours, unused = M.mmdet_to_ours(mm)
    assert unused == []
    expect = {  # ours <- mmdet (the traps: decoder norm order, the encoder's proposal head, the extra level)
        "transformer.decoder.layers.1.norm2.weight": "decoder.layers.1.norms.0.weight",  # after self-attention
        "transformer.decoder.layers.1.catext_norm.bias": "decoder.layers.1.norms.1.bias",
        "transformer.decoder.layers.1.norm1.weight": "decoder.layers.1.norms.2.weight",  # after image cross-attn
        "transformer.decoder.layers.0.norm3.weight": "decoder.layers.0.norms.3.weight",
        "transformer.decoder.layers.0.self_attn.in_proj_weight": "decoder.layers.0.self_attn.attn.in_proj_weight",
        "transformer.decoder.layers.0.ca_text.out_proj.weight": "decoder.layers.0.cross_attn_text.attn.out_proj.weight",
        "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight":
            "decoder.layers.0.cross_attn.sampling_offsets.weight",
        "transformer.enc_out_bbox_embed.layers.2.weight": f"bbox_head.reg_branches.{N_DEC}.4.weight",
        "transformer.enc_out_class_embed.bias": f"bbox_head.cls_branches.{N_DEC}.bias",
        "bbox_embed.1.layers.1.bias": "bbox_head.reg_branches.1.2.bias",
        "transformer.decoder.bbox_embed.1.layers.1.bias": "bbox_head.reg_branches.1.2.bias",
        "class_embed.1.bias": "bbox_head.cls_branches.1.bias",
        "input_proj.3.0.weight": "neck.extra_convs.0.conv.weight",
        "input_proj.2.1.bias": "neck.convs.2.gn.bias",
        "transformer.tgt_embed.weight": "query_embedding.weight",
        "transformer.enc_output.weight": "memory_trans_fc.weight",
        "transformer.enc_output_norm.bias": "memory_trans_norm.bias",
        "transformer.level_embed": "level_embed",
        "feat_map.weight": "text_feat_map.weight",
        "transformer.encoder.text_layers.1.self_attn.in_proj_bias": "encoder.text_layers.1.self_attn.attn.in_proj_bias",
        "transformer.encoder.layers.0.linear2.weight": "encoder.layers.0.ffn.layers.1.weight",
        "transformer.encoder.fusion_layers.1.gamma_l": "encoder.fusion_layers.1.gamma_l",
        "label_enc.weight": "dn_query_generator.label_embedding.weight",
        "bert.encoder.layer.1.output.dense.weight":
            "language_model.language_backbone.body.model.encoder.layer.1.output.dense.weight",
    }
    for ours_key, mm_key in expect.items():
        assert torch.equal(ours[ours_key], mm[mm_key]), ours_key
    # Swin patch merging: nn.Unfold's channel order back to IDEA's concatenation
    idea, _ = W.ours_to_idea(tiny_mm.state_dict())
    mm_idea, _, _ = M.mmdet_to_idea(mm)
    for key in ("backbone.0.layers.1.downsample.reduction.weight", "backbone.0.layers.1.downsample.norm.bias"):
        assert not torch.equal(mm[key.replace("backbone.0.layers", "backbone.stages")], idea[key])
        assert torch.equal(mm_idea[key], idea[key])


def test_build_from_an_mmdet_file_takes_its_head_settings(compose, tiny_mm, tmp_path):
    """evaluate.checkpoint / inference.checkpoint=<mm_grounding_dino .pth> with the plain gdino model config:
    the head settings come from the file's weights and config text, and the predictions are the same."""
    from groundlab.models.gdino.build import build_gdino

    path = _save(tmp_path, _mmdet_state(tiny_mm))
    assert M.mmdet_model_settings(torch.load(path, weights_only=True)) == {
        "dec_pred_bbox_embed_share": False, "dec_pred_class_embed_share": False, "class_embed_bias": True,
        "log_scale": "auto"}
    built = build_gdino(compose(TINY_GDINO + ["model.dn_number=10", "model.dn_labelbook_size=255"]).model, path)
    assert built.config.log_scale == "auto" and built.config.class_embed_bias is True
    assert built.config.dec_pred_bbox_embed_share is False and built.config.dec_pred_class_embed_share is False
    _assert_same_weights(built.model, tiny_mm)
    assert torch.equal(_predict(built.model.eval())["pred_logits"], _predict(tiny_mm)["pred_logits"])


def test_a_model_built_otherwise_gets_the_overrides_to_set(compose, tiny_mm, tmp_path):
    """train.pretrained_model_path into a model of other head settings: one sentence with the overrides (a
    log_scale None vs 'auto' would load without a missing key and score wrongly)."""
    from groundlab.models.gdino.build import build_gdino

    path = _save(tmp_path, _mmdet_state(tiny_mm))
    plain = build_gdino(compose(TINY_GDINO).model).model
    with pytest.raises(WeightLoadError) as err:
        load_weights(plain, path)
    assert str(err.value) == (
        f"{path}: this mmdetection (MM-Grounding-DINO) checkpoint needs model.dec_pred_bbox_embed_share=false "
        "model.dec_pred_class_embed_share=false model.class_embed_bias=true model.log_scale=auto "
        "(the model was built otherwise)")


def test_separate_heads_into_a_shared_model_are_refused(compose, tiny_mm):
    """A model that shares one box head across layers would keep only the last layer's copy, silently."""
    from groundlab.models.gdino.build import build_gdino

    shared = build_gdino(compose(TINY_GDINO + MM_HEAD + ["model.dec_pred_bbox_embed_share=true"]).model).model
    state, unused = M.mmdet_to_ours(_mmdet_state(tiny_mm))
    assert unused == []
    with pytest.raises(WeightLoadError, match="shares them: set model.dec_pred_bbox_embed_share=false"):
        load_state(shared, state, "mm.pth", "mmdet")


def test_training_checkpoint_bookkeeping_is_read_weights_only(tiny_mm, tmp_path, monkeypatch):
    """An mmengine training checkpoint pickles message_hub HistoryBuffers (numpy inside): read as inert
    stand-ins without mmengine; any other refused global fails with one sentence naming it."""
    import numpy as np

    def fake_class(module_name, cls_name):
        parts = module_name.split(".")
        for n in range(1, len(parts)):  # parent packages, for pickle's import of the class at save time
            monkeypatch.setitem(sys.modules, ".".join(parts[:n]), types.ModuleType(".".join(parts[:n])))
        module = types.ModuleType(module_name)
        cls = type(cls_name, (), {"__module__": module_name})
        setattr(module, cls_name, cls)
        monkeypatch.setitem(sys.modules, module_name, module)
        return cls

    buffer_cls = fake_class("mmengine.logging.history_buffer", "HistoryBuffer")
    history = buffer_cls()
    history._log_history, history._count_history, history.max_length = np.array([1.5, 0.5]), np.array([1, 1]), 10
    hub = {"log_scalars": {"train/loss": history}, "runtime_info": {"epoch": 30, "iter": 1000}}
    path = _save(tmp_path, _mmdet_state(tiny_mm), message_hub=hub, optimizer={"state": {}, "param_groups": []})
    payload = fake_class("payload", "Gadget")
    evil = _save(tmp_path, {"backbone.patch_embed.norm.weight": torch.zeros(1)}, name="evil.pth", message_hub=payload())
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):  # not importable at load
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "payload")

    model = _fresh(tiny_mm)
    assert load_weights(model, path).source == "mmdet"
    _assert_same_weights(model, tiny_mm)
    with pytest.raises(WeightLoadError, match=r"holds the Python object payload\.Gadget, which a weights-only load "
                                              r"refuses to build"):
        load_weights(_fresh(tiny_mm), evil)


def test_incomplete_or_foreign_files_get_one_sentence(tiny_mm, tmp_path):
    mm = _mmdet_state(tiny_mm)
    partial = {k: v for k, v in mm.items() if not k.startswith("decoder.layers.1.")}
    partial["bbox_head.some_new_branch.weight"] = torch.zeros(2)
    with pytest.raises(WeightLoadError) as err:
        load_weights(_fresh(tiny_mm), _save(tmp_path, partial))
    text = str(err.value)
    assert "mmdet weights do not fit the model (check the model config)" in text
    assert "missing: transformer.decoder.layers.1.* (" in text
    assert "unexpected: bbox_head.some_new_branch.weight" in text

    foreign = tmp_path / "foreign.pth"
    torch.save({"meta": {"cfg": "x"}, "state_dict": {"head.fc.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(WeightLoadError, match="unrecognised checkpoint layout: neither groundlab, Hugging Face, "
                                              "IDEA-Research, TAO nor mmdetection"):
        load_weights(_fresh(tiny_mm), str(foreign))
    torch.save({"meta": {"cfg": "x", "epoch": 3}}, foreign)
    with pytest.raises(WeightLoadError, match="not a Grounding DINO checkpoint: no state dict in checkpoint"):
        load_weights(_fresh(tiny_mm), str(foreign))
