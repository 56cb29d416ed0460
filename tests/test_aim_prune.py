"""AIM in-LLM pruning at runtime (adapters/llm_hooks.py AIMPatch) on tiny LLaVA / LLaVA-NeXT models.

Pruned tokens must really leave the hidden states and the later layers' KV cache; decisions must be
consistent between the cached and the no-cache paths; a padded row must prune exactly like the row alone.
"""

from __future__ import annotations

import pytest
import torch
from test_mixed_kv_cache import tiny_llama
from tiny_models import IMG, llava_batch, next_batch, tiny_llava, tiny_next
from transformers import DynamicCache, StaticCache

import mmcompress as mmc
from mmcompress.config import MethodConfig
from mmcompress.kv import MixedPrecisionCache
from mmcompress.methods import aim_prune
from mmcompress.methods.aim_prune import AIM, aim_select, attention_logits, pagerank_importance

#: rows of 25 and 22 tokens: the second is left-padded by 3
PADDED = {"prefixes": ([5, 6, 5, 6, 5], [5])}
#: a tiny 4-layer LLM: rank after layer 1 (keep 25%), drop every visual token after layer 2
RANKED = AIM(schedule=(1.0, 0.25, 0.0))


def _greedy(model, n: int = 8, **inputs):
    out = model.generate(
        **inputs,
        max_new_tokens=n,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        suppress_tokens=[IMG],  # a generated placeholder would break the no-cache path (reference §3.5.5)
    )
    return out.sequences, torch.stack(out.scores, 1), out.past_key_values


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))  # the same tokens are suppressed
    return float((a - b)[fin].abs().max())


def _layer_lengths(model) -> list[int]:
    """A recorder of the sequence length each decoder layer receives (hidden_states.shape[1])."""
    seen: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True
        )
        for layer in model.get_decoder().layers
    ]
    return seen, hooks


# -- keep-all, shrinking, cache consistency --------------------------------------------------------------


def test_keep_all_identical_to_unpatched():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    mmc.compress(model, AIM(schedule=(1.0,)))
    seq, scores, cache = _greedy(model, **batch)
    assert torch.equal(seq, ref) and torch.equal(scores, ref_scores)
    assert [x.keys.shape[2] for x in cache.layers] == [batch["input_ids"].shape[1] + 7] * 4
    mmc.restore(model)


def test_hidden_states_and_cache_really_shrink():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, RANKED)
    seen, hooks = _layer_lengths(model)
    seq, _, cache = _greedy(model, 6, **batch)
    for x in hooks:
        x.remove()
    # prompt 25 (row 0: 9 text + 16 visual; row 1: 6 text + 16 visual, 3 pads): layer 2 gets 9 + int(16/4)
    # = 13 tokens (row 1: 10, left-padded), layer 3 only the text; decode steps feed 1 token to every layer
    assert seen[:4] == [25, 25, 13, 9]
    assert seen[4:] == [1] * (4 * 5)
    assert h.inllm_patch.stats["layer_tokens"] == [25, 25, 13, 9]
    assert h.inllm_patch.stats["layer_visual"] == [[16, 16], [16, 16], [4, 4], [0, 0]]
    assert [x.keys.shape[2] for x in cache.layers] == [25 + 5, 25 + 5, 13 + 5, 9 + 5]
    # text is never pruned: every layer keeps each row's text tokens (and the row's own count)
    assert seq.shape == (2, 25 + 6)
    mmc.restore(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_equals_no_cache_after_pruning(attn):
    model = tiny_llava(attn=attn)
    batch = llava_batch(**PADDED)
    mmc.compress(model, RANKED)
    seq, scores, _ = _greedy(model, **batch)
    seq2, scores2, _ = _greedy(model, use_cache=False, **batch)
    assert torch.equal(seq, seq2)
    assert _diff(scores, scores2) < 1e-5  # measured ~2e-7
    mmc.restore(model)


def test_eager_and_sdpa_agree():
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_llava(attn=attn)
        mmc.compress(model, RANKED)
        outs.append(_greedy(model, **llava_batch(**PADDED))[:2])
    assert torch.equal(outs[0][0], outs[1][0]) and _diff(outs[0][1], outs[1][1]) < 1e-4


def test_padded_batch_equals_rows_alone():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, AIM(schedule=(1.0, 0.5, 0.25)))
    seq, scores, _ = _greedy(model, **batch)
    kept = h.inllm_patch.stats["layer_kept"]
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
        assert _diff(scores[i], sc1[0]) < 1e-5
        pad = int((~real).sum())
        for layer, rows in enumerate(h.inllm_patch.stats["layer_kept"]):
            assert [p - pad for p in kept[layer][i]] == rows[0], layer  # same kept tokens
    mmc.restore(model)


def test_runtime_cut_equals_pure_functions():
    """The first cut (after layer 1) is index-exact with the pure functions on that layer's q / k."""
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states[1]  # input of decoder layer 1
        dec = model.get_decoder()
        attn = dec.layers[1].self_attn
        x = dec.layers[1].input_layernorm(hs)
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        cos, sin = dec.rotary_emb(hs, pos)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    ok = batch["attention_mask"].bool()
    imp = pagerank_importance(attention_logits(q, k, ok, scaling=attn.scaling), voters=ok)
    vis = (batch["input_ids"] == IMG) & ok
    keep = torch.tensor([int(v * 0.25) + int(t) for v, t in zip(vis.sum(1), (ok & ~vis).sum(1))])
    want = aim_select(imp, ok, ok & ~vis, keep) & vis
    h = mmc.compress(model, RANKED)
    _greedy(model, 1, **batch)
    got = h.inllm_patch.stats["layer_kept"][2]
    assert got == [want[i].nonzero().flatten().tolist() for i in range(2)]
    mmc.restore(model)


def test_pagerank_only_at_ranking_layers(monkeypatch):
    calls = []
    real = aim_prune.pagerank_pi
    monkeypatch.setattr(aim_prune, "pagerank_pi", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llava()
    mmc.compress(model, RANKED)  # layer 0: rate 1, layer 1: rank, layer 2: drop all (no ranks), 3: last
    _greedy(model, 3, **llava_batch(**PADDED))
    assert len(calls) == 1
    calls.clear()
    mmc.compress(model, AIM(schedule=(1.0, 1.0, 1.0, 1.0)))
    _greedy(model, 3, **llava_batch(**PADDED))
    assert calls == []
    mmc.restore(model)


def test_llava_next_anyres():
    model = tiny_next()
    batch = next_batch(model)
    h = mmc.compress(model, AIM(schedule=(1.0, 0.5, 0.1)))
    seq, scores, cache = _greedy(model, 6, **batch)
    seq2, scores2, _ = _greedy(model, 6, use_cache=False, **batch)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    n_img = (batch["input_ids"] == IMG).sum(1).tolist()
    assert h.inllm_patch.stats["layer_visual"] == [
        n_img,
        n_img,
        [v // 2 for v in n_img],
        [v // 10 for v in n_img],
    ]
    assert cache.layers[3].keys.shape[2] < cache.layers[0].keys.shape[2]
    mmc.restore(model)


def test_beam_search_cache_equals_no_cache():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    mmc.compress(model, RANKED)
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, suppress_tokens=[IMG])
    out = model.generate(**batch, **kw)
    assert out.shape == (4, 30) and torch.equal(out, model.generate(**batch, use_cache=False, **kw))
    mmc.restore(model)


@pytest.mark.parametrize("kind", ["2", "2.5"])
def test_qwen2_vl_mrope(kind):
    """Qwen2-VL / Qwen2.5-VL: the gathered cos / sin carry the kept tokens' original M-RoPE positions."""
    from tiny_models import QWEN_VID, qwen_batch, tiny_qwen

    model = tiny_qwen(kind)
    batch = qwen_batch(prefixes=([5, 6, 5, 6, 5], [5]))
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    kw["suppress_tokens"] = [IMG, QWEN_VID]
    ref = model.generate(**batch, **kw)
    mmc.compress(model, AIM(schedule=(1.0,)))
    out = model.generate(**batch, **kw)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.scores[-1], ref.scores[-1])
    h = mmc.compress(model, RANKED)
    out = model.generate(**batch, **kw)
    out2 = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(out.sequences, out2.sequences)
    assert _diff(torch.stack(out.scores, 1), torch.stack(out2.scores, 1)) < 1e-5
    assert h.inllm_patch.stats["layer_visual"] == [[16, 24], [16, 24], [4, 6], [0, 0]]
    mmc.restore(model)


def test_forward_with_labels_keeps_shapes():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMG, -100)
    mmc.compress(model, RANKED)
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    mmc.restore(model)


# -- composition -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", [mmc.DivPrune(keep=8), mmc.AIMMerge(keep=0.5)])
def test_compose_with_pre_llm(pre):
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, [pre, RANKED])
    assert h.method == pre and h.inllm == RANKED and h.kv is None
    seq, scores, _ = _greedy(model, **batch)
    seq2, scores2, _ = _greedy(model, use_cache=False, **batch)
    assert torch.equal(seq, seq2) and _diff(scores, scores2) < 1e-5
    assert h.inllm_patch.stats["layer_visual"] == [[8, 8], [8, 8], [2, 2], [0, 0]]  # on the kept 8
    assert mmc.report(model).tokens_out == [8, 8]
    mmc.restore(model)


def test_compose_with_mixed_kv_per_layer_masks():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    mmc.compress(model, RANKED)
    ref, ref_scores, ref_cache = _greedy(model, **batch)
    kv = mmc.MixedKV(high_bits=8, low_bits=8, residual=0, group_size=4)
    mmc.compress(model, [RANKED, kv])
    seq, scores, cache = _greedy(model, **batch)
    assert isinstance(cache, MixedPrecisionCache)
    assert torch.equal(seq, ref) and _diff(scores, ref_scores) < 0.02  # 8-bit everywhere
    for i, (layer, dyn) in enumerate(zip(cache.layers, ref_cache.layers)):
        assert layer.get_seq_length() == dyn.keys.shape[2]
        counts = layer.token_counts()
        # the per-layer padding (3 pads in layer 0-1; row 1 is 3 shorter after each cut too) is dropped
        assert counts["dropped"] == 3, (i, counts)
        assert sum(counts.values()) == 2 * layer.get_seq_length() and counts["residual"] == 2
    # important="text": the surviving visual tokens of each layer are the low-bit ones
    assert [layer.token_counts()["low"] for layer in cache.layers] == [32, 32, 8, 0]
    mmc.restore(model)


# -- restore, config, errors -------------------------------------------------------------------------------


def test_restore_bit_identical():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    before = dict(model.__dict__)
    impl = model.get_decoder().config._attn_implementation
    modules = list(model.modules())
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    mmc.compress(model, [mmc.DivPrune(keep=8), RANKED])
    assert model.get_decoder().config._attn_implementation == "mmcompress_sdpa"
    _greedy(model, **batch)
    mmc.restore(model)
    assert model.__dict__.keys() == before.keys() and "generate" not in model.__dict__
    assert model.get_decoder().config._attn_implementation == impl
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks_before
    seq, scores, cache = _greedy(model, **batch)
    assert type(cache) is DynamicCache and torch.equal(seq, ref) and torch.equal(scores, ref_scores)


def test_disabled_is_baseline():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    mmc.compress(model, RANKED)
    with mmc.disabled(model):
        seq, scores, _ = _greedy(model, **batch)
    assert torch.equal(seq, ref) and torch.equal(scores, ref_scores)
    mmc.restore(model)


def test_config_round_trip_and_schedule():
    for cfg in (AIM(), RANKED, AIM(start=1, step=0.5, tau=0.2, iters=3, damping=0.1, head_chunk=2)):
        assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert mmc.AIM is AIM and "aim" in mmc.available_methods()
    assert AIM().rates(28) == aim_prune.aim_schedule(28)
    assert AIM().rates(4) == [1.0, 1.0, 0.125, 0.0]  # scaled: start 2, step 3.5/4
    assert RANKED.rates(5) == [1.0, 0.25, 0.0, 0.0, 0.0]  # the last value continues


def test_head_chunk_same_selection():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    h = mmc.compress(model, RANKED)
    _greedy(model, 1, **batch)
    want = h.inllm_patch.stats["layer_kept"]
    h = mmc.compress(model, AIM(schedule=(1.0, 0.25, 0.0), head_chunk=2))
    _greedy(model, 1, **batch)
    assert h.inllm_patch.stats["layer_kept"] == want
    mmc.restore(model)


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (
            {"schedule": (1.0, 1.2)},
            ValueError,
            r"schedule\[1\]=1.2 is not allowed; retentions lie in \[0, 1\]",
        ),
        ({"schedule": ()}, TypeError, "schedule must be a non-empty tuple"),
        ({"schedule": (1.0,), "start": 2}, ValueError, "either schedule"),
        ({"step": 0.0}, ValueError, r"step=0.0 is not allowed; allowed: a retention drop in \(0, 1\]"),
        ({"start": -1}, ValueError, r"start=-1 is out of range"),
        ({"tau": 0.0}, ValueError, "tau=0.0 is not allowed"),
        ({"iters": 0}, ValueError, "iters=0 is out of range"),
        ({"damping": 1.0}, ValueError, r"damping=1.0 is not allowed; allowed: \[0, 1\)"),
    ],
)
def test_bad_config(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        AIM(**kwargs)


def test_bad_model_and_cache():
    model = tiny_llava()
    with pytest.raises(ValueError, match="schedule has 5 entries but the LLM has 4 layers"):
        mmc.compress(model, AIM(schedule=(1.0, 1.0, 0.5, 0.5, 0.0)))
    with pytest.raises(ValueError, match=r"start=4 is out of range for an LLM with 4 layers; allowed: 0..3"):
        mmc.compress(model, AIM(start=4))
    assert "_mmcompress_handle" not in model.__dict__  # nothing patched
    with pytest.raises(ValueError, match="no image / video token id"):
        mmc.compress(tiny_llama(), "aim")
    with pytest.raises(ValueError, match="brings its own KV cache"):
        mmc.compress(model, [mmc.ZipVL(), mmc.MixedKV()])
    with pytest.raises(ValueError, match="at most one pre-LLM method, one in-LLM method"):
        mmc.compress(model, [RANKED, mmc.ZipVL(kv_cache=False)])
    batch = llava_batch(**PADDED)
    mmc.compress(model, RANKED)
    with pytest.raises(ValueError, match=r"needs a dynamic KV cache .* cache_implementation='static'"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")
    static = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="got a StaticCache"):
        model.generate(**batch, max_new_tokens=2, past_key_values=static)
    with pytest.raises(ValueError, match="got a StaticCache"):
        model(**batch, past_key_values=static)
    mmc.restore(model)
    eager_only = tiny_llava(attn="eager")
    eager_only.get_decoder().config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match=r"supports attn_implementation in \('sdpa', 'eager'\)"):
        mmc.compress(eager_only, RANKED)
