"""Grounding DINO builds from the composed config with random weights; outputs have the documented shapes
and -inf pattern; cached text equals the full forward; the forward exports to ONNX and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_GDINO, export_onnx
from groundlab.text.captions import class_prompt
from groundlab.text.tokens import PromptEncoder
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.criterion import build_criterion


@pytest.fixture(scope="module")
def tiny(compose, tokenizer):
    torch.manual_seed(0)
    cfg = compose(TINY_GDINO)
    model = build_gdino(cfg.model).model.eval()
    enc = PromptEncoder(tokenizer, cfg.model.max_text_len)
    text = enc.encode([class_prompt(["cat", "race car"]), class_prompt(["dog", "car", "bird"])])
    images = torch.randn(2, 3, 96, 128)
    return model, text, images


def run(model, text, images, padding_mask=None):
    with torch.no_grad():
        return model(images, text["input_ids"], text["attention_mask"], text["token_type_ids"],
                     text["position_ids"], text["text_self_attention_mask"], padding_mask)


def test_output_contract(tiny):
    model, text, images = tiny
    out = run(model, text, images)
    assert out["pred_logits"].shape == (2, 20, 256) and out["pred_boxes"].shape == (2, 20, 4)
    L = text["input_ids"].shape[1]
    valid = text["attention_mask"].bool()
    finite = torch.isfinite(out["pred_logits"])
    assert torch.equal(finite[:, 0, :L], valid) and not finite[:, :, L:].any()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1 and out["interm_outputs"]["pred_logits"].shape == (2, 20, 256)


def test_cached_text_equals_full_forward(tiny):
    """Inference encodes a prompt once and broadcasts it over a batch of different images: each image's
    result is the one the full forward gives that image alone."""
    model, text, images = tiny
    one = {k: v[:1] for k, v in text.items() if torch.is_tensor(v)}
    with torch.no_grad():
        enc = model.encode_text(one["input_ids"], one["attention_mask"], one["token_type_ids"],
                                one["position_ids"], one["text_self_attention_mask"])
        batch = model.forward_with_text(images, enc)  # text batch 1 broadcast over 2 images
    for b in range(2):
        full = run(model, one, images[b : b + 1])
        assert torch.allclose(batch["pred_boxes"][b], full["pred_boxes"][0], atol=1e-5)
        fin = torch.isfinite(full["pred_logits"][0])
        assert torch.equal(torch.isfinite(batch["pred_logits"][b]), fin)
        assert torch.allclose(batch["pred_logits"][b][fin], full["pred_logits"][0][fin], atol=1e-4)
    assert not torch.allclose(batch["pred_boxes"][0], batch["pred_boxes"][1])  # the rows are different images


def test_sub_sentence_inputs_are_derived_when_absent(tiny):
    """Without a sub-sentence mask and position ids the model derives them from its phrase delimiters: the
    same outputs as the PromptEncoder's, and not those of plain full attention over the caption."""
    model, text, images = tiny
    with torch.no_grad():
        derived = model(images, text["input_ids"], text["attention_mask"])
    given = run(model, text, images)
    assert torch.allclose(derived["pred_boxes"], given["pred_boxes"], atol=1e-6)
    valid = text["attention_mask"].bool()
    L = valid.shape[1]
    full_attention = valid[:, :, None] & valid[:, None, :] | torch.eye(L, dtype=torch.bool)
    plain = {**text, "text_self_attention_mask": full_attention,
             "position_ids": torch.arange(L).expand_as(text["input_ids"])}
    assert not torch.equal(full_attention, text["text_self_attention_mask"])
    assert not torch.allclose(run(model, plain, images)["pred_boxes"], derived["pred_boxes"], atol=1e-4)


def test_padding_mask_is_used(tiny):
    model, text, images = tiny
    pad = torch.zeros(2, 96, 128, dtype=torch.bool)
    pad[:, :, 96:] = True
    a, b = run(model, text, images), run(model, text, images, pad)
    assert not torch.allclose(a["pred_boxes"], b["pred_boxes"])


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    model, text, images = tiny
    sess, inputs = export_onnx(model, images, text, tmp_path / "gdino.onnx")
    for b in (2, 1):  # dynamic batch
        logits, boxes = sess.run(None, {n: a[:b].numpy() for n, a in inputs.items()})
        ref = run(model, {k: v[:b] for k, v in text.items() if torch.is_tensor(v)}, images[:b])
        ref_logits = ref["pred_logits"].numpy()
        finite = np.isfinite(ref_logits)
        assert (np.isfinite(logits) == finite).all()
        assert np.abs(logits[finite] - ref_logits[finite]).max() < 1e-4
        assert np.abs(boxes - ref["pred_boxes"].numpy()).max() < 1e-4


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def _nonzero(g) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def test_proposal_loss_reaches_the_encoder_proposal_box_head(compose, tokenizer):
    """The encoder-proposal ("_interm") box terms train transformer.enc_out_bbox_embed; the decoder's losses
    do not (the decoder starts from detached proposals) and neither does the proposals' class term."""
    torch.manual_seed(0)
    cfg = compose(TINY_GDINO)
    model = build_gdino(cfg.model).model.train()
    criterion = build_criterion(cfg.model)
    head = model.transformer.enc_out_bbox_embed
    text = PromptEncoder(tokenizer, cfg.model.max_text_len).encode([class_prompt(["cat", "dog"])] * 2)
    boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    targets = [{"boxes": b, "positive_map": text["positive_maps"][i][: len(b)]} for i, b in enumerate(boxes)]
    images = torch.randn(2, 3, 64, 96)

    def losses():
        out = model(images, text["input_ids"], text["attention_mask"], text["token_type_ids"],
                    text["position_ids"], text["text_self_attention_mask"])
        return criterion(out, targets)

    # at initialisation the head's last layer is zero (proposals pass unchanged): that layer learns first
    first = losses()
    box_terms = criterion.weighted_total({k: first[k] for k in ("loss_bbox_interm", "loss_giou_interm")})
    assert all(_nonzero(g) for g in _grads(box_terms, list(head.layers[-1].parameters())))

    with torch.no_grad():  # a trained head: every layer on the gradient path
        head.layers[-1].weight.normal_(0, 0.1)
    params = list(head.parameters())
    loss = losses()
    interm = {k: v for k, v in loss.items() if k.endswith("_interm")}
    rest = {k: v for k, v in loss.items() if not k.endswith("_interm")}
    assert set(interm) == {"loss_ce_interm", "loss_bbox_interm", "loss_giou_interm"} and rest
    assert all(_nonzero(g) for g in _grads(criterion.weighted_total(interm), params))
    assert not any(_nonzero(g) for g in _grads(criterion.weighted_total(rest), params))
    assert not any(_nonzero(g) for g in _grads(interm["loss_ce_interm"], params))
    # the decoder losses do train the decoder's box head (so the zeros above are not a broken graph)
    decoder_head = list(model.bbox_embed[-1].layers[-1].parameters())
    assert all(_nonzero(g) for g in _grads(criterion.weighted_total(rest), decoder_head))
