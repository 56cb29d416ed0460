"""Baselines (random, pool), DivPrune's greedy loop and every config's validation and JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmcompress import registry
from mmcompress.config import MethodConfig
from mmcompress.kernels._dispatch import resolve_backend, triton_available
from mmcompress.kernels.maxmin import greedy_maxmin, greedy_maxmin_torch
from mmcompress.methods.divprune import DivPrune, divprune_select
from mmcompress.methods.pool import Pool, pool_grid, pool_shape, split_budget
from mmcompress.methods.random import RandomPrune, random_indices
from mmcompress.tokens import GridView, Layout, VisualTokens


def _tokens(rows: int, cols: int, d: int = 8, seed: int = 0, image_index: int = 0) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    return VisualTokens(
        torch.randn(rows * cols, d, generator=g), Layout.single(rows, cols), image_index=image_index
    )


def _anyres_tokens(d: int = 8) -> VisualTokens:
    # base 4x4 thumbnail (16) + crops 6x7 with a newline closing each row (6 * 8 = 48): N = 64
    layout = Layout((GridView("base", 0, 4, 4), GridView("crops", 16, 6, 7, newline=True)))
    x = torch.randn(layout.num_tokens, d, generator=torch.Generator().manual_seed(3))
    return VisualTokens(x, layout)


def _golden_dir() -> Path:
    root = os.environ.get("MMCOMPRESS_GOLDEN_DIR")
    return Path(root) / "divprune" if root else Path(__file__).parent / "golden" / "divprune"


# -- random ---------------------------------------------------------------------------------------------


def test_random_indices_deterministic_sorted_unique():
    a = random_indices(576, 64, seed=7)
    assert torch.equal(a, random_indices(576, 64, seed=7))
    assert a.dtype == torch.long and a.shape == (64,)
    assert torch.equal(a, torch.sort(a).values) and a.unique().numel() == 64
    assert int(a.min()) >= 0 and int(a.max()) < 576
    assert not torch.equal(a, random_indices(576, 64, seed=8))


def test_random_independent_of_batch_position_and_global_rng():
    m = RandomPrune(keep=0.25, seed=3)
    first = m.select(_tokens(24, 24, image_index=0)).indices
    torch.manual_seed(123)  # the global generator must not matter
    torch.rand(10)
    later = m.select(_tokens(24, 24, seed=9, image_index=5)).indices
    assert torch.equal(first, later)
    assert first.numel() == 144


# -- pool -----------------------------------------------------------------------------------------------


def _check_pool_selection(tokens: VisualTokens, sel) -> None:
    """Window means, centre representatives, sorted unique indices, groups partition the grid tokens."""
    x, n = tokens.features, tokens.num_tokens
    k = sel.num_kept
    assert torch.equal(sel.indices, torch.sort(sel.indices).values) and sel.indices.unique().numel() == k
    assert sel.features.shape == (k, x.shape[1]) and sel.weights.shape == (k,) and sel.groups.shape == (n,)
    newline = tokens.layout.newline_mask()
    assert bool((sel.groups[newline] == -1).all()) and bool((sel.groups[~newline] >= 0).all())
    assert not bool(newline[sel.indices].any())
    assert int(sel.weights.sum()) == int((~newline).sum())
    for w in range(k):
        members = (sel.groups == w).nonzero().flatten()
        assert members.numel() == int(sel.weights[w])
        torch.testing.assert_close(sel.features[w], x[members].mean(0), atol=1e-6, rtol=0)
        assert int(sel.indices[w]) in members.tolist()  # a token takes the slot of a cell of its own window


def test_pool_24x24_quarter_is_12x12_adaptive_avg():
    tokens = _tokens(24, 24, d=16)
    sel = Pool(keep=0.25).select(tokens)
    assert sel.num_kept == 144
    _check_pool_selection(tokens, sel)
    assert bool((sel.weights == 4).all())
    # 24 -> 12 divides evenly, so the windows are adaptive_avg_pool2d's
    ref = F.adaptive_avg_pool2d(tokens.features.reshape(24, 24, 16).permute(2, 0, 1), (12, 12))
    torch.testing.assert_close(sel.features, ref.permute(1, 2, 0).reshape(144, 16), atol=1e-6, rtol=0)
    # representative = cell nearest the window centre; for a 2x2 window its upper-left cell
    r, c = torch.meshgrid(torch.arange(12) * 2, torch.arange(12) * 2, indexing="ij")
    assert torch.equal(sel.indices, (r * 24 + c).flatten())


@pytest.mark.parametrize(
    "rows,cols,keep,shape",
    [
        (5, 7, 0.5, (3, 6)),
        (13, 13, 0.25, (6, 7)),
        (3, 9, 4, (1, 4)),
        (7, 5, 1.0, (7, 5)),
        (1, 1, 1, (1, 1)),
        (24, 24, 1 / 9, (8, 8)),
    ],
)
def test_pool_odd_sizes(rows: int, cols: int, keep, shape):
    tokens = _tokens(rows, cols)
    sel = Pool(keep=keep).select(tokens)
    assert sel.num_kept == shape[0] * shape[1]
    assert pool_shape(rows, cols, round(keep * rows * cols) if isinstance(keep, float) else keep) == shape
    _check_pool_selection(tokens, sel)


def test_pool_anyres_with_newlines():
    tokens = _anyres_tokens()
    sel = Pool(keep=0.5).select(tokens)  # K = 32 -> budgets 9 (base) + 23 (crops) -> 3x3 + 4x5
    assert split_budget(32, [16, 42]) == [9, 23]
    assert sel.num_kept == 9 + 20
    _check_pool_selection(tokens, sel)
    crops = tokens.layout.view("crops")
    assert bool((sel.indices[:9] < 16).all()) and bool((sel.indices[9:] >= crops.start).all())


def test_pool_shape_and_budget_rules():
    assert pool_shape(24, 24, 144) == (12, 12)
    assert pool_shape(24, 24, 143) == (11, 12)  # most tokens that fit, near the aspect ratio
    assert pool_shape(6, 7, 10) == (3, 3)
    assert pool_shape(4, 4, 1000) == (4, 4)
    assert pool_shape(48, 2, 30) == (27, 1)
    for rows, cols, b in [(24, 24, 57), (37, 11, 100), (2, 50, 7), (9, 9, 1)]:
        r, c = pool_shape(rows, cols, b)
        assert 1 <= r <= rows and 1 <= c <= cols and r * c <= max(b, 1)
    assert sum(split_budget(100, [576, 1728, 130])) == 100
    assert split_budget(1, [576, 576]) == [1, 1]  # every view keeps at least one token


def test_pool_grid_uneven_partition():
    grid = torch.randn(5, 3, 4)
    feats, reps, window, sizes = pool_grid(grid, 2, 2)
    # rows split [0, 2) [2, 5); cols [0, 1) [1, 3); centres: rows 0 and 3, cols 0 and 1
    assert sizes.tolist() == [2, 4, 3, 6]
    assert reps.tolist() == [0 * 3 + 0, 0 * 3 + 1, 3 * 3 + 0, 3 * 3 + 1]
    torch.testing.assert_close(feats[3], grid[2:5, 1:3].reshape(-1, 4).mean(0), atol=1e-6, rtol=0)
    assert window.tolist() == [[0, 1, 1], [0, 1, 1], [2, 3, 3], [2, 3, 3], [2, 3, 3]]


# -- DivPrune -------------------------------------------------------------------------------------------


def _naive_official_loop(dist: torch.Tensor, k: int, exclude: bool) -> torch.Tensor:
    """The official O(K²N) loop (re-takes the minimum over all picked rows each step), optional masking."""
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dist, 0, s[:i]), dim=0).values
        if exclude and i > 0:
            scores = scores.clone()
            scores[s[:i]] = float("-inf")
        s[i] = torch.argmax(scores)
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("exclude", [False, True])
def test_running_min_equals_naive_loop(dtype: torch.dtype, exclude: bool):
    g = torch.Generator().manual_seed(11)
    for n, k in [(40, 10), (67, 24), (20, 20)]:
        x = torch.randn(2, n, 16, generator=g)
        x[:, 5] = x[:, 2]  # exact duplicates create ties
        xn = (x / x.norm(dim=-1, keepdim=True)).to(dtype)
        dist = 1.0 - xn @ xn.transpose(1, 2)
        batched = greedy_maxmin_torch(dist, k, exclude_picked=exclude)
        assert batched.shape == (2, k)
        for b in range(2):
            ref = _naive_official_loop(dist[b], k, exclude)
            assert torch.equal(batched[b], ref)
            assert torch.equal(greedy_maxmin_torch(dist[b], k, exclude_picked=exclude), ref)
            if exclude:
                assert ref.unique().numel() == k


def test_greedy_edge_cases():
    assert greedy_maxmin_torch(torch.zeros(1, 1), 1, exclude_picked=True).tolist() == [0]
    assert greedy_maxmin_torch(torch.zeros(4, 4), 0, exclude_picked=True).shape == (0,)
    # all ties: lowest index first; with exclusion the rest in index order
    assert greedy_maxmin_torch(torch.zeros(4, 4), 4, exclude_picked=True).tolist() == [0, 1, 2, 3]
    assert greedy_maxmin_torch(torch.zeros(4, 4), 3, exclude_picked=False).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="k=5"):
        greedy_maxmin_torch(torch.zeros(4, 4), 5, exclude_picked=True)


@pytest.mark.parametrize("case", ["dp05_dup_letterbox_n576_k56_d64", "dp06_dup_fewdistinct_n64_k16_d64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_divprune_default_never_repeats_on_duplicates(case: str, dtype: torch.dtype):
    t = load_file(_golden_dir() / f"{case}.safetensors")
    n = t["x"].shape[0]
    k = round(0.25 * n) if case.startswith("dp06") else round(0.098 * n)
    picked = divprune_select(t["x"].to(dtype), k)
    assert picked.unique().numel() == k
    sel = DivPrune(keep=k).select(VisualTokens(t["x"].to(dtype), Layout.single(1, n)))
    assert sel.num_kept == k and torch.equal(sel.indices, torch.sort(picked).values)
    if case.startswith("dp06"):  # only 10 distinct vectors: the first 10 picks cover each exactly once
        assert t["distinct_id"][picked[:10]].unique().numel() == 10


def test_divprune_rejects_nonfinite_and_zero_norm():
    tokens = _tokens(4, 4, image_index=3)
    tokens.features[5, 2] = float("nan")
    with pytest.raises(ValueError, match="divprune.*image 3"):
        DivPrune(keep=4).select(tokens)
    tokens.features[5, 2] = float("inf")
    with pytest.raises(ValueError, match="divprune.*image 3"):
        DivPrune(keep=4).select(tokens)
    tokens.features[5] = 0.0
    with pytest.raises(ValueError, match="divprune.*image 3.*zero-norm"):
        DivPrune(keep=4).select(tokens)


def test_backend_dispatch():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="backend='cuda'.*auto"):
        resolve_backend("cuda", "cpu")
    dist = torch.rand(6, 6)
    assert torch.equal(
        greedy_maxmin(dist, 3, exclude_picked=True, backend="auto"),
        greedy_maxmin_torch(dist, 3, exclude_picked=True),
    )
    if not triton_available():
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            resolve_backend("triton", "cpu")
    with pytest.raises((RuntimeError, NotImplementedError), match="[Tt]riton"):
        greedy_maxmin(dist, 3, exclude_picked=True, backend="triton")


# -- configs --------------------------------------------------------------------------------------------

MINE = [RandomPrune, Pool, DivPrune]


@pytest.mark.parametrize("cls", MINE)
@pytest.mark.parametrize(
    "keep,exc,text",
    [
        (0, ValueError, "keep=0"),
        (-3, ValueError, "keep=-3"),
        (0.0, ValueError, "keep=0.0"),
        (-0.5, ValueError, "keep=-0.5"),
        (1.5, ValueError, "keep=1.5"),
        (float("nan"), ValueError, "keep=nan"),
        (float("inf"), ValueError, "keep=inf"),
        (True, TypeError, "keep.*True"),
        ("64", TypeError, "keep.*'64'"),
        (None, TypeError, "keep.*None"),
    ],
)
def test_bad_keep(cls, keep, exc, text):
    with pytest.raises(exc, match=text):
        cls(keep=keep)


@pytest.mark.parametrize(
    "cls,kwargs,exc,text",
    [
        (DivPrune, {"backend": "cuda"}, ValueError, "backend='cuda'"),
        (DivPrune, {"backend": None}, ValueError, "backend=None"),
        (DivPrune, {"official_compat": "yes"}, TypeError, "official_compat.*'yes'"),
        (Pool, {"mode": "max"}, ValueError, "mode='max'"),
        (RandomPrune, {"seed": -1}, ValueError, "seed=-1"),
        (RandomPrune, {"seed": 1.5}, TypeError, "seed.*1.5"),
        (RandomPrune, {"seed": True}, TypeError, "seed.*True"),
    ],
)
def test_bad_fields(cls, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        cls(**kwargs)


@pytest.mark.parametrize("cls", MINE)
def test_keep_larger_than_n_at_select(cls):
    with pytest.raises(ValueError, match="keep=37 exceeds the 36"):
        cls(keep=37).select(_tokens(6, 6))
    assert cls(keep=36).select(_tokens(6, 6)).num_kept == 36
    assert cls(keep=1e-6).select(_tokens(6, 6)).num_kept == 1  # a fraction keeps at least one token


@pytest.mark.parametrize("name", registry.names())
def test_round_trip(name: str):
    cls = registry.get(name)
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    # every method constructs with its paper's defaults (the CLI and the README rely on it)
    assert not required, f"{name} has fields without defaults: {required}"
    cfg = cls()
    d = cfg.to_dict()
    assert d["method"] == name
    assert MethodConfig.from_dict(d) == cfg
    assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert MethodConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize(
    "cfg",
    [
        DivPrune(keep=64, official_compat=True, backend="torch"),
        Pool(keep=0.1),
        RandomPrune(keep=7, seed=42),
        DivPrune(),
    ],
)
def test_round_trip_non_defaults(cfg):
    assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert type(MethodConfig.from_dict(cfg.to_dict()).keep) is type(cfg.keep)
    assert not math.isnan(float(cfg.keep))
