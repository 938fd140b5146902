"""groundlab's Swin backbone == transformers' SwinBackbone: same state-dict keys, parameter order, outputs and
gradients (padding to patch/window multiples, shifted windows, odd patch merging, maps smaller than the window,
drop path with the same random draws), and activation checkpointing changes nothing."""

from __future__ import annotations

import pytest
import torch

from groundlab.models.common.swin import SwinBackbone

SMALL = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=3, drop_path_rate=0.0)


def _pair(out_indices=(2, 3, 4), **fields):
    from transformers import AutoBackbone, SwinConfig

    config = SwinConfig(out_indices=list(out_indices), **{**SMALL, **fields})
    torch.manual_seed(0)
    hf = AutoBackbone.from_config(config)
    with torch.no_grad():  # nothing trivially zero or one (bias tables, LayerNorms, biases)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = SwinBackbone(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


def test_same_keys_shapes_and_parameter_order():
    hf, ours = _pair()
    assert {k: v.shape for k, v in hf.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert [n for n, _ in hf.named_parameters()] == [n for n, _ in ours.named_parameters()]
    assert ours.channels == list(hf.channels) == [32, 64, 128]


# batch 2, patch 4, window 3. Stage grids: 48x48 -> 12, 6, 3, 2 (window multiples, then one smaller than the
# window); 44x52 -> 11x13, 6x7, 3x4, 2x2 (no multiples, odd merges); 7x5 -> 2x2, then 1x1 (input not a patch
# multiple, every stage below the window); 17x29 -> 5x8, 3x4, 2x2, 1x1
@pytest.mark.parametrize("size", [(48, 48), (44, 52), (7, 5), (17, 29)])
def test_outputs_equal_transformers(size):
    hf, ours = _pair(out_indices=(0, 1, 2, 3, 4))  # stem too
    hf.eval(), ours.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, got = hf(x).feature_maps, ours(x)
    assert [e.shape for e in expected] == [g.shape for g in got]
    assert _max_diff(expected, got) < 1e-5


def _grads(model, x, weights):
    out = model(x)
    out = getattr(out, "feature_maps", out)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    params = [p for _, p in model.named_parameters()]
    return torch.autograd.grad(loss, [x] + params, allow_unused=True)


VARIANT = dict(qkv_bias=False, mlp_ratio=2.0, patch_size=2, layer_norm_eps=1e-6)


# 44x52 pads every stage; 48x48 pads none but the last
@pytest.mark.parametrize("fields, size", [({}, (44, 52)), ({}, (48, 48)), (VARIANT, (44, 52))])
def test_gradients_equal_transformers_in_training(fields, size):
    hf, ours = _pair(**fields)
    hf.train(), ours.train()
    x = torch.randn(2, 3, *size, requires_grad=True)
    with torch.no_grad():
        shapes = [f.shape for f in ours(x)]
    weights = [torch.randn(s) for s in shapes]
    for a, b in zip(_grads(hf, x, weights), _grads(ours, x, weights)):
        if a is None:  # swin.layernorm: never applied
            assert b is None
            continue
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max()))


def test_drop_path_draws_the_same_samples():
    hf, ours = _pair(drop_path_rate=0.5)
    hf.train(), ours.train()
    x = torch.randn(4, 3, 24, 24)
    torch.manual_seed(1)
    expected = hf(x).feature_maps
    torch.manual_seed(1)
    got = ours(x)
    assert _max_diff(expected, got) < 1e-5
    ours.eval()
    assert _max_diff(ours(x), hf.eval()(x).feature_maps) < 1e-5


def _count_block_calls(model):
    """A list that grows by one every time a Swin block starts its forward (also when recomputed in backward:
    a pre-hook, since recomputation stops as soon as the saved tensors are back, before forward returns)."""
    calls = []
    for module in model.modules():
        if type(module).__name__ == "SwinBlock":
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    _, ours = _pair(drop_path_rate=0.3)
    calls = _count_block_calls(ours)
    n_blocks = sum(SMALL["depths"])
    ours.train()
    x = torch.randn(2, 3, 24, 28, requires_grad=True)
    with torch.no_grad():
        weights = [torch.randn(f.shape) for f in ours(x)]
    calls.clear()
    torch.manual_seed(2)
    plain = _grads(ours, x, weights)
    assert len(calls) == n_blocks  # activations kept: each block runs once
    ours.use_checkpoint = True
    calls.clear()
    torch.manual_seed(2)
    recomputed = _grads(ours, x, weights)
    assert len(calls) == 2 * n_blocks  # each block ran again in backward (same drop-path draws)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, recomputed))


def test_image_backbone_switches_swin_checkpointing():
    from groundlab.models.common.backbone import ImageBackbone

    bb = ImageBackbone("swin_tiny_224_1k", [1, 2, 3], {k: v for k, v in SMALL.items() if k != "drop_path_rate"})
    calls = _count_block_calls(bb)
    x, pad = torch.randn(1, 3, 24, 24), torch.zeros(1, 24, 24, dtype=torch.bool)

    def block_runs():
        calls.clear()
        sum(f.sum() for f, _ in bb(x, pad)).backward()
        return len(calls)

    bb.train()
    once = block_runs()
    assert once == sum(SMALL["depths"])
    bb.set_activation_checkpointing(True)
    assert block_runs() == 2 * once
    bb.eval()  # recomputation is for training only
    assert block_runs() == once
    bb.train()
    bb.set_activation_checkpointing(False)
    assert block_runs() == once


def test_swin_t_preset_shape_and_image_backbone():
    from groundlab.models.common.backbone import ImageBackbone, backbone_config
    from transformers import AutoBackbone

    bb = ImageBackbone("swin_tiny_224_1k", [1, 2, 3])
    assert isinstance(bb.body, SwinBackbone) and bb.channels == [192, 384, 768]
    hf = AutoBackbone.from_config(backbone_config("swin_tiny_224_1k", [1, 2, 3])).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    bb.body.load_state_dict(hf.state_dict(), strict=True)
    bb.eval()
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        got = bb(x, torch.zeros(1, 72, 88, dtype=torch.bool))
        expected = hf(x).feature_maps
    assert [tuple(f.shape[-2:]) for f, _ in got] == [(9, 11), (5, 6), (3, 3)]
    assert _max_diff(expected, [f for f, _ in got]) < 1e-4


def test_a_trace_after_an_inference_mode_forward_at_the_same_size():
    """The window indices cached by an inference-mode forward are inference tensors; a trace (ONNX export) at
    the same size runs the gathers with grad on and must not reuse them ("Inference tensors cannot be saved for
    backward"). The traced block gives the same output."""
    from groundlab.models.common.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(16, 2, 4, 2, 2.0, True, 1e-5, 0.0, 0.0, 0.0).eval()

    class AtSixBySix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return self.block(x, 6, 6)

    x = torch.randn(1, 36, 16)
    with torch.inference_mode():
        expected = block(x, 6, 6).clone()
    traced = torch.jit.trace(AtSixBySix(), (x,), check_trace=False)
    assert torch.allclose(traced(x), expected, atol=1e-6)
