"""Frozen, validated method configs with a JSON round trip.

Every method is a frozen dataclass deriving from :class:`MethodConfig`. Construction validates every
field and raises ``ValueError`` / ``TypeError`` naming the field, the value and what is allowed, so a bad
config never reaches a model. ``to_dict`` / ``from_dict`` round-trip through JSON exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

from .tokens import Selection, VisualTokens

__all__ = [
    "MethodConfig",
    "PreLLMMethod",
    "CacheMethod",
    "InLLMMethod",
    "check_keep",
    "resolve_keep",
    "check_choice",
    "check_int",
]


def check_keep(keep: Any, field: str = "keep") -> int | float:
    """Validate a budget: an int >= 1 (tokens per image) or a float in (0, 1] (a fraction)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"{field} must be an int (tokens per image) or a float in (0, 1] (fraction), "
            f"got {keep!r} of type {type(keep).__name__}"
        )
    if isinstance(keep, float):
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(
                f"{field}={keep!r} is not allowed: a float budget must be a fraction in (0, 1]; "
                f"use an int for a token count"
            )
    elif keep < 1:
        raise ValueError(f"{field}={keep!r} is not allowed: an int budget must be >= 1 visual token")
    return keep


def resolve_keep(keep: int | float, n: int, field: str = "keep") -> int:
    """Number of tokens to keep out of ``n``.

    An int is taken as is and must not exceed ``n``; a float is ``round(keep * n)`` with Python's
    round-half-to-even (the rule the official DivPrune code uses), at least 1.
    """
    if isinstance(keep, float):
        return max(1, int(round(keep * n)))
    if keep > n:
        raise ValueError(
            f"{field}={keep} exceeds the {n} visual tokens available for this image; "
            f"allowed: 1..{n} or a fraction in (0, 1]"
        )
    return int(keep)


def check_choice(value: Any, field: str, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {allowed}")
    return value


def check_int(value: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{field}={value} is out of range [{lo}, {hi}]")
    return value


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are frozen dataclasses with a class-level ``name``."""

    name: ClassVar[str] = ""
    #: "pre_llm": select/merge visual tokens before the language model.
    stage: ClassVar[str] = "pre_llm"
    #: the config field that sets the token budget (``compare --keep`` / ``run --keep`` fill it in);
    #: ``None`` for methods without one (KV-cache methods)
    budget_field: ClassVar[str | None] = "keep"
    #: short description and paper link, shown by the CLI and the README support matrix
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the bad field. Subclasses extend it."""

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> MethodConfig:
        from .registry import get

        if "method" not in d:
            raise ValueError(f"config dict has no 'method' key: {d!r}")
        return config_from_tagged_dict(d, "method", get)

    @staticmethod
    def from_json(s: str) -> MethodConfig:
        return MethodConfig.from_dict(json.loads(s))


@dataclasses.dataclass(frozen=True)
class PreLLMMethod(MethodConfig):
    """A method that picks (or merges) visual tokens per image before the LLM.

    Subclasses implement :meth:`select` (one image in, one :class:`Selection` out — each image decides
    for itself, so batch composition never changes a result) and may declare signals in :meth:`needs`.
    """

    stage: ClassVar[str] = "pre_llm"
    #: layouts the method can work on: "single" (one grid) and/or "anyres" (thumbnail + crops)
    layouts: ClassVar[tuple[str, ...]] = ("single", "anyres")

    def needs(self) -> frozenset:
        """Signals (see :mod:`mmcompress.signals`) the adapter must probe for this method."""
        return frozenset()

    def select(self, tokens: VisualTokens) -> Selection:
        raise NotImplementedError(f"{type(self).__name__}.select")


@dataclasses.dataclass(frozen=True)
class CacheMethod(MethodConfig):
    """A method that replaces the decoder's KV cache (stage ``"kv_cache"``, e.g. ``mixed_kv``).

    It touches no adapter: ``compress`` shadows the instance's ``generate`` so each call gets a fresh
    cache from :meth:`make_cache`, so it works on any transformers decoder LLM or VLM and composes with
    one pre-LLM method (``compress(model, [DivPrune(keep=64), MixedKV()])``).
    """

    stage: ClassVar[str] = "kv_cache"
    budget_field: ClassVar[str | None] = None

    def check(self, model: Any) -> None:
        """Raise before anything is patched if this cache cannot serve ``model``."""

    def make_cache(self, model: Any) -> Any:
        """A fresh ``transformers.Cache`` for one ``generate()`` call on ``model``."""
        raise NotImplementedError(f"{type(self).__name__}.make_cache")


@dataclasses.dataclass(frozen=True)
class InLLMMethod(MethodConfig):
    """A method acting inside the LLM's decoder layers (stage ``"in_llm"``: AIM pruning, ZipVL).

    It needs no pre-LLM adapter: ``compress`` installs the object :meth:`make_patch` returns (hooks on the
    decoder and a wrapped attention function), composable with one pre-LLM method. :meth:`cache_method`
    names a KV-cache method the method brings along (ZipVL's mixed-precision cache), or None.
    """

    stage: ClassVar[str] = "in_llm"
    budget_field: ClassVar[str | None] = None

    def make_patch(self, model: Any, handle: Any) -> Any:
        """An object with ``check()`` / ``install()`` / ``uninstall()`` hooking ``model``."""
        raise NotImplementedError(f"{type(self).__name__}.make_patch")

    def cache_method(self) -> CacheMethod | None:
        """The KV-cache method this method needs installed alongside it (None: the model's own cache)."""
        return None


def config_from_tagged_dict(d: dict[str, Any], tag: str, lookup: Any) -> Any:
    """``{tag: name, **fields}`` -> ``lookup(name)(**fields)``; unknown fields raise naming them and the
    allowed ones. Shared by method configs (``"method"``) and tokenizer configs (``"tokenizer"``)."""
    d = dict(d)
    cls = lookup(d.pop(tag))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)} for {tag} {cls.name!r}; allowed: {sorted(known)}"
        )
    return cls(**d)
