"""Triton kernels of :mod:`mmcompress.kernels.merge_triton` (loaded on first use by
:func:`~mmcompress.kernels._dispatch.triton_module`; see ``merge_triton.py`` for the contract).

One bipartite merge step on ``F`` frames of ``T`` tokens, sources A = even positions, destinations B = odd:

* ``match_kernel`` (grid ``[F, n_a / BLOCK_A]``): cosine scores of a tile of sources against all
  destinations, tile by tile, never stored; keeps each source's best score and destination (strict
  ``>`` across tiles and ``tie_break_left`` inside one: the lowest destination wins a tie, like
  ``torch.max``). Scores are rounded to the input dtype before they are compared, as the reference's
  matmul in that dtype does.
* ranking: :func:`mmcompress.kernels.topk.topk_triton` (stable descending order of the best scores);
* ``plan_kernel`` (grid ``[F, n / BLOCK]``): output slot of every input token and the input token each
  output slot continues (pure index scatters, no conflicts);
* ``reduce_kernel`` (grid ``[F, T_out, C / BLOCK_C]``): each output is the (size-)weighted mean of its
  anchor and the merged sources whose slot is this output. A gather, not an atomic scatter: the sum order
  is fixed, so the result is deterministic run to run.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` (round to nearest even), returned in ``dtype``.

    bf16 is rounded with integer ops: Triton 3.9's interpreter truncates fp32 -> bf16 casts, while GPUs
    round to nearest even; the explicit rounding gives the same bits on both (finite inputs)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return v.to(dtype)


@triton.jit
def match_kernel(
    m_ptr,
    best_v_ptr,
    best_i_ptr,
    n_a,
    n_b,
    dim,
    s_f,
    s_t,
    s_d,
    SCORE_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    am = a < n_a
    m_f = m_ptr + f * s_f
    best_v = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(0, n_b, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bm = bb < n_b
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < dim
            xa = tl.load(
                m_f + (2 * a)[:, None] * s_t + dd[None, :] * s_d, mask=am[:, None] & dm[None, :], other=0.0
            )
            xb = tl.load(
                m_f + (2 * bb + 1)[:, None] * s_t + dd[None, :] * s_d,
                mask=bm[:, None] & dm[None, :],
                other=0.0,
            )
            # exact fp32 products (fp16 / bf16 widen exactly), fp32 sums; no TF32
            acc = tl.dot(xa.to(tl.float32), tl.trans(xb.to(tl.float32)), acc, input_precision="ieee")
        sc = _round_to(acc, SCORE_DTYPE).to(tl.float32)
        sc = tl.where(bm[None, :], sc, float("-inf"))
        tv = tl.max(sc, axis=1)
        ti = tl.argmax(sc, axis=1, tie_break_left=True) + b0
        upd = tv > best_v
        best_i = tl.where(upd, ti, best_i)
        best_v = tl.where(upd, tv, best_v)
    tl.store(best_v_ptr + f * n_a + a, best_v, mask=am)
    tl.store(best_i_ptr + f * n_a + a, best_i.to(tl.int64), mask=am)


@triton.jit
def plan_kernel(
    rank_ptr,
    best_i_ptr,
    slot_ptr,
    anchor_ptr,
    t,
    n_a,
    n_b,
    r,
    t_out,
    BLOCK: tl.constexpr,
):
    """Output order ``[unmerged sources in rank order] + [destinations in order]``; a merged source goes to
    its destination's slot."""
    f = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_unm = n_a - r
    # ranked sources: u-th best source a = rank[u]
    um = u < n_a
    a = tl.load(rank_ptr + f * n_a + u, mask=um, other=0)
    dst = tl.load(best_i_ptr + f * n_a + a, mask=um, other=0)
    merged = u < r
    slot_a = tl.where(merged, n_unm + dst, u - r)
    tl.store(slot_ptr + f * t + 2 * a, slot_a, mask=um)
    tl.store(anchor_ptr + f * t_out + (u - r), 2 * a, mask=um & (u >= r))
    # destinations keep their order after the unmerged sources
    bm = u < n_b
    tl.store(slot_ptr + f * t + 2 * u + 1, (n_unm + u).to(tl.int64), mask=bm)
    tl.store(anchor_ptr + f * t_out + n_unm + u, (2 * u + 1).to(tl.int64), mask=bm)


@triton.jit
def reduce_kernel(
    x_ptr,
    size_ptr,
    slot_ptr,
    anchor_ptr,
    out_ptr,
    size_out_ptr,
    t,
    n_a,
    n_unm,
    t_out,
    c,
    s_xf,
    s_xt,
    s_xc,
    WEIGHTED: tl.constexpr,
    SCAN: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < c
    x_f = x_ptr + f * s_xf
    anc = tl.load(anchor_ptr + f * t_out + j)
    size0 = tl.load(size_ptr + f * t + anc)
    w0 = size0.to(tl.float32) if WEIGHTED else tl.full((), 1.0, tl.float32)
    acc = w0 * tl.load(x_f + anc * s_xt + cc * s_xc, mask=cm, other=0.0).to(tl.float32)
    wsum = w0
    ssum = size0
    if j >= n_unm:
        # a destination: fold in every merged source whose slot is j, in source order. Scan the slots
        # SCAN at a time; only a block with a hit loads features, SUB rows at a time (small tiles)
        for a0 in range(0, n_a, SCAN):
            aa = a0 + tl.arange(0, SCAN)
            amk = aa < n_a
            hit = (tl.load(slot_ptr + f * t + 2 * aa, mask=amk, other=-1) == j) & amk
            if tl.sum(hit.to(tl.int32), axis=0) > 0:
                for a1 in range(a0, tl.minimum(a0 + SCAN, n_a), SUB):
                    ab = a1 + tl.arange(0, SUB)
                    abm = ab < n_a
                    h = (tl.load(slot_ptr + f * t + 2 * ab, mask=abm, other=-1) == j) & abm
                    sz = tl.load(size_ptr + f * t + 2 * ab, mask=h, other=0)
                    w = sz.to(tl.float32) if WEIGHTED else h.to(tl.float32)
                    xs = tl.load(
                        x_f + (2 * ab).to(tl.int64)[:, None] * s_xt + cc[None, :] * s_xc,
                        mask=h[:, None] & cm[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    acc += tl.sum(w[:, None] * xs, axis=0)
                    wsum += tl.sum(w, axis=0)
                    ssum += tl.sum(sz, axis=0)
    if not WEIGHTED:
        # the reference's scatter_reduce "mean" in x's dtype: fp32 sum rounded to the dtype, then divided
        acc = _round_to(acc, out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + (f * t_out + j) * c + cc, _round_to(acc / wsum, out_ptr.dtype.element_ty), mask=cm)
    if tl.program_id(2) == 0:
        tl.store(size_out_ptr + f * t_out + j, ssum)
