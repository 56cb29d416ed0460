"""Group-wise asymmetric quantizer with bit packing (kernels/kvquant.py): packing, bounds, bytes, errors."""

from __future__ import annotations

import pytest
import torch

from mmcompress.kernels import kvquant
from mmcompress.kernels.kvquant import SUPPORTED_BITS, dequantize, pack, quantize, unpack


def _x(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- packing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_pack_unpack_exact_for_every_code(bits, axis):
    per = 8 // bits
    codes = torch.randint(
        0, 1 << bits, (4 * per, 3 * per, 8 * per), generator=torch.Generator().manual_seed(1)
    )
    packed = pack(codes, bits, axis)
    assert packed.dtype == torch.uint8
    expect = list(codes.shape)
    expect[axis] //= per
    assert list(packed.shape) == expect
    assert torch.equal(unpack(packed, bits, axis), codes.to(torch.uint8))


def test_pack_bit_layout():
    # code j of a byte sits in bits [j*b, (j+1)*b): little-endian inside the byte
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert pack(torch.tensor([7, 255]), 8).tolist() == [7, 255]


# -- round trip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize(("axis", "group"), [(2, 32), (2, 8), (3, 16), (3, 4)])
def test_error_within_half_a_step(bits, axis, group):
    x = _x(3, 2, 64, 16, seed=bits) * 3 + 1
    q = quantize(x, bits, group, axis)
    err = (dequantize(q) - x).abs()
    half = q.scale.float().repeat_interleave(group, dim=axis) / 2
    # |err| <= scale/2 with the stored scale; fp32 arithmetic adds ~1 ulp of the values
    assert bool((err <= half + 1e-6 * x.abs().max()).all())
    # and the bound is not vacuous: the step is what the group range implies
    levels = (1 << bits) - 1
    g = x.movedim(axis, -1).reshape(*x.movedim(axis, -1).shape[:-1], -1, group)
    step = (g.amax(-1) - g.amin(-1)) / levels
    s = q.scale.float().movedim(axis, -1)
    z = q.zero.float().movedim(axis, -1)
    # rounded up in fp16 (<= 2^-10 relative) over a range widened by the zero's downward rounding
    assert bool((s >= step * (1 - 1e-6)).all())
    assert bool((s <= (step + z.abs() * 2**-10 / levels) * (1 + 2**-10) + 1e-7).all())


def test_large_offset_small_range_stays_in_bound():
    # fp16 zero rounded to nearest could sit above the group minimum; it is rounded down instead
    x = 1000.0 + 1e-3 * _x(2, 64, seed=3)
    for bits in SUPPORTED_BITS:
        q = quantize(x, bits, 32, axis=1)
        assert bool((q.zero.float() <= x.view(2, 2, 32).amin(-1)).all())
        err = (dequantize(q) - x).abs()
        half = q.scale.float().repeat_interleave(32, dim=1) / 2
        assert bool((err <= half + 1e-4).all())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_integer_codes_round_trip_exactly(bits):
    # values already on a representable grid: zero=0, scale=1 -> codes are the values, dequant is exact
    levels = (1 << bits) - 1
    codes = torch.randint(0, levels + 1, (5, 32), generator=torch.Generator().manual_seed(bits)).float()
    codes[:, 0], codes[:, 1] = 0, levels  # every group spans the full range
    q = quantize(codes, bits, 32, axis=1)
    assert torch.equal(q.scale.float(), torch.ones(5, 1)) and torch.equal(q.zero.float(), torch.zeros(5, 1))
    assert torch.equal(unpack(q.packed, bits, 1).float(), codes)
    assert torch.equal(dequantize(q), codes)


def test_constant_group_is_exact():
    x = torch.full((2, 8), 0.5)
    q = quantize(x, 2, 8)
    assert torch.equal(q.scale.float(), torch.zeros(2, 1)) and torch.equal(dequantize(q), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x = _x(4, 64, seed=5, dtype=dtype)
    q = quantize(x, 4, 32)
    assert q.scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    y = dequantize(q)
    assert y.dtype == dtype
    half = q.scale.float().repeat_interleave(32, dim=1) / 2
    eps = torch.finfo(dtype).eps  # plus the rounding of the output to `dtype`
    assert bool(((y.float() - x.float()).abs() <= half + eps * x.float().abs().max()).all())


# -- bytes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_nbytes_exact(bits):
    n, h, g, d = 3, 2, 32, 16
    keys = quantize(_x(n, h, g, d), bits, g, axis=2)  # per channel: one pair per (block, head, channel)
    assert keys.packed.shape == (n, h, g * bits // 8, d) and keys.scale.shape == (n, h, 1, d)
    assert keys.nbytes == n * h * g * d * bits // 8 + 2 * 2 * n * h * d
    vals = quantize(_x(n, h, g, d), bits, 8, axis=3)  # per token: one pair per 8 channels
    assert vals.packed.shape == (n, h, g, d * bits // 8) and vals.scale.shape == (n, h, g, d // 8)
    assert vals.nbytes == n * h * g * d * bits // 8 + 2 * 2 * n * h * g * (d // 8)
    assert kvquant.nbytes(vals) == vals.nbytes
    f32 = quantize(_x(2, 8), bits, 8, scale_dtype=torch.float32)
    assert f32.nbytes == 2 * 8 * bits // 8 + 2 * 4 * 2


def test_index_select_and_cat_match_dequantize():
    x = _x(6, 2, 8, 4, seed=9)
    q = quantize(x, 4, 8, axis=2)
    idx = torch.tensor([4, 1])
    assert torch.equal(dequantize(q.index_select(0, idx)), dequantize(q)[idx])
    parts = kvquant.cat(
        [q.index_select(0, torch.tensor([0, 1])), q.index_select(0, torch.tensor([2, 3, 4, 5]))]
    )
    assert torch.equal(dequantize(parts), dequantize(q)) and parts.shape == q.shape


# -- bad input --------------------------------------------------------------------------------------------


def test_bad_input_errors():
    x = _x(4, 32)
    with pytest.raises(ValueError, match=r"bits=3 is not supported; allowed bit widths: \(2, 4, 8\)"):
        quantize(x, 3, 8)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize(x, 4.0, 8)
    with pytest.raises(ValueError, match="group_size=12 does not divide the length 32"):
        quantize(x, 4, 12)
    with pytest.raises(ValueError, match="group_size=2 is not a multiple of 4"):
        quantize(x, 2, 2)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quantize(x, 4, 8, axis=2)
    with pytest.raises(TypeError, match="must be a float tensor"):
        quantize(torch.ones(4, 8, dtype=torch.long), 4, 8)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize(bad, 4, 8)
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        quantize(x * 1e6, 4, 8)  # beyond fp16's range
    with pytest.raises(ValueError, match="scale_dtype=torch.int8 is not allowed"):
        quantize(x, 4, 8, scale_dtype=torch.int8)
    q = quantize(x, 4, 8)
    with pytest.raises(ValueError, match="is the quantized axis"):
        q.index_select(1, torch.tensor([0]))
    with pytest.raises(ValueError, match="differ in bits"):
        kvquant.cat([q, quantize(x, 2, 8)])
    with pytest.raises((RuntimeError, NotImplementedError), match="triton|Triton"):
        quantize(x, 4, 8, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        quantize(x, 4, 8, backend="cuda")
