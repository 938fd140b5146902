"""Grounding DINO post-processing on hand-built logits whose answer is known, with the real tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from groundlab.text.captions import chunk_class_prompts, class_prompt
from groundlab.text.tokens import PromptEncoder
from groundlab.models.gdino.postprocess import (
    GroundingPostProcessor, class_scores, merge_chunk_results, phrases_from_token_probs, select_free_form,
)

L = 256
NEG = -math.inf


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def blank_outputs(B: int, Q: int, n_valid: int = L) -> dict:
    """Logits with probability 0.01 on the first n_valid tokens, -inf after; centred small boxes."""
    logits = torch.full((B, Q, L), logit(0.01))
    logits[..., n_valid:] = NEG
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, Q, 1)
    return {"pred_logits": logits, "pred_boxes": boxes}


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return PromptEncoder(tokenizer, L)


def test_class_score_is_mean_of_its_token_probabilities():
    pmap = torch.zeros(2, L)
    pmap[0, 1] = 1
    pmap[1, [3, 4]] = 1
    out = blank_outputs(1, 1, n_valid=7)
    out["pred_logits"][0, 0, 1] = logit(0.6)
    out["pred_logits"][0, 0, 3] = logit(0.9)
    out["pred_logits"][0, 0, 4] = logit(0.3)
    scores = class_scores(out["pred_logits"], pmap)
    assert scores.shape == (1, 1, 2)
    assert scores[0, 0].tolist() == pytest.approx([0.6, 0.6])  # mean(0.9, 0.3) = 0.6
    # -inf padding contributes probability 0, not NaN.
    assert torch.isfinite(scores).all()


def test_nested_class_names_pick_the_right_class(tokenizer, encoder):
    enc = encoder.encode([class_prompt(["car", "race car"])])
    pmap = enc["positive_maps"][0]
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    race, car_in_race = tokens.index("race"), tokens.index("car", 2)
    out = blank_outputs(1, 2, n_valid=len(tokens))
    out["pred_logits"][0, 0, [race, car_in_race]] = logit(0.9)  # query 0 sees "race car"
    out["pred_logits"][0, 1, tokens.index("car")] = logit(0.8)  # query 1 sees the lone "car"
    res = GroundingPostProcessor(num_select=2)(out, torch.tensor([[100, 100]]), pmap)[0]
    assert res["labels"].tolist() == [1, 0]
    assert res["scores"].tolist() == pytest.approx([0.9, 0.8])


def test_boxes_are_scaled_to_original_pixels_xyxy():
    out = blank_outputs(2, 1)
    out["pred_boxes"][0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.4])
    out["pred_boxes"][1, 0] = torch.tensor([0.25, 0.75, 0.5, 0.5])
    pmap = torch.zeros(1, L)
    pmap[0, 1] = 1
    res = GroundingPostProcessor(num_select=1)(out, torch.tensor([[100, 200], [40, 80]]), pmap)
    assert res[0]["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])
    assert res[1]["boxes"][0].tolist() == pytest.approx([0.0, 20.0, 40.0, 40.0])


def test_topk_over_query_class_pairs_sorted_descending():
    pmap = torch.zeros(3, L)
    pmap[0, 1] = pmap[1, 3] = pmap[2, 5] = 1
    out = blank_outputs(1, 4, n_valid=7)
    table = torch.tensor([[0.9, 0.85, 0.1], [0.2, 0.3, 0.7], [0.05, 0.6, 0.02], [0.4, 0.03, 0.04]])
    for q in range(4):
        for c, col in enumerate([1, 3, 5]):
            out["pred_logits"][0, q, col] = logit(float(table[q, c]))
    res = GroundingPostProcessor(num_select=5)(out, torch.tensor([[10, 10]]), pmap)[0]
    assert res["scores"].tolist() == pytest.approx([0.9, 0.85, 0.7, 0.6, 0.4])
    assert res["labels"].tolist() == [0, 1, 2, 1, 0]
    assert res["labels"].dtype == torch.long
    # query 0 is reported twice (classes 0 and 1), as in IDEA / TAO.
    assert set(map(tuple, res["boxes"][:2].tolist())) == {(4.5, 4.5, 5.5, 5.5)}
    # num_select larger than Q * C: everything, still sorted.
    many = GroundingPostProcessor(num_select=300)(out, torch.tensor([[10, 10]]), pmap)[0]
    assert len(many["scores"]) == 12
    assert (many["scores"][1:] <= many["scores"][:-1]).all()


def test_nms_removes_same_class_overlaps_only():
    pmap = torch.zeros(2, L)
    pmap[0, 1] = pmap[1, 3] = 1
    out = blank_outputs(1, 3, n_valid=5)
    out["pred_boxes"][0] = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]])
    out["pred_logits"][0, 0, 1] = logit(0.9)  # class 0
    out["pred_logits"][0, 1, 1] = logit(0.8)  # class 0, overlaps query 0 -> removed
    out["pred_logits"][0, 2, 3] = logit(0.7)  # class 1, same box as query 0 -> kept
    size = torch.tensor([[100, 100]])
    plain = GroundingPostProcessor(num_select=3)(out, size, pmap)[0]
    assert plain["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    res = GroundingPostProcessor(num_select=3, nms_threshold=0.5)(out, size, pmap)[0]
    assert res["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert res["labels"].tolist() == [0, 1]


def test_per_image_positive_maps(encoder):
    enc = encoder.encode([class_prompt(["dog"]), class_prompt(["cat", "bird", "fish"])])
    out = blank_outputs(2, 3, n_valid=9)
    out["pred_logits"][1, 2, enc["positive_maps"][1][2].nonzero().flatten()] = logit(0.95)  # fish
    res = GroundingPostProcessor(num_select=2)(out, torch.tensor([[10, 10], [10, 10]]), enc["positive_maps"])
    assert res[0]["labels"].tolist() == [0, 0]
    assert res[1]["labels"][0].item() == 2 and res[1]["scores"][0].item() == pytest.approx(0.95)


def test_merge_of_two_chunks_equals_one_unchunked_prompt(encoder):
    names = ["person", "traffic light", "fire hydrant", "dog", "race car"]
    chunked = chunk_class_prompts(names, encoder.name_len, max_text_len=10)
    assert len(chunked.prompts) >= 2
    Q, gen = 6, torch.Generator().manual_seed(0)
    table = torch.rand(Q, len(names), generator=gen) * 0.9 + 0.05  # class probability per query
    boxes = torch.rand(1, Q, 4, generator=gen) * 0.5 + 0.25

    def outputs_for(prompt_classes, pmap):
        # Every token of a class gets that class's probability, so the class mean is table[q, c].
        out = blank_outputs(1, Q)
        for local, c in enumerate(prompt_classes):
            for col in pmap[local].nonzero().flatten():
                out["pred_logits"][0, :, col] = torch.logit(table[:, c])
        out["pred_boxes"] = boxes
        return out

    size = torch.tensor([[480, 640]])
    post = GroundingPostProcessor(num_select=10, nms_threshold=0.6)
    full_pmap = encoder.encode([class_prompt(names)])["positive_maps"][0]
    full = post(outputs_for(range(len(names)), full_pmap), size, full_pmap)[0]
    per_chunk = []
    for prompt, ids in zip(chunked.prompts, chunked.class_ids):
        pmap = encoder.encode([prompt])["positive_maps"][0]
        per_chunk.append(post(outputs_for(ids, pmap), size, pmap))
    merged = merge_chunk_results(per_chunk, chunked, num_select=10, nms_threshold=0.6)
    assert len(merged) == 1
    assert merged[0]["labels"].tolist() == full["labels"].tolist()
    assert torch.allclose(merged[0]["scores"], full["scores"])
    assert torch.allclose(merged[0]["boxes"], full["boxes"])


def test_merge_maps_local_labels_to_global_class_ids():
    from groundlab.text.captions import ChunkedPrompts

    chunked = ChunkedPrompts((class_prompt(["a", "b"]), class_prompt(["c"])), ((0, 1), (2,)))
    r0 = {"scores": torch.tensor([0.5, 0.2]), "labels": torch.tensor([1, 0]), "boxes": torch.zeros(2, 4)}
    r1 = {"scores": torch.tensor([0.7]), "labels": torch.tensor([0]), "boxes": torch.ones(1, 4)}
    merged = merge_chunk_results([[r0, r0], [r1, r1]], chunked, num_select=2)
    assert len(merged) == 2
    assert merged[1]["labels"].tolist() == [2, 1]
    assert merged[1]["scores"].tolist() == pytest.approx([0.7, 0.5])


def test_phrases_from_token_probs_with_real_tokenizer(tokenizer):
    caption = "a fire hydrant . traffic light ."
    ids = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "##nt" in tokens  # "hydrant" is two word pieces: "hydra", "##nt"
    probs = torch.zeros(3, L)
    probs[0, [i for i, t in enumerate(tokens) if t in ("fire", "hydra", "##nt")]] = 0.8
    probs[0, [0, tokens.index("."), len(tokens) - 1]] = 0.9  # [CLS], ".", [SEP]: never part of a phrase
    probs[1, tokens.index("light")] = 0.5
    probs[1, tokens.index("traffic")] = 0.2  # below threshold
    probs[2, len(tokens) + 3] = 0.9  # beyond the caption (padding columns)
    phrases = phrases_from_token_probs(probs, ids, tokenizer, text_threshold=0.25)
    assert phrases == ["fire hydrant", "light", ""]


def test_select_free_form_thresholds_sorts_and_names(tokenizer):
    caption = "a cat . a dog ."
    ids = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    out = blank_outputs(1, 3, n_valid=len(tokens))
    out["pred_logits"][0, 0, tokens.index("cat")] = logit(0.5)
    out["pred_logits"][0, 1, tokens.index("dog")] = logit(0.7)
    out["pred_logits"][0, 2, tokens.index("dog")] = logit(0.3)  # below box_threshold
    out["pred_boxes"][0, 1] = torch.tensor([0.5, 0.5, 1.0, 1.0])
    res = select_free_form(out, torch.tensor([[50, 100]]), ids[None], tokenizer, 0.35, 0.25)[0]
    assert res["scores"].tolist() == pytest.approx([0.7, 0.5])
    assert res["phrases"] == ["dog", "cat"]
    assert res["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 100.0, 50.0])


def test_postprocessor_rejects_mismatched_inputs():
    out = blank_outputs(2, 2)
    with pytest.raises(ValueError, match="target_sizes"):
        GroundingPostProcessor()(out, torch.tensor([[1, 1]]), torch.zeros(1, L))
    with pytest.raises(ValueError, match="max_text_len"):
        GroundingPostProcessor()(out, torch.tensor([[1, 1], [1, 1]]), torch.zeros(1, 10))
