"""The tensor contract of an exported Grounding DINO graph, shared by the export (deploy/onnx_export.py), the ONNX
Runtime backend (predict/onnx_backend.py) and the TensorRT backend (predict/trt_backend.py): tensor names and dtypes
as TAO's export writes them (so DeepStream configs and TAO engines carry over), the split text / image graphs, the
text padding and the batch groups a graph of a fixed batch or batch range runs.

Full graph (`<name>.onnx`), B images, L = model.max_text_len (text always padded to L, TAO's pad_to_max), or with
`export.dynamic_text_len` a symbolic L (`num_tokens`, 1..max_text_len) that ONNX Runtime runs at the prompt's own
length (a batch of prompts padded to its longest; TensorRT and DeepStream take the fixed L):

| input | shape | dtype | meaning |
|---|---|---|---|
| `inputs` | (B, 3, H, W) | float32 | images resized to exactly H x W, mean/std normalized; no padding input |
| `input_ids` | (B, L) | int64 | token ids, 0 after the prompt |
| `attention_mask` | (B, L) | bool | True on the prompt's tokens |
| `position_ids` | (B, L) | int64 | per-phrase positions (restart at 0 after each delimiter) |
| `token_type_ids` | (B, L) | int64 | zeros |
| `text_token_mask` | (B, L, L) | bool | the sub-sentence self-attention mask (padding attends to itself) |

outputs `pred_logits` (B, Q, max_text_len) float32 (-inf on padding tokens and padded queries; max_text_len wide with
a symbolic L too), `pred_boxes` (B, Q, 4) cxcywh in
[0, 1], and for Mask Grounding DINO `pred_masks` (B, Q, H/4, W/4): stride-4 mask logits of every query; with region
queries (referring segmentation, as TAO's VG engines) also `no_targets` (B, 2) logits [target, no target] and
`union_mask_logits` (B, 2, H/8, W/8) logits [background, foreground] of the referred objects' union.

Split export (`export.split_text_encoder`), so a fixed class list is encoded once:
- `<name>.text.onnx`: `input_ids`, `position_ids`, `token_type_ids`, `text_token_mask` -> `text_features`
  (B, L, hidden_dim) float32, the BERT output projected to the detector's width (BERT attends by the sub-sentence
  mask alone: `attention_mask` goes to the image graph);
- `<name>.image.onnx`: `inputs`, `text_features`, `attention_mask`, `position_ids`, `text_token_mask` -> the full
  graph's outputs.

What a graph records besides its tensors (text encoder, num_select, label map, input size, batch, precision) is
deploy_meta.GraphInfo, stored under the ONNX metadata key "groundlab", so evaluate / inference need no model
config; a foreign graph (TAO's) is read with the config's model keys instead.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch

IMAGE_INPUT = "inputs"
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "text_token_mask")
INPUTS = (IMAGE_INPUT,) + TEXT_INPUTS
OUTPUTS = ("pred_logits", "pred_boxes")
MASK_OUTPUT = "pred_masks"
REGION_OUTPUTS = ("no_targets", "union_mask_logits")  # the region head's (num_region_queries > 0)
INPUT_DTYPES = {"inputs": np.float32, "input_ids": np.int64, "attention_mask": np.bool_, "position_ids": np.int64,
                "token_type_ids": np.int64, "text_token_mask": np.bool_, "text_features": np.float32}

# the shape of each input, as one-line descriptions (a foreign graph's input ranks are checked against them)
INPUT_SHAPES = {"inputs": "(B, 3, H, W)", "input_ids": "(B, L)", "attention_mask": "(B, L)", "position_ids": "(B, L)",
                "token_type_ids": "(B, L)", "text_token_mask": "(B, L, L)", "text_features": "(B, L, C)"}

TEXT_FEATURES = "text_features"
# the token axes of every text tensor: symbolic (TEXT_AXIS) in a graph exported with export.dynamic_text_len
TEXT_AXIS = "num_tokens"
TEXT_AXES = {"input_ids": (1,), "attention_mask": (1,), "position_ids": (1,), "token_type_ids": (1,),
             "text_token_mask": (1, 2), TEXT_FEATURES: (1,)}
TEXT_GRAPH_INPUTS = ("input_ids", "position_ids", "token_type_ids", "text_token_mask")
TEXT_GRAPH_OUTPUTS = (TEXT_FEATURES,)
IMAGE_GRAPH_INPUTS = (IMAGE_INPUT, TEXT_FEATURES, "attention_mask", "position_ids", "text_token_mask")
# the graph inputs of each kind of graph ("full": the TAO graph)
GRAPH_INPUTS = {"full": INPUTS, "text": TEXT_GRAPH_INPUTS, "image": IMAGE_GRAPH_INPUTS}


def split_graph_paths(onnx_file: str) -> Tuple[str, str]:
    """(text graph, image graph) paths of a split export named after `onnx_file`: a.onnx -> a.text.onnx and
    a.image.onnx."""
    stem = onnx_file[:-5] if onnx_file.endswith(".onnx") else onnx_file
    return f"{stem}.text.onnx", f"{stem}.image.onnx"


def graph_tokens(tokens: Dict[str, torch.Tensor], length: int) -> Dict[str, torch.Tensor]:
    """PromptEncoder.encode's tensors (B, L <= length) -> the five text inputs of the contract, padded to `length`
    (a fixed-length graph's max_text_len): padding has id 0, attention_mask False, position 0 and attends only to
    itself (so the prompt's tokens compute exactly what they compute unpadded)."""
    if tokens["input_ids"].shape[1] > length:
        raise ValueError(f"a prompt of {tokens['input_ids'].shape[1]} tokens is longer than the graph's "
                         f"max_text_len={length}")
    text = {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].bool(),
            "position_ids": tokens["position_ids"].long(), "token_type_ids": tokens["token_type_ids"].long(),
            "text_token_mask": tokens["text_self_attention_mask"].bool()}
    return pad_text(text, length)


def pad_text(text: Dict[str, torch.Tensor], length: int) -> Dict[str, torch.Tensor]:
    """Graph text tensors (any of TEXT_AXES' names, (B, L, ...)) padded along their token axes to `length` >= L:
    zeros (False) everywhere, except that each padding token attends to itself in text_token_mask."""
    F = torch.nn.functional
    out = {}
    for name, value in text.items():
        pad = length - value.shape[1]
        if pad <= 0 or name not in TEXT_AXES:
            out[name] = value
        elif name == "text_token_mask":
            mask = F.pad(value, (0, pad, 0, pad), value=False)
            idx = torch.arange(length - pad, length, device=mask.device)
            mask[:, idx, idx] = True
            out[name] = mask
        else:  # (B, L) or (B, L, C): pad dim 1
            out[name] = F.pad(value, (0, 0) * (value.dim() - 2) + (0, pad))
    return out


def batch_groups(feeds: Dict[str, torch.Tensor], smallest: int, largest: int
                 ) -> Iterator[Tuple[Dict[str, torch.Tensor], int]]:
    """A batch of graph inputs (every tensor (B, ...)) as the groups a graph of batch range [smallest, largest]
    runs: at most `largest` images each, a group short of `smallest` filled with copies of its last image. Yields
    (group, real): the first `real` outputs of the group are the batch's."""
    B = next(iter(feeds.values())).shape[0]
    for start in range(0, B, largest):
        group = {n: v[start : start + largest] for n, v in feeds.items()}
        real = next(iter(group.values())).shape[0]
        short = smallest - real
        if short > 0:
            group = {n: torch.cat([v, v[-1:].expand(short, *v.shape[1:])]) for n, v in group.items()}
        yield group, real
