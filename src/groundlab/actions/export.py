"""action=export for Grounding DINO and Mask Grounding DINO: a checkpoint (groundlab, HF or IDEA layout) to an ONNX
graph with TAO's input and output names (predict/graph_contract.py), then checked:

1. the ONNX checker (with shape inference) on every graph written;
2. ONNX Runtime against PyTorch on a real image and prompt: the first image of dataset.val_data_sources (COCO or
   ODVG) or else a synthetic scene (dataset.synthetic's kind with dataset=synthetic), resized to exactly
   export.input_height x export.input_width and normalized as evaluation does; the prompt is the checkpoint's
   class names (as many as fit max_text_len) or "object". The largest |difference| of each output is logged and
   returned as `max_abs_diff_<output>` (`max_abs_diff_text_features` and `..._image` for a split export); over
   1e-3 (relative for outputs beyond 1 in magnitude, e.g. mask logits) the export fails. Where near-tied proposal
   scores rank differently, PyTorch runs again with ONNX Runtime's query selection (deploy/onnx_verify.py).

export.checkpoint defaults to the latest checkpoint of the train run with the same model and run_name
(engine/run_dirs.py). Writes export.onnx_file (default <results_dir>/<model>.onnx, where action=gen_trt_engine
looks by default) and, with export.split_text_encoder, <name>.text.onnx and <name>.image.onnx next to it.
export.dynamic_text_len=true gives the graphs a symbolic text length (ONNX Runtime then runs the prompt's own
tokens; TensorRT needs the default fixed max_text_len), and export.deform_attn_impl=gather_matmul samples the
deformable attention with Gather and MatMul instead of GridSample (faster in ONNX Runtime on the CPU). Each graph
carries the model facts evaluate / inference need (num_select, class names, text encoder, input size) in its
metadata, so `evaluate.onnx_file=<name>.onnx` needs nothing else.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.config import ConfigError
from groundlab.data.image_decode import decode_rgb
from groundlab.data.sources import load_split, synthetic_spec
from groundlab.data.synthetic import SyntheticSpec, render_scene
from groundlab.data.transforms import Compose, FixedResize, Normalize
from groundlab.deploy.onnx_export import check_simplifier, export_gdino, graph_info
from groundlab.deploy.onnx_verify import check_graph
from groundlab.engine.run_dirs import chained_file, exported_onnx
from groundlab.io.remote_files import local_path
from groundlab.models.gdino.build import BuiltModel, build_gdino
from groundlab.predict.graph_contract import graph_tokens
from groundlab.text.captions import chunk_class_prompts, class_prompt
from groundlab.text.tokenizer import load_tokenizer
from groundlab.text.tokens import PromptEncoder

log = logging.getLogger(__name__)


def sample_image(cfg: DictConfig, height: int, width: int) -> Tuple[torch.Tensor, str]:
    """(1, 3, height, width) normalized image for the check, and where it came from."""
    d = cfg.dataset
    val = d.get("val_data_sources")
    if d.type != "synthetic" and val is not None and val.get("json_file"):
        source = load_split(d, cfg.cache_dir, "val", use_masks=False)[0]
        rec = source.records[0]
        pixels = decode_rgb(source.images.read(rec["file_name"]), rec["file_name"])
        where = f"{rec['file_name']}, the first image of dataset.val_data_sources"
    else:
        spec = synthetic_spec(d.synthetic) if d.type == "synthetic" else SyntheticSpec()
        pixels, _ = render_scene(spec, np.random.default_rng(spec.seed))
        where = f"a synthetic scene ({spec.image_size[0]}x{spec.image_size[1]})"
    aug = d.augmentation
    transforms = Compose([FixedResize(height, width), Normalize(aug.input_mean, aug.input_std)])
    image, _ = transforms(torch.from_numpy(pixels).permute(2, 0, 1).float(), {"boxes": torch.zeros(0, 4)}, None)
    return image[None], where


def _check_model(cfg: DictConfig, built: BuiltModel, checkpoint: str) -> None:
    """The checkpoint holds the model the command names (model=mask_gdino exports masks, model=gdino none)."""
    has_mask = bool(built.config.get("has_mask"))
    if has_mask and cfg.model.name != "mask_gdino":
        raise ConfigError(f"export.checkpoint={checkpoint} holds a Mask Grounding DINO (it has a mask head): export "
                          f"it with model=mask_gdino.")
    if not has_mask and cfg.model.name == "mask_gdino":
        raise ConfigError(f"export.checkpoint={checkpoint} holds a Grounding DINO without a mask head: export it "
                          f"with model=gdino, or fine-tune it into model=mask_gdino first.")


def run(cfg: DictConfig) -> Dict[str, float]:
    ex = cfg.export
    checkpoint = chained_file(cfg, "export.checkpoint", ex.checkpoint)  # not given: the train run's latest checkpoint
    onnx_file = ex.onnx_file or exported_onnx(cfg.results_dir, cfg.model.name)
    return export_checkpoint(cfg, checkpoint, onnx_file, split_text_encoder=bool(ex.split_text_encoder))


def export_checkpoint(cfg: DictConfig, checkpoint: str, onnx_file: str, model: Optional[torch.nn.Module] = None,
                      split_text_encoder: bool = False, verify: bool = True) -> Dict[str, float]:
    """Export `checkpoint` (or `model`, e.g. a quantized copy of it, with the checkpoint's config and label map) at
    export.input_height x export.input_width, export.batch_size, export.opset_version; with `verify`, check every
    graph against PyTorch (module doc). Returns the `max_abs_diff_<output>` metrics ({} without verify)."""
    ex = cfg.export
    check_simplifier(ex.simplify)
    built = build_gdino(cfg.model, local_path(checkpoint, cfg.cache_dir, "export.checkpoint"))
    _check_model(cfg, built, checkpoint)
    model = (model if model is not None else built.model).eval()
    H, W = int(ex.input_height), int(ex.input_width)
    batch = None if ex.batch_size == -1 else int(ex.batch_size)

    image, where = sample_image(cfg, H, W)
    encoder = PromptEncoder(load_tokenizer(built.config.text_encoder_type), model.max_text_len)
    names = built.class_names or ["object"]
    prompt = chunk_class_prompts(names, encoder.name_len, model.max_text_len).prompts[0] if built.class_names \
        else class_prompt(names)
    tokens = encoder.encode([prompt])
    example = {"inputs": image, **graph_tokens({k: v for k, v in tokens.items() if torch.is_tensor(v)},
                                               model.max_text_len)}
    if batch is not None:
        example = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in example.items()}
    log.info("export check input: %s; prompt %r", where, prompt.text[:120])

    info = graph_info(model, OmegaConf.to_container(built.config, resolve=True), built.class_names, (H, W), batch)
    graphs = export_gdino(model, info, onnx_file, example, batch is None, int(ex.opset_version),
                          split_text_encoder, bool(ex.simplify), bool(ex.verbose), bool(ex.dynamic_text_len),
                          str(ex.deform_attn_impl))
    metrics: Dict[str, float] = {}
    for graph in graphs if verify else []:
        agreement = check_graph(graph, model, batch is None)
        for line in agreement.lines():
            log.info("%s graph: %s", graph.kind, line)
        suffix = "_image" if graph.kind == "image" else ""  # the text graph's output has a name of its own
        metrics.update({f"max_abs_diff_{name}{suffix}": diff for name, diff in agreement.max_abs_diff.items()})
        log.info("ONNX file stored at %s", graph.path)
    return metrics
