"""Contrastive denoising queries: shapes, group isolation in the attention mask, positives near their boxes and
negatives further away, the crowded-image cap, and their loss terms."""

from __future__ import annotations

import torch

from conftest import TINY_GDINO
from groundlab.models.gdino.criterion import build_criterion
from groundlab.models.gdino.denoising import prepare_denoising
from groundlab.models.gdino.build import build_gdino


def _targets(counts):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        out.append({"boxes": torch.cat([centre, torch.full((n, 2), 0.2)], 1), "phrase_ids": torch.arange(n) % 3,
                    "num_phrases": 3})
    return out


def test_queries_mask_and_indices():
    emb = torch.nn.Embedding(10, 8)
    label_q, box_q, mask, meta = prepare_denoising(_targets([2, 3]), dn_number=12, label_noise_ratio=0.0,
                                                   box_noise_scale=0.4, num_queries=5, label_enc=emb)
    S, G = meta["single_pad"], meta["num_groups"]
    assert (S, G) == (3, 2) and meta["pad_size"] == 12
    assert label_q.shape == (2, 12, 8) and box_q.shape == (2, 12, 4) and mask.shape == (17, 17)
    assert mask[12:, :12].all() and not mask[12:, 12:].any()  # matching queries never see denoising ones
    assert mask[0:6, 6:12].all() and mask[6:12, 0:6].all() and not mask[0:6, 0:6].any()  # groups isolated
    q, j = meta["indices"][1]
    assert q.tolist() == [0, 1, 2, 6, 7, 8] and j.tolist() == [0, 1, 2, 0, 1, 2]
    boxes = box_q.sigmoid()
    tgt = _targets([2, 3])[1]["boxes"]
    pos_err = (boxes[1, :3] - tgt).abs().max()
    neg_err = (boxes[1, 3:6] - tgt).abs().max()
    assert pos_err < neg_err  # negatives are pushed out by at least one half-extent


def test_crowded_images_are_capped():
    emb = torch.nn.Embedding(10, 8)
    _, _, _, meta = prepare_denoising(_targets([200, 1]), dn_number=20, label_noise_ratio=0.5,
                                      box_noise_scale=1.0, num_queries=5, label_enc=emb)
    assert meta["single_pad"] == 10 and meta["pad_size"] == 20


def test_model_and_criterion_with_denoising(compose):
    cfg = compose(TINY_GDINO + ["model.dn_number=8"])
    model = build_gdino(cfg.model).model.train()
    criterion = build_criterion(cfg.model)
    ids = torch.tensor([[101, 2417, 4418, 1012, 2630, 2675, 1012, 102]] * 2)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "phrase_ids": torch.tensor([1]), "num_phrases": 2,
                "positive_map": torch.zeros(1, 256).index_fill_(1, torch.tensor([4, 5]), 1.0)}] * 2
    out = model(torch.randn(2, 3, 128, 128), ids, torch.ones_like(ids), targets=targets)
    assert out["pred_logits"].shape[1] == 20  # matching queries only; denoising ones split off
    assert out["dn_outputs"]["pred_logits"].shape[1] == out["dn_outputs"]["meta"]["pad_size"]
    losses = criterion(out, targets)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"} <= set(losses)
    total = criterion.weighted_total(losses)
    total.backward()
    assert model.label_enc.weight.grad is not None and model.label_enc.weight.grad.abs().sum() > 0
    model.eval()
    assert "dn_outputs" not in model(torch.randn(1, 3, 128, 128), ids[:1], torch.ones_like(ids[:1]), targets=targets[:1])
