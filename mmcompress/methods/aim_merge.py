"""AIM token merging: iterative bipartite merging of similar visual tokens, per frame, before the LLM.

Zhong, Liu, Li, Wang: "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv 2412.03248; official code LaVi-Lab/AIM @ edc24e9 (``llava/model/token_merge.py``,
called from ``llava/model/llava_arch.py`` ``get_2dPool`` for LLaVA-OV video and from the LLaVA-PruMerge
``clip_encoder.py`` for LLaVA-1.5). Spec: ``specs/divprune-aim-zipvl-kvquant.md`` §2.1, §2.2, §2.5.
This is AIM's first half; the in-LLM PageRank pruning is the separate method ``"aim"``.

The merge step (alternate-position bipartite split, best cosine match per source, the ``r`` best-matched
sources averaged into their destinations) is :func:`mmcompress.kernels.merge.aim_merge_torch`; this
module chooses the schedule and maps the result onto the image's packed tokens.

Schedule. ``keep`` sets each merge group's target ``K``; steps then halve the tokens until ``K`` is reached:
``r = min(T // 2, T - K)`` per step. This reproduces every schedule the official code ships:
196 → 98 → 49 (LLaVA-OV video, ``keep=0.25``), 576 → 288 → 252 (LLaVA-1.5, ``keep=252``) and the
commented alternatives (576 → 72 with ``keep=0.125``; 196 → 25 / 13 with ``keep=25`` / ``13``).

Merge groups and budget. Merging never crosses a group. Video (``frame<i>`` views): one group per
frame, as officially (the paper: cross-frame merging would break temporal order). Single image
(LLaVA-1.5): the whole grid. LLaVA-NeXT AnyRes (no official AIM path merges AnyRes images; LLaVA-OV
images are not merged at all): the thumbnail and the stitched, unpadded crops grid are two groups.
Newline tokens are not image content and a merged sequence has no rows left, so they are dropped
(``groups == -1``), as the pool baseline does. A float ``keep`` is a ratio shared by every group
(``round(n·keep)`` tokens, at least 1); an int ``keep`` is tokens per image spread over the groups in
proportion to their sizes (largest remainder, at least 1 each).

Metric. The features themselves (the LLaVA-OV path, where merging runs on the projected features).
The official LLaVA-1.5 path merges the pre-projector CLIP features with CLIP layer-23 keys as metric;
that metric is not a signal the adapters provide, so here the LLaVA-1.5 case also matches and merges
on the projected features (the kernel takes a separate metric: golden case am05 checks it).

Weighting. ``"unweighted"`` (default, official): every step averages plainly, so tokens absorbed early
weigh less (golden quirk 9). ``"size"``: size-weighted means, so each output is the plain mean of the
original tokens it holds. ``Selection.weights`` carries those sizes in both modes.

Positions (``Selection.indices``). Every output token takes the packed index of its **anchor**: the
original token the group was merged *into* (the last destination of the chain), or the unmerged source
itself. Anchors are distinct original tokens, so each output gets its own RoPE slot, and with
``positions="original"`` a merged token sits where one of its members sat. ``order="anchor"``
(default) emits the outputs in anchor order, so sequence order is spatial order again. ``"official"``
emits them in the official output order (unmerged sources first, by descending match score, then the
destinations) on the same sorted slots; combine with ``compress(..., positions="compact")`` to give the
LLM the official sequence exactly. With the shipped video schedule (every source merged at every
step) both orders coincide: output ``o`` is anchored at raster index ``4·o + 3`` (golden quirk 8).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_choice, check_keep, resolve_keep
from ..kernels._dispatch import BACKENDS
from ..kernels.merge import WEIGHTINGS, aim_merge
from ..registry import register
from ..tokens import Selection, VisualTokens
from .pool import split_budget

__all__ = ["AIMMerge", "aim_merge_schedule", "ORDERS"]

ORDERS: tuple[str, ...] = ("anchor", "official")


def aim_merge_schedule(t0: int, k: int) -> list[int]:
    """Per-step reductions taking ``t0`` tokens to ``k`` by halving: ``r = min(T // 2, T - k)``.

    ``aim_merge_schedule(196, 49) == [98, 49]``, ``aim_merge_schedule(576, 252) == [288, 36]``,
    ``aim_merge_schedule(169, 43) == [84, 42]``; ``k >= t0`` gives ``[]``.
    """
    if t0 < 0 or k < 1:
        raise ValueError(f"aim_merge_schedule: need t0 >= 0 and k >= 1, got t0={t0}, k={k}")
    out, t = [], t0
    while t > k:
        r = min(t // 2, t - k)
        out.append(r)
        t -= r
    return out


@register
@dataclasses.dataclass(frozen=True)
class AIMMerge(PreLLMMethod):
    """AIM's pre-LLM token merging (ICCV 2025, arXiv 2412.03248), per frame (module docstring).

    Attributes:
        keep: float ratio per merge group (default 0.25: the official video schedule 196 → 49) or int
            tokens per image.
        weighting: ``"unweighted"`` (official plain means) or ``"size"`` (size-weighted means).
        order: ``"anchor"`` (outputs in the order of their anchors' positions) or ``"official"``.
        backend: ``"auto" | "torch" | "triton"`` for the merge kernel.
    """

    name: ClassVar[str] = "aim_merge"
    summary: ClassVar[str] = "AIM per-frame iterative bipartite token merging (ICCV 2025, arXiv 2412.03248)"

    keep: int | float = 0.25
    weighting: str = "unweighted"
    order: str = "anchor"
    backend: str = "auto"

    def validate(self) -> None:
        check_keep(self.keep)
        check_choice(self.weighting, "weighting", WEIGHTINGS)
        check_choice(self.order, "order", ORDERS)
        check_choice(self.backend, "backend", BACKENDS)

    def select(self, tokens: VisualTokens) -> Selection:
        x = tokens.features
        dev = x.device
        views = [v for v in tokens.layout.views if v.name != "newline"]
        cells = [v.grid_indices().flatten() for v in views]  # packed indices, newlines excluded
        sizes = [c.numel() for c in cells]
        if isinstance(self.keep, float):
            budgets = [max(1, int(round(self.keep * n))) for n in sizes]
        else:
            budgets = split_budget(resolve_keep(self.keep, sum(sizes)), sizes)

        # groups of equal size and budget (video frames) merge together as one batch, as officially
        batches: dict[tuple[int, int], list[int]] = {}
        for g, (n, k) in enumerate(zip(sizes, budgets, strict=True)):
            batches.setdefault((n, k), []).append(g)
        per_group: list = [None] * len(cells)  # (features, sizes, slot, anchor) of every group
        for (n, k), members in batches.items():
            idx = torch.stack([cells[g] for g in members]).to(dev)  # [F, n]
            res = aim_merge(x[idx], aim_merge_schedule(n, k), weighting=self.weighting, backend=self.backend)
            for f, g in enumerate(members):
                per_group[g] = (res.features[f], res.sizes[f], res.slot[f], res.anchor[f])

        groups = torch.full((tokens.num_tokens,), -1, dtype=torch.long, device=dev)
        indices, feats, weights = [], [], []
        offset = 0
        for g, c in enumerate(cells):
            f, w, slot, anchor = per_group[g]
            perm = torch.argsort(anchor)  # anchor order: output u goes to the u-th smallest anchor
            if self.order == "anchor":
                f, w = f[perm], w[perm]
                slot = torch.argsort(perm)[slot]  # inverse permutation: old slot -> new slot
            c = c.to(dev)
            indices.append(c[anchor[perm]])
            feats.append(f)
            weights.append(w)
            groups[c] = slot + offset
            offset += f.shape[0]
        return Selection(
            indices=torch.cat(indices),
            features=torch.cat(feats),
            weights=torch.cat(weights),
            groups=groups,
        )
