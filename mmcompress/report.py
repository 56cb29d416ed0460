"""What the last compressed call did: tokens per image, kept positions, time in the method, KV bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .tokens import Layout

__all__ = ["ImageReport", "CallReport", "cache_bytes"]


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers ``Cache`` (keys + values of every layer, plus any extra tensors a
    quantized layer keeps). Returns 0 for ``None``."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):  # our own caches report exactly what they hold
        return int(cache.nbytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class ImageReport:
    """One image of the last call."""

    tokens_in: int
    tokens_out: int
    kept: list[int]
    layout: Layout

    def to_dict(self) -> dict:
        return {
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "kept": self.kept,
            "layout": self.layout.to_dict(),
        }


@dataclass
class CallReport:
    """The last compressed call on a model (one ``generate()`` or one ``forward()`` with images)."""

    method: dict
    images: list[ImageReport] = field(default_factory=list)
    method_ms: float = 0.0
    prompt_len_in: int = 0
    prompt_len_out: int = 0
    #: bytes held by the KV cache after the latest forward step of this call (prefill or decode)
    kv_bytes: int = 0

    @property
    def tokens_in(self) -> list[int]:
        return [im.tokens_in for im in self.images]

    @property
    def tokens_out(self) -> list[int]:
        return [im.tokens_out for im in self.images]

    @property
    def kept(self) -> list[list[int]]:
        return [im.kept for im in self.images]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "method_ms": self.method_ms,
            "images": [i.to_dict() for i in self.images],
            "prompt_len_in": self.prompt_len_in,
            "prompt_len_out": self.prompt_len_out,
            "kv_bytes": self.kv_bytes,
        }

    def __str__(self) -> str:
        name = self.method.get("method", "?")
        per = ", ".join(f"{a}->{b}" for a, b in zip(self.tokens_in, self.tokens_out))
        return (
            f"{name}: visual tokens per image [{per}], method {self.method_ms:.2f} ms, prompt "
            f"{self.prompt_len_in}->{self.prompt_len_out}, KV {self.kv_bytes} bytes"
        )
