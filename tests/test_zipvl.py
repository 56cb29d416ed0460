"""ZipVL: the pure selection rules (Eq. 6–9) and the runtime (adapters/llm_hooks.py ZipVLPatch) on tiny
LLaVA / LLaVA-NeXT models and a plain Llama: sparse prefill, mixed-precision cache split, re-splits."""

from __future__ import annotations

import pytest
import torch
from test_aim_prune import PADDED, _diff, _greedy
from test_mixed_kv_cache import tiny_llama
from tiny_models import llava_batch, next_batch, tiny_llava, tiny_next
from transformers import DynamicCache

import mmcompress as mmc
from mmcompress.config import MethodConfig
from mmcompress.kv import MixedKV, MixedPrecisionCache
from mmcompress.methods.zipvl import (
    ZipVL,
    important_count,
    probe_positions,
    probe_scores,
    window_split,
    zipvl_select,
)

#: sparse from layer 1 on, nothing quantized (the residual window holds every token): exact KV
SPARSE = ZipVL(tau=0.8, dense_layers=1, residual=1024)


# -- pure functions ----------------------------------------------------------------------------------------


def test_probe_positions():
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :10] = False  # 30 real tokens, left-padded
    idx, ok = probe_positions(valid, recent=0.1, spread=0.1)
    # row 0: 4 recent (36..39) + 4 spread over the first 36 (centres of 9-token slices)
    assert idx[0].tolist() == [4, 13, 22, 31, 36, 37, 38, 39] and ok[0].all()
    # row 1: 3 recent (37..39) + 3 spread over its first 27 real tokens (10..36), padded to 8 probes
    assert idx[1, :6].tolist() == [14, 23, 32, 37, 38, 39] and ok[1].tolist() == [True] * 6 + [False] * 2
    one, _ = probe_positions(torch.ones(1, 5, dtype=torch.bool), recent=0.0, spread=0.0)
    assert one.tolist() == [[4]]  # at least the last token


def test_important_count_eq6():
    a = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert important_count(a, valid, 0.8).tolist() == [2, 4]  # 0.5+0.3 reaches 0.8 / 3 x 0.25 < 0.8
    assert important_count(a, valid, 0.5).tolist() == [1, 2]
    assert important_count(a, valid, 1.0).tolist() == [4, 4]
    valid[1, :2] = False  # padding never counts
    assert important_count(a, valid, 0.6).tolist() == [2, 2]


def test_select_membership_by_normalized_score():
    """p from the raw mass, membership by a / c: a late token seen by few probes can win (Eq. 7-9)."""
    a = torch.tensor([[4.0, 3.0, 1.0, 0.9]])
    c = torch.tensor([[4.0, 4.0, 1.0, 1.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert important_count(a, valid, 0.7).tolist() == [2]
    assert zipvl_select(a, c, valid, 0.7).tolist() == [[True, False, True, False]]  # 1.0, 1.0 (tie: earlier)
    force = torch.tensor([[False, False, False, True]])
    assert zipvl_select(a, c, valid, 0.7, force=force).tolist() == [[True, False, True, True]]


def test_probe_scores_match_dense_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    valid = torch.ones(1, 12, dtype=torch.bool)
    idx, ok = probe_positions(valid, 0.25, 0.25)
    a, c = probe_scores(q, k, idx, ok, valid)
    kk = k.repeat_interleave(2, 1)
    full = torch.softmax(
        (q @ kk.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(12, 12).tril().bool(), -1e30), -1
    )
    torch.testing.assert_close(a, full[:, :, idx[0]].sum((1, 2)), rtol=1e-5, atol=1e-6)
    assert c[0].tolist() == [float((idx[0] >= j).sum()) for j in range(12)]
    assert float(a.sum()) == pytest.approx(4 * idx.shape[1], rel=1e-5)  # every probe row sums to 1


def test_window_split():
    attn = torch.zeros(1, 2, 10)
    attn[0, :, 6] = 0.5
    attn[0, :, 8] = 0.3
    attn[0, :, 9] = 0.2
    assert window_split(attn, 5, 0.7).tolist() == [[False, True, False, True, False]]


# -- runtime -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_cache", [False, True])
def test_keep_all_identical_to_unpatched(kv_cache):
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    mmc.compress(model, ZipVL(tau=1.0, kv_cache=kv_cache, residual=1024))
    seq, scores, cache = _greedy(model, **batch)
    assert isinstance(cache, MixedPrecisionCache) == kv_cache
    assert torch.equal(seq, ref) and torch.equal(scores, ref_scores)
    mmc.restore(model)


@pytest.mark.parametrize("rest", ["zero", "important"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_equals_no_cache(rest, attn):
    model = tiny_llava(attn=attn)
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, ZipVL(tau=0.8, dense_layers=1, residual=1024, rest=rest))
    seq, scores, _ = _greedy(model, **batch)
    imp = h.inllm_patch.stats["important"]
    seq2, scores2, _ = _greedy(model, use_cache=False, **batch)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    assert all(n < t for layer in imp for n, t in zip(layer, [25, 22]))  # really sparse
    mmc.restore(model)


def test_sparse_prefill_runs_on_important_tokens_only(monkeypatch):
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        if q.shape[-1] == 16:  # the LLM's heads (the CLIP tower's are 8 wide)
            seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *a, **kw)

    model = tiny_llava()
    batch = llava_batch(**PADDED)
    for rest in ("zero", "important"):
        h = mmc.compress(model, ZipVL(tau=0.8, dense_layers=1, residual=1024, rest=rest))
        seen.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        _greedy(model, 1, **batch)
        monkeypatch.undo()
        imp = h.inllm_patch.stats["important"]
        assert seen[0] == (25, 25)  # layer 0 dense
        rows = (lambda r: max(r)) if rest == "zero" else (lambda r: 25)
        assert seen[1:4] == [(rows(r), max(r)) for r in imp[1:]]  # queries x important keys
    mmc.restore(model)


def test_padded_batch_equals_rows_alone():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    cfg = ZipVL(tau=0.8, dense_layers=1, residual=4, group_size=4, resplit_every=3)
    h = mmc.compress(model, cfg)
    seq, scores, _ = _greedy(model, **batch)
    imp = h.inllm_patch.stats["important"]
    am = batch["attention_mask"]
    for i in range(2):
        real = am[i].bool()
        alone = {
            "input_ids": batch["input_ids"][i : i + 1, real],
            "attention_mask": am[i : i + 1, real],
            "pixel_values": batch["pixel_values"][i : i + 1],
        }
        s1, sc1, _ = _greedy(model, **alone)
        assert torch.equal(seq[i, seq.shape[1] - s1.shape[1] :], s1[0])
        assert _diff(scores[i], sc1[0]) < 1e-4  # quantized KV: same codes, float reductions differ
        assert [layer[i] for layer in imp] == [layer[0] for layer in h.inllm_patch.stats["important"]]
    mmc.restore(model)


def test_kv_split_follows_important_sets_and_resplits(monkeypatch):
    calls = []
    real = MixedPrecisionCache.set_important

    def spy(self, important, *, start=0, layers=None, requantize=False):
        if isinstance(layers, int):
            calls.append((layers, start, important.clone()))
        return real(self, important, start=start, layers=layers, requantize=requantize)

    monkeypatch.setattr(MixedPrecisionCache, "set_important", spy)
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, ZipVL(tau=0.8, residual=4, group_size=4, resplit_every=3))
    _, _, cache = _greedy(model, 8, **batch)
    prefill = [c for c in calls if c[1] == 0]
    assert [c[0] for c in prefill] == [0, 1, 2, 3]
    assert [c[2].sum(1).tolist() for c in prefill] == h.inllm_patch.stats["important"]
    # decode: 8 tokens -> cache 25..32; a window of 3 generated tokens is split every 3 steps, per layer
    resplits = [(c[0], c[1], c[2].shape[1]) for c in calls if c[1] > 0]
    assert resplits == [(layer, s, 3) for s in (25, 28) for layer in range(4)]
    counts = cache.token_counts()
    assert counts["high"] > 0 and counts["low"] > 0  # really mixed precision
    mmc.restore(model)


def test_plain_llama_llm():
    model = tiny_llama()
    ids = torch.randint(3, 199, (2, 30), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :6] = 0
    h = mmc.compress(model, ZipVL(tau=0.8, dense_layers=1, residual=1024))
    seq, scores, cache = _greedy(model, input_ids=ids, attention_mask=am)
    seq2, scores2, _ = _greedy(model, input_ids=ids, attention_mask=am, use_cache=False)
    assert isinstance(cache, MixedPrecisionCache)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    s1, sc1, _ = _greedy(model, input_ids=ids[1:, 6:])
    assert torch.equal(seq[1, 6:], s1[0]) and _diff(scores[1], sc1[0]) < 1e-5
    assert all(n < 30 for n in h.inllm_patch.stats["important"][1])
    mmc.restore(model)


def test_llava_next_and_pre_llm_composition():
    model = tiny_next()
    batch = next_batch(model)
    mmc.compress(model, SPARSE)
    seq, scores, _ = _greedy(model, 6, **batch)
    seq2, scores2, _ = _greedy(model, 6, use_cache=False, **batch)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, [mmc.DivPrune(keep=8), SPARSE])
    assert h.method.name == "divprune" and h.inllm == SPARSE and isinstance(h.kv, MixedKV)
    seq, scores, cache = _greedy(model, **batch)
    assert mmc.report(model).kv_bytes == cache.bytes_held() > 0
    seq2, scores2, _ = _greedy(model, use_cache=False, **batch)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    assert h.inllm_patch.stats["tokens"] == [17, 14]  # the shortened prompt
    mmc.restore(model)


@pytest.mark.parametrize("kind", ["2", "2.5"])
def test_qwen2_vl(kind):
    from tiny_models import IMG, QWEN_VID, qwen_batch, tiny_qwen

    model = tiny_qwen(kind)
    batch = qwen_batch(prefixes=([5, 6, 5, 6, 5], [5]))
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    kw["suppress_tokens"] = [IMG, QWEN_VID]
    h = mmc.compress(model, SPARSE)
    out = model.generate(**batch, **kw)
    out2 = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(out.sequences, out2.sequences)
    assert _diff(torch.stack(out.scores, 1), torch.stack(out2.scores, 1)) < 1e-5
    st = h.inllm_patch.stats
    assert st["tokens"] == [27, 32] and all(n < t for r in st["important"] for n, t in zip(r, st["tokens"]))
    mmc.restore(model)


def test_restore_bit_identical():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    before = dict(model.__dict__)
    modules = list(model.modules())
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    mmc.compress(model, ZipVL(tau=0.8, residual=4, group_size=4))
    _greedy(model, **batch)
    mmc.restore(model)
    assert model.__dict__.keys() == before.keys()
    assert model.get_decoder().config._attn_implementation == "sdpa"
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks_before
    seq, scores, cache = _greedy(model, **batch)
    assert type(cache) is DynamicCache and torch.equal(seq, ref) and torch.equal(scores, ref_scores)


def test_config_round_trip():
    for cfg in (ZipVL(), SPARSE, ZipVL(tau=0.5, rest="important", keep_text=True, kv_cache=False)):
        assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert mmc.ZipVL is ZipVL and "zipvl" in mmc.available_methods()
    assert ZipVL(high_bits=8, low_bits=4).cache_method() == MixedKV(high_bits=8, low_bits=4, important="text")
    assert ZipVL(kv_cache=False).cache_method() is None


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"tau": 0.0}, ValueError, r"tau=0.0 is not allowed; allowed: \(0, 1\]"),
        ({"tau": 1.5}, ValueError, r"tau=1.5 is not allowed; allowed: \(0, 1\]"),
        ({"tau": "0.9"}, TypeError, "tau must be a number"),
        ({"high_bits": 3}, ValueError, r"high_bits=3 is not supported; allowed bit widths: \(2, 4, 8\)"),
        ({"low_bits": 16}, ValueError, r"low_bits=16 is not supported"),
        ({"high_bits": 2, "low_bits": 4}, ValueError, "high_bits=2 < low_bits=4"),
        ({"rest": "drop"}, ValueError, r"rest='drop' is not allowed; choose one of \('zero', 'important'\)"),
        ({"probe_recent": 1.5}, ValueError, r"probe_recent=1.5 is not allowed"),
        ({"dense_layers": -1}, ValueError, "dense_layers=-1 is out of range"),
        ({"resplit_every": 0}, ValueError, "resplit_every=0 is out of range"),
        ({"keep_text": 1}, TypeError, "keep_text must be a bool"),
    ],
)
def test_bad_config(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        ZipVL(**kwargs)


def test_bad_model_and_cache():
    model = tiny_llava()
    with pytest.raises(ValueError, match="dense_layers=5 exceeds the LLM's 4 layers"):
        mmc.compress(model, ZipVL(dense_layers=5))
    batch = llava_batch(**PADDED)
    mmc.compress(model, ZipVL())
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")
    mmc.compress(model, ZipVL(kv_cache=False))
    with pytest.raises(ValueError, match="needs a dynamic KV cache"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")
    assert _greedy(model, 2, **batch)[0].shape == (2, 27)  # the failed call left nothing behind
    mmc.restore(model)
