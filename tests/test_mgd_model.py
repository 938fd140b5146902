"""Mask Grounding DINO's network and losses on the tiny model: the dynamic-parameter layout against a
grouped-convolution reading of TAO's, aligned bilinear upsampling, stride-4 ground truth, mask losses on the
matched queries of every decoder layer (not on the encoder proposals nor the denoising queries), images
without objects, and masks computed only for the selected detections at inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_SYNTHETIC, TINY_GDINO, forward_batch, tiny_training_setup
from groundlab.models.mask_gdino.criterion import masks_at_stride4
from groundlab.models.mask_gdino.dynamic_mask import aligned_bilinear, num_dynamic_params, query_masks

MGD = ["model=mask_gdino", *TINY_GDINO, *SMALL_SYNTHETIC]


def test_tao_parameter_count():
    """(8 + 2) x 8 + 8 x 8 + 8 weights and 8 + 8 + 1 biases: TAO's 169 for mask_dim 8."""
    assert num_dynamic_params(8) == 169


def test_query_masks_equal_grouped_convolutions_of_the_tao_layout():
    """Each query's vector read as TAO reads it (weights first, out-major, then biases; inputs = relative
    (x, y) in pixels, then features) and run as per-query 1x1 convolutions gives the same stride-8 logits."""
    torch.manual_seed(0)
    B, Q, C, H, W, stride = 2, 5, 8, 6, 7, 8
    outputs = {"mask_features": torch.randn(B, C, H, W), "mask_stride": stride,
               "image_sizes": torch.tensor([[44, 50], [48, 56]]), "mask_params": torch.randn(B, Q, 169) * 0.3,
               "mask_refs": torch.rand(B, Q, 2)}
    b, q = torch.tensor([0, 1, 1]), torch.tensor([4, 0, 3])
    ours = query_masks(outputs, b, q)  # stride 4
    for k in range(3):
        p = outputs["mask_params"][b[k], q[k]]
        w0, w1, w2 = p[:80].view(8, 10), p[80:144].view(8, 8), p[144:152].view(1, 8)
        b0, b1, b2 = p[152:160], p[160:168], p[168:169]
        h, w = outputs["image_sizes"][b[k]].tolist()
        centre = outputs["mask_refs"][b[k], q[k]] * torch.tensor([w, h])
        ys, xs = torch.meshgrid(torch.arange(H) * stride + 4.0, torch.arange(W) * stride + 4.0, indexing="ij")
        rel = torch.stack([centre[0] - xs, centre[1] - ys])[None]
        x = torch.cat([rel, outputs["mask_features"][b[k]][None]], 1)
        x = F.relu(F.conv2d(x, w0[:, :, None, None], b0))
        x = F.relu(F.conv2d(x, w1[:, :, None, None], b1))
        x = F.conv2d(x, w2[:, :, None, None], b2)
        torch.testing.assert_close(ours[k], aligned_bilinear(x, 2)[0, 0], rtol=1e-4, atol=1e-4)


def test_aligned_bilinear_on_a_ramp():
    """CondInst's aligned upsampling by 2: output column k holds the input at (k - 1) / 2, clamped at the
    borders (replicate padding), so each output pixel stays over the input cell it came from."""
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5)
    up = aligned_bilinear(ramp, 2)
    assert up.shape == (1, 1, 6, 10)
    expected = ((torch.arange(10.0) - 1) / 2).clamp(0, 4)
    torch.testing.assert_close(up[0, 0, 2], expected)


def test_ground_truth_is_sampled_at_stride_4_and_padded():
    masks = torch.zeros(1, 13, 15, dtype=torch.bool)
    masks[0, 6, 10] = True  # row 4*1 + 2, column 4*2 + 2
    out = masks_at_stride4(masks, 6, 8)
    assert out.shape == (1, 6, 8) and out.sum() == 1 and out[0, 1, 2] == 1


@pytest.fixture(scope="module")
def tiny(compose):
    return tiny_training_setup(compose, MGD + ["model.dn_number=4"])


def test_mask_losses_on_every_decoder_layer_only(tiny):
    cfg, model, criterion, train, collate = tiny
    model.train()
    batch = collate([train[i] for i in range(3)])
    out = forward_batch(model, batch)
    losses = criterion(out, batch["targets"])
    mask_keys = sorted(k for k in losses if k.startswith(("loss_mask", "loss_dice")))
    # 2 decoder layers: the final one and aux layer 0; nothing for "_interm" or "_dn"
    assert mask_keys == ["loss_dice", "loss_dice_0", "loss_mask", "loss_mask_0"]
    assert any(k.endswith("_dn") for k in losses) and any(k.endswith("_interm") for k in losses)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in mask_keys)
    model.zero_grad()
    criterion.weighted_total(losses).backward()
    for name in ("controller.layers.0.weight", "mask_head.lay3.weight", "mask_head.lay2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_images_without_objects_train(tiny):
    """A batch where no image has an object: no matched query, mask losses are zero and backward still
    reaches the head (zero gradients, so DDP sees every parameter used)."""
    cfg, model, criterion, train, collate = tiny
    model.train()
    items = [train[i] for i in range(2)]
    for it in items:
        t = it["target"]
        for key in ("boxes", "labels", "phrase_ids", "iscrowd", "masks"):
            t[key] = t[key][:0]
    batch = collate(items)
    out = forward_batch(model, batch)
    losses = criterion(out, batch["targets"])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    model.zero_grad()
    criterion.weighted_total(losses).backward()
    assert model.controller.layers[0].weight.grad is not None


def test_inference_runs_the_mask_head_for_the_selected_detections_only(tiny, monkeypatch):
    from groundlab.data.build import build_grounding_dataset
    from groundlab.predict import mask_paste
    from groundlab.predict.gdino import GDinoPredictor

    cfg, model, _, _, _ = tiny
    model.eval()
    cfg.model.num_select = 6
    predictor = GDinoPredictor.from_model(model, cfg.model, torch.device("cpu"))
    assert predictor.has_masks
    calls = []
    real = mask_paste.query_masks
    monkeypatch.setattr(mask_paste, "query_masks", lambda o, b, q: calls.append(len(q)) or real(o, b, q))
    val, collate = build_grounding_dataset(cfg, "val", augment=False)
    batch = collate([val[0], val[1]])
    sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
    results = predictor.detect_classes(batch["images"], batch["padding_mask"], sizes, val.sources[0].class_names)
    assert sum(calls) == sum(len(r["scores"]) for r in results) <= 12  # not num_queries (20) per image
    for r, (h, w) in zip(results, sizes.tolist()):
        assert r["masks"].dtype == torch.bool and r["masks"].shape == (len(r["scores"]), h, w)
    strict = predictor.detect_classes(batch["images"], batch["padding_mask"], sizes, val.sources[0].class_names,
                                      mask_threshold=0.99)
    assert all((s["masks"] <= r["masks"]).all() for s, r in zip(strict, results))  # higher threshold, smaller masks
