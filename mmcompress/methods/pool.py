"""Spatial average pooling: the downsampling baseline.

Every grid view of an image (the single view, or the AnyRes thumbnail and the crops view) is average-
pooled to a smaller grid whose size follows the budget. It is the "just use fewer, coarser patches"
baseline that token-pruning papers compare against (LLaVA-OneVision pools video frames 2×2 the same way).

Windows. Output cell ``(i, j)`` of an ``r × c`` grid pooled from ``R × C`` averages input rows
``[⌊iR/r⌋, ⌊(i+1)R/r⌋)`` and columns ``[⌊jC/c⌋, ⌊(j+1)C/c⌋)``. When ``r`` divides ``R`` and ``c`` divides
``C`` these are exactly ``adaptive_avg_pool2d``'s windows (24×24 → 12×12, 8×8, 6×6). For uneven sizes
``adaptive_avg_pool2d`` uses the end ``⌈(i+1)R/r⌉``, so its windows overlap; here they partition the grid
instead (sizes ⌊R/r⌋ or ⌈R/r⌉), so every input token goes to exactly one output token and
``Selection.groups`` / ``weights`` describe a true merge.

Positions. A pooled token takes the packed index (the RoPE slot) of the cell nearest its window's centre
(for an even window side, the upper / left of the two central cells). A centre cell keeps the pooled
token where its content is: relative positions between pooled tokens stay those of the window centres,
whereas a top-left rule would shift every token by half a window toward the origin (for M-RoPE models
that is a visible spatial bias). Centres increase with ``(i, j)``, so row-major output order is also
ascending packed order.

Newlines. LLaVA-NeXT's per-row ``image_newline`` tokens are not image content, so they are excluded from
the windows and dropped (``groups == -1``): a pooled row is not the original row, so the separators would
sit at meaningless places. Budgets count them, like every method's (``keep`` is per image, all tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_choice, check_keep, resolve_keep
from ..registry import register
from ..tokens import Selection, VisualTokens

__all__ = ["Pool", "split_budget", "pool_shape", "pool_windows", "pool_grid"]

_MODES = ("avg",)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Spread ``k`` tokens over views in proportion to ``sizes`` (their grid tokens).

    Largest-remainder apportionment in exact integer arithmetic (ties → the earlier view), so the
    budgets sum to ``k``; each is then at least 1 (a view is never emptied, so with fewer tokens than
    views the total exceeds ``k``) and at most the view's size.
    """
    total = sum(sizes)
    if total <= 0:
        raise ValueError(f"split_budget: sizes must have a positive total, got {sizes}")
    base = [k * s // total for s in sizes]
    rem = [k * s % total for s in sizes]
    left = k - sum(base)
    for v in sorted(range(len(sizes)), key=lambda v: (-rem[v], v))[:left]:
        base[v] += 1
    return [min(s, max(1, b)) for b, s in zip(base, sizes, strict=True)]


def pool_shape(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """Output grid ``(r, c)`` for pooling ``rows × cols`` to at most ``budget`` tokens.

    Both sides are scaled by the same factor ``s = √(budget / (rows·cols))`` (so the aspect ratio is kept as
    well as integers allow); among the floor/ceil roundings of ``rows·s`` and ``cols·s`` (clamped to
    ``[1, rows]``, ``[1, cols]``) that fit ``r·c <= budget`` take the one with most tokens, then the
    smallest aspect error, then fewer rows. Always at least 1×1. Examples: 24×24 at 144 → 12×12;
    6×7 at 10 → 3×3; a budget >= rows·cols → the grid itself.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"pool_shape: grid must be at least 1x1, got {rows}x{cols}")
    budget = max(1, min(int(budget), rows * cols))
    s = math.sqrt(budget / (rows * cols))
    r_opts = {min(rows, max(1, f(rows * s))) for f in (math.floor, math.ceil)}
    c_opts = {min(cols, max(1, f(cols * s))) for f in (math.floor, math.ceil)}
    fits = [(r, c) for r in r_opts for c in c_opts if r * c <= budget] or [(1, 1)]
    target = math.log(rows / cols)

    def rank(rc: tuple[int, int]) -> tuple:
        # rounded so that mirror-image errors (12x11 vs 11x12 on a square) tie and fewer rows wins
        return -rc[0] * rc[1], round(abs(math.log(rc[0] / rc[1]) - target), 9), rc[0]

    return min(fits, key=rank)


def pool_windows(size: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition ``size`` input positions into ``out`` windows along one axis.

    Returns:
        ``bins [size]``: window of every input position; ``centre [out]``: the input position nearest
        each window's centre (the lower one for an even window).
    """
    starts = torch.arange(out + 1) * size // out  # [out + 1]; starts[-1] == size
    bins = torch.bucketize(torch.arange(size), starts[1:], right=True)
    centre = (starts[:-1] + starts[1:] - 1) // 2
    return bins, centre


def pool_grid(grid: torch.Tensor, out_rows: int, out_cols: int) -> tuple[torch.Tensor, ...]:
    """Average-pool a ``[R, C, D]`` grid to ``out_rows × out_cols`` windows (module docstring).

    Returns:
        ``features [r·c, D]``: window means in row-major output order (summed in fp32, cast back to
        ``grid.dtype``); ``reps [r·c]``: row-major index into the ``R × C`` grid of each window's centre
        cell, ascending; ``window [R, C]``: output slot of every input cell; ``sizes [r·c]``: cells per
        window. Index tensors are int64 on CPU.
    """
    if grid.dim() != 3:
        raise ValueError(f"pool_grid: grid must be [rows, cols, D], got shape {tuple(grid.shape)}")
    R, C, D = grid.shape
    if not (1 <= out_rows <= R and 1 <= out_cols <= C):
        raise ValueError(f"pool_grid: output {out_rows}x{out_cols} must be within 1x1..{R}x{C}")
    rbin, rc = pool_windows(R, out_rows)
    cbin, cc = pool_windows(C, out_cols)
    window = rbin[:, None] * out_cols + cbin[None, :]  # [R, C]
    reps = (rc[:, None] * C + cc[None, :]).flatten()
    nwin = out_rows * out_cols
    sizes = torch.bincount(window.flatten(), minlength=nwin)
    sums = torch.zeros(nwin, D, dtype=torch.float32, device=grid.device)
    sums.index_add_(0, window.flatten().to(grid.device), grid.reshape(R * C, D).float())
    features = (sums / sizes.to(grid.device, torch.float32)[:, None]).to(grid.dtype)
    return features, reps, window, sizes


@register
@dataclasses.dataclass(frozen=True)
class Pool(PreLLMMethod):
    """Average-pool each grid view down to about ``keep`` tokens per image (module docstring).

    The image's budget ``K`` (``keep`` resolved against all its N tokens) is split over views in
    proportion to their grid tokens (:func:`split_budget`); each view is pooled to the grid of
    :func:`pool_shape`, so the output has at most ``K`` tokens (at least one per view).

    Attributes:
        keep: tokens per image (int) or fraction (float in (0, 1]).
        mode: ``"avg"`` (window mean).
    """

    name: ClassVar[str] = "pool"
    summary: ClassVar[str] = "spatial average pooling of each view to the budget (downsampling baseline)"

    keep: int | float = 0.25
    mode: str = "avg"

    def validate(self) -> None:
        check_keep(self.keep)
        check_choice(self.mode, "mode", _MODES)

    def select(self, tokens: VisualTokens) -> Selection:
        x = tokens.features
        views = tokens.layout.views
        k = resolve_keep(self.keep, tokens.num_tokens)
        budgets = split_budget(k, [v.rows * v.cols for v in views])
        groups = torch.full((tokens.num_tokens,), -1, dtype=torch.long)
        indices, feats, weights = [], [], []
        slot = 0
        for view, budget in zip(views, budgets, strict=True):
            cells = view.grid_indices()  # [R, C] packed indices, newlines excluded
            r, c = pool_shape(view.rows, view.cols, budget)
            f, reps, window, sizes = pool_grid(x[cells.to(x.device)], r, c)
            flat = cells.flatten()
            indices.append(flat[reps])
            groups[flat] = window.flatten() + slot
            feats.append(f)
            weights.append(sizes)
            slot += r * c
        dev = x.device
        return Selection(
            indices=torch.cat(indices).to(dev),
            features=torch.cat(feats),
            weights=torch.cat(weights).to(dev),
            groups=groups.to(dev),
        )
