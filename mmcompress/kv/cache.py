"""Mixed-precision quantized KV cache: a transformers 5.x ``Cache`` that ``generate()`` accepts.

Scheme (spec ``divprune-aim-zipvl-kvquant.md`` §3.4 ZipVL, §4.1 KIVI, §4.2 transformers' QuantizedCache):

* The most recent ``residual`` tokens stay in full precision (KIVI's residual window ``R``).
* Older tokens are quantized with real bit packing (:mod:`mmcompress.kernels.kvquant`): *important*
  tokens at ``high_bits``, the others at ``low_bits`` (ZipVL: 4 / 2). Keys per channel — one
  (scale, zero) per channel per ``group_size`` tokens — and values per token — one pair per
  ``value_group_size`` channels of a token — asymmetric min/max (KIVI's granularity).
* Per row and per precision class the evicted tokens form a *stream*; every ``group_size`` tokens of a
  stream become one quantized block ``[H, G, D]``. Until its stream fills a block, a token waits in
  full precision (at most ``group_size - 1`` per row and class). Blocks are never re-quantized unless
  asked (:meth:`MixedPrecisionCache.set_important` with ``requantize=True``), so error does not drift.
* Each ``update`` returns the full-precision keys/values of the whole sequence (dequantized blocks +
  waiting tokens + residual, ``[B, H_kv, T, D]`` in the model dtype) and the attention runs as usual
  (SDPA untouched) — the same "dequantize, then attend" contract as transformers' ``QuantizedLayer``;
  a fused dequant-attention kernel can replace it later.

Decisions (where the papers leave it open, or differ):

* **Eviction is lazy**: tokens leave the residual window at the *next* ``update`` (the new tokens of a
  step are never quantized in that step). So after a prefill longer than ``residual`` the whole prompt is
  still in full precision until the first decode step, and an important set computed *during* prefill
  (e.g. from ZipVL's attention probes, which run after the cache update of their layer) still decides
  how the prompt is quantized. :meth:`MixedPrecisionCache.flush` evicts immediately.
* **Left padding**: positions whose attention-mask entry is 0 are dropped when they leave the residual
  window: they join no stream, so they never touch a real token's scales, and they are returned as zeros
  (they are masked out of attention anyway). Streams are per row and start at the row's first real
  token, so a padded row is quantized exactly like the same row alone. The cache learns the mask from
  :meth:`MixedPrecisionCache.set_attention_mask`; ``mmcompress.compress(model, "mixed_kv")`` calls it
  from a hook on the decoder at every forward. Without a mask every position counts as real.
* **Important set** (:meth:`MixedPrecisionCache.set_important`): per row, a boolean mask over absolute
  cache positions or a list of index sets, per layer or for all layers; positions never classified get
  ``default_important``. Changing it re-routes the tokens still in full precision losslessly (ZipVL §3.3
  re-splits only its not-yet-quantized recent tokens). ``requantize=True`` also moves already quantized
  tokens whose class changed, ZipCache style: the rows concerned are dequantized and re-quantized with
  fresh statistics (a second rounding).
* ZipCache's own quantizers differ (keys: one min/max per channel over a whole subset, no token groups;
  values: channel-separable token-wise "CST"); here KIVI's appendable group-wise layout is used so that
  no re-quantization is needed as the cache grows.
* ``bytes_held`` counts everything the cache holds: packed codes, scales and zeros, full-precision
  tokens (residual and waiting), and bookkeeping (block rows/positions as int32, waiting tokens'
  rows/positions as int64, the per-position bool masks; the attention mask shared by all layers is
  counted once). :meth:`MixedPrecisionCache.memory` splits it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from ..kernels import kvquant
from .layout import check_int_min, check_layout, resolve_value_group

__all__ = ["MixedPrecisionLayer", "MixedPrecisionCache", "CLASSES"]

#: precision classes, in a fixed order: "high" (important tokens) and "low"
CLASSES: tuple[str, ...] = ("high", "low")


def _grow_mask(old: torch.Tensor | None, rows: int, end: int, fill: bool, device) -> torch.Tensor:
    """``old`` ([rows, n] bool or None) extended with ``fill`` to at least ``end`` positions."""
    if old is None:
        return torch.full((rows, end), fill, dtype=torch.bool, device=device)
    if old.shape[0] != rows:
        raise ValueError(f"important has {rows} rows but the map already set has {old.shape[0]}")
    if old.shape[1] >= end:
        return old
    pad = torch.full((rows, end - old.shape[1]), fill, dtype=torch.bool, device=old.device)
    return torch.cat([old, pad], dim=1)


def _mask_at(mask: torch.Tensor | None, rows: torch.Tensor, pos: torch.Tensor, default: bool) -> torch.Tensor:
    """``mask[rows, pos]`` with ``default`` where ``pos`` lies beyond the mask (or there is none)."""
    if mask is None:
        return torch.full(pos.shape, default, dtype=torch.bool, device=pos.device)
    inside = pos < mask.shape[1]
    got = mask[rows, pos.clamp(max=max(mask.shape[1] - 1, 0))] if mask.shape[1] else inside
    return torch.where(inside, got, torch.full_like(inside, default))


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class MixedPrecisionLayer(DynamicLayer):
    """One decoder layer's mixed-precision cache (see the module docstring for the scheme).

    ``keys`` / ``values`` hold the full-precision residual window ``[B, H, r, D]`` (as in transformers'
    ``QuantizedLayer``); the sequence length is ``cumulative_length``. Quantized blocks of class ``c``:
    ``_blocks[c] = {"k": QTensor [nb, H, G, D] (axis 2), "v": QTensor [nb, H, G, D] (axis 3),
    "row": int32 [nb], "pos": int32 [nb, G]}``; tokens waiting for a full block:
    ``_pending[c] = {"k": [n, H, D], "v": [n, H, D], "row": int64 [n], "pos": int64 [n]}``.
    """

    is_croppable = False  # quantized tokens cannot be rolled back exactly
    is_compileable = False

    def __init__(
        self,
        *,
        high_bits: int = 4,
        low_bits: int = 2,
        residual: int = 128,
        group_size: int = 32,
        value_group_size: int | None = None,
        scale_dtype: torch.dtype | None = None,
        default_important: bool = False,
    ) -> None:
        check_layout(high_bits, low_bits, residual, group_size, value_group_size)
        super().__init__()
        self.bits = {"high": high_bits, "low": low_bits}
        self.residual = residual
        self.group_size = group_size
        self.value_group_size = value_group_size
        self.scale_dtype = scale_dtype
        self.default_important = bool(default_important)
        self.cumulative_length = 0
        self._important: torch.Tensor | None = None  # bool [B, n]: position p of row b is important
        self._valid: torch.Tensor | None = None  # bool [B, n]: attention mask (False = padding)
        self._clear_store()

    def _clear_store(self) -> None:
        self._pending: dict[str, dict[str, torch.Tensor] | None] = dict.fromkeys(CLASSES)
        self._blocks: dict[str, dict[str, Any] | None] = dict.fromkeys(CLASSES)
        self._vgroup: int | None = None

    # -- CacheLayerMixin API ------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(
                f"MixedPrecisionLayer expects keys/values [B, H, T, D], got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self._vgroup = resolve_value_group(self.value_group_size, value_states.shape[-1], self.bits["low"])
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.is_initialized = True
        for name in ("_important", "_valid"):
            m = getattr(self, name)
            if m is not None and m.shape[0] != key_states.shape[0]:
                raise ValueError(
                    f"the {name[1:]} mask set before the first update has {m.shape[0]} rows but the batch "
                    f"has {key_states.shape[0]}"
                )

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, q, D]`` keys/values; return the whole sequence ``[B, H, T, D]`` (model dtype).

        First the tokens that no longer fit the residual window (kept: the last ``residual - q`` old ones)
        are quantized, then the new ones are appended in full precision.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self._evict(self.keys.shape[-2] - max(0, self.residual - q))
        self.keys = torch.cat([self.keys, key_states.to(self.dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.dtype)], dim=-2)
        self.cumulative_length += q
        return self._materialize()

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self._important = self._valid = None
        self._clear_store()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens; only possible while they are all in the residual."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove from the end"
            )
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(
                f"crop({tokens_to_remove}): only the {self.keys.shape[-2]} full-precision residual tokens "
                f"can be removed from a quantized cache"
            )
        self.keys = self.keys[..., :-n, :].clone()
        self.values = self.values[..., :-n, :].clone()
        self.cumulative_length -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._select_rows(torch.arange(b, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = indices.nonzero().flatten() if indices.dtype == torch.bool else indices
        self._select_rows(idx)

    def offload(self) -> None:  # the quantized stores would stay behind: refuse rather than half-offload
        raise NotImplementedError("MixedPrecisionLayer does not support cache offloading")

    # -- classes and masks ----------------------------------------------------------------------------
    def set_important(self, important: torch.Tensor | None, start: int = 0, requantize: bool = False) -> None:
        """Mark positions ``[start, start + n)`` important (True) or not; None clears the whole map.

        Tokens still in full precision follow the new map at once (losslessly); already quantized ones
        only with ``requantize=True`` (see the module docstring).
        """
        if important is None:
            self._important = None
        else:
            if important.dim() != 2 or important.dtype != torch.bool:
                raise ValueError(
                    f"important must be a bool tensor [batch, positions], got {important.dtype} "
                    f"{tuple(important.shape)}"
                )
            rows = important.shape[0]
            if self.is_initialized and rows != self.keys.shape[0]:
                raise ValueError(
                    f"important has {rows} rows but the cache holds a batch of {self.keys.shape[0]}"
                )
            end = start + important.shape[1]
            m = _grow_mask(self._important, rows, end, self.default_important, important.device)
            m[:, start:end] = important.to(m.device)
            self._important = m
        if self.is_initialized:
            if requantize:
                self._requantize_changed()
            self._reroute_pending()

    def set_valid(self, mask: torch.Tensor) -> None:
        """Attention mask ``[B, n]`` over positions ``[0, n)``: 0 marks padding (dropped at eviction)."""
        if mask.dim() != 2:
            raise ValueError(f"attention mask must be 2-D [batch, positions], got shape {tuple(mask.shape)}")
        if self.is_initialized and mask.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"attention mask has {mask.shape[0]} rows but the cache holds a batch of {self.keys.shape[0]}"
            )
        self._valid = mask.to(torch.bool)

    def flush(self) -> None:
        """Quantize now everything outside the residual window (normally done at the next update)."""
        if self.is_initialized:
            self._evict(self.keys.shape[-2] - self.residual)

    # -- internals ------------------------------------------------------------------------------------
    def _classify(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return _mask_at(self._important, rows, pos, self.default_important)

    def _evict(self, n: int) -> None:
        """Move the ``n`` oldest residual tokens into their class streams, then quantize full blocks."""
        if n <= 0:
            return
        b_all, _, r, _ = self.keys.shape
        p0 = self.cumulative_length - r  # absolute position of the first residual token
        rows = torch.arange(b_all, device=self.device)[:, None].expand(b_all, n)
        pos = torch.arange(p0, p0 + n, device=self.device)[None].expand(b_all, n)
        valid = _mask_at(self._valid, rows, pos, True)
        imp = self._classify(rows, pos)
        for c, sel in (("high", valid & imp), ("low", valid & ~imp)):
            b, j = sel.nonzero(as_tuple=True)
            if b.numel():
                self._append_pending(c, self.keys[b, :, j], self.values[b, :, j], b, j + p0)
        # clone: a slice would keep the whole old residual storage alive
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()
        self._flush()

    def _append_pending(self, c: str, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, pos: torch.Tensor):
        new = {"k": k, "v": v, "row": row.long(), "pos": pos.long()}
        old = self._pending[c]
        self._pending[c] = new if old is None else {key: torch.cat([old[key], new[key]]) for key in new}

    def _flush(self) -> None:
        """Quantize every full ``group_size`` block of each row's stream, per class."""
        g = self.group_size
        for c in CLASSES:
            p = self._pending[c]
            if p is None:
                continue
            row, pos = p["row"], p["pos"]
            order = torch.argsort(row * (int(pos.max()) + 1) + pos)  # by row, then position
            row, pos, k, v = row[order], pos[order], p["k"][order], p["v"][order]
            counts = torch.bincount(row, minlength=self.keys.shape[0])
            starts = counts.cumsum(0) - counts
            rank = torch.arange(row.numel(), device=row.device) - starts[row]
            take = rank < (counts // g * g)[row]
            rest = ~take
            self._pending[c] = (
                {"k": k[rest], "v": v[rest], "row": row[rest], "pos": pos[rest]} if bool(rest.any()) else None
            )
            nb = int(take.sum()) // g
            if nb == 0:
                continue
            _, h, d = k.shape
            kb = k[take].view(nb, g, h, d).transpose(1, 2)  # [nb, H, G, D]: G tokens of one row
            vb = v[take].view(nb, g, h, d).transpose(1, 2)
            bits = self.bits[c]
            sd = self.scale_dtype
            new = {
                "k": kvquant.quantize(kb, bits, g, axis=2, scale_dtype=sd),  # per channel, G tokens
                "v": kvquant.quantize(vb, bits, self._vgroup, axis=3, scale_dtype=sd),  # per token
                "row": row[take].view(nb, g)[:, 0].to(torch.int32),
                "pos": pos[take].view(nb, g).to(torch.int32),
            }
            old = self._blocks[c]
            if old is None:
                self._blocks[c] = new
            else:
                self._blocks[c] = {
                    "k": kvquant.cat([old["k"], new["k"]]),
                    "v": kvquant.cat([old["v"], new["v"]]),
                    "row": torch.cat([old["row"], new["row"]]),
                    "pos": torch.cat([old["pos"], new["pos"]]),
                }

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, r, d = self.keys.shape
        t = self.cumulative_length
        out_k = self.keys.new_zeros(b, h, t, d)  # dropped padding positions stay 0
        out_v = self.values.new_zeros(b, h, t, d)
        tk, tv = out_k.transpose(1, 2), out_v.transpose(1, 2)  # [B, T, H, D] views
        for c in CLASSES:
            blk = self._blocks[c]
            if blk is not None:
                g = blk["pos"].shape[1]
                rows = blk["row"].long()[:, None].expand(-1, g)
                pos = blk["pos"].long()
                tk[rows, pos] = kvquant.dequantize(blk["k"], dtype=self.dtype).transpose(1, 2)
                tv[rows, pos] = kvquant.dequantize(blk["v"], dtype=self.dtype).transpose(1, 2)
            p = self._pending[c]
            if p is not None:
                tk[p["row"], p["pos"]] = p["k"]
                tv[p["row"], p["pos"]] = p["v"]
        out_k[:, :, t - r :] = self.keys
        out_v[:, :, t - r :] = self.values
        return out_k, out_v

    def _reroute_pending(self) -> None:
        """Move waiting full-precision tokens whose class changed to the right stream (lossless)."""
        parts = [(c, p) for c, p in self._pending.items() if p is not None]
        if not parts:
            return
        merged = {key: torch.cat([p[key] for _, p in parts]) for key in ("k", "v", "row", "pos")}
        imp = self._classify(merged["row"], merged["pos"])
        self._pending = dict.fromkeys(CLASSES)
        for c, sel in (("high", imp), ("low", ~imp)):
            if bool(sel.any()):
                self._pending[c] = {key: val[sel] for key, val in merged.items()}
        self._flush()

    def _requantize_changed(self) -> None:
        """Dequantize every block of each row holding a token whose class changed, back into the streams."""
        changed_rows = []
        for c in CLASSES:
            blk = self._blocks[c]
            if blk is None:
                continue
            pos = blk["pos"].long()
            rows = blk["row"].long()[:, None].expand_as(pos)
            want_high = self._classify(rows, pos)
            wrong = ~want_high if c == "high" else want_high
            changed_rows.append(rows[wrong])
        if not changed_rows:
            return
        affected = torch.unique(torch.cat(changed_rows))
        if affected.numel() == 0:
            return
        for c in CLASSES:
            blk = self._blocks[c]
            if blk is None:
                continue
            hit = torch.isin(blk["row"].long(), affected)
            if not bool(hit.any()):
                continue
            idx = hit.nonzero().flatten()
            k = kvquant.dequantize(blk["k"].index_select(0, idx), dtype=self.dtype)  # [m, H, G, D]
            v = kvquant.dequantize(blk["v"].index_select(0, idx), dtype=self.dtype)
            m, h, g, d = k.shape
            pos = blk["pos"][idx].long().flatten()
            rows = blk["row"][idx].long()[:, None].expand(m, g).flatten()
            keep = (~hit).nonzero().flatten()
            self._blocks[c] = (
                None
                if keep.numel() == 0
                else {
                    "k": blk["k"].index_select(0, keep),
                    "v": blk["v"].index_select(0, keep),
                    "row": blk["row"][keep],
                    "pos": blk["pos"][keep],
                }
            )
            self._append_pending(
                c, k.transpose(1, 2).reshape(m * g, h, d), v.transpose(1, 2).reshape(m * g, h, d), rows, pos
            )

    def _select_rows(self, idx: torch.Tensor) -> None:
        """New row ``i`` is old row ``idx[i]`` (beam reorder, repeat-interleave, batch select)."""
        if self._important is not None:
            self._important = self._important.index_select(0, idx.to(self._important.device))
        if self._valid is not None:
            self._valid = self._valid.index_select(0, idx.to(self._valid.device))
        if not self.is_initialized:
            return
        idx = idx.to(self.device).long()
        self.keys = self.keys.index_select(0, idx)
        self.values = self.values.index_select(0, idx)
        for c in CLASSES:
            p = self._pending[c]
            if p is not None:
                new_row, item = (p["row"][None, :] == idx[:, None]).nonzero(as_tuple=True)
                self._pending[c] = (
                    None
                    if item.numel() == 0
                    else {"k": p["k"][item], "v": p["v"][item], "row": new_row, "pos": p["pos"][item]}
                )
            blk = self._blocks[c]
            if blk is not None:
                new_row, item = (blk["row"].long()[None, :] == idx[:, None]).nonzero(as_tuple=True)
                self._blocks[c] = (
                    None
                    if item.numel() == 0
                    else {
                        "k": blk["k"].index_select(0, item),
                        "v": blk["v"].index_select(0, item),
                        "row": new_row.to(torch.int32),
                        "pos": blk["pos"][item],
                    }
                )

    # -- accounting -----------------------------------------------------------------------------------
    def memory(self, seen: set[int] | None = None) -> dict[str, int]:
        """Bytes held, split into ``codes`` (packed ints), ``scales`` (scales + zeros), ``full_precision``
        (residual + waiting tokens) and ``index`` (block / waiting-token rows and positions, masks).

        ``seen``: data pointers of masks already counted (the attention mask is one tensor shared by
        every layer; the cache counts it once)."""
        out = {"codes": 0, "scales": 0, "full_precision": 0, "index": 0}
        if self.is_initialized:
            out["full_precision"] += _tensor_bytes(self.keys, self.values)
        for c in CLASSES:
            blk = self._blocks[c]
            if blk is not None:
                for q in (blk["k"], blk["v"]):
                    out["codes"] += _tensor_bytes(q.packed)
                    out["scales"] += _tensor_bytes(q.scale, q.zero)
                out["index"] += _tensor_bytes(blk["row"], blk["pos"])
            p = self._pending[c]
            if p is not None:
                out["full_precision"] += _tensor_bytes(p["k"], p["v"])
                out["index"] += _tensor_bytes(p["row"], p["pos"])
        for m in (self._important, self._valid):
            if m is not None and (seen is None or m.data_ptr() not in seen):
                out["index"] += _tensor_bytes(m)
                if seen is not None:
                    seen.add(m.data_ptr())
        return out

    def bytes_held(self) -> int:
        return sum(self.memory().values())

    def token_counts(self) -> dict[str, int]:
        """Tokens (summed over rows) per state: quantized ``high`` / ``low``, ``waiting`` in full precision
        for a block, ``residual`` (full precision, padding included) and ``dropped`` (padding)."""
        out = {"high": 0, "low": 0, "waiting": 0, "residual": 0, "dropped": 0}
        if not self.is_initialized:
            return out
        for c in CLASSES:
            if self._blocks[c] is not None:
                out[c] = self._blocks[c]["pos"].numel()
            if self._pending[c] is not None:
                out["waiting"] += self._pending[c]["pos"].numel()
        b, _, r, _ = self.keys.shape
        out["residual"] = b * r
        out["dropped"] = b * self.cumulative_length - sum(out.values())
        return out


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class MixedPrecisionCache(Cache):
    """Mixed-precision quantized KV cache for any transformers decoder LLM or VLM (``generate()`` accepts it).

    Args:
        config: the model's config (a VLM's is fine: its text config is used), or a number of layers.
        high_bits / low_bits: bits of important / other tokens, each in ``(2, 4, 8)``, high >= low.
        residual: most recent tokens kept in full precision (KIVI's R).
        group_size: tokens per key group (one scale per channel per group), a multiple of ``8 // low_bits``.
        value_group_size: channels per value group (one scale per token per group); default 32 when it
            divides the head dimension, else the whole head.
        scale_dtype: storage of scales and zeros (default fp16, bf16 for a bf16 model).
        default_important: class of positions no important set covers.

    Usage::

        cache = MixedPrecisionCache(model.config, high_bits=4, low_bits=2)
        cache.set_attention_mask(batch["attention_mask"])        # left padding (compress() does this)
        cache.set_important(important_bool_mask)                 # optional, any time before eviction
        model.generate(**batch, past_key_values=cache)
        cache.bytes_held()
    """

    def __init__(
        self,
        config: Any,
        *,
        high_bits: int = 4,
        low_bits: int = 2,
        residual: int = 128,
        group_size: int = 32,
        value_group_size: int | None = None,
        scale_dtype: torch.dtype | None = None,
        default_important: bool = False,
    ) -> None:
        check_layout(high_bits, low_bits, residual, group_size, value_group_size)
        if isinstance(config, int) and not isinstance(config, bool):
            n = check_int_min(config, "config (number of layers)", 1)
        else:
            text = _text_config(config)
            layer_types, _ = get_layer_types_and_kwargs(text)
            bad = sorted(set(layer_types) - {"full_attention"})
            if bad:
                raise ValueError(
                    f"MixedPrecisionCache supports full-attention layers only; this model has layer types "
                    f"{bad} (sliding / chunked windows or shared KV need their own cache layers)"
                )
            n = len(layer_types)
        kw = dict(
            high_bits=high_bits,
            low_bits=low_bits,
            residual=residual,
            group_size=group_size,
            value_group_size=value_group_size,
            scale_dtype=scale_dtype,
            default_important=default_important,
        )
        super().__init__(layers=[MixedPrecisionLayer(**kw) for _ in range(n)])
        self.settings = {k: v for k, v in kw.items() if k != "scale_dtype"}

    def __repr__(self) -> str:
        return f"MixedPrecisionCache(layers={len(self.layers)}, {self.settings})"

    def _layer_list(self, layers: int | Iterable[int] | None) -> list[MixedPrecisionLayer]:
        if layers is None:
            return list(self.layers)
        idx = [layers] if isinstance(layers, int) else list(layers)
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(self.layers) <= i < len(self.layers):
                raise ValueError(
                    f"layer index {i!r} is out of range; the cache has {len(self.layers)} layers"
                )
        return [self.layers[i] for i in idx]

    def set_important(
        self,
        important: torch.Tensor | Sequence[Any] | None,
        *,
        start: int = 0,
        layers: int | Iterable[int] | None = None,
        requantize: bool = False,
    ) -> None:
        """Set (or re-split, ZipVL §3.3) the important tokens that get ``high_bits``.

        Args:
            important: a bool tensor ``[B, n]`` for absolute positions ``[start, start + n)``; or one index
                set per row (tensor or list of absolute positions ``>= start``): those are important and
                every other position from ``start`` to the layer's current length is not; or None to
                clear every mark (all positions back to ``default_important``).
            start: first absolute cache position the marks describe.
            layers: layer indices to apply to (ZipVL selects per layer); default all.
            requantize: also move already quantized tokens whose class changed (dequantize and
                re-quantize their rows, ZipCache style). Without it only full-precision tokens follow.
        """
        check_int_min(start, "start", 0)
        for layer in self._layer_list(layers):
            mask = important
            if important is not None and not isinstance(important, torch.Tensor):
                mask = self._index_sets_to_mask(important, start, layer)
            layer.set_important(mask, start=start, requantize=requantize)

    @staticmethod
    def _index_sets_to_mask(sets: Sequence[Any], start: int, layer: MixedPrecisionLayer) -> torch.Tensor:
        idx = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sets]
        hi = max([int(i.max()) + 1 for i in idx if i.numel()] + [layer.cumulative_length, start])
        dev = layer.device if layer.is_initialized else torch.device("cpu")
        mask = torch.zeros(len(idx), hi - start, dtype=torch.bool, device=dev)
        for b, i in enumerate(idx):
            if i.numel() and int(i.min()) < start:
                raise ValueError(f"important index {int(i.min())} of row {b} lies before start={start}")
            mask[b, i.to(dev) - start] = True
        return mask

    def set_attention_mask(
        self, attention_mask: torch.Tensor, *, layers: int | Iterable[int] | None = None
    ) -> None:
        """The 2-D attention mask ``[B, n]`` over positions ``[0, n)`` (0 = padding, never quantized)."""
        for layer in self._layer_list(layers):
            layer.set_valid(attention_mask)

    def flush(self) -> None:
        """Quantize now every token outside the residual window of every layer."""
        for layer in self.layers:
            layer.flush()

    def memory(self) -> dict[str, int]:
        """Bytes held by all layers, split as in :meth:`MixedPrecisionLayer.memory`."""
        total = {"codes": 0, "scales": 0, "full_precision": 0, "index": 0}
        seen: set[int] = set()
        for layer in self.layers:
            for k, v in layer.memory(seen).items():
                total[k] += v
        return total

    def bytes_held(self) -> int:
        """Exact bytes held: packed codes + scales/zeros + full-precision tokens + bookkeeping."""
        return sum(self.memory().values())

    @property
    def nbytes(self) -> int:
        """Same as :meth:`bytes_held` (what :func:`mmcompress.report.cache_bytes` reads)."""
        return self.bytes_held()

    def token_counts(self) -> dict[str, int]:
        """Per-state token counts summed over layers (see :meth:`MixedPrecisionLayer.token_counts`)."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.token_counts().items():
                total[k] = total.get(k, 0) + v
        return total
