"""Captions: cleaned once and tokenised once, at conversion time, with CLIP's BPE."""
from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

CONTEXT_LENGTH = 77
TOKENIZER_NAME = "openai-clip-bpe-49408"  # open_clip's SimpleTokenizer, bpe_simple_vocab_16e6
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_caption(text: str) -> str:
    """NFC-normalised, control characters dropped, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # imports torch; only converters and evals pay for it

    return SimpleTokenizer()


def tokenize(captions: list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 [n, context_length]: start token, BPE ids, end token (kept when truncating), zeros."""
    if not captions:
        return np.zeros((0, context_length), dtype=np.int32)
    return _tokenizer()(captions, context_length=context_length).numpy().astype(np.int32)  # (n, 77)
