"""Triton kernels of :mod:`mmcompress.kernels.maxmin` (loaded on first use by
:func:`~mmcompress.kernels._dispatch.triton_module`; see ``maxmin.py`` for the contract).

Two launches per call, both batched over images:

* ``nn_*_kernel`` (grid ``[B, N / BLOCK_C]``): every column's nearest-neighbour distance, i.e. its
  second-smallest entry (the official ``topk(2, largest=False).values[1]``), from the matrix or from
  normalised features (``1 - x̂ᵢ·x̂ⱼ`` tiles, never stored);
* ``greedy_kernel`` (grid ``[B]``): one program per image runs all K picks. It keeps the running minimum
  ``r[j] = min over picks s of Dist[s, j]`` (in registers when N fits one block, else in a scratch row
  that stays in L1/L2) and, in the same pass that folds in the newest pick's row, takes the argmax for
  the next pick. O(K·N) reads and one launch, where the official loop re-reads all t picked rows at step
  t (Σt·N reads) with ~5 launches per step.

Every comparison runs in fp32 on values loaded in their own dtype: widening fp16 / bf16 is exact, and
``min`` / ``max`` / ``==`` are exact, so the picks equal the reference's in every dtype. ``argmax`` takes
the first maximal index (``tie_break_left``), and chunks are merged with a strict ``>``, so ties go to the
lowest index as with ``torch.argmax``.
"""

import triton
import triton.language as tl


@triton.jit
def _fold_two_smallest(v, m1, m2, BLOCK_R: tl.constexpr):
    """Merge the two smallest entries per column of the tile ``v [BLOCK_R, C]`` into ``(m1 <= m2)``.

    Second-smallest as a multiset (a repeated minimum counts twice), like ``topk(2).values[1]``."""
    t1 = tl.min(v, axis=0)
    first = tl.argmin(v, axis=0, tie_break_left=True)
    t2 = tl.min(tl.where(tl.arange(0, BLOCK_R)[:, None] == first[None, :], float("inf"), v), axis=0)
    m2 = tl.minimum(tl.minimum(m2, t2), tl.maximum(m1, t1))
    m1 = tl.minimum(m1, t1)
    return m1, m2


@triton.jit
def nn_matrix_kernel(d_ptr, nn_ptr, n, s_b, s_r, s_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < n
    d_b = d_ptr + b * s_b
    m1 = tl.full([BLOCK_C], float("inf"), tl.float32)
    m2 = tl.full([BLOCK_C], float("inf"), tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        msk = (rows < n)[:, None] & cm[None, :]
        ptrs = d_b + rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
        v = tl.load(ptrs, mask=msk, other=float("inf")).to(tl.float32)
        m1, m2 = _fold_two_smallest(v, m1, m2, BLOCK_R)
    tl.store(nn_ptr + b * n + cols, m2, mask=cm)


@triton.jit
def nn_features_kernel(
    x_ptr,
    nn_ptr,
    n,
    dim,
    s_b,
    s_n,
    s_d,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < n
    x_b = x_ptr + b * s_b
    m1 = tl.full([BLOCK_C], float("inf"), tl.float32)
    m2 = tl.full([BLOCK_C], float("inf"), tl.float32)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rm = rows < n
        acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < dim
            xr = tl.load(
                x_b + rows[:, None] * s_n + dd[None, :] * s_d, mask=rm[:, None] & dm[None, :], other=0.0
            )
            xc = tl.load(
                x_b + cols[:, None] * s_n + dd[None, :] * s_d, mask=cm[:, None] & dm[None, :], other=0.0
            )
            # fp32 products, no TF32: the distances must match the fp32 reference to rounding level
            acc = tl.dot(xr, tl.trans(xc), acc, input_precision="ieee")
        v = tl.where(rm[:, None], 1.0 - acc, float("inf"))
        m1, m2 = _fold_two_smallest(v, m1, m2, BLOCK_R)
    tl.store(nn_ptr + b * n + cols, m2, mask=cm)


@triton.jit
def _dist_row(
    src_b,
    s,
    cols,
    cm,
    dim,
    s_r,
    s_c,
    s_d,
    FEATURES: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Dist[s, cols] in fp32 (columns outside the matrix: -inf, so they never win an argmax)."""
    s = s.to(tl.int64)
    if FEATURES:
        acc = tl.zeros([BLOCK], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < dim
            xs = tl.load(src_b + s * s_r + dd * s_d, mask=dm, other=0.0)
            xc = tl.load(
                src_b + cols[:, None] * s_r + dd[None, :] * s_d, mask=cm[:, None] & dm[None, :], other=0.0
            )
            acc += tl.sum(xc * xs[None, :], axis=1)
        row = 1.0 - acc
    else:
        row = tl.load(src_b + s * s_r + cols * s_c, mask=cm, other=0.0).to(tl.float32)
    return tl.where(cm, row, float("-inf"))


@triton.jit
def greedy_kernel(
    src_ptr,
    nn_ptr,
    run_ptr,
    out_ptr,
    n,
    k,
    dim,
    s_b,
    s_r,
    s_c,
    s_d,
    FEATURES: tl.constexpr,
    EXCLUDE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    src_b = src_ptr + b * s_b
    nn_b = nn_ptr + b * n
    run_b = run_ptr + b * n
    out_b = out_ptr + b * k
    if SINGLE:
        # the whole running-minimum vector lives in registers
        cols = tl.arange(0, BLOCK)
        cm = cols < n
        s = tl.argmax(tl.load(nn_b + cols, mask=cm, other=float("-inf")), axis=0, tie_break_left=True)
        tl.store(out_b, s.to(tl.int64))
        run = _dist_row(src_b, s, cols, cm, dim, s_r, s_c, s_d, FEATURES, BLOCK, BLOCK_D)
        if EXCLUDE:
            run = tl.where(cols == s, float("-inf"), run)
        for t in range(1, k):
            s = tl.argmax(run, axis=0, tie_break_left=True)
            tl.store(out_b + t, s.to(tl.int64))
            run = tl.minimum(run, _dist_row(src_b, s, cols, cm, dim, s_r, s_c, s_d, FEATURES, BLOCK, BLOCK_D))
            if EXCLUDE:
                run = tl.where(cols == s, float("-inf"), run)
    else:
        # streamed: the running minimum sits in the scratch row (initialised to +inf by the launcher);
        # one pass per pick folds in the last pick's row, writes it back and takes the next argmax
        best_v = tl.full((), float("-inf"), tl.float32)
        best_i = tl.zeros((), tl.int32)
        for c0 in range(0, n, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            v = tl.load(nn_b + cols, mask=cols < n, other=float("-inf"))
            cv = tl.max(v, axis=0)
            ci = tl.argmax(v, axis=0, tie_break_left=True) + c0
            upd = cv > best_v  # strict: an earlier chunk keeps a tie
            best_i = tl.where(upd, ci, best_i)
            best_v = tl.where(upd, cv, best_v)
        s = best_i
        tl.store(out_b, s.to(tl.int64))
        for t in range(1, k):
            best_v = tl.full((), float("-inf"), tl.float32)
            best_i = tl.zeros((), tl.int32)
            for c0 in range(0, n, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                cm = cols < n
                r = tl.load(run_b + cols, mask=cm, other=float("-inf"))
                r = tl.minimum(r, _dist_row(src_b, s, cols, cm, dim, s_r, s_c, s_d, FEATURES, BLOCK, BLOCK_D))
                if EXCLUDE:
                    r = tl.where(cols == s, float("-inf"), r)
                tl.store(run_b + cols, r, mask=cm)
                cv = tl.max(r, axis=0)
                ci = tl.argmax(r, axis=0, tie_break_left=True) + c0
                upd = cv > best_v
                best_i = tl.where(upd, ci, best_i)
                best_v = tl.where(upd, cv, best_v)
            # the next pass re-reads the scratch row; make this pass's writes visible to every thread
            tl.debug_barrier()
            s = best_i
            tl.store(out_b + t, s.to(tl.int64))
