"""Index-exact parity of HiRED with the official code (hasanar1f/HiRED @ 502d6dd) on the golden vectors.

Vectors and semantics: ``tests/golden/README-hired-globalcom2-fopru.md`` §2, §3, §6; read from
``$MMCOMPRESS_GOLDEN_DIR/hired`` when that variable is set, else from ``tests/golden/hired``.

Checked per LLaVA-NeXT case: the budget arithmetic (B, B0, pool), the layer-0 content map, the band
counts, the per-crop budgets, every view's kept indices, and the packed sequence with the fork's
transformers-4.42 transposed stitching (``hf442_grid=True``). Our own geometry (the default) must agree
with it on square grids, and ``HiRED.select`` must put exactly the kept tokens that survive unpadding at
their positions in the model's packing. Cases ending in ``_ties`` are checked by the README's tie rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompress.adapters.hf_llava import _index_canvas_unpad
from mmcompress.methods.hired import (
    HiRED,
    cls_row_scores,
    hired_content_map,
    hired_crop_budgets,
    hired_pack,
    hired_region_counts,
    hired_select,
    hired_split_budget,
    hired_total_budget,
    official_unpad_box,
    tile_packed_index,
)
from mmcompress.signals import VitAttention
from mmcompress.tokens import GridView, Layout, VisualTokens

T, SIDE = 576, 24


def _golden_dir() -> Path:
    root = os.environ.get("MMCOMPRESS_GOLDEN_DIR")
    return Path(root) / "hired" if root else Path(__file__).parent / "golden" / "hired"


GOLDEN = _golden_dir()
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = {c["name"]: c for c in INDEX["cases"]}
NEXT = sorted(n for n, c in CASES.items() if c["variant"] == "llava_next")
V15 = sorted(n for n, c in CASES.items() if c["variant"] == "llava_1.5")


def _ties(name: str) -> dict | None:
    return CASES[name]["derived"].get("ties")


@pytest.fixture(scope="module")
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(GOLDEN / c["file"]) for n, c in CASES.items()}


def assert_tie_rule(scores: torch.Tensor, kept: torch.Tensor, tie: dict) -> None:
    """README §6: everything strictly above the boundary is kept, the recorded number is taken from the
    tie group, and nothing else is kept."""
    b = tie["boundary_value"]
    above, group = scores > b, scores == b
    assert int(above.sum()) == tie["n_strictly_above"] and int(group.sum()) == tie["tie_group_size"]
    is_kept = torch.zeros_like(above)
    is_kept[kept] = True
    assert bool(is_kept[above].all())
    assert int((is_kept & group).sum()) == tie["n_taken_from_tie_group"]
    assert not bool((is_kept & ~above & ~group).any())


def assert_valid_topk(scores: torch.Tensor, kept: torch.Tensor, k: int) -> None:
    """``kept`` is k distinct indices none of which scores below any dropped one."""
    assert kept.numel() == k and kept.unique().numel() == k
    rest = torch.ones_like(scores, dtype=torch.bool)
    rest[kept] = False
    if k and bool(rest.any()):
        assert float(scores[kept].min()) >= float(scores[rest].max())


def test_all_cases_present():
    assert len(NEXT) == 18 and len(V15) == 5
    grids = {CASES[n]["params"]["grid"] for n in NEXT}
    assert grids == {"2x2", "1x2", "2x1", "1x3", "3x1"}


@pytest.mark.parametrize("name", NEXT)
def test_budget_arithmetic(name: str, tensors):
    c, t = CASES[name], tensors[name]
    p, d = c["params"], c["derived"]
    V = p["num_views"]
    total = hired_total_budget(p["token_budget_rate"], V, T)
    b0, pool = hired_split_budget(total, p["alpha"], V, T)
    assert (total, b0, pool) == (d["total_budget"], d["full_img_budget"], d["total_sub_img_budget"])
    content = hired_content_map(t["l0_cls_attn_full"], p["alpha"])
    assert int(content.sum()) == d["n_content_tokens"] == int(T * (1 - p["alpha"]))
    if _ties(name):
        assert_tie_rule(t["l0_cls_attn_full"], content.nonzero().flatten(), _ties(name)["content_map_topk"])
    else:
        assert torch.equal(content, t["content_map"])
        counts = hired_region_counts(content, (p["rows"], p["cols"]), (SIDE, SIDE), "bands")
        assert torch.equal(counts, t["region_counts"])
        assert torch.equal(hired_crop_budgets(counts, pool, T), t["official_sub_budgets"])
        assert torch.equal(t["budgets"], torch.tensor([b0, *t["official_sub_budgets"].tolist()]))


@pytest.mark.parametrize("name", NEXT)
def test_kept_per_view(name: str, tensors):
    c, t = CASES[name], tensors[name]
    p = c["params"]
    V, tiles = p["num_views"], (p["rows"], p["cols"])
    total = hired_total_budget(p["token_budget_rate"], V, T)
    kept = hired_select(t["l22_cls_attn"], t["l0_cls_attn_full"], total, p["alpha"], tiles=tiles)
    assert len(kept) == V
    for k in kept:
        assert torch.equal(k, torch.sort(k).values)
    if not _ties(name):
        for v in range(V):
            assert torch.equal(kept[v], t[f"kept_view{v}"]), v
        return
    tie = _ties(name)
    assert_tie_rule(t["l22_cls_attn"][0], kept[0], tie["full_view_topk"])
    # the crop budgets follow from our content map; within a crop there are no boundary ties
    b0, pool = hired_split_budget(total, p["alpha"], V, T)
    content = hired_content_map(t["l0_cls_attn_full"], p["alpha"])
    budgets = hired_crop_budgets(hired_region_counts(content, tiles, (SIDE, SIDE)), pool, T)
    for i, b in enumerate(budgets.tolist()):
        assert_valid_topk(t["l22_cls_attn"][1 + i], kept[1 + i], b)
    if torch.equal(content, t["content_map"]):
        for v in range(1, V):
            assert torch.equal(kept[v], t[f"kept_view{v}"])


# the packed order of the _ties case depends on the tie choices; its selection is checked by the tie rule
@pytest.mark.parametrize("name", [n for n in NEXT if not _ties(n)])
def test_packed_sequence_hf442(name: str, tensors):
    c, t = CASES[name], tensors[name]
    p = c["params"]
    kept = [t[f"kept_view{v}"] for v in range(p["num_views"])]
    hw = tuple(t["image_size_hw"].tolist())
    got = hired_pack(kept, (p["rows"], p["cols"]), (SIDE, SIDE), hw, hf442_grid=True)
    assert torch.equal(got, t["packed_tokens"])
    counts = torch.bincount(got[:, 0], minlength=p["num_views"])
    assert torch.equal(counts, t["packed_count_per_view"])
    ours = hired_pack(kept, (p["rows"], p["cols"]), (SIDE, SIDE), hw)
    if p["rows"] == p["cols"]:  # the transposition only matters for non-square grids
        assert torch.equal(ours, t["packed_tokens"])
    else:  # the correct geometry keeps far more crop tokens (README §3 item 7)
        assert ours.shape[0] > got.shape[0]


def _next_layout(rows: int, cols: int, image_size_hw: tuple[int, int]) -> Layout:
    """The layout the adapter builds for a CLIP-336 LLaVA-NeXT image (transformers' own unpadding)."""
    n_rows, n_cols, top, left = _index_canvas_unpad(rows * SIDE, cols * SIDE, torch.tensor(image_size_hw))
    crops = GridView(
        "crops",
        T,
        n_rows,
        n_cols,
        newline=True,
        tiles=(rows, cols),
        tile_shape=(SIDE, SIDE),
        offset=(top, left),
    )
    return Layout((GridView("base", 0, SIDE, SIDE), crops))


def _as_signal(scores: torch.Tensor) -> torch.Tensor:
    """``[V, T]`` head-summed rows → a one-head ``[V, 1, 1 + T]`` CLS row (CLS key 0), exact."""
    return torch.cat([torch.zeros(scores.shape[0], 1), scores], 1)[:, None]


@pytest.mark.parametrize("name", [n for n in NEXT if not _ties(n)])
@pytest.mark.parametrize("newlines", ["drop", "keep"])
def test_select_places_kept_tokens(name: str, newlines: str, tensors):
    c, t = CASES[name], tensors[name]
    p = c["params"]
    V, tiles = p["num_views"], (p["rows"], p["cols"])
    hw = tuple(t["image_size_hw"].tolist())
    layout = _next_layout(*tiles, hw)
    crops = layout.view("crops")
    # the model's unpadding agrees with the official rule on these sizes
    top, bottom, left, right = official_unpad_box(tiles[0] * SIDE, tiles[1] * SIDE, *hw)
    assert (crops.offset, crops.rows, crops.cols) == ((top, left), bottom - top, right - left)
    l0 = torch.zeros(V, T)
    l0[0] = t["l0_cls_attn_full"]
    signals = {VitAttention(0, "cls"): _as_signal(l0), VitAttention(-2, "cls"): _as_signal(t["l22_cls_attn"])}
    tokens = VisualTokens(torch.zeros(layout.num_tokens, 2), layout, signals)
    sel = HiRED(keep=p["token_budget_rate"], alpha=p["alpha"], newlines=newlines).select(tokens)
    # expected: the correct-geometry packing of the golden kept tokens, mapped to packed positions
    packed = tile_packed_index(crops)
    seq = hired_pack([t[f"kept_view{v}"] for v in range(V)], tiles, (SIDE, SIDE), hw)
    pos = torch.where(seq[:, 0] == 0, seq[:, 1], packed[(seq[:, 0] - 1).clamp(min=0), seq[:, 1]])
    assert bool((pos >= 0).all()) and bool((pos[1:] > pos[:-1]).all())  # emission order = packed order
    if newlines == "keep":
        pos = torch.sort(torch.cat([pos, crops.newline_indices()])).values
    assert torch.equal(sel.indices, pos)
    assert sel.features is None


@pytest.mark.parametrize("name", V15)
def test_llava15(name: str, tensors):
    c, t = CASES[name], tensors[name]
    rate = c["params"]["token_budget_rate"]
    if "l22_cls_attn_per_head" in t:  # [16, 577]: the official code drops the CLS key and sums the heads
        signal = t["l22_cls_attn_per_head"][None]
    else:
        signal = _as_signal(t["l22_cls_attn"][None])
    scores = cls_row_scores(signal, T, "sum", "hired")
    total = hired_total_budget(rate, 1, T)
    assert total == c["derived"]["num_topk"] == min(T, int(T * rate))
    kept = hired_select(scores, None, total, 0.5)[0]
    sel = HiRED(keep=rate).select(
        VisualTokens(torch.zeros(T, 2), Layout.single(SIDE, SIDE), {VitAttention(-2, "cls"): signal})
    )
    assert torch.equal(sel.indices, kept)
    if _ties(name):
        assert_tie_rule(scores[0], kept, _ties(name)["topk"])
    else:
        assert torch.equal(kept, t["kept"])
        assert torch.equal(t["keep_mask"].nonzero().flatten(), t["kept"])


def test_region_split_bands_vs_quadrants(tensors):
    # README §3 item 3: the official band counts of this case vs the 2-D quadrants of the paper
    t = tensors["hired_next_2x2_r0.2_a0.5"]
    content = hired_content_map(t["l0_cls_attn_full"], 0.5)
    assert hired_region_counts(content, (2, 2), (SIDE, SIDE), "bands").tolist() == [92, 76, 62, 58]
    assert hired_region_counts(content, (2, 2), (SIDE, SIDE), "quadrants").tolist() == [128, 40, 51, 69]
    # tall grids: bands are the true regions
    for rows in (2, 3):
        assert torch.equal(
            hired_region_counts(content, (rows, 1), (SIDE, SIDE), "bands"),
            hired_region_counts(content, (rows, 1), (SIDE, SIDE), "quadrants"),
        )


def test_budget_floor_is_not_redistributed(tensors):
    # README §3 item 4: 1x2 rate 0.2 has a pool of 173 but the crops get 41 + 131 = 172
    t = tensors["hired_next_1x2_r0.2_a0.5"]
    assert t["official_sub_budgets"].tolist() == [41, 131]
    assert hired_split_budget(hired_total_budget(0.2, 3, T), 0.5, 3, T) == (172, 173)
    # rate 0.5 on 2x2: the thumbnail is capped at 576, the crops get the rest
    assert hired_split_budget(hired_total_budget(0.5, 5, T), 0.5, 5, T) == (576, 864)
