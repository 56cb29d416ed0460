"""Bipartite merge (``kernels/merge_triton.py``): the ToMe-style reference's contract, bad input, the
Triton kernels compiled for sm_90, and the Triton-path cases (``triton_merge_cases.py``, run in a child
process through the interpreter when there is no GPU; ``kernel_helpers`` says why)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import compile_for_sm90, run_cases

from mmcompress.kernels.merge_triton import TomeMerge, tome_merge, tome_merge_torch


def test_triton_kernels_against_reference():
    run_cases("triton_merge_cases.py")


def test_tome_reference_contract():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 17, 6, generator=g, dtype=torch.float64).float()
    sizes = torch.randint(1, 4, (3, 17), generator=g)
    res = tome_merge(x, 8, sizes=sizes)
    assert isinstance(res, TomeMerge) and res.features.shape == (3, 9, 6)
    for f in range(3):
        # every output is the size-weighted mean of the inputs mapped to it, and holds its anchor
        w = torch.nn.functional.one_hot(res.slot[f], 9).t().double() * sizes[f].double()
        want = (w @ x[f].double()) / w.sum(-1, keepdim=True)
        torch.testing.assert_close(res.features[f].double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(res.sizes[f], w.sum(-1).long())
        assert torch.equal(res.slot[f][res.anchor[f]], torch.arange(9))
        # destinations (odd positions) all survive, in order, after the unmerged sources
        assert torch.equal(res.anchor[f, -8:], torch.arange(1, 17, 2))
    # the metric decides the matching, the features are only averaged
    m = torch.randn(3, 17, 4, generator=g)
    assert torch.equal(tome_merge(x, 8, metric=m).slot, tome_merge(x * 2 + 1, 8, metric=m).slot)
    # r = 0: nothing changes
    same = tome_merge_torch(x[0], 0)
    assert torch.equal(same.features, x[0]) and torch.equal(same.slot, torch.arange(17))


def test_bad_input(monkeypatch: pytest.MonkeyPatch):
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"r=6 must be an int in \[0, T // 2 = 5\]"):
        tome_merge(x, 6)
    with pytest.raises(ValueError, match="r=True"):
        tome_merge(x, True)
    with pytest.raises(ValueError, match="must be"):
        tome_merge(x[0, 0], 1)
    with pytest.raises(ValueError, match="sizes must be"):
        tome_merge(x, 2, sizes=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        tome_merge(x.double(), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tome_merge(x.tolist(), 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tome_merge(x, 2, backend="triton")


def test_kernels_compile_for_sm90():
    i = "i32"
    match = {"m_ptr": "*bf16", "best_v_ptr": "*fp32", "best_i_ptr": "*i64"}
    match.update({name: i for name in ("n_a", "n_b", "dim", "s_f", "s_t", "s_d")})
    plan = {"rank_ptr": "*i64", "best_i_ptr": "*i64", "slot_ptr": "*i64", "anchor_ptr": "*i64"}
    plan.update({name: i for name in ("t", "n_a", "n_b", "r", "t_out")})
    red = {"x_ptr": "*bf16", "size_ptr": "*i64", "slot_ptr": "*i64", "anchor_ptr": "*i64", "out_ptr": "*bf16"}
    red["size_out_ptr"] = "*i64"
    red.update({name: i for name in ("t", "n_a", "n_unm", "t_out", "c", "s_xf", "s_xt", "s_xc")})
    tiles = {"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": 64}
    red_blocks = {"SCAN": 256, "SUB": 16, "BLOCK_C": 512}
    specs = [
        ("match_kernel", match, {"SCORE_DTYPE": "tl.bfloat16", **tiles}, 4),
        ("match_kernel", dict(match, m_ptr="*fp16"), {"SCORE_DTYPE": "tl.float16", **tiles}, 4),
        ("plan_kernel", plan, {"BLOCK": 1024}, 4),
        ("reduce_kernel", red, {"WEIGHTED": False, **red_blocks}, 4),
        ("reduce_kernel", dict(red, x_ptr="*fp32", out_ptr="*fp32"), {"WEIGHTED": True, **red_blocks}, 4),
    ]
    assert compile_for_sm90("_triton_merge", specs).count("compiled") == len(specs)
