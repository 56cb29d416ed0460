"""DivPrune: visual-token pruning as a max-min diversity problem.

Alvar, Singh, Akbari, Zhang: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv 2503.02175; official code vbdi/divprune @ 799e2d9
(``LLaVA/llava/model/llava_arch.py``). Spec: ``specs/divprune-aim-zipvl-kvquant.md`` §1.

One shot before the LLM, on the projected visual tokens of one image (for AnyRes: every token the image
contributes, newlines included, spec §1.1): build the cosine-distance matrix, then greedily keep the K
tokens that maximise the minimum pairwise distance (greedy loop in :mod:`mmcompress.kernels.maxmin`).
Needs no attention and no text, so it works with any attention backend.

Two modes:

* default: the official algorithm (same Dist in the features' dtype, same first pick, same argmax
  tie rule) but an already picked token is excluded from later picks, so K distinct tokens are kept.
  Whenever the official run has no repeat this gives the identical pick sequence.
* ``official_compat=True``: bit-for-bit the official selection, repeats included (spec §1.2 step 4, golden
  README quirk 4). :func:`divprune_select` then returns the raw official index vector; ``DivPrune.select``
  drops the repeats (a token has one position in the sequence), so it may keep fewer than K tokens.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_choice, check_keep, resolve_keep
from ..kernels._dispatch import BACKENDS
from ..kernels.maxmin import greedy_maxmin
from ..registry import register
from ..tokens import Selection, VisualTokens

__all__ = ["DivPrune", "divprune_keep_count", "cosine_distance", "divprune_select"]


def divprune_keep_count(keep: int | float, n: int) -> int:
    """Tokens the official code keeps out of ``n`` (spec §1.2 step 1).

    A float is a ratio: ``int(round(keep * n))`` with Python's round-half-to-even (0.125·36 = 4.5 → 4,
    0.125·44 = 5.5 → 6; golden dp07/dp08); it can be 0 for tiny ratios, as officially. An int is a count
    and is returned as is. (``DivPrune.select`` goes through :func:`~mmcompress.config.resolve_keep`, the
    same rule with a floor of 1 and a bound check.)
    """
    if isinstance(keep, float):
        return int(round(keep * n))
    return int(keep)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``[N, D] -> [N, N]`` cosine distance ``1 - X̂X̂ᵀ`` exactly as the official code builds it (§1.2 step 2).

    Rows are divided by their L2 norm, then one ``torch.mm`` and ``1 - C``, every step in ``x.dtype``
    (fp16 in the official scripts). Nothing is clamped: the diagonal is not exactly 0 (±7e-7 in fp32, a
    few fp16 ulps in fp16) and a zero row gives NaN, both as officially.
    """
    if x.dim() != 2:
        raise ValueError(f"cosine_distance: x must be [N, D], got shape {tuple(x.shape)}")
    xn = x / x.norm(dim=1, keepdim=True)
    return 1.0 - torch.mm(xn, xn.t())


def divprune_select(
    x: torch.Tensor,
    k: int,
    *,
    official_compat: bool = False,
    dist: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DivPrune's greedy max-min selection for one image (spec §1.2).

    Args:
        x: ``[N, D]`` visual tokens (projected embeddings), any float dtype; the distances are computed in
            this dtype, as officially.
        k: tokens to pick; ``k <= N`` unless ``official_compat`` (which may repeat indices).
        official_compat: reproduce the official loop bit for bit: picked tokens are not excluded.
        dist: optional precomputed ``[N, N]`` distance matrix (e.g. a stored official one); ``x`` is then
            used only for its shape.
        backend: ``"auto" | "torch" | "triton"`` for the greedy loop (:mod:`mmcompress.kernels.maxmin`).

    Returns:
        ``[K]`` int64 indices **in pick order** on ``x``'s device. Default mode: K distinct indices. Compat
        mode: the raw official vector (repeats possible once every distinct vector is covered).
    """
    if x.dim() != 2:
        raise ValueError(f"divprune: x must be [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"divprune: k={k!r} must be an int >= 0")
    if not official_compat and k > n:
        raise ValueError(f"divprune: k={k} exceeds the {n} visual tokens")
    if dist is None:
        dist = cosine_distance(x)
    elif tuple(dist.shape) != (n, n):
        raise ValueError(f"divprune: dist must be [{n}, {n}], got shape {tuple(dist.shape)}")
    return greedy_maxmin(dist, k, exclude_picked=not official_compat, backend=backend)


@register
@dataclasses.dataclass(frozen=True)
class DivPrune(PreLLMMethod):
    """DivPrune (CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens (spec §1).

    Attributes:
        keep: tokens per image (int) or fraction (float in (0, 1]); default 0.098, the paper's and every
            official script's ratio (LLaVA-1.5: 576 → 56).
        official_compat: bit-for-bit official selection (picked tokens not excluded; ``select`` then
            removes the repeats, so it can keep fewer than K). Default: exclusion, exactly K distinct tokens.
        backend: ``"auto" | "torch" | "triton"`` for the greedy loop.
    """

    name: ClassVar[str] = "divprune"
    summary: ClassVar[str] = "max-min diversity of projected visual tokens (CVPR 2025, arXiv 2503.02175)"

    keep: int | float = 0.098
    official_compat: bool = False
    backend: str = "auto"

    def validate(self) -> None:
        check_keep(self.keep)
        if not isinstance(self.official_compat, bool):
            raise TypeError(f"official_compat must be a bool, got {self.official_compat!r}")
        check_choice(self.backend, "backend", BACKENDS)

    def select(self, tokens: VisualTokens) -> Selection:
        x = tokens.features
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"divprune: image {tokens.image_index} has NaN/inf visual features; "
                f"cannot compute cosine distances"
            )
        n = tokens.num_tokens
        k = resolve_keep(self.keep, n)
        dist = cosine_distance(x)
        if not bool(torch.isfinite(dist).all()):
            # finite features but NaN distances: a zero-norm token (0/0 in the normalisation)
            raise ValueError(
                f"divprune: image {tokens.image_index} has a zero-norm visual token; "
                f"its cosine distance is undefined"
            )
        picked = divprune_select(x, k, official_compat=self.official_compat, dist=dist, backend=self.backend)
        # the adapter needs each kept position once, in sequence order; compat repeats collapse here
        return Selection(indices=torch.unique(picked))
