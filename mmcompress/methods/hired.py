"""HiRED: High-Resolution Early Dropping of visual tokens.

Arif et al.: "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", AAAI 2025, arXiv 2408.10945; official code hasanar1f/HiRED @
502d6dd (a transformers 4.42 fork: ``models/llava_next/modeling_llava_next.py`` ``HiRED_token_selection``,
``HiRED_sub_img_budgets``, ``pack_HiRED_image_features``; ``models/llava/modeling_llava.py``).
Spec: ``specs/hired-globalcom2-fopru.md`` §0, §1.

Two phases on the vision tower's CLS attention (softmax row, keys restricted to the patches, summed over
heads, as officially):

1. *Budget allocation* (AnyRes only): the image budget ``B`` is split into the thumbnail's share
   ``B0 = min(int(B·alpha), T)`` and the crops' pool; the pool is spread over the crops in proportion to how
   many of the thumbnail's top ``int(T·(1-alpha))`` tokens at an *early* layer (layer 0) fall into each
   crop's region (§1.2 step 4).
2. *Token dropping*: every view keeps its top tokens by the CLS attention of the *feature* layer (the
   layer whose output the projector reads, ``-2`` for LLaVA), with its own budget.

Region split. The official code credits crop ``i`` with the ``i``-th contiguous block of ``T/(V-1)``
thumbnail raster positions (``split="bands"``, the default: its numbers are the published ones); the
paper's figure divides the thumbnail in 2-D like the crop grid (``split="quadrants"``). The two coincide
for tall grids (2x1, 3x1).

Packing. Kept tokens stay where the model packs them (thumbnail raster, then the unpadded stitched crop
grid). Crop tokens selected inside the padding have no position there and are dropped, as officially.
LLaVA-NeXT's ``image_newline`` tokens are dropped (``newlines="drop"``, official) or kept. The official
fork stitches non-square grids (1x2, 2x1, 1x3, 3x1) *transposed* (transformers <= 4.43 swapped the grid's
width and height names, PR huggingface/transformers#32314), which loses nearly every crop token after
unpadding; :func:`hired_pack` reproduces that with ``hf442_grid=True`` for the parity test only. The
model's own (correct) geometry is used everywhere else.

Deviations, none of them in the published setting: every image decides for itself (the LLaVA-1.5 code
applies image 0's mask to the whole batch); with no layer-0 content token (alpha near 1) the crops' pool
is split evenly instead of dividing by zero; a rate so small that ``B = 0`` keeps one token; the layers and
the grid come from the config and the model instead of CLIP-L/336 constants (layers 0/22, 24x24).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_choice, check_int, check_keep
from ..registry import register
from ..signals import VitAttention
from ..tokens import GridView, Layout, Selection, VisualTokens

__all__ = [
    "HiRED",
    "cls_row_scores",
    "official_unpad_box",
    "tile_packed_index",
    "hired_total_budget",
    "hired_split_budget",
    "hired_content_map",
    "hired_region_counts",
    "hired_crop_budgets",
    "hired_select",
    "hired_pack",
]

SPLITS = ("bands", "quadrants")
NEWLINES = ("drop", "keep")
_REDUCE = ("sum", "mean")


# -- shared helpers (also used by GlobalCom²) --------------------------------------------------------------


def cls_row_scores(attn: torch.Tensor, tokens_per_view: int, reduce: str, method: str) -> torch.Tensor:
    """``[V, H, T']`` CLS-query attention row → ``[V, T]`` per-patch scores.

    Keeps the last ``T = tokens_per_view`` keys (the patches; the CLS key and any register tokens come
    first), then sums or averages over the heads, exactly as the official code slices ``[..., -T:]``.
    A row with only ``T`` keys comes from a tower without a CLS token (SigLIP): no CLS query exists.
    """
    check_choice(reduce, "reduce", _REDUCE)
    if attn.dim() != 3:
        raise ValueError(f"{method}: CLS attention must be [views, heads, tokens], got {tuple(attn.shape)}")
    if attn.shape[-1] <= tokens_per_view:
        raise ValueError(
            f"{method} needs a vision tower with a CLS token: its attention rows have {attn.shape[-1]} "
            f"keys for {tokens_per_view} patch tokens per view, so there is no CLS query (SigLIP-style "
            f"towers have none); supported: CLIP / DINOv2-style towers with a leading CLS token"
        )
    patch = attn[:, :, -tokens_per_view:]
    return patch.sum(dim=1) if reduce == "sum" else patch.mean(dim=1)


def official_unpad_box(canvas_h: int, canvas_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the non-padding region of a ``canvas_h × canvas_w`` crop canvas.

    The LLaVA ``unpad_image`` rule as both official codes run it (spec §0 step 3): the image was resized
    to fit the canvas and centred, so cut ``(canvas - int(side·scale)) // 2`` rows (a wider image) or
    columns (a taller one) from each end. ``height, width`` are the original image's. transformers 5.x
    rounds ``side·scale`` to 7 digits first; the adapter's :class:`~mmcompress.tokens.GridView` carries
    the model's own box, which :meth:`HiRED.select` uses.
    """
    if width / height > canvas_w / canvas_h:
        new_h = int(height * (canvas_w / width))
        pad = (canvas_h - new_h) // 2
        return pad, canvas_h - pad, 0, canvas_w
    new_w = int(width * (canvas_h / height))
    pad = (canvas_w - new_w) // 2
    return 0, canvas_h, pad, canvas_w - pad


def tile_packed_index(view: GridView) -> torch.Tensor:
    """For an AnyRes crops view: ``[tiles, th·tw]`` packed index of every crop token, ``-1`` in the padding.

    Crop ``j`` (row-major over ``view.tiles``) covers block ``divmod(j, tile_cols)`` of the padded canvas;
    its raster token ``p`` sits at canvas cell ``(block_row·th + p // tw, block_col·tw + p % tw)``, which the
    unpadding shifts by ``view.offset``.
    """
    th, tw = view.tile_shape
    nr, nc = view.tiles
    top, left = view.offset
    r = torch.arange(nr * th) - top
    c = torch.arange(nc * tw) - left
    inside = ((r >= 0) & (r < view.rows))[:, None] & ((c >= 0) & (c < view.cols))[None, :]
    packed = view.start + r[:, None] * (view.cols + int(view.newline)) + c[None, :]
    packed = torch.where(inside, packed, torch.full_like(packed, -1))
    return packed.view(nr, th, nc, tw).permute(0, 2, 1, 3).reshape(nr * nc, th * tw)


def split_views(layout: Layout, method: str) -> tuple[GridView, GridView | None, list[GridView]]:
    """``(base, crops or None, others)``: the thumbnail / single view, the AnyRes crop grid, and the
    non-grid extras (``"cls"`` token of a "full" feature strategy, a lone ``"newline"``)."""
    names = [v.name for v in layout.views]
    unknown = [n for n in names if n not in ("base", "crops", "cls", "newline")]
    if "base" not in names or unknown:
        raise ValueError(
            f"{method} works on single-view and AnyRes (thumbnail + crops) layouts; got views {names}"
        )
    crops = layout.view("crops") if "crops" in names else None
    others = [v for v in layout.views if v.name in ("cls", "newline")]
    return layout.view("base"), crops, others


def signal(tokens: VisualTokens, sig: VitAttention, views: int, method: str) -> torch.Tensor:
    """The ``[views, H, T']`` value of ``sig`` for this image, checked against the layout's view count."""
    if sig not in tokens.signals:
        raise ValueError(
            f"{method}: image {tokens.image_index} has no {sig} signal; the adapter must probe what "
            f"needs() declares (got {sorted(map(str, tokens.signals))})"
        )
    value = tokens.signals[sig]
    if value.dim() != 3 or value.shape[0] != views:
        raise ValueError(
            f"{method}: {sig} has shape {tuple(value.shape)}; expected [{views} views, heads, tokens] for "
            f"image {tokens.image_index}'s layout"
        )
    return value


# -- the pure HiRED functions ---------------------------------------------------------------------------


def hired_total_budget(keep: int | float, num_views: int, tokens_per_view: int) -> int:
    """Image budget ``B`` (spec §1.2 step 2). A float is the official ``token_budget_rate``:
    ``int(V·T·rate)`` over every view's grid (padding included); an int is a token count."""
    if isinstance(keep, float):
        return int(num_views * tokens_per_view * keep)
    if keep > num_views * tokens_per_view:
        raise ValueError(
            f"keep={keep} exceeds the {num_views * tokens_per_view} grid tokens of this image "
            f"({num_views} views x {tokens_per_view}); allowed: 1..{num_views * tokens_per_view} or a "
            f"fraction in (0, 1]"
        )
    return int(keep)


def hired_split_budget(total: int, alpha: float, num_views: int, tokens_per_view: int) -> tuple[int, int]:
    """``(B0, Bsub)``: the thumbnail's budget ``min(int(B·alpha), T)`` and the crops' pool
    ``min(B - B0, (V-1)·T)``, truncated as officially. A single view keeps ``min(B, T)`` (LLaVA-1.5: no
    alpha)."""
    T = tokens_per_view
    if num_views == 1:
        return min(total, T), 0
    b0 = min(int(total * alpha), T)
    return b0, min(total - b0, (num_views - 1) * T)


def hired_content_map(budget_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[T]`` bool: the thumbnail's top ``int(T·(1-alpha))`` tokens by early-layer CLS attention.

    The official code re-uses ``alpha`` for this size (alpha 0.5 → 288 of 576, 0.3 → 403)."""
    T = budget_scores.shape[-1]
    content = torch.zeros(T, dtype=torch.bool, device=budget_scores.device)
    content[budget_scores.topk(int(T * (1 - alpha)), largest=True).indices] = True
    return content


def hired_region_counts(
    content: torch.Tensor, tiles: tuple[int, int], grid: tuple[int, int], split: str = "bands"
) -> torch.Tensor:
    """``[n]`` int64: content tokens credited to each of the ``n = rows·cols`` crops.

    ``"bands"`` (official): crop ``i`` gets thumbnail raster positions ``[i·T/n, (i+1)·T/n)`` — the official
    reshape to ``(n, T/n)``; for a ``T`` not divisible by ``n`` the bands are ``⌊p·n/T⌋``.
    ``"quadrants"`` (paper): the thumbnail ``h × w`` grid is cut like the crop grid, row ``r`` → crop row
    ``⌊r·rows/h⌋``, column ``c`` → crop column ``⌊c·cols/w⌋``.
    """
    check_choice(split, "split", SPLITS)
    nr, nc = tiles
    h, w = grid
    n, T = nr * nc, h * w
    if content.shape != (T,):
        raise ValueError(f"hired: content map must be [{T}] for a {h}x{w} grid, got {tuple(content.shape)}")
    if split == "bands":
        region = torch.arange(T) * n // T
    else:
        region = ((torch.arange(h) * nr // h)[:, None] * nc + (torch.arange(w) * nc // w)[None, :]).flatten()
    return torch.bincount(region[content.cpu()], minlength=n)


def hired_crop_budgets(counts: torch.Tensor, pool: int, tokens_per_view: int) -> torch.Tensor:
    """``[n]`` int64 per-crop budgets from the region counts (official ``HiRED_sub_img_budgets``).

    ``int(count_i / Σcount · pool)`` computed in float32 (the division of int64 tensors, then the product),
    clamped at ``T``; the floor remainder is not redistributed, so the crops get slightly less than
    ``pool``. With no content token at all (alpha near 1) the official code divides by zero; here the pool
    is then split evenly (the remainder again not redistributed).
    """
    total = int(counts.sum())
    if total == 0:
        budgets = torch.full_like(counts, pool // counts.numel())
    else:
        budgets = ((counts / counts.sum()) * pool).int().long()
    return budgets.clamp(max=tokens_per_view)


def hired_select(
    select_scores: torch.Tensor,
    budget_scores: torch.Tensor | None,
    total: int,
    alpha: float,
    *,
    tiles: tuple[int, int] = (1, 1),
    grid: tuple[int, int] | None = None,
    split: str = "bands",
) -> list[torch.Tensor]:
    """HiRED for one image: per-view kept raster indices (spec §1.2 steps 2-4, §1.3).

    Args:
        select_scores: ``[V, T]`` feature-layer CLS attention per view (view 0 = thumbnail / single view,
            views 1.. = crops row-major over ``tiles``).
        budget_scores: ``[T]`` early-layer (layer 0) CLS attention of the thumbnail; unused for ``V == 1``.
        total: the image budget ``B`` (:func:`hired_total_budget`); ``B >= V·T`` keeps everything (the
            official ``token_budget_rate >= 1`` switch).
        alpha: the thumbnail's share of ``B``; also sizes the content map.
        tiles: the crop grid ``(rows, cols)``; ``rows·cols == V - 1``.
        grid: the per-view patch grid ``(h, w)``; default square ``√T``.
        split: ``"bands"`` (official) or ``"quadrants"`` (paper), see :func:`hired_region_counts`.

    Returns:
        ``V`` int64 tensors of kept raster indices, ascending (the official code produces masks only).
    """
    if select_scores.dim() != 2:
        raise ValueError(f"hired: select_scores must be [views, T], got shape {tuple(select_scores.shape)}")
    V, T = select_scores.shape
    if grid is None:
        side = math.isqrt(T)
        grid = (side, T // side)
    if grid[0] * grid[1] != T:
        raise ValueError(f"hired: grid {grid} does not hold the {T} tokens per view")
    if V > 1 and tiles[0] * tiles[1] != V - 1:
        raise ValueError(f"hired: {V} views do not match a {tiles[0]}x{tiles[1]} crop grid plus thumbnail")
    device = select_scores.device
    if total >= V * T:
        return [torch.arange(T, device=device) for _ in range(V)]
    b0, pool = hired_split_budget(total, alpha, V, T)
    kept = [select_scores[0].topk(b0, largest=True).indices]
    if V > 1:
        if pool > 0:
            if budget_scores is None or budget_scores.shape != (T,):
                raise ValueError(f"hired: budget_scores must be [{T}] for an AnyRes image")
            content = hired_content_map(budget_scores, alpha)
            budgets = hired_crop_budgets(hired_region_counts(content, tiles, grid, split), pool, T)
        else:
            budgets = torch.zeros(V - 1, dtype=torch.long)
        kept += [select_scores[1 + i].topk(int(b), largest=True).indices for i, b in enumerate(budgets)]
    return [torch.sort(k).values for k in kept]


def hired_pack(
    kept: list[torch.Tensor],
    tiles: tuple[int, int],
    grid: tuple[int, int],
    image_size_hw: tuple[int, int],
    *,
    hf442_grid: bool = False,
) -> torch.Tensor:
    """The emitted token sequence of one AnyRes image as ``[N, 2]`` ``(view, raster index)`` rows.

    Thumbnail kept tokens in raster order, then the crops' kept tokens in the raster order of the stitched,
    unpadded crop canvas (:func:`official_unpad_box` with the original ``(height, width)``); tokens in the
    padding are lost; no newlines (spec §1.2 step 5).

    ``hf442_grid=True`` reproduces the official fork's transformers-4.42 stitching: the ``(rows, cols)``
    grid is read as ``(width, height)``, so crop ``i`` lands in block ``(i // rows, i % rows)`` of a
    ``(cols·h) × (rows·w)`` canvas (golden README §3 item 7). Only the parity test uses it.
    """
    nr, nc = tiles
    h, w = grid
    n = nr * nc
    if len(kept) != n + 1:
        raise ValueError(f"hired_pack: got {len(kept)} views for a {nr}x{nc} grid plus thumbnail")
    T = h * w
    thumb = torch.sort(kept[0].cpu()).values
    out = [torch.stack([torch.zeros_like(thumb), thumb], 1)]
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i in range(n):
        mask[i, kept[1 + i].cpu()] = True
    view_id = torch.arange(1, n + 1)[:, None].expand(n, T)
    raster = torch.arange(T)[None, :].expand(n, T)
    br, bc = (nc, nr) if hf442_grid else (nr, nc)  # block rows / cols of the stitched canvas

    def canvas(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(br, bc, h, w).permute(0, 2, 1, 3).reshape(br * h, bc * w)

    top, bottom, left, right = official_unpad_box(
        br * h, bc * w, int(image_size_hw[0]), int(image_size_hw[1])
    )
    box = (slice(top, bottom), slice(left, right))
    m = canvas(mask)[box]
    out.append(torch.stack([canvas(view_id)[box][m], canvas(raster)[box][m]], 1))
    return torch.cat(out)


# -- the method -------------------------------------------------------------------------------------------


@register
@dataclasses.dataclass(frozen=True)
class HiRED(PreLLMMethod):
    """HiRED (AAAI 2025, arXiv 2408.10945): CLS-attention budget allocation over AnyRes crops, then
    top-k dropping inside every view (module docstring, spec §1).

    Attributes:
        keep: a float is the official ``token_budget_rate`` ρ: the image keeps ``int(V·T·ρ)`` of its
            ``V`` views' ``T`` grid tokens (padding positions counted, newlines not); an int is that budget
            directly. Default 0.2, the official scripts' rate. ``1.0`` keeps every grid token.
        alpha: share of the budget for the thumbnail (in [0, 1]; also sizes the layer-0 content map);
            default 0.5 as in the scripts. Ignored for single-view models.
        split: ``"bands"`` (official contiguous raster bands) or ``"quadrants"`` (the paper's 2-D regions).
        newlines: ``"drop"`` (official: no ``image_newline`` token survives) or ``"keep"`` (all kept,
            outside the budget).
        budget_layer: vision layer whose CLS attention allocates the budget (official: 0).
        select_layer: vision layer whose CLS attention picks the tokens: the layer producing the features,
            ``-2`` for LLaVA's ``vision_feature_layer=-2`` (official: 22 of 24).
    """

    name: ClassVar[str] = "hired"
    summary: ClassVar[str] = (
        "CLS-attention budget over AnyRes crops + top-k dropping (AAAI 2025, arXiv 2408.10945)"
    )

    keep: int | float = 0.2
    alpha: float = 0.5
    split: str = "bands"
    newlines: str = "drop"
    budget_layer: int = 0
    select_layer: int = -2

    def validate(self) -> None:
        check_keep(self.keep)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(
                f"alpha={self.alpha!r} is not allowed: the thumbnail's budget share must be in [0, 1]"
            )
        check_choice(self.split, "split", SPLITS)
        check_choice(self.newlines, "newlines", NEWLINES)
        check_int(self.budget_layer, "budget_layer")
        check_int(self.select_layer, "select_layer")

    def needs(self) -> frozenset:
        return frozenset({VitAttention(self.budget_layer, "cls"), VitAttention(self.select_layer, "cls")})

    def select(self, tokens: VisualTokens) -> Selection:
        base, crops, others = split_views(tokens.layout, self.name)
        h, w = base.rows, base.cols
        T = h * w
        tiles = (1, 1)
        if crops is not None:
            tiles = crops.tiles
            if tuple(crops.tile_shape) != (h, w):
                raise ValueError(
                    f"hired: crop tiles are {crops.tile_shape} tokens but the thumbnail is {h}x{w}; "
                    f"HiRED needs crops and thumbnail on the same patch grid"
                )
        V = 1 + (tiles[0] * tiles[1] if crops is not None else 0)
        final = cls_row_scores(
            signal(tokens, VitAttention(self.select_layer, "cls"), V, self.name), T, "sum", self.name
        )
        budget_scores = None
        if V > 1:
            early = signal(tokens, VitAttention(self.budget_layer, "cls"), V, self.name)
            budget_scores = cls_row_scores(early[:1], T, "sum", self.name)[0]
        # at least one token: a tiny rate must not empty the image (the official code would pass 0 tokens)
        total = max(1, hired_total_budget(self.keep, V, T))
        kept = hired_select(
            final, budget_scores, total, float(self.alpha), tiles=tiles, grid=(h, w), split=self.split
        )
        parts = [base.grid_indices().flatten()[kept[0].cpu()]]
        if crops is not None:
            packed = tile_packed_index(crops)
            for i in range(V - 1):
                p = packed[i, kept[1 + i].cpu()]
                parts.append(p[p >= 0])  # tokens chosen inside the padding have no position: dropped
            if self.newlines == "keep":
                parts.append(crops.newline_indices())
        for v in others:
            if v.name == "cls" or self.newlines == "keep":
                parts.append(torch.arange(v.start, v.stop))
        indices = torch.sort(torch.cat(parts)).values
        return Selection(indices=indices.to(tokens.features.device))
