"""FoPru (Focal Pruning): keep the visual tokens the vision encoder attends to most.

"FoPru: Focal Pruning for Efficient Large Vision-Language Models", arXiv 2411.14164. The paper links no
code; the closest public implementation is ``dongxianzhe/hydrainfer`` @ d4d5f4f
(``hydrainfer/layer/token_prunning.py``: the function ``focal_prunning`` and the older module
``FocalPrunning``), by a group sharing three authors with the paper.
Spec: ``specs/hired-globalcom2-fopru.md`` §3.

Three stages (spec §3.1-3.2), training-free, before the LLM:

1. **Significance** per token from the attention of the vision layer whose output the LLM sees
   (``vision_feature_layer=-2`` → ``layer=-2``), heads averaged.
2. **Pruning**: ``strategy="rank"`` keeps the K most significant tokens; ``strategy="row"`` sums the
   significance over each grid row and keeps whole rows (contiguous regions).
3. **Reordering**: kept tokens go back to their original (raster) order.

Significance, official vs here:

* HydraInfer gets the full patch-to-patch **pre-softmax logits** ``(q/√d)·k`` (CLS row and column
  removed), averages the heads, and takes the column means (attention *received*) or the row means
  (attention *given*), whichever has the larger variance (strict ``>``; on a tie the function takes the
  row means, the module the column means). :func:`fopru_significance` implements exactly that for a
  logit matrix (golden-vector parity).
* ``significance="logits"`` (HydraInfer), the method reads the adapter's
  ``VitAttention(layer, "received_logits")`` and ``"given_logits"`` signals: per head, exactly the column
  and row means of the patch-to-patch logit block, computed by a probe as dot products with the mean
  patch query / key (``O(T·C)``, SDPA stays on, no ``T×T`` map). Heads averaged (the mean is linear, so
  this equals averaging the matrix first), then the official variance rule (function tie rule: row
  means win a tie). Only the summation order differs from the official matrix means (fp32 rounding).
* ``significance="received"`` (default): softmax attention received instead
  (``VitAttention(layer, "received")``, the mean over all queries) — the paper's wording "attention" read
  as probabilities (spec §3.4 pitfall 2); the variance rule is then moot (row means of probabilities are
  nearly flat, spec §3.2 step 1), so it ranks by it directly.

Why the default is not HydraInfer's logits: a column (row) mean of pre-softmax logits is a dot product
with the *mean* query (key), i.e. similarity to the average patch, so it ranks the majority content —
on images with a large uniform background, the background — highest. Measured on the embedded
``shapes-llava`` (40 ShapesVQA test images, keep 0.25): "logits" kept 0 % of the object patches,
"received" 42 % (random 25 %, HiRED 99.8 %); ShapesVQA accuracy at n=500 and keep 0.5 / 0.25 / 0.11:
"logits" 0.318 / 0.316 / 0.318, "received" 0.504 / 0.496 / 0.514, random 0.494 / 0.450 / 0.386
(``evals/results/compare_all_shapes-llava_n500.json``). ``significance="logits"`` remains for parity
with HydraInfer.
  The patch columns are the last ``rows·cols`` of a signal (CLS / register columns before them dropped).

Ties: ranking uses a stable descending sort, so equal scores keep the lower index first (deterministic
on every device). The official ``torch.sort`` is not stable; its tie order follows no index rule
(golden README §6).

Budget (``keep``), per image:

* a float is a ratio shared by every view: ``floor(n·keep)`` tokens of an ``n``-token view ("rank") or
  ``floor(rows·keep)`` rows ("row"), as the official module computes it (at least 1);
* an int is a token count for the whole image, spread over views in proportion to their grid tokens
  (largest remainder, at least 1 per view); "row" keeps ``max(1, k_v // cols)`` rows of view ``v``.

Layouts. Single view (LLaVA-1.5): one grid, exactly the official setting. LLaVA-NeXT AnyRes (not in any
official code; spec §3.2 last paragraph): the thumbnail is one view; the crops view is scored on the
stitched, unpadded grid the LLM sees (each crop's own significance, placed where its tokens sit), and
"rank" / "row" run on that grid as a whole (rows are the LLM's rows, across all crops of a tile row).
``newlines="keep"`` (default) keeps the ``image_newline`` token of every crops row that keeps at least
one token, so the LLM still sees row breaks between the surviving rows; ``"drop"`` removes them all.
Newlines are layout markers, not image content: they are not counted in ``keep``. A CLS visual token
(``vision_feature_select_strategy="full"``) is always kept and not counted either. Video layouts
(``frame<i>`` views) are handled like the thumbnail, one view per frame.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_choice, check_int, check_keep, resolve_keep
from ..registry import register
from ..signals import VitAttention
from ..tokens import GridView, Selection, VisualTokens
from .pool import split_budget

__all__ = [
    "FoPru",
    "fopru_significance",
    "fopru_keep_count",
    "fopru_rank",
    "fopru_rows",
    "STRATEGIES",
]

STRATEGIES: tuple[str, ...] = ("rank", "row")
_NEWLINES = ("keep", "drop")
_TIE_PREFER = ("row", "col")
SIGNIFICANCE: tuple[str, ...] = ("logits", "received")


def fopru_significance(scores: torch.Tensor, *, tie: str = "row") -> tuple[torch.Tensor, str]:
    """Official significance of a patch-to-patch attention-logit matrix (spec §3.2 step 1).

    Args:
        scores: ``[n, n]`` or ``[heads, n, n]`` pre-softmax logits, rows = queries, columns = keys, CLS
            row and column already removed. Computed on in its own dtype (the official code got fp32).
        tie: which candidate wins an exact variance tie: ``"row"`` (the maintained function
            ``focal_prunning``) or ``"col"`` (the older ``FocalPrunning`` module).

    Returns:
        ``(significance [n], "col" | "row")``: heads averaged, then the column means (attention
        received, mean over queries) if their variance is strictly larger than that of the row means
        (attention given, mean over keys), else the row means; ``tie`` decides equality.
    """
    if scores.dim() not in (2, 3) or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"fopru: scores must be [n, n] or [heads, n, n], got shape {tuple(scores.shape)}")
    check_choice(tie, "tie", _TIE_PREFER)
    a = scores.mean(dim=0) if scores.dim() == 3 else scores
    col, row = a.mean(dim=0), a.mean(dim=1)
    v_col, v_row = torch.var(col).item(), torch.var(row).item()  # unbiased, as torch.var's default
    if v_col > v_row or (v_col == v_row and tie == "col"):
        return col, "col"
    return row, "row"


def fopru_keep_count(keep: int | float, n: int) -> int:
    """Tokens (or rows) kept out of ``n``: a float ratio gives ``floor(n·keep)`` as the official module
    (``math.floor(n_tokens * ratio)``), at least 1; an int is a count (``<= n``)."""
    if isinstance(keep, float):
        return max(1, math.floor(n * keep))
    return resolve_keep(keep, n)


def fopru_rank(sig: torch.Tensor, k: int, *, reorder: bool = True) -> torch.Tensor:
    """ "rank": the ``k`` most significant of ``sig [n]`` (spec §3.2 step 2).

    Returns ``[k]`` int64 indices, ascending when ``reorder`` (the official final order), else in
    descending significance (equal scores: lower index first).
    """
    if sig.dim() != 1:
        raise ValueError(f"fopru: significance must be 1-D, got shape {tuple(sig.shape)}")
    check_int(k, "k", 0, sig.shape[0])
    order = torch.sort(sig, descending=True, stable=True).indices[:k]
    return torch.sort(order).values if reorder else order


def fopru_rows(sig_grid: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ "row": keep the ``n_rows`` grid rows with the largest summed significance (spec §3.2 step 3).

    Args:
        sig_grid: ``[rows, cols]`` significance on the token grid.
        n_rows: rows to keep, ``0..rows``.

    Returns:
        ``(kept_rows [n_rows] ascending, kept [n_rows·cols] ascending row-major grid indices)``.
    """
    if sig_grid.dim() != 2:
        raise ValueError(f"fopru: the row strategy needs a [rows, cols] grid, got {tuple(sig_grid.shape)}")
    rows, cols = sig_grid.shape
    check_int(n_rows, "n_rows", 0, rows)
    kept_rows = fopru_rank(sig_grid.sum(dim=-1), n_rows)
    kept = (kept_rows[:, None] * cols + torch.arange(cols, device=sig_grid.device)).flatten()
    return kept_rows, kept


def _stitch(sig: torch.Tensor, view: GridView) -> torch.Tensor:
    """Per-crop significance ``[tiles, th·tw]`` → the view's stitched, unpadded ``[rows, cols]`` grid.

    Crops are row-major over ``view.tiles``; the full canvas is ``(tr·th) × (tc·tw)`` and unpadding
    removed ``view.offset`` rows / columns at the top / left (see :class:`~mmcompress.tokens.GridView`).
    """
    (tr, tc), (th, tw) = view.tiles, view.tile_shape
    canvas = sig.reshape(tr, tc, th, tw).permute(0, 2, 1, 3).reshape(tr * th, tc * tw)
    top, left = view.offset
    return canvas[top : top + view.rows, left : left + view.cols]


@register
@dataclasses.dataclass(frozen=True)
class FoPru(PreLLMMethod):
    """FoPru (arXiv 2411.14164): keep the tokens with the most vision-encoder attention (module docstring).

    Attributes:
        keep: float ratio per view (default ``1/9``: 64 of 576, the 64 tokens HydraInfer hard-codes) or
            int tokens per image; newlines and a CLS visual token are not counted.
        strategy: ``"rank"`` (top tokens, official default) or ``"row"`` (top grid rows).
        layer: vision layer whose attention scores the tokens (``-2``: the layer producing LLaVA's
            ``vision_feature_layer=-2`` features, as in the HydraInfer call site).
        newlines: ``"keep"`` the newline of every AnyRes crops row that keeps a token, or ``"drop"`` all.
        significance: ``"received"`` (default: softmax attention received, the paper's "attention") or
            ``"logits"`` (HydraInfer: column / row means of the pre-softmax patch logits, larger variance
            wins; keeps the background on uniform-background images, module docstring).
    """

    name: ClassVar[str] = "fopru"
    summary: ClassVar[str] = (
        "vision-encoder attention significance, top tokens or top rows, original order (arXiv 2411.14164)"
    )

    keep: int | float = 1 / 9
    strategy: str = "rank"
    layer: int = -2
    newlines: str = "keep"
    significance: str = "received"

    def validate(self) -> None:
        check_keep(self.keep)
        check_choice(self.strategy, "strategy", STRATEGIES)
        check_int(self.layer, "layer")
        check_choice(self.newlines, "newlines", _NEWLINES)
        check_choice(self.significance, "significance", SIGNIFICANCE)

    @property
    def signals(self) -> tuple[VitAttention, ...]:
        if self.significance == "received":
            return (VitAttention(self.layer, "received"),)
        return (VitAttention(self.layer, "received_logits"), VitAttention(self.layer, "given_logits"))

    def needs(self) -> frozenset:
        return frozenset(self.signals)

    def _view_significance(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Heads-averaged significance ``[n_vit, patches]`` of one view from its signal chunks."""
        means = [c.float().mean(dim=1) for c in chunks]  # each [n_vit, patches]
        if self.significance == "received":
            return means[0]
        col, row = means
        # The variance rule (function tie rule: rows win a tie), decided once per layout view: for AnyRes
        # crops over all crops together, so every crop of the stitched grid is ranked on the same scale.
        return col if torch.var(col.flatten()).item() > torch.var(row.flatten()).item() else row

    def _grids(self, tokens: VisualTokens) -> list[tuple[GridView, torch.Tensor]]:
        """Each scored view with its ``[rows, cols]`` significance (heads averaged, patch columns)."""
        atts = []
        for signal in self.signals:
            att = tokens.signals.get(signal)
            if att is None:
                raise ValueError(
                    f"fopru: image {tokens.image_index} has no {signal} signal; the adapter must probe "
                    f"the vision tower (FoPru needs pixel_values, not precomputed features)"
                )
            if att.dim() != 3:
                raise ValueError(f"fopru: {signal} must be [views, heads, T], got {tuple(att.shape)}")
            atts.append(att)
        att = atts[0]
        grids, cursor = [], 0
        for view in tokens.layout.views:
            if view.name in ("cls", "newline"):
                continue
            n_vit = view.tiles[0] * view.tiles[1] if view.name == "crops" else 1
            patches = view.tile_shape[0] * view.tile_shape[1]
            chunk = att[cursor : cursor + n_vit]
            if chunk.shape[0] != n_vit or chunk.shape[-1] < patches:
                raise ValueError(
                    f"fopru: image {tokens.image_index}: view {view.name!r} needs {n_vit} vision view(s) "
                    f"of >= {patches} tokens, the signal has shape {tuple(att.shape)}"
                )
            sig = self._view_significance(
                [a[cursor : cursor + n_vit, :, a.shape[-1] - patches :] for a in atts]
            )  # [n_vit, patches]
            cursor += n_vit
            grid = _stitch(sig, view) if view.name == "crops" else sig.reshape(view.rows, view.cols)
            grids.append((view, grid))
        if cursor != att.shape[0]:
            raise ValueError(
                f"fopru: image {tokens.image_index}: the layout has {cursor} vision view(s), "
                f"the signal {att.shape[0]}"
            )
        return grids

    def select(self, tokens: VisualTokens) -> Selection:
        grids = self._grids(tokens)
        sizes = [v.rows * v.cols for v, _ in grids]
        if isinstance(self.keep, int):
            budgets = split_budget(resolve_keep(self.keep, sum(sizes)), sizes)
        else:
            budgets = [None] * len(grids)
        kept: list[torch.Tensor] = []
        for (view, grid), budget in zip(grids, budgets, strict=True):
            cells = view.grid_indices().to(grid.device)  # [rows, cols] packed indices
            if self.strategy == "rank":
                k = budget if budget is not None else fopru_keep_count(self.keep, grid.numel())
                local = fopru_rank(grid.flatten(), k)
            else:
                n_rows = (
                    max(1, budget // view.cols)
                    if budget is not None
                    else fopru_keep_count(self.keep, view.rows)
                )
                _, local = fopru_rows(grid, min(n_rows, view.rows))
            kept.append(cells.flatten()[local])
            if view.newline and self.newlines == "keep":
                rows_with_kept = torch.unique(local // view.cols)
                kept.append(view.newline_indices().to(grid.device)[rows_with_kept])
        for view in tokens.layout.views:
            # a CLS visual token is always kept; the lone newline of a one-view AnyRes image follows policy
            if view.name == "cls" or (view.name == "newline" and self.newlines == "keep"):
                kept.append(view.grid_indices().flatten())
        idx = torch.sort(torch.cat([k.cpu() for k in kept])).values
        return Selection(indices=idx.to(tokens.features.device))
