"""Frozen, validated configs for discrete visual tokenizers, with their own small registry.

Tokenizers are a separate kind from the token-compression methods of :mod:`mmcompress.registry`: they are
not applied to a model by ``compress`` and take no token budget, so they must not appear in
``mmc.available_methods()`` (the CLI, ``compare`` and the README matrix enumerate that list). They follow
the same machinery: a frozen dataclass per tokenizer, validation on construction (``ValueError`` /
``TypeError`` naming the field, the value and what is allowed), and a JSON round trip through
``to_dict`` / ``from_dict`` keyed by ``"tokenizer"`` (methods use ``"method"``).

    cfg = create_tokenizer("seed", codebook_size=1024)
    assert TokenizerConfig.from_json(cfg.to_json()) == cfg
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from typing import Any, ClassVar

from ..config import check_int, config_from_tagged_dict

__all__ = [
    "TokenizerConfig",
    "register_tokenizer",
    "get_tokenizer",
    "tokenizer_names",
    "create_tokenizer",
    "check_float",
    "check_bool",
]

_TOKENIZERS: dict[str, type[TokenizerConfig]] = {}


def check_float(
    value: Any, field: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    """A finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ints are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{field} must be a finite number, got {value!r}")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lb = "(" if lo_open else "["
        raise ValueError(f"{field}={value!r} is out of range {lb}{lo}, {hi}]")
    return float(value)


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be a bool, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Base of every tokenizer config. Subclasses are frozen dataclasses with a class-level ``name``.

    Every field must be JSON-serialisable (ints, floats, bools, strings), so ``from_json(to_json())`` is
    the identity.
    """

    name: ClassVar[str] = ""
    #: short description and paper link
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the bad field. Subclasses extend it."""

    def replace(self, **changes: Any) -> TokenizerConfig:
        return dataclasses.replace(self, **changes)

    def build(self, **kwargs: Any) -> Any:
        """The ``nn.Module`` this config describes (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TokenizerConfig:
        if not isinstance(d, dict) or "tokenizer" not in d:
            raise ValueError(f"tokenizer config dict has no 'tokenizer' key: {d!r}")
        return config_from_tagged_dict(d, "tokenizer", get_tokenizer)

    @staticmethod
    def from_json(s: str) -> TokenizerConfig:
        return TokenizerConfig.from_dict(json.loads(s))


def register_tokenizer(cls: type[TokenizerConfig]) -> type[TokenizerConfig]:
    """Class decorator: make ``cls`` reachable by ``cls.name``."""
    name = cls.name
    if not name:
        raise ValueError(f"{cls.__qualname__} has no tokenizer name")
    if name in _TOKENIZERS and _TOKENIZERS[name] is not cls:
        raise ValueError(f"tokenizer name {name!r} is already registered by {_TOKENIZERS[name].__qualname__}")
    _TOKENIZERS[name] = cls
    return cls


def _ensure_loaded() -> None:
    # importing the package registers the built-in tokenizers (seed, lavit)
    importlib.import_module("mmcompress.tokenizers")


def tokenizer_names() -> list[str]:
    """Registered tokenizer names, sorted."""
    _ensure_loaded()
    return sorted(_TOKENIZERS)


def get_tokenizer(name: str) -> type[TokenizerConfig]:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(sorted(_TOKENIZERS))}")
    return _TOKENIZERS[name]


def create_tokenizer(name: str, **kwargs: Any) -> TokenizerConfig:
    """Build and validate the config of tokenizer ``name``."""
    return get_tokenizer(name)(**kwargs)


def _check_positive_ints(cfg: TokenizerConfig, fields: tuple[str, ...]) -> None:
    for f in fields:
        check_int(getattr(cfg, f), f, lo=1)


def _check_divides(cfg: TokenizerConfig, width_field: str, heads_field: str) -> None:
    width, heads = getattr(cfg, width_field), getattr(cfg, heads_field)
    if width % heads:
        allowed = [d for d in range(1, width + 1) if width % d == 0]
        raise ValueError(f"{heads_field}={heads} does not divide {width_field}={width}; allowed: {allowed}")
