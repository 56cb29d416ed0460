"""Parity of AIM's token merging with the official code (LaVi-Lab/AIM @ edc24e9,
``llava/model/token_merge.py``) on the golden vectors ``am01``-``am06`` (the ``ap*`` files belong to the
in-LLM pruning half).

Vectors and semantics: ``tests/golden/README-divprune-aim.md`` §3 and §5 (quirks 8-13); read from
``$MMCOMPRESS_GOLDEN_DIR/aim`` when set, else ``tests/golden/aim``. As the README asks, the integer maps
(per-step output slot of every input, per-step anchors, final slots, counts) must match exactly, in fp32
and fp16; merged values within 1e-6 (fp32) / 1e-3 (fp16), since they depend on the summation order
(on this CPU they are in fact bitwise equal: same ops, same scatter order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompress.kernels.merge import aim_merge, aim_merge_torch
from mmcompress.methods.aim_merge import AIMMerge, aim_merge_schedule
from mmcompress.tokens import GridView, Layout, VisualTokens


def _golden_dir() -> Path:
    root = os.environ.get("MMCOMPRESS_GOLDEN_DIR")
    return Path(root) / "aim" if root else Path(__file__).parent / "golden" / "aim"


GOLDEN = _golden_dir()
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = {c["case_id"]: c for c in INDEX["cases"] if c["kind"] == "merge"}
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture(scope="module")
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {cid: load_file(GOLDEN / c["file"]) for cid, c in CASES.items()}


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = TOL[ref.dtype]
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_all_cases_present():
    assert {c[:4] for c in CASES} == {f"am0{i}" for i in range(1, 7)}
    # the other half's files were copied too (the in-LLM "aim" method uses them)
    assert len([c for c in INDEX["cases"] if c["kind"] != "merge"]) == 6
    assert all((GOLDEN / c["file"]).exists() for c in INDEX["cases"])


@pytest.mark.parametrize("cid", sorted(CASES))
def test_official_merge(cid: str, tensors):
    t, c = tensors[cid], CASES[cid]
    r_list = c["params"]["r_list"]
    res = aim_merge_torch(t["x"], r_list, metric=t.get("metric"))
    assert res.r_effective == [s["r_effective"] for s in c["steps"]]
    for k, step in enumerate(c["steps"], start=1):
        assert torch.equal(res.step_slots[k - 1], t[f"slot_step{k}"]), f"slot_step{k}"
        assert torch.equal(res.step_anchors[k - 1], t[f"anchor_step{k}"]), f"anchor_step{k}"
        assert res.step_anchors[k - 1].shape[-1] == step["T_out"]
    assert torch.equal(res.slot, t["final_slot"])
    assert torch.equal(res.sizes, t["final_count"])
    final = t[f"out_step{len(r_list)}"]
    _close(res.features, final)
    if "metric" in t:  # the metric went through the same matching (official second call)
        assert res.metric.shape == (*final.shape[:2], t["metric"].shape[-1])
    # anchors: distinct original tokens; each anchor lies in its own slot
    for f in range(res.anchor.shape[0]):
        assert res.anchor[f].unique().numel() == res.anchor.shape[-1]
        assert torch.equal(res.slot[f][res.anchor[f]], torch.arange(res.anchor.shape[-1]))


@pytest.mark.parametrize("cid", [c for c in sorted(CASES) if "out_step1" in CASES[c]["tensors"]])
def test_first_step_output(cid: str, tensors):
    t, c = tensors[cid], CASES[cid]
    res = aim_merge_torch(t["x"], c["params"]["r_list"][:1], metric=t.get("metric"))
    _close(res.features, t["out_step1"])


@pytest.mark.parametrize("cid", [c for c in sorted(CASES) if "final_weights" in CASES[c]["tensors"]])
def test_effective_weights_unweighted_means(cid: str, tensors):
    # quirk 9: nested plain means give originals unequal weights; merging one-hot rows with the real
    # metric (float64 values) recovers the official linear map
    t, c = tensors[cid], CASES[cid]
    t0 = t["x"].shape[1]
    eye = torch.eye(t0, dtype=torch.float64)[None]
    w = aim_merge_torch(eye, c["params"]["r_list"], metric=t["x"]).features
    torch.testing.assert_close(w.float(), t["final_weights"], rtol=0, atol=1e-7)
    assert len({round(float(v), 6) for v in w[w > 0]}) > 1  # unequal weights really occur
    # size weighting makes every output the plain mean of its originals
    ws = aim_merge_torch(eye, c["params"]["r_list"], metric=t["x"], weighting="size").features[0]
    counts = t["final_count"][0].double()
    member = torch.nn.functional.one_hot(t["final_slot"][0], ws.shape[0]).t().double()
    torch.testing.assert_close(ws, member / counts[:, None], rtol=0, atol=1e-12)


def test_size_weighting_keeps_the_matching(tensors):
    # the same matching (the metric is given), only the averaging changes
    t = tensors["am05_merge_llava15_t576_d64"]
    a = aim_merge_torch(t["x"], [288, 36], metric=t["metric"])
    b = aim_merge_torch(t["x"], [288, 36], metric=t["metric"], weighting="size")
    assert torch.equal(a.slot, b.slot) and torch.equal(a.anchor, b.anchor) and torch.equal(a.sizes, b.sizes)
    assert not torch.allclose(a.features, b.features)
    onehot = torch.nn.functional.one_hot(b.slot[0], b.features.shape[1]).t().float()
    torch.testing.assert_close(
        b.features[0], (onehot @ t["x"][0]) / b.sizes[0, :, None], rtol=1e-5, atol=1e-6
    )


def test_letterbox_duplicates_pile_into_one_destination(tensors):
    # quirk 11: ties in the best-destination max go to the lowest index
    t = tensors["am04_merge_ov_flat_f1_t196_d64"]
    res = aim_merge_torch(t["x"], [98, 49])
    assert int(res.sizes.max()) == 64 and int(res.sizes[0, 0]) == 64


@pytest.mark.parametrize(
    "t0,k,r_list",
    [
        (196, 49, [98, 49]),
        (576, 252, [288, 36]),
        (576, 72, [288, 144, 72]),
        (169, 43, [84, 42]),
        (196, 25, [98, 49, 24]),
        (196, 13, [98, 49, 24, 12]),
        (16, 16, []),
        (16, 1, [8, 4, 2, 1]),
    ],
)
def test_schedule_reproduces_shipped_ones(t0: int, k: int, r_list: list[int]):
    assert aim_merge_schedule(t0, k) == r_list


def _frames_layout(f: int, side: int) -> Layout:
    n = side * side
    return Layout(tuple(GridView(f"frame{i}", i * n, side, side) for i in range(f)))


def test_method_single_image_official_schedule(tensors):
    # am01: one 14x14 image, keep 0.25 -> 196 -> 98 -> 49; both orders equal the official output
    t = tensors["am01_merge_ov_f1_t196_d64"]
    tokens = VisualTokens(t["x"][0], Layout.single(14, 14))
    for order in ("anchor", "official"):
        sel = AIMMerge(keep=0.25, order=order).select(tokens)
        assert torch.equal(sel.indices, 4 * torch.arange(49) + 3)  # quirk 8
        _close(sel.features, t["out_step2"][0])
        assert torch.equal(sel.groups, t["final_slot"][0])
        assert torch.equal(sel.weights, t["final_count"][0])


def test_method_video_frames_merge_independently(tensors):
    # am02: 8 frames, each merged on its own (one batched kernel call)
    t = tensors["am02_merge_ov_f8_t196_d64"]
    tokens = VisualTokens(t["x"].reshape(8 * 196, 64), _frames_layout(8, 14))
    for keep in (0.25, 8 * 49):
        sel = AIMMerge(keep=keep).select(tokens)
        assert sel.num_kept == 8 * 49
        _close(sel.features, t["out_step2"].reshape(8 * 49, 64))
        offsets = (torch.arange(8) * 196)[:, None]
        assert torch.equal(sel.indices, (offsets + 4 * torch.arange(49) + 3).flatten())
        assert torch.equal(sel.groups, (t["final_slot"] + 49 * torch.arange(8)[:, None]).flatten())
    # a frame's result does not depend on the other frames
    alone = AIMMerge(keep=0.25).select(VisualTokens(t["x"][3], Layout.single(14, 14)))
    _close(alone.features, t["out_step2"][3])


def test_method_orders_with_unmerged_sources(tensors):
    # am06 (odd 13x13): one source stays unmerged per step and leads the official output (quirk 12)
    t = tensors["am06_merge_odd_f1_t169_d64"]
    tokens = VisualTokens(t["x"][0], Layout.single(13, 13))
    official = AIMMerge(keep=43, order="official").select(tokens)
    _close(official.features, t["out_step2"][0])
    assert torch.equal(official.groups, t["final_slot"][0])
    assert torch.equal(official.weights, t["final_count"][0])
    res = aim_merge_torch(t["x"], [84, 42])
    assert not torch.equal(res.anchor[0], torch.sort(res.anchor[0]).values)  # scrambled officially
    assert torch.equal(official.indices, torch.sort(res.anchor[0]).values)
    anchor = AIMMerge(keep=43).select(tokens)
    perm = torch.argsort(res.anchor[0])
    assert torch.equal(anchor.indices, official.indices)
    _close(anchor.features, t["out_step2"][0][perm])
    assert torch.equal(anchor.weights, t["final_count"][0][perm])
    # every original lands in the output slot whose features hold it
    _close(anchor.features[anchor.groups], t["out_step2"][0][t["final_slot"][0]])
    # each output sits at its anchor, which is a member of its own group
    assert torch.equal(anchor.groups[anchor.indices], torch.arange(43))


def test_fp16_maps_exact(tensors):
    t = tensors["am03_merge_ov_f1_t196_d64_fp16"]
    assert t["x"].dtype == torch.float16
    res = aim_merge(t["x"], [98, 49], backend="torch")
    assert res.features.dtype == torch.float16
    assert torch.equal(res.slot, t["final_slot"]) and torch.equal(res.sizes, t["final_count"])
    _close(res.features, t["out_step2"])
