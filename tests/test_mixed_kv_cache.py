"""Mixed-precision KV cache (mmcompress/kv): storage, padding, generate() on tiny Llama / LLaVA, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMG, llava_batch, next_batch, text_config, tiny_llava, tiny_next
from transformers import DynamicCache, LlamaForCausalLM, MistralConfig, StaticCache

import mmcompress as mmc
from mmcompress.config import MethodConfig
from mmcompress.kernels.kvquant import dequantize, quantize
from mmcompress.kv import MixedKV, MixedPrecisionCache, MixedPrecisionLayer, make_cache

#: rows of 25 and 22 tokens: the second is left-padded by 3 (not a multiple of the test group sizes)
PADDED = {"prefixes": ([5, 6, 5, 6, 5], [5])}


def _kv(
    b: int, h: int, t: int, d: int, seed: int = 0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = text_config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _greedy(model, n: int = 12, **inputs):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    return out.sequences, torch.stack(out.scores, 1), out.past_key_values


# -- storage layout: exact against the quantizer ------------------------------------------------------------


def test_layer_blocks_are_the_quantizer_on_each_stream():
    """Tokens go to their class stream in order; every G of them are one block quantized as KIVI."""
    layer = MixedPrecisionLayer(high_bits=8, low_bits=2, residual=4, group_size=8, value_group_size=8)
    k, v = _kv(1, 2, 36, 16)
    imp = torch.zeros(1, 36, dtype=torch.bool)
    imp[0, [1, 3, 5, 7, 9, 11, 13, 15, 33]] = True  # 8 important among the evicted 32, one in the residual
    layer.set_important(imp)
    k_out, v_out = layer.update(k, v)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)  # lazy: the prefill step sees exact states
    layer.flush()
    assert layer.token_counts() == {"high": 8, "low": 24, "waiting": 0, "residual": 4, "dropped": 0}
    k2, v2 = _kv(1, 2, 1, 16, seed=1)
    k_out, v_out = layer.update(k2, v2)  # evicts position 32 -> waits (low stream has 1 of 8)
    assert layer.token_counts()["waiting"] == 1
    hi = imp[0, :32].nonzero().flatten()
    lo = (~imp[0, :32]).nonzero().flatten()
    for pos, bits in ((hi, 8), (lo[:8], 2), (lo[8:16], 2), (lo[16:24], 2)):
        kb = k[:, :, pos]  # [1, H, G, D]: one block, keys per channel over its G tokens
        vb = v[:, :, pos]
        assert torch.equal(k_out[:, :, pos], dequantize(quantize(kb, bits, 8, axis=2)))
        assert torch.equal(v_out[:, :, pos], dequantize(quantize(vb, bits, 8, axis=3)))
    assert torch.equal(k_out[:, :, 32:36], k[:, :, 32:36])  # waiting + residual: full precision
    assert torch.equal(k_out[:, :, 36:], k2) and torch.equal(v_out[:, :, 36:], v2)


def test_bytes_held_exact():
    b, h, d, g, gv = 2, 2, 16, 8, 8
    layer = MixedPrecisionLayer(high_bits=4, low_bits=2, residual=4, group_size=g, value_group_size=gv)
    imp = torch.zeros(b, 36, dtype=torch.bool)
    imp[:, :8] = True
    layer.set_important(imp)
    layer.update(*_kv(b, h, 36, d))
    layer.flush()  # per row: 1 high block, 3 low blocks, 4 residual tokens

    def block(bits):  # keys: codes + a (scale, zero) fp16 pair per channel; values: a pair per token group
        return 2 * (h * g * d * bits // 8) + 4 * h * d + 4 * h * g * (d // gv)

    mem = layer.memory()
    assert mem["codes"] + mem["scales"] == b * (block(4) + 3 * block(2))
    assert mem["full_precision"] == 2 * b * h * 4 * d * 4  # residual K and V, fp32
    assert mem["index"] == b * 4 * (4 + 4 * g) + b * 36  # int32 row + positions per block, bool map
    assert layer.bytes_held() == sum(mem.values())
    # the attention mask is one tensor shared by every layer: the cache counts it once
    cache = MixedPrecisionCache(3, residual=8)
    for i in range(3):
        cache.update(*_kv(b, h, 5, d), i)
    base = cache.bytes_held()
    cache.set_attention_mask(torch.ones(b, 5, dtype=torch.bool))
    assert cache.bytes_held() - base == b * 5


def test_bytes_shrink_4x_vs_fp16_at_4_2():
    """Realistic head shape (8 KV heads x 128), 4096 tokens, 10% important, everything held counted."""
    cache = MixedPrecisionCache(2, high_bits=4, low_bits=2, residual=32, group_size=32)
    t = 4096
    imp = torch.rand(1, t, generator=torch.Generator().manual_seed(0)) < 0.1
    cache.set_important(imp)
    for i in range(2):
        cache.update(*_kv(1, 8, t, 128, seed=i, dtype=torch.float16), i)
    cache.flush()
    fp16 = 2 * 2 * 8 * t * 128 * 2  # layers x (K, V) x heads x tokens x dim x 2 bytes
    ratio = fp16 / cache.bytes_held()
    assert ratio >= 4.0, (ratio, cache.memory())
    # 2-bit only, for reference: ~16 / (2 + 1 + 1) bits with fp16 scale+zero per 32 -> > 4.5x
    low = MixedPrecisionCache(1, high_bits=4, low_bits=2, residual=32, group_size=32)
    low.update(*_kv(1, 8, t, 128, dtype=torch.float16), 0)
    low.flush()
    assert 2 * 8 * t * 128 * 2 / low.bytes_held() > 4.5


def test_left_padding_never_touches_real_tokens():
    """A padded row's real tokens are quantized bit-identically to the same row alone; pads are dropped."""
    kw = dict(high_bits=4, low_bits=2, residual=3, group_size=4, value_group_size=8)
    k, v = _kv(1, 2, 21, 8, seed=2)
    alone = MixedPrecisionLayer(**kw)
    alone.update(k, v)
    pad = 5
    kp = torch.cat([torch.full((1, 2, pad, 8), 1e3), k], 2)  # huge junk at the padding positions
    vp = torch.cat([torch.full((1, 2, pad, 8), -1e3), v], 2)
    padded = MixedPrecisionLayer(**kw)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 21, dtype=torch.long)], 1)
    padded.set_valid(mask)
    padded.update(kp, vp)
    step_k, step_v = _kv(1, 2, 1, 8, seed=3)
    ka, va = alone.update(step_k, step_v)
    kb, vb = padded.update(step_k, step_v)
    assert torch.equal(kb[:, :, pad:], ka) and torch.equal(vb[:, :, pad:], va)
    assert torch.equal(kb[:, :, :pad], torch.zeros_like(kb[:, :, :pad]))  # dropped, returned as zeros
    assert padded.token_counts()["dropped"] == pad
    assert padded.bytes_held() - alone.bytes_held() == 26  # only the attention mask (26 bools) it keeps


def test_set_important_reroutes_and_requantizes():
    layer = MixedPrecisionLayer(high_bits=8, low_bits=2, residual=0, group_size=4, value_group_size=8)
    k, v = _kv(2, 1, 10, 8, seed=4)
    layer.update(k, v)
    layer.flush()  # 10 low tokens per row: 2 blocks + 2 waiting
    assert layer.token_counts() == {"high": 0, "low": 16, "waiting": 4, "residual": 0, "dropped": 0}
    imp = torch.zeros(2, 10, dtype=torch.bool)
    imp[0, 8:] = True  # row 0's waiting tokens become important: lossless move, still waiting (2 < G)
    layer.set_important(imp)
    assert layer._pending["high"]["pos"].tolist() == [8, 9]
    assert layer.token_counts()["low"] == 16
    imp[1, :4] = True  # a quantized block of row 1 changes class: only moves with requantize=True
    layer.set_important(imp)
    assert layer._blocks["high"] is None
    layer.set_important(imp, requantize=True)
    assert layer._blocks["high"]["pos"].tolist() == [[0, 1, 2, 3]]
    assert layer._blocks["high"]["row"].tolist() == [1]
    assert sorted(layer._blocks["low"]["pos"].flatten().tolist()) == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    ko, _ = layer.update(*_kv(2, 1, 1, 8, seed=5))
    two_bit = dequantize(quantize(k[:, :, :4], 2, 4, axis=2))
    assert torch.equal(ko[0, :, :4], two_bit[0])  # row 0 untouched
    # row 1's positions 0..3: their 2-bit values re-quantized at 8 bits (a second rounding, ZipCache style)
    assert torch.equal(ko[1:, :, :4], dequantize(quantize(two_bit[1:], 8, 4, axis=2)))


def test_reorder_rows_matches_reindexing():
    layer = MixedPrecisionLayer(high_bits=4, low_bits=2, residual=2, group_size=4, value_group_size=8)
    imp = torch.rand(3, 13, generator=torch.Generator().manual_seed(6)) < 0.4
    layer.set_important(imp)
    layer.update(*_kv(3, 2, 12, 8, seed=7))
    step = _kv(3, 2, 1, 8, seed=8)
    ref = MixedPrecisionLayer(high_bits=4, low_bits=2, residual=2, group_size=4, value_group_size=8)
    ref.set_important(imp)
    ref.update(*_kv(3, 2, 12, 8, seed=7))
    k_ref, _ = ref.update(*step)
    beam = torch.tensor([2, 0, 0])
    layer.update(*step)
    layer.reorder_cache(beam)
    k_new, _ = layer.update(*_kv(3, 2, 1, 8, seed=9))
    # everything but the newest (and the freshly evicted) token equals the reordered reference
    assert torch.equal(k_new[:, :, :11], k_ref[beam][:, :, :11])
    layer.batch_select_indices(torch.tensor([True, False, True]))
    assert layer.keys.shape[0] == 2 and layer.token_counts()["residual"] == 4


# -- generate() -------------------------------------------------------------------------------------------


def test_generate_tiny_llama_8bit_equals_fp_and_low_bits_run():
    model = tiny_llama()
    ids = torch.randint(3, 199, (1, 40), generator=torch.Generator().manual_seed(0))
    ref, ref_scores, _ = _greedy(model, 20, input_ids=ids)
    cache = MixedPrecisionCache(model.config, high_bits=8, low_bits=8, residual=8, group_size=8)
    seq, scores, out_cache = _greedy(model, 20, input_ids=ids, past_key_values=cache)
    assert out_cache is cache and cache.token_counts()["low"] > 0  # really quantized
    assert torch.equal(seq, ref)
    assert (scores - ref_scores).abs().max() < 0.02  # measured 6e-4 (8-bit, G=8)
    cache = MixedPrecisionCache(model.config, high_bits=4, low_bits=2, residual=8, group_size=8)
    seq, scores, _ = _greedy(model, 20, input_ids=ids, past_key_values=cache)
    dyn = DynamicCache(config=model.config)
    model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, past_key_values=dyn)
    assert cache.bytes_held() < sum(x.keys.nbytes + x.values.nbytes for x in dyn.layers) / 3


def test_compress_mixed_kv_on_llava_text_policy_and_report():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    ref, ref_scores, _ = _greedy(model, **batch)
    h = mmc.compress(model, "mixed_kv", high_bits=8, low_bits=8, residual=4, group_size=4)
    assert h.method is None and h.kv == MixedKV(high_bits=8, low_bits=8, residual=4, group_size=4)
    seq, scores, cache = _greedy(model, **batch)
    assert isinstance(cache, MixedPrecisionCache)
    assert torch.equal(seq, ref)
    assert (scores - ref_scores).abs().max() < 0.02  # measured 6e-4
    rep = mmc.report(model)
    assert rep.method["method"] == "mixed_kv" and rep.kv_bytes == cache.bytes_held() > 0
    # important="text": image placeholders at low bits, every other real token at high bits, pads dropped
    layer = cache.layers[0]
    ids = torch.cat([batch["input_ids"], seq[:, batch["input_ids"].shape[1] :]], 1)
    for c, want_img in (("low", True), ("high", False)):
        blk = layer._blocks[c]
        tok = ids[blk["row"].long()[:, None].expand_as(blk["pos"]), blk["pos"].long()]
        assert bool(((tok == IMG) == want_img).all()), c
    assert layer.token_counts()["dropped"] == int((batch["attention_mask"] == 0).sum()) == 3
    with mmc.disabled(model):
        _, _, plain = _greedy(model, 2, **batch)
    assert type(plain) is DynamicCache
    mmc.restore(model)


def test_compress_mixed_kv_on_llava_next_8bit_equals_fp():
    model = tiny_next()
    batch = next_batch(model)
    ref, ref_scores, _ = _greedy(model, 8, **batch)
    mmc.compress(model, "mixed_kv", high_bits=8, low_bits=8, residual=4, group_size=4)
    seq, scores, cache = _greedy(model, 8, **batch)
    assert isinstance(cache, MixedPrecisionCache) and cache.token_counts()["low"] > 0
    assert torch.equal(seq, ref) and (scores - ref_scores).abs().max() < 0.02
    mmc.restore(model)


def test_batch_with_left_padding_equals_rows_alone():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    mmc.compress(model, "mixed_kv", high_bits=4, low_bits=2, residual=4, group_size=4)
    seq, scores, _ = _greedy(model, **batch)
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
        assert (scores[i] - sc1[0]).abs().max() < 1e-5  # measured 1.5e-7, as with DynamicCache
    mmc.restore(model)


def test_compose_with_divprune():
    model = tiny_llava()
    batch = llava_batch(**PADDED)
    mmc.compress(model, mmc.DivPrune(keep=4))
    ref, ref_scores, ref_cache = _greedy(model, **batch)
    h = mmc.compress(
        model, [mmc.DivPrune(keep=4), mmc.MixedKV(high_bits=8, low_bits=8, residual=4, group_size=4)]
    )
    assert h.method == mmc.DivPrune(keep=4) and h.kv.name == "mixed_kv"
    seq, scores, cache = _greedy(model, **batch)
    assert isinstance(cache, MixedPrecisionCache) and cache.get_seq_length() == ref_cache.get_seq_length()
    assert torch.equal(seq, ref) and (scores - ref_scores).abs().max() < 0.02
    rep = mmc.report(model)
    assert rep.tokens_out == [4, 4] and rep.kv_bytes == cache.bytes_held()
    # text policy on the shortened prompt: exactly the 2 x 4 kept visual tokens are low-bit
    assert sum(layer.token_counts()["low"] for layer in cache.layers[:1]) == 8
    mmc.restore(model)


def test_beam_search_without_quantized_tokens_equals_dynamic():
    model = tiny_llama()
    ids = torch.randint(3, 199, (2, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    ref = model.generate(input_ids=ids, **kw)
    cache = MixedPrecisionCache(model.config, residual=64)  # nothing leaves the residual: exact path
    assert torch.equal(model.generate(input_ids=ids, past_key_values=cache, **kw), ref)
    cache = MixedPrecisionCache(model.config, high_bits=8, low_bits=8, residual=2, group_size=4)
    assert model.generate(input_ids=ids, past_key_values=cache, **kw).shape == ref.shape  # reorders blocks


# -- restore, config, errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "llava"])
def test_restore_bit_identical(which):
    model = tiny_llama() if which == "llama" else tiny_llava()
    inputs = (
        {"input_ids": torch.randint(3, 199, (1, 12), generator=torch.Generator().manual_seed(2))}
        if which == "llama"
        else llava_batch(**PADDED)
    )
    ref, ref_scores, _ = _greedy(model, 6, **inputs)  # first: transformers installs its own hooks lazily
    before_dict = dict(model.__dict__)
    modules = list(model.modules())
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    methods = (
        [mmc.MixedKV(residual=2, group_size=4)]
        if which == "llama"
        else [mmc.DivPrune(keep=4), mmc.MixedKV(residual=2, group_size=4)]
    )
    mmc.compress(model, methods)
    assert "generate" in model.__dict__
    _greedy(model, 6, **inputs)
    mmc.restore(model)
    assert model.__dict__.keys() == before_dict.keys() and "generate" not in model.__dict__
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks_before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    seq, scores, cache = _greedy(model, 6, **inputs)
    assert type(cache) is DynamicCache and torch.equal(seq, ref) and torch.equal(scores, ref_scores)


def test_config_round_trip_and_make_cache():
    cfg = MixedKV(high_bits=8, low_bits=4, residual=16, group_size=8, value_group_size=8, important="none")
    assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert "mixed_kv" in mmc.available_methods() and mmc.MixedKV is MixedKV
    cache = make_cache(tiny_llava(), high_bits=8, low_bits=4, residual=16, group_size=8)
    assert isinstance(cache, MixedPrecisionCache) and len(cache.layers) == 4
    assert cache.layers[0].bits == {"high": 8, "low": 4} and cache.layers[0].default_important  # "text"
    assert not MixedKV(important="none").make_cache(tiny_llama()).layers[0].default_important


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"high_bits=3 is not supported; allowed bit widths: \(2, 4, 8\)"):
        MixedKV(high_bits=3)
    with pytest.raises(ValueError, match=r"low_bits=16 is not supported; allowed bit widths: \(2, 4, 8\)"):
        mmc.compress(tiny_llama(), "mixed_kv", low_bits=16)
    with pytest.raises(ValueError, match="high_bits=2 < low_bits=4"):
        MixedKV(high_bits=2, low_bits=4)
    with pytest.raises(ValueError, match="group_size=6 must be a multiple of 4"):
        MixedKV(group_size=6)
    with pytest.raises(ValueError, match="residual=-1 is out of range"):
        MixedKV(residual=-1)
    with pytest.raises(
        ValueError, match=r"important='attention' is not allowed; choose one of \('none', 'text'\)"
    ):
        MixedKV(important="attention")
    model = tiny_llama()  # head_dim 16
    with pytest.raises(ValueError, match="value_group_size=12 does not divide the head dimension 16"):
        mmc.compress(model, "mixed_kv", value_group_size=12)
    assert "generate" not in model.__dict__  # a failed compress patches nothing
    with pytest.raises(ValueError, match="got 2 methods"):
        mmc.compress(model, [mmc.MixedKV(), mmc.MixedKV(high_bits=8)])
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM"):  # pre-LLM needs an adapter
        mmc.compress(model, [mmc.DivPrune(keep=4), mmc.MixedKV()])
    sliding = MistralConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    with pytest.raises(
        ValueError, match=r"full-attention layers only; this model has layer types \['sliding_attention'\]"
    ):
        MixedPrecisionCache(sliding)
    mmc.compress(model, "mixed_kv")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match="got a StaticCache .a static cache; mixed_kv needs a dynamic one"):
        model.generate(input_ids=ids, max_new_tokens=2, past_key_values=static)
    with pytest.raises(ValueError, match="prepare_inputs needs a pre-LLM method"):
        mmc.prepare_inputs(model, input_ids=ids)
    mmc.restore(model)
    cache = MixedPrecisionCache(model.config)
    with pytest.raises(ValueError, match="important must be a bool tensor"):
        cache.set_important(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="layer index 9 is out of range; the cache has 4 layers"):
        cache.set_important(None, layers=9)
    with pytest.raises(ValueError, match="attention mask must be 2-D"):
        cache.set_attention_mask(torch.ones(1, 1, 4, 4))
    cache.update(*_kv(1, 2, 6, 16), 0)
    with pytest.raises(ValueError, match="important has 2 rows but the cache holds a batch of 1"):
        cache.set_important(torch.zeros(2, 6, dtype=torch.bool), layers=0)
    with pytest.raises(ValueError, match="only the 6 full-precision residual tokens"):
        cache.layers[0].crop(-7)
