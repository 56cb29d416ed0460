"""``mixed_kv``: the mixed-precision KV cache as a registered method, and how ``compress`` installs it.

``mmcompress.compress(model, "mixed_kv", high_bits=4, low_bits=2)`` shadows ``model.generate`` on the
instance: every call that would build a default dynamic cache gets a fresh
:class:`~mmcompress.kv.cache.MixedPrecisionCache` instead (a ``MixedPrecisionCache`` passed by the user is
used as is). Three forward pre-hooks feed the cache what ``Cache.update`` never sees:

* on the model: which cache this forward uses (``past_key_values``);
* on the decoder (``model.get_decoder()``): the 2-D attention mask, so left padding is never quantized
  into a real token's scales (:meth:`MixedPrecisionCache.set_attention_mask`);
* on the input embedding, for ``important="text"``: the token ids actually fed to the decoder (after any
  pre-LLM pruning), so text tokens — prompt and generated — get ``high_bits`` and image / video
  placeholders ``low_bits``.

Composes with one pre-LLM method: ``compress(model, [mmc.DivPrune(keep=64), mmc.MixedKV()])``. The
pre-LLM adapter shortens the prompt inside the model's forward; the hooks see the shortened ids and mask.
``restore`` removes the hooks and the ``generate`` shadow: the instance is as before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import CacheMethod, check_choice
from ..registry import register
from .layout import check_layout

__all__ = ["MixedKV", "make_cache", "CachePatch", "IMPORTANT_POLICIES"]

#: how the important (high-bit) set is chosen without attention scores
IMPORTANT_POLICIES: tuple[str, ...] = ("none", "text")
_VISUAL_TOKEN_ATTRS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")


def _text_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _head_dim(text: Any) -> int:
    hd = getattr(text, "head_dim", None)
    return int(hd) if hd else int(text.hidden_size // text.num_attention_heads)


def visual_token_ids(model: Any) -> list[int]:
    """Image / video placeholder ids from a VLM's config (none for a plain LLM)."""
    cfg = getattr(model, "config", model)
    ids = {getattr(cfg, a, None) for a in _VISUAL_TOKEN_ATTRS}
    return sorted(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


@register
@dataclasses.dataclass(frozen=True)
class MixedKV(CacheMethod):
    """Mixed-precision quantized KV cache (ZipVL §3.4 scheme on KIVI's layout; spec §3.4, §4.1).

    Attributes:
        high_bits: bits of important tokens (2, 4 or 8; ZipVL: 4).
        low_bits: bits of the other tokens (2, 4 or 8, <= high_bits; ZipVL: 2).
        residual: most recent tokens kept in full precision (KIVI R; 128 as KIVI's LongBench runs).
        group_size: tokens per key group, one scale/zero per channel per group (KIVI G = 32).
        value_group_size: channels per value group, one scale/zero per token per group; None = 32 when it
            divides the head dimension, else the whole head.
        important: ``"text"`` (default): text tokens — prompt and generated — are important, image / video
            placeholders are not (a plain LLM is then all ``high_bits``); ``"none"``: every token gets
            ``low_bits``. Finer sets (ZipVL's attention-based one) go through
            :meth:`MixedPrecisionCache.set_important`.
    """

    name: ClassVar[str] = "mixed_kv"
    summary: ClassVar[str] = (
        "mixed-precision quantized KV cache: important tokens at high_bits, the rest at low_bits, keys per "
        "channel / values per token (ZipVL arXiv 2410.08584 §3.4, KIVI arXiv 2402.02750)"
    )

    high_bits: int = 4
    low_bits: int = 2
    residual: int = 128
    group_size: int = 32
    value_group_size: int | None = None
    important: str = "text"

    def validate(self) -> None:
        check_layout(self.high_bits, self.low_bits, self.residual, self.group_size, self.value_group_size)
        check_choice(self.important, "important", IMPORTANT_POLICIES)

    def check(self, model: Any) -> None:
        from .layout import resolve_value_group

        text = _text_config(model)
        resolve_value_group(self.value_group_size, _head_dim(text), self.low_bits)
        # the cache constructor checks the layer types (full attention only)
        self.make_cache(model)

    def make_cache(self, model: Any) -> Any:
        """A fresh :class:`~mmcompress.kv.cache.MixedPrecisionCache` for ``model`` (or its config)."""
        from .cache import MixedPrecisionCache

        return MixedPrecisionCache(
            getattr(model, "config", model),
            high_bits=self.high_bits,
            low_bits=self.low_bits,
            residual=self.residual,
            group_size=self.group_size,
            value_group_size=self.value_group_size,
            default_important=self.important == "text",
        )


def make_cache(model: Any, **options: Any) -> Any:
    """``MixedKV(**options).make_cache(model)``: a cache to pass as ``generate(past_key_values=...)``.

    Without :func:`mmcompress.compress` nothing tells the cache about left padding or text tokens: call
    ``cache.set_attention_mask(mask)`` / ``cache.set_important(...)`` yourself for padded batches.
    """
    return MixedKV(**options).make_cache(model)


def _is_static(cache: Any) -> bool:
    from transformers.cache_utils import StaticCache, StaticLayer

    return isinstance(cache, StaticCache) or any(
        isinstance(x, StaticLayer) for x in getattr(cache, "layers", [])
    )


def _shadow(orig: Any, impl: Any) -> Any:
    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return wrapper


class CachePatch:
    """Instance-scoped install of a :class:`~mmcompress.config.CacheMethod` (see the module docstring)."""

    def __init__(self, model: nn.Module, handle: Any, method: MixedKV) -> None:
        self.model = model
        self.handle = handle
        self.method = method
        self.hooks: list[Any] = []
        self._active = None  # the MixedPrecisionCache of the forward in flight
        self._visual = visual_token_ids(model)

    def check(self) -> None:
        if not callable(getattr(self.model, "generate", None)):
            raise TypeError(
                f"{type(self.model).__name__} has no generate(); mixed_kv needs a generative model"
            )
        for name in ("get_decoder", "get_input_embeddings"):
            if not callable(getattr(self.model, name, None)):
                raise TypeError(f"{type(self.model).__name__} has no {name}(); mixed_kv cannot hook it")
        self.method.check(self.model)

    def install(self) -> None:
        self._orig_generate = self.model.generate
        self.model.generate = _shadow(self._orig_generate, self._generate)
        self.hooks.append(self.model.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        self.hooks.append(
            self.model.get_decoder().register_forward_pre_hook(self._decoder_pre, with_kwargs=True)
        )
        if self.method.important == "text":
            self.hooks.append(self.model.get_input_embeddings().register_forward_pre_hook(self._embed_pre))

    def uninstall(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if "generate" in self.model.__dict__:
            del self.model.__dict__["generate"]  # the class method shows through again
        self._active = None

    # -- hooks ------------------------------------------------------------------------------------------
    def _is_ours(self, cache: Any) -> bool:
        from .cache import MixedPrecisionCache

        return isinstance(cache, MixedPrecisionCache)

    def _outer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pkv = kwargs.get("past_key_values")
        self._active = pkv if self.handle.enabled and self._is_ours(pkv) else None

    def _decoder_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pkv = kwargs.get("past_key_values")
        if not (self.handle.enabled and self._is_ours(pkv)):
            return
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            pkv.set_attention_mask(am)

    def _embed_pre(self, module: nn.Module, args: tuple) -> None:
        cache = self._active
        ids = args[0] if args else None
        if cache is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return
        text = ~torch.isin(ids, torch.tensor(self._visual, device=ids.device)) if self._visual else None
        if text is None:
            text = torch.ones_like(ids, dtype=torch.bool)
        cache.set_important(text, start=cache.get_seq_length())

    # -- generate ----------------------------------------------------------------------------------------
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        from ..report import CallReport

        h = self.handle
        gen_cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        use_cache = kwargs.get("use_cache", getattr(gen_cfg, "use_cache", True))
        if not h.enabled or use_cache is False:
            return self._orig_generate(*args, **kwargs)
        impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
        if impl is not None:
            raise ValueError(
                f"mixed_kv needs the dynamic cache it makes itself; got cache_implementation={impl!r} "
                f"(allowed: None). For a static cache / torch.compile run without mixed_kv "
                f"(mmcompress.disabled(model) or a compress() without it)"
            )
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs["past_key_values"] = self.method.make_cache(self.model)
        elif not self._is_ours(cache):
            static = " (a static cache; mixed_kv needs a dynamic one)" if _is_static(cache) else ""
            raise ValueError(
                f"mixed_kv is active on this model: past_key_values must be None (a MixedPrecisionCache is "
                f"made per call) or a MixedPrecisionCache, got a {type(cache).__name__}{static}"
            )
        before = h.last_report
        out = self._orig_generate(*args, **kwargs)
        rep = h.last_report
        if rep is None or rep is before:  # no pre-LLM stage reported this call
            rep = h.last_report = CallReport(method=self.method.to_dict())
        rep.kv_bytes = cache.bytes_held()
        return out
