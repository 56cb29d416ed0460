"""Batched top-k with indices and a deterministic tie rule: plain-torch reference and Triton kernel.

Issue 5 (DESIGN §5; reference ``peers-and-eval-conventions.md`` §3.2): ``tl.topk`` returns values only and
needs a power-of-two k, ``torch.topk`` leaves the order of ties unspecified, and neither says what a NaN
does. Token-selection methods need all three pinned down, so this module defines one contract:

* rows of ``N`` scores (``[N]`` or ``[B, N]``), a ``k`` per row (an int, or one per row);
* the ``k`` largest scores are kept; among equal scores the **lowest index wins** (``-0.0 == +0.0``);
* a NaN ranks below every number (below ``-inf``) and is never kept: a row whose ``k`` exceeds its count
  of non-NaN scores is an error;
* ``sorted=True`` returns the picks by value descending (ties: ascending index); ``sorted=False``
  returns the same set in ascending index order (what a gather that must keep token order wants);
* rows with ``k_b < max(k)`` are padded with index ``-1`` and value NaN.

The Triton path runs one program per row in two steps (no full sort of the row):

1. *select*: the k-th largest value is found by a bitwise binary search on an order-preserving int32 key
   of each score (32 counting passes for fp32, 16 for bf16, 19 for fp16, over the row held in registers
   when it fits in one block, else streamed block by block); one more pass writes every score above
   that threshold plus the first ``need`` ties in index order (a running prefix sum), so the output is
   already in ascending index order;
2. *sort* (``sorted=True`` only): the ``k`` picks are packed as ``key << 32 | (2^31 - 1 - index)`` and
   bitonic-sorted descending with ``tl.sort``; unique keys make the order total, so ties come out lowest
   index first.
"""

from __future__ import annotations

from typing import Any

import torch

from ._dispatch import check_float, next_power_of_2, resolve_backend, triton_module

__all__ = ["topk", "topk_torch", "topk_triton"]

#: largest k the Triton sort step handles in one program (``tl.sort`` of 2^16 int64 keys)
MAX_SORTED_K = 1 << 16
#: rows at most this long are kept in registers by the select step; longer rows are streamed
_MAX_RESIDENT = 4096


def _prepare(scores: torch.Tensor, k: int | torch.Tensor | list[int] | tuple[int, ...], op: str):
    """Validate the shared contract; return ``(rows [B, N], k per row [B] int64 on scores.device, kmax,
    squeeze)``. Reads ``k`` and the NaN counts on the host (one sync) so bad input fails before a launch."""
    check_float(scores, "scores", op)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{op}: scores must be [N] or [B, N], got shape {tuple(scores.shape)}")
    squeeze = scores.dim() == 1
    rows = scores.unsqueeze(0) if squeeze else scores
    b, n = rows.shape
    if n >= 2**31 - 1:
        raise ValueError(f"{op}: rows of {n} scores are too long (at most 2^31 - 2)")
    if isinstance(k, bool):
        raise TypeError(f"{op}: k={k!r} must be an int or an integer tensor / list, not a bool")
    if isinstance(k, int):
        ks = torch.full((b,), k, dtype=torch.long)
    elif isinstance(k, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in k):
            raise TypeError(f"{op}: k={k!r} must hold ints")
        ks = torch.tensor(list(k), dtype=torch.long).reshape(-1)
    elif isinstance(k, torch.Tensor):
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"{op}: k must be an integer tensor, got dtype {k.dtype}")
        if k.dim() > 1:
            raise ValueError(f"{op}: k must be a 0-d or 1-d tensor, got shape {tuple(k.shape)}")
        ks = k.reshape(-1).to(device="cpu", dtype=torch.long)
        if k.dim() == 0:
            ks = ks.expand(b)
    else:
        raise TypeError(
            f"{op}: k must be an int, a list of ints or an integer tensor, got {type(k).__name__}"
        )
    if ks.numel() != b:
        raise ValueError(
            f"{op}: k has {ks.numel()} entries but scores has {b} rows (shape {tuple(scores.shape)})"
        )
    if b:
        bad = torch.nonzero((ks < 0) | (ks > n))
        if bad.numel():
            r = int(bad[0, 0])
            raise ValueError(f"{op}: k={int(ks[r])} for row {r} is outside [0, N={n}]")
        finite = n - torch.isnan(rows).sum(dim=-1).cpu()
        bad = torch.nonzero(ks > finite)
        if bad.numel():
            r = int(bad[0, 0])
            raise ValueError(
                f"{op}: row {r} has only {int(finite[r])} non-NaN scores but k={int(ks[r])}; "
                f"NaN scores are never selected"
            )
    kmax = int(ks.max()) if b else (k if isinstance(k, int) else 0)
    return rows, ks.to(scores.device), kmax, squeeze


def _empty(rows: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs pre-filled with the padding (value NaN, index -1)."""
    vals = torch.full((rows.shape[0], kmax), float("nan"), dtype=rows.dtype, device=rows.device)
    idx = torch.full((rows.shape[0], kmax), -1, dtype=torch.long, device=rows.device)
    return vals, idx


def topk_torch(
    scores: torch.Tensor, k: int | torch.Tensor | list[int], *, sorted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference for :func:`topk` (same contract; two stable sorts per row)."""
    rows, ks, kmax, squeeze = _prepare(scores, k, "topk")
    vals, idx = _empty(rows, kmax)
    b, n = rows.shape
    if b and kmax:
        xf = rows.float()  # exact for fp16/bf16; comparisons treat -0.0 == +0.0 like the kernel
        nan = torch.isnan(xf)
        # stable descending sort on the value (NaN as -inf), then a stable sort that moves NaN last:
        # equal values keep ascending index order, and a NaN never precedes a number (not even -inf)
        order = torch.sort(xf.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
        order = order.gather(
            -1, torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
        )
        top = order[:, :kmax]
        pad = torch.arange(kmax, device=rows.device)[None, :] >= ks[:, None]
        if not sorted:  # same set, ascending index; padding (set to n) sorts last
            top = torch.sort(top.masked_fill(pad, n), dim=-1).values
        idx = top.masked_fill(pad, -1)
        vals = rows.gather(-1, top.clamp(max=n - 1)).masked_fill(pad, float("nan"))
    return (vals[0], idx[0]) if squeeze else (vals, idx)


# bits that a widened value of this dtype never sets (fp16: 10 mantissa bits, bf16: 7, of fp32's 23)
_LOW_BIT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def topk_triton(
    scores: torch.Tensor,
    k: int | torch.Tensor | list[int],
    *,
    sorted: bool = True,
    _block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`topk` (same contract). ``_block`` (a power of two) forces the select block size;
    tests use a small one to exercise the streamed path on short rows."""
    rows, ks, kmax, squeeze = _prepare(scores, k, "topk")
    vals, idx = _empty(rows, kmax)
    b, n = rows.shape
    if sorted and kmax > MAX_SORTED_K:
        raise ValueError(
            f"topk: sorted=True handles k <= {MAX_SORTED_K} on the Triton path (got k={kmax}); "
            f"use sorted=False or backend='torch'"
        )
    if b and kmax:
        kern = triton_module("_triton_topk")
        low = _LOW_BIT[rows.dtype]
        mask = -(1 << low)
        block = _block or min(next_power_of_2(n), _MAX_RESIDENT)
        if block & (block - 1):
            raise ValueError(f"topk: _block={block} must be a power of two")
        k32 = ks.to(torch.int32).contiguous()
        sel_vals, sel_idx = (vals, idx) if not sorted or kmax == 1 else _empty(rows, kmax)
        kern.select_kernel[(b,)](
            rows, k32, sel_idx, sel_vals, n, rows.stride(0), rows.stride(1), sel_idx.stride(0),
            MASK=mask, LOW_BIT=low, BLOCK=block, SINGLE=n <= block, num_warps=_warps(block),
        )  # fmt: skip
        if sorted and kmax > 1:
            kb = next_power_of_2(kmax)
            kern.sort_kernel[(b,)](
                rows, k32, sel_idx, idx, vals, rows.stride(0), rows.stride(1), idx.stride(0),
                MASK=mask, KB=kb, num_warps=_warps(kb),
            )  # fmt: skip
    return (vals[0], idx[0]) if squeeze else (vals, idx)


def topk(
    scores: torch.Tensor,
    k: int | torch.Tensor | list[int],
    *,
    sorted: bool = True,
    backend: str = "auto",
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with indices, ties to the lowest index, NaN never selected.

    Args:
        scores: ``[N]`` or ``[B, N]`` float16 / bfloat16 / float32 scores; any strides.
        k: picks per row: an int for every row, or ``B`` ints (list or integer tensor), each in ``[0, N]``
            and at most the row's count of non-NaN scores.
        sorted: ``True``: by value descending, ties ascending index. ``False``: the same picks in
            ascending index order.
        backend: ``"auto" | "torch" | "triton"`` (:func:`~mmcompress.kernels._dispatch.resolve_backend`).

    Returns:
        ``(values, indices)``, each ``[B, max(k)]`` (``[k]`` for 1-D input): values in ``scores.dtype``,
        int64 indices; slots past a row's own ``k`` hold value NaN and index ``-1``.

    Raises:
        TypeError: ``scores`` is not a float16/bfloat16/float32 tensor, or ``k`` is not integral.
        ValueError: wrong rank, ``k`` of the wrong length, ``k < 0``, ``k > N``, or ``k`` above the count
            of non-NaN scores in a row. (Checked on the host, before any launch.)
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"topk: scores must be a torch.Tensor, got {type(scores).__name__}")
    if resolve_backend(backend, scores.device) == "triton":
        return topk_triton(scores, k, sorted=sorted, **kw)
    return topk_torch(scores, k, sorted=sorted)
