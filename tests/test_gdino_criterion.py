"""Grounding DINO matcher and set criterion: matching, masking of invalid tokens, weighting, optimization, and
agreement with transformers' GroundingDinoImageLoss."""

from __future__ import annotations

import pytest
import torch

from groundlab.models.gdino.criterion import (
    SetCriterion, base_loss_name, build_criterion, sigmoid_focal_loss, weighted_total,
)
from groundlab.models.gdino.matcher import HungarianMatcher

T = 256  # max_text_len
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def make_targets(gen, sizes, L, phrase_len=(1, 3)):
    """Targets with random boxes and contiguous phrases inside tokens [1, L-1)."""
    targets = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        pmap = torch.zeros(n, T)
        for i in range(n):
            k = int(torch.randint(phrase_len[0], phrase_len[1] + 1, (1,), generator=gen))
            start = int(torch.randint(1, L - k, (1,), generator=gen))
            pmap[i, start:start + k] = 1
        targets.append({"boxes": torch.cat([cxcy, wh], 1), "positive_map": pmap})
    return targets


def token_mask(B, L, lengths=None):
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, : (lengths[b] if lengths else L)] = True
    return mask


def mask_logits(logits, mask):
    """-inf where the model puts it: tokens with text_token_mask False and tokens >= L."""
    full = torch.nn.functional.pad(mask, (0, T - mask.shape[1]), value=False)
    return logits.masked_fill(~full[:, None, :], float("-inf"))


def random_outputs(gen, B, Q, mask, n_aux=0):
    def layer():
        return {"pred_logits": mask_logits(torch.randn(B, Q, T, generator=gen) * 2, mask),
                "pred_boxes": torch.rand(B, Q, 4, generator=gen) * 0.5 + 0.25}
    out = layer()
    out["aux_outputs"] = [layer() for _ in range(n_aux)]
    out["interm_outputs"] = layer()
    out["text_token_mask"] = mask
    return out


def perfect_outputs(targets, Q, mask, perms):
    """Query perms[b][j] predicts target j exactly (box equal, logits +12 on its tokens, -12 elsewhere)."""
    B = len(targets)
    logits = torch.full((B, Q, T), -12.0)
    boxes = torch.full((B, Q, 4), 0.5)
    boxes[..., 2:] = 0.02  # unmatched queries: tiny boxes in the middle
    for b, t in enumerate(targets):
        for j, q in enumerate(perms[b]):
            boxes[b, q] = t["boxes"][j]
            logits[b, q] = torch.where(t["positive_map"][j] > 0, 12.0, -12.0)
    return {"pred_logits": mask_logits(logits, mask), "pred_boxes": boxes, "text_token_mask": mask}


def test_matcher_recovers_permutation_and_handles_empty_images():
    gen = torch.Generator().manual_seed(0)
    L, Q = 20, 9
    targets = make_targets(gen, [4, 0, 3], L)
    perms = [torch.randperm(Q, generator=gen)[: len(t["boxes"])].tolist() for t in targets]
    out = perfect_outputs(targets, Q, token_mask(3, L), perms)
    indices = HungarianMatcher()(out, targets)
    assert len(indices) == 3
    for (q_idx, t_idx), perm in zip(indices, perms):
        assert q_idx.dtype == torch.int64 and t_idx.dtype == torch.int64
        assert {(int(q), int(t)) for q, t in zip(q_idx, t_idx)} == {(q, j) for j, q in enumerate(perm)}
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0

    all_empty = HungarianMatcher()(out, [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, T)}] * 3)
    assert all(q.numel() == 0 and t.numel() == 0 for q, t in all_empty)


def test_matcher_prefers_query_high_on_every_phrase_token():
    pmap = torch.zeros(1, T)
    pmap[0, 3:5] = 1  # a two-token phrase
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": pmap}]
    logits = torch.full((1, 2, T), -8.0)
    logits[0, 0, 3:5] = 8.0  # query 0: high on both tokens
    logits[0, 1, 3] = 8.0  # query 1: high on the first token only
    out = {"pred_logits": mask_logits(logits, token_mask(1, 10)), "pred_boxes": targets[0]["boxes"].expand(1, 2, 4)}
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(out, targets)
    assert torch.isfinite(cost).all() and cost[0, 0, 0] < cost[0, 1, 0]
    q_idx, t_idx = matcher(out, targets)[0]
    assert q_idx.tolist() == [0] and t_idx.tolist() == [0]


def test_matcher_rejects_nan():
    gen = torch.Generator().manual_seed(1)
    targets = make_targets(gen, [2], 10)
    out = random_outputs(gen, 1, 5, token_mask(1, 10))
    out["pred_boxes"][0, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        HungarianMatcher()(out, targets)


def test_focal_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0])
    for tgt in (torch.zeros(5), torch.ones(5)):
        assert torch.isfinite(sigmoid_focal_loss(logits, tgt)).all()


def test_perfect_predictions_beat_random_and_keys_present():
    gen = torch.Generator().manual_seed(2)
    B, Q, L = 2, 12, 24
    mask = token_mask(B, L, [L, 15])
    targets = make_targets(gen, [3, 2], 15)
    criterion = SetCriterion(HungarianMatcher(), WEIGHTS)
    rand = random_outputs(gen, B, Q, mask, n_aux=2)
    losses = criterion(rand, targets)
    expected = {f"{k}{s}" for k in WEIGHTS for s in ("", "_0", "_1", "_interm")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())

    perms = [list(range(5, 5 + len(t["boxes"]))) for t in targets]
    perfect = perfect_outputs(targets, Q, mask, perms)
    good, indices = criterion(perfect, targets, return_indices=True)
    assert [sorted(q.tolist()) for q, _ in indices] == [sorted(p) for p in perms]
    assert good["loss_bbox"] < 1e-6 and good["loss_giou"] < 1e-6
    assert criterion.weighted_total(good) < 0.01 * criterion.weighted_total({k: losses[k] for k in good})


def test_invalid_tokens_do_not_change_loss():
    gen = torch.Generator().manual_seed(3)
    B, Q, L = 2, 10, 20
    mask = token_mask(B, L, [20, 12])
    mask[0, 7] = False  # a masked token inside the text as well
    targets = make_targets(gen, [2, 3], 7)
    out = random_outputs(gen, B, Q, mask, n_aux=1)
    criterion = SetCriterion(HungarianMatcher(), WEIGHTS)
    base = criterion(out, targets)

    def scramble(layer):
        logits = layer["pred_logits"].clone()
        invalid = torch.isinf(logits)
        logits[invalid] = torch.randn(int(invalid.sum()), generator=gen) * 5  # finite garbage where -inf was
        return {**layer, "pred_logits": logits}

    changed = scramble(out)
    changed["aux_outputs"] = [scramble(a) for a in out["aux_outputs"]]
    changed["interm_outputs"] = scramble(out["interm_outputs"])
    other = criterion(changed, targets)
    for k in base:
        torch.testing.assert_close(other[k], base[k])


def test_gradients_are_finite_with_inf_logits():
    gen = torch.Generator().manual_seed(4)
    mask = token_mask(2, 16, [16, 9])
    targets = make_targets(gen, [1, 2], 9)
    out = random_outputs(gen, 2, 6, mask)
    out["pred_logits"].requires_grad_(True)
    total = SetCriterion(HungarianMatcher(), WEIGHTS).weighted_total(
        SetCriterion(HungarianMatcher(), WEIGHTS)(out, targets))
    total.backward()
    grad = out["pred_logits"].grad
    assert torch.isfinite(grad).all()
    assert (grad[torch.isinf(out["pred_logits"])] == 0).all()


def test_weighted_total_matches_hand_sum():
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0), "loss_giou": torch.tensor(3.0),
              "loss_ce_0": torch.tensor(0.5), "loss_giou_4": torch.tensor(0.25),
              "loss_ce_interm": torch.tensor(4.0), "loss_bbox_interm": torch.tensor(1.5), "loss_xy": torch.tensor(9.0)}
    hand = 2 * 1 + 5 * 2 + 2 * 3 + 2 * 0.5 + 2 * 0.25 + 0.5 * (2 * 4 + 5 * 1.5)  # loss_xy has no weight
    assert float(weighted_total(losses, WEIGHTS, interm_loss_coef=0.5)) == pytest.approx(hand)
    crit = SetCriterion(HungarianMatcher(), WEIGHTS, interm_loss_coef=0.5)
    assert float(crit.weighted_total(losses)) == pytest.approx(hand)
    # an explicit per-layer weight wins over the base name
    assert float(weighted_total({"loss_ce_0": torch.tensor(1.0)}, {**WEIGHTS, "loss_ce_0": 7.0})) == 7.0
    assert base_loss_name("loss_bbox_interm") == ("loss_bbox", "_interm")
    assert base_loss_name("loss_giou_12") == ("loss_giou", "_12")
    assert base_loss_name("loss_ce") == ("loss_ce", "")


def test_build_criterion_reads_config():
    from omegaconf import OmegaConf

    from groundlab.config.schema_model import GDinoModelConfig

    cfg = OmegaConf.merge(OmegaConf.structured(GDinoModelConfig),
                          {"aux_loss": False, "interm_loss_coef": 0.5, "set_cost_bbox": 3.0,
                           "loss_types": ["labels", "boxes"]})
    crit = build_criterion(cfg)
    assert crit.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                                "loss_ce_dn": 2.0, "loss_bbox_dn": 5.0, "loss_giou_dn": 2.0}  # denoising weighs the same
    assert crit.matcher.cost_bbox == 3.0 and crit.interm_loss_coef == 0.5 and crit.losses == ("labels", "boxes")
    gen = torch.Generator().manual_seed(5)
    losses = crit(random_outputs(gen, 1, 4, token_mask(1, 8), n_aux=2), make_targets(gen, [1], 8))
    assert not any(k.endswith(("_0", "_1")) for k in losses) and "loss_ce_interm" in losses
    with pytest.raises(ValueError, match="unknown losses \\['masks'\\]"):  # the mask loss is mask_gdino's
        build_criterion(OmegaConf.merge(cfg, {"loss_types": ["labels", "masks"]}))


def test_mask_model_config_gets_the_mask_criterion():
    from omegaconf import OmegaConf

    from groundlab.config.schema_model import GDinoModelConfig
    from groundlab.models.gdino.build import criterion_for

    cfg = OmegaConf.merge(OmegaConf.structured(GDinoModelConfig),
                          {"name": "mask_gdino", "has_mask": True, "loss_types": ["labels", "boxes", "masks"],
                           "mask_loss_coef": 3.0, "dice_loss_coef": 4.0})
    crit = criterion_for(cfg)
    assert type(crit).__name__ == "MaskSetCriterion" and "masks" in crit.losses
    assert crit.weight_dict["loss_mask"] == 3.0 and crit.weight_dict["loss_dice"] == 4.0


def test_optimizing_free_parameters_converges():
    gen = torch.Generator().manual_seed(6)
    B, Q, L = 2, 8, 16
    mask = token_mask(B, L, [16, 10])
    targets = make_targets(gen, [3, 2], 10)
    logit_p = torch.nn.Parameter(torch.randn(B, Q, T, generator=gen) * 0.1)
    box_p = torch.nn.Parameter(torch.randn(B, Q, 4, generator=gen) * 0.5)
    criterion = SetCriterion(HungarianMatcher(), WEIGHTS)
    opt = torch.optim.Adam([logit_p, box_p], lr=0.05)
    first = None
    for _ in range(300):
        out = {"pred_logits": mask_logits(logit_p, mask), "pred_boxes": box_p.sigmoid(), "text_token_mask": mask}
        total = criterion.weighted_total(criterion(out, targets))
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    out = {"pred_logits": mask_logits(logit_p, mask), "pred_boxes": box_p.sigmoid(), "text_token_mask": mask}
    losses, indices = criterion(out, targets, return_indices=True)
    assert float(criterion.weighted_total(losses).detach()) < 0.05 * first
    for b, (q_idx, t_idx) in enumerate(indices):
        torch.testing.assert_close(out["pred_boxes"][b, q_idx].detach(), targets[b]["boxes"][t_idx],
                                   atol=0.01, rtol=0)
        probs = out["pred_logits"][b, q_idx].detach().sigmoid()
        assert (probs[targets[b]["positive_map"][t_idx] > 0] > 0.5).all()


def test_agrees_with_transformers_grounding_dino_loss():
    """Same matching and the same loss_ce / loss_bbox / loss_giou (final and aux layers) as transformers'
    GroundingDinoImageLoss, which uses alpha = 0.25, gamma = 2 and num_boxes normalization too."""
    hf = pytest.importorskip("transformers.loss.loss_grounding_dino")
    gen = torch.Generator().manual_seed(7)
    B, Q, L = 2, 15, 30
    mask = token_mask(B, L, [30, 18])
    # Equal target counts: transformers offsets image i's class labels by len(label_maps[i]) instead of the
    # cumulative count of the images before it, which is right only when every image has as many phrases.
    targets = make_targets(gen, [4, 4], 18)
    out = random_outputs(gen, B, Q, mask, n_aux=1)
    ours = SetCriterion(HungarianMatcher(1.0, 5.0, 2.0), WEIGHTS)(out, targets)

    text_mask = torch.nn.functional.pad(mask, (0, T - L), value=False)[:, None, :].expand(B, Q, T)
    label_maps = tuple(t["positive_map"] for t in targets)
    hf_targets = [{"class_labels": torch.arange(len(t["boxes"])), "boxes": t["boxes"]} for t in targets]

    def hf_layer(layer):
        return {"logits": layer["pred_logits"], "pred_boxes": layer["pred_boxes"], "label_maps": label_maps,
                "text_mask": text_mask}

    hf_out = hf_layer(out)
    hf_out["auxiliary_outputs"] = [hf_layer(a) for a in out["aux_outputs"]]
    matcher = hf.GroundingDinoHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    theirs = hf.GroundingDinoImageLoss(matcher, focal_alpha=0.25, losses=["labels", "boxes"])(hf_out, hf_targets)
    theirs_interm = hf.GroundingDinoImageLoss(matcher, focal_alpha=0.25, losses=["labels", "boxes"])(
        hf_layer(out["interm_outputs"]), hf_targets)
    theirs.update({k + "_interm": v for k, v in theirs_interm.items()})
    assert set(theirs) == set(ours)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k].float(), rtol=1e-5, atol=1e-6, msg=k)
