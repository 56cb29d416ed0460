"""GlobalCom²: thumbnail-guided compression of LLaVA-NeXT AnyRes crops.

Liu et al.: "Global Compression Commander: Plug-and-Play Inference Acceleration for
High-Resolution Large Vision-Language Models", AAAI 2026, arXiv 2501.05179; official code
xuyang-liu16/GlobalCom2 @ 96b2d00 (original LLaVA codebase, ``llava/model/llava_arch.py``:
``compress_thumbnail``, ``generate_scale_for_crop_features``, ``compress_crops``,
``interpolate_and_split_cls_attn_scores``, ``select_topk_crop_features``). Spec:
``specs/hired-globalcom2-fopru.md`` §0, §2.

Scores are the CLS query row of the *last* vision layer before the softmax (scaled logits ``(q·k)·scale``,
averaged over heads), keys restricted to the patches (spec §2.1). Per image, with retention ``R``:

1. Thumbnail: keep its ``int(T·R)`` highest-scoring tokens.
2. Crop ratios: the thumbnail map is cut into the crop grid's equal rectangles; their score sums go
   through a softmax with temperature ``τ`` (10), and crop ``j`` keeps ``r_j = min(1, R·(1 + σ_j - mean σ))``
   of its valid (non-padding) tokens — numpy float64 as officially, since ``N_j·r_j`` often lands within
   1e-6 of an integer (golden README §4 item 3).
3. Inside crop ``j``: the thumbnail map, bilinearly resized to the unpadded crop region and cut to the crop,
   is the *global* score, the crop's own row the *local* one; both are L2-normalised and added, and the top
   ``int(N_j·r_j)`` valid tokens are kept.

Output. By default kept tokens stay at their own positions (thumbnail raster, then the unpadded crop grid)
and every ``image_newline`` of the crop grid is kept, like the official one-newline-per-row. The official
code differs in two ways, each reproducible:

* it writes a padded crop's kept tokens into the raster slots numbered by their index *in the crop's
  valid-token list* (so they move up / left and wrap across rows) and emits a newline after every row of
  the padded canvas (spec §2.2 step 6, "index quirk") — ``official_padding_bug=True``;
* it emits the thumbnail in descending score order — ``thumbnail_order="score"``.

Both only reorder features, so :meth:`GlobalCom2.select` then returns the official feature sequence on
consecutive packed positions (``Selection.features``); with ``positions="compact"`` (the original LLaVA
code's consecutive positions) the language model sees exactly the official sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PreLLMMethod, check_choice, check_int
from ..registry import register
from ..signals import VitAttention
from ..tokens import Selection, VisualTokens
from .hired import cls_row_scores, official_unpad_box, signal, split_views, tile_packed_index

__all__ = [
    "GlobalCom2",
    "GC2Result",
    "official_unpad_box",
    "gc2_thumbnail_order",
    "gc2_crop_scales",
    "gc2_valid_masks",
    "gc2_global_scores",
    "gc2_combined_scores",
    "gc2_crop_topk",
    "globalcom2_select",
    "gc2_emission",
]

THUMBNAIL_ORDERS = ("raster", "score")


def gc2_thumbnail_order(thumb_scores: torch.Tensor, retention: float) -> torch.Tensor:
    """``[int(T·R)]`` thumbnail raster indices in descending score order (official ``compress_thumbnail``:
    ``argsort(descending=True)``, first ``k``)."""
    k = int(thumb_scores.shape[-1] * retention)
    return torch.argsort(thumb_scores, descending=True)[:k]


def gc2_crop_scales(
    thumb_scores: torch.Tensor,
    tiles: tuple[int, int],
    grid: tuple[int, int],
    retention: float,
    temperature: float = 10.0,
) -> np.ndarray:
    """``[n]`` float64 per-crop retention ratios (official ``generate_scale_for_crop_features``, §2.2 step 2).

    Thumbnail cell ``(i, j)`` of the ``h × w`` grid goes to crop ``(min(i // ph, rows-1), min(j // pw,
    cols-1))`` with ``ph = max(h // rows, 1)``, ``pw = max(w // cols, 1)``; its score is added to that crop's
    sum in raster order in float64 (``np.add.at`` is the official sequential loop). Then
    ``σ = exp((s - max s)/τ) / (Σ exp + 1e-8)`` and ``r = min(1, R·((1 + σ) - mean σ))``.
    """
    nr, nc = tiles
    h, w = grid
    if thumb_scores.numel() != h * w:
        raise ValueError(
            f"globalcom2: thumbnail scores have {thumb_scores.numel()} entries for a {h}x{w} grid"
        )
    ph, pw = max(h // nr, 1), max(w // nc, 1)
    rows = np.minimum(np.arange(h) // ph, nr - 1)
    cols = np.minimum(np.arange(w) // pw, nc - 1)
    region = (rows[:, None] * nc + cols[None, :]).reshape(-1)
    sums = np.zeros(nr * nc)
    np.add.at(sums, region, thumb_scores.detach().reshape(-1).double().cpu().numpy())
    shifted = (sums - np.max(sums)) / temperature
    e = np.exp(shifted)
    soft = e / (np.sum(e) + 1e-8)
    if np.sum(soft) == 0:
        return np.full(nr * nc, float(retention))
    return np.clip(retention * (1 + soft - np.mean(soft)), None, 1.0)


def gc2_valid_masks(
    box: tuple[int, int, int, int], tiles: tuple[int, int], tile_shape: tuple[int, int]
) -> torch.Tensor:
    """``[n, th·tw]`` bool: each crop's raster tokens inside the unpadded canvas region ``box``
    (``(top, bottom, left, right)`` on the ``rows·th × cols·tw`` canvas)."""
    nr, nc = tiles
    th, tw = tile_shape
    top, bottom, left, right = box
    r, c = torch.arange(nr * th), torch.arange(nc * tw)
    inside = ((r >= top) & (r < bottom))[:, None] & ((c >= left) & (c < right))[None, :]
    return inside.view(nr, th, nc, tw).permute(0, 2, 1, 3).reshape(nr * nc, th * tw)


def gc2_global_scores(
    thumb_scores: torch.Tensor,
    grid: tuple[int, int],
    box: tuple[int, int, int, int],
    tiles: tuple[int, int],
    tile_shape: tuple[int, int],
) -> list[torch.Tensor]:
    """Per crop, ``[N_j]`` global scores: the ``h × w`` thumbnail map bilinearly resized
    (``align_corners=False``) to the unpadded region's size, cut at the crops' valid rectangles, flattened
    row-major (official ``interpolate_and_split_cls_attn_scores``; §2.2 step 4). The thumbnail is the whole
    image squashed, so it maps onto the unpadded region, not onto the padded canvas."""
    h, w = grid
    nr, nc = tiles
    th, tw = tile_shape
    top, bottom, left, right = box
    resized = F.interpolate(
        thumb_scores.reshape(1, 1, h, w),
        size=(bottom - top, right - left),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    out = []
    for j in range(nr * nc):
        br, bc = divmod(j, nc)
        r0, r1 = max(top, br * th), min(bottom, (br + 1) * th)
        c0, c1 = max(left, bc * tw), min(right, (bc + 1) * tw)
        if r1 <= r0 or c1 <= c0:  # a crop entirely in the padding has no valid token
            out.append(resized.new_zeros(0))
            continue
        out.append(resized[r0 - top : r1 - top, c0 - left : c1 - left].flatten())
    return out


def gc2_combined_scores(
    local_scores: torch.Tensor, valid: torch.Tensor, global_scores: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Per crop, ``[N_j]`` holistic scores of its valid tokens,
    ``normalize(local[valid]) + normalize(global)`` (L2 over the crop, ``F.normalize`` as officially;
    §2.2 step 5)."""
    out = []
    for j in range(local_scores.shape[0]):
        loc = local_scores[j][valid[j].to(local_scores.device)]
        if loc.shape[0] == 0:
            out.append(loc)
            continue
        g = global_scores[j].to(loc)
        out.append(
            F.normalize(loc.unsqueeze(0), p=2, dim=-1).squeeze(0)
            + F.normalize(g.unsqueeze(0), p=2, dim=-1).squeeze(0)
        )
    return out


def gc2_crop_topk(combined: list[torch.Tensor], scales: np.ndarray) -> list[torch.Tensor]:
    """Per crop, the top ``int(N_j·r_j)`` indices *into its valid-token list*, descending combined score
    (official ``select_topk_crop_features``: ``torch.topk``, Python-float ``N·r`` truncated)."""
    return [torch.topk(c, int(c.shape[0] * float(r))).indices for c, r in zip(combined, scales, strict=True)]


@dataclasses.dataclass
class GC2Result:
    """GlobalCom²'s decision for one image (raster indices are per view, in that view's own grid).

    Attributes:
        thumb: ``[k0]`` kept thumbnail indices, descending score.
        scales: ``[n]`` float64 crop retention ratios ``r_j``.
        valid: ``[n, T]`` bool, each crop's non-padding tokens.
        topk_valid: per crop, top-k indices into its valid-token list (descending combined score).
        topk_raster: the same tokens as raster indices in the crop.
    """

    thumb: torch.Tensor
    scales: np.ndarray
    valid: torch.Tensor
    topk_valid: list[torch.Tensor]
    topk_raster: list[torch.Tensor]


def globalcom2_select(
    scores: torch.Tensor,
    *,
    tiles: tuple[int, int],
    grid: tuple[int, int],
    box: tuple[int, int, int, int],
    retention: float,
    temperature: float = 10.0,
) -> GC2Result:
    """GlobalCom² for one AnyRes image (spec §2.2 steps 1-5).

    Args:
        scores: ``[V, T]`` head-mean pre-softmax CLS logits of the last vision layer; row 0 = thumbnail,
            rows 1.. = crops row-major over ``tiles``.
        tiles: the crop grid ``(rows, cols)``.
        grid: the per-view patch grid ``(h, w)``, ``h·w == T``.
        box: the unpadded region ``(top, bottom, left, right)`` of the ``rows·h × cols·w`` crop canvas
            (:func:`~mmcompress.methods.hired.official_unpad_box`, or the model's own from its layout).
        retention: ``R`` in (0, 1].
        temperature: the crop-ratio softmax temperature ``τ``.
    """
    nr, nc = tiles
    h, w = grid
    V, T = scores.shape
    if nr * nc + 1 != V or h * w != T:
        raise ValueError(
            f"globalcom2: scores {tuple(scores.shape)} do not match a {nr}x{nc} crop grid plus thumbnail "
            f"of {h}x{w} tokens"
        )
    thumb = scores[0]
    valid = gc2_valid_masks(box, tiles, grid)
    scales = gc2_crop_scales(thumb, tiles, grid, retention, temperature)
    glob = gc2_global_scores(thumb, grid, box, tiles, grid)
    topk = gc2_crop_topk(gc2_combined_scores(scores[1:], valid, glob), scales)
    raster = [valid[j].nonzero().flatten().to(t.device)[t] for j, t in enumerate(topk)]
    return GC2Result(gc2_thumbnail_order(thumb, retention), scales, valid, topk, raster)


def gc2_emission(
    result: GC2Result, tiles: tuple[int, int], grid: tuple[int, int], *, official_padding_bug: bool = True
) -> torch.Tensor:
    """The official token sequence of one image as ``[M, 2]`` ``(view, raster index)`` rows; ``(-1, -1)``
    is ``image_newline`` (spec §2.2 steps 6-7).

    Thumbnail tokens in ``result.thumb`` order, then the padded ``rows·h × cols·w`` canvas row-major with a
    newline after *every* canvas row. A kept crop token's feature sits in the raster slot numbered by its
    valid-list index (``official_padding_bug=True``, the official quirk) or by its true raster index.
    """
    nr, nc = tiles
    h, w = grid
    n, T = nr * nc, h * w
    thumb = result.thumb.cpu()
    head = torch.stack([torch.zeros_like(thumb), thumb], 1)
    src_view = torch.full((n, T), -2, dtype=torch.long)
    src_idx = torch.full((n, T), -2, dtype=torch.long)
    for j in range(n):
        slots = (result.topk_valid if official_padding_bug else result.topk_raster)[j].cpu()
        src_view[j, slots] = 1 + j
        src_idx[j, slots] = result.topk_raster[j].cpu()

    def canvas(t: torch.Tensor) -> torch.Tensor:
        c = t.view(nr, nc, h, w).permute(0, 2, 1, 3).reshape(nr * h, nc * w)
        return torch.cat([c, torch.full((nr * h, 1), -1, dtype=torch.long)], 1).flatten()

    v, i = canvas(src_view), canvas(src_idx)
    keep = v != -2
    return torch.cat([head, torch.stack([v[keep], i[keep]], 1)])


@register
@dataclasses.dataclass(frozen=True)
class GlobalCom2(PreLLMMethod):
    """GlobalCom² (AAAI 2026, arXiv 2501.05179): thumbnail-guided per-crop budgets and token selection
    for LLaVA-NeXT AnyRes (module docstring, spec §2).

    Attributes:
        retention: ``R`` in (0, 1]: the thumbnail keeps ``int(T·R)`` tokens and the crops ``R`` of their
            valid tokens on average (default 0.25, the official value). Newlines are kept on top.
        temperature: softmax temperature of the crop ratios (> 0; official 10).
        layer: vision layer of the CLS logits (official: the last, ``-1``).
        official_padding_bug: emit padded crops' tokens in the official wrong slots, with a newline for every
            padded-canvas row (module docstring); default: every token at its own position.
        thumbnail_order: ``"raster"`` (default: tokens at their own positions) or ``"score"`` (official:
            descending score).

    The official orders move features off their own tokens' positions (the padding quirk onto consecutive
    positions of the crop grid); use them with ``compress(..., positions="compact")`` to get the official
    sequence (with the default ``"original"`` positions a moved token takes another token's RoPE slot).
    """

    name: ClassVar[str] = "globalcom2"
    summary: ClassVar[str] = (
        "thumbnail-guided crop budgets + global/local CLS scores (AAAI 2026, arXiv 2501.05179)"
    )
    layouts: ClassVar[tuple[str, ...]] = ("anyres",)
    budget_field: ClassVar[str] = "retention"

    retention: float = 0.25
    temperature: float = 10.0
    layer: int = -1
    official_padding_bug: bool = False
    thumbnail_order: str = "raster"

    def validate(self) -> None:
        for field in ("retention", "temperature"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{field} must be a number, got {v!r}")
        if not (math.isfinite(self.retention) and 0.0 < self.retention <= 1.0):
            raise ValueError(
                f"retention={self.retention!r} is not allowed: the retention ratio must be in (0, 1]"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature={self.temperature!r} is not allowed: it must be a finite number > 0"
            )
        check_int(self.layer, "layer")
        if not isinstance(self.official_padding_bug, bool):
            raise TypeError(f"official_padding_bug must be a bool, got {self.official_padding_bug!r}")
        check_choice(self.thumbnail_order, "thumbnail_order", THUMBNAIL_ORDERS)

    def needs(self) -> frozenset:
        return frozenset({VitAttention(self.layer, "cls_logits")})

    def select(self, tokens: VisualTokens) -> Selection:
        base, crops, others = split_views(tokens.layout, self.name)
        if crops is None:
            raise ValueError(
                f"globalcom2 needs an AnyRes image (thumbnail + crops); image {tokens.image_index} has views "
                f"{[v.name for v in tokens.layout.views]}"
            )
        h, w = base.rows, base.cols
        if tuple(crops.tile_shape) != (h, w):
            raise ValueError(
                f"globalcom2: crop tiles are {crops.tile_shape} tokens but the thumbnail is {h}x{w}; "
                f"GlobalCom² needs crops and thumbnail on the same patch grid"
            )
        tiles = crops.tiles
        V = 1 + tiles[0] * tiles[1]
        sig = signal(tokens, VitAttention(self.layer, "cls_logits"), V, self.name)
        scores = cls_row_scores(sig, h * w, "mean", self.name)
        top, left = crops.offset
        box = (top, top + crops.rows, left, left + crops.cols)  # the model's own unpadding
        res = globalcom2_select(
            scores,
            tiles=tiles,
            grid=(h, w),
            box=box,
            retention=float(self.retention),
            temperature=float(self.temperature),
        )
        thumb_pos = base.grid_indices().flatten()[res.thumb.cpu()]
        packed = tile_packed_index(crops)
        crop_pos = torch.cat([packed[j, r.cpu()] for j, r in enumerate(res.topk_raster)])
        extra = [torch.arange(v.start, v.stop) for v in others]  # a "cls" token / lone newline: kept
        if not self.official_padding_bug and self.thumbnail_order == "raster":
            parts = [thumb_pos, crop_pos, crops.newline_indices(), *extra]
            return Selection(indices=torch.sort(torch.cat(parts)).values.to(tokens.features.device))
        # official orders: the features of `src` (packed indices, emission order) on ascending positions `dst`
        thumb_src = thumb_pos if self.thumbnail_order == "score" else torch.sort(thumb_pos).values
        src, dst = [thumb_src], [torch.sort(thumb_pos).values]
        if self.official_padding_bug:
            seq = gc2_emission(res, tiles, (h, w), official_padding_bug=True)[res.thumb.numel() :]
            nl = crops.newline_indices()
            if seq.shape[0] > crops.num_tokens or (nl.numel() == 0 and bool((seq[:, 0] == -1).any())):
                raise ValueError(
                    f"globalcom2: official_padding_bug=True emits {seq.shape[0]} crop tokens and newlines "
                    f"for image {tokens.image_index}, but its crop grid has {crops.num_tokens} positions; "
                    f"use the default placement"
                )
            is_nl = seq[:, 0] == -1
            tok = seq.clamp(min=0)
            s = torch.where(
                is_nl, nl[0] if nl.numel() else -1, packed[(tok[:, 0] - 1).clamp(min=0), tok[:, 1]]
            )
            src.append(s)
            dst.append(crops.start + torch.arange(seq.shape[0]))
        else:
            src += [crop_pos, crops.newline_indices()]
            dst += [crop_pos, crops.newline_indices()]
        src += extra
        dst += extra
        src_t, dst_t = torch.cat(src), torch.cat(dst)
        order = torch.argsort(dst_t)
        dev = tokens.features.device
        return Selection(indices=dst_t[order].to(dev), features=tokens.features[src_t[order].to(dev)])
