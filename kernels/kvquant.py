"""Group-wise asymmetric integer quantization with real bit packing (KV-cache quantizer), plain torch.

Anchors: KIVI (Liu et al., ICML 2024, arXiv 2402.02750; keys per channel in groups of ``G`` tokens, values
per token in groups of ``G`` channels, asymmetric min/max) and ZipVL / ZipCache's 4/2-bit mix (spec
``divprune-aim-zipvl-kvquant.md`` §3.4, §4.1). This module is layout-agnostic: it quantizes a tensor in
groups of ``group_size`` consecutive elements along one ``axis``; the cache
(:mod:`mmcompress.kv.cache`) chooses the axis (tokens for keys, channels for values).

Per group ``g`` with ``b`` bits (``L = 2^b - 1`` levels above zero):

* ``zero = min(g)`` rounded **down** to the storage dtype, ``scale = (max(g) - zero) / L`` rounded **up**,
  so the stored grid ``zero + [0, L]·scale`` covers the group and every element's error is at most
  ``scale / 2`` (with the *stored* scale; plus fp32 rounding of the arithmetic, ~1e-7 relative).
* ``code = clamp(round((x - zero) / scale), 0, L)``; a constant group stores ``scale = 0`` and codes 0
  (its value is then ``zero``, exact when the constant is representable in the scale dtype).
* Codes are packed along ``axis`` into uint8: ``8 // b`` consecutive codes per byte, code ``j`` of a byte
  in bits ``[j·b, (j+1)·b)`` (little-endian inside the byte; KIVI packs consecutive elements too, ZipCache
  packs halves/quarters instead — both are just layouts). ``group_size`` must be a multiple of ``8 // b``
  so no byte straddles two groups.

Storage per quantized tensor (:func:`nbytes`): ``numel·b/8`` bytes of codes plus two scale-dtype numbers
(scale, zero) per group. Scales are fp16 by default (bf16 for bf16 inputs, which keeps its range).

The Triton kernels (``_triton_kvquant.py``; :func:`quantize_triton`, :func:`dequantize_triton`) give
bit-identical packed bytes, scales and zeros; :func:`quantize` / :func:`dequantize` take ``backend=`` like
every op in :mod:`mmcompress.kernels` and the torch path is the oracle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ._dispatch import check_float, next_power_of_2, resolve_backend, triton_interpret, triton_module

__all__ = [
    "SUPPORTED_BITS",
    "QTensor",
    "check_bits",
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "quantize_torch",
    "dequantize_torch",
    "quantize_triton",
    "dequantize_triton",
    "cat",
    "nbytes",
    "decode_attention",
    "decode_attention_torch",
    "decode_attention_triton",
]

#: bit widths with an exact uint8 packing (4 / 2 / 1 codes per byte)
SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_bits(bits: object, field: str = "bits") -> int:
    """Validate a bit width: an int in :data:`SUPPORTED_BITS`; raises naming ``field`` and the value."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{field} must be an int, one of {SUPPORTED_BITS}; got {bits!r}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}={bits} is not supported; allowed bit widths: {SUPPORTED_BITS}")
    return bits


@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor: packed codes plus one (scale, zero) pair per group.

    For an input of shape ``shape`` quantized along ``axis`` (length ``n``) in groups of ``group_size``:

    * ``packed``: uint8, ``shape`` with ``n`` replaced by ``n * bits // 8``;
    * ``scale``, ``zero``: ``scale_dtype``, ``shape`` with ``n`` replaced by ``n // group_size``.

    Every other dimension is untouched, so slicing / concatenating along one of them is slicing the three
    tensors (:meth:`index_select`, :func:`cat`).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    group_size: int
    axis: int  # non-negative
    dtype: torch.dtype  # the dtype dequantize returns by default

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + zeros."""
        return nbytes(self)

    def index_select(self, dim: int, index: torch.Tensor) -> QTensor:
        """Select entries along ``dim`` (any dimension except the quantized ``axis``)."""
        dim = _norm_axis(dim, len(self.shape), "dim")
        if dim == self.axis:
            raise ValueError(f"index_select: dim={dim} is the quantized axis; select along another dimension")
        shape = list(self.shape)
        shape[dim] = int(index.numel())
        return dataclasses.replace(
            self,
            packed=self.packed.index_select(dim, index),
            scale=self.scale.index_select(dim, index),
            zero=self.zero.index_select(dim, index),
            shape=tuple(shape),
        )


def nbytes(q: QTensor) -> int:
    """Exact bytes held by ``q``: ``packed`` (uint8) + ``scale`` + ``zero``."""
    return sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.zero))


def _norm_axis(axis: int, ndim: int, field: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(
            f"{field}={axis!r} is out of range for a {ndim}-d tensor; allowed: [{-ndim}, {ndim})"
        )
    return axis % ndim


def pack(codes: torch.Tensor, bits: int, axis: int = -1) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into uint8 along ``axis`` (``8 // bits`` codes per byte).

    ``codes``: any integer dtype, ``axis`` length a multiple of ``8 // bits``. Returns uint8 with that
    length divided by ``8 // bits``. :func:`unpack` inverts it exactly.
    """
    check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"pack: codes must be an integer tensor, got {codes.dtype}")
    axis = _norm_axis(axis, codes.dim())
    per = 8 // bits
    n = codes.shape[axis]
    if n % per:
        raise ValueError(f"pack: length {n} along axis {axis} is not a multiple of {per} ({bits}-bit codes)")
    c = codes.movedim(axis, -1).to(torch.uint8)
    if per == 1:
        return c.movedim(-1, axis).contiguous()
    c = c.reshape(*c.shape[:-1], n // per, per)
    shifts = torch.arange(per, device=c.device, dtype=torch.uint8) * bits
    # disjoint bit fields, so the sum is an OR and cannot carry
    out = (c << shifts).sum(-1, dtype=torch.uint8)
    return out.movedim(-1, axis).contiguous()


def unpack(packed: torch.Tensor, bits: int, axis: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``packed`` → uint8 codes, ``axis`` length times ``8 // bits``."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack: packed must be uint8, got {packed.dtype}")
    axis = _norm_axis(axis, packed.dim())
    per = 8 // bits
    if per == 1:
        return packed
    p = packed.movedim(axis, -1)
    shifts = torch.arange(per, device=p.device, dtype=torch.uint8) * bits
    c = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*p.shape[:-1], p.shape[-1] * per).movedim(-1, axis)


def _round_to(v: torch.Tensor, dtype: torch.dtype, direction: float) -> torch.Tensor:
    """``v`` (fp32) in ``dtype``, rounded toward ``direction`` (±inf) instead of to nearest."""
    r = v.to(dtype)
    if dtype == v.dtype:
        return r
    off = r.float() < v if direction > 0 else r.float() > v
    return torch.where(off, torch.nextafter(r, torch.full_like(r, direction)), r)


def _check_group(n: int, group_size: object, bits: int, axis: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int >= 1")
    if n % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the length {n} of axis {axis}; "
            f"allowed: a divisor of {n}"
        )
    per = 8 // bits
    if group_size % per:
        raise ValueError(
            f"group_size={group_size} is not a multiple of {per}: {bits}-bit codes pack {per} per byte and a "
            f"byte may not straddle two groups"
        )
    return group_size


def quantize_torch(
    x: torch.Tensor, bits: int, group_size: int, axis: int = -1, *, scale_dtype: torch.dtype | None = None
) -> QTensor:
    """Plain-torch reference of :func:`quantize` (same contract)."""
    check_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"quantize: x must be a float tensor, got {x.dtype}")
    axis = _norm_axis(axis, x.dim())
    n = x.shape[axis]
    _check_group(n, group_size, bits, axis)
    if scale_dtype is None:
        scale_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype} is not allowed; choose one of {_SCALE_DTYPES}")
    levels = (1 << bits) - 1
    xm = x.movedim(axis, -1).float()
    lead = xm.shape[:-1]
    g = xm.reshape(*lead, n // group_size, group_size)
    if g.numel() == 0:
        zero = torch.zeros(*lead, n // group_size, dtype=scale_dtype, device=x.device)
        scale, codes = zero.clone(), torch.zeros(*lead, n, dtype=torch.uint8, device=x.device)
    else:
        mn, mx = g.amin(-1), g.amax(-1)
        # stored zero <= min and zero + levels * scale >= max: the grid covers the group, so |err| <= scale/2
        zero = _round_to(mn, scale_dtype, float("-inf"))
        zf = zero.float()
        scale = _round_to((mx - zf) / levels, scale_dtype, float("inf"))
        sf = scale.float()
        if not (bool(torch.isfinite(zf).all()) and bool(torch.isfinite(sf).all())):
            raise ValueError(
                f"quantize: x has NaN/inf or values beyond the range of scale_dtype={scale_dtype} "
                f"(|x| max {float(x.abs().max())}); use scale_dtype=torch.float32"
            )
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        q = ((g - zf.unsqueeze(-1)) / safe.unsqueeze(-1)).round_().clamp_(0, levels)
        q = torch.where((sf > 0).unsqueeze(-1), q, torch.zeros_like(q))  # constant group: code 0 = zero
        codes = q.to(torch.uint8).reshape(*lead, n)
    shape = tuple(x.shape)
    return QTensor(
        packed=pack(codes, bits, -1).movedim(-1, axis).contiguous(),
        scale=scale.movedim(-1, axis).contiguous(),
        zero=zero.movedim(-1, axis).contiguous(),
        shape=shape,
        bits=bits,
        group_size=group_size,
        axis=axis,
        dtype=x.dtype,
    )


def dequantize_torch(q: QTensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch reference of :func:`dequantize`."""
    codes = unpack(q.packed, q.bits, q.axis).movedim(q.axis, -1)
    lead = codes.shape[:-1]
    n = codes.shape[-1]
    g = codes.reshape(*lead, n // q.group_size, q.group_size).float()
    scale = q.scale.movedim(q.axis, -1).float().unsqueeze(-1)
    zero = q.zero.movedim(q.axis, -1).float().unsqueeze(-1)
    x = torch.addcmul(zero, g, scale).reshape(*lead, n)
    return x.movedim(-1, q.axis).to(dtype or q.dtype)


# -- Triton path ------------------------------------------------------------------------------------------

#: elements per program tile (fp32 in registers: 16 KiB over 4 warps)
_TILE = 4096
#: the kernels' codes for the dtypes they store (fp32 / fp16 / bf16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _merge_dims(sizes: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """``(size, stride)`` of ``sizes`` with size-1 dims dropped and adjacent dims merged wherever their
    strides allow one index (a view, no copy)."""
    out: list[tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == stride * size:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def _as_pnq(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, list[tuple[int, int]], int, tuple[int, int]]:
    """``x`` as ``[P, n, Q]`` strides for the quantize kernel: up to three leading ``(size, stride)`` dims
    (padded to three), the axis stride, and one trailing ``(Q, stride)``. Inputs whose strides need more
    dims (rare: e.g. a permutation of four leading dims) are copied to contiguous first."""
    pre = _merge_dims(x.shape[:axis], x.stride()[:axis])
    post = _merge_dims(x.shape[axis + 1 :], x.stride()[axis + 1 :])
    if len(pre) > 3 or len(post) > 1:
        x = x.contiguous()
        pre = _merge_dims(x.shape[:axis], x.stride()[:axis])
        post = _merge_dims(x.shape[axis + 1 :], x.stride()[axis + 1 :])
    pre = [(1, 0)] * (3 - len(pre)) + pre
    return x, pre, x.stride(axis), post[0] if post else (1, 0)


def _tiles(g: int, q: int, rows: int, per: int, chunk: int | None) -> tuple[int, int, int]:
    """``(BR, CH, BQ)``: a group chunk of ``CH`` elements (a power of two >= ``per``), then as many columns
    and rows as fill :data:`_TILE`."""
    ch = chunk or min(next_power_of_2(g), _TILE)
    if ch & (ch - 1) or ch < per:
        raise ValueError(f"kvquant: _chunk={ch} must be a power of two >= {per}")
    bq = min(next_power_of_2(q), max(1, _TILE // ch))
    br = min(next_power_of_2(rows), max(1, _TILE // (ch * bq)))
    return br, ch, bq


def _validate(
    x: torch.Tensor, bits: int, group_size: int, axis: int, scale_dtype: torch.dtype | None
) -> tuple[int, torch.dtype]:
    """The reference's argument checks (same messages); returns the axis and the scale dtype."""
    check_bits(bits)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize: x must be a float tensor, got {x.dtype}")
    axis = _norm_axis(axis, x.dim())
    _check_group(x.shape[axis], group_size, bits, axis)
    if scale_dtype is None:
        scale_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype} is not allowed; choose one of {_SCALE_DTYPES}")
    return axis, scale_dtype


def quantize_triton(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = -1,
    *,
    scale_dtype: torch.dtype | None = None,
    _chunk: int | None = None,
) -> QTensor:
    """Triton :func:`quantize` (same contract; packed bytes, scales and zeros bit-identical to
    :func:`quantize_torch` on CPU). One launch; ``x`` is read in place for any strides that merge into
    ``[P (up to 3 dims), n, Q (1 dim)]``, e.g. the cache's transposed blocks, and copied otherwise.
    float32 / float16 / bfloat16 are read natively, other float dtypes are converted to float32 first
    (what the reference does). Raises like the reference, after the launch for NaN / inf (one sync).
    ``_chunk`` (a power of two) forces the group chunk size; tests use a small one to run the two-pass
    path that groups over 4096 elements take."""
    axis, scale_dtype = _validate(x, bits, group_size, axis, scale_dtype)
    if x.numel() == 0:
        return quantize_torch(x, bits, group_size, axis, scale_dtype=scale_dtype)
    src = x if x.dtype in _KIND else x.float()
    src, pre, sxn, (q, sxq) = _as_pnq(src, axis)
    n, per = x.shape[axis], 8 // bits
    rows = math.prod(x.shape[:axis]) * (n // group_size)
    packed_shape = (*x.shape[:axis], n // per, *x.shape[axis + 1 :])
    scale_shape = (*x.shape[:axis], n // group_size, *x.shape[axis + 1 :])
    packed = torch.empty(packed_shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(scale_shape, dtype=scale_dtype, device=x.device)
    zero = torch.empty(scale_shape, dtype=scale_dtype, device=x.device)
    br, ch, bq = _tiles(group_size, q, rows, per, _chunk)
    nq = -(-q // bq)
    (_, sx0), (s1, sx1), (s2, sx2) = pre
    triton_module("_triton_kvquant").quantize_kernel[(-(-rows // br) * nq,)](
        src, packed, scale, zero,
        rows, nq, n // group_size, group_size, group_size // per, q, s1, s2, sx0, sx1, sx2, sxn, sxq,
        BITS=bits, PER=per, LEVELS=(1 << bits) - 1, SKIND=_KIND[scale_dtype],
        XBF16=src.dtype == torch.bfloat16, BR=br, CH=ch, BQ=bq, SINGLE=ch >= group_size, num_warps=4,
    )  # fmt: skip
    if not (bool(torch.isfinite(zero).all()) and bool(torch.isfinite(scale).all())):
        raise ValueError(
            f"quantize: x has NaN/inf or values beyond the range of scale_dtype={scale_dtype} "
            f"(|x| max {float(x.abs().max())}); use scale_dtype=torch.float32"
        )
    return QTensor(packed, scale, zero, tuple(x.shape), bits, group_size, axis, x.dtype)


def _check_qtensor(q: object) -> QTensor:
    """The consistency :func:`dequantize_triton` relies on (shapes and dtypes of the three tensors)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize: q must be a QTensor, got {type(q).__name__}")
    check_bits(q.bits, "q.bits")
    axis = _norm_axis(q.axis, len(q.shape), "q.axis")
    n = q.shape[axis]
    _check_group(n, q.group_size, q.bits, axis)
    want_p = (*q.shape[:axis], n * q.bits // 8, *q.shape[axis + 1 :])
    want_s = (*q.shape[:axis], n // q.group_size, *q.shape[axis + 1 :])
    if q.packed.dtype != torch.uint8 or tuple(q.packed.shape) != want_p:
        raise ValueError(
            f"dequantize: q.packed is {q.packed.dtype} {tuple(q.packed.shape)}; expected uint8 {want_p}"
        )
    for name, t in (("scale", q.scale), ("zero", q.zero)):
        if t.dtype not in _SCALE_DTYPES or tuple(t.shape) != want_s:
            raise ValueError(
                f"dequantize: q.{name} is {t.dtype} {tuple(t.shape)}; expected one of {_SCALE_DTYPES} "
                f"with shape {want_s}"
            )
    if q.scale.dtype != q.zero.dtype:
        raise ValueError(f"dequantize: q.scale is {q.scale.dtype} but q.zero is {q.zero.dtype}")
    return q


def dequantize_triton(
    q: QTensor, *, dtype: torch.dtype | None = None, _chunk: int | None = None
) -> torch.Tensor:
    """Triton :func:`dequantize` (same values as :func:`dequantize_torch`: bit-identical for fp16 / bf16
    scales, within 1 fp32 ulp before the output cast for fp32 scales). Returns a contiguous tensor (the
    reference returns a moved-axis view). ``packed`` / ``scale`` / ``zero`` are made contiguous (a no-op
    for what :func:`quantize`, :meth:`QTensor.index_select` and :func:`cat` produce)."""
    _check_qtensor(q)
    out_dtype = dtype or q.dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype={dtype!r} must be a float dtype")
    if math.prod(q.shape) == 0:
        return dequantize_torch(q, dtype=out_dtype)
    kind = _KIND.get(out_dtype, 0)  # other float dtypes: fp32 out, then cast (the reference's order)
    out = torch.empty(
        q.shape, dtype=out_dtype if out_dtype in _KIND else torch.float32, device=q.packed.device
    )
    g, per = q.group_size, 8 // q.bits
    n = q.shape[q.axis]
    qn = math.prod(q.shape[q.axis + 1 :])
    rows = math.prod(q.shape[: q.axis]) * (n // g)
    br, ch, bq = _tiles(g, qn, rows, per, _chunk)
    nq, nc = -(-qn // bq), -(-g // ch)
    triton_module("_triton_kvquant").dequantize_kernel[(-(-rows // br) * nq * nc,)](
        q.packed.contiguous(), q.scale.contiguous(), q.zero.contiguous(), out,
        rows, nq, nc, g, g // per, qn,
        BITS=q.bits, PER=per, LEVELS=(1 << q.bits) - 1, SBF16=q.scale.dtype == torch.bfloat16,
        OKIND=kind, BR=br, CH=ch, BQ=bq, num_warps=4,
    )  # fmt: skip
    return out if out.dtype == out_dtype else out.to(out_dtype)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = -1,
    *,
    scale_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> QTensor:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Args:
        x: float tensor of any shape and strides, e.g. keys ``[n, H, G, D]`` with ``axis=2`` (KIVI
            per-channel: one scale per channel per ``G`` tokens) or values ``[n, H, T, D]`` with ``axis=3``
            (per token).
        bits: 2, 4 or 8 (:data:`SUPPORTED_BITS`).
        group_size: elements per group; divides ``x.shape[axis]`` and is a multiple of ``8 // bits``.
        axis: the grouped (and packed) axis.
        scale_dtype: storage dtype of scale and zero (default fp16, bf16 for bf16 inputs).
        backend: ``"auto" | "torch" | "triton"``: ``"auto"`` runs the Triton kernel on CUDA when Triton
            imports, the torch reference elsewhere; both give bit-identical results.

    Returns:
        A :class:`QTensor`; ``dequantize(quantize(x))`` is within ``scale / 2`` of ``x`` per element.

    Raises:
        TypeError / ValueError: bad ``bits``, ``group_size``, ``axis``, ``scale_dtype``, a non-float ``x``,
            or NaN / inf / values beyond the scale dtype's range in ``x``.
        RuntimeError: ``backend="triton"`` where it cannot run (``resolve_backend``).
    """
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    if resolve_backend(backend, dev) == "triton":
        return quantize_triton(x, bits, group_size, axis, scale_dtype=scale_dtype)
    return quantize_torch(x, bits, group_size, axis, scale_dtype=scale_dtype)


def dequantize(q: QTensor, *, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``codes · scale + zero`` in fp32, returned as ``dtype`` (default: the quantized input's dtype).

    ``backend`` as in :func:`quantize`; the Triton path returns a contiguous tensor with the same values.
    """
    if not isinstance(q, QTensor):
        raise TypeError(f"dequantize: q must be a QTensor, got {type(q).__name__}")
    if resolve_backend(backend, q.packed.device) == "triton":
        return dequantize_triton(q, dtype=dtype)
    return dequantize_torch(q, dtype=dtype)


def cat(qs: Sequence[QTensor], dim: int = 0) -> QTensor:
    """Concatenate quantized tensors along ``dim`` (not their quantized axis); formats must match."""
    if not qs:
        raise ValueError("cat: need at least one QTensor")
    first = qs[0]
    dim = _norm_axis(dim, len(first.shape), "dim")
    for q in qs[1:]:
        if (q.bits, q.group_size, q.axis, q.dtype, q.scale.dtype) != (
            first.bits,
            first.group_size,
            first.axis,
            first.dtype,
            first.scale.dtype,
        ):
            raise ValueError("cat: QTensors differ in bits / group_size / axis / dtype")
    if dim == first.axis:
        raise ValueError(f"cat: dim={dim} is the quantized axis; concatenate along another dimension")
    if len(qs) == 1:
        return first
    shape = list(first.shape)
    shape[dim] = sum(q.shape[dim] for q in qs)
    return dataclasses.replace(
        first,
        packed=torch.cat([q.packed for q in qs], dim),
        scale=torch.cat([q.scale for q in qs], dim),
        zero=torch.cat([q.zero for q in qs], dim),
        shape=tuple(shape),
    )


# -- fused dequantize-and-attend for decoding ---------------------------------------------------------------


def _check_decode(
    q: object, k: object, v: object, scale: float | None, lengths: torch.Tensor | None
) -> tuple[int, int, int, int, int, float, torch.Tensor | None]:
    """Shapes and formats :func:`decode_attention` takes; returns ``(B, Hq, Hkv, T, D, scale, lengths)``
    with ``lengths`` as int64 on ``q.device`` (checked on the host: one sync)."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise TypeError(f"decode_attention: q must be a float tensor, got {getattr(q, 'dtype', type(q))}")
    if q.dim() != 3:
        raise ValueError(
            f"decode_attention: q must be [B, Hq, D] (one token per sequence), got {tuple(q.shape)}"
        )
    for name, t, axis in (("k", k, 2), ("v", v, 3)):
        if not isinstance(t, QTensor):
            raise TypeError(f"decode_attention: {name} must be a QTensor, got {type(t).__name__}")
        if len(t.shape) != 4 or t.axis != axis:
            raise ValueError(
                f"decode_attention: {name} must be a [B, Hkv, T, D] QTensor quantized along axis {axis} "
                f"(keys per channel in groups of tokens, values per token in groups of channels); got "
                f"shape {t.shape}, axis {t.axis}"
            )
        if t.packed.device != q.device:
            raise ValueError(f"decode_attention: {name} is on {t.packed.device}, q on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"decode_attention: k has shape {k.shape} but v has {v.shape}")
    b, hkv, t_len, d = k.shape
    if q.shape[0] != b or q.shape[2] != d or (q.shape[1] % hkv if hkv else q.shape[1]):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} does not fit k / v {k.shape}: need the same B and D, "
            f"and Hq a multiple of Hkv"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"decode_attention: scale={scale!r} must be a positive number")
    if lengths is not None:
        if (
            not isinstance(lengths, torch.Tensor)
            or lengths.is_floating_point()
            or lengths.dtype == torch.bool
        ):
            raise TypeError("decode_attention: lengths must be an integer tensor [B]")
        if tuple(lengths.shape) != (b,):
            raise ValueError(f"decode_attention: lengths has shape {tuple(lengths.shape)}, expected ({b},)")
        lengths = lengths.to(q.device, torch.long)
        if b and (bool((lengths < 1).any()) or bool((lengths > t_len).any())):
            raise ValueError(f"decode_attention: lengths must lie in [1, T={t_len}], got {lengths.tolist()}")
    elif t_len == 0 and b:
        raise ValueError("decode_attention: the cache holds no tokens (T=0)")
    return b, q.shape[1], hkv, t_len, d, float(scale), lengths


def decode_attention_torch(
    q: torch.Tensor,
    k: QTensor,
    v: QTensor,
    *,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of :func:`decode_attention`: dequantize K and V to ``q.dtype`` (:func:`dequantize_torch`),
    repeat them over the query heads of each KV head, and run ``F.scaled_dot_product_attention``."""
    b, hq, hkv, t_len, _, scale, lengths = _check_decode(q, k, v, scale, lengths)
    kd = dequantize_torch(k, dtype=q.dtype)
    vd = dequantize_torch(v, dtype=q.dtype)
    if hq != hkv:
        kd = kd.repeat_interleave(hq // hkv, dim=1)
        vd = vd.repeat_interleave(hq // hkv, dim=1)
    mask = None
    if lengths is not None:
        mask = (torch.arange(t_len, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale
    )
    return out.squeeze(2)


def _splits(device: torch.device, programs: int, t_len: int, block_t: int) -> int:
    """Splits of the token axis so that ~2 programs run per SM (flash-decoding); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // max(programs, 1)), -(-t_len // (4 * block_t))))


def decode_attention_triton(
    q: torch.Tensor,
    k: QTensor,
    v: QTensor,
    *,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
    _block_t: int | None = None,
    _splits_n: int | None = None,
) -> torch.Tensor:
    """Triton :func:`decode_attention`: one kernel reads the packed codes and scales and never writes a
    dequantized K / V. Each program takes one (sequence, KV head, split of the tokens) and its ``Hq / Hkv``
    query heads (GQA: K / V bytes are read once per KV head); splits are merged by their log-sum-exp.
    Keys and values are rounded to ``q.dtype`` before the dot products, as dequantize-then-SDPA does.
    ``_block_t`` (tokens per step, a power of two >= 16) and ``_splits_n`` are for tests."""
    b, hq, hkv, t_len, d, scale, lengths = _check_decode(q, k, v, scale, lengths)
    check_float(q, "q", "decode_attention")
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    rep = hq // hkv
    bt = _block_t or 32
    if bt & (bt - 1) or bt < 16:
        raise ValueError(f"decode_attention: _block_t={bt} must be a power of two >= 16")
    nsplit = _splits_n or _splits(q.device, b * hkv, t_len, bt)
    per_split = -(-t_len // nsplit)
    span = -(-per_split // bt) * bt  # tokens per split, a whole number of blocks
    lens = (lengths if lengths is not None else torch.full((b,), t_len, device=q.device)).to(torch.int32)
    qc = q if q.stride(-1) == 1 else q.contiguous()
    o_part = torch.empty(b, hq, nsplit, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, nsplit, dtype=torch.float32, device=q.device)
    triton_module("_triton_kvquant").decode_attn_kernel[(b * hkv, nsplit)](
        qc, k.packed.contiguous(), k.scale.contiguous(), k.zero.contiguous(),
        v.packed.contiguous(), v.scale.contiguous(), v.zero.contiguous(), lens.contiguous(), o_part, lse,
        hkv, rep, t_len, d, k.group_size, v.group_size, span, scale, qc.stride(0), qc.stride(1),
        KBITS=k.bits, KPER=8 // k.bits, VBITS=v.bits, VPER=8 // v.bits,
        KSBF16=k.scale.dtype == torch.bfloat16, VSBF16=v.scale.dtype == torch.bfloat16,
        QKIND=_KIND[q.dtype], F32DOT=q.dtype == torch.float32 or triton_interpret(), NSPLIT=nsplit,
        BH=max(16, next_power_of_2(rep)), BT=bt, BD=max(16, next_power_of_2(d)), num_warps=4,
    )  # fmt: skip
    if nsplit == 1:
        return out.copy_(o_part[:, :, 0])
    w = torch.softmax(lse, dim=-1)  # empty splits have lse = -inf: weight 0
    return out.copy_((w.unsqueeze(-1) * o_part).sum(2))


def decode_attention(
    q: torch.Tensor,
    k: QTensor,
    v: QTensor,
    *,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one new query token per sequence over a quantized K / V cache (decoding).

    Args:
        q: ``[B, Hq, D]`` float16 / bfloat16 / float32 queries.
        k: keys, a ``[B, Hkv, T, D]`` :class:`QTensor` quantized along the tokens (``axis=2``: per channel,
            KIVI / ZipCache keys); ``Hq`` a multiple of ``Hkv`` (GQA).
        v: values, a ``[B, Hkv, T, D]`` :class:`QTensor` quantized along the channels (``axis=3``: per
            token). Bits, groups and scale dtypes of ``k`` and ``v`` may differ.
        scale: softmax scale (default ``1 / sqrt(D)``).
        lengths: optional ``[B]`` integer tensor: sequence ``b`` attends to its first ``lengths[b]``
            tokens (each in ``[1, T]``).
        backend: ``"auto" | "torch" | "triton"``; the torch path is dequantize-then-SDPA.

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``; the two paths agree to fp32 summation-order differences plus the
        rounding of probabilities to ``q.dtype`` (tests: 1e-5 fp32, 2e-3 fp16, 2e-2 bf16, absolute).
    """
    dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    if resolve_backend(backend, dev) == "triton":
        return decode_attention_triton(q, k, v, scale=scale, lengths=lengths)
    return decode_attention_torch(q, k, v, scale=scale, lengths=lengths)
