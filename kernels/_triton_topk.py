"""Triton kernels of :mod:`mmcompress.kernels.topk` (loaded on first use by
:func:`~mmcompress.kernels._dispatch.triton_module`; see ``topk.py`` for the contract and the algorithm)."""

import triton
import triton.language as tl


@triton.jit
def _key(x, MASK: tl.constexpr):
    """fp32 -> int32 key with the order of the floats: NaN lowest, -0.0 == +0.0.

    Positive floats keep their bits; negative ones flip the magnitude bits. MASK clears the low bits
    that a widened fp16 / bf16 value never sets (for negatives they would read as ones)."""
    x = x + 0.0  # -0.0 + 0.0 == +0.0 under round-to-nearest: one key for both zeros
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x != x, -2147483648, key)
    return key & MASK


@triton.jit
def _count_ge(x_ptr, n, stride_n, thr, MASK: tl.constexpr, BLOCK: tl.constexpr):
    cnt = tl.zeros((), tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        key = _key(tl.load(x_ptr + offs * stride_n, mask=m, other=float("nan")).to(tl.float32), MASK)
        cnt += tl.sum(((key >= thr) & m).to(tl.int32), axis=0)
    return cnt


@triton.jit
def select_kernel(
    x_ptr,
    k_ptr,
    idx_ptr,
    val_ptr,
    n,
    stride_xb,
    stride_xn,
    stride_ob,
    MASK: tl.constexpr,
    LOW_BIT: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.load(k_ptr + row).to(tl.int32)
    x_row = x_ptr + row * stride_xb
    if kk > 0:
        # T (unsigned key space, int64 scalar) = largest value with #(key >= T) >= kk, built MSB first
        offs0 = tl.arange(0, BLOCK)
        m0 = offs0 < n
        key0 = _key(tl.load(x_row + offs0 * stride_xn, mask=m0, other=float("nan")).to(tl.float32), MASK)
        t_u = tl.zeros((), tl.int64)
        for i in range(0, 32 - LOW_BIT):
            cand = t_u + (tl.full((), 1, tl.int64) << (31 - i))
            cand_s = (cand - 2147483648).to(tl.int32)
            if SINGLE:
                cnt = tl.sum(((key0 >= cand_s) & m0).to(tl.int32), axis=0)
            else:
                cnt = _count_ge(x_row, n, stride_xn, cand_s, MASK, BLOCK)
            t_u = tl.where(cnt >= kk, cand, t_u)
        thr = (t_u - 2147483648).to(tl.int32)  # the k-th largest key
        if SINGLE:
            n_gt = tl.sum(((key0 > thr) & m0).to(tl.int32), axis=0)
        else:
            n_gt = _count_ge(x_row, n, stride_xn, thr + 1, MASK, BLOCK)  # thr < max key, no overflow
        need = kk - n_gt  # ties at the threshold to take, lowest index first
        pos = tl.zeros((), tl.int32)
        ties = tl.zeros((), tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            raw = tl.load(x_row + offs * stride_xn, mask=m, other=float("nan"))
            key = _key(raw.to(tl.float32), MASK)
            gt = ((key > thr) & m).to(tl.int32)
            eq = ((key == thr) & m).to(tl.int32)
            tie_rank = ties + tl.cumsum(eq, axis=0) - eq
            sel = gt | (eq & (tie_rank < need).to(tl.int32))
            opos = pos + tl.cumsum(sel, axis=0) - sel
            keep = sel != 0
            tl.store(idx_ptr + row * stride_ob + opos, offs.to(tl.int64), mask=keep)
            tl.store(val_ptr + row * stride_ob + opos, raw, mask=keep)
            pos += tl.sum(sel, axis=0)
            ties += tl.sum(eq, axis=0)


@triton.jit
def sort_kernel(
    x_ptr,
    k_ptr,
    src_ptr,
    idx_ptr,
    val_ptr,
    stride_xb,
    stride_xn,
    stride_ob,
    MASK: tl.constexpr,
    KB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kk = tl.load(k_ptr + row).to(tl.int32)
    j = tl.arange(0, KB)
    m = j < kk
    x_row = x_ptr + row * stride_xb
    src = tl.load(src_ptr + row * stride_ob + j, mask=m, other=0)
    key = _key(tl.load(x_row + src * stride_xn, mask=m, other=0.0).to(tl.float32), MASK)
    # unique int64 keys (value key, then the index reversed) give a total order: value descending,
    # ties lowest index first; empty slots (-2^63) sort last
    packed = (key.to(tl.int64) << 32) + (2147483647 - src)
    packed = tl.where(m, packed, -9223372036854775808)
    packed = tl.sort(packed, descending=True)
    out = 2147483647 - (packed & 0x7FFFFFFF)
    tl.store(idx_ptr + row * stride_ob + j, out, mask=m)
    tl.store(val_ptr + row * stride_ob + j, tl.load(x_row + out * stride_xn, mask=m), mask=m)
