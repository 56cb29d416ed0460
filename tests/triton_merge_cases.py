"""Triton bipartite merge (``kernels/merge_triton.py``) against the torch reference
(``kernels/merge.py``) and the official AIM outputs: run by ``test_kernels_merge.py`` in a child process
(``kernel_helpers`` says why), through the interpreter when there is no GPU.

Integer results (``slot``, ``anchor``, ``sizes``, per-step maps) are compared exactly. Merged features are
arithmetic: fp32 within 1e-6 (summation order), fp16 / bf16 bitwise on these inputs (both round the fp32
sum once), checked with the tolerances below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_helpers import kernel_device
from safetensors.torch import load_file

from mmcompress.kernels.merge import aim_merge_torch
from mmcompress.kernels.merge_triton import (
    aim_merge_triton,
    merge_step_triton,
    tome_merge,
    tome_merge_torch,
    tome_merge_triton,
)

GOLDEN = Path(__file__).parent / "golden" / "aim"
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = TOL[ref.dtype]
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), rtol=tol, atol=tol)


def _same_maps(a, b) -> None:
    assert torch.equal(a.slot.cpu(), b.slot.cpu())
    assert torch.equal(a.anchor.cpu(), b.anchor.cpu())
    assert torch.equal(a.sizes.cpu(), b.sizes.cpu())


def _golden(prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    index = json.loads((GOLDEN / "index.json").read_text())
    c = next(c for c in index["cases"] if c["case_id"].startswith(prefix))
    return c, load_file(GOLDEN / c["file"])


@pytest.mark.parametrize(
    "prefix,weighting",
    [("am01", "unweighted"), ("am01", "size"), ("am03", "unweighted"), ("am03", "size"),
     ("am04", "unweighted"), ("am06", "unweighted")],
)  # fmt: skip
def test_aim_merge_equals_reference(device: str, prefix: str, weighting: str):
    # am03: fp16; am04: letterboxed image (64 identical tokens pile into one destination); am06: odd 13x13
    c, t = _golden(prefix)
    r_list = c["params"]["r_list"]
    x = t["x"].to(device)
    got = aim_merge_triton(x, r_list, weighting=weighting)
    ref = aim_merge_torch(t["x"], r_list, weighting=weighting)
    _same_maps(got, ref)
    assert got.r_effective == ref.r_effective
    for a, b in zip(got.step_slots + got.step_anchors, ref.step_slots + ref.step_anchors):
        assert torch.equal(a.cpu(), b)
    _close(got.features, ref.features)
    if weighting == "unweighted":  # the official outputs themselves
        assert torch.equal(got.slot.cpu(), t["final_slot"]) and torch.equal(got.sizes.cpu(), t["final_count"])
        _close(got.features, t[f"out_step{len(r_list)}"])


@pytest.mark.parametrize(
    "dtype,weighting",
    [
        (torch.float32, "size"),
        (torch.float16, "unweighted"),
        (torch.bfloat16, "unweighted"),
        (torch.bfloat16, "size"),
    ],
)
def test_aim_merge_separate_metric_and_dtypes(device: str, dtype: torch.dtype, weighting: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 29, 20, generator=g).to(dtype)
    metric = torch.randn(2, 29, 12, generator=g).to(dtype)
    got = aim_merge_triton(x.to(device), [14, 5, 30], metric=metric.to(device), weighting=weighting)
    ref = aim_merge_torch(x, [14, 5, 30], metric=metric, weighting=weighting)
    assert got.r_effective == ref.r_effective == [14, 5, 5]  # the last one clamped to T // 2
    _same_maps(got, ref)
    _close(got.features, ref.features)
    _close(got.metric, ref.metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,r", [(2, 1), (37, 0), (37, 1), (37, 18), (46, 20)])
def test_tome_merge_equals_reference(device: str, dtype: torch.dtype, t: int, r: int):
    g = torch.Generator().manual_seed(t + r)
    x = torch.randn(2, t, 24, generator=g).to(dtype)
    sizes = torch.randint(1, 5, (2, t), generator=g)
    got = tome_merge_triton(x.to(device), r, sizes=sizes.to(device))
    ref = tome_merge_torch(x, r, sizes=sizes)
    _same_maps(got, ref)
    _close(got.features, ref.features)
    assert got.features.shape == (2, t - r, 24)
    assert torch.equal(got.sizes.sum(-1).cpu(), sizes.sum(-1))  # nothing lost


def test_tome_merge_is_the_size_weighted_mean(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(31, 16, generator=g)
    sizes = torch.randint(1, 9, (31,), generator=g)
    res = tome_merge_triton(x.to(device), 11, sizes=sizes.to(device))  # 2-D in, 2-D out
    onehot = torch.nn.functional.one_hot(res.slot.cpu(), 20).t().double() * sizes.double()
    want = (onehot @ x.double()) / onehot.sum(-1, keepdim=True)
    torch.testing.assert_close(res.features.cpu().double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(res.slot.cpu()[res.anchor.cpu()], torch.arange(20))  # each output holds its anchor
    assert torch.equal(tome_merge(x.to(device), 11, sizes=sizes.to(device), backend="triton").slot, res.slot)


def test_edge_cases(device: str):
    x = torch.randn(2, 1, 8, device=device)
    res = merge_step_triton(x, 3)  # T = 1: nothing to merge (r clamps to 0)
    assert res[5] == 0 and torch.equal(res[0], x)
    none = merge_step_triton(torch.randn(0, 6, 4, device=device), 2)  # no frames
    assert none[0].shape == (0, 6, 4)
    same = aim_merge_triton(torch.randn(9, 4, device=device), [])
    assert same.features.shape == (9, 4) and torch.equal(same.slot.cpu(), torch.arange(9))
    # non-contiguous features and metric
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 3, 10, generator=g).to(device)
    xt = base.transpose(0, 1)  # [3, 12, 10], not contiguous
    got = aim_merge_triton(xt, [5], metric=xt[..., ::2])
    ref = aim_merge_torch(xt.cpu().contiguous(), [5], metric=xt[..., ::2].cpu().contiguous())
    _same_maps(got, ref)
    _close(got.features, ref.features)


def test_bad_input(device: str):
    x = torch.randn(2, 10, 4, device=device)
    with pytest.raises(ValueError, match=r"r=6 must be an int in \[0, T // 2 = 5\]"):
        tome_merge_triton(x, 6)
    with pytest.raises(ValueError, match="r=-1"):
        tome_merge_triton(x, -1)
    with pytest.raises(ValueError, match="metric must match"):
        tome_merge_triton(x, 2, metric=torch.randn(2, 9, 4, device=device))
    with pytest.raises(TypeError, match="sizes must be an int64 tensor"):
        tome_merge_triton(x, 2, sizes=torch.ones(2, 10, device=device))
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        tome_merge_triton(x, 2, sizes=torch.zeros(2, 10, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        tome_merge_triton(x.double(), 2)
    bad = x.clone()
    bad[1, 3] = 0.0
    with pytest.raises(ValueError, match="zero-norm token"):
        aim_merge_triton(bad, [3])
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        aim_merge_triton(bad, [3])
    with pytest.raises(ValueError, match="every reduction in r_list"):
        aim_merge_triton(x, [2, -1])
    with pytest.raises(ValueError, match="weighting='mean'"):
        aim_merge_triton(x, [2], weighting="mean")
