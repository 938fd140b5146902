"""The Grounding DINO predictor: the image backbone runs once per batch however many prompt chunks a class list
needs, each distinct prompt goes through the text encoder once, chunked results equal the full model run per
chunk, and images with different captions in one batch get what each gets alone."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_GDINO
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results
from groundlab.predict.gdino import GDinoPredictor
from groundlab.text.captions import Prompt
from groundlab.text.tokens import PromptEncoder

NAMES = [f"thing{i}" for i in range(40)]  # with max_text_len 32: several prompts


@pytest.fixture(scope="module")
def predictor(compose):
    torch.manual_seed(0)
    cfg = compose(TINY_GDINO + ["model.max_text_len=32"])
    model = build_gdino(cfg.model).model.eval()
    return GDinoPredictor.from_model(model, cfg.model, torch.device("cpu"))


def _images(n=2, h=96, w=128):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, h, w, generator=g)
    padding = torch.zeros(n, h, w, dtype=torch.bool)
    padding[1, :, 100:] = True  # the second image is narrower
    sizes = torch.tensor([[h, w], [h, 100]])
    return images, padding, sizes


def test_backbone_once_per_batch_and_text_once_per_prompt(predictor):
    chunks = len(predictor.chunked(NAMES).prompts)
    assert chunks >= 3
    calls = {"backbone": 0, "bert": 0}
    hooks = [predictor.backend.model.backbone.register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1)),
             predictor.backend.model.bert.register_forward_hook(lambda *a: calls.__setitem__("bert", calls["bert"] + 1))]
    try:
        predictor.texts.clear()
        images, padding, sizes = _images()
        for _ in range(3):  # three batches
            results = predictor.detect_classes(images, padding, sizes, NAMES)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"backbone": 3, "bert": chunks}
    assert len(results) == 2 and all(int(r["labels"].max()) < len(NAMES) for r in results)


def test_chunked_results_equal_the_full_model_run_per_chunk(predictor):
    """The shared image part changes nothing: the old path (whole forward per chunk) gives the same detections."""
    images, padding, sizes = _images()
    ours = predictor.detect_classes(images, padding, sizes, NAMES)
    chunked = predictor.chunked(NAMES)
    model, post = predictor.backend.model, GroundingPostProcessor(predictor.post.num_select)
    per_chunk = []
    with torch.no_grad():
        for prompt in chunked.prompts:
            tok = predictor.encoder.encode([prompt])
            out = model(images, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], tok["position_ids"],
                        tok["text_self_attention_mask"], padding)
            per_chunk.append(post(out, sizes, tok["positive_maps"][0]))
    reference = merge_chunk_results(per_chunk, chunked, post.num_select)
    for a, b in zip(ours, reference):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["scores"], b["scores"], atol=1e-5)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)


def test_different_captions_in_one_batch_match_each_alone(predictor):
    from groundlab.data.raw import caption_prompt

    images, padding, sizes = _images()
    prompts = [caption_prompt("a red car . a dog ."), caption_prompt("green triangle")]
    both = predictor.detect_captions(images, padding, sizes, prompts, 0.0, 0.0)
    for b, prompt in enumerate(prompts):
        alone = predictor.detect_captions(images[b : b + 1], padding[b : b + 1], sizes[b : b + 1], [prompt], 0.0, 0.0)[0]
        assert torch.allclose(both[b]["scores"], alone["scores"], atol=1e-5)
        assert torch.allclose(both[b]["boxes"], alone["boxes"], atol=1e-3)
        assert both[b]["phrases"] == alone["phrases"]
    assert both[0]["phrases"] != both[1]["phrases"]  # each image was named from its own caption


def test_stacked_texts_mask_the_padding(predictor):
    enc = PromptEncoder(predictor.tokenizer, 32)
    short = predictor.backend.encode_text(enc.encode([Prompt("cat .", ("cat",), (((0, 3),),))]))
    long = predictor.backend.encode_text(enc.encode([Prompt("red car . dog .", ("red car", "dog"), (((0, 7),), ((10, 13),)))]))
    stacked = predictor.backend.stack_text([short, long])
    L = long["text"].shape[1]
    assert stacked["text"].shape[:2] == (2, L)
    assert stacked["text_token_mask"][0].sum() == short["text_token_mask"].sum()
    pad = torch.arange(short["text"].shape[1], L)
    assert stacked["text_self_attention_mask"][0, pad][:, pad].equal(torch.eye(len(pad), dtype=torch.bool))
