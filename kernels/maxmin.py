"""Greedy max-min diversity selection (DivPrune's selection loop), plain-torch reference.

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175; spec ``divprune-aim-zipvl-kvquant.md`` §1.2-1.3)
picks K tokens by the classic greedy 2-approximation of the Max-Min Diversity Problem on a distance
matrix ``Dist``:

* pick 0: the token whose nearest neighbour is farthest, i.e. argmax over columns of the column's
  second-smallest entry (the smallest being taken as the self-distance, as the official code does);
* pick t: argmax over columns j of ``min_{s picked} Dist[s, j]``.

The official loop re-gathers all t picked rows and re-takes their minimum at every step (Σt·N ≈ K²N/2
reads, ~5 launches per step). Here one running minimum vector per image is updated with a single row per
pick, which is O(K·N) and gives bitwise the same scores: ``min`` is exact in every dtype, so
``min(min(a, b), c) == min(a, b, c)`` and the argmaxes (first index on ties, like ``torch.argmax``) match.
The Triton kernel (one program per image keeping the running minimum on chip) will live beside this
reference; until it lands, ``backend="auto"`` runs this reference everywhere.
"""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend

__all__ = ["greedy_maxmin_torch", "greedy_maxmin"]


def greedy_maxmin_torch(dist: torch.Tensor, k: int, *, exclude_picked: bool) -> torch.Tensor:
    """Greedy max-min selection on one or a batch of distance matrices (spec §1.2 steps 3-4).

    Args:
        dist: ``[N, N]`` or ``[B, N, N]`` distances, any float dtype; row ``s`` of ``dist`` is what a pick
            ``s`` contributes to the running minimum (as in the official ``index_select(Dist, 0, s)``).
            Every comparison happens in ``dist.dtype`` (no upcast), which fp16 bit-parity needs.
        k: picks per image, ``0 <= k``; with ``exclude_picked`` also ``k <= N``.
        exclude_picked: ``True`` sets a picked column's score to ``-inf`` so no token is picked twice.
            ``False`` is the official behaviour: a picked token keeps its self-distance as score
            (≈0, not exactly 0 in low precision), so once diversity saturates an already picked index can
            win again and is then returned for every remaining pick.

    Returns:
        ``[K]`` (or ``[B, K]``) int64 indices **in pick order**, on ``dist``'s device.
    """
    if dist.dim() not in (2, 3) or dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"greedy_maxmin: dist must be [N, N] or [B, N, N], got shape {tuple(dist.shape)}")
    if not dist.is_floating_point():
        raise TypeError(f"greedy_maxmin: dist must be a float tensor, got {dist.dtype}")
    squeeze = dist.dim() == 2
    d = dist.unsqueeze(0) if squeeze else dist
    bsz, n = d.shape[0], d.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"greedy_maxmin: k={k!r} must be an int >= 0")
    if exclude_picked and k > n:
        raise ValueError(
            f"greedy_maxmin: k={k} exceeds the {n} candidates (exclude_picked=True never repeats)"
        )

    out = torch.empty(bsz, k, dtype=torch.long, device=d.device)
    if k == 0 or bsz == 0:
        return out[0] if squeeze else out
    rows = torch.arange(bsz, device=d.device)

    # Pick 0: each column's nearest-neighbour distance = its second-smallest entry (official
    # `topk(2, dim=0, largest=False).values[1]`). With a single candidate there is no neighbour; take it.
    if n == 1:
        s = torch.zeros(bsz, dtype=torch.long, device=d.device)
    else:
        nn_dist = torch.topk(d, 2, dim=-2, largest=False).values[:, 1, :]  # [B, N]
        s = nn_dist.argmax(dim=-1)
    out[:, 0] = s
    # running[b, j] = min over picks s of Dist[s, j]; a gathered row is a copy, so in-place edits are safe
    running = d[rows, s]  # [B, N]
    if exclude_picked:
        running[rows, s] = float("-inf")  # stays -inf under every later minimum
    for i in range(1, k):
        s = running.argmax(dim=-1)  # first maximal index on ties, as the official torch.argmax
        out[:, i] = s
        running = torch.minimum(running, d[rows, s])
        if exclude_picked:
            running[rows, s] = float("-inf")
    return out[0] if squeeze else out


def greedy_maxmin(dist: torch.Tensor, k: int, *, exclude_picked: bool, backend: str = "auto") -> torch.Tensor:
    """Dispatching entry point: same contract as :func:`greedy_maxmin_torch`.

    ``backend="auto"`` runs the torch reference until the Triton kernel exists; an explicit
    ``backend="triton"`` raises rather than silently timing the reference.
    """
    resolved = resolve_backend(backend, dist.device)
    if resolved == "triton" and backend == "triton":
        raise NotImplementedError(
            "greedy_maxmin: the Triton max-min kernel is not written yet (it lands in "
            "issue 5); use backend='torch' or 'auto'"
        )
    return greedy_maxmin_torch(dist, k, exclude_picked=exclude_picked)
