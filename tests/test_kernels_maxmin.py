"""Greedy max-min (``kernels/maxmin.py``): the dispatcher's and the cosine reference's contract, the Triton
kernels compiled for sm_90, and the Triton-path cases (``triton_maxmin_cases.py``, run in a child process
through the interpreter when there is no GPU; ``kernel_helpers`` says why)."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_helpers import compile_for_sm90, run_cases

from mmcompress.evals.bench_kernels import official_divprune_loop, run_bench
from mmcompress.kernels.maxmin import (
    greedy_maxmin,
    greedy_maxmin_cosine,
    greedy_maxmin_cosine_torch,
    greedy_maxmin_torch,
)


def test_triton_kernels_against_reference():
    run_cases("triton_maxmin_cases.py")


def test_cosine_reference_is_the_matrix_loop_in_fp32():
    x = torch.randn(2, 23, 8, generator=torch.Generator().manual_seed(1)).half()
    xf = x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True)
    for exclude in (True, False):
        want = greedy_maxmin_torch(1.0 - xn @ xn.transpose(1, 2), 23, exclude_picked=exclude)
        assert torch.equal(greedy_maxmin_cosine_torch(x, 23, exclude_picked=exclude), want)
        assert torch.equal(greedy_maxmin_cosine(x[1], 5, exclude_picked=exclude), want[1, :5])


def test_dispatcher_contract(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        greedy_maxmin(d, 4, exclude_picked=True), greedy_maxmin_torch(d, 4, exclude_picked=True)
    )
    bad = d.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="dist contains NaN"):
        greedy_maxmin(bad, 2, exclude_picked=True)  # a NaN would win every torch.argmax
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        greedy_maxmin(d, 2, exclude_picked=True, backend="triton")
    with pytest.raises(ValueError, match="backend='gpu' is not allowed"):
        greedy_maxmin(d, 2, exclude_picked=True, backend="gpu")
    with pytest.raises(TypeError, match="float tensor"):
        greedy_maxmin(d.long(), 2, exclude_picked=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        greedy_maxmin(d.tolist(), 2, exclude_picked=True)


def test_cosine_reference_bad_input():
    x = torch.randn(5, 4)
    x[3] = 0.0
    with pytest.raises(ValueError, match="zero-norm row"):
        greedy_maxmin_cosine(x, 2, exclude_picked=True)
    with pytest.raises(ValueError, match="D=0"):
        greedy_maxmin_cosine(torch.empty(3, 0), 1, exclude_picked=True)
    with pytest.raises(ValueError, match="k=9 exceeds the 5 candidates"):
        greedy_maxmin_cosine(torch.randn(5, 4), 9, exclude_picked=True)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        greedy_maxmin_cosine(torch.ones(5, 4, dtype=torch.long), 2, exclude_picked=True)


def test_kernels_compile_for_sm90():
    i = "i32"
    greedy = {"src_ptr": "*fp16", "nn_ptr": "*fp32", "run_ptr": "*fp32", "out_ptr": "*i64"}
    greedy.update({name: i for name in ("n", "k", "dim", "s_b", "s_r", "s_c", "s_d")})
    feat = dict(greedy, src_ptr="*fp32")
    nn_matrix = {"d_ptr": "*fp16", "nn_ptr": "*fp32", "n": i, "s_b": i, "s_r": i, "s_c": i}
    nn_feat = {"x_ptr": "*fp32", "nn_ptr": "*fp32", "n": i, "dim": i, "s_b": i, "s_n": i, "s_d": i}

    def loop(features: bool, exclude: bool, block: int, single: bool) -> dict:
        return {"FEATURES": features, "EXCLUDE": exclude, "BLOCK": block, "BLOCK_D": 16, "SINGLE": single}

    specs = [
        ("nn_matrix_kernel", nn_matrix, {"BLOCK_R": 32, "BLOCK_C": 128}, 4),
        ("nn_features_kernel", nn_feat, {"BLOCK_R": 32, "BLOCK_C": 64, "BLOCK_D": 64}, 4),
        ("greedy_kernel", greedy, loop(False, True, 4096, True), 8),
        ("greedy_kernel", greedy, loop(False, False, 4096, False), 8),
        ("greedy_kernel", feat, loop(True, True, 512, True), 4),
        ("greedy_kernel", feat, loop(True, True, 512, False), 4),
    ]
    assert compile_for_sm90("_triton_maxmin", specs).count("compiled") == len(specs)


def test_bench_kernels_smoke(tmp_path):
    # the benchmark script runs end to end and records where it ran; its official-style loop picks what
    # the reference picks (timings themselves are not tested)

    out = run_bench((18,), device="cpu", repeats=1, dim=8, json_out=tmp_path / "b.json", log=lambda s: None)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["machine"]["device"].startswith("cpu") and saved["machine"]["date"]
    assert {r["kernel"] for r in out["rows"]} == {"divprune", "topk", "merge", "kvquant"}
    assert all(r["ms_median"] > 0 for r in saved["rows"])
    assert not any(r["impl"].startswith("triton") for r in saved["rows"])  # interpreter timings are not speed
    d = torch.rand(30, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(official_divprune_loop(d, 12), greedy_maxmin_torch(d, 12, exclude_picked=False))
