"""Index-exact parity of FoPru with its closest public code (dongxianzhe/hydrainfer @ d4d5f4f,
``hydrainfer/layer/token_prunning.py``) on the golden vectors.

Vectors and semantics: ``tests/golden/README-hired-globalcom2-fopru.md`` §5-6 (copied from
``shared/golden``); read from ``$MMCOMPRESS_GOLDEN_DIR/fopru`` when set, else ``tests/golden/fopru``.
Every file holds one 576×576 logit matrix and 7 selections: the function's "rank" with K = 144 / 63 / 64,
the module's "rank" and "row" with ratios 0.25 / 0.11. Files without ties must match exactly (kept set,
and the pre-reorder score order where stored); ``*_ties`` files are checked with the README's tie rule,
because the official sort breaks ties in no index order while ours keeps the lower index first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompress.methods.fopru import FoPru, fopru_keep_count, fopru_rank, fopru_rows, fopru_significance
from mmcompress.signals import VitAttention
from mmcompress.tokens import Layout, VisualTokens


def _golden_dir() -> Path:
    root = os.environ.get("MMCOMPRESS_GOLDEN_DIR")
    return Path(root) / "fopru" if root else Path(__file__).parent / "golden" / "fopru"


GOLDEN = _golden_dir()
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = {c["name"]: c for c in INDEX["cases"]}
VARIANTS = [(name, v) for name, c in CASES.items() for v in c["variants"]]
GRID = 24  # CLIP ViT-L/14-336: the only geometry the official code supports


@pytest.fixture(scope="module")
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(GOLDEN / c["file"]) for name, c in CASES.items()}


def _official_selection(case: str, v: dict, t: dict) -> torch.Tensor:
    """Our selection for one stored variant: the function breaks variance ties toward row means, the
    module toward column means; the function counts tokens, the module takes floor(n·ratio)."""
    sig, _ = fopru_significance(
        t["attn_logits_patch"].float(), tie="row" if v["api"] == "function" else "col"
    )
    if v["strategy"] == "rank":
        k = v["n_output_tokens"] if v["api"] == "function" else fopru_keep_count(v["ratio"], GRID * GRID)
        return fopru_rank(sig, k)
    return fopru_rows(sig.view(GRID, GRID), fopru_keep_count(v["ratio"], GRID))[1]


def test_all_cases_present():
    assert {"fopru_llava15_colwins", "fopru_llava15_rowwins", "fopru_llava15_ties"} <= set(CASES)
    assert all(len(c["variants"]) == 7 for c in CASES.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_significance_and_variance_rule(case: str, tensors):
    t, d = tensors[case], CASES[case]["derived"]
    logits = t["attn_logits_patch"].float()
    for tie, key in (("row", "function_significance"), ("col", "module_significance")):
        sig, which = fopru_significance(logits, tie=tie)
        assert which + "_mean" == d[key]
        assert torch.equal(sig, t["significance"])  # same ops, same CPU: bitwise
    col, row = logits.mean(0), logits.mean(1)
    assert torch.var(col).item() == pytest.approx(d["var_col_mean"], rel=1e-6)
    assert torch.var(row).item() == pytest.approx(d["var_row_mean"], rel=1e-6)
    # a head axis is averaged first: two identical heads give the same significance
    sig2, _ = fopru_significance(torch.stack([logits, logits]))
    assert torch.equal(sig2, t["significance"])
    assert torch.equal(sig.view(GRID, GRID).sum(-1), t["row_sums"])


def test_both_candidates_exercised():
    picked = {CASES[c]["derived"]["function_significance"] for c in CASES}
    assert picked == {"col_mean", "row_mean"}


def test_variance_tie_rule():
    # a symmetric matrix has equal row and column means: the function takes rows, the module columns
    a = torch.arange(16.0).view(4, 4)
    a = a + a.t()
    assert fopru_significance(a, tie="row")[1] == "row"
    assert fopru_significance(a, tie="col")[1] == "col"


@pytest.mark.parametrize("case,variant", VARIANTS, ids=[v["name"] for _, v in VARIANTS])
def test_selection(case: str, variant: dict, tensors):
    t = tensors[case]
    got = _official_selection(case, variant, t)
    ref = t[variant["output"]]
    assert got.shape == ref.shape == (variant["kept_count"],)
    assert torch.equal(got, torch.sort(got).values)  # reordered to raster order
    if variant["ties"] is None:
        assert torch.equal(got, ref)
        score_order = variant["output"].replace("_kept", "_score_order")
        if score_order in t:  # the selection before reordering, descending significance
            k = variant["n_output_tokens"]
            sig, _ = fopru_significance(t["attn_logits_patch"].float())
            assert torch.equal(fopru_rank(sig, k, reorder=False), t[score_order])
        if variant["strategy"] == "row":
            assert torch.equal(torch.unique(got // GRID), t[variant["output"] + "_rows"])
        return
    _check_tie_rule(case, variant, t, got)


def _check_tie_rule(case: str, variant: dict, t: dict, got: torch.Tensor) -> None:
    """README §6: everything strictly above the boundary is kept, the tie group gives exactly
    ``n_taken_from_tie_group`` members, nothing below it is kept."""
    tie = CASES[case]["derived"]["ties"][variant["name"].split("/")[1]]
    sig, _ = fopru_significance(
        t["attn_logits_patch"].float(), tie="row" if variant["api"] == "function" else "col"
    )
    if variant["strategy"] == "row":
        score, unit = sig.view(GRID, GRID).sum(-1), torch.unique(got // GRID)
    else:
        score, unit = sig, got
    boundary = tie["boundary_value"]
    above = (score > boundary).nonzero().flatten()
    group = (score == torch.tensor(boundary, dtype=score.dtype)).nonzero().flatten()
    assert above.numel() == tie["n_strictly_above"] and group.numel() == tie["tie_group_size"]
    assert bool(torch.isin(above, unit).all())
    assert int(torch.isin(unit, group).sum()) == tie["n_taken_from_tie_group"]
    assert bool(torch.isin(unit, torch.cat([above, group])).all())
    # the official vector obeys the same rule and has the same size
    ref_unit = (
        torch.unique(t[variant["output"]] // GRID) if variant["strategy"] == "row" else t[variant["output"]]
    )
    assert ref_unit.numel() == unit.numel()
    assert int(torch.isin(ref_unit, group).sum()) == tie["n_taken_from_tie_group"]
    # our tie rule: the lowest indices of the tie group
    taken = group[: tie["n_taken_from_tie_group"]]
    assert bool(torch.isin(taken, unit).all())


@pytest.mark.parametrize("case", ["fopru_llava15_colwins", "fopru_llava15_rowwins"])
@pytest.mark.parametrize(
    "strategy,keep,output",
    [
        ("rank", 0.25, "mod_rank_r0.25_kept"),
        ("rank", 0.11, "mod_rank_r0.11_kept"),
        ("rank", 64, "fn_rank_k64_kept"),
        ("row", 0.25, "mod_row_r0.25_kept"),
        ("row", 0.11, "mod_row_r0.11_kept"),
    ],
)
def test_method_select_on_golden_significance(case: str, strategy: str, keep, output: str, tensors):
    """The method path (signals → variance rule → grid → budget → selection) on the per-head column and
    row means of the golden logit matrix — what the adapter's ``received_logits`` / ``given_logits``
    probes deliver — must give the official kept set."""
    t = tensors[case]
    logits = t["attn_logits_patch"].float()
    logits = logits if logits.dim() == 3 else logits[None]  # [heads, 576, 576]
    cls_col = torch.full((logits.shape[0], 1), 9.0)  # a CLS column first, as the probes return it
    col = torch.cat([cls_col, logits.mean(dim=1)], dim=1)[None]  # [views=1, heads, 1 + 576]
    row = torch.cat([cls_col, logits.mean(dim=2)], dim=1)[None]
    m = FoPru(keep=keep, strategy=strategy, significance="logits")  # the official HydraInfer signal
    tokens = VisualTokens(
        torch.zeros(GRID * GRID, 4),
        Layout.single(GRID, GRID),
        signals={VitAttention(-2, "received_logits"): col, VitAttention(-2, "given_logits"): row},
    )
    sel = m.select(tokens)
    assert torch.equal(sel.indices, t[output])
    assert sel.features is None and sel.groups is None
