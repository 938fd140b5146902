"""Generic state-dict key machinery: key templates, rename tables, fused q/k/v tensors, checkpoint unwrapping
and mismatch reports.

Pure dict[str, Tensor] -> dict[str, Tensor] helpers shared by the layout conversions (common/swin_keys.py,
gdino/weight_keys.py); nothing here knows a particular model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------------
# Key templates: "a.{i}.b.{rest}" matches "a.3.b.weight"; {rest} is any tail, {kind} is weight|bias, any
# other field a non-negative integer. A pair of templates converts both ways.
# --------------------------------------------------------------------------------------------------------
_FIELD = re.compile(r"\{(\w+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        pattern = {"rest": ".+", "kind": "weight|bias"}.get(name, r"\d+")
        parts.append(f"(?P<{name}>{pattern})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$")


class Renames:
    """Ordered (left, right) template pairs; the first pair whose side matches a key renames it."""

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.pairs = [(a, b, _template_regex(a), _template_regex(b)) for a, b in pairs]

    def left_to_right(self, key: str) -> str | None:
        for _, b, ra, _ in self.pairs:
            m = ra.match(key)
            if m:
                return b.format(**m.groupdict())
        return None

    def right_to_left(self, key: str) -> str | None:
        for a, _, _, rb in self.pairs:
            m = rb.match(key)
            if m:
                return a.format(**m.groupdict())
        return None


class Fused:
    """Separate q/k/v Linear layers (left: `{base}.{proj}.{kind}` for the three proj names) <-> one fused
    (3C, ...) tensor (right), rows in q, k, v order."""

    def __init__(self, specs: Iterable[tuple[str, tuple[str, str, str], str]]):
        # (left base template, proj names, right template with {kind})
        self.specs = []
        for left_base, projs, right in specs:
            lefts = [_template_regex(f"{left_base}.{p}.{{kind}}") for p in projs]
            self.specs.append((left_base, projs, right, lefts, _template_regex(right)))

    def fuse(self, sd: Mapping[str, Tensor]) -> tuple[StateDict, list[str], set[str]]:
        """Returns (fused tensors, keys of incomplete q/k/v groups, every key consumed or reported)."""
        groups: dict[str, list[str | None]] = {}
        for key in sd:
            for _, _, right, lefts, _ in self.specs:
                for idx, regex in enumerate(lefts):
                    m = regex.match(key)
                    if m:
                        groups.setdefault(right.format(**m.groupdict()), [None, None, None])[idx] = key
                        break
                else:
                    continue
                break
        out: StateDict = {}
        incomplete: list[str] = []
        seen: set[str] = set()
        for fused_key, members in groups.items():
            present = [k for k in members if k is not None]
            seen.update(present)
            if len(present) == 3:
                out[fused_key] = torch.cat([sd[k] for k in present], dim=0)
            else:
                incomplete.extend(present)
        return out, incomplete, seen

    def matches_right(self, key: str) -> bool:
        return any(spec[4].match(key) for spec in self.specs)

    def split(self, key: str, value: Tensor) -> StateDict | None:
        """{left key: chunk} for a fused key; {} if it matches but cannot be split in thirds; None if no match."""
        for left_base, projs, _, _, right_re in self.specs:
            m = right_re.match(key)
            if m:
                if value.ndim == 0 or value.shape[0] % 3:
                    return {}
                fields = m.groupdict()
                base = left_base.format(**{k: v for k, v in fields.items() if k != "kind"})
                return {f"{base}.{p}.{fields['kind']}": chunk.clone()
                        for p, chunk in zip(projs, value.chunk(3, dim=0))}
        return None


# --------------------------------------------------------------------------------------------------------
# Checkpoint containers and reporting
# --------------------------------------------------------------------------------------------------------
_NESTING_KEYS = ("model", "state_dict", "model_state_dict")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values()) and not any(
        isinstance(v, Mapping) for v in obj.values())


def unwrap_checkpoint(obj: Any) -> StateDict:
    """The state dict inside a loaded checkpoint: follows {"model": ...} (IDEA), {"state_dict": ...}
    (Lightning) and {"model_state_dict": ...} nesting, then strips leading DDP `module.` prefixes.
    Raises ValueError when no state dict is found."""
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or seen > 8:
            raise ValueError(f"not a checkpoint or state dict: {type(obj).__name__}")
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state dict in checkpoint with keys {sorted(map(str, obj))[:20]} "
                             f"(looked for {list(_NESTING_KEYS)})")
        obj, seen = inner, seen + 1
    out: StateDict = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def _group(key: str) -> str:
    """`transformer.decoder.layers.5.self_attn.in_proj_weight` -> `transformer.decoder.layers.5`; a key with no
    index -> its module path (`feat_map.weight` -> `feat_map`)."""
    parts = key.split(".")
    for idx, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:idx + 1])
    return ".".join(parts[:-1]) or key


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def describe_mismatch(missing: Iterable[str], unexpected: Iterable[str], unused: Iterable[str] = (),
                      max_groups: int = 40) -> str:
    """Human-readable summary of keys that did not match, grouped by prefix, one line per group:
    `missing: transformer.decoder.layers.5.* (18 keys)`, `unexpected: feat_map.weight`. unused: keys a
    conversion could not place. Returns "" when all are empty."""
    lines: list[str] = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("unused", unused)):
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(_group(key), []).append(key)
        ordered = sorted(groups, key=_natural)
        for name in ordered[:max_groups]:
            members = groups[name]
            lines.append(f"{label}: {members[0]}" if len(members) == 1 else f"{label}: {name}.* ({len(members)} keys)")
        if len(ordered) > max_groups:
            more = ordered[max_groups:]
            lines.append(f"{label}: ... and {len(more)} more groups ({sum(len(groups[g]) for g in more)} keys)")
    return "\n".join(lines)


__all__ = [
    "Fused",
    "Renames",
    "StateDict",
    "describe_mismatch",
    "unwrap_checkpoint",
]
