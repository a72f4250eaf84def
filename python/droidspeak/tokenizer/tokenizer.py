"""Tokenizer loading (transformers, local files only) and prompt encoding."""
from __future__ import annotations

import os

from droidspeak.errors import InvalidRequestError, ModelNotFoundError


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"no usable tokenizer in {path!r}: {exc}") from exc


def eos_token_ids(tokenizer, model_eos_ids: tuple[int, ...]) -> list[int]:
    ids = set(model_eos_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def encode_text(tokenizer, text: str, field: str = "text", add_special_tokens: bool = False) -> list[int]:
    """Token ids of user text; text the tokenizer cannot take (e.g. lone UTF-16
    surrogates from JSON escapes) is a 400, not a crash."""
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except (UnicodeError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{field} cannot be tokenized: {exc}", field) from exc


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters of text one token covers: the longest
    vocabulary entry (byte-level entries spell each byte as one character)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)
