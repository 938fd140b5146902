"""TAO grounding_dino / mask_grounding_dino checkpoints load into our Grounding DINO, and the Mask Grounding DINO
mask head (`controller.*`, `mask_head.*`) and referring region head (`region_head.*`) are kept, ignored or newly
initialized as the model needs, on a tiny random model, offline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY_GDINO
from groundlab.models.common.mlp import MLP
from groundlab.models.gdino import weight_keys as W
from groundlab.models.gdino.weights import WeightLoadError, load_state, load_weights


@pytest.fixture(scope="module")
def tiny(compose):
    """A tiny GroundingDINO with distinct random values everywhere (zero-initialised heads would hide swaps)."""
    from groundlab.models.gdino.build import build_gdino

    model = build_gdino(compose(TINY_GDINO).model).model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _fresh(tiny):
    """The same architecture with other values, so a load that skipped a tensor shows."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    return model


def _tao_state(model_state):
    """Our state dict in TAO's layout: IDEA names, Swin under `backbone.0.body.`, all under `model.model.`."""
    idea, unused = W.ours_to_idea(model_state)
    assert unused == []
    out = {}
    for key, value in idea.items():
        if key.startswith("backbone.0."):
            key = "backbone.0.body." + key[len("backbone.0."):]
        out["model.model." + key] = value
    return out


def _mask_head_state(hidden=32, params=169):
    """Mask Grounding DINO's mask-head tensors by TAO's names (controller MLP + MaskHeadConv convs)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i, (n_in, n_out) in enumerate([(hidden, hidden), (hidden, hidden), (hidden, params)]):
        sd[f"controller.layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g)
        sd[f"controller.layers.{i}.bias"] = torch.randn(n_out, generator=g)
    for name in ("lay1", "lay2", "lay3", "lay4", "jia_dcn"):
        sd[f"mask_head.{name}.weight"] = torch.randn(8, 8, 3, 3, generator=g)
        sd[f"mask_head.{name}.bias"] = torch.randn(8, generator=g)
    return sd


def _assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("tao_model", ["grounding_dino", "mask_grounding_dino", None])
def test_tao_checkpoint_loads_every_tensor(tiny, tmp_path, tao_model):
    ckpt = {"state_dict": _tao_state(tiny.state_dict()), "epoch": 3, "global_step": 120,
            "optimizer_states": [], "pytorch-lightning_version": "2.4.0"}
    if tao_model:  # older TAO versions do not write the field: the `model.model.` keys alone tell
        ckpt["tao_model"] = tao_model
    assert any(k.startswith("model.model.backbone.0.body.layers.0.blocks.0.attn.qkv") for k in ckpt["state_dict"])
    path = str(tmp_path / "tao.pth")
    torch.save(ckpt, path)
    model = _fresh(tiny)
    report = load_weights(model, path)
    assert report.source == "tao" and report.new == [] and report.ignored == []
    _assert_same_weights(model, tiny)


def test_tao_mask_head_is_kept_and_ignored_by_a_plain_model(tiny, tmp_path):
    head = _mask_head_state()
    ckpt = {"state_dict": {**_tao_state(tiny.state_dict()), **{"model.model." + k: v for k, v in head.items()}},
            "tao_model": "mask_grounding_dino"}
    ours, unused = W.tao_to_ours(ckpt)
    assert unused == []
    for key, value in head.items():  # recognised names, unchanged, for the mask model to take
        assert torch.equal(ours[key], value), key

    path = str(tmp_path / "mask_gdino.pth")
    torch.save(ckpt, path)
    model = _fresh(tiny)
    report = load_weights(model, path)  # a plain Grounding DINO: no place for the mask head
    _assert_same_weights(model, tiny)
    assert report.ignored == sorted(head) and report.new == []
    assert "16 mask-head weights ignored (controller, mask_head: the model has no mask head)" in report.summary()


def test_idea_and_hf_layouts_keep_mask_head_names(tiny):
    head = _mask_head_state()
    idea, _ = W.ours_to_idea(tiny.state_dict())
    ours, unused = W.idea_to_ours({"model": {**idea, **head}})
    assert unused == [] and all(torch.equal(ours[k], v) for k, v in head.items())
    hf, _ = W.ours_to_hf(tiny.state_dict())
    ours, unused = W.hf_to_ours({**hf, **head})
    assert unused == [] and all(torch.equal(ours[k], v) for k, v in head.items())
    _, unused = W.ours_to_hf(ours)  # transformers has no mask head
    assert sorted(unused) == sorted(head)


def test_tao_keys_that_fit_nowhere_are_named(tiny, tmp_path):
    state = _tao_state(tiny.state_dict())
    state["model.model.mask_head.adapter1.weight"] = torch.zeros(8, 8, 1, 1)  # not a MaskHeadConv TAO builds
    state["criterion.empty_weight"] = torch.zeros(3)  # outside the detector
    path = str(tmp_path / "odd.pth")
    torch.save({"state_dict": state, "tao_model": "grounding_dino"}, path)
    with pytest.raises(WeightLoadError) as err:
        load_weights(_fresh(tiny), path)
    assert "unexpected: model.model.mask_head.adapter1.weight" in str(err.value)
    assert "unexpected: criterion.empty_weight" in str(err.value)

    torch.save({"state_dict": _tao_state(tiny.state_dict()), "tao_model": "dino"}, path)
    with pytest.raises(WeightLoadError, match=r"odd.pth: a TAO 'dino' checkpoint, not one of"):
        load_weights(_fresh(tiny), path)


def _with_mask_head(tiny):
    """Our Grounding DINO plus modules named like Mask Grounding DINO's mask head (the real model comes from
    models/mask_gdino; load_state only sees the names)."""
    model = _fresh(tiny)
    model.controller = MLP(32, 32, 169, 3)
    model.mask_head = nn.Module()
    for name in ("lay1", "lay2", "lay3", "lay4", "jia_dcn"):
        setattr(model.mask_head, name, nn.Conv2d(8, 8, 3, padding=1))
    return model


def test_missing_mask_head_is_newly_initialized(tiny):
    model = _with_mask_head(tiny)
    initial = {k: v.clone() for k, v in model.state_dict().items() if W.optional_head(k) == "mask-head"}
    report = load_state(model, tiny.state_dict(), "gdino.pth", "groundlab")
    assert report.new == sorted(initial) and len(report.new) == 16 and report.ignored == []
    assert "16 mask-head weights newly initialized (controller, mask_head)" in report.summary()
    after = model.state_dict()
    for key, value in initial.items():  # left as initialized
        assert torch.equal(after[key], value), key
    for key, value in tiny.state_dict().items():  # everything else loaded
        assert torch.equal(after[key], value), key


def test_idea_checkpoint_into_a_mask_model_initializes_the_head(tiny, tmp_path):
    idea, _ = W.ours_to_idea(tiny.state_dict())
    path = str(tmp_path / "groundingdino.pth")
    torch.save({"model": idea}, path)
    report = load_weights(_with_mask_head(tiny), path)
    assert report.source == "idea" and len(report.new) == 16


def test_mask_model_takes_a_whole_mask_head(tiny):
    model = _with_mask_head(tiny)
    head = {k: torch.randn_like(v) for k, v in model.state_dict().items() if W.optional_head(k) == "mask-head"}
    report = load_state(model, {**tiny.state_dict(), **head}, "mask.pth", "groundlab")
    assert report.new == [] and report.ignored == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head.items())


def test_partial_mask_head_and_other_missing_keys_stay_errors(tiny):
    model = _with_mask_head(tiny)
    head = {k: v for k, v in model.state_dict().items() if W.optional_head(k) == "mask-head"}
    partial = {**tiny.state_dict(), "controller.layers.0.weight": head["controller.layers.0.weight"]}
    with pytest.raises(WeightLoadError, match=r"missing: controller\.layers\.1"):
        load_state(model, partial, "partial.pth", "groundlab")
    no_feat_map = {k: v for k, v in tiny.state_dict().items() if k != "feat_map.weight"}
    with pytest.raises(WeightLoadError, match="missing: feat_map.weight"):
        load_state(model, no_feat_map, "bad.pth", "groundlab")
    wrong = {**tiny.state_dict(), **head, "mask_head.lay1.weight": torch.zeros(4, 8, 3, 3)}
    with pytest.raises(WeightLoadError, match=r"mask_head\.lay1\.weight: checkpoint \(4, 8, 3, 3\)"):
        load_state(model, wrong, "wrong.pth", "groundlab")


def _with_region_head(tiny):
    """A mask model plus modules named like the referring region head (models/mask_gdino/region_head.py)."""
    model = _with_mask_head(tiny)
    model.region_head = nn.Module()
    model.region_head.query_feat = nn.Embedding(16, 32)
    model.region_head.nt_embed = MLP(32, 32, 2, 2)
    return model


def test_instance_checkpoint_starts_a_referring_model_and_back(tiny):
    """An OD Mask Grounding DINO checkpoint (no region head) loads into a VG model, its region head left as
    initialized; a VG checkpoint loads into an OD model, its region head dropped; half a region head is an
    error."""
    od = _with_mask_head(tiny)
    vg = _with_region_head(tiny)
    initial = {k: v.clone() for k, v in vg.state_dict().items() if k.startswith("region_head.")}
    report = load_state(vg, od.state_dict(), "od.pth", "groundlab")
    assert report.new == sorted(initial) and report.ignored == []
    assert "5 region-head weights newly initialized (region_head)" in report.summary()
    assert all(torch.equal(vg.state_dict()[k], v) for k, v in initial.items())
    assert all(torch.equal(vg.state_dict()[k], v) for k, v in od.state_dict().items())
    report = load_state(_with_mask_head(tiny), vg.state_dict(), "vg.pth", "groundlab")
    assert report.ignored == sorted(initial) and report.new == []
    assert "5 region-head weights ignored (region_head: the model has no region head)" in report.summary()
    half = {k: v for k, v in vg.state_dict().items() if not k.startswith("region_head.nt_embed.")}
    with pytest.raises(WeightLoadError, match=r"missing: region_head\.nt_embed"):
        load_state(_with_region_head(tiny), half, "half.pth", "groundlab")


def test_denoising_embedding_of_a_tao_checkpoint_is_optional(tiny, tmp_path):
    """TAO trained with denoising stores `label_enc` (max_text_len + 1 rows): a model without denoising loads the
    rest and ignores it."""

    label_enc = torch.randn(257, 32)
    state = {**_tao_state(tiny.state_dict()), "model.model.label_enc.weight": label_enc}
    path = str(tmp_path / "tao_dn.pth")
    torch.save({"state_dict": state, "tao_model": "grounding_dino"}, path)
    plain = _fresh(tiny)
    report = load_weights(plain, path)
    assert "label_enc.weight" in report.ignored
    _assert_same_weights(plain, tiny)
    assert report.ignored == ["label_enc.weight"]


def test_denoising_model_takes_the_tao_denoising_embedding(compose, tmp_path, tiny):
    """A denoising model of TAO's size (model.dn_labelbook_size=256) takes TAO's label_enc."""
    from groundlab.models.gdino.build import build_gdino

    dn = build_gdino(compose(TINY_GDINO + ["model.dn_number=4", "model.dn_labelbook_size=256"]).model).model
    state = _tao_state({k: v for k, v in dn.state_dict().items() if k != "label_enc.weight"})
    state["model.model.label_enc.weight"] = torch.randn(257, 32)
    path = str(tmp_path / "tao_dn.pth")
    torch.save({"state_dict": state}, path)
    load_weights(dn, path)
    assert torch.equal(dn.label_enc.weight, state["model.model.label_enc.weight"])
