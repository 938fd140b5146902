"""The TensorRT backend of the Grounding DINO predictor: runs an engine of action=gen_trt_engine with the
backend contract of predict/torch_backend.py, torch CUDA tensors as its input and output buffers (no pycuda).

An engine is the whole network of the ONNX contract (deploy/onnx_contract.py) at one image size H x W and one
text length L, for a batch range [min, max]:

- `encode_text(tokens)`: the prompt's tokens (batch 1) padded to L, as the engine's six-input contract names
  them: {"input_ids", "attention_mask", "position_ids", "token_type_ids": (1, L), "text_token_mask": (1, L, L)}
  (padded tokens masked out and attending only to themselves, as TorchBackend.stack_text pads).
- `stack_text(texts)`: one text per image, concatenated (each is already L long).
- `encode_image(images, padding_mask)`: the (B, 3, H, W) float images on the GPU; the engine has no padding mask,
  so images must arrive at exactly H x W (dataset.augmentation.fixed_input_size=[H, W]).
- `detect(image, text)`: {"pred_logits": (B, Q, L) float32, "pred_boxes": (B, Q, 4) float32 cxcywh in [0, 1]},
  CUDA tensors; with a mask head also "pred_masks" (B, Q, H/4, W/4) mask logits
  (what predict/mask_paste.py reads). A text of batch 1 is broadcast over the images.

What the engine's tensors do not say (text encoder, num_select, label map) comes from `<engine>.json`, the
GraphInfo every deployed graph records (predict/deploy_meta.py); what they do say (input size, text length, batch
range, mask output) is read off the engine and wins (`info`). Bad input fails with one sentence naming the engine:
a missing file, no CUDA, no TensorRT, an engine this TensorRT cannot load, a batch outside the engine's range,
images of another size.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

from groundlab.errors import DataError, MissingFile, UserError
from groundlab.predict.deploy_meta import GraphInfo, sidecar_path
from groundlab.predict.graph_contract import INPUTS, REGION_OUTPUTS, TEXT_INPUTS, batch_groups, graph_tokens

# TensorRT DataType member name -> torch dtype (the engine's declared I/O types)
TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


# PromptEncoder tokens (B, l) -> the contract's five text inputs at the engine's text length: the same padding
# as every exported graph's (graph_contract.graph_tokens)
pad_tokens = graph_tokens


class TensorRTBackend:
    """engine_path: a `.engine` of action=gen_trt_engine with its `<engine>.json` beside it; device: a CUDA
    device. info: the GraphInfo to use instead of the sidecar's (tests, benchmarks)."""

    name = "tensorrt"

    def __init__(self, engine_path: str, device="cuda", info: Optional[GraphInfo] = None):
        self.path = str(engine_path)
        if not os.path.isfile(self.path):
            raise MissingFile(f"{self.path} does not exist: evaluate.trt_engine / inference.trt_engine name an engine "
                              f"built by action=gen_trt_engine.")
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise UserError(f"{self.path} is a TensorRT engine, which runs on a CUDA GPU, but "
                            f"{'torch sees no CUDA device here' if not torch.cuda.is_available() else f'device {self.device} was asked for'}; "
                            f"run the ONNX file or the checkpoint instead.")
        try:
            import tensorrt as trt
        except ImportError as err:
            raise UserError(f"{self.path} is a TensorRT engine, but `import tensorrt` fails here ({err}); install the "
                            f"GPU extras: pip install -c constraints.txt -r requirements-gpu.txt.") from None
        stored = info or GraphInfo.read(sidecar_path(self.path), f"the engine {self.path}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(self.path, "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise DataError(f"is not an engine TensorRT {trt.__version__} can load on this GPU (built by another "
                            f"TensorRT version or for another GPU?): rebuild it here with action=gen_trt_engine.",
                            self.path)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        missing = [n for n in INPUTS if n not in self.inputs] + [n for n in ("pred_logits", "pred_boxes")
                                                                  if n not in self.outputs]
        if missing:
            raise DataError(f"lacks the tensor(s) {', '.join(missing)} of the groundlab/TAO contract; build it from "
                            f"action=export's ONNX with action=gen_trt_engine.", self.path)
        self.dtypes = {n: TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        _, _, self.height, self.width = tuple(self.engine.get_tensor_shape("inputs"))
        self.text_len = int(self.engine.get_tensor_shape("input_ids")[1])
        batch = self.engine.get_tensor_shape("inputs")[0]
        if batch < 0:
            lo, _, hi = self.engine.get_tensor_profile_shape("inputs", 0)
            self.batch_range = (int(lo[0]), int(hi[0]))
        else:
            self.batch_range = (int(batch), int(batch))
        opt = stored.batch_range[1] if stored.batch_range else self.batch_range[0]
        self.info = replace(stored, input_size=(int(self.height), int(self.width)), max_text_len=self.text_len,
                            has_masks="pred_masks" in self.outputs, batch_size=None,
                            batch_range=(self.batch_range[0], opt, self.batch_range[1]))
        self.stream = torch.cuda.Stream(self.device)

    # ------------------------------------------------------------------------------------ the contract
    @property
    def input_size(self) -> Tuple[int, int]:
        """(H, W) every image must have: the engine's fixed input size."""
        return int(self.height), int(self.width)

    @property
    def max_text_len(self) -> int:
        """The engine's text length: prompts are chunked to fit it."""
        return self.text_len

    @property
    def has_masks(self) -> bool:
        return "pred_masks" in self.outputs

    @property
    def has_region_head(self) -> bool:
        """detect() also returns "no_targets" and "union_mask_logits" (referring segmentation)."""
        return all(n in self.outputs for n in REGION_OUTPUTS)

    def encode_text(self, tokens: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in pad_tokens(tokens, self.text_len).items()}

    @staticmethod
    def stack_text(texts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return {k: torch.cat([t[k] for t in texts]) for k in TEXT_INPUTS}

    def encode_image(self, images: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if (h, w) != (self.height, self.width) or bool(padding_mask.any()):
            raise DataError(f"takes {self.height}x{self.width} images without padding, but the batch is {h}x{w}"
                            f"{' with padding' if bool(padding_mask.any()) else ''}: set "
                            f"dataset.augmentation.fixed_input_size=[{self.height},{self.width}] (or build an engine "
                            f"from an ONNX exported at the size you feed).", self.path)
        return images.to(self.device, torch.float32).contiguous()

    def detect(self, image: torch.Tensor, text: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Any batch: run in groups the engine's batch range takes (at most its max, a short group filled up to
        its min with copies of the last image), as the ONNX Runtime backend runs a fixed-batch graph."""
        B = image.shape[0]
        lo, hi = self.info.batch_bounds(B)
        feeds = {"inputs": image}
        for k in TEXT_INPUTS:
            v = text[k]
            feeds[k] = v.expand(B, *v.shape[1:]) if v.shape[0] != B else v
        parts = []
        for group, real in batch_groups(feeds, lo, hi):
            outputs = self._execute({k: v.to(self.device, self.dtypes[k]).contiguous() for k, v in group.items()})
            parts.append({k: v[:real] for k, v in outputs.items()})
        outputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        result = {"pred_logits": outputs["pred_logits"][..., : self.text_len].float(),
                  "pred_boxes": outputs["pred_boxes"].float()}
        if self.has_masks:
            result["pred_masks"] = outputs["pred_masks"].float()
        if self.has_region_head:
            result.update({n: outputs[n].float() for n in REGION_OUTPUTS})
        return result

    def _execute(self, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One enqueue on the backend's own stream (TensorRT warns against the default stream), ordered after
        the caller's stream, which then waits for the outputs."""
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError(f"TensorRT could not run {self.path} (its log above says why).")
        caller.wait_stream(self.stream)
        for tensor in list(feeds.values()) + list(outputs.values()):
            tensor.record_stream(self.stream)  # the caching allocator must not reuse them before the engine is done
        return outputs


def predictor_from_engine(engine_path: str, device="cuda"):
    """A GDinoPredictor running `engine_path`: tokenizer, num_select and label map from its `<engine>.json`."""
    from groundlab.predict.gdino import GDinoPredictor
    from groundlab.text.tokenizer import load_tokenizer

    backend = TensorRTBackend(engine_path, device)
    info = backend.info
    return GDinoPredictor(backend, load_tokenizer(info.text_encoder_type), info.num_select, backend.device,
                          info.class_names)
