"""action=quantize with quantize.backend=modelopt.onnx: NVIDIA ModelOpt's PTQ of the exported graph, calibrated on
the feeds the onnxruntime backend calibrates on. The settings map onto ModelOpt's (one dtype, skip_names globs as
node-name regexes, calibration method) and bad ones fail in one sentence naming the key; the calibration reader
replays its feeds for ModelOpt; end to end, a tiny Mask Grounding DINO checkpoint is exported, quantized to
symmetric int8 Q/DQ (what TensorRT builds) with the skipped nodes left float, and evaluated float vs quantized on
the synthetic set, both mAPs and the delta in results.json; its exported graph quantizes to FP8 on the CPU too.
ONNX Runtime's own int8 graph quantizes the weights' products only (Linear layers as Gemm, float outputs)."""

from __future__ import annotations

import fnmatch
import json
import re

import numpy as np
import pytest
import torch

from conftest import SMALL_SYNTHETIC, TINY_GDINO
from groundlab.config import ConfigError
from groundlab.deploy.modelopt_onnx_quantize import glob_regex, quantized_nodes, settings
from groundlab.deploy.ort_quantize import FeedReader
from groundlab.runner import run_action

onnx = pytest.importorskip("onnx")

INT8 = [{"module_name": "*", "weights": {"dtype": "int8"}, "activations": {"dtype": "int8"}}]
FP8 = [{"module_name": "*", "weights": {"dtype": "fp8_e4m3fn"}, "activations": {"dtype": "fp8_e4m3fn"}}]


def _matches(patterns, name):
    return any(re.match(p, name) for p in patterns)


def test_settings_map_taos_keys_onto_modelopts():
    s = settings(INT8, ["*bert*", "*class_embed*"], "static_ptq", "minmax")
    assert (s.mode, s.method) == ("int8", "max")
    assert _matches(s.exclude, "/model/bert/encoder/layer.0/attention/self/query/MatMul")
    assert _matches(s.exclude, "/model/transformer/decoder/class_embed.1/MatMul")
    assert not _matches(s.exclude, "/model/transformer/decoder/layers.0/linear1/MatMul")
    s = settings(FP8, [], "static_ptq", "entropy")
    assert (s.mode, s.method, s.exclude) == ("fp8", "entropy", [])
    # layers naming part of the graph: nodes no module_name glob matches stay float
    decoder = [dict(INT8[0], module_name="*/decoder/*")]
    s = settings(decoder, [], "static_ptq", "max")
    assert not _matches(s.exclude, "/model/transformer/decoder/layers.0/linear1/MatMul")
    assert _matches(s.exclude, "/model/transformer/encoder/layers.0/linear1/MatMul")
    assert re.match(glob_regex("*bert*"), "/model/bert/x") and not re.match(glob_regex("bert*"), "/model/bert/x")


@pytest.mark.parametrize("layers, mode, algorithm, sentence", [
    (INT8, "weight_only_ptq", "minmax", r"quantize.mode='weight_only_ptq': quantize.backend=modelopt.onnx "
                                        r"calibrates activations \(static_ptq\) only"),
    (INT8, "static_ptq", "percentile", r"quantize.algorithm='percentile': quantize.backend=modelopt.onnx "
                                       r"calibrates with one of \['entropy', 'max', 'minmax'\]"),
    ([dict(INT8[0], activations={"dtype": "fp8_e4m3fn"})], "static_ptq", "max",
     r"quantize.layers asks for \['fp8_e4m3fn', 'int8'\]: quantize.backend=modelopt.onnx quantizes the whole graph "
     r"to one dtype"),
])
def test_bad_settings_are_one_sentence(layers, mode, algorithm, sentence):
    with pytest.raises(ConfigError, match=sentence):
        settings(layers, [], mode, algorithm)


def test_the_action_says_so_before_any_work(compose, tmp_path):
    base = ["experiment=quickstart", *TINY_GDINO, "action=quantize", f"quantize.model_path={tmp_path / 'm.onnx'}",
            "quantize.backend=modelopt.onnx"]
    with pytest.raises(ConfigError, match=r"quantize.mode='weight_only_ptq': quantize.backend=modelopt.onnx"):
        run_action(compose(base + ["quantize.mode=weight_only_ptq"], results_dir=str(tmp_path / "a")))
    assert not (tmp_path / "a" / "quantize" / "m.int8.onnx").exists()


def test_the_reader_replays_its_feeds_for_modelopt():
    drawn = []

    def feeds():
        for i in range(3):
            drawn.append(i)
            yield {"x": np.full(1, i)}

    reader = FeedReader(feeds())
    assert int(reader.get_first()["x"][0]) == 0 and drawn == [0]  # a peek: nothing more is drawn
    assert [int(f["x"][0]) for f in reader] == [0, 1, 2] and reader.get_next() is None
    reader.rewind()
    assert [int(f["x"][0]) for f in reader] == [0, 1, 2] and drawn == [0, 1, 2] and reader.count == 3
    with pytest.raises(ValueError, match="dataset.quant_calibration_data_sources holds no image"):
        FeedReader(iter(())).get_first()



def test_modelopts_patches_of_onnxruntime_quantization_are_undone():
    """ModelOpt's quantize() patches onnxruntime.quantization for the whole process; afterwards ORT static PTQ in
    the same process (quantize.backend=onnxruntime) failed with "Quantization parameters are not specified"."""
    import onnxruntime.quantization.calibrate as calibrate
    from onnxruntime.quantization.registry import QDQRegistry

    from groundlab.deploy.modelopt_onnx_quantize import _onnxruntime_quantization_kept

    def state():
        return (calibrate.CalibraterBase.select_tensors_to_calibrate, calibrate.CalibraterBase.__init__,
                calibrate.MinMaxCalibrater.collect_data, calibrate.create_calibrator, dict(QDQRegistry))

    before = state()
    with _onnxruntime_quantization_kept():
        from modelopt.onnx.quantization.ort_patching import patch_ort_modules

        patch_ort_modules(False)  # what modelopt.onnx.quantization.quantize() does
        QDQRegistry.pop("Concat", None)
        assert state() != before
    assert state() == before

def test_onnx_runtime_runs_an_fp8_qdq_graph_on_the_cpu(tmp_path):
    """The CPU's Q/DQ fusions take integer types only (MatMulIntegerToFloat refuses float8 at session creation):
    the backend's session runs an FP8 graph unfused, as fake quantization."""
    from onnx import TensorProto, helper, numpy_helper

    from groundlab.predict.onnx_backend import open_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", [t, "s", "z"], [f"{t}q"]) for t in ("x", "w")]
    nodes += [helper.make_node("DequantizeLinear", [f"{t}q", "s", "z"], [f"{t}d"]) for t in ("x", "w")]
    nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
    constants = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])]
    graph = helper.make_graph(nodes, "fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], constants)
    path = str(tmp_path / "fp8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), path)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    (y,) = open_session(path, torch.device("cpu")).run(None, {"x": x})
    exact = x @ w
    assert 0 < np.abs(y - exact).max() < 0.1 * np.abs(exact).max()  # fp8's rounding: 3 mantissa bits


def test_onnx_runtimes_int8_graph_quantizes_the_weights_products_only(tmp_path):
    """quantize.backend=onnxruntime (static PTQ): a Linear on a (B, N, C) input becomes one Gemm with int8 weights and
    its bias inside, fed a quantized input and giving a float output (no Q/DQ after it); a MatMul of two
    activations stays float; the int8 graph computes what the float graph computes, to int8's rounding."""
    from groundlab.deploy.ort_quantize import quantize_onnx
    from groundlab.predict.onnx_backend import open_session

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))  # (B, N, 16)
            return (h @ h.transpose(1, 2)).softmax(-1) @ h  # activation x activation products

    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    float_path, int8_path = str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx")
    torch.onnx.export(Block().eval(), (x,), float_path, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    feeds = [{"x": torch.randn(3, 6, 16).numpy()} for _ in range(4)]
    report = quantize_onnx(float_path, int8_path, feeds, [])
    assert report.quantized == 2 and report.calibration_batches == 4
    graph = onnx.load(int8_path).graph
    made_by = {o: n for n in graph.node for o in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(gemms) == 2 and len(matmuls) == 2 and "Add" not in {n.op_type for n in graph.node}
    assert all(made_by[n.input[0]].op_type == "DequantizeLinear" for n in gemms)
    assert not any(n.op_type == "QuantizeLinear" and made_by.get(n.input[0]) in gemms for n in graph.node)
    assert not any(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear"
                   for n in matmuls for i in n.input)
    x = feeds[0]["x"]
    (exact,) = open_session(float_path, torch.device("cpu")).run(None, {"x": x})
    (y,) = open_session(int8_path, torch.device("cpu")).run(None, {"x": x})
    assert 0 < np.abs(y - exact).max() < 0.05 * np.abs(exact).max()


# ---------------------------------------------------------------------------------------------- slow
TINY_MGD = ["model=mask_gdino", *SMALL_SYNTHETIC, *TINY_GDINO]


def _checkpoint(compose, overrides, path):
    from groundlab.models.gdino.build import build_gdino, save_gdino

    cfg = compose(overrides)
    torch.manual_seed(0)
    model = build_gdino(cfg.model).model
    with torch.no_grad():  # no zero-initialised head: every output depends on the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return save_gdino(str(path), model, cfg.model, ["red circle", "blue square"])


@pytest.mark.slow
def test_a_checkpoint_quantizes_through_modelopt_onnx(compose, tmp_path):
    from groundlab.deploy.onnx_contract import quantization, read_contract
    from groundlab.deploy.trt_build import prepare_graph
    from groundlab.predict.deploy_meta import onnx_info

    ckpt = _checkpoint(compose, TINY_MGD, tmp_path / "mgd.pth")
    out = tmp_path / "q"
    skip = ["*bert*", "*class_embed*", "*bbox_embed*", "*controller*", "*mask_head*"]
    metrics = run_action(compose(TINY_MGD + [
        "action=quantize", f"quantize.model_path={ckpt}", "quantize.backend=modelopt.onnx",
        "quantize.num_calibration_batches=2", "export.input_height=64", "export.input_width=96",
        f"quantize.skip_names=[{','.join(repr(g) for g in skip)}]"], results_dir=str(out)))
    results = json.loads((out / "quantize" / "results.json").read_text())
    print(results["summary"], {k: (results["float"][k], results["quantized"][k]) for k in results["delta"]})
    assert results["backend"] == "modelopt.onnx" and results["precision"] == "INT8"
    for key in ("mAP", "mAP50", "segm_mAP", "segm_mAP50"):  # both evaluations, and their difference
        assert results["delta"][key] == pytest.approx(results["quantized"][key] - results["float"][key])
        assert metrics[f"delta_{key}"] == pytest.approx(results["delta"][key])
    assert "2 calibration batches" in results["summary"] and "to int8 Q/DQ with ModelOpt" in results["summary"]
    graph = onnx.load(results["quantized_onnx"])
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # symmetric int8: every zero point an int8 zero (TensorRT's only Q/DQ), so gen_trt_engine builds it as INT8
    constants = {t.name: t for t in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = constants[node.input[2]]
            assert zero.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any()
    assert quantization(graph) == "INT8"  # what gen_trt_engine builds with tensorrt.data_type=INT8, as it is:
    assert prepare_graph(graph, read_contract(graph, results["quantized_onnx"]), "INT8") is graph
    fed = quantized_nodes(graph)
    assert any(n.op_type == "MatMul" for n in fed) and any("/backbone/" in n.name for n in fed)
    skipped = [n.name for n in fed if any(fnmatch.fnmatchcase(n.name, g) for g in skip)]
    assert not skipped, skipped[:5]  # the excluded nodes compute on float inputs
    info = onnx_info(graph)  # the float graph's facts, with what was done to it
    assert (info.model, info.has_masks, info.input_size, info.precision) == ("mask_gdino", True, (64, 96), "INT8")
    assert info.build["quantize_backend"] == "modelopt.onnx"
    assert "Quantization" in open(results["quantized_onnx"] + ".log").read()  # ModelOpt's log, not the console
    # FP8 of the exported graph itself (model_path an .onnx): calibrated on the CPU too, and evaluated there by
    # ONNX Runtime as fake quantization (its CPU fusions take integer Q/DQ only)
    fp8 = tmp_path / "fp8"
    run_action(compose(TINY_MGD + [
        "action=quantize", f"quantize.model_path={results['float_onnx']}", "quantize.backend=modelopt.onnx",
        "quantize.num_calibration_batches=1", "quantize.algorithm=entropy",
        "quantize.layers=[{module_name: '*', weights: {dtype: fp8_e4m3fn}, activations: {dtype: fp8_e4m3fn}}]"],
        results_dir=str(fp8)))
    results = json.loads((fp8 / "quantize" / "results.json").read_text())
    print(results["summary"], {k: (results["float"][k], results["quantized"][k]) for k in results["delta"]})
    assert results["precision"] == "FP8" and results["quantized_onnx"].endswith("mask_gdino.fp8.onnx")
    assert "to fp8 Q/DQ with ModelOpt (entropy calibration)" in results["summary"]
    assert set(results["delta"]) >= {"mAP", "segm_mAP"} and quantization(onnx.load(results["quantized_onnx"])) == "FP8"
