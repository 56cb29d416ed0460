"""AIM's iterative bipartite token merging, plain-torch reference.

AIM (Zhong, Liu, Li, Wang, ICCV 2025, arXiv 2412.03248; official code LaVi-Lab/AIM @ edc24e9,
``llava/model/token_merge.py``; spec ``divprune-aim-zipvl-kvquant.md`` §2.2) merges the visual tokens of
every frame (batch row) independently, in steps. One step on ``T`` tokens with requested reduction ``r``:

1. ``r_eff = min(r, T // 2)``;
2. the metric rows are L2-normalised; **sources** A are the tokens at positions 0, 2, 4, … of the
   *current* order, **destinations** B those at 1, 3, 5, …; ``S = Â B̂ᵀ`` (cosine, in the input dtype);
3. every source takes its best destination (``max`` over B: the lowest B index on ties) and its best score;
4. sources are ranked by best score, descending; the first ``r_eff`` are merged into their destinations,
   the others stay;
5. each destination becomes the mean of itself and the sources merged into it — officially the plain
   (unweighted) mean, ``scatter_reduce(..., "mean")`` with the destination included, so a destination
   that absorbed n tokens in an earlier step counts once (golden README quirk 9);
6. output = ``[unmerged sources in ranked order] + [all destinations in their original order]``, length
   ``T - r_eff``; the next step re-splits this order by parity (quirk 12: the raster order is lost as
   soon as a source stays unmerged).

Beyond the official function this reference also returns where every token went (``slot``), which
step-input token each output continues (``anchor``: the unmerged source itself, or the destination the
others were averaged into) and how many original tokens each output stands for (``sizes``), and offers
``weighting="size"``: a size-weighted mean (ToMe's rule), so every output is exactly the plain mean of
the original tokens it holds.

Choices where the official code leaves something open:

* Source ranking uses a **stable** descending sort (ties: lower source index first). The official
  ``argsort`` is unstable, so which of several equally scored sources merge is unspecified there when
  ``r_eff`` is smaller than the number of sources (quirk 13); everywhere else the two agree.
* ``r_eff <= 0`` (``T <= 1`` or ``r = 0``) is a no-op step; the official function returns ``None``,
  which its callers would crash on.

The Triton kernel will live beside this reference; until it lands, ``backend="auto"`` runs this
reference everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._dispatch import resolve_backend

__all__ = ["WEIGHTINGS", "AimMergeResult", "aim_merge_step_torch", "aim_merge_torch", "aim_merge"]

#: accepted ``weighting`` values: the official plain mean, or the size-weighted mean
WEIGHTINGS: tuple[str, ...] = ("unweighted", "size")


@dataclass
class AimMergeResult:
    """Output of :func:`aim_merge_torch` for ``F`` frames of ``T0`` tokens merged down to ``T`` tokens.

    Attributes:
        features: ``[F, T, D]`` merged tokens in the official output order, ``x``'s dtype.
        metric: ``[F, T, C]`` the separately given metric after the same merges, or ``None`` when the
            features were their own metric.
        sizes: ``[F, T]`` int64, original tokens held by each output token (sums to ``T0`` per frame).
        slot: ``[F, T0]`` int64, output slot of every original token.
        anchor: ``[F, T]`` int64, original index of the token each output slot continues (distinct per frame).
        step_slots: per step ``[F, T_in]``: output slot of every step-input token.
        step_anchors: per step ``[F, T_out]``: step-input index of the token each output slot continues.
        r_effective: per step, the reduction actually applied (``min(r, T_in // 2)``, 0 for a no-op).
    """

    features: torch.Tensor
    metric: torch.Tensor | None
    sizes: torch.Tensor
    slot: torch.Tensor
    anchor: torch.Tensor
    step_slots: list[torch.Tensor] = field(default_factory=list)
    step_anchors: list[torch.Tensor] = field(default_factory=list)
    r_effective: list[int] = field(default_factory=list)


def _weighted_into(
    dst: torch.Tensor, dst_size: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, src_size: torch.Tensor
) -> torch.Tensor:
    """Size-weighted mean of each destination and the sources scattered into it, accumulated in fp32
    (fp64 for fp64 input) and cast back: fp16 sums of many tokens would lose the small ones."""
    c = dst.shape[-1]
    acc = torch.promote_types(dst.dtype, torch.float32)
    w_dst = dst_size.to(acc)[..., None]
    w_src = src_size.to(acc)[..., None]
    num = (dst.to(acc) * w_dst).scatter_add(-2, idx[..., None].expand(-1, -1, c), src.to(acc) * w_src)
    den = w_dst.scatter_add(-2, idx[..., None], w_src)
    return (num / den).to(dst.dtype)


def aim_merge_step_torch(
    x: torch.Tensor,
    r: int,
    *,
    metric: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    weighting: str = "unweighted",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One official merge step (module docstring, steps 1-6) on a batch of frames.

    Args:
        x: ``[F, T, D]`` tokens in their current order.
        r: requested reduction (``>= 0``); ``min(r, T // 2)`` is applied.
        metric: ``[F, T, C]`` matching metric, merged alongside ``x`` with the same matching (the
            official LLaVA-1.5 path calls the function a second time on the metric); ``None``: ``x``.
        sizes: ``[F, T]`` int64 original tokens per input token (``None``: all 1).
        weighting: ``"unweighted"`` (official plain mean) or ``"size"`` (weights = ``sizes``).

    Returns:
        ``(x_out [F, T-r_eff, D], metric_out or None, sizes_out, slot [F, T], anchor [F, T-r_eff], r_eff)``.
    """
    nf, t, _ = x.shape
    dev = x.device
    if sizes is None:
        sizes = torch.ones(nf, t, dtype=torch.long, device=dev)
    r = min(int(r), t // 2)
    if r <= 0:
        ar = torch.arange(t, device=dev).expand(nf, t)
        return x, metric, sizes, ar.clone(), ar.clone(), 0

    m = x if metric is None else metric
    with torch.no_grad():
        mn = m / m.norm(dim=-1, keepdim=True)  # in the input dtype, as officially
        scores = mn[:, ::2] @ mn[:, 1::2].transpose(-1, -2)  # [F, n_a, n_b]: row = source, col = destination
        node_max, node_idx = scores.max(dim=-1)  # best destination per source (lowest index on ties)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices  # ranked sources
    n_a, n_b = edge_idx.shape[-1], t // 2
    n_unm = n_a - r
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx.gather(-1, src_idx)  # destination of every merged source (repeats allowed)

    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    size_src = size_a.gather(-1, src_idx)

    def merge(t_in: torch.Tensor) -> torch.Tensor:
        c = t_in.shape[-1]
        src, dst = t_in[:, ::2], t_in[:, 1::2]
        unm = src.gather(-2, unm_idx[..., None].expand(-1, -1, c))
        moved = src.gather(-2, src_idx[..., None].expand(-1, -1, c))
        if weighting == "unweighted":
            # the official call: mean over {destination} ∪ {its sources}, scattered in index order on CPU
            dst = dst.scatter_reduce(-2, dst_idx[..., None].expand(-1, -1, c), moved, reduce="mean")
        else:
            dst = _weighted_into(dst, size_b, dst_idx, moved, size_src)
        return torch.cat([unm, dst], dim=-2)

    x_out = merge(x)
    metric_out = None if metric is None else merge(metric)
    sizes_out = torch.cat([size_a.gather(-1, unm_idx), size_b.scatter_add(-1, dst_idx, size_src)], dim=-1)

    # maps: unmerged source ranked u -> slot u; merged source -> slot of its destination; destination b ->
    # slot n_unm + b
    slot_a = torch.empty(nf, n_a, dtype=torch.long, device=dev)
    slot_a.scatter_(-1, unm_idx, torch.arange(n_unm, device=dev).expand(nf, n_unm))
    slot_a.scatter_(-1, src_idx, n_unm + dst_idx)
    slot = torch.empty(nf, t, dtype=torch.long, device=dev)
    slot[:, ::2] = slot_a
    slot[:, 1::2] = n_unm + torch.arange(n_b, device=dev)
    anchor = torch.cat([2 * unm_idx, (2 * torch.arange(n_b, device=dev) + 1).expand(nf, n_b)], dim=-1)
    return x_out, metric_out, sizes_out, slot, anchor, r


def aim_merge_torch(
    x: torch.Tensor,
    r_list: Sequence[int],
    *,
    metric: torch.Tensor | None = None,
    weighting: str = "unweighted",
) -> AimMergeResult:
    """AIM's iterative merge: the official step applied once per entry of ``r_list`` (spec §2.2).

    Args:
        x: ``[F, T0, D]`` (or ``[T0, D]`` for one frame) tokens in raster order, any float dtype; every
            step computes in this dtype, as officially (fp16 in the official model).
        r_list: requested reduction of each step, e.g. ``[98, 49]`` (LLaVA-OV video, 196 → 98 → 49) or
            ``[288, 36]`` (LLaVA-1.5, 576 → 288 → 252).
        metric: optional separate matching metric ``[F, T0, C]`` (LLaVA-1.5: CLIP layer-23 keys), merged
            with the same matching at every step; ``None`` (LLaVA-OV): the features are the metric.
        weighting: ``"unweighted"`` (official) or ``"size"`` (size-weighted means).

    Returns:
        :class:`AimMergeResult` (squeezed back to ``[T, D]`` etc. when ``x`` was 2-D).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
        metric = None if metric is None else metric.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"aim_merge: x must be [T, D] or [F, T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"aim_merge: x must be a float tensor, got {x.dtype}")
    if metric is not None and (metric.dim() != 3 or metric.shape[:2] != x.shape[:2]):
        raise ValueError(
            f"aim_merge: metric must be [F, T, C] with the F, T of x {tuple(x.shape[:2])}, "
            f"got shape {tuple(metric.shape)}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"aim_merge: weighting={weighting!r} is not allowed; choose one of {WEIGHTINGS}")
    for r in r_list:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"aim_merge: every reduction in r_list must be an int >= 0, got {list(r_list)}")

    return run_merge_schedule(x, r_list, metric, weighting, squeeze, aim_merge_step_torch)


def aim_merge(
    x: torch.Tensor,
    r_list: Sequence[int],
    *,
    metric: torch.Tensor | None = None,
    weighting: str = "unweighted",
    backend: str = "auto",
) -> AimMergeResult:
    """Dispatching entry point: same contract as :func:`aim_merge_torch`.

    ``backend="auto"`` runs the Triton kernel (:func:`~mmcompress.kernels.merge_triton.aim_merge_triton`,
    same contract, checked against this reference through the interpreter) on CUDA when Triton imports,
    the torch reference otherwise.
    """
    if resolve_backend(backend, x.device) == "triton":
        from .merge_triton import aim_merge_triton

        return aim_merge_triton(x, r_list, metric=metric, weighting=weighting)
    return aim_merge_torch(x, r_list, metric=metric, weighting=weighting)


def run_merge_schedule(x, r_list, metric, weighting, squeeze, step) -> AimMergeResult:
    """Apply ``step`` (the torch reference or the Triton kernel: same contract) once per reduction in
    ``r_list`` on validated ``[F, T, D]`` inputs, composing the per-step maps into original -> output
    slot and output slot -> original anchor maps; ``squeeze`` drops the frame axis again."""
    nf, t0, _ = x.shape
    dev = x.device
    sizes = torch.ones(nf, t0, dtype=torch.long, device=dev)
    slot = torch.arange(t0, device=dev).expand(nf, t0).clone()
    anchor = slot.clone()
    res = AimMergeResult(x, metric, sizes, slot, anchor)
    for r in r_list:
        x, metric, sizes, s_slot, s_anchor, r_eff = step(
            x, r, metric=metric, sizes=sizes, weighting=weighting
        )
        res.step_slots.append(s_slot)
        res.step_anchors.append(s_anchor)
        res.r_effective.append(r_eff)
        slot = s_slot.gather(-1, slot)  # original -> this step's output slot
        anchor = anchor.gather(-1, s_anchor)  # output slot -> original index
    res.features, res.metric, res.sizes, res.slot, res.anchor = x, metric, sizes, slot, anchor
    if squeeze:
        res.features, res.sizes, res.slot, res.anchor = (
            res.features[0],
            res.sizes[0],
            res.slot[0],
            res.anchor[0],
        )
        res.metric = None if res.metric is None else res.metric[0]
        res.step_slots = [s[0] for s in res.step_slots]
        res.step_anchors = [a[0] for a in res.step_anchors]
    return res
