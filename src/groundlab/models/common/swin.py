"""Swin Transformer backbone: a drop-in for transformers' `SwinBackbone` (same config, state-dict keys and
shapes, parameter order and outputs), faster to train on CPU.

Behaviour follows transformers 5.x `SwinBackbone`, which runs its encoder with `always_partition=True`: every
block keeps the configured window and shift, and a map smaller than the window is zero-padded up to one window
(`SwinModel`'s "shrink the window, drop the shift" rule never applies to the backbone). Drop path acts on the
attention branch only, per sample, in training, as there.

Same arithmetic, less work:
* q/k/v is one matmul over the real tokens only (a zero padding token would just give the bias) and the
  output projection runs after the windows are merged back, so padding never goes through a Linear;
* padding, cyclic shift, window partition and head split are one index gather per q/k/v, and merging back is
  one gather too (indices built once per map size); backward is a gather as well, never a scatter;
* the 1/sqrt(head_dim) scale is folded into the q weights; position bias and shift mask broadcast over the batch;
* subnormal attention probabilities (e^-100 from the shift mask) are flushed to zero, see _Softmax.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) row of the (2ws-1)^2-row bias table for the offset between two window positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


def shift_mask(hp: int, wp: int, ws: int, shift: int, device, dtype) -> torch.Tensor:
    """(num_windows, N, N) additive mask of shifted windows on a (hp, wp) padded map: -100 (Swin's value, not
    -inf) between positions that the cyclic shift brought together from different regions of the map."""
    def regions(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - ws).long() + (i >= n - shift).long()

    label = regions(hp)[:, None] * 3 + regions(wp)[None, :]
    label = label.view(hp // ws, ws, wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
    differ = label[:, None, :] != label[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill(differ, -100.0)


class WindowIndex:
    """Where each token of a (H, W) map goes in its zero-padded, cyclically shifted windows, per head.

    Slots are (window, head, position in window): M = num_windows * heads * N. `token` (M,): the (token, head)
    row, token * heads + head, each slot shows (0 for padding slots); `slot` (H*W*heads,): its inverse;
    `qkv` (3, M): the rows of q, k, v in a fused (H*W*3*heads) q/k/v projection; `qkv_slot` (H*W*3*heads,):
    the inverse of `qkv` into the concatenated (3M) slots; `pad_slots` (heads * P,): padding slots, head-major."""

    def __init__(self, h: int, w: int, ws: int, shift: int, heads: int, device):
        hp, wp, n = -(-h // ws) * ws, -(-w // ws) * ws, ws * ws
        # the padded-map row/column that the cyclic shift brings to each row/column
        rows = ((torch.arange(hp, device=device) + shift) % hp).view(hp // ws, 1, ws, 1)
        cols = ((torch.arange(wp, device=device) + shift) % wp).view(1, wp // ws, 1, ws)
        valid = ((rows < h) & (cols < w)).reshape(-1, 1, n).expand(-1, heads, n)  # (num_windows, heads, N)
        head = torch.arange(heads, device=device).view(1, heads, 1)
        token = torch.where(valid, (rows * w + cols).reshape(-1, 1, n), 0)
        self.token = (token * heads + head).flatten()
        slots = torch.arange(self.token.numel(), device=device).view_as(valid)
        self.slot = torch.empty(h * w * heads, dtype=torch.long, device=device)
        self.slot[self.token.view_as(valid)[valid]] = slots[valid]
        t = torch.arange(3, device=device).view(3, 1)
        self.qkv = (token * 3 * heads + head).view(1, -1) + t * heads
        self.qkv_slot = (self.slot.view(-1, 1, heads) + t.view(1, 3, 1) * self.token.numel()).flatten()
        self.pad_slots = slots.transpose(0, 1)[~valid.transpose(0, 1)]
        self.padded, self.heads = hp != h or wp != w, heads


class _TraceContext:
    """Stands in for autograd's ctx under tracing: the ONNX exporter cannot inline custom Functions."""

    def save_for_backward(self, *tensors) -> None:
        pass


def _apply(fn, *args):
    return fn.forward(_TraceContext(), *args) if torch.jit.is_tracing() else fn.apply(*args)


class _WindowQKV(torch.autograd.Function):
    """Fused q/k/v rows (B, H*W*3*heads, d) -> q, k, v window slots, each (B, M, d); padding slots get the bias,
    which is what a zero token gives through the Linear. Backward gathers back (every row is in one slot)."""

    @staticmethod
    def forward(ctx, rows, bias, index: WindowIndex):
        ctx.index, ctx.has_bias = index, bias is not None
        b, d = rows.shape[0], rows.shape[-1]
        out = [rows.index_select(1, i) for i in index.qkv]
        if index.padded:
            fill = rows.new_zeros(3 * index.heads, d) if bias is None else bias.view(-1, d).to(rows.dtype)
            fill = fill.view(3, index.heads, 1, d).expand(-1, -1, index.pad_slots.numel() // index.heads, -1)
            for o, f in zip(out, fill):
                o.index_copy_(1, index.pad_slots, f.reshape(1, -1, d).expand(b, -1, -1))
        return tuple(out)

    @staticmethod
    def backward(ctx, gq, gk, gv):
        index = ctx.index
        grad_rows = torch.cat([gq, gk, gv], 1).index_select(1, index.qkv_slot)
        grad_bias = None
        if ctx.has_bias:  # the padding slots' share; the real rows' share flows through the Linear
            grad_bias = torch.stack([g.index_select(1, index.pad_slots).view(g.shape[0], index.heads, -1, g.shape[-1])
                                     .sum((0, 2)) for g in (gq, gk, gv)]).flatten()
        return grad_rows, grad_bias, None


class _WindowMerge(torch.autograd.Function):
    """Window slots (B, M, d) -> (token, head) rows (B, H*W*heads, d), padding dropped; backward gathers back."""

    @staticmethod
    def forward(ctx, slots, index: WindowIndex):
        ctx.index = index
        return slots.index_select(1, index.slot)

    @staticmethod
    def backward(ctx, grad):
        out = grad.index_select(1, ctx.index.token)
        if ctx.index.padded:
            out.index_fill_(1, ctx.index.pad_slots, 0)
        return out, None


class _Softmax(torch.autograd.Function):
    """Softmax over the last dim with subnormal probabilities set to 0. The shift mask's -100 leaves
    probabilities near e^-100, subnormal in float32, and subnormals make CPU matmuls (attn @ v and the whole
    backward) several times slower. Next to the row's largest probability (>= 1/N) they are far below float
    resolution, so results do not change."""

    @staticmethod
    def forward(ctx, scores):
        attn = scores.softmax(-1)
        if not torch.jit.is_tracing():  # ONNX has no threshold op; exported graphs keep the subnormals
            F.threshold_(attn, torch.finfo(attn.dtype).tiny, 0.0)
        ctx.save_for_backward(attn)
        return attn

    @staticmethod
    def backward(ctx, grad):
        (attn,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, attn, -1, attn.dtype)


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, each pre-norm residual. forward(x (B, H*W, C), H, W) -> (B, H*W, C)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool,
                 eps: float, drop_path: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.dim, self.heads, self.window, self.shift = dim, heads, window, shift
        self.drop_path, self.dropout, self.attn_dropout = drop_path, dropout, attn_dropout
        # transformers' registration order: optimizer states in checkpoints follow the parameter order
        self.attention = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.attention, name, nn.Linear(dim, dim, bias=qkv_bias))
        self.attention.o_proj = nn.Linear(dim, dim)
        table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.attention.relative_position_bias = nn.ParameterDict({"relative_position_bias_table": table})
        self.register_buffer("relative_position_index", relative_position_index(window).view(-1), persistent=False)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self._cache: Dict[tuple, Tuple[WindowIndex, Optional[torch.Tensor]]] = {}

    def _windows(self, h: int, w: int, x: torch.Tensor) -> Tuple[WindowIndex, Optional[torch.Tensor]]:
        """Window index and shift mask (num_windows, 1, N, N) or None, built once per map size.

        Entries built under torch.inference_mode() are inference tensors, which autograd refuses to save (a
        trace for ONNX export runs the gathers with grad on): they are kept apart from the ones built outside
        it, so a process can run inference and then train or export at the same size."""
        key = (h, w, x.device, x.dtype, torch.is_inference_mode_enabled())
        if key not in self._cache:
            ws = self.window
            mask = None
            if self.shift:
                mask = shift_mask(-(-h // ws) * ws, -(-w // ws) * ws, ws, self.shift, x.device, x.dtype)[:, None]
            entry = (WindowIndex(h, w, ws, self.shift, self.heads, x.device), mask)
            if torch.jit.is_tracing():
                return entry
            self._cache = {key: entry}  # one size at a time: training sizes rarely change
        return self._cache[key]

    def _attention(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Normalised x (B, H*W, C) -> attention output (B, H*W, C), before the residual."""
        b, heads, n, d = x.shape[0], self.heads, self.window ** 2, self.dim // self.heads
        index, mask = self._windows(h, w, x)
        a, scale = self.attention, d ** -0.5
        weight = torch.cat([a.q_proj.weight * scale, a.k_proj.weight, a.v_proj.weight])
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias * scale, a.k_proj.bias, a.v_proj.bias])
        q, k, v = _apply(_WindowQKV, F.linear(x, weight, bias).view(b, -1, d), bias, index)
        q, k, v = (t.view(-1, heads, n, d) for t in (q, k, v))
        pos_bias = a.relative_position_bias.relative_position_bias_table[self.relative_position_index]
        pos_bias = pos_bias.view(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            pos_bias = pos_bias + mask
        scores = (q @ k.transpose(-1, -2)).view(b, -1, heads, n, n) + pos_bias
        attn = _apply(_Softmax, scores).view(-1, heads, n, n)
        if self.attn_dropout and self.training:
            attn = F.dropout(attn, self.attn_dropout)
        out = _apply(_WindowMerge, (attn @ v).view(b, -1, d), index)
        return a.o_proj(out.view(b, h * w, self.dim))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        y = self._attention(self.layernorm_before(x), h, w)
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout)
        if self.drop_path and self.training:
            keep = 1.0 - self.drop_path
            y = y.div(keep) * torch.floor(torch.rand((x.shape[0], 1, 1), dtype=y.dtype, device=y.device) + keep)
        x = x + y
        y = self.mlp.fc2(F.gelu(self.mlp.fc1(self.layernorm_after(x))))
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout)
        return x + y


class SwinEmbeddings(nn.Module):
    """Patch embedding: forward(pixels (B, num_channels, H, W)) -> (tokens (B, H'*W', C), (H', W')), the input
    zero-padded on the right/bottom to a multiple of the patch size first."""

    def __init__(self, channels: int, dim: int, patch: Tuple[int, int], dropout: float):
        super().__init__()
        self.patch, self.dropout = patch, dropout
        self.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)})
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        (ph, pw), (h, w) = self.patch, pixel_values.shape[-2:]
        if h % ph or w % pw:
            pixel_values = F.pad(pixel_values, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))
        # channels-last conv output: the (B, H*W, C) tokens are then a view instead of a transposing copy
        x = self.patch_embeddings.projection(pixel_values.contiguous(memory_format=torch.channels_last))
        size = x.shape[-2:]
        x = self.norm(x.permute(0, 2, 3, 1).flatten(1, 2))
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        # Python ints even under tracing: window indices and masks are built from them (exports fix H and W)
        return x, (int(size[0]), int(size[1]))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated, normalised and projected: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # channels in (row, col) offset order (0,0), (1,0), (0,1), (1,1) (transformers' and Swin's): column-major
        x = x.view(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class SwinBackbone(nn.Module):
    """Swin Transformer returning the feature maps of `config.out_features` (a transformers `SwinConfig`).

    forward(pixel_values (B, num_channels, H, W)) -> tuple of (B, C_k, H_k, W_k) with H_k = ceil(H / patch) halved
    (rounding up) k - 1 times for stage k ("stem": the patch embeddings, as stage 1); `channels` lists C_k.
    `use_checkpoint` recomputes each block in backward (training only)."""

    def __init__(self, config):
        super().__init__()
        if config.use_absolute_embeddings or config.hidden_act != "gelu":
            raise ValueError("SwinBackbone supports neither use_absolute_embeddings nor hidden_act other than gelu")
        self.config = config
        dims = [int(config.embed_dim * 2 ** i) for i in range(len(config.depths))]
        self.stage_names: List[str] = list(config.stage_names)
        self.out_features: List[str] = list(config.out_features)
        self.channels: List[int] = [([config.embed_dim] + dims)[self.stage_names.index(f)] for f in self.out_features]
        self.use_checkpoint = False

        patch = config.patch_size if isinstance(config.patch_size, (list, tuple)) else (config.patch_size,) * 2
        embeddings = SwinEmbeddings(config.num_channels, config.embed_dim, tuple(patch), config.hidden_dropout_prob)
        rates = [config.drop_path_rate * i / max(sum(config.depths) - 1, 1) for i in range(sum(config.depths))]
        layers = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, config.depths, config.num_heads)):
            stage, first = nn.Module(), sum(config.depths[:i])
            stage.blocks = nn.ModuleList(
                SwinBlock(dim, heads, config.window_size, 0 if j % 2 == 0 else config.window_size // 2,
                          config.mlp_ratio, config.qkv_bias, config.layer_norm_eps, rates[first + j],
                          config.hidden_dropout_prob, config.attention_probs_dropout_prob)
                for j in range(depth))
            stage.downsample = PatchMerging(dim) if i < len(dims) - 1 else None
            layers.append(stage)
        # `swin.layernorm` (the classifier's final norm) is never applied; it is in transformers' key set
        self.swin = nn.ModuleDict({"embeddings": embeddings, "encoder": nn.ModuleDict({"layers": layers}),
                                   "layernorm": nn.LayerNorm(dims[-1], eps=config.layer_norm_eps)})
        self.hidden_states_norms = nn.ModuleDict(
            {name: nn.LayerNorm(c) for name, c in zip(self.out_features, self.channels)})

    def _feature(self, name: str, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        return self.hidden_states_norms[name](x).view(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x, (h, w) = self.swin.embeddings(pixel_values)
        maps = {}
        if "stem" in self.out_features:
            maps["stem"] = self._feature("stem", x, h, w)
        recompute = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for name, stage in zip(self.stage_names[1:], self.swin.encoder.layers):
            for block in stage.blocks:
                x = checkpoint(block, x, h, w, use_reentrant=False) if recompute else block(x, h, w)
            if name in self.out_features:
                maps[name] = self._feature(name, x, h, w)
            if stage.downsample is not None:
                x = stage.downsample(x, h, w)
                h, w = (h + 1) // 2, (w + 1) // 2
        return tuple(maps[name] for name in self.out_features)

    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors, as transformers writes them (load_backbone_weights reads both)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))
