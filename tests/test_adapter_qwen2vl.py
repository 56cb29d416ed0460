"""The transformers Qwen2-VL / Qwen2.5-VL adapter on tiny random models (reference §2.5, §3.3, §4.2)."""

from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar

import pytest
import torch
from tiny_models import IMG, QWEN_VID, qwen_batch, tiny_qwen

import mmcompress as mmc
from mmcompress.adapters.hf_qwen2vl import probe_block
from mmcompress.config import PreLLMMethod
from mmcompress.signals import VitAttention
from mmcompress.tokens import Selection, VisualTokens

GEN = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMG, QWEN_VID])
LOGIT_TOL = 1e-5  # cache vs recomputation and padded vs alone: fp32 reduction-order noise (seen: <= 2e-7)
PROBE_TOL = 1e-5  # probe vs eager weights / logits: same products in another order (fp32)
KINDS = ["2", "2.5"]

IMAGES = ((("image", (1, 8, 8)),), (("image", (1, 8, 12)),))  # 16 and 24 visual tokens
MIXED = ((("image", (1, 8, 8)), ("video", (2, 8, 8))), (("video", (2, 4, 8)),))  # 16 | 32 | 16 tokens
MULTI = ((("image", (1, 8, 8)), ("image", (1, 4, 8))), (("image", (1, 8, 12)),))  # two images in row 0


@dataclasses.dataclass(frozen=True)
class Record(PreLLMMethod):
    """Test-only method: keeps everything and records what the adapter hands over. Not registered."""

    name: ClassVar[str] = "test-record"
    kinds: tuple = ("received",)
    layer: int = -1
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def needs(self) -> frozenset:
        return frozenset(VitAttention(self.layer, k) for k in self.kinds)

    def select(self, tokens: VisualTokens) -> Selection:
        self.seen.append(tokens)
        return Selection(indices=torch.arange(tokens.num_tokens, device=tokens.features.device))


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_qwen(kind) for kind in KINDS}


@pytest.fixture(autouse=True)
def _unpatched(models):
    yield
    for m in models.values():
        mmc.restore(m)


def _row(batch: dict, r: int) -> dict:
    """Sample ``r`` of a :func:`qwen_batch` batch on its own (no padding, its own pixels and grids)."""
    valid = batch["attention_mask"][r].bool()
    out = {k: batch[k][r : r + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ids = batch["input_ids"]
    for tok, pix, grid in (
        (IMG, "pixel_values", "image_grid_thw"),
        (QWEN_VID, "pixel_values_videos", "video_grid_thw"),
    ):
        if grid not in batch:
            continue
        tokens = (batch[grid].prod(-1) // 4).tolist()
        # items are consumed row by row: row r owns the items whose tokens fall in its placeholder count
        before, mine = int((ids[:r] == tok).sum()), int((ids[r] == tok).sum())
        cum = torch.tensor([0] + tokens).cumsum(0).tolist()
        items = [i for i in range(len(tokens)) if before <= cum[i] < before + mine]
        if not items:
            continue
        patches = [0] + batch[grid].prod(-1).cumsum(0).tolist()
        out[pix] = batch[pix][patches[items[0]] : patches[items[-1] + 1]]
        out[grid] = batch[grid][items[0] : items[-1] + 1]
    return out


# -- keep-all, restore, cache ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [IMAGES, MIXED], ids=["images", "image+video"])
def test_keep_all_equals_unpatched(kind, rows, models):
    model, batch = models[kind], qwen_batch(rows)
    ref_seq, ref_logits = _gen(model, batch)
    ref_fwd = model(**batch).logits
    ref_beam = model.generate(**batch, **GEN, num_beams=3)
    mmc.compress(model, "random", keep=1.0)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(model(**batch).logits, ref_fwd)
    assert torch.equal(model.generate(**batch, **GEN, num_beams=3), ref_beam)
    rep = mmc.report(model)
    assert rep.tokens_in == rep.tokens_out == ([16, 24] if rows is IMAGES else [16, 32, 16])


@pytest.mark.parametrize("kind", KINDS)
def test_restore_disabled_and_apply_twice(kind, models):
    model, batch = models[kind], qwen_batch(MIXED)
    ref_seq, ref_logits = _gen(model, batch)
    mmc.compress(model, "random", keep=5)
    pruned_seq, pruned_logits = _gen(model, batch)
    assert mmc.report(model).tokens_out == [5, 5, 5]
    with mmc.disabled(model):
        seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.compress(model, "random", keep=5)  # applying again replaces, does not stack
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, pruned_seq) and torch.equal(logits, pruned_logits)
    mmc.restore(model)
    assert "forward" not in model.__dict__ and "_prepare_position_ids_for_generation" not in model.__dict__
    for attr in ("forward", "get_image_features", "get_video_features"):
        assert attr not in model.model.__dict__
    assert not model.model.visual.blocks[-1].attn._forward_pre_hooks
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [IMAGES, MIXED, MULTI], ids=["images", "image+video", "two-images-in-a-row"])
def test_cache_equals_recompute_after_pruning(kind, rows, models):
    model, batch = models[kind], qwen_batch(rows)
    mmc.compress(model, "divprune", keep=0.3)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    n = {IMAGES: [16, 24], MIXED: [16, 32, 16], MULTI: [16, 8, 24]}[rows]
    assert rep.tokens_in == n
    assert rep.tokens_out == [round(0.3 * x) for x in n]  # a different K per image, one budget per video
    assert rep.prompt_len_out < rep.prompt_len_in and rep.kv_bytes > 0
    seq2, logits2 = _gen(model, batch, use_cache=False)
    assert torch.equal(seq, seq2)
    assert (logits - logits2).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_padded_rows_equal_samples_alone(kind, models):
    model, batch = models[kind], qwen_batch(MIXED)
    assert (batch["attention_mask"] == 0).any()  # row 1 is left-padded
    mmc.compress(model, "divprune", keep=0.4)
    seq, logits = _gen(model, batch)
    L = batch["input_ids"].shape[1]
    for r in range(2):
        alone = _row(batch, r)
        s1, l1 = _gen(model, alone)
        assert torch.equal(s1[0, alone["input_ids"].shape[1] :], seq[r, L:])
        assert (l1[:, 0] - logits[:, r]).abs().max() < LOGIT_TOL


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=3),
        dict(num_beams=2, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=2),
    ],
)
def test_beams_and_sampling_after_pruning(kw, models):
    model, batch = models["2.5"], qwen_batch(MIXED)
    mmc.compress(model, "divprune", keep=5)
    gen = {**GEN, **kw}
    torch.manual_seed(0)
    a = model.generate(**batch, **gen)
    torch.manual_seed(0)
    b = model.generate(**batch, **gen, use_cache=False)
    assert a.shape[0] == 2 * kw.get("num_return_sequences", 1)
    assert mmc.report(model).tokens_out == [5, 5, 5]
    if not kw.get("do_sample"):
        assert torch.equal(a, b)


# -- positions -------------------------------------------------------------------------------------------
def _capture_lm_positions(model):
    seen = []

    def pre(mod, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:  # prefill only
            seen.append(kwargs["position_ids"])

    return seen, model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)


def _expected_row(items, n_pre: int, n_suf: int, kept, interval: int) -> tuple[list, list]:
    """M-RoPE ``[t, h, w]`` and text-row positions of one shortened :func:`qwen_batch` row, from the prompt
    structure alone: text advances by 1; kept token ``i`` of a block starting at ``p`` sits at
    ``(p + frame * interval, p + i // cols, p + i % cols)`` (raster index inside its frame); the text after
    a block continues at ``p + max(rows, cols)``. The text row is the token's index in the unpruned row."""
    segments = [("text", 1 + n_pre)]  # bos + prefix
    for modality, grid in items:
        segments += [("text", 1), (modality, grid), ("text", 2)]  # vision_start, block, vision_end + sep
    segments.append(("text", n_suf))
    mrope, text = [], []
    p = q = 0
    for what, arg in segments:
        if what == "text":
            mrope += [[p + i] * 3 for i in range(arg)]
            text += range(q, q + arg)
            p, q = p + arg, q + arg
            continue
        t, h, w = arg
        rows, cols = h // 2, w // 2
        step = interval if what == "video" else 1
        for i in next(kept):
            f, cell = divmod(i, rows * cols)
            mrope.append([p + f * step, p + cell // cols, p + cell % cols])
            text.append(q + i)
        p, q = p + max(rows, cols), q + t * rows * cols
    return mrope, text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["generate", "forward"])
def test_kept_tokens_keep_their_original_mrope_positions(kind, path, models):
    """The LLM sees each kept token at its unpruned 3-D M-RoPE position (reference §2.5) and, from
    generate(), the kept tokens' own text positions in row 0; rows are re-left-padded with zeros."""
    model, batch = models[kind], qwen_batch(MIXED)
    interval = getattr(model.config.vision_config, "tokens_per_second", 1)  # 2.5: x 1 s per grid (default)
    mmc.compress(model, "random", keep=0.4, seed=3)
    seen = []

    def pre(mod, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] > 1:  # prefill
            seen.append(kwargs["position_ids"])

    h = model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model.generate(**batch, **GEN) if path == "generate" else model(**batch)
    finally:
        h.remove()
    pos = seen[0]
    assert pos.shape[0] == (4 if path == "generate" else 3)
    kept = iter(mmc.report(model).kept)
    for r, (items, n_pre, n_suf) in enumerate(zip(MIXED, (2, 1), (2, 3))):
        mrope, text = _expected_row(items, n_pre, n_suf, kept, interval)
        n = len(mrope)
        assert pos[-3:, r, -n:].T.tolist() == mrope
        assert (pos[:, r, :-n] == 0).all()
        if path == "generate":
            assert pos[0, r, -n:].tolist() == text


@pytest.mark.parametrize("kind", KINDS)
def test_prepared_inputs_are_consistent(kind, models):
    """The static-cache route's shortened prompt: placeholders, ``mm_token_type_ids`` and the feature
    counts agree, and greedy decoding from it with a static cache matches the dynamic path."""
    model, batch = models[kind], qwen_batch(MIXED)
    mmc.compress(model, "random", keep=0.4)
    dyn = model.generate(**batch, **GEN)
    prep = mmc.prepare_inputs(model, **batch)
    ids, tt = prep["input_ids"], prep["mm_token_type_ids"]
    assert torch.equal(tt == 1, ids == IMG) and torch.equal(tt == 2, ids == QWEN_VID)
    kept = mmc.report(model).tokens_out
    assert int((ids == IMG).sum()) == kept[0] and int((ids == QWEN_VID).sum()) == kept[1] + kept[2]
    assert prep["position_ids"].shape == (4, *ids.shape)
    static = model.generate(**prep, **GEN, cache_implementation="static")
    assert torch.equal(static[:, ids.shape[1] :], dyn[:, batch["input_ids"].shape[1] :])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_decode_loop_without_positions(kind, models):
    """A hand-written decode loop (plain forward, cache, no mask, no position_ids) continues the unpruned
    prompt's positions and reproduces generate()."""
    model = models[kind]
    one = qwen_batch(((("image", (1, 8, 12)),),), prefixes=([5, 6],), suffixes=([7, 8],))
    mmc.compress(model, "divprune", keep=7)
    seq, logits = _gen(model, one)
    out = model(**one, use_cache=True)
    steps = [out.logits[:, -1]]
    for _ in range(GEN["max_new_tokens"] - 1):
        nxt = steps[-1].clone()
        nxt[:, [IMG, QWEN_VID]] = -float("inf")
        out = model(
            input_ids=nxt.argmax(-1, keepdim=True), past_key_values=out.past_key_values, use_cache=True
        )
        steps.append(out.logits[:, -1])
    assert (torch.stack(steps) - logits).abs().max() < LOGIT_TOL


def test_forward_labels_are_shrunk(models):
    model, batch = models["2"], qwen_batch(IMAGES)
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == IMG)] = -100
    ref = model(**batch, labels=labels)
    mmc.compress(model, "random", keep=1.0)
    assert torch.equal(model(**batch, labels=labels).loss, ref.loss)
    mmc.compress(model, "random", keep=4)
    out = model(**batch, labels=labels)
    # the longest row (24 placeholders) sets the shortened width: it loses 20
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - 20
    assert out.labels.shape == out.logits.shape[:2]
    assert torch.equal(
        torch.sort(out.labels[out.labels != -100]).values, torch.sort(labels[labels != -100]).values
    )


def test_text_only_prompt_after_image_prompt(models):
    model = models["2.5"]
    text = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    ref = model.generate(**text, **GEN)
    mmc.compress(model, "random", keep=4)
    model.generate(**qwen_batch(MIXED), **GEN)
    assert torch.equal(model.generate(**text, **GEN), ref)


# -- methods and probes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "method, kw",
    [
        ("divprune", dict(keep=0.25)),
        ("random", dict(keep=6)),
        ("pool", dict(keep=0.25)),
        ("fopru", dict(keep=0.25, significance="logits")),  # default layer=-2
        ("fopru", dict(keep=0.25, strategy="row", layer=0)),  # default: received attention
        ("aim_merge", dict(keep=0.5)),
    ],
)
def test_methods_end_to_end(kind, method, kw, models):
    model, batch = models[kind], qwen_batch(MIXED)
    mmc.compress(model, method, **kw)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    assert rep.tokens_in == [16, 32, 16]
    assert all(0 < b < a for a, b in zip(rep.tokens_in, rep.tokens_out))
    assert [v.name for v in rep.images[1].layout.views] == ["frame0", "frame1"]
    seq2, logits2 = _gen(model, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


def test_probe_blocks_are_full_attention(models):
    q2, q25 = models["2"].model.visual, models["2.5"].model.visual
    every_block_is_full = [0, 1, 0, 1]  # Qwen2-VL: no windows
    assert [probe_block(q2, layer) for layer in (-2, -1, 0, 1)] == every_block_is_full
    # Qwen2.5 tiny: fullatt_block_indexes=[1, 3]; windowed 0 -> 1, windowed 2 -> 1 or 3: the later one
    assert [probe_block(q25, layer) for layer in (0, 1, 2, 3, -2, -1)] == [1, 1, 3, 3, 3, 3]
    handle = mmc.compress(models["2.5"], "fopru", keep=0.25)  # layer=-2 (block 2) is windowed
    assert handle.adapter.probe_blocks == {VitAttention(-2, "received"): 3}
    handle = mmc.compress(models["2.5"], "fopru", keep=0.25, significance="logits")
    assert handle.adapter.probe_blocks == {
        VitAttention(-2, "received_logits"): 3,
        VitAttention(-2, "given_logits"): 3,
    }


def _eager_reference(model, batch, block):
    """Independent reference for one block: the eager attention weights and the q/k the model itself
    hands to its attention function, recorded per segment, plus the window permutation read off the
    tower's own tensors (patch embeddings vs the first block's input)."""
    mod = sys.modules[type(model.model.visual).__module__]
    base_eager = mod.eager_attention_forward
    target = model.model.visual.blocks[block].attn
    rec, emb, first = [], [], []

    def recording(module, query, key, value, attention_mask, **kw):
        out, w = base_eager(module, query, key, value, attention_mask, **kw)
        if module is target:
            rec.append((w, query, key))
        return out, w

    visual = model.model.visual
    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, a, o: emb.append(o)),
        visual.blocks[0].register_forward_pre_hook(lambda m, a: first.append(a[0])),
    ]
    prev = visual.config._attn_implementation
    mod.eager_attention_forward = recording
    try:
        model.set_attn_implementation({"vision_config": "eager"})
        with torch.no_grad(), mmc.disabled(model):
            for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
                fn = (
                    model.model.get_image_features
                    if pix == "pixel_values"
                    else model.model.get_video_features
                )
                fn(batch[pix], batch[grid])
    finally:
        mod.eager_attention_forward = base_eager
        model.set_attn_implementation({"vision_config": prev})
        for h in hooks:
            h.remove()
    return rec, emb, first


@pytest.mark.parametrize("kind", KINDS)
def test_probe_matches_eager_attention(kind, models):
    """Signals equal the eager weights / logits of the chosen full-attention block, reduced per 2x2 merge
    unit and put back in the features' (raster) order, frame by frame; SDPA stays on."""
    model, batch = models[kind], qwen_batch(MIXED)
    rec_method = Record(kinds=("received", "received_logits", "given_logits"), layer=-1)
    mmc.compress(model, rec_method)
    assert model.model.visual.config._attn_implementation == "sdpa"
    model.generate(**batch, **GEN)
    got = rec_method.seen  # image, then the two videos
    assert [t.signals[VitAttention(-1, "received")].shape for t in got] == [(1, 4, 16), (2, 4, 16), (2, 4, 8)]
    rec, emb, first = _eager_reference(model, batch, block=len(model.model.visual.blocks) - 1)
    assert model.model.visual.config._attn_implementation == "sdpa"
    # per call (image call, video call): segments are frames; tokens in block order
    segs = iter(rec)
    frames_per_call = [[t.signals for t in got[:1]], [t.signals for t in got[1:]]]  # MIXED: 1 image, 2 videos
    for call, (signals, e, f) in enumerate(zip(frames_per_call, emb, first)):
        # block order -> raster: row j of the block input is row perm[j] of the patch embeddings
        perm = torch.cdist(f, e).argmin(dim=1)
        assert torch.equal(torch.sort(perm).values, torch.arange(len(perm)))
        unit_raster = perm.view(-1, 4)[:, 0] // 4  # raster merge unit of each block-order unit
        assert torch.equal(perm.view(-1, 4) // 4, unit_raster[:, None].expand(-1, 4))  # units stay whole
        want = {}
        n_frames = sum(s[VitAttention(-1, "received")].shape[0] for s in signals)
        per_kind = {"received": [], "received_logits": [], "given_logits": []}
        for _ in range(n_frames):
            w, q, k = next(segs)
            logits = (q.float() @ k.float().transpose(-1, -2))[0] * (q.shape[-1] ** -0.5)  # [H, n, n]
            per_kind["received"].append(w[0].mean(1))
            per_kind["received_logits"].append(logits.mean(1))
            per_kind["given_logits"].append(logits.mean(2))
        for name, vals in per_kind.items():
            v = torch.cat(vals, dim=1)  # [H, S] block order
            v = v.view(v.shape[0], -1, 4).mean(-1)
            raster = torch.empty_like(v)
            raster[:, unit_raster] = v
            want[name] = raster
        start = 0
        for s in signals:
            for name in per_kind:
                sig = s[VitAttention(-1, name)]  # [frames, H, n]
                n = sig.shape[0] * sig.shape[2]
                expect = want[name][:, start : start + n].view(4, sig.shape[0], -1).transpose(0, 1)
                assert (sig - expect).abs().max() < PROBE_TOL, (call, name)
            start += (
                s[VitAttention(-1, "received")][0].numel() // 4 * s[VitAttention(-1, "received")].shape[0]
            )
    assert next(segs, None) is None  # every recorded segment (frame) was compared
    if kind == "2.5":  # the window permutation is not the identity here, so the un-permutation was tested
        assert not torch.equal(torch.cdist(first[0], emb[0]).argmin(1), torch.arange(emb[0].shape[0]))


# -- bad input: clear errors, model left usable ----------------------------------------------------------
def test_unsupported_model_class(models):
    inner = models["2"].model  # the inner Qwen2VLModel: no generate, not a supported entry point
    with pytest.raises(TypeError, match=r"supported model families.*Qwen2-VL.*Qwen2.5-VL"):
        mmc.compress(inner, "random", keep=4)
    assert "_mmcompress_handle" not in inner.__dict__ and "forward" not in inner.__dict__


@pytest.mark.parametrize(
    "method, kw, match",
    [
        ("hired", dict(), r"method 'hired' needs VitAttention\(.*kind='cls'\).*no CLS token"),
        (
            "globalcom2",
            dict(),
            r"method 'globalcom2' needs VitAttention\(.*kind='cls_logits'\).*no CLS token",
        ),
        ("random", dict(keep=4, positions="compact"), "positions='compact' is not supported"),
        ("fopru", dict(layer=4), "vision layer 4 is out of range: the Qwen vision tower has 4 blocks"),
    ],
)
def test_unsupported_method_leaves_model_unpatched(method, kw, match, models):
    model, batch = models["2.5"], qwen_batch(IMAGES)
    ref = model.generate(**batch, **GEN)
    with pytest.raises(ValueError, match=match):
        mmc.compress(model, method, **kw)
    assert mmc.report(model) is None and "forward" not in model.model.__dict__
    assert torch.equal(model.generate(**batch, **GEN), ref)


def _bad_inputs():
    b = qwen_batch(IMAGES)
    yield (
        "pixels",
        dict(b, pixel_values=b["pixel_values"][:-16]),
        r"describes 160 patches but pixel_values has 144",
    )
    yield (
        "order",
        dict(b, image_grid_thw=b["image_grid_thw"].flip(0)),
        r"placeholder runs have lengths \[16, 24\]",
    )
    yield (
        "count",
        dict(b, image_grid_thw=torch.tensor([[1, 8, 8], [1, 8, 8]]), pixel_values=b["pixel_values"][:128]),
        ("the prompt has 40 image placeholder tokens .* gives 32 visual tokens"),
    )
    yield (
        "odd",
        dict(b, image_grid_thw=torch.tensor([[1, 8, 8], [1, 5, 19]]), pixel_values=b["pixel_values"][:159]),
        ("multiples of the spatial merge size 2"),
    )
    tt = b["mm_token_type_ids"].clone()
    tt[0, -1] = 1
    yield "types", dict(b, mm_token_type_ids=tt), "mm_token_type_ids marks 41 tokens as image"
    yield (
        "no-types",
        {k: v for k, v in b.items() if k != "mm_token_type_ids"},
        "mm_token_type_ids is required",
    )


@pytest.mark.parametrize("case, bad, match", list(_bad_inputs()), ids=[c for c, _, _ in _bad_inputs()])
@pytest.mark.parametrize("path", ["generate", "forward"])
def test_bad_input_raises_and_model_stays_usable(case, bad, match, path, models):
    model = models["2.5"]
    good = qwen_batch(IMAGES)
    mmc.compress(model, "divprune", keep=5)
    with pytest.raises(ValueError, match=match):
        model.generate(**bad, **GEN) if path == "generate" else model(**bad)
    model.generate(**good, **GEN)
    assert mmc.report(model).tokens_out == [5, 5]


def test_precomputed_features_without_grid(models):
    model, batch = models["2"], qwen_batch(IMAGES)
    with torch.no_grad():
        enc = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    mmc.compress(model, "random", keep=4)  # the features above were encoded before: no selection for them
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    with pytest.raises(ValueError, match="precomputed Qwen-VL image features carry no grid"):
        model.generate(**inputs, mm_encoder_outputs={"image": enc}, **GEN)
    model.generate(**batch, **GEN)
    assert mmc.report(model).tokens_out == [4, 4]
