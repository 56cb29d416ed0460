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

A Triton kernel will live beside this reference; :func:`quantize` / :func:`dequantize` take
``backend=`` like every op in :mod:`mmcompress.kernels` and the torch path is the oracle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ._dispatch import resolve_backend

__all__ = [
    "SUPPORTED_BITS",
    "QTensor",
    "check_bits",
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "cat",
    "nbytes",
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


def _no_triton_yet(op: str, backend: str, device: torch.device) -> None:
    resolved = resolve_backend(backend, device)
    if resolved == "triton" and backend == "triton":
        raise NotImplementedError(
            f"{op}: the Triton kvquant kernel is not written yet; use backend='torch' or 'auto'"
        )


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
        x: float tensor of any shape, e.g. keys ``[n, H, G, D]`` with ``axis=2`` (KIVI per-channel: one
            scale per channel per ``G`` tokens) or values ``[n, H, T, D]`` with ``axis=3`` (per token).
        bits: 2, 4 or 8 (:data:`SUPPORTED_BITS`).
        group_size: elements per group; divides ``x.shape[axis]`` and is a multiple of ``8 // bits``.
        axis: the grouped (and packed) axis.
        scale_dtype: storage dtype of scale and zero (default fp16, bf16 for bf16 inputs).
        backend: ``"auto" | "torch" | "triton"`` (the Triton kernel is not written yet).

    Returns:
        A :class:`QTensor`; ``dequantize(quantize(x))`` is within ``scale / 2`` of ``x`` per element.
    """
    _no_triton_yet("quantize", backend, x.device)
    return quantize_torch(x, bits, group_size, axis, scale_dtype=scale_dtype)


def dequantize(q: QTensor, *, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``codes · scale + zero`` in fp32, returned as ``dtype`` (default: the quantized input's dtype)."""
    _no_triton_yet("dequantize", backend, q.packed.device)
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
