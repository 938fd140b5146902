"""Text prompts with exact character spans per phrase.

A class prompt is `" . ".join(names) + " ."`; each name's span is recorded while the string is built,
never searched for afterwards, so "car" and "race car" in one prompt map to their own tokens.
Grounding captions bring their own spans (ODVG `tokens_positive`); a referring expression (VG) is one
phrase spanning its whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from groundlab.errors import DataError, PromptOverflowError

Span = Tuple[int, int]  # [start, end) character offsets into Prompt.text


@dataclass(frozen=True)
class Prompt:
    """A caption and, per phrase, the character spans that refer to it.

    text:    the caption fed to the tokenizer.
    phrases: phrase strings; targets refer to them by index (`phrase_ids`).
    spans:   spans[k] = tuple of (start, end) spans of phrase k in `text` (a phrase may occur twice).
    """

    text: str
    phrases: Tuple[str, ...]
    spans: Tuple[Tuple[Span, ...], ...]


def class_prompt(names: Sequence[str]) -> Prompt:
    """`"a . b . c ."` with one span per name."""
    parts: List[str] = []
    spans: List[Tuple[Span, ...]] = []
    pos = 0
    for name in names:
        if not name or not name.strip():
            raise DataError("empty class name in prompt")
        spans.append(((pos, pos + len(name)),))
        parts.append(name)
        pos += len(name) + len(" . ")
    return Prompt(" . ".join(parts) + " .", tuple(names), tuple(spans))


def prompt_token_len(names: Sequence[str], name_len: Callable[[str], int]) -> int:
    """Tokens a class prompt of `names` takes: [CLS] + (name tokens + ".") per name + [SEP].

    WordPiece splits on whitespace and punctuation before sub-words, so lengths add up exactly."""
    return 2 + sum(name_len(n) + 1 for n in names)


def split_class_prompts(
    names: Sequence[str], name_len: Callable[[str], int], max_text_len: int
) -> List[List[int]]:
    """Split class indices into consecutive chunks whose prompts fit in `max_text_len` tokens.

    Used by evaluation and inference for class lists longer than one prompt; results are merged back."""
    chunks: List[List[int]] = []
    current: List[int] = []
    used = 2
    for idx, name in enumerate(names):
        need = name_len(name) + 1
        if 2 + need > max_text_len:
            raise PromptOverflowError(
                f"class name {name!r} alone needs {2 + need} tokens, more than model.max_text_len={max_text_len}"
            )
        if used + need > max_text_len:
            chunks.append(current)
            current, used = [], 2
        current.append(idx)
        used += need
    if current:
        chunks.append(current)
    return chunks


@dataclass(frozen=True)
class ChunkedPrompts:
    """A class list as one or more prompts that each fit max_text_len (evaluation and inference).

    prompts[k] holds the names of classes class_ids[k]; a model's output for prompt k, phrase j, is class
    class_ids[k][j], so per-chunk results merge back into one result over all classes."""

    prompts: Tuple[Prompt, ...]
    class_ids: Tuple[Tuple[int, ...], ...]

    def to_class_ids(self, chunk: int, phrase_ids: Sequence[int]) -> List[int]:
        """Global class indices of phrases `phrase_ids` of prompt `chunk`."""
        ids = self.class_ids[chunk]
        return [ids[int(j)] for j in phrase_ids]


def chunk_class_prompts(names: Sequence[str], name_len: Callable[[str], int], max_text_len: int) -> ChunkedPrompts:
    """All class names as prompts of at most max_text_len tokens (one prompt when they fit)."""
    chunks = split_class_prompts(names, name_len, max_text_len)
    return ChunkedPrompts(tuple(class_prompt([names[i] for i in c]) for c in chunks),
                          tuple(tuple(c) for c in chunks))


def sample_detection_prompt(
    positive_ids: Sequence[int],
    names: Sequence[str],
    max_labels: int,
    rng: np.random.Generator,
    name_len: Callable[[str], int],
    max_text_len: int,
    where: Optional[str] = None,
) -> Tuple[Prompt, List[int]]:
    """Training prompt: every positive class plus random negatives up to `max_labels`, shuffled.

    Negatives are dropped, last first, until the prompt fits `max_text_len` tokens.
    Returns (prompt, class_ids) with class_ids[k] the class index of prompt phrase k.
    Raises PromptOverflowError naming `where` when the positives alone do not fit."""
    positives = sorted(set(int(i) for i in positive_ids))
    need = prompt_token_len([names[i] for i in positives], name_len)
    if need > max_text_len:
        raise PromptOverflowError(
            f"the {len(positives)} positive class names need {need} tokens, more than "
            f"model.max_text_len={max_text_len}; raise model.max_text_len or split the image's labels",
            where,
        )
    pos_set = set(positives)
    negatives = [i for i in range(len(names)) if i not in pos_set]
    n_neg = max(0, min(len(negatives), max_labels - len(positives)))
    chosen_neg = [negatives[i] for i in rng.permutation(len(negatives))[:n_neg]] if n_neg else []
    budget = max_text_len - need
    kept_neg = []
    for i in chosen_neg:
        cost = name_len(names[i]) + 1
        if cost <= budget:
            kept_neg.append(i)
            budget -= cost
    class_ids = positives + kept_neg
    class_ids = [class_ids[i] for i in rng.permutation(len(class_ids))]
    return class_prompt([names[i] for i in class_ids]), class_ids


def terminated(caption: str) -> str:
    """`caption` ending in a phrase delimiter: " ." appended unless it ends with "." or "?" (IDEA-Research's
    preprocess_caption appends "." too). The sub-sentence attention mask closes a phrase at a delimiter; the final
    [SEP] closes nothing, so without one the last phrase's tokens would attend only to themselves and BERT would
    read an unterminated expression word by word. Spans into the caption stay valid: text is only appended."""
    return caption if caption.rstrip().endswith((".", "?")) else caption + " ."


def grounding_prompt(
    caption: str, phrases: Sequence[str], spans: Sequence[Optional[Sequence[Span]]], where: Optional[str] = None
) -> Prompt:
    """Prompt for a grounding record: given spans are checked; a phrase without spans is located as a
    whole-word occurrence not yet claimed by another phrase (a missing phrase is an error naming `where`). The
    prompt's text is the caption `terminated`."""
    claimed: List[Span] = [tuple(s) for ss in spans if ss for s in ss]
    out: List[Tuple[Span, ...]] = []
    for phrase, given in zip(phrases, spans):
        if given:
            checked = []
            for start, end in given:
                if not 0 <= start < end <= len(caption):
                    raise DataError(f"span [{start}, {end}] of phrase {phrase!r} is outside the caption", where)
                checked.append((int(start), int(end)))
            out.append(tuple(checked))
            continue
        found = None
        for m in re.finditer(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", caption, flags=re.IGNORECASE):
            span = (m.start(), m.end())
            if not any(s < span[1] and span[0] < e for s, e in claimed):
                found = span
                break
        if found is None:
            raise DataError(f"phrase {phrase!r} does not occur in caption {caption!r}", where)
        claimed.append(found)
        out.append((found,))
    return Prompt(terminated(caption), tuple(phrases), tuple(out))


def expression_prompt(expression: str, where: Optional[str] = None) -> Prompt:
    """A referring expression (VG) as one phrase spanning the whole text: the model segments what the expression
    as a whole refers to, so no word of it is singled out (an empty expression is a DataError naming `where`)."""
    if not expression.strip():
        raise DataError("a referring expression has no words", where)
    return grounding_prompt(expression, [expression], [[(0, len(expression))]], where)
