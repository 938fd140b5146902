"""The region-query head of Mask Grounding DINO (referring segmentation, model.num_region_queries > 0): output
shapes, masked attention, soft union / minimap targets, the three losses and their gradients, empty samples."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL_SYNTHETIC, TINY_GDINO, forward_batch, tiny_training_setup
from groundlab.models.mask_gdino.region_head import RegionQueryHead, minimap_side
from groundlab.models.mask_gdino.region_loss import region_losses, union_targets

MGD_VG = ["model=mask_gdino", *TINY_GDINO, *SMALL_SYNTHETIC, "model.num_region_queries=16"]


def test_minimap_side_needs_a_perfect_square():
    assert minimap_side(100) == 10 and minimap_side(16) == 4
    with pytest.raises(ValueError, match="model.num_region_queries=10 must be a perfect square"):
        minimap_side(10)


def test_union_targets_are_area_fractions_on_the_padded_grid():
    """A 16x16 image padded to a 24x32 batch: a 4x8 object at the top-left covers half of stride-8 cell (0, 0);
    cells over padding are not valid; the 2x2 minimap sees 32/64 = 1/2 of its top-left quarter... scaled by
    area: 32 object pixels over 64 quarter pixels."""
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, :4, :8] = True
    empty = torch.zeros(0, 16, 16, dtype=torch.bool)
    union, cells, minimap, is_empty = union_targets([m, empty], 8, (3, 4), 2)
    assert union.shape == (2, 3, 4)
    assert union[0, 0, 0] == pytest.approx(0.5) and union[0].sum() == pytest.approx(0.5)
    assert cells[0].sum() == 4 and bool(cells[0, :2, :2].all())
    assert minimap[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert union[1].sum() == 0 and is_empty.tolist() == [0, 1]


def test_region_head_attends_only_where_its_mask_is_on():
    torch.manual_seed(0)
    head = RegionQueryHead(d=16, nheads=2, num_regions=4, num_layers=3, dim_feedforward=32)
    masks = torch.full((1, 4, 4, 4), -5.0)
    masks[0, 0, :2, :2] = 5.0  # region 0 on the top-left quarter only; the others off everywhere
    padding = torch.zeros(1, 16, dtype=torch.bool)
    padding[0, -4:] = True  # the last row is padding
    mask = head._attn_mask(masks, padding, (4, 4))
    allowed = mask[0] == 0  # (R, S) for head 0
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert allowed[1].sum() == 12 and not allowed[1, -4:].any()  # empty region: every real key, no padding
    assert mask.shape == (2, 4, 16)


@pytest.fixture(scope="module")
def tiny_vg(compose):
    return tiny_training_setup(compose, MGD_VG)


def test_region_outputs_losses_and_gradients(tiny_vg):
    cfg, model, criterion, train, collate = tiny_vg
    model.train()
    batch = collate([train[i] for i in range(2)])
    out = forward_batch(model, batch)
    B, _, H, W = batch["images"].shape
    h8, w8 = out["mask_features"].shape[-2:]
    assert out["no_targets"].shape == (B, 2) and out["minimap_logits"].shape == (B, 16, 2)
    assert out["union_mask_logits"].shape == (B, 2, h8, w8) and out["region_masks"].shape == (B, 16, h8, w8)
    losses = criterion(out, batch["targets"])
    for key in ("loss_nt", "loss_minimap", "loss_union"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    assert criterion.weight_dict["loss_union"] == cfg.model.rela_union_mask_loss_coef
    model.zero_grad()
    criterion.weighted_total(losses).backward()
    params = dict(model.named_parameters())
    for name in ("region_head.query_feat.weight", "region_head.nt_embed.layers.0.weight",
                 "region_head.minimap_embed.weight", "region_head.layers.0.lang.attn.in_proj_weight",
                 "region_head.layers.2.objects.attn.in_proj_weight", "transformer.decoder.layers.1.linear1.weight",
                 "mask_head.jia_dcn.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_an_empty_sample_learns_no_target(tiny_vg):
    """No object: the no-target loss asks for class 1 and the union target is all background; one step of SGD on
    the region losses alone raises the no-target probability."""
    _, model, _, train, collate = tiny_vg
    model.eval()  # deterministic forwards (no drop-path); gradients still flow
    item = train[0]
    t = item["target"]
    for key in ("boxes", "labels", "phrase_ids", "iscrowd", "masks"):
        t[key] = t[key][:0]
    batch = collate([item])
    head = model.region_head
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    probs = []
    for _ in range(4):
        out = forward_batch(model, batch)
        losses = region_losses(out, [t["masks"]], int(out["mask_stride"]))
        probs.append(out["no_targets"].softmax(-1)[0, 1].item())
        opt.zero_grad()
        (losses["loss_nt"] + losses["loss_union"] + losses["loss_minimap"]).backward()
        opt.step()
    assert probs[-1] > probs[0], probs


def test_zero_region_queries_builds_no_head(compose):
    from groundlab.models.gdino.build import build_gdino, criterion_for

    cfg = compose(["model=mask_gdino", *TINY_GDINO, *SMALL_SYNTHETIC])
    assert build_gdino(cfg.model).model.region_head is None
    assert "loss_nt" not in criterion_for(cfg.model).weight_dict
