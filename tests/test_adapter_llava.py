"""The transformers LLaVA-1.5 / LLaVA-NeXT adapter on tiny random models (reference §3.3 checks)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
from tiny_models import IMG, llava_batch, next_batch, tiny_llava, tiny_next

import mmcompress as mmc
from mmcompress.config import PreLLMMethod, check_keep, resolve_keep
from mmcompress.signals import VitAttention
from mmcompress.tokens import Selection, VisualTokens

GEN = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMG])
LOGIT_TOL = 1e-5  # cache vs recomputation and padded vs alone: fp32 reduction-order noise (seen: <= 2e-7)


@dataclasses.dataclass(frozen=True)
class ClsTopK(PreLLMMethod):
    """Test-only method: keep the tokens the CLS row attends to most at one vision layer (FasterVLM-style).
    Exercises the probe plumbing end to end; not registered."""

    name: ClassVar[str] = "test-cls-topk"
    keep: int | float = 0.5
    layer: int = -2

    def validate(self) -> None:
        check_keep(self.keep)

    def needs(self) -> frozenset:
        return frozenset({VitAttention(self.layer, "cls")})

    def select(self, tokens: VisualTokens) -> Selection:
        a = tokens.signals[VitAttention(self.layer, "cls")]  # [views, H, T]
        score = a[0].mean(0)[1:]  # heads averaged, CLS column dropped: index i <-> visual token i
        k = resolve_keep(self.keep, tokens.num_tokens)
        return Selection(indices=score.topk(k).indices.sort().values)


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_next()


@pytest.fixture(autouse=True)
def _unpatched(llava, llava_next):
    yield
    mmc.restore(llava)
    mmc.restore(llava_next)


def _model_and_batch(kind, llava, llava_next):
    if kind == "llava":
        return llava, llava_batch()
    return llava_next, next_batch(llava_next)


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_keep_all_equals_unpatched(kind, method, llava, llava_next):
    model, batch = _model_and_batch(kind, llava, llava_next)
    ref_seq, ref_logits = _gen(model, batch)
    ref_fwd = model(**batch).logits
    ref_beam = model.generate(**batch, **GEN, num_beams=3)
    mmc.compress(model, method, keep=1.0)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(model(**batch).logits, ref_fwd)
    assert torch.equal(model.generate(**batch, **GEN, num_beams=3), ref_beam)
    assert mmc.report(model).tokens_in == mmc.report(model).tokens_out


@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
def test_keep_all_other_towers(tower):
    model = tiny_llava(tower)
    batch = llava_batch()
    ref_seq, ref_logits = _gen(model, batch)
    mmc.compress(model, "random", keep=1.0)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


def test_restore_disabled_and_apply_twice(llava):
    batch = llava_batch()
    ref_seq, ref_logits = _gen(llava, batch)
    mmc.compress(llava, "random", keep=4)
    pruned_seq, pruned_logits = _gen(llava, batch)
    with mmc.disabled(llava):
        seq, logits = _gen(llava, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.compress(llava, "random", keep=4)  # applying again replaces, does not stack
    seq, logits = _gen(llava, batch)
    assert torch.equal(seq, pruned_seq) and torch.equal(logits, pruned_logits)
    mmc.restore(llava)
    assert "forward" not in llava.__dict__ and "forward" not in llava.model.__dict__
    assert "get_image_features" not in llava.model.__dict__
    seq, logits = _gen(llava, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("kind", ["llava", "next"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cache_equals_recompute_after_pruning(kind, positions, llava, llava_next):
    model, batch = _model_and_batch(kind, llava, llava_next)
    mmc.compress(model, "random", keep=0.3, positions=positions)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    assert rep.tokens_out < rep.tokens_in and rep.kv_bytes > 0
    seq2, logits2 = _gen(model, batch, use_cache=False)
    assert torch.equal(seq, seq2)
    assert (logits - logits2).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_padded_row_equals_sample_alone(kind, llava, llava_next):
    model, batch = _model_and_batch(kind, llava, llava_next)
    mmc.compress(model, "divprune", keep=0.4)
    seq, logits = _gen(model, batch)
    L = batch["input_ids"].shape[1]
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row : row + 1, valid],
            "attention_mask": batch["attention_mask"][row : row + 1, valid],
            "pixel_values": batch["pixel_values"][row : row + 1],
        }
        if "image_sizes" in batch:
            alone["image_sizes"] = batch["image_sizes"][row : row + 1]
        s1, l1 = _gen(model, alone)
        assert torch.equal(s1[0, valid.sum() :], seq[row, L:])
        assert (l1[:, 0] - logits[:, row]).abs().max() < LOGIT_TOL


def test_different_k_per_image_and_multi_image_rows(llava):
    batch = llava_batch(images_per_row=(2, 1))
    mmc.compress(llava, "random", keep=0.5)
    seq, logits = _gen(llava, batch)
    assert mmc.report(llava).tokens_out == [8, 8, 8]
    seq2, logits2 = _gen(llava, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


def test_next_images_get_their_own_budget(llava_next):
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "random", keep=0.25)
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    assert rep.tokens_in == [70, 88]
    assert rep.tokens_out == [round(0.25 * 70), round(0.25 * 88)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=2),
    ],
)
def test_beams_and_sampling_after_pruning(kw, llava):
    batch = llava_batch()
    mmc.compress(llava, "divprune", keep=5)
    gen = {**GEN, **kw}
    torch.manual_seed(0)
    a = llava.generate(**batch, **gen)
    torch.manual_seed(0)
    b = llava.generate(**batch, **gen, use_cache=False)
    assert a.shape[0] == 2 * kw.get("num_return_sequences", 1)
    if not kw.get("do_sample"):
        assert torch.equal(a, b)


def test_forward_labels_are_shrunk(llava):
    batch = llava_batch()
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == IMG)] = -100
    ref = llava(**batch, labels=labels)
    mmc.compress(llava, "random", keep=1.0)
    assert torch.equal(llava(**batch, labels=labels).loss, ref.loss)
    mmc.compress(llava, "random", keep=4)
    out = llava(**batch, labels=labels)
    assert out.logits.shape[1] == 22 - 12 and out.labels.shape == out.logits.shape[:2]
    # text labels survive the shrink unchanged (only image slots, which are -100, were removed)
    assert torch.equal(
        torch.sort(out.labels[out.labels != -100]).values, torch.sort(labels[labels != -100]).values
    )


def test_static_cache_route_matches_dynamic(llava):
    batch = llava_batch()
    mmc.compress(llava, "random", keep=4)
    dyn = llava.generate(**batch, **GEN)
    prep = mmc.prepare_inputs(llava, **batch)
    static = llava.generate(**prep, **GEN, cache_implementation="static")
    assert torch.equal(static[:, prep["input_ids"].shape[1] :], dyn[:, batch["input_ids"].shape[1] :])


def test_text_only_prompt_after_image_prompt(llava):
    batch = llava_batch()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    ref = llava.generate(**text, **GEN)
    mmc.compress(llava, "random", keep=4)
    llava.generate(**batch, **GEN)
    assert torch.equal(llava.generate(**text, **GEN), ref)


def test_probe_method_end_to_end(llava):
    """A method that needs CLS attention gets exactly what an eager tower computes, with SDPA left on."""
    batch = llava_batch()
    mmc.compress(llava, ClsTopK(keep=4, layer=-2))
    llava.generate(**batch, **GEN)
    kept = mmc.report(llava).kept
    assert llava.model.vision_tower.config._attn_implementation == "sdpa"
    eager = tiny_llava(attn="eager")
    eager.load_state_dict(llava.state_dict())
    with torch.no_grad():
        att = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[-2]
    want = [a.mean(0)[0, 1:].topk(4).indices.sort().values.tolist() for a in att]
    assert kept == want


# -- bad input: clear errors, model left usable ---------------------------------------------------------
def test_unsupported_model_class():
    from tiny_models import text_config
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(text_config())
    with pytest.raises(TypeError, match="supported model families.*LLaVA-1.5"):
        mmc.compress(lm, "random", keep=4)
    assert "_mmcompress_handle" not in lm.__dict__ and "forward" not in lm.__dict__


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="nope"), ValueError, "unknown method 'nope'; known methods: .*divprune"),
        (dict(method="random", keep=0), ValueError, "keep=0"),
        (dict(method="random", keep=-3), ValueError, "keep=-3"),
        (dict(method="random", keep=1.5), ValueError, r"keep=1.5.*\(0, 1\]"),
        (dict(method="random", keep=float("nan")), ValueError, "keep=nan"),
        (dict(method="random", keep=True), TypeError, "keep must be"),
        (dict(method="random", keep=17), ValueError, "keep=17 exceeds the 16 visual tokens"),
        (dict(method="random", keep=4, positions="nope"), ValueError, "positions='nope'"),
        (dict(method="random", kep=4), TypeError, "kep"),
    ],
)
def test_bad_config_leaves_model_unpatched(kwargs, exc, match, llava):
    batch = llava_batch()
    ref = llava.generate(**batch, **GEN)
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        mmc.compress(llava, kwargs.pop("method"), **kwargs)
    assert mmc.report(llava) is None and "forward" not in llava.model.__dict__
    assert torch.equal(llava.generate(**batch, **GEN), ref)


def test_keep_larger_than_image_at_call_time_leaves_model_usable(llava_next):
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "random", keep=80)  # image 0 has 70 tokens
    with pytest.raises(ValueError, match="keep=80 exceeds the 70 visual tokens"):
        llava_next.generate(**batch, **GEN)
    mmc.compress(llava_next, "random", keep=60)
    llava_next.generate(**batch, **GEN)
    assert mmc.report(llava_next).tokens_out == [60, 60]


def test_images_without_placeholders_and_count_mismatch(llava):
    batch = llava_batch()
    mmc.compress(llava, "random", keep=4)
    no_ph = dict(batch, input_ids=torch.where(batch["input_ids"] == IMG, 5, batch["input_ids"]))
    with pytest.raises(ValueError, match="0 image placeholder tokens.*32 visual tokens"):
        llava(**no_ph)
    three = dict(batch, pixel_values=torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="32 image placeholder tokens.*48 visual tokens"):
        llava(**three)
    llava.generate(**batch, **GEN)  # still usable
    assert mmc.report(llava).tokens_out == [4, 4]


def test_nan_features_raise(llava):
    batch = llava_batch()
    mmc.compress(llava, "divprune", keep=4)
    bad = dict(batch, pixel_values=batch["pixel_values"].clone())
    bad["pixel_values"][1] = float("nan")
    with pytest.raises(ValueError, match="image 1: visual features contain NaN or inf"):
        llava(**bad)
    llava(**batch)


def test_anyres_only_method_on_single_view_model(llava):
    @dataclasses.dataclass(frozen=True)
    class AnyresOnly(PreLLMMethod):
        name: ClassVar[str] = "test-anyres-only"
        layouts: ClassVar[tuple[str, ...]] = ("anyres",)

    with pytest.raises(
        ValueError, match="needs a layout of kind anyres; LlavaForConditionalGeneration packs a single layout"
    ):
        mmc.compress(llava, AnyresOnly())
    assert mmc.report(llava) is None
