"""Captions with exact spans and token maps, checked against the real bert-base-uncased WordPiece vocab."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_GDINO
from groundlab.text.captions import (
    chunk_class_prompts, class_prompt, grounding_prompt, prompt_token_len, sample_detection_prompt, split_class_prompts,
)
from groundlab.errors import DataError, PromptOverflowError
from groundlab.data.raw import caption_prompt
from groundlab.text.tokens import PromptEncoder, sub_sentence_masks


def test_vocab_is_real_bert_base_uncased(tokenizer):
    assert tokenizer.vocab_size == 30522
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]


def test_class_prompt_spans_with_nested_names():
    p = class_prompt(["race car", "car", "car door"])
    assert p.text == "race car . car . car door ."
    assert [p.text[s:e] for ((s, e),) in p.spans] == ["race car", "car", "car door"]
    assert p.spans[1] == ((11, 14),)  # not the "car" inside "race car"


def test_positive_map_nested_names_hits_the_right_tokens(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    out = enc.encode([class_prompt(["car", "race car"])])
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"][0])
    assert tokens == ["[CLS]", "car", ".", "race", "car", ".", "[SEP]"]
    pmap = out["positive_maps"][0]
    assert pmap.shape == (2, 256)
    assert pmap[0].nonzero().flatten().tolist() == [1]
    assert pmap[1].nonzero().flatten().tolist() == [3, 4]


def test_positive_map_word_pieces(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    p = class_prompt(["hydrant", "traffic light"])
    out = enc.encode([p])
    ids = out["input_ids"][0].tolist()
    pieces = tokenizer("hydrant", add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 1
    cols = out["positive_maps"][0][0].nonzero().flatten().tolist()
    assert [ids[c] for c in cols] == pieces
    assert enc.name_len("hydrant") == len(pieces)


def idea_reference(input_ids: torch.Tensor, special: list[int]):
    """Loop form of IDEA-Research's generate_masks_with_special_tokens_and_transfer_map (the spec)."""
    B, L = input_ids.shape
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)
    pos = torch.zeros(B, L, dtype=torch.long)
    for row in range(B):
        prev = None
        for col in range(L):
            if int(input_ids[row, col]) not in special:
                continue
            if col == 0 or col == L - 1:
                mask[row, col, col] = True
                pos[row, col] = 0
            else:
                mask[row, prev + 1 : col + 1, prev + 1 : col + 1] = True
                pos[row, prev + 1 : col + 1] = torch.arange(0, col - prev)
            prev = col
    return mask, pos


def test_sub_sentence_mask_matches_reference_on_real_prompts(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    prompts = [class_prompt(["person", "fire hydrant", "dog"]), class_prompt(["a"]),
               caption_prompt("what is this? a cat sitting on a mat .")]
    out = enc.encode(prompts)
    ref_mask, ref_pos = idea_reference(out["input_ids"], [101, 102, 1012, 1029])
    assert torch.equal(out["text_self_attention_mask"], ref_mask)
    assert torch.equal(out["position_ids"], ref_pos)


def test_sub_sentence_mask_matches_reference_on_random_rows():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([101, 102, 1012, 1029])
    for _ in range(50):
        ids = torch.randint(2000, 2010, (3, 12), generator=g)
        ids[torch.rand(3, 12, generator=g) < 0.3] = 1012
        ids[:, 0] = 101
        attn = torch.ones_like(ids)
        for r in range(3):
            n = int(torch.randint(2, 13, (1,), generator=g))
            ids[r, n - 1] = 102
            ids[r, n:] = 0
            attn[r, n:] = 0
        out = sub_sentence_masks(ids, attn, special)
        ref_mask, ref_pos = idea_reference(ids, special.tolist())
        assert torch.equal(out["text_self_attention_mask"], ref_mask)
        assert torch.equal(out["position_ids"], ref_pos)


def test_rows_are_independent(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    a, b = class_prompt(["cat", "dog"]), class_prompt(["traffic light", "stop sign", "bench"])
    batch = enc.encode([a, b])
    alone = enc.encode([b])
    L = alone["input_ids"].shape[1]
    assert torch.equal(batch["position_ids"][1, :L], alone["position_ids"][0])
    assert torch.equal(batch["text_self_attention_mask"][1, :L, :L], alone["text_self_attention_mask"][0])


def test_sample_detection_prompt_positives_negatives_seeded(tokenizer):
    enc = PromptEncoder(tokenizer, 256)
    names = [f"class {i}" for i in range(30)]
    p1, ids1 = sample_detection_prompt([3, 7, 7], names, 10, np.random.default_rng(5), enc.name_len, 256)
    p2, ids2 = sample_detection_prompt([3, 7], names, 10, np.random.default_rng(5), enc.name_len, 256)
    p3, ids3 = sample_detection_prompt([3, 7], names, 10, np.random.default_rng(6), enc.name_len, 256)
    assert (p1, ids1) == (p2, ids2)
    assert ids1 != ids3
    assert len(ids1) == 10 and {3, 7} <= set(ids1) and len(set(ids1)) == 10
    assert list(p1.phrases) == [names[i] for i in ids1]


def test_sample_detection_prompt_fits_max_text_len(tokenizer):
    enc = PromptEncoder(tokenizer, 20)
    names = [f"long name number {i}" for i in range(40)]  # 5 tokens + "." each
    p, ids = sample_detection_prompt([0], names, 40, np.random.default_rng(0), enc.name_len, 20)
    assert 0 in ids and prompt_token_len(p.phrases, enc.name_len) <= 20
    assert len(enc.tokenizer(p.text)["input_ids"]) <= 20


def test_positives_that_cannot_fit_name_the_image(tokenizer):
    enc = PromptEncoder(tokenizer, 12)
    names = ["a very long class name", "another very long class name"]
    with pytest.raises(PromptOverflowError, match="img_042.jpg"):
        sample_detection_prompt([0, 1], names, 5, np.random.default_rng(0), enc.name_len, 12, where="img_042.jpg")


def test_split_class_prompts_cover_all_and_fit(tokenizer):
    enc = PromptEncoder(tokenizer, 24)
    names = [f"object kind {i}" for i in range(25)]
    chunks = split_class_prompts(names, enc.name_len, 24)
    assert sorted(i for c in chunks for i in c) == list(range(25))
    assert len(chunks) > 1
    for c in chunks:
        text = class_prompt([names[i] for i in c]).text
        assert len(tokenizer(text)["input_ids"]) <= 24


def test_grounding_prompt_given_and_found_spans():
    cap = "a dog chases another dog and a ball"
    p = grounding_prompt(cap, ["dog", "another dog", "ball"], [None, [[13, 24]], None])
    assert [cap[s:e] for ((s, e),) in p.spans] == ["dog", "another dog", "ball"]
    assert p.spans[0] == ((2, 5),)
    with pytest.raises(DataError, match="does not occur"):
        grounding_prompt(cap, ["cat"], [None], where="x.jsonl:3")


def test_overflowing_phrase_of_long_caption_is_an_error(tokenizer):
    enc = PromptEncoder(tokenizer, 8)
    cap = "one two three four five six seven eight nine ten"
    p = grounding_prompt(cap, ["ten"], [None])
    with pytest.raises(PromptOverflowError, match="ten"):
        enc.encode([p], where=["img.jpg"])


def test_chunked_prompts_merge_back_to_global_classes(tokenizer):
    enc = PromptEncoder(tokenizer, 30)
    names = [f"thing {i}" for i in range(20)]
    chunked = chunk_class_prompts(names, enc.name_len, 30)
    assert len(chunked.prompts) > 1
    merged = []
    for k, prompt in enumerate(chunked.prompts):
        out = enc.encode([prompt])  # every chunk tokenizes within the limit, every phrase mapped
        assert out["input_ids"].shape[1] <= 30 and (out["positive_maps"][0].sum(1) > 0).all()
        merged += chunked.to_class_ids(k, range(len(prompt.phrases)))
        assert [names[i] for i in chunked.to_class_ids(k, range(len(prompt.phrases)))] == list(prompt.phrases)
    assert merged == list(range(20))
    assert len(chunk_class_prompts(names[:3], enc.name_len, 256).prompts) == 1


def test_a_missing_text_encoder_fails_naming_the_path_it_tried(tmp_path, compose):
    from groundlab.models.gdino.build import build_gdino
    from groundlab.text.tokenizer import TextEncoderNotFound, load_tokenizer

    missing = str(tmp_path / "no_bert_here")
    with pytest.raises(TextEncoderNotFound, match="no_bert_here"):
        load_tokenizer(missing)
    cfg = compose(TINY_GDINO + [f"model.text_encoder_type={missing}"])
    with pytest.raises(TextEncoderNotFound, match="model.text_encoder_type"):
        build_gdino(cfg.model)  # the model gets its phrase delimiters from the tokenizer: no silent fallback


@pytest.mark.parametrize("make", [lambda c: grounding_prompt(c, [c], [[(0, len(c))]]), caption_prompt],
                         ids=["grounding", "free-form"])
def test_an_unterminated_caption_is_read_as_one_sentence(tokenizer, make):
    """A caption without a closing "." gets " ." (as IDEA-Research's preprocess_caption): otherwise the final
    [SEP] closes nothing and every word would attend only to itself. Its span stays on the words."""
    prompt = make("shape below the blue triangle")
    assert prompt.text == "shape below the blue triangle ."
    tok = PromptEncoder(tokenizer, 32).encode([prompt])
    words = tok["attention_mask"][0].nonzero().flatten()[1:-2]  # between [CLS] and the closing "."
    block = tok["text_self_attention_mask"][0][words][:, words]
    assert bool(block.all()) and len(words) == 5
    assert grounding_prompt("a dog.", ["a dog"], [[(0, 5)]]).text == "a dog."  # already closed: unchanged
