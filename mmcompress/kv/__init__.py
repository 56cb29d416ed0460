"""Mixed-precision quantized KV cache (DESIGN §1 "KV cache" stage; spec §3.4, §4).

* :class:`~mmcompress.kv.cache.MixedPrecisionCache` — a transformers ``Cache`` for ``generate()``;
* :class:`~mmcompress.kv.method.MixedKV` — the registered ``"mixed_kv"`` config for ``compress``;
* :func:`~mmcompress.kv.method.make_cache` — a cache for a model without ``compress``.

The cache module imports transformers, so it is loaded on first use only.
"""

from __future__ import annotations

from typing import Any

from .method import MixedKV, make_cache

__all__ = ["MixedKV", "make_cache", "MixedPrecisionCache", "MixedPrecisionLayer"]


def __getattr__(name: str) -> Any:
    if name in ("MixedPrecisionCache", "MixedPrecisionLayer"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'mmcompress.kv' has no attribute {name!r}")
