"""Videos through the LLaVA adapter: LLaVA-NeXT-Video (AnyRes images and pooled videos) and LLaVA-OneVision
videos, on tiny random models (issue 7; reference §2.3-2.4).

A video is one item laid out one ``"frame<i>"`` view per frame (NeXT-Video: 4x4 tokens per frame after the
2x2 resampler; OneVision: 2x2 after bilinear pooling, then one trailing ``"newline"``); ``keep`` counts the
whole video as one image. Signals are per frame, pooled like the features.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    IMG,
    NV_VID,
    left_padded,
    next_batch,
    tiny_next,
    tiny_next_video,
    tiny_onevision,
    video_batch,
)

import mmcompress as mmc
from mmcompress import registry, support
from mmcompress.config import PreLLMMethod
from mmcompress.signals import VitAttention
from mmcompress.tokens import Selection, VisualTokens

GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, suppress_tokens=[IMG, NV_VID])
LOGIT_TOL = 1e-5  # cache vs recomputation and padded vs alone: fp32 reduction-order noise
ORACLE_TOL = 1e-5  # features / signals vs the same ops run by hand or by an eager tower (fp32)
KINDS = ["next-video", "onevision"]
FAMILY = {"next-video": "llava-next-video", "onevision": "llava-onevision"}

VIDEOS = ((("video", None),), (("video", None),))  # one 3-frame video per row
MIXED = ((("image", (40, 60)), ("video", None)), (("video", None),))  # image + video | video (left-padded)
#: NeXT-Video: 3 frames x 4x4; OneVision: 3 frames x 2x2 + 1 newline
VIDEO_TOKENS = {"next-video": 48, "onevision": 13}
GRID = {"next-video": (4, 4, False), "onevision": (2, 2, True)}
#: pre-LLM methods whose layouts are single grids or thumbnail + crops only: they refuse frame layouts
IMAGE_ONLY = ("globalcom2", "hired")


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _unpatched(model) -> bool:
    inner = ("forward", "get_image_features", "get_video_features")
    return not any(k in model.model.__dict__ for k in inner) and not any(
        k in model.__dict__ for k in ("forward", "_mmcompress_handle")
    )


@pytest.fixture(scope="module")
def models():
    return {"next-video": tiny_next_video(), "onevision": tiny_onevision()}


_BATCHES: dict = {}


def batch_of(models, kind, rows):
    key = (kind, rows)
    if key not in _BATCHES:
        _BATCHES[key] = video_batch(models[kind], rows=rows)
    return _BATCHES[key]


@pytest.fixture(autouse=True)
def _restore(models):
    yield
    for m in models.values():
        mmc.restore(m)


@dataclasses.dataclass(frozen=True)
class Spy(PreLLMMethod):
    """Test-only: records every item it is handed and keeps every token. Not registered."""

    name: ClassVar[str] = "test-video-spy"
    signals: tuple = ()
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def needs(self) -> frozenset:
        return frozenset(self.signals)

    def select(self, tokens: VisualTokens) -> Selection:
        self.seen.append(tokens)
        return Selection(indices=torch.arange(tokens.num_tokens, device=tokens.features.device))


# -- layout and signals --------------------------------------------------------------------------------
#: case -> (family kind, frame size in px, patch grid side h, pooled side, pool mode); the "odd" cases
#: have an odd patch grid, where NeXT-Video's pooling floors (9 -> 4) and OneVision's rounds up (5 -> 3)
CASES = {
    "next-video": ("next-video", 32, 8, 4, "average"),
    "next-video-max": ("next-video", 32, 8, 4, "max"),
    "next-video-odd": ("next-video", 36, 9, 4, "average"),
    "onevision": ("onevision", 32, 4, 2, "bilinear"),
    "onevision-odd": ("onevision", 40, 5, 3, "bilinear"),
}


def _case_models(case: str, models) -> tuple:
    """(sdpa model, eager twin with the same weights) of a CASES entry."""
    kind, size, _, _, mode = CASES[case]
    if case in models:
        model = models[case]
    else:
        model = tiny_onevision() if kind == "onevision" else tiny_next_video(pool_mode=mode)
        if size != 32:  # the same tiny model at another frame size (the weights do not depend on it)
            cfg = model.config
            cfg.vision_config.image_size = size
            model = type(model)._from_config(cfg, attn_implementation="sdpa").eval()
    cfg = model.config
    eager = type(model)._from_config(cfg, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _pool(case: str, m: torch.Tensor) -> torch.Tensor:
    """``[frames, C, h*h]`` -> ``[frames, C, side*side]`` the way the model pools its frames."""
    _, _, h, side, mode = CASES[case]
    g = m.reshape(m.shape[0], m.shape[1], h, h)
    if mode == "bilinear":
        out = F.interpolate(g, size=[side, side], mode="bilinear")
    else:
        out = (F.max_pool2d if mode == "max" else F.avg_pool2d)(g, 2)
    return out.flatten(2)


@pytest.mark.parametrize("case", list(CASES))
def test_layout_is_the_models_packing(case, models):
    """Frame f's view holds exactly the pooled, projected patches of frame f (pooling redone by hand);
    OneVision's last token is its image_newline, laid out as a 1x1 "newline" view."""
    kind, size, h, side, _ = CASES[case]
    model, _ = _case_models(case, models)
    pv = torch.randn(2, 3, 3, size, size, generator=torch.Generator().manual_seed(3))
    spy = Spy()
    mmc.compress(model, spy)
    with torch.no_grad():
        feats = model.model.get_video_features(pixel_values_videos=pv).pooler_output
        hs = model.model.vision_tower(pv.flatten(0, 1), output_hidden_states=True).hidden_states
        if kind == "next-video":  # CLS dropped, patches pooled (resampler), then the projector
            x = _pool(case, hs[-2][:, 1:].transpose(1, 2)).transpose(1, 2)
            want = model.model.multi_modal_projector(x)
        else:  # the projector on the patches, then bilinear to ceil(h/2)
            want = _pool(case, model.model.multi_modal_projector(hs[-1]).transpose(1, 2)).transpose(1, 2)
    newline = kind == "onevision"
    n = 3 * side * side + int(newline)
    assert isinstance(feats, torch.Tensor) and feats.shape[:2] == (2, n)
    want = want.reshape(2, 3, side * side, -1)
    assert [t.image_index for t in spy.seen] == [0, 1]
    for v, tokens in enumerate(spy.seen):
        lay = tokens.layout
        names = ["frame0", "frame1", "frame2"] + (["newline"] if newline else [])
        assert [x.name for x in lay.views] == names
        assert lay.num_tokens == n and torch.equal(tokens.features, feats[v])
        for f in range(3):
            frame = lay.view(f"frame{f}")
            assert (frame.rows, frame.cols, frame.newline) == (side, side, False)
            got = tokens.features[frame.grid_indices().flatten()]
            torch.testing.assert_close(got, want[v, f], rtol=0, atol=ORACLE_TOL)
        if newline:
            assert lay.view("newline").start == n - 1
            assert torch.equal(tokens.features[-1], model.model.image_newline)
    assert mmc.report(model).tokens_in == [n, n]
    mmc.restore(model)


@pytest.mark.parametrize("case", list(CASES))
def test_signals_are_pooled_like_the_features(case, models):
    """Each frame's signal = the eager tower's attention of that frame (the oracle), the CLS column kept
    first (CLIP), the patch map pooled exactly like the features: avg / max over NeXT-Video's resampler
    windows, bilinear to ceil(h/2) for OneVision (on the 4x4 grid bilinear equals a 2x2 mean; the odd
    grids tell them apart)."""
    kind, size, h, side, _ = CASES[case]
    model, eager = _case_models(case, models)
    sigs = [VitAttention(-1, "received"), VitAttention(0, "received_logits")]
    if kind == "next-video":
        sigs.append(VitAttention(-2, "cls"))
    pv = torch.randn(2, 3, 3, size, size, generator=torch.Generator().manual_seed(4))
    spy = Spy(signals=tuple(sigs))
    mmc.compress(model, spy)
    with torch.no_grad():
        model.model.get_video_features(pixel_values_videos=pv)
        out = eager.model.vision_tower(pv.flatten(0, 1), output_attentions=True, output_hidden_states=True)
        # received_logits: column means over the patch queries of layer 0's pre-softmax logits
        layer = eager.model.vision_tower.encoder.layers[0]
        x = layer.layer_norm1(out.hidden_states[0])
        q = layer.self_attn.q_proj(x).view(6, x.shape[1], 4, 8).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(6, x.shape[1], 4, 8).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * layer.self_attn.scale
    prefix = 1 if kind == "next-video" else 0
    oracle = {
        "received": out.attentions[-1].mean(dim=2),  # [6 frames, heads, T]: mean over all queries
        "cls": out.attentions[-2][:, :, 0],  # the CLS query row
        "received_logits": logits[:, :, prefix:].mean(dim=2),
    }
    mmc.restore(model)
    for sig in sigs:
        full = oracle[sig.kind]
        want = torch.cat([full[:, :, :prefix], _pool(case, full[:, :, prefix:])], dim=-1)
        want = want.view(2, 3, 4, prefix + side * side)
        for v, tokens in enumerate(spy.seen):
            torch.testing.assert_close(tokens.signals[sig], want[v], rtol=0, atol=ORACLE_TOL)


# -- end to end ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["random", "divprune", "fopru"])
def test_keep_all_equals_unpatched(method, kind, models):
    """Image + video prompt, batch 2 with left padding: keep-all is bit-identical (tokens and logits,
    generate and forward)."""
    model, batch = models[kind], batch_of(models, kind, MIXED)
    ref_seq, ref_logits = _gen(model, batch)
    with torch.no_grad():
        ref_fwd = model(**batch).logits
    mmc.compress(model, method, keep=1.0)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref_fwd)
    rep = mmc.report(model)
    assert rep.tokens_in[1:] == [VIDEO_TOKENS[kind]] * 2  # the image, then the two videos
    assert rep.tokens_out == rep.tokens_in


@pytest.mark.parametrize("kind", KINDS)
def test_beams_find_the_restacked_videos(kind, models):
    """generate() re-stacks the video tensor for beams: the selections are found by content."""
    model, batch = models[kind], batch_of(models, kind, VIDEOS)
    ref = model.generate(**batch, **GEN, num_beams=2)
    mmc.compress(model, "random", keep=1.0)
    assert torch.equal(model.generate(**batch, **GEN, num_beams=2), ref)
    mmc.compress(model, "divprune", keep=0.5)
    out = model.generate(**batch, **GEN, num_beams=2, num_return_sequences=2)
    assert out.shape == (4, batch["input_ids"].shape[1] + GEN["max_new_tokens"])
    assert mmc.report(model).tokens_out == [round(0.5 * VIDEO_TOKENS[kind])] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_restore_is_bit_identical(kind, models):
    model, batch = models[kind], batch_of(models, kind, MIXED)
    ref_seq, ref_logits = _gen(model, batch)
    mmc.compress(model, "divprune", keep=0.3)
    seq, _ = _gen(model, batch)
    assert mmc.report(model).prompt_len_out < mmc.report(model).prompt_len_in
    with mmc.disabled(model):
        seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.restore(model)
    assert _unpatched(model)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cache_equals_recompute_after_pruning(positions, kind, models):
    model, batch = models[kind], batch_of(models, kind, MIXED)
    mmc.compress(model, "fopru", keep=0.4, positions=positions)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    assert rep.prompt_len_out < rep.prompt_len_in and rep.kv_bytes > 0
    assert all(o < i for i, o in zip(rep.tokens_in, rep.tokens_out))
    seq2, logits2 = _gen(model, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_sample_alone(kind, models):
    """Row 0: image + video, row 1: video (left-padded). Each row alone keeps the same tokens and
    generates the same continuation."""
    model, batch = models[kind], batch_of(models, kind, MIXED)
    assert (batch["attention_mask"] == 0).any()
    mmc.compress(model, "divprune", keep=0.4)
    seq, logits = _gen(model, batch)
    kept = mmc.report(model).kept  # [image of row 0, video of row 0, video of row 1]
    assert [len(k) for k in kept[1:]] == [round(0.4 * VIDEO_TOKENS[kind])] * 2
    L = batch["input_ids"].shape[1]
    for row, want in ((0, kept[:2]), (1, kept[2:])):
        valid = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row : row + 1, valid],
            "attention_mask": batch["attention_mask"][row : row + 1, valid],
            "pixel_values_videos": batch["pixel_values_videos"][row : row + 1],
        }
        if row == 0:  # the batch's only image is row 0's
            alone |= {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]}
        s1, l1 = _gen(model, alone)
        assert mmc.report(model).kept == want
        assert torch.equal(s1[0, int(valid.sum()) :], seq[row, L:])
        assert (l1[:, 0] - logits[:, row]).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_report_lists_images_then_videos(kind, models):
    model, batch = models[kind], batch_of(models, kind, MIXED)
    mmc.compress(model, "pool", keep=0.5)
    _gen(model, batch)
    rep = mmc.report(model)
    names = [[v.name for v in im.layout.views] for im in rep.images]
    frames = ["frame0", "frame1", "frame2"] + (["newline"] if GRID[kind][2] else [])
    assert names == [["base", "crops"], frames, frames]
    n_ids = int((batch["input_ids"] == NV_VID).sum())
    assert sum(rep.tokens_in[1:]) == n_ids  # every video placeholder is accounted for
    # row 0 (image + video) is the longest row before and after: it lost its image's and video's drops
    dropped = [i - o for i, o in zip(rep.tokens_in, rep.tokens_out)]
    assert rep.prompt_len_in - rep.prompt_len_out == dropped[0] + dropped[1]
    # forward() reports the same call
    with torch.no_grad():
        model(**batch)
    assert mmc.report(model).tokens_in == rep.tokens_in


PRE_LLM = [n for n in registry.names() if registry.get(n).stage == "pre_llm"]


def test_the_method_lists_cover_the_registry():
    assert sorted(PRE_LLM) == ["aim_merge", "divprune", "fopru", "globalcom2", "hired", "pool", "random"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", PRE_LLM)
def test_every_pre_llm_method_on_video(method, kind, models):
    """Every pre-LLM method that the support matrix marks for the family runs end to end on videos and
    acts, except the thumbnail + crops methods, which refuse videos clearly and keep compressing images;
    a method n/a for the family is refused before anything is patched."""
    model, batch = models[kind], batch_of(models, kind, VIDEOS)
    if support.cell(method, FAMILY[kind])[0] != support.SUPPORTED:
        with pytest.raises(ValueError, match="no CLS token"):
            mmc.compress(model, method)
        assert _unpatched(model)
        return
    handle = mmc.compress(model, method)
    if method in IMAGE_ONLY:
        with pytest.raises(ValueError, match=r"cannot compress the video\(s\) of this call.*'frame0'"):
            model.generate(**batch, **GEN)
        images = video_batch(model, rows=((("image", (40, 60)),), (("image", (64, 64)),)))
        model.generate(**images, **GEN)  # the same handle still compresses images
        rep = mmc.report(model)
        assert len(rep.images) == 2 and sum(rep.tokens_out) < sum(rep.tokens_in)
        return
    out = model.generate(**batch, **GEN, return_dict_in_generate=True)
    rep = handle.last_report
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + GEN["max_new_tokens"]
    assert rep.tokens_in == [VIDEO_TOKENS[kind]] * 2
    assert all(o < i for i, o in zip(rep.tokens_in, rep.tokens_out)), rep
    assert rep.prompt_len_out < rep.prompt_len_in
    for im in rep.images:  # kept indices are packed indices of this video
        assert im.kept == sorted(im.kept) and im.kept[0] >= 0 and im.kept[-1] < VIDEO_TOKENS[kind]


@pytest.mark.parametrize("method", ["aim", "zipvl"])
def test_in_llm_methods_on_video(method, models):
    """The in-LLM methods see video placeholders as visual tokens (video_token_id) and run end to end."""
    model, batch = models["next-video"], batch_of(models, "next-video", VIDEOS)
    handle = mmc.compress(model, method)
    out = model.generate(**batch, **GEN, return_dict_in_generate=True)
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + GEN["max_new_tokens"]
    stats = handle.inllm_patch.stats
    if method == "aim":
        assert sum(stats["layer_visual"][-1]) < sum(stats["layer_visual"][0]), stats
    else:
        assert stats["important"], stats


def test_static_cache_route_matches_dynamic(models):
    model, batch = models["next-video"], batch_of(models, "next-video", MIXED)
    mmc.compress(model, "random", keep=0.5)
    dyn = model.generate(**batch, **GEN)
    prep = mmc.prepare_inputs(model, **batch)
    assert set(prep["mm_encoder_outputs"]) == {"image", "video"}
    static = model.generate(**prep, **GEN, cache_implementation="static")
    assert torch.equal(static[:, prep["input_ids"].shape[1] :], dyn[:, batch["input_ids"].shape[1] :])


@pytest.mark.parametrize("kind", KINDS)
def test_precomputed_video_features(kind, models):
    """Video features encoded outside the adapter (mm_encoder_outputs) are laid out from their count:
    fine for methods without vision signals, a clear error for methods that need them."""
    model, batch = models[kind], batch_of(models, kind, VIDEOS)
    with torch.no_grad():
        enc = type(model.model).get_video_features(
            model.model, pixel_values_videos=batch["pixel_values_videos"], return_dict=True
        )
    pre = {k: v for k, v in batch.items() if k != "pixel_values_videos"}
    mmc.compress(model, "random", keep=0.5)
    want = model.generate(**batch, **GEN)
    kept = mmc.report(model).kept
    mmc.compress(model, "random", keep=0.5)  # a fresh adapter: nothing remembered from pixel encodes
    assert torch.equal(model.generate(**pre, mm_encoder_outputs={"video": enc}, **GEN), want)
    assert mmc.report(model).kept == kept[-1:]  # the last video selected on its own, the same draw
    mmc.compress(model, "fopru", keep=0.5)
    with pytest.raises(ValueError, match="needs vision-tower signals.*pass pixel_values_videos"):
        model(**pre, mm_encoder_outputs={"video": enc})


# -- refusals: clear errors, model left usable ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bad_videos_raise_and_the_model_stays_usable(kind, models):
    model, batch = models[kind], batch_of(models, kind, VIDEOS)
    ref = model.generate(**batch, **GEN)
    mmc.compress(model, "random", keep=1.0)
    ragged = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 48, 48)]
    with pytest.raises(ValueError, match=r"one \[videos, frames, channels, 32, 32\] tensor .*shapes"):
        model(**{**batch, "pixel_values_videos": ragged})
    big = torch.randn(2, 3, 3, 48, 48)
    with pytest.raises(ValueError, match="frames are 48x48 px; .* 32x32 px frames"):
        model(**{**batch, "pixel_values_videos": big})
    with pytest.raises(ValueError, match=r"must be one \[videos, .* got \(3, 3, 32, 32\)"):
        model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"][0]})
    # one placeholder short: the prompt and the videos disagree
    ids, am = batch["input_ids"].clone(), batch["attention_mask"]
    ids[1, (ids[1] == NV_VID).nonzero()[0, 0]] = 5
    n = VIDEO_TOKENS[kind]
    with pytest.raises(ValueError, match=rf"{2 * n - 1} video placeholder tokens .* give {2 * n} visual"):
        model.generate(**{**batch, "input_ids": ids, "attention_mask": am}, **GEN)
    # a run split over two rows: both rows hold 1.5 videos' worth of placeholders for two videos
    seqs = [[1] + [NV_VID] * (n + n // 2) + [3], [1] + [NV_VID] * (n - n // 2) + [3]]
    ids2, am2 = left_padded(seqs)
    with pytest.raises(ValueError, match="video 1's .* placeholder tokens span two batch rows"):
        model(input_ids=ids2, attention_mask=am2, pixel_values_videos=batch["pixel_values_videos"])
    assert torch.equal(model.generate(**batch, **GEN), ref)  # still compressing, still right
    mmc.restore(model)
    assert _unpatched(model) and torch.equal(model.generate(**batch, **GEN), ref)


def test_video_to_an_image_only_model_raises():
    """LLaVA-NeXT has no video path: a video is refused clearly; the model keeps working on images."""
    model = tiny_next()
    batch = next_batch(model)
    ref = model.generate(**batch, **GEN)
    mmc.compress(model, "random", keep=0.5)
    ids, am = left_padded([[1, 5] + [NV_VID] * 4 + [7]])
    video = dict(input_ids=ids, attention_mask=am, pixel_values_videos=torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(
        ValueError, match="LlavaNextForConditionalGeneration has no video path.*LlavaNextVideo"
    ):
        model(**video)
    model.generate(**batch, **GEN)
    assert mmc.report(model).tokens_out == [35, 44]
    mmc.restore(model)
    assert _unpatched(model) and torch.equal(model.generate(**batch, **GEN), ref)


def test_adapter_declares_the_families(models):
    from mmcompress.adapters.hf_llava import HFLlavaAdapter

    for model in models.values():
        assert HFLlavaAdapter.supports(model)
        assert support.family_of(model).key in FAMILY.values()
    assert any("LlavaNextVideoForConditionalGeneration" in f for f in HFLlavaAdapter.families)
