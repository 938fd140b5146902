"""Referring-expression post-processing (models/mask_gdino/referring_postprocess.py) on small hand-made outputs,
with the real bert-base-uncased tokenizer for the expression's words."""

from __future__ import annotations

import pytest
import torch

from groundlab.models.mask_gdino.referring_postprocess import (
    expression_from_tokenizer, expression_words, prediction_union, query_labels, referring_postprocess, union_mask,
)

L = 12          # token columns (model.max_text_len)
H, W = 16, 32   # output size; the union logits are (2, 2, 4) at stride 8
TEXT = "the man's red umbrella on the left"
# [CLS] the man ' s red umbrella on the left [SEP]: columns 1..9 are the expression
COL = {"the": 1, "man": 2, "'": 3, "s": 4, "red": 5, "umbrella": 6, "on": 7, "the2": 8, "left": 9, "sep": 10}
SETTINGS = dict(num_select=10, conf_threshold=0.3, nms_threshold=0.5, mask_threshold=0.5, ioi_threshold=0.5,
                text_threshold=0.25)


@pytest.fixture(scope="module")
def expression(tokenizer):
    return expression_from_tokenizer(tokenizer, TEXT, L)


def logits_of(rows):
    """rows: per query {column: probability}; other columns get probability 0.01 -> (Q, L) logits."""
    probs = torch.full((len(rows), L), 0.01)
    for q, row in enumerate(rows):
        for col, p in row.items():
            probs[q, COL.get(col, col)] = p
    return torch.logit(probs)


def left_half_union():
    """(2, 2, 4) union logits: foreground on the left two of four cells -> columns 0..15 of a 16 x 32 image."""
    fg = torch.tensor([[1.0, 1.0, -1.0, -1.0]] * 2)
    return torch.stack([-fg, fg]) * 0.5


def outputs_for(rows, boxes, no_targets=(2.0, 0.0), union=None):
    return {"pred_logits": logits_of(rows), "pred_boxes": torch.tensor(boxes, dtype=torch.float32),
            "no_targets": torch.tensor(no_targets), "union_mask_logits": left_half_union() if union is None else union}


def box_mask(x1, x2, y1=0, y2=H):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def masks_from(table):
    """masks_fn returning the bool mask of each query from `table` {query: (H, W) bool}, recording its calls."""
    calls = []

    def fn(query_idx):
        calls.append(query_idx.tolist())
        return torch.stack([table[int(q)] for q in query_idx])
    fn.calls = calls
    return fn


def test_expression_words_from_the_real_tokenizer(tokenizer, expression):
    assert tokenizer.convert_ids_to_tokens(tokenizer(TEXT)["input_ids"])[3:5] == ["'", "s"]
    assert expression.words == ("the", "man's", "red", "umbrella", "on", "the", "left")
    assert expression.token_word.tolist() == [-1, 0, 1, 1, 1, 2, 3, 4, 5, 6, -1, -1]
    assert expression.token_mask.tolist() == [False] + [True] * 9 + [False] * 2
    closed = expression_from_tokenizer(tokenizer, "a red car .", L)  # [CLS] a red car . [SEP]
    assert closed.token_mask.nonzero().flatten().tolist() == [1, 2, 3] and closed.words == ("a", "red", "car")


def test_no_target_wins_drops_everything():
    fn = masks_from({})
    out = referring_postprocess(outputs_for([{"red": 0.9}], [[0.5, 0.5, 0.2, 0.2]], no_targets=(0.0, 1.0)),
                                expression_words(TEXT, [None] * L, torch.ones(L, dtype=torch.bool)), fn, (H, W),
                                **SETTINGS)
    assert out["no_target"] is True and out["labels"] == [] and fn.calls == []
    assert out["scores"].shape == (0,) and out["boxes"].shape == (0, 4) and out["masks"].shape == (0, H, W)
    assert out["query_idx"].shape == (0,) and out["union"].shape == (H, W) and not out["union"].any()


def test_no_target_at_exactly_one_half_does_not_win(expression):
    fn = masks_from({0: box_mask(0, 8)})
    out = referring_postprocess(outputs_for([{"red": 0.9}], [[0.125, 0.5, 0.25, 1.0]], no_targets=(0.3, 0.3)),
                                expression, fn, (H, W), **SETTINGS)
    assert out["no_target"] is False and out["query_idx"].tolist() == [0]


def test_score_is_the_best_expression_token_top_k_and_threshold(expression):
    rows = [{"red": 0.6, "umbrella": 0.4},  # score 0.6
            {"sep": 0.99, "left": 0.2},      # [SEP] is not an expression token: score 0.2 < conf 0.3
            {"man": 0.9},                    # 0.9
            {"on": 0.5}]                     # 0.5, but num_select 2 stops before it
    boxes = [[0.1, 0.5, 0.1, 0.5], [0.3, 0.5, 0.1, 0.5], [0.2, 0.5, 0.1, 0.5], [0.4, 0.5, 0.1, 0.5]]
    table = {q: box_mask(0, 4) for q in range(4)}
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W),
                                **{**SETTINGS, "num_select": 2})
    assert out["query_idx"].tolist() == [2, 0]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W), **SETTINGS)
    assert out["query_idx"].tolist() == [2, 0, 3]  # the 0.2 query stays out; padded-like 0.01 ones too


def test_boxes_are_xyxy_pixels_of_the_output_size(expression):
    out = referring_postprocess(outputs_for([{"red": 0.9}], [[0.25, 0.5, 0.25, 0.5]]), expression,
                                masks_from({0: box_mask(4, 12)}), (H, W), **SETTINGS)
    assert out["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]  # cx 8, cy 8, w 8, h 8 in a 16 x 32 image


def test_nms_removes_a_duplicate_box_and_runs_before_the_masks(expression):
    rows = [{"red": 0.9}, {"red": 0.8}, {"red": 0.7}]
    boxes = [[0.2, 0.5, 0.2, 0.5], [0.21, 0.5, 0.2, 0.5], [0.4, 0.5, 0.1, 0.5]]  # query 1 duplicates query 0
    table = {0: box_mask(2, 10), 1: box_mask(3, 11), 2: box_mask(10, 14)}
    fn = masks_from(table)
    out = referring_postprocess(outputs_for(rows, boxes), expression, fn, (H, W), **SETTINGS)
    assert out["query_idx"].tolist() == [0, 2]
    assert fn.calls == [[0, 2]]  # the duplicate's mask is never computed
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W),
                                **{**SETTINGS, "nms_threshold": None})
    assert out["query_idx"].tolist() == [0, 1, 2]


def test_ioi_keeps_instances_inside_the_union_and_drops_the_others(expression):
    rows = [{"red": 0.9}, {"red": 0.8}, {"red": 0.7}, {"red": 0.6}]
    boxes = [[0.1, 0.5, 0.1, 0.5], [0.8, 0.5, 0.1, 0.5], [0.5, 0.2, 0.1, 0.1], [0.3, 0.8, 0.1, 0.1]]
    table = {0: box_mask(2, 10),    # inside the left half: IoI 1
             1: box_mask(20, 28),   # outside: IoI 0
             2: box_mask(12, 20),   # half in: IoI exactly 0.5, kept at ioi_threshold 0.5
             3: torch.zeros(H, W, dtype=torch.bool)}  # empty: never an instance
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W), **SETTINGS)
    assert out["union"].equal(box_mask(0, 16))
    assert out["query_idx"].tolist() == [0, 2]
    assert out["masks"].equal(torch.stack([table[0], table[2]]))
    assert prediction_union(out["masks"]).equal(box_mask(2, 10) | box_mask(12, 20))
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W),
                                **{**SETTINGS, "ioi_threshold": 0.51})
    assert out["query_idx"].tolist() == [0]
    out = referring_postprocess(outputs_for(rows, boxes), expression, masks_from(table), (H, W),
                                **{**SETTINGS, "ioi_threshold": 1.01})  # nothing survives the filter
    assert out["query_idx"].tolist() == [] and out["labels"] == [] and out["masks"].shape == (0, H, W)


def test_float_masks_are_logits_binarized_at_mask_threshold(expression):
    logits = torch.full((1, H, W), -5.0)
    logits[0, :, 2:6] = 1.0    # sigmoid 0.73
    logits[0, :, 6:8] = 0.2    # sigmoid 0.55
    out = referring_postprocess(outputs_for([{"red": 0.9}], [[0.1, 0.5, 0.2, 1.0]]), expression,
                                lambda q: logits, (H, W), **{**SETTINGS, "mask_threshold": 0.6})
    assert out["masks"][0].equal(box_mask(2, 6))
    with pytest.raises(ValueError, match="masks_fn returned"):
        referring_postprocess(outputs_for([{"red": 0.9}], [[0.1, 0.5, 0.2, 1.0]]), expression,
                              lambda q: logits[:, :8], (H, W), **SETTINGS)


def test_labels_are_whole_words_above_text_threshold_in_expression_order(expression):
    probs = torch.full((4, L), 0.01)
    probs[0, [COL["umbrella"], COL["red"]]] = torch.tensor([0.8, 0.9])
    probs[0, COL["'"]] = 0.4                        # a piece of "man's": the whole word
    probs[1, COL["left"]] = 0.2                     # nothing passes 0.25: the most probable token's word
    probs[1, COL["on"]] = 0.1
    probs[2, COL["sep"]] = 0.9                      # not a word: ignored, falls back to the best word token
    probs[2, COL["the2"]] = 0.05
    probs[3, [COL["the"], COL["the2"]]] = 0.5       # the same word twice is two words
    assert query_labels(probs, expression, 0.25) == ["man's red umbrella", "left", "the", "the the"]


def test_word_pieces_rejoin_and_other_phrases_stay_out(tokenizer):
    text = "cat . a fire hydrant ."
    # [CLS] cat . a fire hydra ##nt . [SEP]: the expression is "a fire hydrant" (columns 3..6)
    assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])[5:7] == ["hydra", "##nt"]
    mask = torch.zeros(L, dtype=torch.bool)
    mask[3:7] = True
    expr = expression_from_tokenizer(tokenizer, text, L, mask)
    assert expr.words == ("a", "fire", "hydrant")
    probs = torch.full((2, L), 0.01)
    probs[0, 6] = 0.7                               # "##nt" alone names the whole word
    probs[1, 1] = 0.95                              # "cat" is not part of the expression
    probs[1, 4] = 0.3
    assert query_labels(probs, expr, 0.25) == ["hydrant", "fire"]
    out = referring_postprocess({"pred_logits": torch.logit(probs), "pred_boxes": torch.full((2, 4), 0.5),
                                 "no_targets": torch.zeros(2), "union_mask_logits": left_half_union()},
                                expr, masks_from({0: box_mask(0, 8), 1: box_mask(8, 16)}), (H, W),
                                **{**SETTINGS, "nms_threshold": None})
    assert out["query_idx"].tolist() == [0, 1]       # scored 0.7 and 0.3: "cat"'s 0.95 does not count
    assert out["labels"] == ["hydrant", "fire"]


def test_padded_queries_never_return(expression):
    logits = logits_of([{"red": 0.9}, {}])
    logits[1] = float("-inf")                       # a padded query
    out = referring_postprocess({"pred_logits": logits, "pred_boxes": torch.full((2, 4), 0.25),
                                 "no_targets": torch.zeros(2), "union_mask_logits": left_half_union()},
                                expression, masks_from({0: box_mask(0, 8), 1: box_mask(0, 8)}), (H, W),
                                **{**SETTINGS, "conf_threshold": 0.0, "nms_threshold": None})
    assert out["query_idx"].tolist() == [0]


def test_nothing_above_threshold_keeps_the_union_and_calls_no_masks(expression):
    fn = masks_from({})
    out = referring_postprocess(outputs_for([{"red": 0.1}], [[0.5, 0.5, 0.1, 0.1]]), expression, fn, (H, W),
                                **SETTINGS)
    assert out["no_target"] is False and out["labels"] == [] and fn.calls == []
    assert out["union"].equal(box_mask(0, 16))
    assert not prediction_union(out["masks"]).any() and prediction_union(out["masks"]).shape == (H, W)


def test_union_mask_crops_the_padding_before_resizing():
    logits = left_half_union()  # over a padded 16 x 32 input
    assert union_mask(logits, (H, W)).equal(box_mask(0, 16))
    # the unpadded input is the left 16 x 16, all foreground: the whole 8 x 8 original is
    assert union_mask(logits, (8, 8), input_size=(16, 16)).all()
    assert union_mask(torch.zeros(2, 2, 4), (H, W)).any().item() is False  # a tie is background


def test_bad_expression_fails(expression):
    out = outputs_for([{"red": 0.9}], [[0.5, 0.5, 0.1, 0.1]])
    with pytest.raises(ValueError, match="no token column"):
        referring_postprocess(out, expression_words(TEXT, [], torch.zeros(L, dtype=torch.bool)),
                              masks_from({}), (H, W), **SETTINGS)
    with pytest.raises(ValueError, match="token columns"):
        referring_postprocess(out, expression_words(TEXT, [], torch.ones(L + 1, dtype=torch.bool)),
                              masks_from({}), (H, W), **SETTINGS)
