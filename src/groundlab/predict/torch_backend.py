"""The PyTorch backend of the Grounding DINO predictor: the seam where ONNX Runtime and TensorRT plug in.

A backend runs the network and nothing else; preprocessing, prompts (chunking, caching), post-processing and
writers are the predictor's, shared by every backend. Its contract:

- `encode_text(tokens) -> text`: tokens are PromptEncoder.encode's tensors of ONE prompt (batch 1) on the
  device; `text` is whatever the backend needs again for that prompt (here: BERT features; an exported graph
  that takes tokens keeps the tokens). The predictor caches it per distinct prompt.
- `stack_text([text, ...]) -> text`: one text per image, as one batch (images with different captions).
- `encode_image(images, padding_mask) -> image`: images (B, 3, H, W) normalized, padding_mask (B, H, W) True
  on padding; `image` is reused for every prompt of these images (here: the backbone's levels, so a class list
  in 16 chunks runs the Swin once).
- `detect(image, text) -> {"pred_logits": (B, Q, max_text_len), "pred_boxes": (B, Q, 4) cxcywh in [0, 1]}`
  (this backend also returns the model's auxiliary outputs, which validation's loss uses). A text of batch 1 is
  broadcast over the images. With `has_masks`, also MaskGroundingDINO's "mask_features", "mask_stride",
  "image_sizes", "mask_params" and "mask_refs" (models/mask_gdino/dynamic_mask.query_masks reads them); a graph
  backend returns every query's stride-4 mask logits as "pred_masks" (B, Q, H/4, W/4) instead.
- `input_size`: None, or the (H, W) every image must have (an exported graph's; the predictor's transforms
  resize to it and its batches then hold no padding).
- `max_text_len`, `has_masks`: the network's. A graph backend also has `info` (deploy_meta.GraphInfo: the
  model facts stored in the graph, e.g. num_select, class names, text encoder).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from groundlab.models.gdino.model import GroundingDINO
from groundlab.models.mask_gdino.model import MaskGroundingDINO


class TorchBackend:
    """model: a GroundingDINO (eval mode is the caller's choice: validation runs it inside training)."""

    name = "torch"
    input_size = None  # any image size (padded batches): an exported graph has a fixed (H, W) here

    def __init__(self, model: GroundingDINO):
        self.model = model

    @property
    def max_text_len(self) -> int:
        return self.model.max_text_len

    @property
    def has_masks(self) -> bool:
        """detect() also returns MaskGroundingDINO's mask outputs (mask_features, mask_params, ...)."""
        return isinstance(self.model, MaskGroundingDINO)

    @property
    def has_region_head(self) -> bool:
        """detect() also returns the region head's "no_targets" and "union_mask_logits" (referring segmentation)."""
        return getattr(self.model, "region_head", None) is not None

    @torch.no_grad()
    def encode_text(self, tokens: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"],
                                      tokens["position_ids"], tokens["text_self_attention_mask"])

    @staticmethod
    def stack_text(texts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Texts of batch 1 and lengths L_i -> one batch padded to max L_i: padded tokens are masked out
        (text_token_mask False, attending only to themselves), so each image sees only its own caption."""
        L = max(t["text"].shape[1] for t in texts)
        out: Dict[str, List[torch.Tensor]] = {k: [] for k in texts[0]}
        for t in texts:
            pad = L - t["text"].shape[1]
            out["text"].append(torch.nn.functional.pad(t["text"], (0, 0, 0, pad)))
            out["text_token_mask"].append(torch.nn.functional.pad(t["text_token_mask"], (0, pad), value=False))
            out["position_ids"].append(torch.nn.functional.pad(t["position_ids"], (0, pad)))
            sa = torch.nn.functional.pad(t["text_self_attention_mask"], (0, pad, 0, pad), value=False)
            if pad:
                idx = torch.arange(L - pad, L, device=sa.device)
                sa[:, idx, idx] = True
            out["text_self_attention_mask"].append(sa)
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, padding_mask: torch.Tensor) -> Any:
        return self.model.image_levels(images, padding_mask)

    @torch.no_grad()
    def detect(self, image: Any, text: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        return self.model.forward_from_levels(image, text)
