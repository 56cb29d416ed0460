"""Triton KV quantize / dequantize kernels (``kernels/kvquant.py``) against the torch reference: run by
``test_kernels_kvquant.py`` in a child process (``kernel_helpers`` says why), through the interpreter when
there is no GPU.

The oracle is :func:`quantize_torch` / :func:`dequantize_torch` **on CPU**. Packed bytes, scales and zeros
are compared exactly (``torch.equal``): every step of the kernel (min / max, one subtraction, IEEE
division, round-half-even, directed rounding to the scale dtype) is exact or correctly rounded like
torch's. Dequantized values are compared exactly for fp16 / bf16 scales (``code · scale`` is exact in
fp32, so fma and multiply-add agree) and to 1 fp32 ulp for fp32 scales (the kernel's fma against
``addcmul``, which is an fma on current CPUs but need not be). Sizes are small and odd / prime, since the
interpreter is slow.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_helpers import kernel_device

from mmcompress.kernels import kvquant
from mmcompress.kernels.kvquant import (
    decode_attention,
    decode_attention_torch,
    decode_attention_triton,
    dequantize,
    dequantize_torch,
    dequantize_triton,
    quantize,
    quantize_torch,
    quantize_triton,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(dtype)


def _same_deq(got: torch.Tensor, want: torch.Tensor, scale_dtype: torch.dtype) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    if scale_dtype != torch.float32 or want.dtype != torch.float32:
        # exact (an fp32 ulp of difference could survive a cast to fp16 / bf16 only on a tie; the fp32
        # case below is the only one where the fp32 values may differ at all)
        assert torch.equal(got, want)
    else:
        ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert bool(((got - want).abs() <= ulp).all())


def _check(x: torch.Tensor, bits: int, g: int, axis: int, device: str, **kw) -> kvquant.QTensor:
    """Triton on ``device`` against the CPU reference: exact packed / scale / zero, then dequantize."""
    chunk = kw.pop("_chunk", None)
    want = quantize_torch(x.cpu(), bits, g, axis, **kw)
    got = quantize_triton(x.to(device) if x.device.type == "cpu" else x, bits, g, axis, _chunk=chunk, **kw)
    assert got.packed.dtype == torch.uint8 and got.packed.is_contiguous()
    assert torch.equal(got.packed.cpu(), want.packed)
    assert got.scale.dtype == want.scale.dtype
    assert torch.equal(got.scale.cpu(), want.scale)
    assert torch.equal(got.zero.cpu(), want.zero)
    assert (got.shape, got.bits, got.group_size, got.axis, got.dtype) == (
        want.shape,
        want.bits,
        want.group_size,
        want.axis,
        want.dtype,
    )
    _same_deq(dequantize_triton(got, _chunk=chunk), dequantize_torch(want), want.scale.dtype)
    return got


# -- the two cache layouts, every dtype and bit width -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_keys(device: str, dtype: torch.dtype, bits: int):
    # keys [n, H, G, D]: one (scale, zero) per channel per G tokens; odd D and head counts
    x = _x(3, 5, 16, 13, seed=bits, dtype=dtype)
    _check(x, bits, 16, 2, device)
    _check(x, bits, 8, 2, device, scale_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_values(device: str, dtype: torch.dtype, bits: int):
    # values [n, H, T, D]: one pair per token per group of channels; T prime
    x = _x(2, 3, 7, 32, seed=10 + bits, dtype=dtype)
    _check(x, bits, 8, 3, device)
    _check(x, bits, 32, -1, device, scale_dtype=torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_odd_group_sizes_and_axis_zero(device: str, bits: int):
    per = 8 // bits
    g = {2: 12, 4: 6, 8: 7}[bits]  # not a power of two (7: prime)
    _check(_x(3 * g, 5, seed=bits), bits, g, 0, device)
    _check(_x(11, 2 * g, seed=bits + 1), bits, g, 1, device)
    _check(_x(3, per, 2, seed=bits + 2), bits, per, 1, device)  # smallest group: one byte


# -- strides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_blocks_read_in_place(device: str, dtype: torch.dtype):
    # how kv/cache.py builds its blocks: [nb*G, H, D] tokens -> [nb, G, H, D] -> transpose -> [nb, H, G, D]
    k = _x(3 * 8, 5, 12, seed=4, dtype=dtype).to(device)
    kb = k.view(3, 8, 5, 12).transpose(1, 2)
    assert not kb.is_contiguous() and kvquant._as_pnq(kb, 2)[0] is kb  # no copy
    assert kvquant._as_pnq(kb, 3)[0] is kb
    _check(kb, 4, 8, 2, device)  # keys, per channel
    _check(kb, 2, 4, 3, device)  # values, per token


def test_other_strides(device: str):
    x = _x(6, 10, 16, seed=5).to(device)
    _check(x[::2], 4, 8, 2, device)  # sliced leading dim
    _check(x[:, 1:9], 4, 8, 1, device)  # offset start along the axis
    _check(x.transpose(0, 2), 8, 3, 2, device)  # the axis has the largest stride
    _check(x.transpose(1, 2), 2, 4, 1, device)  # axis stride 1, Q stride > 1
    y = _x(2, 3, 2, 3, 2, 8, seed=6).to(device).permute(4, 2, 0, 3, 1, 5)  # 5 leading dims: copied
    assert kvquant._as_pnq(y, 5)[0] is not y
    _check(y, 4, 8, 5, device)
    z = _x(1, 8, seed=7).to(device).expand(5, 8)  # stride 0
    _check(z, 4, 8, 1, device)


# -- the two-pass path (groups larger than one chunk) -----------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_streamed_groups(device: str, bits: int):
    # _chunk=8 splits each group of 24 into 3 chunks (the last one padded); both layouts
    _check(_x(3, 48, 5, seed=bits), bits, 24, 1, device, _chunk=8)
    _check(_x(5, 48, seed=bits, dtype=torch.bfloat16), bits, 24, 1, device, _chunk=8)


# -- values that stress the rounding rules ----------------------------------------------------------------


def test_rounding_edge_cases(device: str):
    # ties: scale exactly 1, so (x - zero) / scale lands on k + 0.5 and rounds half to even
    t4 = torch.tensor([0.0, 15.0] + [k + 0.5 for k in range(14)])
    _check(torch.stack([t4, t4 - 8, t4.flip(0)]), 4, 16, 1, device)
    t2 = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, 2.5, 1.5, 0.5])
    _check(torch.stack([t2, t2 - 2]), 2, 8, 1, device, scale_dtype=torch.float32)
    # large offset, small range: the zero must round down, not to nearest
    _check(1000.0 + 1e-3 * _x(2, 64, seed=3), 4, 32, 1, device)
    _check(-1000.0 + 1e-3 * _x(2, 64, seed=3), 2, 32, 1, device, scale_dtype=torch.bfloat16)
    # constant groups (scale 0), ±0, tiny values whose zero / scale are fp16 subnormals or signed zeros
    const = torch.tensor([[0.5] * 8, [0.0] * 4 + [-0.0] * 4, [1e-7] * 8, [-1e-7] * 8, [0.1] * 8])
    for sd in (torch.float16, torch.bfloat16, torch.float32):
        _check(const, 4, 8, 1, device, scale_dtype=sd)
    tiny = _x(4, 16, seed=8) * 1e-6
    for sd in (torch.float16, torch.bfloat16):
        _check(tiny, 2, 8, 1, device, scale_dtype=sd)
        _check(-tiny.abs(), 8, 16, 1, device, scale_dtype=sd)
    # near the top of fp16's range (spacing 32 there); the scale of row 2 needs a wider range (bf16)
    big = torch.tensor([[60000.0, 65000.0, 65504.0, 64000.0], [-65504.0, 0.0, 1.0, 65504.0]])
    _check(big[:1], 8, 4, 1, device)
    _check(big, 8, 4, 1, device, scale_dtype=torch.bfloat16)


def test_random_fp32_many_groups(device: str):
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(9)) * torch.logspace(-3, 3, 256)
    for bits in (2, 4, 8):
        for sd in (torch.float16, torch.bfloat16, torch.float32):
            _check(x, bits, 32, 1, device, scale_dtype=sd)


# -- empty, other dtypes, errors --------------------------------------------------------------------------


def test_empty_tensors(device: str):
    for shape, axis in (((0, 16), 1), ((3, 0), 1), ((0, 4, 8), 2)):
        q = _check(torch.empty(shape), 4, 4, axis, device)
        assert dequantize_triton(q).shape == shape


def test_float64_input_and_output_dtypes(device: str):
    x = _x(3, 16, seed=11, dtype=torch.float64)
    q = _check(x, 4, 8, 1, device)  # converted to fp32 first, as the reference does
    assert q.dtype == torch.float64 and dequantize_triton(q).dtype == torch.float64
    want = quantize_torch(x, 4, 8, 1)
    for dt in DTYPES + [torch.float64]:
        _same_deq(dequantize_triton(q, dtype=dt), dequantize_torch(want, dtype=dt), want.scale.dtype)
    with pytest.raises(TypeError, match="must be a float dtype"):
        dequantize_triton(q, dtype=torch.int32)


def test_nan_inf_and_range_errors(device: str):
    x = _x(4, 32, seed=12).to(device)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad[2, 5] = bad_value
        with pytest.raises(ValueError, match="NaN/inf"):
            quantize_triton(bad, 4, 8)
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        quantize_triton(x * 1e6, 4, 8)
    q = quantize_triton(x * 1e6, 4, 8, scale_dtype=torch.float32)
    assert torch.equal(q.packed.cpu(), quantize_torch(x.cpu() * 1e6, 4, 8, scale_dtype=torch.float32).packed)


def test_dispatch_picks_triton(device: str):
    x = _x(2, 4, 16, 8, seed=13).to(device)
    q = quantize(x, 4, 16, axis=2, backend="triton")
    assert torch.equal(q.packed.cpu(), quantize_torch(x.cpu(), 4, 16, axis=2).packed)
    assert torch.equal(dequantize(q, backend="triton").cpu(), dequantize_torch(q).cpu())
    # the cache's round trip: index_select / cat of kernel outputs dequantize like the reference
    parts = kvquant.cat([q.index_select(0, torch.tensor([1], device=x.device)), q])
    assert torch.equal(dequantize(parts, backend="triton").cpu(), dequantize_torch(parts).cpu())


# -- fused dequantize-and-attend (decode) -----------------------------------------------------------------

#: absolute tolerance against dequantize-then-SDPA: fp32 summation order; fp16 / bf16 also the rounding of
#: the probabilities to q.dtype before the P·V product (outputs are O(1): unit-variance values)
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _to(q: kvquant.QTensor, device: str) -> kvquant.QTensor:
    return dataclasses.replace(
        q, packed=q.packed.to(device), scale=q.scale.to(device), zero=q.zero.to(device)
    )


def _cache(
    shape: tuple[int, ...], dtype: torch.dtype, bits: tuple[int, int], groups: tuple[int, int], seed: int
):
    """Raw keys / values ``[B, Hkv, T, D]`` and their quantized forms (keys per channel, values per token)."""
    g = torch.Generator().manual_seed(seed)
    kx, vx = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    return (
        quantize_torch(kx, bits[0], groups[0], axis=2),
        quantize_torch(vx, bits[1], groups[1], axis=3),
        kx,
        vx,
    )


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.cpu().float() - want.float()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "t", "d", "bits", "groups"),
    [
        (2, 3, 3, 24, 16, (4, 4), (8, 16)),  # MHA, head dim 16
        (2, 8, 2, 40, 24, (4, 2), (8, 8)),  # GQA x4, head dim not a power of two, 4-bit K / 2-bit V
        (1, 5, 1, 36, 32, (8, 2), (12, 4)),  # MQA, odd key group of 12 tokens
    ],
)
def test_decode_attention_matches_dequantize_then_sdpa(device, dtype, b, hq, hkv, t, d, bits, groups):
    k, v, _, _ = _cache((b, hkv, t, d), dtype, bits, groups, seed=t)
    q = torch.randn(b, hq, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    kd, vd, qd = _to(k, device), _to(v, device), q.to(device)
    lengths = torch.tensor([t, 5][:b])
    want = decode_attention_torch(q, k, v)
    want_len = decode_attention_torch(q, k, v, lengths=lengths, scale=0.3)
    for splits, block in ((1, 16), (3, 16), (2, 32)):  # splits past a short sequence's end stay empty
        got = decode_attention_triton(qd, kd, vd, _splits_n=splits, _block_t=block)
        assert got.dtype == dtype and got.shape == (b, hq, d)
        assert _err(got, want) <= ATTN_TOL[dtype]
        got = decode_attention_triton(qd, kd, vd, lengths=lengths.to(device), scale=0.3, _splits_n=splits)
        assert _err(got, want_len) <= ATTN_TOL[dtype]
    # the dispatcher, with a non-contiguous q (heads strided)
    qs = torch.randn(b, d, hq, generator=torch.Generator().manual_seed(2)).to(dtype).transpose(1, 2)
    got = decode_attention(qs.to(device), kd, vd, backend="triton")
    assert _err(got, decode_attention_torch(qs, k, v)) <= ATTN_TOL[dtype]


def test_decode_attention_tolerance_is_not_vacuous(device):
    # the tolerance is far below the quantization error itself: attending to the raw keys / values
    # differs from the kernel by much more, so a kernel that skipped or botched dequantization would fail
    k, v, kx, vx = _cache((1, 2, 32, 16), torch.float32, (2, 2), (8, 8), seed=3)
    q = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(4)) * 3
    got = decode_attention_triton(q.to(device), _to(k, device), _to(v, device))
    raw = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kx, vx)[:, :, 0]
    assert _err(got, decode_attention_torch(q, k, v)) <= ATTN_TOL[torch.float32]
    assert _err(got, raw) > 1000 * ATTN_TOL[torch.float32]
