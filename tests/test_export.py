"""action=export and the ONNX Runtime backend: the graphs have TAO's names, dtypes and shapes, no custom op and a
fixed TopK K; onnxruntime agrees with PyTorch (masks of every query included) at any batch, after an inference-mode
forward, at 128x128 with more queries than image tokens, and as a split text / image export; a fixed-batch graph runs
any batch; and an exported model evaluates to its checkpoint's mAP (bbox and segm). Bad input fails with one
sentence: a checkpoint of another model, an ONNX file without the contract's inputs, a missing execution provider,
conflicting backend settings."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_GDINO, TRAINED_RECIPE
from groundlab.config import ConfigError
from groundlab.deploy.onnx_verify import ExportMismatch, agreement, max_abs_diffs, torch_reference
from groundlab.predict.deploy_meta import GraphInfo
from groundlab.predict.graph_contract import INPUTS, graph_tokens
from groundlab.runner import run_action
from groundlab.text.captions import class_prompt
from groundlab.text.tokens import PromptEncoder

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TINY_MGD = ["model=mask_gdino", *TINY_GDINO]
NAMES = ["red circle", "blue square"]
DTYPES = {"inputs": "float", "input_ids": "int64", "attention_mask": "bool", "position_ids": "int64",
          "token_type_ids": "int64", "text_token_mask": "bool"}


def _checkpoint(compose, overrides, path, seed=0):
    from groundlab.models.gdino.build import build_gdino, save_gdino

    cfg = compose(overrides)
    torch.manual_seed(seed)
    model = build_gdino(cfg.model).model
    with torch.no_grad():  # no zero-initialised head: every output depends on the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_gdino(str(path), model, cfg.model, NAMES), model.eval()


def _tokens(tokenizer, max_text_len, names=NAMES, batch=1):
    enc = PromptEncoder(tokenizer, max_text_len).encode([class_prompt(names)] * batch)
    return graph_tokens({k: v for k, v in enc.items() if torch.is_tensor(v)}, max_text_len)


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_close(got, ref, atol=1e-3):
    ref = ref.numpy() if torch.is_tensor(ref) else ref
    finite = np.isfinite(ref)
    assert got.shape == ref.shape and (np.isfinite(got) == finite).all()
    assert np.abs(got[finite] - ref[finite]).max() < atol


def _export(compose, overrides, tmp_path, *extra):
    """run_action(action=export) of an untrained (perturbed) checkpoint; returns (metrics, onnx path, model)."""
    ckpt, model = _checkpoint(compose, overrides, tmp_path / "model.pth")
    onnx_file = tmp_path / "model.onnx"
    metrics = run_action(compose(overrides + ["action=export", f"export.checkpoint={ckpt}",
                                              f"export.onnx_file={onnx_file}", *extra], results_dir=str(tmp_path)))
    return metrics, onnx_file, model


# ---------------------------------------------------------------------------------------------- fast
def test_padding_the_text_to_max_text_len_changes_no_real_token(compose, tokenizer):
    """The graph takes text padded to max_text_len (TAO's pad_to_max): padding attends only to itself, so every
    real token's features are those of the unpadded prompt."""
    from groundlab.models.gdino.build import build_gdino

    torch.manual_seed(0)
    model = build_gdino(compose(TINY_GDINO).model).model.eval()
    enc = PromptEncoder(tokenizer, 256).encode([class_prompt(NAMES)])
    padded = graph_tokens({k: v for k, v in enc.items() if torch.is_tensor(v)}, 256)
    L = enc["input_ids"].shape[1]
    assert {k: tuple(v.shape) for k, v in padded.items()} == {
        "input_ids": (1, 256), "attention_mask": (1, 256), "position_ids": (1, 256), "token_type_ids": (1, 256),
        "text_token_mask": (1, 256, 256)}
    assert padded["attention_mask"].dtype == torch.bool and padded["attention_mask"].sum() == L
    assert torch.equal(padded["text_token_mask"][0, L:, L:], torch.eye(256 - L, dtype=torch.bool))
    with torch.no_grad():
        short = model.encode_text(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                  enc["position_ids"], enc["text_self_attention_mask"])["text"]
        full = model.encode_text(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"],
                                 padded["position_ids"], padded["text_token_mask"])["text"]
    assert torch.allclose(full[:, :L], short, atol=1e-5)


def test_rank_swaps_are_compared_under_onnx_runtimes_selection(compose, tokenizer):
    """Swapping two ranks of the query selection changes every output (each rank has its own content query): the
    check then compares PyTorch given ONNX Runtime's selection and says why; real differences still fail."""
    from groundlab.deploy.onnx_export import FullGraph
    from groundlab.models.gdino.build import build_gdino

    torch.manual_seed(0)
    model = build_gdino(compose(TINY_GDINO).model).model.eval()
    args = [torch.randn(1, 3, 96, 128), *_tokens(tokenizer, 256).values()]
    reference = torch_reference(FullGraph(model), model, args, ["pred_logits", "pred_boxes"])
    same, own, _ = reference(None)
    assert agreement(reference, same, own).compared == "same inputs"
    swapped = own.copy()
    swapped[:, [0, 1]] = own[:, [1, 0]]  # as if ONNX Runtime had ranked two near-tied proposals the other way
    got = reference(swapped)[0]
    assert max(max_abs_diffs(same, got).values()) > 1e-3
    result = agreement(reference, got, swapped)
    assert result.compared == "PyTorch given ONNX Runtime's query selection"
    assert max(result.max_abs_diff.values()) == 0.0
    assert result.note.startswith("2 of 20 ranks of the top-k query selection differ (the same proposals in "
                                  "another order: near-tied scores, smallest gap")
    wrong = {**got, "pred_boxes": got["pred_boxes"] + 0.01}  # boxes are in [0, 1]: the tolerance is 1e-3
    with pytest.raises(ExportMismatch, match="even under ONNX Runtime's query selection: pred_logits 0.00e.00, "
                                             "pred_boxes 1.00e-02"):
        agreement(reference, wrong, swapped)
    with pytest.raises(ExportMismatch, match="under the same query selection: pred_logits 0.00e.00, pred_boxes 1.0"):
        agreement(reference, {**same, "pred_boxes": same["pred_boxes"] + 0.01}, own)
    # an output with values beyond 1 in magnitude is compared relative to them (mask logits run into the hundreds)
    scale = result.scales["pred_logits"]
    assert scale > 1 and result.scales["pred_boxes"] == 1.0
    assert agreement(reference, {**same, "pred_logits": same["pred_logits"] + 0.5e-3 * scale}, own).max_abs_diff[
        "pred_logits"] > 1e-3
    with pytest.raises(ExportMismatch, match="times the largest .value.: pred_logits"):
        agreement(reference, {**same, "pred_logits": same["pred_logits"] + 2e-3 * scale}, own)


def _foreign_onnx(path):
    """A graph with the wrong inputs: "images" -> "pred_logits"."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["pred_logits"])], "foreign",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_an_onnx_file_without_the_contracts_inputs_is_one_sentence(compose, tmp_path):
    from groundlab.predict.onnx_backend import OnnxRuntimeBackend

    path = _foreign_onnx(tmp_path / "foreign.onnx")
    with pytest.raises(ConfigError) as err:
        OnnxRuntimeBackend(str(path), torch.device("cpu"), compose(TINY_GDINO).model)
    assert str(err.value) == (f"{path} lacks the inputs inputs, input_ids, attention_mask, position_ids, "
                              f"token_type_ids, text_token_mask: a Grounding DINO graph takes inputs, input_ids, "
                              f"attention_mask, position_ids, token_type_ids, text_token_mask (action=export or "
                              f"TAO's export writes them).")


def test_a_missing_execution_provider_is_one_sentence(compose, tmp_path):
    from groundlab.predict.onnx_backend import OnnxRuntimeBackend

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    path = _foreign_onnx(tmp_path / "any.onnx")
    with pytest.raises(ConfigError) as err:
        OnnxRuntimeBackend(str(path), torch.device("cuda:0"), compose(TINY_GDINO).model)
    message = str(err.value)
    assert message.startswith(f"{path} is to run on cuda:0, but this onnxruntime has no CUDAExecutionProvider (it has ")
    assert "CPUExecutionProvider" in message and "onnxruntime-gpu" in message and "\n" not in message


@pytest.mark.parametrize("overrides, sentence", [
    ([], "evaluate.checkpoint (a groundlab .pth, an HF directory or an IDEA .pth), evaluate.onnx_file or "
         "evaluate.trt_engine is required."),
    (["evaluate.checkpoint=a.pth", "evaluate.onnx_file=a.onnx"],
     "evaluate.checkpoint, evaluate.onnx_file are given together: set evaluate.backend to one of torch, onnxruntime "
     "to say which runs."),
    (["evaluate.checkpoint=a.pth", "evaluate.backend=onnxruntime"],
     "evaluate.backend=onnxruntime runs evaluate.onnx_file, which is not given."),
])
def test_backend_choice_sentences(compose, overrides, sentence):
    from groundlab.predict.backends import choose_backend

    with pytest.raises(ConfigError) as err:
        choose_backend(compose(TINY_GDINO + overrides).evaluate, "evaluate")
    assert str(err.value) == sentence


def test_backend_choice_follows_the_file_or_the_backend_key(compose):
    from groundlab.predict.backends import BACKENDS, choose_backend

    ev = compose(TINY_GDINO + ["evaluate.onnx_file=m.onnx"]).evaluate
    assert choose_backend(ev, "evaluate") == ("onnxruntime", "m.onnx")
    both = compose(TINY_GDINO + ["inference.checkpoint=m.pth", "inference.trt_engine=m.engine",
                                 "inference.backend=torch"]).inference
    assert choose_backend(both, "inference") == ("torch", "m.pth")
    # the TensorRT seam: groundlab.predict.trt_backend.TensorRTBackend(engine_path, device) once it exists
    import importlib.util

    if importlib.util.find_spec("groundlab.predict.trt_backend") is None:
        with pytest.raises(ConfigError, match=r"m.engine: the TensorRT backend \(groundlab.predict.trt_backend"):
            BACKENDS["tensorrt"]("m.engine", torch.device("cpu"), None)


def test_export_keys_and_rules(compose):
    from groundlab.config import check_config

    ex = compose(["model=mask_gdino", "action=export"]).export
    assert (ex.input_height, ex.input_width, ex.batch_size, ex.opset_version) == (544, 960, -1, 17)
    assert not ex.split_text_encoder and not ex.simplify and ex.checkpoint is None and ex.onnx_file is None
    assert not ex.dynamic_text_len  # TAO's fixed max_text_len, which TensorRT and DeepStream take
    assert compose(["model=mal"]).export is None  # MAL has no export
    with pytest.raises(ConfigError, match=r"export.batch_size=0 must be -1 \(dynamic\) or >= 1"):
        check_config(compose(["action=export", "export.batch_size=0"]))


def test_a_mal_checkpoint_to_a_grounding_dino_export_is_one_sentence(compose, tmp_path):
    from groundlab.models.checkpoint import save_checkpoint
    from groundlab.models.mal.build import build_mal_network

    mal = compose(["model=mal", "dataset=mal_synthetic", "model.vit_overrides={hidden_size:32,num_hidden_layers:1,"
                   "num_attention_heads:2,intermediate_size:64}", "dataset.crop_size=64"])
    net = build_mal_network(mal.model, 64)
    ckpt = save_checkpoint(str(tmp_path / "mal.pth"), net, mal.model, NAMES, extra={"crop_size": 64})
    with pytest.raises(ConfigError) as err:
        run_action(compose(TINY_GDINO + ["action=export", f"export.checkpoint={ckpt}"], results_dir=str(tmp_path)))
    assert str(err.value) == (f"{ckpt} is a model=mal checkpoint; model=gdino and model=mask_gdino read Grounding "
                              f"DINO checkpoints (run it with model=mal).")


def test_a_box_checkpoint_to_a_mask_export_is_one_sentence(compose, tmp_path):
    ckpt, _ = _checkpoint(compose, TINY_GDINO, tmp_path / "gdino.pth")
    with pytest.raises(ConfigError) as err:
        run_action(compose(TINY_MGD + ["action=export", f"export.checkpoint={ckpt}"], results_dir=str(tmp_path)))
    assert str(err.value) == (f"export.checkpoint={ckpt} holds a Grounding DINO without a mask head: export it with "
                              f"model=gdino, or fine-tune it into model=mask_gdino first.")


def test_simplify_without_onnxslim_is_one_sentence(monkeypatch):
    from groundlab.deploy.onnx_export import check_simplifier

    monkeypatch.setitem(sys.modules, "onnxslim", None)  # as if not installed (requirements.txt has it)
    with pytest.raises(ConfigError, match=r"export.simplify=true needs onnxslim, which is not installed"):
        check_simplifier(True)


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_gdino_export_has_taos_contract_and_matches_pytorch(compose, tokenizer, tmp_path):
    """action=export at 96x128: TAO's names and dtypes, a dynamic batch, no custom op, TopK with a constant K,
    the model facts in the metadata; onnxruntime agrees with PyTorch on the check image and on a batch of two."""
    from groundlab.deploy.onnx_export import FullGraph

    metrics, path, model = _export(compose, TINY_GDINO, tmp_path, "export.input_height=96", "export.input_width=128")
    assert set(metrics) == {"max_abs_diff_pred_logits", "max_abs_diff_pred_boxes"}
    assert all(v < 1e-3 for v in metrics.values()), metrics
    proto = onnx.load(str(path))

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: i for i in proto.graph.input}
    assert list(inputs) == list(INPUTS)
    assert {n: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
            for n, i in inputs.items()} == {**DTYPES, "inputs": "float32"}
    assert dims(inputs["inputs"]) == ["batch_size", 3, 96, 128]
    assert dims(inputs["text_token_mask"]) == ["batch_size", 256, 256]
    assert {o.name: dims(o) for o in proto.graph.output} == {"pred_logits": ["batch_size", 20, 256],
                                                            "pred_boxes": ["batch_size", 20, 4]}
    assert {n.domain for n in proto.graph.node} <= {""} and proto.opset_import[0].version == 17
    assert "GridSample" in {n.op_type for n in proto.graph.node}
    constants = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                             for o in n.output}
    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    assert topk and all(n.input[1] in constants for n in topk)  # K folded to a constant (TensorRT needs it)
    info = GraphInfo.from_json({p.key: p.value for p in proto.metadata_props}["groundlab"])
    assert (info.model, info.kind, info.class_names, info.input_size, info.batch_size, info.num_select,
            info.has_masks) == ("gdino", "full", NAMES, (96, 128), None, 20, False)

    torch.manual_seed(1)
    feeds = {"inputs": torch.randn(2, 3, 96, 128), **_tokens(tokenizer, 256, batch=2)}
    got = _session(path).run(None, {n: v.numpy() for n, v in feeds.items()})
    with torch.no_grad():
        ref = FullGraph(model)(*feeds.values())
    for g, r in zip(got, ref):
        _assert_close(g, r)


@pytest.mark.slow
def test_mask_gdino_export_gives_every_querys_mask_logits(compose, tokenizer, tmp_path):
    """pred_masks (B, Q, H/4, W/4) is query_masks of every (image, query) pair, equal in onnxruntime and PyTorch
    for a batch of two different images (the graph was traced at batch 2 from a batch-1 check input)."""
    from groundlab.models.mask_gdino.dynamic_mask import query_masks

    metrics, path, model = _export(compose, TINY_MGD, tmp_path, "export.input_height=96", "export.input_width=128")
    assert metrics["max_abs_diff_pred_masks"] < 1e-3, metrics
    session = _session(path)
    assert [(o.name, o.shape) for o in session.get_outputs()][2] == ("pred_masks", ["batch_size", 20, 24, 32])
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    tokens = _tokens(tokenizer, 256, batch=2)
    logits, boxes, masks = session.run(None, {"inputs": images.numpy(), **{k: v.numpy() for k, v in tokens.items()}})
    with torch.no_grad():
        out = model(images, tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"],
                    tokens["position_ids"], tokens["text_token_mask"])
        b, q = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 19])
        some = query_masks(out, b, q)
    _assert_close(logits, out["pred_logits"])
    _assert_close(boxes, out["pred_boxes"])
    _assert_close(masks[b.numpy(), q.numpy()], some)
    assert np.abs(masks[0] - masks[1]).max() > 1e-2  # two images, two sets of masks


@pytest.mark.slow
def test_export_after_an_inference_mode_forward_at_the_same_size(compose, tokenizer, tmp_path):
    """The Swin caches window indices per size; those of an inference-mode forward must not reach the trace."""
    from conftest import export_onnx

    _, model = _checkpoint(compose, TINY_GDINO, tmp_path / "m.pth")
    enc = PromptEncoder(tokenizer, 256).encode([class_prompt(NAMES)])
    images = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        before = model(images, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], enc["position_ids"],
                       enc["text_self_attention_mask"])
    session, feeds = export_onnx(model, images, enc, tmp_path / "after.onnx")
    logits, boxes = session.run(None, {n: v.numpy() for n, v in feeds.items()})
    _assert_close(boxes, before["pred_boxes"])
    _assert_close(logits, before["pred_logits"])


@pytest.mark.slow
def test_export_at_128x128_with_more_queries_than_image_tokens(compose, tmp_path):
    """128x128 gives the tiny Swin 340 tokens for 400 queries: 60 padded queries, static in the graph."""
    metrics, path, _ = _export(compose, TINY_GDINO + ["model.num_queries=400"], tmp_path,
                               "export.input_height=128", "export.input_width=128")
    assert all(v < 1e-3 for v in metrics.values()), metrics
    assert [o.shape for o in _session(path).get_outputs()] == [["batch_size", 400, 256], ["batch_size", 400, 4]]


@pytest.mark.slow
def test_split_graphs_reproduce_the_full_graph(compose, tokenizer, tmp_path):
    """export.split_text_encoder: text graph -> text_features -> image graph gives the full graph's outputs, and a
    predictor on the image graph (class list encoded once) detects what one on the full graph detects."""
    from groundlab.predict.backends import open_predictor

    metrics, path, _ = _export(compose, TINY_MGD, tmp_path, "export.input_height=96", "export.input_width=128",
                               "export.split_text_encoder=true")
    assert {"max_abs_diff_text_features", "max_abs_diff_pred_masks_image"} <= set(metrics)
    assert all(v < 1e-3 for v in metrics.values()), metrics
    text, image = _session(tmp_path / "model.text.onnx"), _session(tmp_path / "model.image.onnx")
    assert [i.name for i in text.get_inputs()] == ["input_ids", "position_ids", "token_type_ids", "text_token_mask"]
    assert [i.name for i in image.get_inputs()] == ["inputs", "text_features", "attention_mask", "position_ids",
                                                    "text_token_mask"]
    torch.manual_seed(2)
    images = torch.randn(2, 3, 96, 128).numpy()
    tokens = {k: v.numpy() for k, v in _tokens(tokenizer, 256, batch=2).items()}
    full = _session(path).run(None, {"inputs": images, **tokens})
    (features,) = text.run(None, {i.name: tokens[i.name] for i in text.get_inputs()})
    split = image.run(None, {"inputs": images, "text_features": features,
                             **{k: tokens[k] for k in ("attention_mask", "position_ids", "text_token_mask")}})
    for a, b in zip(split, full):
        _assert_close(a, b, atol=1e-4)

    cfg = compose(TINY_MGD)
    sizes = torch.tensor([[96, 128], [96, 128]])
    padding = torch.zeros(2, 96, 128, dtype=torch.bool)
    results = []
    for onnx_file in (path, tmp_path / "model.image.onnx"):
        predictor = open_predictor(cfg.model, compose(TINY_MGD + [f"evaluate.onnx_file={onnx_file}"]).evaluate,
                                   "evaluate", torch.device("cpu"))
        assert predictor.has_masks and predictor.class_names == NAMES and predictor.input_size == (96, 128)
        results.append(predictor.detect_classes(torch.from_numpy(images), padding, sizes, NAMES))
    for a, b in zip(*results):
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"], atol=1e-4)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3) and torch.equal(a["masks"], b["masks"])


@pytest.mark.slow
def test_the_cpu_graph_runs_each_prompt_at_its_own_length_without_grid_sample(compose, tokenizer, tmp_path):
    """export.dynamic_text_len + export.deform_attn_impl=gather_matmul (ONNX Runtime's fast CPU graph): the token
    axes are symbolic and pred_logits keeps max_text_len columns; no GridSample; the backend feeds each prompt
    unpadded (two prompts in one batch padded to the longer) and gets what PyTorch gets with the text padded to
    max_text_len, through the full graph and through the split graphs."""
    from groundlab.deploy.onnx_export import FullGraph
    from groundlab.predict.onnx_backend import OnnxRuntimeBackend

    metrics, path, model = _export(compose, TINY_MGD, tmp_path, "export.input_height=96", "export.input_width=128",
                                   "export.split_text_encoder=true", "export.dynamic_text_len=true",
                                   "export.deform_attn_impl=gather_matmul")
    assert all(v < 1e-3 for v in metrics.values()), metrics
    for graph in ("model.onnx", "model.image.onnx"):
        ops = {n.op_type for n in onnx.load(str(tmp_path / graph)).graph.node}
        assert "GridSample" not in ops and {"Gather", "MatMul"} <= ops and {n.domain for n in onnx.load(
            str(tmp_path / graph)).graph.node} <= {""}
    session = _session(path)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["input_ids"] == ["batch_size", "num_tokens"]
    assert shapes["text_token_mask"] == ["batch_size", "num_tokens", "num_tokens"]
    assert session.get_outputs()[0].shape == ["batch_size", 20, 256]
    assert _session(tmp_path / "model.text.onnx").get_outputs()[0].shape == ["batch_size", "num_tokens", 32]
    encoder = PromptEncoder(tokenizer, 256)
    tokens = [{k: v for k, v in encoder.encode([class_prompt(names)]).items() if torch.is_tensor(v)}
              for names in (["red circle"], NAMES + ["green triangle", "yellow star"])]
    torch.manual_seed(4)
    images = torch.randn(2, 3, 96, 128)
    padded = {k: torch.cat([graph_tokens(t, 256)[k] for t in tokens]) for k in INPUTS[1:]}
    with torch.no_grad():
        ref = FullGraph(model)(images, *padded.values())
    for onnx_file in (path, tmp_path / "model.image.onnx"):
        backend = OnnxRuntimeBackend(str(onnx_file), torch.device("cpu"))
        texts = [backend.encode_text(t) for t in tokens]
        assert backend.dynamic_text and [t["attention_mask"].shape[1] for t in texts] == [
            t["input_ids"].shape[1] for t in tokens] and texts[0]["attention_mask"].shape[1] < 10
        out = backend.detect(backend.encode_image(images, torch.zeros(2, 96, 128, dtype=torch.bool)),
                             backend.stack_text(texts))
        for name, r in zip(("pred_logits", "pred_boxes", "pred_masks"), ref):
            _assert_close(out[name].numpy(), r)
    with pytest.raises(ConfigError, match="export.deform_attn_impl='gather' must be one of"):
        from groundlab.config import check_config

        check_config(compose(["action=export", "export.deform_attn_impl=gather"]))


@pytest.mark.slow
def test_a_fixed_batch_graph_runs_any_batch(compose, tokenizer, tmp_path):
    """export.batch_size=2: the backend runs three images as two groups (the last filled with a copy); without
    groundlab's metadata the same graph is read with the config's model keys."""
    from groundlab.deploy.onnx_export import FullGraph
    from groundlab.predict.onnx_backend import OnnxRuntimeBackend

    _, path, model = _export(compose, TINY_GDINO, tmp_path, "export.input_height=96", "export.input_width=128",
                             "export.batch_size=2")
    backend = OnnxRuntimeBackend(str(path), torch.device("cpu"))
    assert backend.info.batch_size == 2 and _session(path).get_inputs()[0].shape == [2, 3, 96, 128]
    enc = PromptEncoder(tokenizer, 256).encode([class_prompt(NAMES)])
    text = backend.encode_text({k: v for k, v in enc.items() if torch.is_tensor(v)})
    torch.manual_seed(3)
    images = torch.randn(3, 3, 96, 128)
    out = backend.detect(backend.encode_image(images, torch.zeros(3, 96, 128, dtype=torch.bool)), text)
    tokens = _tokens(tokenizer, 256, batch=3)
    with torch.no_grad():
        ref = FullGraph(model)(images, *tokens.values())
    _assert_close(out["pred_logits"].numpy(), ref[0])
    _assert_close(out["pred_boxes"].numpy(), ref[1])
    with pytest.raises(ValueError, match="takes 96x128 images, got"):
        backend.encode_image(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))

    # a foreign graph (TAO's export carries no groundlab metadata): described by its inputs and the config
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    cfg = compose(TINY_GDINO + ["model.num_select=7"]).model
    foreign = OnnxRuntimeBackend(str(tmp_path / "foreign.onnx"), torch.device("cpu"), cfg)
    assert (foreign.info.kind, foreign.info.max_text_len, foreign.info.num_select, foreign.info.input_size,
            foreign.info.batch_size, foreign.info.class_names, foreign.has_masks) == (
                "full", 256, 7, (96, 128), 2, None, False)
    again = foreign.detect(foreign.encode_image(images, torch.zeros(3, 96, 128, dtype=torch.bool)), text)
    assert torch.equal(again["pred_boxes"], out["pred_boxes"])


SIZE = ["dataset.augmentation.fixed_input_size=[128,160]"]  # both evaluations resize as the graph needs


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["quickstart", "mgd_quickstart"])
def test_an_exported_model_evaluates_to_its_checkpoints_map(compose, tmp_path, trained, experiment):
    """train -> evaluate the checkpoint at 128x160 -> export at 128x160 -> evaluate.onnx_file: the same mAP (bbox,
    and segm for Mask Grounding DINO) within 0.005; inference with the ONNX file writes the same kind of outputs.
    The run dirs are laid out as hydra.run.dir's, so evaluate and export take the train run's checkpoint without
    being told (engine/run_dirs.py)."""
    base = [f"experiment={experiment}", *TRAINED_RECIPE]
    model = "mask_gdino" if experiment == "mgd_quickstart" else "gdino"
    runs = trained(experiment)[0]  # <model>/<action>/<run_name>: the experiment's run_name is its own name
    ckpt = runs / "train" / experiment / f"{model}_model_latest.pth"
    ev_torch = runs / "evaluate" / experiment
    torch_map = run_action(compose(base + SIZE + ["action=evaluate"], results_dir=str(ev_torch)))
    assert json.loads((ev_torch / "evaluate" / "results.json").read_text())["checkpoint"] == str(ckpt)
    export = run_action(compose(base + ["action=export", "export.input_height=128", "export.input_width=160"],
                                results_dir=str(runs / "export" / experiment)))
    assert all(v < 1e-3 for v in export.values()), export
    onnx_file = runs / "export" / experiment / f"{model}.onnx"
    ort_map = run_action(compose(base + ["action=evaluate", f"evaluate.onnx_file={onnx_file}"],
                                 results_dir=str(tmp_path / "ev_onnx")))
    keys = ["mAP", "mAP50"] + (["segm_mAP", "segm_mAP50"] if model == "mask_gdino" else [])
    print({k: (torch_map[k], ort_map[k]) for k in keys})
    assert torch_map["mAP50"] > 0.04, torch_map  # a model that detects (untrained: 0.0 here)
    for k in keys:
        assert abs(torch_map[k] - ort_map[k]) <= 0.005, (k, torch_map[k], ort_map[k])
    written = json.loads((tmp_path / "ev_onnx" / "evaluate" / "results.json").read_text())
    assert written["backend"] == "onnxruntime" and written["checkpoint"] == str(onnx_file)
    # the detections themselves: as many per image, and the same scores on (nearly) every image; proposals tied
    # within float noise may rank differently on an image, which shifts its scores a little (onnx_verify.py)
    by_image = [{}, {}]
    for side, run in zip(by_image, (ev_torch, tmp_path / "ev_onnx")):
        for d in json.loads((run / "evaluate" / "detections.json").read_text()):
            side.setdefault(d["image_id"], []).append(d["score"])
    assert by_image[0].keys() == by_image[1].keys() and len(by_image[0]) == 32
    assert all(len(s) == len(by_image[1][i]) for i, s in by_image[0].items())
    same = [i for i, s in by_image[0].items() if np.allclose(sorted(s), sorted(by_image[1][i]), atol=1e-4)]
    assert len(same) >= 30, sorted(set(by_image[0]) - set(same))
    if model == "gdino":  # the same trained model quantizes: ONNX Runtime and ModelOpt of the graph, ModelOpt of it
        _quantizes(compose, base, onnx_file, ckpt, ort_map, tmp_path)
    if model == "mask_gdino":
        run_action(compose(base + ["action=inference", f"inference.onnx_file={onnx_file}",
                                   "inference.conf_threshold=0.0"], results_dir=str(tmp_path / "inf")))
        detections = json.loads((tmp_path / "inf" / "inference" / "results.json").read_text())
        assert detections and all("segmentation" in d for d in detections)


def _quantizes(compose, base, onnx_file, ckpt, float_map, tmp_path):
    """action=quantize on a trained model: the int8 graph has Q/DQ pairs except in the skipped parts, evaluates
    within 0.05 mAP50 of float, and results.json reports both and the delta; for every backend."""
    calib = ["quantize.num_calibration_batches=4", "export.input_height=128", "export.input_width=160"]
    # (modelopt.onnx has its own end-to-end test: tests/test_quantize_graph.py)
    for backend, model_path in (("onnxruntime", onnx_file), ("modelopt.pytorch", ckpt)):
        out = tmp_path / f"q_{backend}"
        metrics = run_action(compose(base + calib + ["action=quantize", f"quantize.model_path={model_path}",
                                                     f"quantize.backend={backend}"], results_dir=str(out)))
        results = json.loads((out / "quantize" / "results.json").read_text())
        print(backend, results["float"]["mAP50"], results["quantized"]["mAP50"], results["summary"])
        assert results["delta"]["mAP50"] == pytest.approx(metrics["delta_mAP50"])
        assert results["float"]["mAP50"] == pytest.approx(float_map["mAP50"], abs=0.005)
        assert abs(metrics["delta_mAP50"]) <= 0.05, results
        graph = onnx.load(results["quantized_onnx"])
        ops = {n.op_type for n in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, backend
        quantized = {n.name for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        assert quantized and not any("class_embed" in n or "bbox_embed" in n for n in quantized), backend


def test_quantize_settings_fail_in_one_sentence(compose, tmp_path):
    base = ["experiment=quickstart", *TINY_GDINO, "action=quantize"]
    # no model_path and no train run to follow (tests/test_chained_runs.py has the sentence)
    with pytest.raises(ConfigError, match="quantize.model_path is not given and .*gdino/train/quickstart"):
        run_action(compose(base, results_dir=str(tmp_path / "gdino" / "quantize" / "quickstart")))
    with pytest.raises(ConfigError, match="makes int8 graphs only"):
        run_action(compose(base + [f"quantize.model_path={tmp_path / 'm.onnx'}",
                                   "quantize.layers=[{module_name: '*', weights: {dtype: fp8_e4m3fn}, "
                                   "activations: {dtype: fp8_e4m3fn}}]"], results_dir=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="quantizes the PyTorch model"):
        run_action(compose(base + [f"quantize.model_path={tmp_path / 'm.onnx'}", "quantize.backend=modelopt.pytorch"],
                           results_dir=str(tmp_path / "c")))


def test_modelopt_config_maps_taos_keys():
    from groundlab.deploy.modelopt_quantize import modelopt_config

    layers = [{"module_name": "*", "weights": {"dtype": "int8"}, "activations": {"dtype": "int8"}},
              {"module_name": "transformer.decoder", "weights": {"dtype": "fp8_e4m3fn"},
               "activations": {"dtype": "fp8_e4m3fn"}}]
    cfg = modelopt_config(layers, ["*bert*"], "minmax")
    entries = {e["quantizer_name"]: e for e in cfg["quant_cfg"]}
    assert cfg["algorithm"] == "max" and entries["*"]["enable"] is False
    assert entries["*weight_quantizer"]["cfg"] == {"num_bits": 8, "axis": 0}
    assert entries["*input_quantizer"]["cfg"] == {"num_bits": 8, "axis": None}
    assert entries["transformer.decoder.*weight_quantizer"]["cfg"] == {"num_bits": (4, 3), "axis": None}
    assert entries["*bert*"] == {"quantizer_name": "*bert*", "enable": False}
    assert cfg["quant_cfg"][-1]["quantizer_name"] == "*bert*"  # skips come last, so they win
    weight_only = modelopt_config(layers[:1], [], "max", weight_only=True)
    assert not any(e["quantizer_name"].endswith("input_quantizer") for e in weight_only["quant_cfg"][1:])
    with pytest.raises(ValueError, match="quantize.layers\\[0\\].weights.dtype='int4'"):
        modelopt_config([{"module_name": "*", "weights": {"dtype": "int4"}, "activations": {"dtype": "int8"}}], [],
                        "max")
