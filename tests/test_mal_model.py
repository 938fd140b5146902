"""MAL's model parts: ViT backbone and MAE weight import (transformers and official layouts, resized
position embeddings), kernel/mask heads with scale-adaptive features, the mean-field CRF, the MIL loss."""

from __future__ import annotations

import pytest
import torch

from groundlab.models.mal.criterion import dice_loss, mil_loss
from groundlab.models.mal.mean_field import MeanFieldCRF
from groundlab.models.mal.network import MALNetwork
from groundlab.ops.area_buckets import area_bucket
from groundlab.models.mal.vit_backbone import ViTBackbone
from groundlab.models.mal.vit_weights import load_mae_weights

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _mae(image_size: int):
    """A random transformers ViTMAEForPreTraining of the SMALL shape (patch 8), weights perturbed."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(**SMALL, patch_size=8, image_size=image_size, decoder_hidden_size=16,
                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_backbone_shapes_and_errors():
    net = ViTBackbone("vit-micro/8", 64, overrides=SMALL)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 32, 8, 8)
    assert net(torch.randn(1, 3, 96, 96)).shape == (1, 32, 12, 12)  # other sizes: grid interpolated
    with pytest.raises(ValueError, match="not one of"):
        ViTBackbone("vit-gigantic/3", 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ViTBackbone("vit-micro/8", 60)
    with pytest.raises(ValueError, match="not fields of ViTConfig"):
        ViTBackbone("vit-micro/8", 64, overrides={"hidden_sise": 8})


def test_mae_weights_from_a_transformers_directory(tmp_path):
    mae = _mae(64)
    mae.save_pretrained(tmp_path)
    net = ViTBackbone("vit-micro/8", 64, overrides=SMALL)
    report = load_mae_weights(net, str(tmp_path))
    assert report.loaded == len(net.vit.state_dict())  # the MAE decoder is left out by transformers
    for key, value in net.vit.state_dict().items():
        torch.testing.assert_close(value, mae.vit.state_dict()[key], msg=key)


def _official_layout(mae) -> dict:
    """The MAE repo's checkpoint layout (timm names, fused qkv, decoder kept), written independently here."""
    sd, out = mae.vit.state_dict(), {}
    out["cls_token"], out["pos_embed"] = sd["embeddings.cls_token"], sd["embeddings.position_embeddings"]
    out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
    for i in range(SMALL["num_hidden_layers"]):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[p + f"attention.{n}_proj.{kind}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[p + f"attention.o_proj.{kind}"]
            out[f"blocks.{i}.norm1.{kind}"] = sd[p + f"layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[p + f"layernorm_after.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[p + f"mlp.fc1.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
    out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    out["mask_token"] = torch.zeros(1, 1, 16)
    out["decoder_embed.weight"] = torch.zeros(16, 32)
    return {"model": out}


def test_mae_weights_from_the_official_checkpoint_layout_give_the_same_features(tmp_path):
    mae = _mae(64)
    torch.save(_official_layout(mae), tmp_path / "mae_pretrain.pth")
    ours = ViTBackbone("vit-micro/8", 64, overrides=SMALL).eval()
    load_mae_weights(ours, str(tmp_path / "mae_pretrain.pth"))
    x = torch.randn(2, 3, 64, 64)
    from transformers import ViTConfig, ViTModel

    ref = ViTModel(ViTConfig(**SMALL, patch_size=8, image_size=64, layer_norm_eps=mae.config.layer_norm_eps),
                   add_pooling_layer=False).eval()
    ref.load_state_dict(mae.vit.state_dict())
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_mae_weights_of_another_resolution_resize_the_position_grid(tmp_path):
    mae = _mae(32)  # a 4x4 grid
    mae.save_pretrained(tmp_path)
    net = ViTBackbone("vit-micro/8", 64, overrides=SMALL)
    report = load_mae_weights(net, str(tmp_path))
    assert report.resized_position_embeddings
    pos = net.vit.embeddings.position_embeddings
    assert pos.shape == (1, 1 + 64, 32)
    torch.testing.assert_close(pos[:, 0], mae.vit.embeddings.position_embeddings[:, 0])  # CLS untouched


def test_wrong_architecture_names_the_key(tmp_path):
    _mae(64).save_pretrained(tmp_path)
    net = ViTBackbone("vit-micro/8", 64, overrides={**SMALL, "hidden_size": 64})
    with pytest.raises(ValueError, match="wrong model.arch"):
        load_mae_weights(net, str(tmp_path))


def test_network_logits_at_quarter_crop_for_every_size_bucket():
    net = MALNetwork("vit-micro/8", 64, hidden=16, out_channels=16, vit_overrides=SMALL).eval()
    areas = torch.tensor([20.0 ** 2, 60.0 ** 2, 200.0 ** 2])
    assert area_bucket(areas).tolist() == [0, 1, 2]
    x = torch.randn(3, 3, 64, 64)
    out = net(x, areas)
    assert out.shape == (3, 1, 32, 32)
    # each box is computed on its own: batching with other sizes changes nothing
    torch.testing.assert_close(out[1:2], net(x[1:2], areas[1:2]), atol=1e-5, rtol=1e-5)
    flat = MALNetwork("vit-micro/8", 64, hidden=16, out_channels=16, adjust_scale=False, vit_overrides=SMALL)
    assert flat(x, areas).shape == (3, 1, 32, 32)


def test_mil_loss_prefers_masks_that_fill_every_row_and_column_of_the_box():
    box = torch.zeros(1, 16, 16)
    box[:, 4:12, 4:12] = 1
    diamond = torch.zeros(1, 16, 16)  # touches every row and column of the box
    for i in range(8):
        lo, hi = 4 + abs(3.5 - i) - 0.5, 12 - abs(3.5 - i) + 0.5
        diamond[0, 4 + i, int(lo):int(hi)] = 1
    half = box.clone()
    half[:, :, 8:] = 0  # misses half the columns
    spill = box.clone()
    spill[:, 2:4, 4:12] = 1  # leaks above the box
    assert mil_loss(diamond, box).item() < 1e-3 and mil_loss(box, box).item() < 1e-3
    assert mil_loss(half, box).item() > 0.2 and mil_loss(spill, box).item() > 0.05
    assert dice_loss(box, box).item() < 1e-3


def test_mean_field_fills_the_object_by_colour_and_stays_in_the_box():
    image = torch.zeros(1, 3, 24, 24)
    image[:, 0, 6:18, 6:14] = 2.0  # a red object; grey background
    obj = torch.zeros(1, 24, 24)
    obj[:, 6:18, 6:14] = 1
    box = torch.zeros(1, 24, 24)
    box[:, 4:20, 4:16] = 1  # box a little larger than the object
    prob = 0.35 + 0.3 * obj  # unsure everywhere: 0.65 on the object, 0.35 off it
    prob[:, 9:12, 8:11] = 0.3  # a hole of wrong guesses inside the object
    prob[:, 5, 4:16] = 0.6  # and a wrong stripe of background inside the box
    out = MeanFieldCRF(kernel_size=3, zeta=0.5, num_iter=20)(image, prob, box)
    assert torch.equal(out, obj)
    assert out[box == 0].sum() == 0


def test_frozen_stages_and_stochastic_depth():
    from groundlab.models.mal.vit_backbone import DropPath

    net = ViTBackbone("vit-micro/8", 64, drop_path_rate=0.5, overrides=SMALL)
    net.freeze([1])  # TAO frozen_stages [1]: the patch embedding and block 0
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert any(n.startswith("vit.embeddings.") for n in frozen) and any(n.startswith("vit.layers.0.") for n in frozen)
    assert not any(n.startswith("vit.layers.1.") for n in frozen)
    net.train()
    assert not net.vit.layers[0].training and net.vit.layers[1].training  # frozen blocks stay in eval mode
    for stages in ([-1], [0]):
        fresh = ViTBackbone("vit-micro/8", 64, overrides=SMALL)
        fresh.freeze(stages)
        assert all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(ValueError, match="frozen_stages"):
        fresh.freeze([5])
    rates = [layer.dropout.rate for layer in net.vit.layers]
    assert rates == [0.0, 0.5] and all(isinstance(layer.dropout, DropPath) for layer in net.vit.layers)
    x = torch.randn(4, 3, 64, 64)
    net = ViTBackbone("vit-micro/8", 64, drop_path_rate=0.5, overrides=SMALL)
    plain = ViTBackbone("vit-micro/8", 64, drop_path_rate=0.0, overrides=SMALL)
    plain.load_state_dict(net.state_dict())  # the same weights without stochastic depth
    with torch.no_grad():
        reference = plain.eval()(x)
        torch.testing.assert_close(plain.train()(x), reference)  # nothing else is random in training
        torch.testing.assert_close(net.eval()(x), reference)  # evaluation: drop path is the identity
        torch.manual_seed(0)
        trained = net.train()(x)
    changed = (trained - reference).flatten(1).abs().amax(1) > 1e-4
    assert changed.any()  # training: branches dropped (or kept and rescaled)
    # per sample, a whole branch is dropped or kept and scaled by 1 / keep
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 5, 7))
    values = out.flatten(1)
    assert (values == values[:, :1]).all() and set(values[:, 0].tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)


def test_network_runs_under_autocast():
    """Mixed precision (TAO use_amp): fp32 features and half-precision logits meet in the bucket merge."""
    net = MALNetwork("vit-micro/8", 64, hidden=16, out_channels=16, vit_overrides=SMALL)
    areas = torch.tensor([20.0 ** 2, 60.0 ** 2, 200.0 ** 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(3, 3, 64, 64), areas)
    assert out.shape == (3, 1, 32, 32) and torch.isfinite(out.float()).all()
