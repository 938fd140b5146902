"""The Grounding DINO predictor: everything around the network that evaluate, inference and validation share.

It owns loading a checkpoint of any supported layout (groundlab, HF transformers, IDEA-Research), the prompt
encoder, the text cache (each distinct prompt encoded once), class lists split into prompts that fit
max_text_len and merged back to global class ids, and post-processing to original-image pixels. A backend
(predict/torch_backend.py: the contract) runs the network: PyTorch, ONNX Runtime (predict/onnx_backend.py) or
TensorRT, chosen in predict/backends.py.

Per batch of images the backbone runs once, however many prompt chunks a class list needs; images with
different captions run as one batch.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from groundlab.data.collate import unpadded_sizes
from groundlab.models.gdino.build import BuiltModel, build_gdino
from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results, select_free_form
from groundlab.models.mask_gdino.referring_postprocess import (
    ExpressionWords, expression_from_tokenizer, referring_postprocess,
)
from groundlab.predict.mask_paste import paste_query_masks
from groundlab.predict.text_cache import TextCache
from groundlab.predict.torch_backend import TorchBackend
from groundlab.text.captions import ChunkedPrompts, Prompt, chunk_class_prompts
from groundlab.text.tokenizer import load_tokenizer
from groundlab.text.tokens import PromptEncoder

log = logging.getLogger(__name__)

Result = Dict[str, torch.Tensor]


class GDinoPredictor:
    """backend: runs the network (TorchBackend, OnnxRuntimeBackend, ...); tokenizer: the text encoder's; num_select:
    (query, class) pairs kept per image; class_names: the label map a checkpoint (or an exported graph) carried.

    has_masks: the network has a mask head (mask_gdino); its results then also hold "masks" (K, H, W) bool at the
    original image size, binarized at mask_threshold. Grounding DINO has none and ignores mask_threshold."""

    def __init__(self, backend: Any, tokenizer, num_select: int, device: torch.device,
                 class_names: Optional[List[str]] = None, config: Optional[DictConfig] = None):
        self.backend, self.tokenizer, self.device = backend, tokenizer, torch.device(device)
        self.config = config  # the structural model config (what a checkpoint rebuilt)
        # (H, W) every image must have (an exported graph's fixed size), None: any size (transforms: backends.py)
        self.input_size: Optional[Tuple[int, int]] = getattr(backend, "input_size", None)
        self.encoder = PromptEncoder(tokenizer, backend.max_text_len)
        self.post = GroundingPostProcessor(num_select)
        self.texts = TextCache(backend.encode_text, self.encoder, self.device)
        self.class_names = class_names
        self.has_masks = backend.has_masks  # Mask Grounding DINO: results carry "masks"
        # referring segmentation: detect() also returns "no_targets" and "union_mask_logits"
        self.has_region_head = bool(getattr(backend, "has_region_head", False))
        self._chunked: Dict[Tuple[str, ...], ChunkedPrompts] = {}
        self._expressions: Dict[str, ExpressionWords] = {}

    @classmethod
    def from_model(cls, model, model_cfg: DictConfig, device: torch.device,
                   class_names: Optional[List[str]] = None) -> "GDinoPredictor":
        """Around a model in memory (validation during training)."""
        return cls(TorchBackend(model), load_tokenizer(model_cfg.text_encoder_type), model_cfg.num_select, device,
                   class_names, model_cfg)

    @classmethod
    def from_checkpoint(cls, model_cfg: DictConfig, checkpoint: str, device: torch.device) -> "GDinoPredictor":
        """A groundlab .pth, an HF Grounding DINO directory or an IDEA-Research .pth; the structure comes from the
        checkpoint (model_cfg serves IDEA files, which carry none)."""
        built: BuiltModel = build_gdino(model_cfg, checkpoint)
        return cls.from_model(built.model.to(device).eval(), built.config, device, built.class_names)

    # ------------------------------------------------------------------------------------------ prompts
    def chunked(self, class_names: Sequence[str]) -> ChunkedPrompts:
        """The class list as prompts of at most max_text_len tokens (cached per list)."""
        key = tuple(class_names)
        if key not in self._chunked:
            self._chunked[key] = chunk_class_prompts(key, self.encoder.name_len, self.backend.max_text_len)
        return self._chunked[key]

    # ------------------------------------------------------------------------------------------ running
    def run_chunks(self, images: torch.Tensor, padding_mask: torch.Tensor, chunked: ChunkedPrompts) -> List[Dict[str, Any]]:
        """Raw network outputs per prompt chunk for a batch; the image part runs once."""
        image = self.backend.encode_image(images.to(self.device), padding_mask.to(self.device))
        return [self.backend.detect(image, self.texts.get(p).text) for p in chunked.prompts]

    def postprocess_chunks(self, outputs: Sequence[Dict[str, Any]], orig_sizes: torch.Tensor, input_sizes: torch.Tensor,
                           chunked: ChunkedPrompts, nms_threshold: Optional[float] = None,
                           mask_threshold: float = 0.5) -> List[Result]:
        """Per image {"scores" (K,), "labels" (K,) global class index, "boxes" (K, 4) xyxy original pixels},
        float32, sorted by score, K <= num_select; with a mask head also "masks" (K, H, W) bool at the original
        size (probability > mask_threshold), computed for those K detections only. orig_sizes, input_sizes: (B, 2)
        (h, w) of the originals and of the images in the network input without padding (unpadded_sizes)."""
        sizes = orig_sizes.to(self.device)
        per_chunk = []
        with torch.autocast(self.device.type, enabled=False):  # scores in fp32 also under bf16/fp16 autocast
            for out, prompt in zip(outputs, chunked.prompts):
                out = {"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}
                per_chunk.append(self.post(out, sizes, self.texts.get(prompt).positive_map))
            results = merge_chunk_results(per_chunk, chunked, self.post.num_select, nms_threshold)
            if self.has_masks:
                for b, result in enumerate(results):
                    result["masks"] = paste_query_masks(outputs, b, result["chunks"], result["queries"],
                                                        input_sizes[b], sizes[b], mask_threshold)
        return [{k: v for k, v in r.items() if k not in ("queries", "chunks")} for r in results]

    def detect_classes(self, images: torch.Tensor, padding_mask: torch.Tensor, orig_sizes: torch.Tensor,
                       class_names: Sequence[str], nms_threshold: Optional[float] = None,
                       mask_threshold: float = 0.5) -> List[Result]:
        """images (B, 3, H, W) normalized, padding_mask (B, H, W), orig_sizes (B, 2) (h, w): detections over
        the whole class list (labels index class_names); "masks" as postprocess_chunks gives them."""
        chunked = self.chunked(class_names)
        return self.postprocess_chunks(self.run_chunks(images, padding_mask, chunked), orig_sizes,
                                       unpadded_sizes(padding_mask), chunked, nms_threshold, mask_threshold)

    def detect_captions(self, images: torch.Tensor, padding_mask: torch.Tensor, orig_sizes: torch.Tensor,
                        prompts: Sequence[Prompt], box_threshold: float, text_threshold: float,
                        mask_threshold: float = 0.5) -> List[Dict[str, object]]:
        """One free-form caption per image, all images in one batch: per image {"scores" (K,), "boxes" (K, 4),
        "phrases": K str} (queries above box_threshold, named by their tokens above text_threshold), and
        "masks" (K, H, W) bool with a mask head."""
        encoded = [self.texts.get(p) for p in prompts]
        text = encoded[0].text if len({p.text for p in prompts}) == 1 else \
            self.backend.stack_text([e.text for e in encoded])
        image = self.backend.encode_image(images.to(self.device), padding_mask.to(self.device))
        raw = self.backend.detect(image, text)
        out = {"pred_logits": raw["pred_logits"].float(), "pred_boxes": raw["pred_boxes"].float()}
        sizes, input_sizes = orig_sizes.to(self.device), unpadded_sizes(padding_mask)
        results = []
        with torch.autocast(self.device.type, enabled=False):
            for b, e in enumerate(encoded):
                one = {k: v[b : b + 1] for k, v in out.items()}
                result = select_free_form(one, sizes[b : b + 1], e.input_ids, self.tokenizer, box_threshold,
                                          text_threshold)[0]
                queries = result.pop("queries")
                if self.has_masks:
                    result["masks"] = paste_query_masks([raw], b, torch.zeros_like(queries), queries,
                                                        input_sizes[b], sizes[b], mask_threshold)
                results.append(result)
        return results

    def detect_expressions(self, images: torch.Tensor, padding_mask: torch.Tensor, orig_sizes: torch.Tensor,
                           prompts: Sequence[Prompt], settings: Any) -> List[Dict[str, Any]]:
        """Referring segmentation (VG): one expression per image, all images in one batch, through the region
        head's no-target and union outputs (models/mask_gdino/referring_postprocess.py). settings: an object or
        config with conf_threshold, nms_threshold, mask_threshold, ioi_threshold, text_threshold (the
        evaluate / inference config). Per image {"scores" (K,), "boxes" (K, 4) xyxy original pixels, "masks"
        (K, H, W) bool, "labels": K str (the expression's words the detection answers to), "query_idx",
        "no_target": bool, "union": (H, W) bool the network's union mask}."""
        if not self.has_region_head:
            raise ValueError("referring segmentation (data_type VG) needs a Mask Grounding DINO with region queries "
                             "(model.num_region_queries > 0); this model has none")
        encoded = [self.texts.get(p) for p in prompts]
        text = encoded[0].text if len({p.text for p in prompts}) == 1 else \
            self.backend.stack_text([e.text for e in encoded])
        image = self.backend.encode_image(images.to(self.device), padding_mask.to(self.device))
        raw = self.backend.detect(image, text)
        sizes, input_sizes = orig_sizes.to(self.device), unpadded_sizes(padding_mask)
        stride = images.shape[-2] // raw["union_mask_logits"].shape[-2]
        results = []
        with torch.autocast(self.device.type, enabled=False):
            for b, prompt in enumerate(prompts):
                if prompt.text not in self._expressions:
                    if len(self._expressions) >= self.texts.capacity:  # bounded, as the text cache is
                        self._expressions.clear()
                    self._expressions[prompt.text] = expression_from_tokenizer(self.tokenizer, prompt.text,
                                                                               self.backend.max_text_len)
                one = {k: raw[k][b].float() for k in ("pred_logits", "pred_boxes", "no_targets", "union_mask_logits")}

                def masks_fn(queries: torch.Tensor, b: int = b) -> torch.Tensor:
                    return paste_query_masks([raw], b, torch.zeros_like(queries), queries, input_sizes[b], sizes[b],
                                             settings.mask_threshold)

                results.append(referring_postprocess(
                    one, self._expressions[prompt.text], masks_fn, tuple(sizes[b].tolist()),
                    num_select=self.post.num_select, conf_threshold=settings.conf_threshold,
                    nms_threshold=settings.nms_threshold, mask_threshold=settings.mask_threshold,
                    ioi_threshold=settings.ioi_threshold, text_threshold=settings.text_threshold,
                    input_size=tuple(input_sizes[b].tolist()), union_stride=stride))
        return results
