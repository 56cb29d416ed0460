"""Top-k (``kernels/topk.py``): the torch reference against the contract written out, bad input, import
without Triton, the Triton kernels compiled for sm_90, and the Triton-path cases (``triton_topk_cases.py``,
run in a child process through the interpreter when there is no GPU; ``kernel_helpers`` says why)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_helpers import compile_for_sm90, run_cases
from triton_topk_cases import _scores

from mmcompress.kernels._dispatch import resolve_backend
from mmcompress.kernels.topk import topk, topk_torch


def test_triton_kernels_against_reference():
    run_cases("triton_topk_cases.py")


def _definition(x: torch.Tensor, k: list[int], sorted_: bool) -> list[list[int]]:
    """The contract written out: value descending, NaN after every number, then index ascending."""
    out = []
    for row, kk in zip(x.float().tolist(), k):
        key = [(v != v, -v if v == v else 0.0, i) for i, v in enumerate(row)]
        top = [i for *_, i in sorted(key)][:kk]
        out.append(top if sorted_ else sorted(top))
    return out


@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_definition(sorted_: bool, dtype: torch.dtype):
    x = _scores(3, 23, dtype)
    k = [0, 7, 22]  # 22 = every non-NaN score
    vals, idx = topk_torch(x, torch.tensor(k), sorted=sorted_)
    assert vals.dtype == dtype and idx.dtype == torch.long and idx.shape == (3, 22)
    want = _definition(x, k, sorted_)
    for r in range(3):
        assert idx[r, : k[r]].tolist() == want[r]
        assert (idx[r, k[r] :] == -1).all() and torch.isnan(vals[r, k[r] :]).all()
        assert torch.equal(vals[r, : k[r]], x[r, idx[r, : k[r]]])
    assert 6 not in idx.tolist()[2]  # the NaN is never picked, even when every number is


def test_reference_nan_and_zero_rules():
    x = torch.tensor([0.0, -0.0, float("nan"), float("-inf"), 0.0])
    assert topk_torch(x, 4)[1].tolist() == [0, 1, 4, 3]  # -0.0 == +0.0; -inf before NaN
    with pytest.raises(ValueError, match="only 4 non-NaN scores but k=5"):
        topk_torch(x, 5)


def test_bad_input():
    x = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"k=6 for row 0 is outside \[0, N=5\]"):
        topk_torch(x, 6)
    with pytest.raises(ValueError, match=r"k=-1 for row 2"):
        topk_torch(x, [1, 2, -1])
    with pytest.raises(ValueError, match="k has 2 entries but scores has 3 rows"):
        topk_torch(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0-d or 1-d"):
        topk_torch(x, torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        topk_torch(x, torch.ones(3))
    with pytest.raises(TypeError, match="bool"):
        topk_torch(x, True)
    with pytest.raises(TypeError, match="dtype torch.float64; allowed: float32, float16, bfloat16"):
        topk_torch(x.double(), 1)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        topk_torch(torch.zeros(3, 5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"\[N\] or \[B, N\]"):
        topk_torch(x[None], 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        topk([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        topk(x, 1, backend="cuda")


def test_dispatch_on_cpu_without_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    x = _scores(2, 9, torch.float32)
    assert torch.equal(topk(x, 3)[1], topk_torch(x, 3)[1])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        topk(x, 3, backend="triton")


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mmcompress\n"
        "from mmcompress.kernels import topk, maxmin, merge_triton\n"
        "assert topk.topk(torch.tensor([1.0, 3.0]), 1)[1].tolist() == [1]\n"
        "try:\n"
        "    topk.topk(torch.zeros(2), 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_compile_for_sm90():
    sel = {
        "x_ptr": "*bf16", "k_ptr": "*i32", "idx_ptr": "*i64", "val_ptr": "*bf16", "n": "i32",
        "stride_xb": "i32", "stride_xn": "i32", "stride_ob": "i32",
    }  # fmt: skip
    srt = {
        "x_ptr": "*fp32", "k_ptr": "*i32", "src_ptr": "*i64", "idx_ptr": "*i64", "val_ptr": "*fp32",
        "stride_xb": "i32", "stride_xn": "i32", "stride_ob": "i32",
    }  # fmt: skip
    out = compile_for_sm90(
        "_triton_topk",
        [
            ("select_kernel", sel, {"MASK": -(1 << 16), "LOW_BIT": 16, "BLOCK": 4096, "SINGLE": True}, 8),
            ("select_kernel", sel, {"MASK": -(1 << 16), "LOW_BIT": 16, "BLOCK": 1024, "SINGLE": False}, 4),
            ("sort_kernel", srt, {"MASK": -1, "KB": 1024}, 4),
        ],
    )
    assert out.count("compiled") == 3
