"""Bipartite token merging on the GPU: ToMe-style size-weighted merge and AIM's plain-mean merge (Triton).

Both are one algorithm (ToMe, Bolya et al., ICLR 2023, ``bipartite_soft_matching``; AIM, ICCV 2025,
``token_merge.py``; spec ``divprune-aim-zipvl-kvquant.md`` §2.2), whose plain-torch reference is
:func:`mmcompress.kernels.merge.aim_merge_step_torch`. One step on ``T`` tokens of a frame:

1. sources A = positions 0, 2, 4, …; destinations B = 1, 3, 5, …; cosine scores ``Â B̂ᵀ`` of the
   L2-normalised metric, in the input dtype;
2. every source's best destination (lowest index on ties) and best score;
3. sources ranked by best score, descending, ties to the lower source (a stable sort); the first ``r``
   are merged into their destinations ("top-r edges");
4. each destination becomes the mean of itself and its sources: plain (AIM, ``weighting="unweighted"``)
   or weighted by how many original tokens each holds (ToMe, ``weighting="size"``);
5. output = ``[unmerged sources in rank order] + [destinations in order]``, plus the maps: ``slot``
   (the output every input went to: the source→target map) and ``anchor`` (the input each output
   continues, i.e. the positions that can be drawn as kept).

The Triton path (kernels in ``_triton_merge.py``) never stores the score matrix: a matching kernel keeps
the running best per source over destination tiles, the ranking is :func:`~.topk.topk_triton`, and the
merge is a gather per output (no atomics, so it is deterministic). Scores are rounded to the input dtype
before they are compared, as the reference's matmul in that dtype does; their fp32 sums run in another
order, so the two paths agree exactly unless two candidate scores are within rounding of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._dispatch import check_float, next_power_of_2, resolve_backend, triton_module
from .merge import WEIGHTINGS, AimMergeResult, aim_merge_step_torch, run_merge_schedule
from .topk import topk_triton

__all__ = [
    "TomeMerge",
    "tome_merge",
    "tome_merge_torch",
    "tome_merge_triton",
    "merge_step_triton",
    "aim_merge_triton",
]

_TL_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class TomeMerge(NamedTuple):
    """One ToMe-style merge step on ``F`` frames, ``T`` tokens -> ``T - r``.

    Attributes:
        features: ``[F, T - r, C]`` merged tokens (x's dtype): unmerged sources in rank order, then
            destinations in order.
        sizes: ``[F, T - r]`` int64 original tokens held by each output.
        slot: ``[F, T]`` int64 output index of every input token (source -> target map).
        anchor: ``[F, T - r]`` int64 input index each output continues (distinct, its kept position).
    """

    features: torch.Tensor
    sizes: torch.Tensor
    slot: torch.Tensor
    anchor: torch.Tensor


def _check_metric(m: torch.Tensor, op: str) -> None:
    """The kernels compare scores with ``>``: a NaN (non-finite input or a zero-norm row) would not win
    as it does in ``torch.max``, so refuse it instead of silently differing from the reference."""
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{op}: the metric contains NaN or inf")
    if m.shape[-1] == 0 or bool((m.norm(dim=-1) == 0).any()):
        raise ValueError(f"{op}: the metric has a zero-norm token; its cosine score is undefined")


def merge_step_triton(
    x: torch.Tensor,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    weighting: str = "unweighted",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Triton version of :func:`~mmcompress.kernels.merge.aim_merge_step_torch` (same arguments, same
    return tuple ``(x_out, metric_out, sizes_out, slot, anchor, r_eff)``; ``r`` is clamped to ``T // 2``).

    ``x`` / ``metric``: ``[F, T, C]`` float16 / bfloat16 / float32 with a finite, nowhere-zero metric.
    """
    op = "merge_step"
    check_float(x, "x", op)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [F, T, C], got shape {tuple(x.shape)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{op}: weighting={weighting!r} is not allowed; choose one of {WEIGHTINGS}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"{op}: r={r!r} must be an int >= 0")
    nf, t, c = x.shape
    dev = x.device
    if metric is not None:
        check_float(metric, "metric", op)
        if metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"{op}: metric must be [F, T, C'] with the F, T of x {tuple(x.shape[:2])}, "
                f"got shape {tuple(metric.shape)}"
            )
    if sizes is None:
        sizes = torch.ones(nf, t, dtype=torch.long, device=dev)
    elif sizes.shape != (nf, t) or sizes.dtype != torch.long:
        raise ValueError(
            f"{op}: sizes must be int64 [F, T] = [{nf}, {t}], got {sizes.dtype} {tuple(sizes.shape)}"
        )
    r = min(r, t // 2)
    if r <= 0 or nf == 0:
        ar = torch.arange(t, device=dev).expand(nf, t)
        return x, metric, sizes, ar.clone(), ar.clone(), 0

    m = x if metric is None else metric
    _check_metric(m, op)
    kern = triton_module("_triton_merge")
    with torch.no_grad():
        mn = m / m.norm(dim=-1, keepdim=True)  # the reference's expression, in the input dtype
    n_a, n_b, cm = (t + 1) // 2, t // 2, mn.shape[-1]
    n_unm, t_out = n_a - r, t - r
    best_v = torch.empty(nf, n_a, dtype=torch.float32, device=dev)
    best_i = torch.empty(nf, n_a, dtype=torch.long, device=dev)
    ba = 32
    kern.match_kernel[(nf, -(-n_a // ba))](
        mn, best_v, best_i, n_a, n_b, cm, mn.stride(0), mn.stride(1), mn.stride(2),
        SCORE_DTYPE=getattr(kern.tl, _TL_DTYPE[mn.dtype]), BLOCK_A=ba, BLOCK_B=32,
        BLOCK_D=max(16, min(next_power_of_2(cm), 64)),
    )  # fmt: skip
    # the full ranking: unmerged sources keep their rank order in the output
    _, rank = topk_triton(best_v, n_a, sorted=True)
    slot = torch.empty(nf, t, dtype=torch.long, device=dev)
    anchor = torch.empty(nf, t_out, dtype=torch.long, device=dev)
    bp = min(next_power_of_2(n_a), 1024)
    kern.plan_kernel[(nf, -(-n_a // bp))](rank, best_i, slot, anchor, t, n_a, n_b, r, t_out, BLOCK=bp)
    sizes = sizes.contiguous()
    sizes_out = torch.empty(nf, t_out, dtype=torch.long, device=dev)

    def reduce(v: torch.Tensor) -> torch.Tensor:
        cv = v.shape[-1]
        out = torch.empty(nf, t_out, cv, dtype=v.dtype, device=dev)
        bc = min(next_power_of_2(cv), 512)
        kern.reduce_kernel[(nf, t_out, -(-cv // bc))](
            v, sizes, slot, anchor, out, sizes_out, t, n_a, n_unm, t_out, cv,
            v.stride(0), v.stride(1), v.stride(2),
            WEIGHTED=weighting == "size", SCAN=256, SUB=16, BLOCK_C=bc,
        )  # fmt: skip
        return out

    x_out = reduce(x)
    metric_out = None if metric is None else reduce(metric)
    return x_out, metric_out, sizes_out, slot, anchor, r


def aim_merge_triton(
    x: torch.Tensor,
    r_list: Sequence[int],
    *,
    metric: torch.Tensor | None = None,
    weighting: str = "unweighted",
) -> AimMergeResult:
    """Triton version of :func:`~mmcompress.kernels.merge.aim_merge_torch` (same contract and result;
    float16 / bfloat16 / float32 only, and a NaN / zero-norm metric raises instead of propagating)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"aim_merge: x must be a torch.Tensor, got {type(x).__name__}")
    check_float(x, "x", "aim_merge")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
        metric = None if metric is None else metric.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"aim_merge: x must be [T, D] or [F, T, D], got shape {tuple(x.shape)}")
    for r in r_list:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"aim_merge: every reduction in r_list must be an int >= 0, got {list(r_list)}")
    return run_merge_schedule(x, r_list, metric, weighting, squeeze, merge_step_triton)


def _tome_args(x: torch.Tensor, r: int, metric: torch.Tensor | None, sizes: torch.Tensor | None):
    """Shared validation of :func:`tome_merge`; returns ``[F, T, C]`` views and whether to squeeze."""
    check_float(x, "x", "tome_merge")
    if x.dim() not in (2, 3):
        raise ValueError(f"tome_merge: x must be [T, C] or [F, T, C], got shape {tuple(x.shape)}")
    squeeze = x.dim() == 2
    t = x.shape[-2]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= t // 2:
        raise ValueError(f"tome_merge: r={r!r} must be an int in [0, T // 2 = {t // 2}]")
    if squeeze:
        x = x.unsqueeze(0)
        metric = None if metric is None else metric.unsqueeze(0)
        sizes = None if sizes is None else sizes.unsqueeze(0)
    if metric is not None:
        check_float(metric, "metric", "tome_merge")
        if metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"tome_merge: metric must match x's leading shape {tuple(x.shape[:-1])}, "
                f"got {tuple(metric.shape)}"
            )
    if sizes is not None:
        if not isinstance(sizes, torch.Tensor) or sizes.dtype != torch.long:
            raise TypeError(
                f"tome_merge: sizes must be an int64 tensor, got {getattr(sizes, 'dtype', sizes)}"
            )
        if sizes.shape != x.shape[:2]:
            raise ValueError(f"tome_merge: sizes must be {tuple(x.shape[:-1])}, got {tuple(sizes.shape)}")
        if bool((sizes < 1).any()):
            raise ValueError("tome_merge: sizes must be >= 1 (each token holds at least itself)")
    return x, metric, sizes, squeeze


def _tome_out(out: tuple, squeeze: bool) -> TomeMerge:
    x_out, _, sizes, slot, anchor, _ = out
    res = TomeMerge(x_out, sizes, slot, anchor)
    return TomeMerge(*(v[0] for v in res)) if squeeze else res


def tome_merge_torch(
    x: torch.Tensor, r: int, *, metric: torch.Tensor | None = None, sizes: torch.Tensor | None = None
) -> TomeMerge:
    """Reference for :func:`tome_merge`: the AIM step of :mod:`.merge` with size weights."""
    x, metric, sizes, squeeze = _tome_args(x, r, metric, sizes)
    return _tome_out(aim_merge_step_torch(x, r, metric=metric, sizes=sizes, weighting="size"), squeeze)


def tome_merge_triton(
    x: torch.Tensor, r: int, *, metric: torch.Tensor | None = None, sizes: torch.Tensor | None = None
) -> TomeMerge:
    """Triton :func:`tome_merge`."""
    x, metric, sizes, squeeze = _tome_args(x, r, metric, sizes)
    return _tome_out(merge_step_triton(x, r, metric=metric, sizes=sizes, weighting="size"), squeeze)


def tome_merge(
    x: torch.Tensor,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    backend: str = "auto",
) -> TomeMerge:
    """One ToMe-style bipartite merge step: remove ``r`` tokens per frame by size-weighted averaging.

    Args:
        x: ``[T, C]`` or ``[F, T, C]`` float16 / bfloat16 / float32 tokens (frames merge independently).
        r: tokens to remove per frame, ``0 <= r <= T // 2`` (ToMe clamps silently; here it is an error).
        metric: matching metric ``[.., T, C']`` (ToMe: the attention keys); default ``x``.
        sizes: int64 ``[.., T]`` original tokens held by each input (from an earlier step); default 1.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        :class:`TomeMerge`. ToMe's class-token protection is not offered (visual tokens have none).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tome_merge: x must be a torch.Tensor, got {type(x).__name__}")
    if resolve_backend(backend, x.device) == "triton":
        return tome_merge_triton(x, r, metric=metric, sizes=sizes)
    return tome_merge_torch(x, r, metric=metric, sizes=sizes)
