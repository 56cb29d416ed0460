"""Greedy max-min diversity selection (DivPrune's selection loop): plain-torch reference and Triton path.

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
The Triton kernels (``_triton_maxmin.py``: one program per image keeps the running minimum on chip and
fuses the argmax into the pass that folds in each pick's row) give the identical pick sequence.

Two inputs: a precomputed distance matrix (:func:`greedy_maxmin`, DivPrune's path: bit parity needs the
official fp16 ``Dist``), or features whose cosine distances ``1 - x̂ᵢ·x̂ⱼ`` are computed on the fly in fp32
and never stored (:func:`greedy_maxmin_cosine`: O(N·D) memory instead of O(N²), e.g. N = 32k, where the
matrix alone is 4 GB in fp32; each pick then reads all N·D features instead of one N-row, so the matrix
path should be the faster one whenever the matrix fits; ``mmcompress bench kernels`` times both on a GPU).
"""

from __future__ import annotations

import torch

from ._dispatch import check_float, next_power_of_2, resolve_backend, triton_module

__all__ = [
    "greedy_maxmin",
    "greedy_maxmin_torch",
    "greedy_maxmin_triton",
    "greedy_maxmin_cosine",
    "greedy_maxmin_cosine_torch",
    "greedy_maxmin_cosine_triton",
]

#: the Triton greedy loop keeps the running minimum in registers up to this many candidates per image
_MAX_RESIDENT = 4096


def _check_k(k: int, n: int, exclude_picked: bool) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"greedy_maxmin: k={k!r} must be an int >= 0")
    if exclude_picked and k > n:
        raise ValueError(
            f"greedy_maxmin: k={k} exceeds the {n} candidates (exclude_picked=True never repeats)"
        )


def _check_dist(dist: torch.Tensor) -> None:
    if not isinstance(dist, torch.Tensor):
        raise TypeError(f"greedy_maxmin: dist must be a torch.Tensor, got {type(dist).__name__}")
    if dist.dim() not in (2, 3) or dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"greedy_maxmin: dist must be [N, N] or [B, N, N], got shape {tuple(dist.shape)}")
    if not dist.is_floating_point():
        raise TypeError(f"greedy_maxmin: dist must be a float tensor, got {dist.dtype}")


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
    _check_dist(dist)
    squeeze = dist.dim() == 2
    d = dist.unsqueeze(0) if squeeze else dist
    bsz, n = d.shape[0], d.shape[-1]
    _check_k(k, n, exclude_picked)

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


def _launch(
    src: torch.Tensor,
    k: int,
    exclude_picked: bool,
    features: bool,
    block: int | None,
) -> torch.Tensor:
    """Run both Triton kernels on ``src``: ``[B, N, N]`` distances or ``[B, N, D]`` unit-norm fp32 rows."""
    bsz, n = src.shape[0], src.shape[1]
    out = torch.empty(bsz, k, dtype=torch.long, device=src.device)
    if k == 0 or bsz == 0:
        return out
    kern = triton_module("_triton_maxmin")
    dim = src.shape[2] if features else 0
    nn = torch.empty(bsz, n, dtype=torch.float32, device=src.device)
    bc = 64 if features else min(next_power_of_2(n), 128)
    if features:
        bd = max(16, min(next_power_of_2(dim), 64))  # tl.dot needs every block dim >= 16
        kern.nn_features_kernel[(bsz, -(-n // bc))](
            src, nn, n, dim, src.stride(0), src.stride(1), src.stride(2), BLOCK_R=32, BLOCK_C=bc, BLOCK_D=bd
        )
    else:
        kern.nn_matrix_kernel[(bsz, -(-n // bc))](
            src, nn, n, src.stride(0), src.stride(1), src.stride(2), BLOCK_R=32, BLOCK_C=bc
        )
    blk = block or min(next_power_of_2(n), _MAX_RESIDENT if not features else 512)
    if blk & (blk - 1):
        raise ValueError(f"greedy_maxmin: _block={blk} must be a power of two")
    single = n <= blk
    # features: a [blk, bd_row] tile of X per step of the row computation; keep it near 8k elements
    bd_row = max(16, min(next_power_of_2(max(dim, 1)), 8192 // blk))
    # scratch for the streamed path: running minimum starts at +inf (the first pass takes pick 0's row)
    run = nn if single else torch.full((bsz, n), float("inf"), dtype=torch.float32, device=src.device)
    # stride(2) is the column stride of a matrix and the feature stride of [B, N, D]; each mode reads one
    kern.greedy_kernel[(bsz,)](
        src, nn, run, out, n, k, dim, src.stride(0), src.stride(1), src.stride(2), src.stride(2),
        FEATURES=features, EXCLUDE=exclude_picked, BLOCK=blk, BLOCK_D=bd_row,
        SINGLE=single, num_warps=4 if blk <= 1024 else 8,
    )  # fmt: skip
    return out


def greedy_maxmin_triton(
    dist: torch.Tensor, k: int, *, exclude_picked: bool, _block: int | None = None
) -> torch.Tensor:
    """Triton version of :func:`greedy_maxmin_torch` (same contract, identical picks).

    ``dist`` must be float16 / bfloat16 / float32 (any strides). ``_block`` (a power of two) forces the
    greedy loop's block size; tests use a small one to exercise the streamed path.
    """
    _check_dist(dist)
    check_float(dist, "dist", "greedy_maxmin")
    squeeze = dist.dim() == 2
    d = dist.unsqueeze(0) if squeeze else dist
    _check_k(k, d.shape[-1], exclude_picked)
    out = _launch(d, k, exclude_picked, features=False, block=_block)
    return out[0] if squeeze else out


def greedy_maxmin(dist: torch.Tensor, k: int, *, exclude_picked: bool, backend: str = "auto") -> torch.Tensor:
    """Dispatching entry point: same contract as :func:`greedy_maxmin_torch`, plus: NaN distances raise.

    ``backend="auto"`` runs the Triton kernels on CUDA (when Triton imports) and the torch reference
    elsewhere; both give the same picks. The Triton path takes float16 / bfloat16 / float32.

    Raises:
        ValueError: bad shape, bad ``k``, or a NaN in ``dist`` (a NaN has no place in a max-min order; the
            reference would let it win every argmax).
        TypeError: non-float ``dist`` (Triton path: not float16 / bfloat16 / float32).
        RuntimeError: ``backend="triton"`` where it cannot run (see ``resolve_backend``).
    """
    _check_dist(dist)
    resolved = resolve_backend(backend, dist.device)
    if bool(torch.isnan(dist).any()):
        raise ValueError("greedy_maxmin: dist contains NaN; distances must be numbers (inf is allowed)")
    if resolved == "triton":
        return greedy_maxmin_triton(dist, k, exclude_picked=exclude_picked)
    return greedy_maxmin_torch(dist, k, exclude_picked=exclude_picked)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` / ``[B, N, D]`` -> fp32 rows of unit L2 norm; rejects what has no cosine distance."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"greedy_maxmin_cosine: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"greedy_maxmin_cosine: x must be [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    check_float(x, "x", "greedy_maxmin_cosine")
    if x.shape[-1] == 0 and x.shape[-2] > 0:
        raise ValueError("greedy_maxmin_cosine: x has D=0 features; cosine distance is undefined")
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("greedy_maxmin_cosine: x contains NaN or inf")
    norm = xf.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("greedy_maxmin_cosine: x has a zero-norm row; its cosine distance is undefined")
    return xf / norm


def greedy_maxmin_cosine_torch(x: torch.Tensor, k: int, *, exclude_picked: bool) -> torch.Tensor:
    """Reference for :func:`greedy_maxmin_cosine`: the fp32 matrix ``1 - X̂X̂ᵀ``, then the greedy loop."""
    xn = _unit_rows(x)
    return greedy_maxmin_torch(1.0 - xn @ xn.transpose(-1, -2), k, exclude_picked=exclude_picked)


def greedy_maxmin_cosine_triton(
    x: torch.Tensor, k: int, *, exclude_picked: bool, _block: int | None = None
) -> torch.Tensor:
    """Triton :func:`greedy_maxmin_cosine`: distances computed on the fly, never stored."""
    xn = _unit_rows(x)
    squeeze = xn.dim() == 2
    xb = xn.unsqueeze(0) if squeeze else xn
    _check_k(k, xb.shape[1], exclude_picked)
    out = _launch(xb, k, exclude_picked, features=True, block=_block)
    return out[0] if squeeze else out


def greedy_maxmin_cosine(
    x: torch.Tensor, k: int, *, exclude_picked: bool, backend: str = "auto"
) -> torch.Tensor:
    """Greedy max-min selection on cosine distances of features, without materialising ``[N, N]``.

    Same selection rule as :func:`greedy_maxmin_torch` on ``Dist = 1 - X̂X̂ᵀ`` with ``X̂`` the rows of ``x``
    normalised in fp32 and every distance in fp32 (so not DivPrune's fp16 bit-parity path, which needs
    the matrix in the model dtype: use :func:`greedy_maxmin` there).

    Args:
        x: ``[N, D]`` or ``[B, N, D]`` float16 / bfloat16 / float32 features, finite, no zero row.
        k: picks per image; ``0 <= k`` and, with ``exclude_picked``, ``k <= N``.
        exclude_picked: as in :func:`greedy_maxmin_torch`.
        backend: ``"auto" | "torch" | "triton"``. The torch path builds the fp32 matrix.

    Returns:
        ``[K]`` / ``[B, K]`` int64 indices in pick order. The two backends agree exactly unless two
        candidates' scores are within fp32 rounding (~1e-6) of each other, since the dot products are
        summed in a different order.
    """
    device = x.device if isinstance(x, torch.Tensor) else "cpu"
    if resolve_backend(backend, device) == "triton":
        return greedy_maxmin_cosine_triton(x, k, exclude_picked=exclude_picked)
    return greedy_maxmin_cosine_torch(x, k, exclude_picked=exclude_picked)
