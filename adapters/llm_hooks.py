"""Hooks inside a transformers 5.x decoder LLM for the in-LLM methods: AIM pruning and ZipVL.

Where (reference ``transformers-5-hook-points.md`` §5): the decoder is ``model.get_decoder()``
(``LlamaModel`` of a LLaVA / LLaVA-NeXT model or of a plain ``LlamaForCausalLM``; ``Qwen2VLTextModel``
of Qwen2-VL / Qwen2.5-VL, whose M-RoPE ``cos`` / ``sin`` are gathered like any other). Three kinds of
hooks, all instance-scoped and removed by ``uninstall``:

* **a wrapped attention function** (§5.4): the decoder's config gets ``_attn_implementation =
  "mmcompress_<orig>"``, registered in both ``AttentionInterface`` (our entry) and
  ``AttentionMaskInterface`` (the original's mask builder, so masks are built exactly as before). The
  entry calls the method's callback only for the attention modules of a patched instance (a weak
  module → callback map); everything else goes straight to the original ``sdpa`` / ``eager`` function.
  The callbacks compute only the rows they need for scoring outside that function (AIM: all rows, at
  the few layers that rank; ZipVL: ~10% probe rows) and otherwise call it, on gathered tensors.
* **forward pre-hooks** on the decoder (phase, masks, the visual positions of this forward), on the input
  embedding (the token ids actually fed — after any pre-LLM pruning) and on every decoder layer.
* a **``generate`` shadow** on the instance: selections made at the first forward of a ``generate()``
  call are reused by its later no-cache steps (``use_cache=False`` recomputes the prefix each step), so
  the cache and no-cache paths see the same decisions; generated tokens are never pruned.

AIM (§5.5, generalised to several cuts): the pre-hook of layer ``l + 1`` applies the cut decided from
layer ``l``'s PageRank: it gathers the hidden states to the surviving tokens (re-left-padding rows that
keep different counts) and hands the layer the 4-D mask, ``position_embeddings`` and ``position_ids``
gathered to them — original RoPE positions. Layers after the cut therefore cache only the survivors
(``DynamicLayer`` lengths differ per layer); at decode the full-length mask is column-gathered per layer.
The decoder's output is scattered back to the input length (zeros at pruned positions) so logits keep
their shape. With a :class:`~mmcompress.kv.cache.MixedPrecisionCache` the per-layer padding and text
masks are translated too.

ZipVL: nothing leaves the sequence; the attention of layers ``>= dense_layers`` runs on the important
tokens only (gathered queries / keys / values, scattered back), and the important sets go to the
mixed-precision cache (``set_important`` per layer), re-split during decode.

Limits: ``sdpa`` and ``eager`` attention; full-attention layers only; a dynamic cache (a static cache
cannot hold per-layer lengths); ``output_attentions`` / ``output_hidden_states`` report the shortened
per-layer tensors.
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._sequence import shrink_batch

__all__ = ["AIMPatch", "ZipVLPatch", "SUPPORTED_ATTENTION", "find_decoder"]

#: attention implementations the wrapped entry supports
SUPPORTED_ATTENTION: tuple[str, ...] = ("sdpa", "eager")

_WRAPPED: dict[str, str] = {}  # our implementation name -> the original's
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> callback


def _original_attention(module: nn.Module, orig: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(orig, eager)


def _make_entry(orig: str):
    def entry(module, query, key, value, attention_mask, **kwargs):
        fn = _original_attention(module, orig)
        hook = _ACTIVE.get(module)
        if hook is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        return hook(fn, module, query, key, value, attention_mask, **kwargs)

    return entry


def _register(orig: str) -> str:
    """Register (once) ``mmcompress_<orig>`` in both interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"mmcompress_{orig}"
    if name not in _WRAPPED:
        AttentionInterface.register(name, _make_entry(orig))
        # without a mask entry create_causal_mask returns None and padding is lost (reference §5.2)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
        _WRAPPED[name] = orig
    return name


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``.layers`` of modules with ``self_attn.layer_idx``) of a LLM or VLM."""
    dec = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(dec, "layers", None)
    if dec is None or not isinstance(layers, nn.ModuleList) or not len(layers):
        raise TypeError(
            f"{type(model).__name__}: no decoder with .layers found (model.get_decoder()); in-LLM methods "
            f"support transformers decoder LLMs (Llama, ...) and VLMs built on them (LLaVA, LLaVA-NeXT)"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) != i:
            raise TypeError(
                f"{type(model).__name__}: decoder layer {i} has no self_attn with layer_idx={i}; "
                f"in-LLM methods need the transformers 5 attention interface"
            )
    return dec


def _shadow(orig: Any, impl: Any) -> Any:
    """A plain function calling ``impl`` with ``orig``'s name, docstring and signature (generate
    inspects signatures)."""

    @functools.wraps(orig)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return wrapper


def _is_static(cache: Any) -> bool:
    from transformers.cache_utils import StaticCache, StaticLayer

    return isinstance(cache, StaticCache) or any(
        isinstance(x, StaticLayer) for x in getattr(cache, "layers", [])
    )


def _is_mixed(cache: Any) -> bool:
    from mmcompress.kv.cache import MixedPrecisionCache

    return isinstance(cache, MixedPrecisionCache)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along ``dim`` with per-row ``idx [B, m]`` (``x``'s batch dim may be 1)."""
    b, m = idx.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, m
    sizes = list(x.shape)
    sizes[dim] = m
    return torch.gather(x, dim, idx.view(shape).expand(sizes))


def _blocked(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Restrict a 4-D attention mask (bool: True = attend; float: additive) to ``allowed`` (bool)."""
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def _as_mask(
    allowed: torch.Tensor, like: torch.Tensor | None, eager: bool, dtype: torch.dtype
) -> torch.Tensor:
    """A bool ``allowed`` 4-D pattern in the format the wrapped attention takes (float additive for eager)."""
    if (like is not None and like.dtype != torch.bool) or eager:
        dt = like.dtype if like is not None and like.dtype != torch.bool else dtype
        return torch.zeros(allowed.shape, dtype=dt, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dt).min
        )
    return allowed


@dataclass
class _Forward:
    """What the decoder pre-hook learned about the forward in flight."""

    prefill: bool
    q: int  # tokens fed this forward
    past: int  # layer-0 cache length before it
    extend: int  # no-cache step: tokens beyond the recorded prefill (reused decisions)
    am2d: torch.Tensor | None  # the 2-D attention mask the decoder got
    cache: Any
    cached: dict = field(default_factory=dict)  # per-forward gathered tensors


class _DecoderPatch:
    """Shared install / phase tracking for the in-LLM methods (module docstring)."""

    needs_visual = False

    def __init__(self, model: nn.Module, handle: Any, method: Any) -> None:
        self.model = model
        self.handle = handle
        self.method = method
        self.hooks: list[Any] = []
        self.cur: _Forward | None = None
        self.state: Any = None
        self.stats: dict = {}
        self._ids: torch.Tensor | None = None
        self._gen = False
        self._installed = False

    # -- checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        from mmcompress.kv.method import visual_token_ids

        self.decoder = find_decoder(self.model)
        self.layers = list(self.decoder.layers)
        self.configs = list(
            {id(c): c for c in (self.decoder.config, self.layers[0].self_attn.config)}.values()
        )
        impl = self.decoder.config._attn_implementation
        self.orig_impl = _WRAPPED.get(impl, impl)
        if self.orig_impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"method {self.method.name!r} runs inside the LLM's attention and supports "
                f"attn_implementation in {SUPPORTED_ATTENTION}; this model's decoder uses {impl!r}"
            )
        types = getattr(self.decoder.config, "layer_types", None) or ["full_attention"]
        bad = sorted(set(types) - {"full_attention"})
        if bad:
            raise ValueError(
                f"method {self.method.name!r} supports full-attention decoder layers only; "
                f"this model has {bad}"
            )
        if not callable(getattr(self.model, "generate", None)):
            raise TypeError(f"{type(self.model).__name__} has no generate()")
        self.visual_ids = visual_token_ids(self.model)
        if self.needs_visual and not self.visual_ids:
            raise ValueError(
                f"method {self.method.name!r} prunes visual tokens; {type(self.model).__name__} has no "
                f"image / video token id in its config (a plain LLM has nothing to prune)"
            )
        self.check_method()

    def check_method(self) -> None:
        """Method-specific checks against the model (subclasses)."""

    # -- install / uninstall ------------------------------------------------------------------------
    def install(self) -> None:
        name = _register(self.orig_impl)
        self._prev_impl = [c._attn_implementation_internal for c in self.configs]
        for c in self.configs:
            c._attn_implementation_internal = name
        self._installed = True
        for layer in self.layers:
            _ACTIVE[layer.self_attn] = self._attention
        self.hooks.append(self.decoder.register_forward_pre_hook(self._decoder_pre, with_kwargs=True))
        self.hooks.append(self.decoder.register_forward_hook(self._decoder_post, with_kwargs=True))
        emb = self.model.get_input_embeddings()
        self.hooks.append(emb.register_forward_pre_hook(self._embed_pre))
        for i, layer in enumerate(self.layers):
            self.hooks.append(
                layer.register_forward_pre_hook(functools.partial(self._layer_pre, i), with_kwargs=True)
            )
        self._orig_generate = self.model.generate
        self.model.generate = _shadow(self._orig_generate, self._generate)

    def uninstall(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for layer in getattr(self, "layers", []):
            _ACTIVE.pop(layer.self_attn, None)
        if self._installed:
            for c, prev in zip(self.configs, self._prev_impl):
                c._attn_implementation_internal = prev
            self._installed = False
        if "generate" in self.model.__dict__:
            del self.model.__dict__["generate"]  # the class method shows through again
        self.cur = self.state = None
        self._ids = None

    # -- generate ----------------------------------------------------------------------------------
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if not self.handle.enabled:
            return self._orig_generate(*args, **kwargs)
        gen_cfg = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
        if impl not in (None, "dynamic"):
            raise ValueError(
                f"method {self.method.name!r} needs a dynamic KV cache (layers hold different token sets); "
                f"got cache_implementation={impl!r} (allowed: None or 'dynamic')"
            )
        self._check_cache(kwargs.get("past_key_values"))
        self._gen, self.state = True, None
        try:
            return self._orig_generate(*args, **kwargs)
        finally:
            self._gen = False

    def _check_cache(self, cache: Any) -> None:
        if cache is not None and _is_static(cache):
            raise ValueError(
                f"method {self.method.name!r} needs a dynamic KV cache (layers hold different token sets); "
                f"got a {type(cache).__name__} (static caches have one length for every layer)"
            )

    # -- hooks ---------------------------------------------------------------------------------------
    def _embed_pre(self, module: nn.Module, args: tuple) -> None:
        ids = args[0] if args else None
        self._ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    def _decoder_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids_from_embed, self._ids = self._ids, None
        if not self.handle.enabled:
            self.cur = None
            return
        pkv = kwargs.get("past_key_values")
        self._check_cache(pkv)
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if ids is None else ids
        if ids is None and ids_from_embed is not None and ids_from_embed.shape[:2] == x.shape[:2]:
            ids = ids_from_embed
        am = kwargs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() != 2:
            raise ValueError(
                f"method {self.method.name!r} needs a 2-D attention_mask (or None), "
                f"got shape {tuple(am.shape)}"
            )
        b, q = x.shape[:2]
        past = pkv.get_seq_length() if pkv is not None else 0
        if past == 0:
            st = self.state
            reuse = self._gen and pkv is None and st is not None and q > st.L0 and st.batch == b
            if not reuse:
                self.state = self.new_state(ids, am, b, q, x.device)
            extend = q - self.state.L0 if reuse else 0
            self.cur = _Forward(True, q, 0, extend, am, pkv)
        elif self.state is None or self.state.batch != b:
            self.cur = None  # a continuation of a sequence whose prefill we did not see
        else:
            self.cur = _Forward(False, q, past, 0, am, pkv)

    def _visual_mask(self, ids: torch.Tensor | None, b: int, q: int, device) -> torch.Tensor:
        if ids is None:
            if self.needs_visual:
                raise ValueError(
                    f"method {self.method.name!r} needs the token ids at prefill to find the visual tokens "
                    f"(got inputs_embeds only)"
                )
            return torch.zeros(b, q, dtype=torch.bool, device=device)
        if not self.visual_ids:
            return torch.zeros_like(ids, dtype=torch.bool)
        return torch.isin(ids, torch.tensor(self.visual_ids, device=ids.device))

    # subclass API
    def new_state(self, ids, am, b: int, q: int, device) -> Any:
        raise NotImplementedError

    def _layer_pre(self, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        return None

    def _decoder_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return None

    def _attention(self, fn, module, query, key, value, attention_mask, **kwargs):
        return fn(module, query, key, value, attention_mask, **kwargs)


# ================================================================================================
# AIM
# ================================================================================================


@dataclass
class _View:
    """The token set entering a layer: slot ``i`` of row ``b`` holds original position ``src[b, i]``
    (``ok`` false: padding slot); ``rel`` = its slot in the parent view (for gathering hidden states)."""

    src: torch.Tensor  # [B, n] long
    ok: torch.Tensor  # [B, n] bool
    vis: torch.Tensor  # [B, n] bool, visual and ok
    rel: torch.Tensor | None  # [B, n] long into the parent's slots
    parent: _View | None = None

    @property
    def n(self) -> int:
        return self.src.shape[1]


@dataclass
class _AIMState:
    L0: int
    batch: int
    n_vis: list[int]
    n_prot: list[int]
    views: list  # views[l]: the view entering layer l (None until decided)
    scores: dict = field(default_factory=dict)


class AIMPatch(_DecoderPatch):
    """AIM progressive pruning with real token dropping (see :mod:`mmcompress.methods.aim_prune`)."""

    needs_visual = True

    def check_method(self) -> None:
        self.rates = self.method.rates(len(self.layers))

    def new_state(self, ids, am, b, q, device) -> _AIMState:
        valid = torch.ones(b, q, dtype=torch.bool, device=device) if am is None else am.bool()
        vis = self._visual_mask(ids, b, q, device) & valid
        src = torch.arange(q, device=device)[None].expand(b, q)
        root = _View(src=src, ok=valid, vis=vis, rel=None)
        views = [None] * len(self.layers)
        views[0] = root
        n_vis = vis.sum(1).tolist()
        n_prot = (valid & ~vis).sum(1).tolist()
        # per layer entering it: longest row, visual tokens per row, their original positions per row
        self.stats = {"layer_tokens": [], "layer_visual": [], "layer_kept": []}
        return _AIMState(L0=q, batch=b, n_vis=n_vis, n_prot=n_prot, views=views)

    # -- decisions ---------------------------------------------------------------------------------
    def _targets(self, layer: int) -> tuple[list[int], bool, bool]:
        """After ``layer``: per-row keep counts, whether anything changes, whether scores are needed."""
        st = self.state
        view = st.views[layer]
        alive = view.vis.sum(1).tolist()
        keep, change, score = [], False, False
        from mmcompress.methods.aim_prune import aim_keep_num

        for nv, npr, a in zip(st.n_vis, st.n_prot, alive):
            k = aim_keep_num(nv + npr, npr, self.rates[layer])
            keep.append(k)
            tv = k - npr
            change |= tv < a
            score |= 0 < tv < a
        return keep, change, score

    def _decide(self, layer: int) -> _View:
        """The view entering ``layer + 1``, from ``layer``'s view and PageRank."""
        from mmcompress.methods.aim_prune import aim_select

        st = self.state
        parent = st.views[layer]
        keep, change, _ = self._targets(layer)
        if not change:
            return parent
        scores = st.scores.pop(layer, None)
        if scores is None:  # no row keeps a strict subset of its live visual tokens: ranks do not matter
            scores = torch.zeros(parent.src.shape, dtype=torch.float32, device=parent.src.device)
        kept = aim_select(
            scores, parent.ok, parent.ok & ~parent.vis, torch.tensor(keep, device=scores.device)
        )
        shr = shrink_batch(kept, parent.ok)
        rel = shr.gather
        return _View(
            src=parent.src.gather(1, rel),
            ok=shr.valid,
            vis=parent.vis.gather(1, rel) & shr.valid,
            rel=rel,
            parent=parent,
        )

    def _extended(self, view: _View) -> _View:
        """``view`` plus the no-cache step's extra tokens (kept at every layer)."""
        cur = self.cur
        if not cur.extend:
            return view
        key = ("ext", id(view))
        if key not in cur.cached:
            L0, e = self.state.L0, cur.extend
            b = view.src.shape[0]
            dev = view.src.device
            new = torch.arange(L0, L0 + e, device=dev)[None].expand(b, e)
            rel = None
            if view.parent is not None:
                tail = torch.arange(view.parent.n, view.parent.n + e, device=dev)[None].expand(b, e)
                rel = torch.cat([view.rel, tail], 1)
            ones = torch.ones(b, e, dtype=torch.bool, device=dev)
            cur.cached[key] = _View(
                src=torch.cat([view.src, new], 1),
                ok=torch.cat([view.ok, ones], 1),
                vis=torch.cat([view.vis, ~ones], 1),
                rel=rel,
                parent=view.parent,
            )
        return cur.cached[key]

    # -- hooks ---------------------------------------------------------------------------------------
    def _layer_pre(self, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        cur, st = self.cur, self.state
        if cur is None:
            return None
        if idx > 0 and st.views[idx] is None:
            st.views[idx] = self._decide(idx - 1)
        view = st.views[idx]
        if cur.prefill and not cur.extend:
            self.stats["layer_tokens"].append(int(view.ok.sum(1).max()))
            self.stats["layer_visual"].append(view.vis.sum(1).tolist())
            self.stats["layer_kept"].append([r[v].tolist() for r, v in zip(view.src, view.vis)])
        if view.parent is None:  # the root: nothing pruned yet
            return None
        if cur.prefill:
            return self._prefill_inputs(idx, view, args, kwargs)
        return self._decode_inputs(idx, view, args, kwargs)

    def _prefill_inputs(self, idx: int, view: _View, args: tuple, kwargs: dict):
        cur = self.cur
        ext = self._extended(view)
        hs = args[0] if args else kwargs["hidden_states"]
        if view is not self.state.views[idx - 1]:  # the cut happened after the previous layer
            hs = _gather_tokens(hs, ext.rel, 1)
        key = ("inputs", id(view))
        if key not in cur.cached:
            cur.cached[key] = self._gathered_inputs(ext, kwargs)
        kwargs.update(cur.cached[key])
        cache = cur.cache
        if cache is not None and _is_mixed(cache):
            self._mixed_prefill(cache, idx, ext)
        if args:
            return (hs, *args[1:]), kwargs
        kwargs["hidden_states"] = hs
        return args, kwargs

    def _gathered_inputs(self, view: _View, kwargs: dict) -> dict:
        src, ok = view.src, view.ok
        b, n = src.shape
        out: dict = {}
        mask = kwargs.get("attention_mask")
        if mask is None:
            if not bool(ok.all()):  # rows keep different counts: a padding-aware causal mask
                causal = torch.ones(n, n, dtype=torch.bool, device=src.device).tril()
                allowed = causal[None, None] & ok[:, None, None, :]
                out["attention_mask"] = _as_mask(allowed, None, self.orig_impl == "eager", torch.float32)
        else:
            m = mask.expand(b, *mask.shape[1:])
            rows = _gather_tokens(m, src, 2)
            out["attention_mask"] = _blocked(_gather_tokens(rows, src, 3), ok[:, None, None, :])
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(_gather_tokens(t, src, t.dim() - 2) for t in pe)
        pid = kwargs.get("position_ids")
        if pid is not None:
            out["position_ids"] = _gather_tokens(pid, src, pid.dim() - 1)
        return out

    def _decode_inputs(self, idx: int, view: _View, args: tuple, kwargs: dict):
        cur, L0 = self.cur, self.state.L0
        t = cur.past - L0  # generated tokens already in every layer's cache
        q = cur.q
        key = ("mask", id(view))
        if key not in cur.cached:
            mask = kwargs.get("attention_mask")
            b, n = view.src.shape
            dev = view.src.device
            if mask is None:
                if bool(view.ok.all()):
                    new = None
                else:
                    suffix = torch.ones(q, t + q, dtype=torch.bool, device=dev).tril(t)
                    allowed = torch.cat(
                        [
                            view.ok[:, None, None, :].expand(b, 1, q, n),
                            suffix[None, None].expand(b, 1, q, t + q),
                        ],
                        -1,
                    )
                    new = _as_mask(allowed, None, self.orig_impl == "eager", torch.float32)
            else:
                cols = torch.cat(
                    [view.src, torch.arange(L0, L0 + t + q, device=dev)[None].expand(b, t + q)], 1
                )
                m = mask.expand(b, *mask.shape[1:])
                ok = torch.cat([view.ok, torch.ones(b, t + q, dtype=torch.bool, device=dev)], 1)
                new = _blocked(_gather_tokens(m, cols, 3), ok[:, None, None, :])
            cur.cached[key] = new
        kwargs["attention_mask"] = cur.cached[key]
        cache = cur.cache
        if cache is not None and _is_mixed(cache) and cur.am2d is not None:
            valid = torch.cat([view.ok, cur.am2d[:, L0:].bool()], 1)
            cache.set_attention_mask(valid, layers=idx)
        return args, kwargs

    def _mixed_prefill(self, cache: Any, idx: int, view: _View) -> None:
        """Per-layer padding (and, for ``important="text"``, text) masks of a MixedPrecisionCache."""
        cache.set_attention_mask(view.ok, layers=idx)
        kv = getattr(self.handle, "kv", None)
        if getattr(kv, "important", None) == "text":
            b, n = view.src.shape
            # positions [n, L0) will hold generated (text) tokens of this layer
            rest = torch.ones(b, self.state.L0 - n, dtype=torch.bool, device=view.src.device)
            cache.set_important(torch.cat([~view.vis, rest], 1), start=0, layers=idx)

    def _attention(self, fn, module, query, key, value, attention_mask, **kwargs):
        cur, st = self.cur, self.state
        idx = module.layer_idx
        if cur is not None and cur.prefill and not cur.extend and idx < len(self.layers) - 1:
            _, _, need = self._targets(idx)
            if need:
                st.scores[idx] = self._importance(query, key, st.views[idx].ok, kwargs.get("scaling"))
        return fn(module, query, key, value, attention_mask, **kwargs)

    def _importance(self, query, key, ok, scaling) -> torch.Tensor:
        """PageRank importance of this layer's tokens, ``[B, n]`` (all rows, chunked over heads)."""
        from mmcompress.methods.aim_prune import attention_logits, pagerank_pi

        m = self.method
        h = query.shape[1]
        groups = h // key.shape[1]
        chunk = h if m.head_chunk is None else max(groups, m.head_chunk - m.head_chunk % groups)
        pis = []
        with torch.no_grad():
            for h0 in range(0, h, chunk):
                h1 = min(h, h0 + chunk)
                logits = attention_logits(
                    query[:, h0:h1], key[:, h0 // groups : h1 // groups], ok, scaling=scaling
                )
                pis.append(pagerank_pi(logits, tau=m.tau, iters=m.iters, damping=m.damping, voters=ok))
        return torch.cat(pis, dim=1).pow(2).mean(dim=1).sqrt()  # RMS over heads, [B, n]

    def _decoder_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cur, st = self.cur, self.state
        if cur is None or not cur.prefill:
            return None
        view = self._extended(st.views[-1])
        if view.parent is None:
            return None
        hs = output.last_hidden_state  # [B, n_last, D] -> [B, q, D], zeros at pruned positions
        full = hs.new_zeros(hs.shape[0], cur.q, hs.shape[2])
        rows = torch.arange(hs.shape[0], device=hs.device)[:, None].expand_as(view.src)
        full[rows[view.ok], view.src[view.ok]] = hs[view.ok]
        output.last_hidden_state = full
        return output


# ================================================================================================
# ZipVL
# ================================================================================================


@dataclass
class _ZipState:
    L0: int
    batch: int
    valid: torch.Tensor  # [B, L0]
    vis: torch.Tensor  # [B, L0]
    probe_idx: torch.Tensor
    probe_ok: torch.Tensor
    important: dict = field(default_factory=dict)  # layer -> [B, L0] bool
    split_from: dict = field(default_factory=dict)  # layer -> first position not yet re-split


class ZipVLPatch(_DecoderPatch):
    """ZipVL sparse prefill + mixed-precision cache feeding (see :mod:`mmcompress.methods.zipvl`)."""

    def check_method(self) -> None:
        n = len(self.layers)
        if self.method.dense_layers > n:
            raise ValueError(
                f"dense_layers={self.method.dense_layers} exceeds the LLM's {n} layers; allowed: 0..{n}"
            )

    def new_state(self, ids, am, b, q, device) -> _ZipState:
        from mmcompress.methods.zipvl import probe_positions

        valid = torch.ones(b, q, dtype=torch.bool, device=device) if am is None else am.bool()
        vis = self._visual_mask(ids, b, q, device) & valid
        idx, ok = probe_positions(valid, self.method.probe_recent, self.method.probe_spread)
        self.stats = {"important": [], "tokens": valid.sum(1).tolist()}
        return _ZipState(L0=q, batch=b, valid=valid, vis=vis, probe_idx=idx, probe_ok=ok)

    def _attention(self, fn, module, query, key, value, attention_mask, **kwargs):
        cur, st = self.cur, self.state
        if cur is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        idx = module.layer_idx
        if not cur.prefill:
            out = fn(module, query, key, value, attention_mask, **kwargs)
            if cur.cache is not None and _is_mixed(cur.cache):
                self._maybe_resplit(idx, query, key, kwargs.get("scaling"))
            return out
        if not cur.extend:
            from mmcompress.methods.zipvl import probe_scores, zipvl_select

            with torch.no_grad():
                a, c = probe_scores(
                    query, key, st.probe_idx, st.probe_ok, st.valid, scaling=kwargs.get("scaling")
                )
                force = (st.valid & ~st.vis) if self.method.keep_text else None
                imp = zipvl_select(a, c, st.valid, self.method.tau, force=force)
            st.important[idx] = imp
            st.split_from[idx] = st.L0
            self.stats["important"].append(imp.sum(1).tolist())
            if cur.cache is not None and _is_mixed(cur.cache):
                cur.cache.set_important(imp, start=0, layers=idx)
        imp = st.important[idx]
        if idx < self.method.dense_layers or bool((imp == st.valid).all()):
            return fn(module, query, key, value, attention_mask, **kwargs)
        return self._sparse(fn, module, query, key, value, imp, kwargs)

    def _sparse(self, fn, module, query, key, value, imp, kwargs):
        """Attention on the important tokens (Algorithm 1): keys / values gathered to ``T``; queries ``T``
        (``rest="zero"``: other rows get no attention update) or every row (``"important"``)."""
        st, cur = self.state, self.cur
        b, h, n, d = query.shape
        eager = self.orig_impl == "eager"
        if not cur.extend:
            shr = shrink_batch(imp, None)  # important slots, left-padded per row
            gi, ok = shr.gather, shr.valid
            m = gi.shape[1]
            k_t, v_t = _gather_tokens(key, gi, 2), _gather_tokens(value, gi, 2)
            if self.method.rest == "zero":  # |T| x |T|
                q_t = _gather_tokens(query, gi, 2)
                if bool(ok.all()) and not eager:
                    mask = None  # slots are in position order: plain causal
                else:
                    causal = torch.ones(m, m, dtype=torch.bool, device=gi.device).tril()
                    mask = _as_mask(causal[None, None] & ok[:, None, None, :], None, eager, query.dtype)
                out_t = fn(module, q_t, k_t, v_t, mask, **kwargs)[0]  # [B, m, H, d]
                out = out_t.new_zeros(b, n, *out_t.shape[2:])
                row = torch.arange(b, device=gi.device)[:, None].expand(b, m)
                out[row[ok], gi[ok]] = out_t[ok]
                return out, None
            # n x |T|: every row attends to the important keys at or before it
            pos = torch.arange(n, device=gi.device)
            allowed = (gi[:, None, :] <= pos[None, :, None]) & ok[:, None, :]  # [B, n, m]
            out = fn(module, query, k_t, v_t, _as_mask(allowed[:, None], None, eager, query.dtype), **kwargs)[
                0
            ]
            return out * allowed.any(-1)[:, :, None, None].to(out.dtype), None  # rows with no key: zero
        # a no-cache step (prompt rows as above, generated rows attend to everything): full keys, masked
        L0 = st.L0
        pos = torch.arange(n, device=query.device)
        imp_n = torch.cat([imp, torch.ones(b, n - L0, dtype=torch.bool, device=imp.device)], 1)
        valid_n = torch.cat([st.valid, torch.ones(b, n - L0, dtype=torch.bool, device=imp.device)], 1)
        allowed = (pos[None, :] <= pos[:, None])[None] & valid_n[:, None, :]  # [B, n, n]
        prompt_row = (pos < L0)[None, :, None]
        key_ok = imp_n[:, None, :]  # prompt rows see only important keys
        if self.method.rest == "zero":  # ... and only important prompt rows attend at all
            key_ok = key_ok & imp_n[:, :, None]
        allowed = allowed & (~prompt_row | key_ok)
        any_key = allowed.any(-1)  # rows with no key get no attention update
        mask = _as_mask(allowed[:, None], None, eager, query.dtype)
        out = fn(module, query, key, value, mask, **kwargs)[0]
        out = out * any_key[:, :, None, None].to(out.dtype)
        return out, None

    def _maybe_resplit(self, idx: int, query, key, scaling) -> None:
        """Every ``resplit_every`` decode steps: classify the tokens generated since the last split (§3.3)."""
        from mmcompress.methods.zipvl import window_split

        st, cur = self.state, self.cur
        total = key.shape[2]
        start = st.split_from.get(idx, st.L0)
        if total - start < self.method.resplit_every:
            return
        with torch.no_grad():
            h, d = query.shape[1], query.shape[-1]
            k = key.float().repeat_interleave(h // key.shape[1], dim=1)
            logits = (query[:, :, -1:].float() @ k.transpose(-1, -2))[:, :, 0] * (scaling or d**-0.5)
            if cur.am2d is not None and cur.am2d.shape[1] == total:
                logits = logits.masked_fill(~cur.am2d.bool()[:, None, :], float("-inf"))
            split = window_split(torch.softmax(logits, dim=-1), start, self.method.tau)
        cur.cache.set_important(split, start=start, layers=idx)
        st.split_from[idx] = total
