"""KV quantize / dequantize dispatch (``kernels/kvquant.py``): the Triton-path cases
(``triton_kvquant_cases.py``, run in a child process through the interpreter when there is no GPU;
``kernel_helpers`` says why), the kernels compiled for sm_90, argument checks of the Triton launchers
(they run before any launch, so they need neither a GPU nor the interpreter), the stride analysis that lets
the cache's transposed blocks be read in place, import without Triton, and the benchmark rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from kernel_helpers import compile_for_sm90, run_cases

from mmcompress.evals.bench_kernels import run_bench
from mmcompress.kernels import kvquant
from mmcompress.kernels._dispatch import resolve_backend
from mmcompress.kernels.kvquant import (
    dequantize,
    dequantize_torch,
    dequantize_triton,
    quantize,
    quantize_torch,
    quantize_triton,
)


def test_triton_kernels_against_reference():
    run_cases("triton_kvquant_cases.py")


def test_kernels_compile_for_sm90():
    ints = ["n_rows", "NQ", "NG", "G", "GB", "Q", "S1", "S2", "sx0", "sx1", "sx2", "sxn", "sxq"]
    quant = {"x_ptr": "*fp16", "packed_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16"}
    quant.update(dict.fromkeys(ints, "i32"))
    deq = {"packed_ptr": "*u8", "scale_ptr": "*bf16", "zero_ptr": "*bf16", "out_ptr": "*bf16"}
    deq.update(dict.fromkeys(["n_rows", "NQ", "NC", "G", "GB", "Q"], "i32"))
    bf16 = {"x_ptr": "*bf16", "scale_ptr": "*bf16", "zero_ptr": "*bf16"}
    f32 = {"x_ptr": "*fp32", "scale_ptr": "*fp32", "zero_ptr": "*fp32"}

    def q(bits: int, skind: int, xbf16: bool, br: int, ch: int, bq: int, single: bool) -> dict:
        per = 8 // bits
        return {"BITS": bits, "PER": per, "LEVELS": (1 << bits) - 1, "SKIND": skind, "XBF16": xbf16,
                "BR": br, "CH": ch, "BQ": bq, "SINGLE": single}  # fmt: skip

    def d(bits: int, sbf16: bool, okind: int, br: int, ch: int, bq: int) -> dict:
        return {"BITS": bits, "PER": 8 // bits, "LEVELS": (1 << bits) - 1, "SBF16": sbf16, "OKIND": okind,
                "BR": br, "CH": ch, "BQ": bq}  # fmt: skip

    specs = [
        ("quantize_kernel", quant, q(4, 1, False, 128, 32, 1, True), 4),  # values, per token
        ("quantize_kernel", dict(quant, **bf16), q(2, 2, True, 1, 32, 128, True), 4),  # keys, per channel
        ("quantize_kernel", dict(quant, **f32), q(8, 0, False, 1, 4096, 1, False), 4),  # two passes
        ("dequantize_kernel", deq, d(4, True, 2, 128, 32, 1), 4),
        (
            "dequantize_kernel",
            dict(deq, scale_ptr="*fp16", zero_ptr="*fp16", out_ptr="*fp16"),
            d(2, False, 1, 1, 32, 128),
            4,
        ),  # fmt: skip
        (
            "dequantize_kernel",
            dict(deq, scale_ptr="*fp32", zero_ptr="*fp32", out_ptr="*fp32"),
            d(8, False, 0, 1, 4096, 1),
            4,
        ),  # fmt: skip
    ]
    attn = {"q_ptr": "*bf16", "kp_ptr": "*u8", "ks_ptr": "*bf16", "kz_ptr": "*bf16", "vp_ptr": "*u8",
            "vs_ptr": "*bf16", "vz_ptr": "*bf16", "len_ptr": "*i32", "o_ptr": "*fp32",
            "lse_ptr": "*fp32"}  # fmt: skip
    attn.update(dict.fromkeys(["HKV", "REP", "T", "D", "KG", "VG", "span", "sqb", "sqh"], "i32"))
    attn["sm_scale"] = "fp32"

    def a(qkind: int, f32dot: bool, kbits: int, vbits: int) -> dict:
        return {"KBITS": kbits, "KPER": 8 // kbits, "VBITS": vbits, "VPER": 8 // vbits, "KSBF16": True,
                "VSBF16": True, "QKIND": qkind, "F32DOT": f32dot, "NSPLIT": 4, "BH": 16, "BT": 32,
                "BD": 128}  # fmt: skip

    specs += [
        ("decode_attn_kernel", attn, a(2, False, 4, 2), 4),  # bf16 tensor-core dots
        ("decode_attn_kernel", dict(attn, q_ptr="*fp16"), a(1, False, 2, 4), 4),
        ("decode_attn_kernel", dict(attn, q_ptr="*fp32"), a(0, True, 8, 8), 4),
    ]
    assert compile_for_sm90("_triton_kvquant", specs).count("compiled") == len(specs)


def test_stride_analysis():
    # size-1 dims vanish, adjacent dims merge where one stride walks both
    assert kvquant._merge_dims((2, 1, 3, 4), (12, 12, 4, 1)) == [(24, 1)]
    assert kvquant._merge_dims((3, 5), (480, 12)) == [(3, 480), (5, 12)]
    k = torch.zeros(24, 5, 12)
    kb = k.view(3, 8, 5, 12).transpose(1, 2)  # the cache's key / value blocks [nb, H, G, D]
    src, pre, sxn, post = kvquant._as_pnq(kb, 2)
    assert src is kb and pre == [(1, 0), (3, 480), (5, 12)] and sxn == 60 and post == (12, 1)
    src, pre, sxn, post = kvquant._as_pnq(kb, 3)
    assert src is kb and pre == [(3, 480), (5, 12), (8, 60)] and sxn == 1 and post == (1, 0)
    y = torch.zeros(2, 3, 2, 3, 2, 8).permute(4, 2, 0, 3, 1, 5)  # five unmergeable leading dims
    src, pre, _, _ = kvquant._as_pnq(y, 5)
    assert src.is_contiguous() and pre == [(1, 0), (1, 0), (72, 8)]


def test_triton_launcher_bad_input():
    # every check runs before the kernel module is loaded: no GPU or interpreter needed
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"bits=3 is not supported; allowed bit widths: \(2, 4, 8\)"):
        quantize_triton(x, 3, 8)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_triton(x, True, 8)
    with pytest.raises(ValueError, match="group_size=12 does not divide the length 32"):
        quantize_triton(x, 4, 12)
    with pytest.raises(ValueError, match="group_size=2 is not a multiple of 4"):
        quantize_triton(x, 2, 2)
    with pytest.raises(ValueError, match="group_size=0 must be an int >= 1"):
        quantize_triton(x, 8, 0)
    with pytest.raises(ValueError, match="axis=-3 is out of range"):
        quantize_triton(x, 4, 8, axis=-3)
    with pytest.raises(TypeError, match="must be a float tensor, got torch.int64"):
        quantize_triton(torch.ones(4, 8, dtype=torch.long), 4, 8)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        quantize_triton([[1.0] * 8], 4, 8)
    with pytest.raises(ValueError, match="scale_dtype=torch.float64 is not allowed"):
        quantize_triton(x, 4, 8, scale_dtype=torch.float64)
    with pytest.raises(ValueError, match="_chunk=12 must be a power of two >= 4"):
        quantize_triton(x, 2, 8, _chunk=12)
    with pytest.raises(ValueError, match="_chunk=2 must be a power of two >= 4"):
        quantize_triton(x, 2, 8, _chunk=2)
    q = quantize_torch(x, 4, 8)
    with pytest.raises(TypeError, match="q must be a QTensor, got Tensor"):
        dequantize_triton(x)
    with pytest.raises(TypeError, match="q must be a QTensor"):
        dequantize(x)
    with pytest.raises(ValueError, match=r"q.packed is torch.uint8 \(4, 8\); expected uint8 \(4, 16\)"):
        dequantize_triton(kvquant.QTensor(q.packed[:, :8], q.scale, q.zero, q.shape, 4, 8, 1, q.dtype))
    with pytest.raises(ValueError, match=r"q.scale is torch.float16 \(4, 4\); expected .* shape \(4, 2\)"):
        dequantize_triton(kvquant.QTensor(q.packed, q.scale, q.zero, q.shape, 4, 16, 1, q.dtype))
    with pytest.raises(ValueError, match="q.scale is torch.float16 but q.zero is torch.bfloat16"):
        dequantize_triton(kvquant.QTensor(q.packed, q.scale, q.zero.bfloat16(), q.shape, 4, 8, 1, q.dtype))
    with pytest.raises(ValueError, match="q.zero is torch.int32"):
        dequantize_triton(kvquant.QTensor(q.packed, q.scale, q.zero.int(), q.shape, 4, 8, 1, q.dtype))
    with pytest.raises(TypeError, match="dtype=torch.int8 must be a float dtype"):
        dequantize_triton(q, dtype=torch.int8)


def test_decode_attention_bad_input():
    g = torch.Generator().manual_seed(0)
    k = quantize_torch(torch.randn(2, 2, 16, 8, generator=g), 4, 8, axis=2)
    v = quantize_torch(torch.randn(2, 2, 16, 8, generator=g), 4, 8, axis=3)
    q = torch.randn(2, 4, 8, generator=g)
    for fn in (kvquant.decode_attention_torch, kvquant.decode_attention_triton, kvquant.decode_attention):
        with pytest.raises(TypeError, match="q must be a float tensor"):
            fn(q.long(), k, v)
        with pytest.raises(ValueError, match=r"q must be \[B, Hq, D\]"):
            fn(q[:, :, None], k, v)
        with pytest.raises(ValueError, match="k must be a \\[B, Hkv, T, D\\] QTensor quantized along axis 2"):
            fn(q, v, v)  # values are quantized per token, not per channel
        with pytest.raises(TypeError, match="v must be a QTensor, got Tensor"):
            fn(q, k, torch.zeros(2, 2, 16, 8))
        with pytest.raises(ValueError, match="need the same B and D, and Hq a multiple of Hkv"):
            fn(q[:, :3], k, v)
        with pytest.raises(ValueError, match="scale=0 must be a positive number"):
            fn(q, k, v, scale=0)
        with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=16\], got \[0, 3\]"):
            fn(q, k, v, lengths=torch.tensor([0, 3]))
        with pytest.raises(ValueError, match=r"lengths has shape \(3,\), expected \(2,\)"):
            fn(q, k, v, lengths=torch.tensor([1, 2, 3]))
        with pytest.raises(TypeError, match="lengths must be an integer tensor"):
            fn(q, k, v, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        kvquant.decode_attention_triton(q.double(), k, v)
    with pytest.raises(ValueError, match="_block_t=8 must be a power of two >= 16"):
        kvquant.decode_attention_triton(q, k, v, _block_t=8)


def test_decode_attention_reference_is_the_formula(monkeypatch: pytest.MonkeyPatch):
    # the torch path is dequantize -> repeat over query heads -> softmax(q k^T * scale) v, masked by length
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(1)
    k = quantize_torch(torch.randn(2, 2, 16, 8, generator=g), 4, 8, axis=2)
    v = quantize_torch(torch.randn(2, 2, 16, 8, generator=g), 2, 4, axis=3)
    q = torch.randn(2, 6, 8, generator=g)
    lengths = torch.tensor([16, 5])
    kd = dequantize_torch(k).repeat_interleave(3, dim=1)
    vd = dequantize_torch(v).repeat_interleave(3, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q, kd) * 0.5
    s = s.masked_fill(torch.arange(16)[None, None, :] >= lengths[:, None, None], float("-inf"))
    want = torch.einsum("bht,bhtd->bhd", s.softmax(-1), vd)
    got = kvquant.decode_attention(q, k, v, scale=0.5, lengths=lengths)  # auto -> torch on CPU
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kvquant.decode_attention(q, k, v, backend="triton")


def test_dispatch_on_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    x = torch.randn(3, 2, 16, 8, generator=torch.Generator().manual_seed(0))
    q = quantize(x, 4, 16, axis=2)  # auto -> the reference on CPU
    want = quantize_torch(x, 4, 16, axis=2)
    assert torch.equal(q.packed, want.packed) and torch.equal(q.scale, want.scale)
    assert torch.equal(dequantize(q), dequantize_torch(want))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        quantize(x, 4, 16, axis=2, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dequantize(q, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        dequantize(q, backend="cuda")


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mmcompress\n"
        "from mmcompress.kernels import kvquant\n"
        "x = torch.randn(2, 16)\n"
        "q = kvquant.quantize(x, 4, 8)\n"
        "assert (kvquant.dequantize(q) - x).abs().max() < 1\n"
        "try:\n"
        "    kvquant.quantize(x, 4, 8, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_rows(tmp_path):
    # the kvquant rows record the bytes each op moves and the achieved GB/s next to a measured copy
    # bandwidth (timings themselves are not tested); Triton rows only on CUDA
    out = run_bench(
        (18,), ("kvquant",), device="cpu", repeats=1, json_out=tmp_path / "b.json", log=lambda s: None
    )
    assert out["bandwidth"]["copy_gbps"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["bandwidth"] == out["bandwidth"]
    rows = out["rows"]
    assert {(r["bits"], r["layout"], r["impl"]) for r in rows} == {
        (b, lay, f"torch {op} {name}")
        for b in (4, 2)
        for lay, name in (("per_channel", "K"), ("per_token", "V"))
        for op in ("quant", "dequant")
    } | {("4/2", "decode", "torch attend")}  # 4-bit K / 2-bit V, dequantize-then-SDPA
    n = 32 * 32 * 128  # [1, 32 heads, 32 tokens (18 rounded up to a group), 128]
    quant4 = next(r for r in rows if r["impl"] == "torch quant K" and r["bits"] == 4)
    assert quant4["tokens"] == 32 and quant4["bytes"] == n * 2 + n // 2 + 2 * 2 * (n // 32)
    assert all(r["gbps"] > 0 and r["frac_copy"] > 0 for r in rows)
