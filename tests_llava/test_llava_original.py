"""The original-LLaVA-codebase adapter (adapters/llava_original.py) on tiny random models of the ``llava``
package (llava-torch 1.2.2.post1, transformers 4.37): LLaVA-1.5 (one 4x4 grid per image) and LLaVA-NeXT
(anyres + spatial_unpad). Run in .venv-llava only (scripts/llava_env.sh)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import transformers
from tiny_llava import IMG, batch, tiny_llava
from transformers import LlamaConfig, LlamaForCausalLM

import mmcompress as mmc
from mmcompress.config import PreLLMMethod, check_keep, resolve_keep
from mmcompress.signals import VitAttention
from mmcompress.tokens import Selection, VisualTokens

NEW = 5
EOS = 2  # suppressed so every row generates NEW tokens
GEN = dict(
    max_new_tokens=NEW,
    do_sample=False,
    pad_token_id=0,
    suppress_tokens=[EOS],
    output_scores=True,
    return_dict_in_generate=True,
)
TOL = 1e-5  # cache vs recomputation, padded vs alone: fp32 reduction-order noise
SIZES = ((60, 20), (64, 64))  # NeXT: 1x2 crops (3 views, 34 tokens) and 2x2 crops (5 views, 88 tokens)
NEXT_TOKENS = [34, 88]
PRE_LLM = ["random", "pool", "divprune", "hired", "fopru", "globalcom2", "aim_merge"]
TEXT_COLS = torch.arange(200) != EOS


@pytest.fixture(scope="module")
def models():
    return {"1.5": tiny_llava("1.5"), "next": tiny_llava("next")}


@pytest.fixture(autouse=True)
def _unpatched(models):
    yield
    for m in models.values():
        mmc.restore(m)
        m.config.tokenizer_padding_side = "left"


def _setup(models, kind, side="left", **kw):
    model = models[kind]
    model.config.tokenizer_padding_side = side
    return model, batch(model, sizes=kw.pop("sizes", SIZES), **kw)


def gen(model, b, **kw):
    """``(new tokens [B, NEW], scores [NEW, B, V])`` of greedy generate()."""
    out = model.generate(
        b["input_ids"],
        images=b["images"],
        image_sizes=b["image_sizes"],
        attention_mask=b["attention_mask"],
        **{**GEN, **kw},
    )
    return out.sequences[:, -NEW:], torch.stack(out.scores)


def single(b, i):
    """Row ``i`` of a padded batch on its own (no padding), with its images."""
    ids, am = b["input_ids"], b["attention_mask"]
    counts = (ids == IMG).sum(1).tolist()
    first = sum(counts[:i])
    sl = slice(first, first + counts[i])
    row = ids[i][am[i].bool()][None]
    images = b["images"][sl] if isinstance(b["images"], (list, torch.Tensor)) else None
    return {
        "input_ids": row,
        "attention_mask": torch.ones_like(row),
        "images": images,
        "image_sizes": b["image_sizes"][sl],
    }


def patched(model) -> list[str]:
    """What an adapter installs: instance attributes shadowing class methods, and the handle."""
    names = [f"{n or 'model'}.forward" for n, mod in model.named_modules() if "forward" in mod.__dict__]
    return names + [
        k for k in ("prepare_inputs_labels_for_multimodal", "_mmcompress_handle") if k in model.__dict__
    ]


# -- exactness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["1.5", "next"])
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_keep_all_equals_unpatched(method, kind, side, models):
    model, b = _setup(models, kind, side)
    ref_seq, ref_scores = gen(model, b)
    ref = model(**b).logits
    mmc.compress(model, method, keep=1.0)
    seq, scores = gen(model, b)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    assert torch.equal(model(**b).logits, ref)
    rep = mmc.report(model)
    assert rep.tokens_out == rep.tokens_in == ([16, 16] if kind == "1.5" else NEXT_TOKENS)
    # no mask: PILM pads rows of different lengths (NeXT) and returns no mask; so does the adapter
    no_mask = {**b, "attention_mask": None}
    with mmc.disabled(model):
        ref_seq, ref_scores = gen(model, no_mask)
    seq, scores = gen(model, no_mask)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    assert rep.prompt_len_out == rep.prompt_len_in == ref.shape[1]


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_restore_disabled_and_apply_twice(kind, models):
    model, b = _setup(models, kind)
    ref_seq, ref_scores = gen(model, b)
    ref = model(**b).logits
    mmc.compress(model, "random", keep=1.0)
    gen(model, b)
    full_kv = mmc.report(model).kv_bytes
    mmc.compress(model, "random", keep=4)
    assert "model.layers.0.self_attn.rotary_emb.forward" in patched(model)  # original positions (docstring)
    assert model(**b).logits.shape[1] < ref.shape[1]
    gen(model, b)
    assert 0 < mmc.report(model).kv_bytes < full_kv
    with mmc.disabled(model):
        assert torch.equal(model(**b).logits, ref)
        seq, scores = gen(model, b)
        assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    mmc.compress(model, "divprune", keep=6)  # replaces the first
    assert mmc.report(model) is None
    model(**b)
    assert mmc.report(model).tokens_out == [6, 6]
    mmc.restore(model)
    assert patched(model) == []
    assert torch.equal(model(**b).logits, ref)
    seq, scores = gen(model, b)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_kept_rows_are_the_unpruned_embeddings(kind, side, models):
    """PILM's spliced prompt minus exactly the dropped image slots, padded on the model's side; NeXT's
    newline slots of the layout hold image_newline."""
    model, b = _setup(models, kind, side)
    ids, am = b["input_ids"], b["attention_mask"]
    args = (ids, None, am, None, None, b["images"], b["image_sizes"])
    _, _, am0, _, e0, _ = model.prepare_inputs_labels_for_multimodal(*args)
    mmc.compress(model, "random", keep=0.5)
    _, pos1, am1, _, e1, _ = model.prepare_inputs_labels_for_multimodal(*args)
    assert pos1 is None  # generate()'s route: positions come from the mask (and the forward shadow)
    rep = mmc.report(model)
    for i in range(2):
        row = e0[i][am0[i].bool()]
        pre = int((ids[i][am[i].bool()] == IMG).nonzero())  # text tokens before the image
        n = rep.tokens_in[i]
        run = row[pre : pre + n]
        if kind == "next":
            nl = rep.images[i].layout.newline_mask()
            assert nl.sum() > 0 and torch.equal(
                run[nl], model.get_model().image_newline.expand(int(nl.sum()), -1)
            )
        want = torch.cat([row[:pre], run[torch.tensor(rep.kept[i])], row[pre + n :]])
        real = am1[i].bool()
        assert torch.equal(e1[i][real], want)
        assert torch.equal(e1[i][~real], torch.zeros_like(e1[i][~real]))
        ar, count = torch.arange(real.numel()), int(real.sum())
        assert torch.equal(real, ar < count if side == "right" else ar >= real.numel() - count)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_cache_equals_recompute_after_pruning(kind, positions, models):
    """Cached generate() == greedy full forward() calls without cache (images re-pruned every step)."""
    model, b = _setup(models, kind)
    mmc.compress(model, "divprune", keep=0.3, positions=positions)
    seq, scores = gen(model, b)
    ids, am = b["input_ids"], b["attention_mask"]
    for step in range(NEW):
        # any position_ids make PILM number each row's real tokens from 0, as generate() does
        out = model(
            input_ids=ids,
            attention_mask=am,
            position_ids=am.cumsum(-1) - 1,
            images=b["images"],
            image_sizes=b["image_sizes"],
            use_cache=False,
        )
        last = out.logits[:, -1]
        torch.testing.assert_close(last[:, TEXT_COLS], scores[step][:, TEXT_COLS], atol=TOL, rtol=0)
        assert torch.equal(last.masked_fill(~TEXT_COLS, -torch.inf).argmax(-1), seq[:, step])
        ids = torch.cat([ids, seq[:, step : step + 1]], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_hand_written_decode_loop_with_cache(kind, models):
    """forward() with images, then one token at a time on its cache (no mask, no positions)."""
    model, b = _setup(models, kind)
    one = single(b, 1)
    mmc.compress(model, "divprune", keep=0.3)
    seq, scores = gen(model, one)
    out = model(**one, use_cache=True)
    for step in range(NEW):
        torch.testing.assert_close(out.logits[:, -1, TEXT_COLS], scores[step][:, TEXT_COLS], atol=TOL, rtol=0)
        tok = seq[:, step : step + 1]
        out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_padded_batch_equals_each_sample_alone(kind, models):
    model, b = _setup(models, kind)
    mmc.compress(model, "divprune", keep=0.3)
    seq, scores = gen(model, b)
    kept = mmc.report(model).tokens_out
    for i in range(2):
        s1, c1 = gen(model, single(b, i))
        assert mmc.report(model).tokens_out == [kept[i]]
        assert torch.equal(seq[i], s1[0])
        torch.testing.assert_close(scores[:, i], c1[:, 0], atol=TOL, rtol=0)
    # forward() on a right-padded batch: every row's real tokens come first, numbered from 0
    model, b = _setup(models, kind, "right")
    out = model(**b).logits
    for i in range(2):
        o1 = model(**single(b, i)).logits[0]
        torch.testing.assert_close(out[i, : o1.shape[0]], o1, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_repeated_rows_keep_their_positions(kind, models):
    """Beams / num_return_sequences repeat PILM's rows inside generate(); the positions follow them."""
    model, b = _setup(models, kind)
    ref = gen(model, b, num_beams=2)
    mmc.compress(model, "random", keep=1.0)
    out = gen(model, b, num_beams=2)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    mmc.compress(model, "divprune", keep=0.3)
    seq, scores = gen(model, b)
    s2, c2 = gen(model, b, do_sample=True, top_k=1, num_return_sequences=2)  # top-1 sampling == greedy
    assert torch.equal(s2, seq.repeat_interleave(2, 0))
    torch.testing.assert_close(c2.amax(-1), scores.amax(-1).repeat_interleave(2, 1), atol=TOL, rtol=0)


def test_tokenizer_model_max_length(models):
    """PILM cuts the spliced prompt before pruning; an image the cut reaches is refused."""
    model, b = _setup(models, "1.5", "right")
    assert model(**b).logits.shape[1] == 21
    model.config.tokenizer_model_max_length = 19  # cuts text after the images only
    try:
        ref = model(**b).logits
        mmc.compress(model, "random", keep=1.0)
        assert torch.equal(model(**b).logits, ref)
        mmc.compress(model, "random", keep=4)
        assert model(**b).logits.shape[1] == 19 - 12
        model.config.tokenizer_model_max_length = 10
        with pytest.raises(ValueError, match="image 0 is cut by tokenizer_model_max_length=10"):
            model(**b)
    finally:
        model.config.tokenizer_model_max_length = 2048


def test_multi_image_rows_and_budgets(models):
    model, b = _setup(models, "1.5", rows=((5, IMG, 6, IMG, 7), (5, IMG, 8)), sizes=((32, 32),) * 3)
    mmc.compress(model, "random", keep=0.25)
    seq, scores = gen(model, b)
    assert mmc.report(model).tokens_out == [4, 4, 4]
    for i in range(2):
        s1, c1 = gen(model, single(b, i))
        assert torch.equal(seq[i], s1[0])
        torch.testing.assert_close(scores[:, i], c1[:, 0], atol=TOL, rtol=0)
    model, b = _setup(models, "next")
    mmc.compress(model, "random", keep=0.25)
    model(**b)
    rep = mmc.report(model)
    assert rep.tokens_in == NEXT_TOKENS and rep.tokens_out == [8, 22]  # 0.25 of each image, half to even


def test_forward_labels_are_shrunk(models):
    model, b = _setup(models, "1.5")
    ids, am = b["input_ids"], b["attention_mask"]
    labels = ids.clone()
    labels[(am == 0) | (ids == IMG)] = -100
    ref = model(**b, labels=labels)
    mmc.compress(model, "random", keep=1.0)
    assert torch.equal(model(**b, labels=labels).loss, ref.loss)
    mmc.compress(model, "random", keep=4)
    out = model(**b, labels=labels)
    L = out.logits.shape[1]
    rows = []
    for i in range(2):  # text labels around 4 ignored image slots, left-padded with -100
        lab = labels[i][am[i].bool()]
        at = int((ids[i][am[i].bool()] == IMG).nonzero())
        row = torch.cat([lab[:at], torch.full((4,), -100), lab[at + 1 :]])
        rows.append(torch.cat([torch.full((L - row.numel(),), -100), row]))
    want = torch.stack(rows)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), want[:, 1:].flatten())
    torch.testing.assert_close(out.loss, loss)


def test_text_only_prompts_after_image_prompts(models):
    model, b = _setup(models, "next")
    text = torch.tensor([[1, 5, 6, 7]])
    ref = model.generate(text, **GEN)
    ref_fwd = model(input_ids=text).logits
    mmc.compress(model, "random", keep=4)
    gen(model, b)
    again = model.generate(text, **GEN)
    assert torch.equal(again.sequences, ref.sequences) and torch.equal(
        torch.stack(again.scores), torch.stack(ref.scores)
    )
    model(**b)
    assert torch.equal(model(input_ids=text).logits, ref_fwd)


# -- every method ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["1.5", "next"])
@pytest.mark.parametrize("method", PRE_LLM)
def test_every_pre_llm_method_end_to_end(method, kind, models):
    model, b = _setup(models, kind)
    if method == "globalcom2" and kind == "1.5":
        with pytest.raises(ValueError, match="needs a layout of kind anyres; this LlavaLlamaForCausalLM"):
            mmc.compress(model, method)
        assert patched(model) == []
        return
    mmc.compress(model, method)
    seq, scores = gen(model, b)
    rep = mmc.report(model)
    assert sum(rep.tokens_out) < sum(rep.tokens_in) and rep.prompt_len_out < rep.prompt_len_in
    assert rep.kv_bytes > 0 and seq.shape == (2, NEW)
    assert torch.isfinite(scores[..., TEXT_COLS]).all()
    out = model(**b)
    assert out.logits.shape[1] == mmc.report(model).prompt_len_out


_SEEN: list = []


@dataclasses.dataclass(frozen=True)
class ClsTopK(PreLLMMethod):
    """Test-only: keep the thumbnail tokens the CLS row attends to most at one vision layer."""

    name: ClassVar[str] = "test-cls-topk"
    keep: int = 4
    layer: int = -2

    def validate(self) -> None:
        check_keep(self.keep)

    def needs(self) -> frozenset:
        return frozenset({VitAttention(self.layer, "cls")})

    def select(self, tokens: VisualTokens) -> Selection:
        a = tokens.signals[VitAttention(self.layer, "cls")]  # [views, H, T]
        _SEEN.append(a)
        score = a[0].mean(0)[1:]  # the base view (thumbnail), CLS column dropped: index i <-> token i
        return Selection(indices=score.topk(resolve_keep(self.keep, 16)).indices.sort().values)


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_probe_signals_are_the_towers_attention(kind, models):
    """Each image gets its own views' CLS attention, equal to what the CLIP tower computes."""
    model, b = _setup(models, kind)
    _SEEN.clear()
    mmc.compress(model, ClsTopK())
    model(**b)
    clip = model.get_vision_tower().vision_tower
    for i, a in enumerate(_SEEN):
        px = b["images"][i] if kind == "next" else b["images"][i : i + 1]
        with torch.no_grad():
            att = clip(px, output_attentions=True).attentions[-2][:, :, 0]  # [views, H, T]
        assert a.shape == att.shape
        torch.testing.assert_close(a, att.float(), atol=1e-6, rtol=1e-5)
        want = att[0].mean(0)[1:].topk(4).indices.sort().values.tolist()
        assert mmc.report(model).kept[i] == want
    assert [a.shape[0] for a in _SEEN] == ([1, 1] if kind == "1.5" else [3, 5])


@pytest.mark.parametrize(
    ("kind", "options", "views"),
    [
        ("next", dict(merge="spatial"), [["base", 4, 4, False], ["crops", 4, 8, False]]),
        ("1.5", dict(select_feature="cls_patch"), [["cls", 1, 1, False], ["base", 4, 4, False]]),
        ("1.5", dict(lm="mistral"), [["base", 4, 4, False]]),
    ],
)
def test_other_packings_and_mistral(kind, options, views):
    """mm_patch_merge_type="spatial" (no unpadding, no newlines), CLS kept as a visual token, Mistral."""
    model = tiny_llava(kind, **options)
    b = batch(model, sizes=SIZES)
    ref_seq, ref_scores = gen(model, b)
    ref = model(**b).logits
    mmc.compress(model, "random", keep=1.0)
    seq, scores = gen(model, b)
    assert torch.equal(seq, ref_seq) and torch.equal(scores, ref_scores)
    assert torch.equal(model(**b).logits, ref)
    lay = mmc.report(model).images[0].layout
    assert [[v.name, v.rows, v.cols, v.newline] for v in lay.views] == views
    mmc.compress(model, "divprune", keep=0.25)
    gen(model, b)
    rep = mmc.report(model)
    assert sum(rep.tokens_out) < sum(rep.tokens_in)
    mmc.restore(model)
    assert patched(model) == [] and torch.equal(model(**b).logits, ref)


# -- bad input: clear errors, model left unpatched and usable ----------------------------------------------
@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("random", dict(keep=17), "keep=17 exceeds the 16 visual tokens per image"),
        ("random", dict(keep=4, positions="nope"), "positions='nope'"),
        ("globalcom2", {}, "needs a layout of kind anyres"),
        (
            "zipvl",
            {},
            f"'zipvl' is an in-LLM method and needs transformers>=5; installed: transformers "
            f"{transformers.__version__}",
        ),
        ("aim", {}, "'aim' is an in-LLM method and needs transformers>=5; installed: transformers 4"),
        ("mixed_kv", {}, "'mixed_kv' is a KV-cache method and needs transformers>=5"),
    ],
)
def test_bad_config_leaves_model_unpatched(method, kwargs, match, models):
    model, b = _setup(models, "1.5")
    ref_seq, _ = gen(model, b)
    with pytest.raises(ValueError, match=match):
        mmc.compress(model, method, **kwargs)
    assert patched(model) == [] and mmc.report(model) is None
    assert torch.equal(gen(model, b)[0], ref_seq)


def test_in_llm_method_beside_a_pre_llm_one_is_refused(models):
    model, _ = _setup(models, "next")
    with pytest.raises(ValueError, match="needs transformers>=5"):
        mmc.compress(model, [mmc.DivPrune(keep=8), mmc.AIM()])
    assert patched(model) == []


def test_unloaded_tower_and_unsupported_models(models):
    model, b = _setup(models, "1.5")
    tower = model.get_vision_tower()
    tower.is_loaded = False
    try:
        with pytest.raises(ValueError, match="vision tower of this LlavaLlamaForCausalLM is not loaded"):
            mmc.compress(model, "random", keep=4)
    finally:
        tower.is_loaded = True
    assert patched(model) == []
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(TypeError, match="mmcompress does not support LlamaForCausalLM"):
        mmc.compress(lm, "random", keep=4)
    assert patched(lm) == []


def test_keep_larger_than_image_at_call_time_leaves_model_usable(models):
    model, b = _setup(models, "next")
    ref = model(**b).logits
    mmc.compress(model, "random", keep=40)  # image 0 has 34 tokens
    with pytest.raises(ValueError, match="keep=40 exceeds the 34"):
        gen(model, b)
    with pytest.raises(ValueError, match="keep=40 exceeds the 34"):
        model(**b)
    mmc.compress(model, "random", keep=30)
    gen(model, b)
    assert mmc.report(model).tokens_out == [30, 30]
    mmc.restore(model)
    assert torch.equal(model(**b).logits, ref)


def test_nan_images_and_images_on_a_filled_cache_raise(models):
    model, b = _setup(models, "1.5")
    mmc.compress(model, "divprune", keep=4)
    bad = dict(b, images=b["images"].clone())
    bad["images"][1] = float("nan")
    with pytest.raises(ValueError, match="image 1: visual features contain NaN or inf"):
        model(**bad)
    one = single(b, 0)
    out = model(**one, use_cache=True)
    with pytest.raises(ValueError, match="images arrived with a non-empty KV cache"):
        model(**one, past_key_values=out.past_key_values)
    gen(model, b)  # still usable
    assert mmc.report(model).tokens_out == [4, 4]
