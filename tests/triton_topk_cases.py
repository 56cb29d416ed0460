"""Triton top-k kernel (``kernels/topk.py``) against its torch reference: run by ``test_kernels_topk.py``
in a child process (``kernel_helpers`` says why), through the interpreter when there is no GPU.

Indices are compared exactly (``torch.equal``) and so are values: both paths gather the input scores, no
arithmetic is involved. Sizes are small and odd / prime, since the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import kernel_device

from mmcompress.kernels.topk import topk, topk_torch, topk_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


def _scores(b: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Few distinct values (many ties), plus -0.0, ±inf and a NaN per row where the row is long enough."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-4, 5, (b, n), generator=g) * 0.25).to(dtype)
    if n >= 8:
        x[:, 1] = -0.0
        x[:, 3] = float("-inf")
        x[:, 6] = float("nan")
        x[0, 5] = float("inf")
    return x


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[1].cpu(), b[1].cpu())  # indices, exactly
    assert a[0].dtype == b[0].dtype
    va, vb = a[0].cpu(), b[0].cpu()
    assert torch.equal(torch.isnan(va), torch.isnan(vb))
    assert torch.equal(va.nan_to_num(0.0), vb.nan_to_num(0.0))  # values, exactly (padding is NaN)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n", [(1, 1), (3, 37), (2, 97), (4, 64)])
@pytest.mark.parametrize("sorted_", [True, False])
def test_triton_equals_reference(device: str, dtype: torch.dtype, b: int, n: int, sorted_: bool):
    x = _scores(b, n, dtype, seed=n).to(device)
    finite = (~torch.isnan(x)).sum(-1).cpu().tolist()
    # per-row k: 0, "every number in the row", and values in between
    ks = [min(v, f) for v, f in zip([0, finite[-1], 5, 1] if b > 1 else [finite[0]], finite)]
    for k in (torch.tensor(ks), min(ks[-1], 3)):
        _same(topk_triton(x, k, sorted=sorted_), topk_torch(x, k, sorted=sorted_))


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_rows(device: str, dtype: torch.dtype):
    # _block=16 forces the path for rows longer than one block (N > 4096 on a GPU): 41 = 3 blocks - 7
    x = _scores(2, 41, dtype, seed=7).to(device)
    for sorted_ in (True, False):
        _same(topk_triton(x, [9, 40], sorted=sorted_, _block=16), topk_torch(x, [9, 40], sorted=sorted_))


def test_random_fp32_rows_without_ties(device: str):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 300, generator=g)
    vals, idx = topk_triton(x.to(device), 50)
    ref = torch.topk(x, 50)  # no ties: torch.topk is fully defined
    assert torch.equal(idx.cpu(), ref.indices) and torch.equal(vals.cpu(), ref.values)


def test_ties_lowest_index_first(device: str):
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, -0.0, 0.0]], device=device)
    assert topk_triton(x, 2)[1].tolist() == [[1, 2]]
    assert topk_triton(x, 4)[1].tolist() == [[1, 2, 4, 0]]
    # +0.0 and -0.0 are one value: the lower index wins
    assert topk_triton(x, 6)[1].tolist() == [[1, 2, 4, 0, 3, 5]]
    assert topk_triton(x, 6, sorted=False)[1].tolist() == [[0, 1, 2, 3, 4, 5]]


def test_nan_never_wins(device: str):
    x = torch.tensor([float("nan"), float("-inf"), float("nan"), -1e30], device=device)
    vals, idx = topk_triton(x, 2)
    assert idx.tolist() == [3, 1] and vals[1] == float("-inf")
    with pytest.raises(ValueError, match="row 0 has only 2 non-NaN scores but k=3"):
        topk_triton(x, 3)


def test_edge_cases(device: str):
    x = _scores(3, 11, torch.float32).to(device)
    vals, idx = topk_triton(x, 0)
    assert vals.shape == idx.shape == (3, 0)
    vals, idx = topk_triton(x[:0], 4)  # no rows
    assert vals.shape == idx.shape == (0, 4)
    vals, idx = topk_triton(torch.empty(2, 0, device=device), 0)  # empty rows
    assert idx.shape == (2, 0)
    _same(topk_triton(x[0], 4), topk_torch(x[0], 4))  # 1-D in, 1-D out
    assert topk_triton(x[0], 4)[1].shape == (4,)
    one = topk_triton(torch.tensor([[3.0]], device=device), 1)
    assert one[1].tolist() == [[0]] and one[0].tolist() == [[3.0]]
    # k = N with no NaN: every index, in value order / in index order
    y = _scores(2, 13, torch.float16, seed=3).to(device)[:, 7:]
    _same(topk_triton(y, 6), topk_torch(y, 6))
    assert topk_triton(y, 6, sorted=False)[1].tolist() == [list(range(6))] * 2


def test_non_contiguous_input(device: str):
    base = _scores(9, 20, torch.bfloat16, seed=4).nan_to_num(1.5).to(device)
    x = base.t()[:, ::2]  # [20, 5], strides (1, 40)
    assert not x.is_contiguous()
    _same(topk_triton(x, 2), topk_torch(x.contiguous(), 2))


def test_dispatch(device: str):
    x = _scores(2, 19, torch.float32).to(device)
    _same(topk(x, 4, backend="triton"), topk(x, 4, backend="torch"))
    _same(topk(x, 4), topk_torch(x, 4))  # auto: Triton on CUDA, the reference on CPU


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        topk(torch.zeros(4), 1, backend="triton")


def test_bad_input(device: str):
    x = torch.zeros(3, 5, device=device)
    with pytest.raises(ValueError, match=r"k=6 for row 0 is outside \[0, N=5\]"):
        topk_triton(x, 6)
    with pytest.raises(ValueError, match=r"k=-1 for row 2"):
        topk_triton(x, [1, 2, -1])
    with pytest.raises(ValueError, match="k has 2 entries but scores has 3 rows"):
        topk_triton(x, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        topk_triton(x.double(), 1)
    with pytest.raises(ValueError, match="sorted=True handles k <= 65536"):
        topk_triton(torch.zeros(1, 70000, device=device), 70000)
