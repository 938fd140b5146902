"""Multi-scale deformable attention: the grid_sample path equals a direct bilinear-sampling reference,
and runs under autocast; the embedding_bag and the Gather/MatMul paths agree with it, and a trace takes the path
traced_impl names."""

from __future__ import annotations

import torch

from groundlab.models.common.ms_deform_attn import MSDeformAttn, ms_deform_attn_core


def bilinear_reference(value, shapes, locations, weights):
    """Loop form: sample each point by hand (zero padding, align_corners=False), weight, sum."""
    B, S, H, D = value.shape
    _, Q, _, Lv, P, _ = locations.shape
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Q):
            for head in range(H):
                for lvl, (h, w) in enumerate(shapes):
                    v = value[b, starts[lvl]:starts[lvl + 1], head].double().view(h, w, D)
                    for p in range(P):
                        x = locations[b, q, head, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, head, lvl, p, 1].item() * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        acc = torch.zeros(D, dtype=torch.float64)
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = x0 + dx, y0 + dy
                                wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                if 0 <= xi < w and 0 <= yi < h:
                                    acc += wgt * v[yi, xi]
                        out[b, q, head] += weights[b, q, head, lvl, p].item() * acc
    return out.view(B, Q, H * D)


def test_core_matches_bilinear_reference():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 8), (3, 4)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 2, 4, generator=g)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=g) * 1.2 - 0.1  # some points fall outside
    weights = torch.rand(2, 5, 2, 2, 3, generator=g).softmax(-1)
    ours = ms_deform_attn_core(value, shapes, locations, weights)
    ref = bilinear_reference(value, shapes, locations, weights)
    assert torch.allclose(ours.double(), ref, atol=1e-5)


def test_module_padding_and_reference_boxes():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 20, 16)
    query = torch.randn(1, 3, 16)
    pad = torch.zeros(1, 20, dtype=torch.bool)
    pad[0, :4] = True
    out_pts = attn(query, torch.rand(1, 3, 2, 2), value, shapes, pad)
    out_box = attn(query, torch.rand(1, 3, 2, 4), value, shapes, pad)
    assert out_pts.shape == out_box.shape == (1, 3, 16)
    # padded values are zeroed before sampling: changing them changes nothing
    value2 = value.clone()
    value2[0, :4] += 100
    ref = torch.rand(1, 3, 2, 2)
    assert torch.allclose(attn(query, ref, value, shapes, pad), attn(query, ref, value2, shapes, pad), atol=1e-6)


def test_runs_under_bf16_autocast():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    value, query, ref = torch.randn(2, 20, 16), torch.randn(2, 3, 16), torch.rand(2, 3, 2, 4)
    full = attn(query, ref, value, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = attn(query, ref, value, shapes)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.1


def test_gather_path_agrees_with_grid_sample():
    from groundlab.models.common.ms_deform_attn import ms_deform_attn_gather

    g = torch.Generator().manual_seed(1)
    shapes = [(7, 9), (4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 4, 8, generator=g, requires_grad=True)
    locations = (torch.rand(2, 11, 4, 3, 4, 2, generator=g) * 1.3 - 0.15).requires_grad_()
    weights = torch.rand(2, 11, 4, 3, 4, generator=g).softmax(-1).requires_grad_()
    a = ms_deform_attn_core(value, shapes, locations, weights)
    b = ms_deform_attn_gather(value, shapes, locations, weights)
    assert torch.allclose(a, b, atol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), (value, locations, weights))
    gb = torch.autograd.grad(b.square().sum(), (value, locations, weights))
    for x, y in zip(ga, gb):  # training takes the same gradients through either path
        assert torch.allclose(x, y, atol=1e-4)


def test_module_paths_agree_and_auto_picks_grid_sample_when_tracing():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    value, query, ref = torch.randn(1, 20, 16), torch.randn(1, 3, 16), torch.rand(1, 3, 2, 4)
    outs = {}
    for impl in ("grid_sample", "gather", "auto"):
        attn.impl = impl
        outs[impl] = attn(query, ref, value, shapes)
        with torch.no_grad():
            outs[impl + "_inference"] = attn(query, ref, value, shapes)
    assert torch.allclose(outs["grid_sample"], outs["gather"], atol=1e-5)
    # the two paths round differently, so bitwise equality below tells which one "auto" ran
    assert not torch.equal(outs["grid_sample_inference"], outs["gather_inference"])
    assert torch.equal(outs["auto_inference"], outs["gather_inference"])  # CPU inference: gather
    assert torch.equal(outs["auto"], outs["grid_sample"])  # training: grid_sample (faster backward)
    attn.impl = "auto"

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, r, v):
            return self.attn(q, r, v, shapes)

    with torch.no_grad():
        traced = torch.jit.trace(Wrap(), (query, ref, value), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "grid_sampler" in graph and "embedding_bag" not in graph


def test_gather_matmul_path_agrees_with_grid_sample_and_is_what_a_trace_takes_when_asked():
    from groundlab.models.common.ms_deform_attn import ms_deform_attn_gather_matmul, traced_impl

    g = torch.Generator().manual_seed(2)
    shapes = [(7, 9), (4, 5), (2, 3)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 4, 8, generator=g)
    locations = torch.rand(2, 11, 4, 3, 4, 2, generator=g) * 1.6 - 0.3  # many points outside, some far outside
    weights = torch.rand(2, 11, 4, 3, 4, generator=g).softmax(-1)
    a = ms_deform_attn_core(value, shapes, locations, weights)
    for block in (128, 4):  # one block, and blocks that do not divide the 11 queries
        assert torch.allclose(a, ms_deform_attn_gather_matmul(value, shapes, locations, weights, block), atol=1e-5)

    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    args = (torch.randn(1, 3, 16), torch.rand(1, 3, 2, 4), torch.randn(1, 20, 16))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, r, v):
            return self.attn(q, r, v, [(4, 4), (2, 2)])

    with torch.no_grad(), traced_impl("gather_matmul"):
        traced = torch.jit.trace(Wrap(), args, check_trace=False)
    graph = str(traced.inlined_graph)
    assert "grid_sampler" not in graph and "embedding_bag" not in graph and "matmul" in graph
    with torch.no_grad():
        assert torch.allclose(traced(*args), Wrap()(*args), atol=1e-5)
