"""Grounding DINO builds from the composed config with random weights; outputs have the documented shapes
and -inf pattern; cached text equals the full forward; the forward exports to ONNX and runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_GDINO
from groundlab.text.captions import class_prompt
from groundlab.text.tokens import PromptEncoder
from groundlab.models.gdino.build import build_gdino


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
    model, text, images = tiny
    one = {k: v[:1] for k, v in text.items() if torch.is_tensor(v)}
    full = run(model, one, images[:1])
    with torch.no_grad():
        enc = model.encode_text(one["input_ids"], one["attention_mask"], one["token_type_ids"],
                                one["position_ids"], one["text_self_attention_mask"])
        batch = model.forward_with_text(images[:1].repeat(2, 1, 1, 1), enc)  # text batch 1 broadcast
    assert torch.allclose(batch["pred_boxes"][1], full["pred_boxes"][0], atol=1e-5)
    fin = torch.isfinite(full["pred_logits"][0])
    assert torch.allclose(batch["pred_logits"][1][fin], full["pred_logits"][0][fin], atol=1e-4)


def test_sub_sentence_inputs_are_derived_when_absent(tiny):
    model, text, images = tiny
    with torch.no_grad():
        derived = model(images, text["input_ids"], text["attention_mask"])
    given = run(model, text, images)
    assert torch.allclose(derived["pred_boxes"], given["pred_boxes"], atol=1e-6)


def test_padding_mask_is_used(tiny):
    model, text, images = tiny
    pad = torch.zeros(2, 96, 128, dtype=torch.bool)
    pad[:, :, 96:] = True
    a, b = run(model, text, images), run(model, text, images, pad)
    assert not torch.allclose(a["pred_boxes"], b["pred_boxes"])


def test_onnx_export_matches_pytorch(tiny, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, text, images = tiny

    class Export(torch.nn.Module):
        """TAO/DeepStream input and output names; the model itself is not patched."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
            out = self.m(inputs, input_ids, attention_mask, token_type_ids, position_ids, text_token_mask)
            return out["pred_logits"], out["pred_boxes"]

    # eval() on the wrapper: the exporter restores the wrapper's mode, recursively, when it is done

    names = ["inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask"]
    args = (images, text["input_ids"], text["attention_mask"], text["position_ids"], text["token_type_ids"],
            text["text_self_attention_mask"])
    path = str(tmp_path / "gdino.onnx")
    torch.onnx.export(Export(model).eval(), args, path, input_names=names, output_names=["pred_logits", "pred_boxes"],
                      opset_version=17, dynamic_axes={n: {0: "batch"} for n in names}, dynamo=False)
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b in (2, 1):  # dynamic batch
        feeds = {n: a[:b].numpy() for n, a in zip(names, args)}
        logits, boxes = sess.run(None, feeds)
        ref = run(model, {k: v[:b] for k, v in text.items() if torch.is_tensor(v)}, images[:b])
        ref_logits = ref["pred_logits"].numpy()
        finite = np.isfinite(ref_logits)
        assert (np.isfinite(logits) == finite).all()
        assert np.abs(logits[finite] - ref_logits[finite]).max() < 1e-4
        assert np.abs(boxes - ref["pred_boxes"].numpy()).max() < 1e-4
