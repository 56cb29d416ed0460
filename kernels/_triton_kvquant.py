"""Triton kernels of :mod:`mmcompress.kernels.kvquant` (loaded on first use by
:func:`~mmcompress.kernels._dispatch.triton_module`; ``kvquant.py`` has the format and the launchers).

The launchers view the input as ``[P, n, Q]``: ``P`` = the dimensions before the quantized axis (up to
three of them after merging, each with its own stride, so the cache's transposed ``[nb, H, G, D]`` blocks
are read in place), ``n`` = the axis, split into groups of ``G``, ``Q`` = the dimensions after it (one
stride). A *row* is one group of one ``p``: ``r = p · (n / G) + group``. Outputs are contiguous.

* ``quantize_kernel`` (1-D grid over tiles of ``BR`` rows × ``BQ`` columns): min / max over each group,
  zero rounded down and scale rounded up to the scale dtype, codes, packed bytes, all in one pass over
  ``x`` when a group fits one chunk of ``CH`` elements (``SINGLE``), else a min/max pass and a code pass;
* ``dequantize_kernel`` (tiles of ``BR`` rows × ``CH`` elements × ``BQ`` columns): unpack, ``fma``, cast;
* ``decode_attn_kernel`` (grid ``[B · Hkv, splits]``): one query token per sequence against per-channel
  quantized keys and per-token quantized values, dequantized in registers block by block (online softmax,
  flash-decoding splits merged by the launcher), never writing a dequantized cache.

Bit-exactness with the torch reference (``quantize_torch`` / ``dequantize_torch`` on CPU), by construction:

* min / max are exact; ``x - zero`` is one fp32 subtraction as in torch;
* divisions use ``tl.div_rn`` (IEEE round-to-nearest; Triton's ``/`` lowers to the approximate
  ``div.full.f32`` on NVIDIA GPUs);
* ``round`` is round-half-to-even like ``torch.round``, written out with ``floor`` (exact) and
  comparisons, so it does not depend on a libdevice ``rint`` the interpreter may lack;
* directed rounding to fp16 / bf16 (``_round_dir``) is done on the bit patterns; bf16 conversions
  (widen, directed rounding, round-to-nearest-even for outputs) use integer ops only, because the
  Triton interpreter converts fp32 → bf16 by truncation;
* dequantize computes ``fma(code, scale, zero)``: for fp16 / bf16 scales ``code · scale`` has at most
  8 + 11 significant bits, so it is exact in fp32 and an fma equals a multiply then an add; for fp32
  scales one fma is what torch's CPU ``addcmul`` computes (checked in the tests to within 1 ulp).
"""

import triton
import triton.language as tl


@triton.jit
def _widen(v, BF16: tl.constexpr):
    """fp16 / bf16 / fp32 -> fp32, exactly (bf16 by a 16-bit shift of its bit pattern)."""
    if BF16:
        w = (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        w = v.to(tl.float32)
    return w


@triton.jit
def _narrow(v, OKIND: tl.constexpr):
    """fp32 -> the output dtype (0 fp32, 1 fp16, 2 bf16), round to nearest even like ``Tensor.to``."""
    if OKIND == 0:
        o = v
    elif OKIND == 1:
        o = v.to(tl.float16)
    else:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # add half an ulp (ties to even), keep the top half
        o = b.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return o


@triton.jit
def _round_dir(v, SKIND: tl.constexpr, UP: tl.constexpr):
    """fp32 ``v`` -> ``(stored, as_fp32)`` in the scale dtype (0 fp32, 1 fp16, 2 bf16), rounded toward
    +inf (``UP``) or -inf: the reference's ``_round_to`` (round to nearest, then one ``nextafter`` step
    when that landed on the wrong side), which is the directed rounding of ``v``."""
    if SKIND == 0:
        s = v
        f = v
    elif SKIND == 1:
        r = v.to(tl.float16)
        rf = r.to(tl.float32)
        off = rf < v if UP else rf > v
        # fp16 bits as a sign-extended int: positives grow with the value, negatives (sign bit set)
        # grow with the magnitude; -0.0 is -32768
        b = r.to(tl.int16, bitcast=True).to(tl.int32)
        if UP:
            nxt = tl.where(b >= 0, b + 1, tl.where(b == -32768, 1, b - 1))
        else:
            nxt = tl.where(b > 0, b - 1, tl.where(b == 0, -32767, b + 1))
        b = tl.where(off, nxt, b)
        s = b.to(tl.int16).to(tl.float16, bitcast=True)
        f = s.to(tl.float32)
    else:
        # bf16 is the top half of fp32: truncation rounds toward zero; step one bf16 ulp away from zero
        # where that is the wrong direction (positives rounded up, negatives rounded down)
        b = v.to(tl.int32, bitcast=True)
        t = b & -65536
        away = (t != b) & ((b >= 0) if UP else (b < 0))
        t = tl.where(away, t + 65536, t)
        s = (t >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        f = t.to(tl.float32, bitcast=True)
    return s, f


@triton.jit
def _round_half_even(y):
    """``torch.round`` of fp32 ``y`` (ties to even), exactly: ``y - floor(y)`` is exact in fp32. (On
    NVIDIA, ``floor`` flushes subnormals to zero; ``y >= 0`` here, where that still gives ``floor = 0``.)"""
    fl = tl.floor(y)
    d = y - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    return fl + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _row_origin(r, NG, G, S1, S2, sx0, sx1, sx2, sxn):
    """Input offset of element 0 of row ``r`` (int64): ``p = r // NG`` split over the (up to) three
    leading dimensions, plus the group's start along the axis."""
    p = r // NG
    gi = r - p * NG
    p2 = p % S2
    p1 = (p // S2) % S1
    p0 = p // (S2 * S1)
    return p0 * sx0 + p1 * sx1 + p2 * sx2 + gi * G * sxn


@triton.jit
def _load_chunk(x_ptr, origin, q, rq_mask, e0, G, sxn, sxq, CH: tl.constexpr, XBF16: tl.constexpr):
    """Elements ``e0 .. e0 + CH`` of each row's group as fp32 ``[BR, CH, BQ]``, with the valid mask."""
    e = e0 + tl.arange(0, CH).to(tl.int64)[None, :, None]
    m = rq_mask & (e < G)
    v = tl.load(x_ptr + origin + e * sxn + q * sxq, mask=m, other=0.0)
    return _widen(v, XBF16), m


@triton.jit
def _store_codes(
    packed_ptr, xf, zf, sf, r, q, rq_mask, e0, G, GB, Q,
    BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr,
    BR: tl.constexpr, CH: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    """Codes of one chunk, packed ``PER`` per byte (code ``j`` of a byte in bits ``[j·BITS, (j+1)·BITS)``)
    and stored; bytes past the group end (the chunk's padding) are masked out."""
    pos = sf > 0
    y = tl.div_rn(xf - zf, tl.where(pos, sf, 1.0))
    c = tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS)
    c = tl.where(pos, c, 0.0)  # a constant group stores code 0 (its value is the zero)
    shift = ((tl.arange(0, CH) % PER) * BITS)[None, :, None]
    ci = c.to(tl.int32) << shift
    # the fields of one byte are PER consecutive elements: disjoint bits, so the sum is an OR
    byte = tl.sum(tl.reshape(ci, [BR, CH // PER, PER, BQ]), axis=2)
    jb = tl.arange(0, CH // PER).to(tl.int64)[None, :, None]
    m = rq_mask & (e0 + jb * PER < G)
    tl.store(packed_ptr + (r * GB + e0 // PER + jb) * Q + q, byte.to(tl.uint8), mask=m)


@triton.jit
def quantize_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr,
    n_rows, NQ, NG, G, GB, Q, S1, S2, sx0, sx1, sx2, sxn, sxq,
    BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr, SKIND: tl.constexpr,
    XBF16: tl.constexpr, BR: tl.constexpr, CH: tl.constexpr, BQ: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    pr = pid // NQ
    r = (pr * BR + tl.arange(0, BR))[:, None, None]
    q = ((pid - pr * NQ) * BQ + tl.arange(0, BQ))[None, None, :]
    rq_mask = (r < n_rows) & (q < Q)
    origin = _row_origin(r, NG, G, S1, S2, sx0, sx1, sx2, sxn)
    if SINGLE:
        xf, m = _load_chunk(x_ptr, origin, q, rq_mask, 0, G, sxn, sxq, CH, XBF16)
        mn = tl.min(tl.where(m, xf, float("inf")), axis=1, keep_dims=True)
        mx = tl.max(tl.where(m, xf, float("-inf")), axis=1, keep_dims=True)
        nan = tl.max((m & (xf != xf)).to(tl.int32), axis=1, keep_dims=True)
    else:
        mn = tl.full([BR, 1, BQ], float("inf"), tl.float32)
        mx = tl.full([BR, 1, BQ], float("-inf"), tl.float32)
        nan = tl.zeros([BR, 1, BQ], tl.int32)
        for e0 in range(0, G, CH):
            xc, mc = _load_chunk(x_ptr, origin, q, rq_mask, e0, G, sxn, sxq, CH, XBF16)
            mn = tl.minimum(mn, tl.min(tl.where(mc, xc, float("inf")), axis=1, keep_dims=True))
            mx = tl.maximum(mx, tl.max(tl.where(mc, xc, float("-inf")), axis=1, keep_dims=True))
            nan = tl.maximum(nan, tl.max((mc & (xc != xc)).to(tl.int32), axis=1, keep_dims=True))
    # torch's amin propagates NaN, a GPU min may drop it: force it, so the launcher's finiteness check
    # raises as the reference does
    mn = tl.where(nan > 0, float("nan"), mn)
    # rows / columns past the end: finite stand-ins (their results are never stored)
    mn = tl.where(rq_mask, mn, 0.0)
    mx = tl.where(rq_mask, mx, 0.0)
    zs, zf = _round_dir(mn, SKIND, False)  # zero <= min
    levels = tl.full([BR, 1, BQ], LEVELS, tl.float32)
    ss, sf = _round_dir(tl.div_rn(mx - zf, levels), SKIND, True)  # zero + LEVELS·scale >= max
    tl.store(zero_ptr + r * Q + q, zs, mask=rq_mask)
    tl.store(scale_ptr + r * Q + q, ss, mask=rq_mask)
    if SINGLE:
        _store_codes(packed_ptr, xf, zf, sf, r, q, rq_mask, 0, G, GB, Q, BITS, PER, LEVELS, BR, CH, BQ)
    else:
        for e0 in range(0, G, CH):
            xc, mc = _load_chunk(x_ptr, origin, q, rq_mask, e0, G, sxn, sxq, CH, XBF16)
            _store_codes(packed_ptr, xc, zf, sf, r, q, rq_mask, e0, G, GB, Q, BITS, PER, LEVELS, BR, CH, BQ)


@triton.jit
def dequantize_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr,
    n_rows, NQ, NC, G, GB, Q,
    BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr, SBF16: tl.constexpr,
    OKIND: tl.constexpr, BR: tl.constexpr, CH: tl.constexpr, BQ: tl.constexpr,
):  # fmt: skip
    # inputs and output contiguous: packed [P, n / PER, Q], scale / zero [P, n / G, Q], out [P, n, Q]
    pid = tl.program_id(0).to(tl.int64)
    pc = pid % NC
    rest = pid // NC
    pq = rest % NQ
    pr = rest // NQ
    r = (pr * BR + tl.arange(0, BR))[:, None, None]
    q = (pq * BQ + tl.arange(0, BQ))[None, None, :]
    e = pc * CH + tl.arange(0, CH).to(tl.int64)[None, :, None]
    rq_mask = (r < n_rows) & (q < Q)
    m = rq_mask & (e < G)
    s = _widen(tl.load(scale_ptr + r * Q + q, mask=rq_mask, other=0.0), SBF16)
    z = _widen(tl.load(zero_ptr + r * Q + q, mask=rq_mask, other=0.0), SBF16)
    # each byte is read by its PER elements (same address within a warp: one transaction)
    byte = tl.load(packed_ptr + (r * GB + e // PER) * Q + q, mask=m, other=0).to(tl.int32)
    code = (byte >> ((e % PER) * BITS).to(tl.int32)) & LEVELS
    v = tl.fma(code.to(tl.float32), s, z)
    tl.store(out_ptr + (r * G + e) * Q + q, _narrow(v, OKIND), mask=m)


# -- fused dequantize-and-attend for decoding ---------------------------------------------------------------


@triton.jit
def _operand(x, QKIND: tl.constexpr, F32DOT: tl.constexpr):
    """fp32 ``x`` rounded to the query's dtype (what dequantize-to-``q.dtype`` then SDPA multiplies), kept
    in that dtype for a tensor-core dot, or widened back to fp32 (``F32DOT``: fp32 queries, and the
    interpreter, whose ``dot`` cannot read bf16)."""
    if QKIND == 0:
        y = x
    else:
        y = _narrow(x, QKIND)
        if F32DOT:
            y = _widen(y, QKIND == 2)
    return y


@triton.jit
def _dot(a, b, F32DOT: tl.constexpr):
    return tl.dot(a, b, input_precision="ieee") if F32DOT else tl.dot(a, b)


@triton.jit
def decode_attn_kernel(
    q_ptr, kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, lse_ptr,
    HKV, REP, T, D, KG, VG, span, sm_scale, sqb, sqh,
    KBITS: tl.constexpr, KPER: tl.constexpr, VBITS: tl.constexpr, VPER: tl.constexpr,
    KSBF16: tl.constexpr, VSBF16: tl.constexpr,
    QKIND: tl.constexpr, F32DOT: tl.constexpr, NSPLIT: tl.constexpr,
    BH: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    # one program per (sequence, KV head, split of the tokens): its REP query heads share every K / V
    # byte it reads. K: packed [B, HKV, T / KPER, D] (codes along tokens), scale / zero
    # [B, HKV, T / KG, D]; V: packed [B, HKV, T, D / VPER] (codes along channels), scale / zero
    # [B, HKV, T, D / VG]; all contiguous. Writes the split's normalised output and log-sum-exp.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid // HKV
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), T)
    start = split * span
    end = tl.minimum(start + span, length)
    hh = tl.arange(0, BH)
    dd = tl.arange(0, BD)
    hm = hh < REP
    dm = dd < D
    qh = (pid - b * HKV) * REP + hh  # query heads of this KV head
    q = tl.load(q_ptr + b * sqb + qh[:, None] * sqh + dd[None, :], mask=hm[:, None] & dm[None, :], other=0.0)
    if F32DOT:
        q = _widen(q, QKIND == 2)
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BD], tl.float32)
    kbase = pid * T * D  # [B, HKV] are the leading dims of every tensor; T·D elements per head
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        tm = t < end
        m2 = tm[:, None] & dm[None, :]
        t2 = t[:, None].to(tl.int64)
        d2 = dd[None, :]
        # keys: token t's code sits in byte t // KPER of channel d, its pair in group t // KG
        kb = tl.load(kp_ptr + kbase // KPER + (t2 // KPER) * D + d2, mask=m2, other=0).to(tl.int32)
        kc = (kb >> ((t2 % KPER) * KBITS).to(tl.int32)) & ((1 << KBITS) - 1)
        kg = pid * (T // KG) * D + (t2 // KG) * D + d2
        ks = _widen(tl.load(ks_ptr + kg, mask=m2, other=0.0), KSBF16)
        kz = _widen(tl.load(kz_ptr + kg, mask=m2, other=0.0), KSBF16)
        k = _operand(tl.fma(kc.to(tl.float32), ks, kz), QKIND, F32DOT)
        s = _dot(q, tl.trans(k), F32DOT) * sm_scale  # [BH, BT]
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # values: token t's channel d in byte d // VPER of its row, its pair in group d // VG
        vb = tl.load(vp_ptr + kbase // VPER + t2 * (D // VPER) + d2 // VPER, mask=m2, other=0).to(tl.int32)
        vc = (vb >> ((d2 % VPER) * VBITS)) & ((1 << VBITS) - 1)
        vg = pid * T * (D // VG) + t2 * (D // VG) + d2 // VG
        vs = _widen(tl.load(vs_ptr + vg, mask=m2, other=0.0), VSBF16)
        vz = _widen(tl.load(vz_ptr + vg, mask=m2, other=0.0), VSBF16)
        v = _operand(tl.fma(vc.to(tl.float32), vs, vz), QKIND, F32DOT)
        acc = acc * alpha[:, None] + _dot(_operand(p, QKIND, F32DOT), v, F32DOT)
        m_i = m_new
    # an empty split (past a short sequence's end) leaves l = 0: output 0 with log-sum-exp -inf
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
    row = b * HKV * REP + qh  # [B, Hq] flattened
    tl.store(o_ptr + (row[:, None] * NSPLIT + split) * D + dd[None, :], out, mask=hm[:, None] & dm[None, :])
    tl.store(lse_ptr + row * NSPLIT + split, lse, mask=hm)
