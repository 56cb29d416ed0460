"""AIM in-LLM pruning vs the official code: PageRank importance and the per-layer keep schedule on the
golden ``ap*`` vectors (tests/golden/aim/, README-divprune-aim.md §4; LaVi-Lab/AIM @ edc24e9).

Indices and masks must match exactly. Importance values are compared with a relative tolerance of
2e-6: the vectors were made with another BLAS, and the same official formula re-run here differs in the
last bits (measured max relative error 6.7e-7); exact zeros must stay exact zeros.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompress.methods.aim_prune import (
    aim_keep_num,
    aim_schedule,
    aim_select,
    attention_logits,
    pagerank_importance,
)

GOLDEN = Path(os.environ.get("MMCOMPRESS_GOLDEN_DIR", Path(__file__).parent / "golden")) / "aim"
CASES = {c["case_id"]: c for c in json.loads((GOLDEN / "index.json").read_text())["cases"]}
UNIT = sorted(k for k, c in CASES.items() if c["kind"] == "pagerank_unit")
SCHEDULE = sorted(k for k, c in CASES.items() if c["kind"] == "pagerank_schedule")
RTOL = 2e-6


def _load(case: str) -> dict:
    return load_file(GOLDEN / CASES[case]["file"])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got == 0, want == 0), "exact-zero importances differ"
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0.0)


def test_cases_present():
    assert len(UNIT) == 3 and len(SCHEDULE) == 3


@pytest.mark.parametrize("case", UNIT)
def test_importance_on_official_logits(case):
    t = _load(case)
    _close(pagerank_importance(t["attn_weights"]), t["importance"])


@pytest.mark.parametrize("case", UNIT)
def test_logits_bitwise_and_inf_mask_equivalent(case):
    """Our logits with the official fp16 additive mask are bit-identical to the official input; the
    ``-inf`` mask the runtime uses gives the same importance (masked weight is exactly 0 either way)."""
    t = _load(case)
    assert torch.equal(attention_logits(t["q"], t["k"], t["mask2d"], official_mask=True), t["attn_weights"])
    _close(pagerank_importance(attention_logits(t["q"], t["k"], t["mask2d"])), t["importance"])


def test_pruned_tokens_have_zero_importance():
    t = _load("ap02_pagerank_unit_pruned_n40")
    imp = pagerank_importance(t["attn_weights"])
    assert torch.equal(imp[~t["mask2d"]], torch.zeros(8))
    assert bool((imp[t["mask2d"]] > 0).all())


def test_official_schedules():
    qwen = aim_schedule(28)
    assert qwen == CASES[SCHEDULE[0]]["params"]["retain_rate"]
    assert qwen[:14] == [1.0] * 14 and qwen[14:21] == [0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert qwen[21:] == [0.0] * 7
    vicuna = aim_schedule(32)  # LLaVA-PruMerge modeling_llama.py: start 13
    assert vicuna[:13] == [1.0] * 13 and vicuna[13] == 0.875 and vicuna[19] == 0.125 and vicuna[20] == 0.0


@pytest.mark.parametrize("case", SCHEDULE)
@pytest.mark.parametrize("mask_kind", ["official", "inf"])
def test_schedule_masks_exact(case, mask_kind):
    """The official 28-layer loop (mask-only: pruned tokens stay query rows) rebuilt from our pure
    functions: every layer's importance, keep count and resulting mask."""
    t = _load(case)
    p = CASES[case]["params"]
    b0, b1, b2 = p["boundaries"]
    n = p["N"]
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[:, :b0] = True
    protected[:, b1:b2] = True
    rates = aim_schedule(p["num_layers"])
    mask = torch.ones(1, n, dtype=torch.bool)
    for layer in range(p["num_layers"]):
        assert torch.equal(mask, t["mask_in"][layer])
        logits = attention_logits(t["q"][layer], t["k"][layer], mask, official_mask=mask_kind == "official")
        imp = pagerank_importance(logits)
        _close(imp, t["importance_raw"][layer])
        keep = aim_keep_num(n, int(protected.sum()), rates[layer])
        assert keep == int(t["keep_num"][layer])
        mask = aim_select(imp, mask, protected, keep)
        assert torch.equal(mask, t["mask_out"][layer]), f"layer {layer}"
        kept = mask[0, b0:b1].nonzero().flatten()
        want = t["visual_kept_indices"][layer]
        assert torch.equal(kept, want[want >= 0])


def test_keep_num_truncates():
    # ap05: V = 25 at 0.875 -> 21.875 -> 21 visual tokens (official int())
    assert aim_keep_num(41, 16, 0.875) - 16 == 21
    assert [int(x) for x in _load("ap05_schedule_qwen2_n41_v25")["keep_num"][14:17]] == [37, 34, 31]


def test_select_batch_rows_independent():
    """Per-row keep counts: each row of a batch selects as it would alone."""
    t = _load("ap04_schedule_qwen2_n40_v24")
    imp = torch.rand(2, 40, generator=torch.Generator().manual_seed(0))
    alive = torch.ones(2, 40, dtype=torch.bool)
    protected = torch.zeros(2, 40, dtype=torch.bool)
    protected[:, :6] = True
    both = aim_select(imp, alive, protected, torch.tensor([20, 30]))
    for b, k in enumerate((20, 30)):
        assert torch.equal(both[b], aim_select(imp[b : b + 1], alive[b : b + 1], protected[b : b + 1], k)[0])
    assert t["q"].dtype == torch.float16  # the stored inputs are the fp16 model tensors


def test_select_bad_shapes():
    with pytest.raises(ValueError, match="same \\[B, N\\] shape"):
        aim_select(
            torch.zeros(1, 4), torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool), 2
        )
