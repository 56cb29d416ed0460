"""Index-exact parity of GlobalCom² with the official code (xuyang-liu16/GlobalCom2 @ 96b2d00) on the
golden vectors.

Vectors and semantics: ``tests/golden/README-hired-globalcom2-fopru.md`` §2, §4, §6; read from
``$MMCOMPRESS_GOLDEN_DIR/globalcom2`` when that variable is set, else from ``tests/golden/globalcom2``.

Checked per case: the thumbnail's kept indices in emission (descending score) order, the float64 crop
ratios bit for bit, the valid masks and counts, k_j, the interpolated global scores, each crop's top-k
(valid-list and true raster indices), the official slot mask and the whole emitted sequence with the
padding quirk. ``GlobalCom2.select`` must place every kept token at its own position by default, and with
``official_padding_bug=True, thumbnail_order="score"`` hand over exactly the official feature sequence.
Cases ending in ``_ties`` are checked by the README's tie rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_hired_parity import _as_signal, _next_layout, assert_tie_rule

from mmcompress.methods.globalcom2 import (
    GlobalCom2,
    gc2_combined_scores,
    gc2_crop_scales,
    gc2_emission,
    gc2_global_scores,
    gc2_valid_masks,
    globalcom2_select,
)
from mmcompress.methods.hired import official_unpad_box, tile_packed_index
from mmcompress.signals import VitAttention
from mmcompress.tokens import VisualTokens

T, SIDE = 576, 24


def _golden_dir() -> Path:
    root = os.environ.get("MMCOMPRESS_GOLDEN_DIR")
    return Path(root) / "globalcom2" if root else Path(__file__).parent / "golden" / "globalcom2"


GOLDEN = _golden_dir()
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = {c["name"]: c for c in INDEX["cases"]}
NAMES = sorted(CASES)
EXACT = [n for n in NAMES if not CASES[n]["derived"].get("ties")]
TIES = [n for n in NAMES if CASES[n]["derived"].get("ties")]


@pytest.fixture(scope="module")
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(GOLDEN / c["file"]) for n, c in CASES.items()}


def _run(name: str, t: dict):
    p = CASES[name]["params"]
    tiles = (p["rows"], p["cols"])
    W, H = t["image_size_wh"].tolist()
    box = official_unpad_box(tiles[0] * SIDE, tiles[1] * SIDE, H, W)
    res = globalcom2_select(
        t["cls_attn_logits"], tiles=tiles, grid=(SIDE, SIDE), box=box, retention=p["retention_ratio"]
    )
    return tiles, box, res


def test_all_cases_present():
    assert len(NAMES) == 13 and TIES == ["gc2_2x2_R0.25_ties"]
    assert {CASES[n]["params"]["grid"] for n in NAMES} == {"2x2", "1x2", "2x1", "1x3", "3x1"}


@pytest.mark.parametrize("name", NAMES)
def test_budgets_and_geometry(name: str, tensors):
    t, d = tensors[name], CASES[name]["derived"]
    tiles, box, res = _run(name, t)
    # float64 ratios bit for bit: N_j * r_j can sit within 1e-6 of an integer (README §4 item 3)
    scales = gc2_crop_scales(
        t["cls_attn_logits"][0], tiles, (SIDE, SIDE), CASES[name]["params"]["retention_ratio"]
    )
    assert scales.dtype == np.float64
    assert torch.equal(torch.from_numpy(scales), t["crop_scales"])
    assert torch.equal(res.valid, t["crop_valid_mask"])
    assert torch.equal(gc2_valid_masks(box, tiles, (SIDE, SIDE)).sum(1), t["crop_valid_count"])
    assert [box[3] - box[2], box[1] - box[0]] == d["valid_bbox_wh"]
    assert [r.numel() for r in res.topk_valid] == t["crop_topk"].tolist()
    assert res.thumb.numel() == d["thumb_k"]
    glob = gc2_global_scores(t["cls_attn_logits"][0], (SIDE, SIDE), box, tiles, (SIDE, SIDE))
    for j, g in enumerate(glob):
        assert torch.equal(g, t[f"crop{j}_global_scores"]), j


@pytest.mark.parametrize("name", EXACT)
def test_selection_and_emission(name: str, tensors):
    t = tensors[name]
    tiles, _, res = _run(name, t)
    assert torch.equal(res.thumb, t["thumb_kept"])  # descending score order
    slots = torch.zeros_like(t["crop_slot_mask"])
    for j in range(tiles[0] * tiles[1]):
        assert torch.equal(res.topk_valid[j], t[f"crop{j}_topk_validlist_idx"]), j
        assert torch.equal(res.topk_raster[j], t[f"crop{j}_topk_true_raster_idx"]), j
        slots[j, res.topk_valid[j]] = True
    assert torch.equal(slots, t["crop_slot_mask"])  # the index quirk: valid-list numbers as raster slots
    emitted = gc2_emission(res, tiles, (SIDE, SIDE), official_padding_bug=True)
    assert torch.equal(emitted, t["emitted"])
    assert int((emitted[:, 0] == -1).sum()) == CASES[name]["derived"]["n_newline"] == SIDE * tiles[0]


def test_ties_case_by_rule(tensors):
    name = TIES[0]
    t, ties = tensors[name], CASES[name]["derived"]["ties"]
    tiles, box, res = _run(name, t)
    thumb = t["cls_attn_logits"][0]
    assert_tie_rule(thumb, res.thumb, ties["thumbnail_topk"])
    assert bool((thumb[res.thumb][1:] <= thumb[res.thumb][:-1]).all())  # emitted in non-increasing score
    glob = gc2_global_scores(thumb, (SIDE, SIDE), box, tiles, (SIDE, SIDE))
    combined = gc2_combined_scores(t["cls_attn_logits"][1:], res.valid, glob)
    for j, c in enumerate(combined):
        assert_tie_rule(c, res.topk_valid[j], ties[f"crop{j}_topk"])
    emitted = gc2_emission(res, tiles, (SIDE, SIDE))
    assert emitted.shape[0] == CASES[name]["derived"]["emitted_len"]


def _select_tokens(name: str, t: dict) -> tuple[VisualTokens, torch.Tensor]:
    """The golden image on the model's layout; features encode (view, raster index) of each packed token."""
    p = CASES[name]["params"]
    W, H = t["image_size_wh"].tolist()
    layout = _next_layout(p["rows"], p["cols"], (H, W))
    crops = layout.view("crops")
    code = torch.full((layout.num_tokens, 2), -1.0)
    code[:T, 0], code[:T, 1] = 0.0, torch.arange(T, dtype=torch.float)
    packed = tile_packed_index(crops)
    for j in range(packed.shape[0]):
        ok = packed[j] >= 0
        code[packed[j][ok], 0] = 1.0 + j
        code[packed[j][ok], 1] = torch.arange(T, dtype=torch.float)[ok]
    sig = {VitAttention(-1, "cls_logits"): _as_signal(t["cls_attn_logits"])}
    return VisualTokens(code, layout, sig), packed


@pytest.mark.parametrize("name", EXACT)
def test_select_default_places_true_tokens(name: str, tensors):
    t = tensors[name]
    p = CASES[name]["params"]
    tokens, packed = _select_tokens(name, t)
    crops = tokens.layout.view("crops")
    sel = GlobalCom2(retention=p["retention_ratio"]).select(tokens)
    assert sel.features is None
    want = [t["thumb_kept"]]
    for j in range(p["rows"] * p["cols"]):
        pos = packed[j, t[f"crop{j}_topk_true_raster_idx"]]
        assert bool((pos >= 0).all())  # every kept token is a valid one
        want.append(pos)
    want.append(crops.newline_indices())
    assert torch.equal(sel.indices, torch.sort(torch.cat(want)).values)


@pytest.mark.parametrize("name", EXACT)
def test_select_official_sequence(name: str, tensors):
    t = tensors[name]
    p = CASES[name]["params"]
    tokens, _ = _select_tokens(name, t)
    cfg = GlobalCom2(retention=p["retention_ratio"], official_padding_bug=True, thumbnail_order="score")
    sel = cfg.select(tokens)
    assert bool((sel.indices[1:] > sel.indices[:-1]).all())
    # the features, in position order, are exactly the official emitted sequence
    assert torch.equal(sel.features.long(), t["emitted"])
    # thumbnail in score order only / padding quirk only
    k0 = t["thumb_kept"].numel()
    sel = GlobalCom2(retention=p["retention_ratio"], thumbnail_order="score").select(tokens)
    assert torch.equal(sel.features[:k0].long()[:, 1], t["thumb_kept"])
    sel = GlobalCom2(retention=p["retention_ratio"], official_padding_bug=True).select(tokens)
    assert torch.equal(sel.features[k0:].long(), t["emitted"][k0:])
    assert torch.equal(sel.features[:k0].long()[:, 1], torch.sort(t["thumb_kept"]).values)
