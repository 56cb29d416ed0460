"""ZipVL: layer-wise adaptive important-token selection, sparse prefill attention, mixed-precision KV cache.

He, Chen, Xing, Chen, Zhuang, Chen (2024): "ZipVL: Efficient Large Vision-Language Models with Dynamic
Token Sparsification and KV Cache Compression", arXiv 2410.08584 v1 (Algorithm 1, Eq. 6–9). There is no
public code; the KV-quantization ancestor is ThisisBillhe/ZipCache @ b6932b9. Spec:
``specs/divprune-aim-zipvl-kvquant.md`` §3 (v1: unimportant tokens are quantized to low bits, not
evicted).

Per decoder layer, at prefill (pure functions here; hooks in :mod:`mmcompress.adapters.llm_hooks`):

1. **Probe attention** (§3.2 step 2): a few query rows — the most recent ``probe_recent`` fraction of the
   row's tokens plus ``probe_spread`` evenly spaced earlier ones — attend to all keys (causal, fp32).
   Only these rows are computed outside the model's SDPA / eager attention.
2. **How many** (Eq. 6): ``a_j`` = attention key ``j`` receives, summed over probes and heads; the number
   of important tokens ``p`` is the smallest count whose top-``p`` mass reaches ``τ`` of the total.
3. **Which** (Eq. 7–9): the ``p`` tokens with the largest *normalized* score ``a_j / c_j``, ``c_j`` the
   number of probes that can see ``j`` (the lower-triangular correction).
4. **Sparse prefill** (Algorithm 1): from layer ``dense_layers`` on, attention runs on the important
   tokens only: keys and values are gathered to ``T``; every row attends to the important keys
   before it (``rest="important"``, cost ``n·p``), or only ``T`` rows attend and the others get no
   attention update (``rest="zero"``, cost ``p²``).
5. **KV cache** (§3.4): every token is cached; important ones at ``high_bits``, the others at
   ``low_bits`` (:class:`~mmcompress.kv.cache.MixedPrecisionCache`, keys per channel, values per token,
   recent tokens in full precision).
6. **Decode** (§3.3): every ``resplit_every`` generated tokens, the current query's attention over the
   tokens generated since the last split decides their classes (same Eq. 6 rule, one query: no
   normalization); until then they wait in full precision.

Choices where the paper is silent (spec §3.8), each a parameter:

* probe set: ZipCache's 5% recent + 5% random, with the random part replaced by evenly spaced
  positions (deterministic, and a padded row sees the same probes as the row alone);
* heads: one important set shared by all heads (scores summed over heads), so the sparse prefill is one
  gathered attention call (per-head sets would need per-head varlen packing);
* text: ``keep_text=False`` — text tokens compete like visual ones (the paper never singles them out);
* non-important rows: ``rest="important"`` (default) lets them attend to ``T``; ``"zero"`` is the
  literal reading of Algorithm 1 (attention output only for ``T``). On shapes-llava (ShapesVQA, n=30,
  τ=0.975) ``"zero"`` lost 10 points of accuracy (0.37 vs 0.47 dense) — the last prompt token, which
  produces the answer, is often outside ``T`` and loses its attention at every sparse layer — while
  ``"important"`` kept 0.47 even at τ=0.8;
* ``dense_layers=2``: layers 0–1 attend densely (their attention is broad; FastV prunes from layer 2 on).
  Their important sets still decide the KV split;
* normalizer ``c_j``: the exact number of probes that see ``j`` (ZipCache divides by ``n - j``);
* quantizer: KIVI's group-wise layout of the project's cache, not ZipCache's per-subset one
  (see :mod:`mmcompress.kv.cache`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from ..config import InLLMMethod, check_choice, check_int
from ..kv.layout import check_layout
from ..registry import register

__all__ = [
    "ZipVL",
    "REST_MODES",
    "probe_positions",
    "probe_scores",
    "important_count",
    "zipvl_select",
    "window_split",
]

#: what the rows outside the important set get in the sparse prefill
REST_MODES: tuple[str, ...] = ("zero", "important")


def probe_positions(
    valid: torch.Tensor, recent: float = 0.05, spread: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe query positions per row: ``(idx [B, m] long, ok [B, m] bool)``, ascending (spec §3.2 step 2).

    Of a row's ``n`` real tokens (``valid``), the last ``max(1, ceil(recent·n))`` plus
    ``ceil(spread·n)`` evenly spaced among the earlier ones (the centre of each of that many equal
    slices). Rows with fewer probes are padded with ``ok = False``.
    """
    if valid.dim() != 2:
        raise ValueError(f"probe_positions: valid must be [B, n], got {tuple(valid.shape)}")
    rows = []
    for b in range(valid.shape[0]):
        pos = valid[b].nonzero().flatten()
        n = pos.numel()
        if n == 0:
            rows.append(pos)
            continue
        k_recent = min(n, max(1, math.ceil(recent * n)))
        early = n - k_recent
        k_spread = min(early, math.ceil(spread * n))
        pick = [int((i + 0.5) * early / k_spread) for i in range(k_spread)] if k_spread else []
        sel = torch.tensor(pick + list(range(early, n)), dtype=torch.long, device=pos.device)
        rows.append(pos[sel])
    m = max(1, max(r.numel() for r in rows))
    idx = torch.zeros(valid.shape[0], m, dtype=torch.long, device=valid.device)
    ok = torch.zeros(valid.shape[0], m, dtype=torch.bool, device=valid.device)
    for b, r in enumerate(rows):
        idx[b, : r.numel()] = r
        ok[b, : r.numel()] = True
        if r.numel():
            idx[b, r.numel() :] = r[-1]
    return idx, ok


def probe_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    probe_idx: torch.Tensor,
    probe_ok: torch.Tensor,
    valid: torch.Tensor,
    *,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass each key receives from the probe rows, and how many probes see it.

    Args:
        query: ``[B, H, n, d]`` post-RoPE queries of the layer; key: ``[B, H_kv, n, d]`` (grouped heads
            are repeated). ``probe_idx`` / ``probe_ok``: from :func:`probe_positions`. ``valid``:
            ``[B, n]`` real (non-padding) positions.

    Returns ``(a, c)``, both ``[B, n]`` fp32: ``a_j = Σ_probes Σ_heads softmax(q kᵀ·scaling)_j`` over the
    causal, valid keys, and ``c_j`` = number of valid probes at positions ``>= j`` (0 at padding).
    """
    b, h, n, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    q = query.gather(2, probe_idx[:, None, :, None].expand(b, h, -1, d)).float()
    k = key.float().repeat_interleave(h // key.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale  # [B, H, m, n]
    j = torch.arange(n, device=query.device)
    visible = (j[None, None, :] <= probe_idx[:, :, None]) & valid.bool()[:, None, :]  # [B, m, n]
    probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    probs = torch.where(probe_ok[:, None, :, None], probs, torch.zeros((), device=probs.device))
    a = probs.sum(dim=(1, 2))
    c = ((visible & probe_ok[:, :, None]).sum(1)).float()
    return a, c


def important_count(a: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 6: per row the smallest ``p`` whose top-``p`` scores hold at least ``tau`` of the row's total
    (``[B, n] -> [B]`` long, at least 1 for a row with a real token). ``tau == 1`` keeps every real token."""
    a = a.float().masked_fill(~valid.bool(), 0.0)
    n_valid = valid.sum(1)
    if tau >= 1.0:
        return n_valid.long()
    srt = torch.sort(a, dim=-1, descending=True).values
    cum = srt.cumsum(-1)
    need = tau * cum[:, -1:]
    p = (cum < need).sum(-1) + 1  # first prefix reaching tau of the mass
    return torch.minimum(p, n_valid).clamp(min=1).long()


def zipvl_select(
    a: torch.Tensor,
    c: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    force: torch.Tensor | None = None,
) -> torch.Tensor:
    """The important set ``T`` per row, ``[B, n]`` bool (Eq. 6–9).

    ``p`` from the raw mass ``a`` (:func:`important_count`), membership by the normalized score
    ``a / c`` (ties: the earlier position first); ``force`` (optional ``[B, n]`` bool) joins ``T`` on top
    of the ``p`` chosen tokens. Padding is never important.
    """
    valid = valid.bool()
    p = important_count(a, valid, tau)
    norm = torch.where(c > 0, a.float() / c.clamp(min=1e-30), torch.zeros((), device=a.device))
    norm = norm.masked_fill(~valid, float("-inf"))
    order = torch.sort(norm, dim=-1, descending=True, stable=True).indices
    top = torch.arange(a.shape[1], device=a.device)[None, :] < p[:, None]
    keep = torch.zeros_like(valid).scatter(1, order, top) & valid
    if force is not None:
        keep = keep | (force.bool() & valid)
    return keep


def window_split(attn: torch.Tensor, start: int, tau: float) -> torch.Tensor:
    """Decode-time re-split (§3.3): ``attn [B, H, T]`` — the current query's attention over the whole
    cache — decides the classes of positions ``[start, T)``: the top-``p`` by mass, ``p`` by Eq. 6 on
    that window. Returns ``[B, T - start]`` bool."""
    a = attn.float().sum(1)[:, start:]
    ones = torch.ones_like(a, dtype=torch.bool)
    return zipvl_select(a, torch.ones_like(a), ones, tau)


@register
@dataclasses.dataclass(frozen=True)
class ZipVL(InLLMMethod):
    """ZipVL v1 (arXiv 2410.08584): adaptive important tokens per layer, sparse prefill, mixed-precision KV.

    Attributes:
        tau: fraction of the probe attention mass the important set must hold, in (0, 1] (paper: 0.96 /
            0.975; 1 keeps every token: dense prefill).
        probe_recent / probe_spread: probe queries as fractions of the row's tokens (most recent / evenly
            spaced earlier ones; ZipCache 0.05 / 0.05 random).
        dense_layers: the first layers keep dense prefill attention (their important sets still set the
            KV split).
        rest: attention of the rows outside the important set: ``"important"`` (attend to ``T``) or
            ``"zero"`` (none).
        keep_text: force every text (non-visual) token into the important set.
        high_bits / low_bits: KV bits of important / other tokens (2, 4 or 8; paper 4 / 2).
        residual: most recent tokens kept in full precision; group_size / value_group_size: the
            quantizer's groups (see :class:`~mmcompress.kv.method.MixedKV`).
        resplit_every: decode steps between re-splits of the generated tokens (paper 100).
        kv_cache: False leaves the model's own cache alone (sparse prefill only, no quantization).
    """

    name: ClassVar[str] = "zipvl"
    summary: ClassVar[str] = (
        "ZipVL adaptive per-layer important tokens (attention-mass ratio), sparse prefill attention and "
        "4/2-bit mixed-precision KV cache (arXiv 2410.08584 v1)"
    )

    tau: float = 0.975
    probe_recent: float = 0.05
    probe_spread: float = 0.05
    dense_layers: int = 2
    rest: str = "important"
    keep_text: bool = False
    high_bits: int = 4
    low_bits: int = 2
    residual: int = 128
    group_size: int = 32
    value_group_size: int | None = None
    resplit_every: int = 100
    kv_cache: bool = True

    def validate(self) -> None:
        for field in ("tau", "probe_recent", "probe_spread"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{field} must be a number, got {v!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is not allowed; allowed: (0, 1] (fraction of attention mass)")
        for field in ("probe_recent", "probe_spread"):
            v = getattr(self, field)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{field}={v!r} is not allowed; allowed: a fraction in [0, 1]")
        check_int(self.dense_layers, "dense_layers", 0)
        check_choice(self.rest, "rest", REST_MODES)
        for field in ("keep_text", "kv_cache"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {getattr(self, field)!r}")
        check_layout(self.high_bits, self.low_bits, self.residual, self.group_size, self.value_group_size)
        check_int(self.resplit_every, "resplit_every", 1)

    def cache_method(self) -> Any:
        if not self.kv_cache:
            return None
        from ..kv.method import MixedKV

        # important="text": generated text tokens start high until the next re-split classifies them
        return MixedKV(
            high_bits=self.high_bits,
            low_bits=self.low_bits,
            residual=self.residual,
            group_size=self.group_size,
            value_group_size=self.value_group_size,
            important="text",
        )

    def make_patch(self, model: Any, handle: Any) -> Any:
        from mmcompress.adapters.llm_hooks import ZipVLPatch

        return ZipVLPatch(model, handle, self)
