"""Sampling parameters, with SGLang's field names and defaults, validated on entry."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from droidspeak.errors import InvalidRequestError

DEFAULT_MAX_NEW_TOKENS = 128

# SGLang sampling fields droidspeak does not implement (constrained decoding and
# friends). Clients such as the SGLang frontend send them as null: that is accepted;
# a real value is refused rather than silently ignored.
UNSUPPORTED_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex",
                      "logit_bias", "custom_params", "sampling_seed_per_token")


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "SamplingParams":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InvalidRequestError("sampling_params must be an object", "sampling_params")
        raw = dict(raw)
        if "seed" in raw:  # accepted alias
            raw.setdefault("sampling_seed", raw.pop("seed"))
        for name in UNSUPPORTED_FIELDS:
            if raw.get(name) not in (None, {}, []):
                raise InvalidRequestError(f"sampling parameter {name} is not supported by droidspeak", name)
            raw.pop(name, None)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidRequestError(
                f"unknown sampling parameter(s) {unknown}; allowed: {sorted(known)}", unknown[0])
        values = {}
        for name, value in raw.items():
            if value is None and name not in ("stop", "stop_token_ids"):
                continue  # None means "default", as in SGLang
            values[name] = _coerce(name, value)
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        def bad(name, rule):
            raise InvalidRequestError(f"{name} must be {rule}, got {getattr(self, name)!r}", name)
        if self.max_new_tokens < 0:
            bad("max_new_tokens", ">= 0")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", "in [0, max_new_tokens]")
        if self.temperature < 0:
            bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if self.top_k != -1 and self.top_k < 1:
            bad("top_k", "-1 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", "in (0, 2]")
        if self.n < 1:
            bad("n", ">= 1")
        if any(not s for s in self.stop):
            bad("stop", "non-empty strings")


_INT_FIELDS = {"max_new_tokens", "min_new_tokens", "top_k", "n", "sampling_seed"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty"}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}


def _coerce(name: str, value):
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
        return float(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{name} must be true or false, got {value!r}", name)
        return value
    if name == "stop":
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {value!r}", name)
    if name == "stop_token_ids":
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return list(value)
        raise InvalidRequestError(f"stop_token_ids must be a list of integers, got {value!r}", name)
    return value
