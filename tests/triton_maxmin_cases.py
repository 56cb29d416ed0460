"""Triton greedy max-min kernels (``kernels/maxmin.py``) against the torch reference and the official
DivPrune picks: run by ``test_kernels_maxmin.py`` in a child process (``kernel_helpers`` says why),
through the interpreter when there is no GPU.

Matrix mode compares only and takes minima, which are exact in every dtype, so its pick sequences must be
identical (``torch.equal``), ties included. Cosine mode sums dot products in another order than the
reference's matmul, so it is compared exactly only on data whose greedy margins are far above fp32
rounding (checked in the test), and otherwise checked to be a valid greedy sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_helpers import kernel_device
from safetensors.torch import load_file

from mmcompress.kernels.maxmin import (
    greedy_maxmin,
    greedy_maxmin_cosine,
    greedy_maxmin_cosine_torch,
    greedy_maxmin_cosine_triton,
    greedy_maxmin_torch,
    greedy_maxmin_triton,
)
from mmcompress.methods.divprune import DivPrune, divprune_select
from mmcompress.tokens import Layout, VisualTokens

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GOLDEN = Path(__file__).parent / "golden" / "divprune"


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


def _dist(b: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Cosine distances in ``dtype`` with exact duplicates (ties) at rows 2 and 5."""
    x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed))
    if n > 5:
        x[:, 5] = x[:, 2]
    xn = (x / x.norm(dim=-1, keepdim=True)).to(dtype)
    return 1.0 - xn @ xn.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,k", [(2, 37, 10), (1, 1, 1), (3, 67, 67), (1, 131, 20)])
@pytest.mark.parametrize("exclude", [True, False])
def test_matrix_equals_reference(device: str, dtype: torch.dtype, b: int, n: int, k: int, exclude: bool):
    dist = _dist(b, n, dtype, seed=n).to(device)
    got = greedy_maxmin_triton(dist, k, exclude_picked=exclude)
    assert got.dtype == torch.long and got.shape == (b, k)
    assert torch.equal(got.cpu(), greedy_maxmin_torch(dist.cpu(), k, exclude_picked=exclude))
    if exclude:
        assert all(row.unique().numel() == k for row in got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude", [True, False])
def test_streamed_running_minimum(device: str, dtype: torch.dtype, exclude: bool):
    # _block=16 forces the scratch-row path used above 4096 candidates on a GPU: 37 = 3 chunks - 11
    dist = _dist(2, 37, dtype, seed=3).to(device)
    got = greedy_maxmin_triton(dist, 15, exclude_picked=exclude, _block=16)
    assert torch.equal(got.cpu(), greedy_maxmin_torch(dist.cpu(), 15, exclude_picked=exclude))


def test_all_ties(device: str):
    z = torch.zeros(2, 5, 5, device=device)
    assert greedy_maxmin_triton(z, 5, exclude_picked=True).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert greedy_maxmin_triton(z, 3, exclude_picked=False).tolist() == [[0, 0, 0]] * 2
    assert greedy_maxmin_triton(z, 5, exclude_picked=True, _block=2).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_edge_cases_and_layouts(device: str):
    d = _dist(1, 9, torch.float32, seed=1)[0].to(device)
    assert greedy_maxmin_triton(d, 0, exclude_picked=True).shape == (0,)
    assert greedy_maxmin_triton(d[None, :0, :0], 0, exclude_picked=True).shape == (1, 0)
    assert greedy_maxmin_triton(torch.zeros(0, 4, 4, device=device), 2, exclude_picked=True).shape == (0, 2)
    assert greedy_maxmin_triton(torch.zeros(1, 1, device=device), 1, exclude_picked=True).tolist() == [0]
    assert greedy_maxmin_triton(d, 12, exclude_picked=False).shape == (12,)  # repeats allowed: k > N
    # any strides: an asymmetric matrix read through a transposed view
    a = torch.rand(11, 11, generator=torch.Generator().manual_seed(2)).to(device)
    assert torch.equal(
        greedy_maxmin_triton(a.t(), 6, exclude_picked=True).cpu(),
        greedy_maxmin_torch(a.t().contiguous().cpu(), 6, exclude_picked=True),
    )
    # inf distances are ordinary values
    d2 = d.clone()
    d2[3, 4] = d2[4, 3] = float("inf")
    assert torch.equal(
        greedy_maxmin_triton(d2, 9, exclude_picked=True).cpu(),
        greedy_maxmin_torch(d2.cpu(), 9, exclude_picked=True),
    )


def test_bad_input(device: str):
    d = torch.rand(4, 4, device=device)
    with pytest.raises(ValueError, match="k=5 exceeds the 4 candidates"):
        greedy_maxmin_triton(d, 5, exclude_picked=True)
    with pytest.raises(ValueError, match="k=-1"):
        greedy_maxmin_triton(d, -1, exclude_picked=False)
    with pytest.raises(TypeError, match="dtype torch.float64; allowed"):
        greedy_maxmin_triton(d.double(), 2, exclude_picked=True)
    with pytest.raises(ValueError, match=r"\[N, N\] or \[B, N, N\]"):
        greedy_maxmin_triton(d[:, :3], 2, exclude_picked=True)
    bad = d.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="dist contains NaN"):
        greedy_maxmin(bad, 2, exclude_picked=True, backend="triton")


# -- the official DivPrune picks (golden vectors, vbdi/divprune @ 799e2d9) --------------------------------


def _case(prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    index = json.loads((GOLDEN / "index.json").read_text())
    c = next(c for c in index["cases"] if c["case_id"].startswith(prefix))
    return c["params"], load_file(GOLDEN / c["file"])


@pytest.mark.parametrize("prefix", ["dp04", "dp06"])
@pytest.mark.parametrize("pre", ["f32", "f16"])
def test_official_picks_on_stored_dist(device: str, prefix: str, pre: str):
    p, t = _case(prefix)
    got = greedy_maxmin_triton(t[f"{pre}_dist"].to(device), p["K"], exclude_picked=False)
    assert torch.equal(got.cpu(), t[f"{pre}_selected"])


@pytest.mark.parametrize("prefix", ["dp01", "dp05"])
def test_official_pipeline_fp32(device: str, prefix: str):
    # dp05: a letterboxed image, many exact duplicates: the repeats of the official loop are reproduced
    p, t = _case(prefix)
    x = t["x"].to(device)
    got = divprune_select(x, p["K"], official_compat=True, backend="triton")
    if device == "cpu":  # the stored picks come from a CPU Dist; a cuBLAS GEMM may round differently
        assert torch.equal(got, t["f32_selected"])
    assert torch.equal(got.cpu(), divprune_select(x, p["K"], official_compat=True, backend="torch").cpu())
    assert torch.equal(
        divprune_select(x, p["K"], backend="triton"), divprune_select(x, p["K"], backend="torch")
    )


def test_divprune_method_backends_agree(device: str):
    x = torch.randn(6 * 7, 32, generator=torch.Generator().manual_seed(9)).to(device)
    x[10] = x[3]
    tokens = VisualTokens(x, Layout.single(6, 7))
    for keep in (5, 0.5, 42):
        a = DivPrune(keep=keep, backend="triton").select(tokens)
        b = DivPrune(keep=keep, backend="torch").select(tokens)
        assert torch.equal(a.indices, b.indices)


# -- cosine distances on the fly --------------------------------------------------------------------------


def _greedy_margins(x: torch.Tensor, k: int) -> float:
    """Smallest gap, over the reference's picks, between the winning score and the runner-up (fp64)."""
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    d = 1.0 - xn @ xn.t()
    nn = torch.topk(d, 2, dim=0, largest=False).values[1]
    gaps, run = [], None
    for _ in range(k):
        s = nn if run is None else run
        top = torch.topk(s, 2).values
        gaps.append(float(top[0] - top[1]))
        pick = int(s.argmax())
        run = d[pick].clone() if run is None else torch.minimum(run, d[pick])
        run[pick] = float("-inf")
    return min(gaps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k", [(29, 16, 9), (70, 48, 20)])
def test_cosine_equals_reference(device: str, dtype: torch.dtype, n: int, d: int, k: int):
    x = torch.randn(2, n, d, generator=torch.Generator().manual_seed(n)).to(dtype)
    for b in range(2):  # the data is far from ties, so summation order cannot change a pick
        assert _greedy_margins(x[b], k) > 1e-5  # fp32 rounding of these sums: ~1e-7
    got = greedy_maxmin_cosine_triton(x.to(device), k, exclude_picked=True)
    assert torch.equal(got.cpu(), greedy_maxmin_cosine_torch(x, k, exclude_picked=True))
    streamed = greedy_maxmin_cosine_triton(x.to(device), k, exclude_picked=True, _block=16)
    assert torch.equal(streamed.cpu(), got.cpu())
    assert torch.equal(greedy_maxmin_cosine(x.to(device), k, exclude_picked=True, backend="triton"), got)


def test_cosine_picks_are_greedy_with_duplicates(device: str):
    # exact duplicates: near-ties at fp32 rounding level, where the two paths may break ties differently;
    # every pick must still be a maximiser of the running minimum up to rounding, and never repeat
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
    x[7] = x[1]
    x[30] = x[1]
    got = greedy_maxmin_cosine_triton(x.to(device), 40, exclude_picked=True).cpu()
    assert sorted(got.tolist()) == list(range(40))
    xn = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    run = dist[got[0]].clone()
    run[got[0]] = float("-inf")
    for s in got[1:].tolist():
        assert run[s] >= run.max() - 1e-5
        run = torch.minimum(run, dist[s])
        run[s] = float("-inf")


def test_cosine_bad_input(device: str):
    x = torch.randn(5, 4, device=device)
    z = x.clone()
    z[2] = 0.0
    with pytest.raises(ValueError, match="zero-norm row"):
        greedy_maxmin_cosine_triton(z, 2, exclude_picked=True)
    z[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_maxmin_cosine_triton(z, 2, exclude_picked=True)
    with pytest.raises(ValueError, match="k=6 exceeds the 5 candidates"):
        greedy_maxmin_cosine_triton(x, 6, exclude_picked=True)
    with pytest.raises(ValueError, match=r"\[N, D\] or \[B, N, D\]"):
        greedy_maxmin_cosine_triton(x[0], 1, exclude_picked=True)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        greedy_maxmin_cosine_triton(x.double(), 1, exclude_picked=True)
