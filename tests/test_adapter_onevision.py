"""LLaVA-OneVision images through the LLaVA adapter, on tiny random models (issue 7; reference §2.3, §3.3).

SigLIP tower without CLS, strategy "full", AnyRes packing with newlines, the ``anyres_max_<m>`` downscale
of large crop grids, multi-image samples (``batch_num_images``) packed as thumbnail + newline.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMG, OV_VID, PINPOINTS, left_padded, onevision_batch, tiny_onevision
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

import mmcompress as mmc
from mmcompress import support
from mmcompress.adapters.hf_llava import HFLlavaAdapter
from mmcompress.config import PreLLMMethod
from mmcompress.signals import VitAttention
from mmcompress.tokens import Selection, VisualTokens

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=[IMG, OV_VID])
LOGIT_TOL = 1e-5  # cache vs recomputation and padded vs alone: fp32 reduction-order noise


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _unpatched(model) -> bool:
    return not any(k in model.model.__dict__ for k in ("forward", "get_image_features")) and not any(
        k in model.__dict__ for k in ("forward", "_mmcompress_handle")
    )


@pytest.fixture(scope="module")
def ov():
    return tiny_onevision()


@pytest.fixture(scope="module")
def ov_small():
    """Every multi-crop image's grid is downscaled (anyres_max_1)."""
    return tiny_onevision(aspect="anyres_max_1")


@pytest.fixture(autouse=True)
def _restore(ov, ov_small):
    yield
    mmc.restore(ov)
    mmc.restore(ov_small)


def _layouts(model, batch, **extra):
    mmc.compress(model, "random", keep=1.0)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], **extra
        ).pooler_output
    rep = mmc.report(model)
    mmc.restore(model)
    return feats, [im.layout for im in rep.images]


# -- layout ---------------------------------------------------------------------------------------------
def test_layout_is_the_models_packing(ov):
    """Thumbnail = the first view's projected patches; crops = each crop's patches at the (tile, offset)
    place the layout gives, after unpadding; newlines = the model's image_newline, nowhere else."""
    batch = onevision_batch(ov, image_sizes=((40, 60), (64, 64), (60, 28)))
    feats, layouts = _layouts(ov, batch)
    with torch.no_grad():
        hs = ov.model.vision_tower(batch["pixel_values"].flatten(0, 1), output_hidden_states=True)
        proj = ov.model.multi_modal_projector(hs.hidden_states[-1]).view(3, 5, 16, -1)  # 5 views, 4x4
    for i, (f, lay) in enumerate(zip(feats, layouts)):
        base, crops = lay.views
        assert (base.name, base.rows, base.cols, crops.name, crops.newline) == ("base", 4, 4, "crops", True)
        assert lay.num_tokens == f.shape[0]
        torch.testing.assert_close(f[:16], proj[i, 0], rtol=0, atol=1e-5)
        nl = lay.newline_mask()
        assert torch.equal(f[nl], ov.model.image_newline.expand(int(nl.sum()), -1))
        assert not (f[~nl] == ov.model.image_newline).all(-1).any()
        tiles = proj[i, 1 : 1 + crops.tiles[0] * crops.tiles[1]]  # [tiles, 16, D]
        tile_of, (th, tw), (top, left) = crops.tile_of(), crops.tile_shape, crops.offset
        r = torch.arange(crops.rows)[:, None] + top
        c = torch.arange(crops.cols)[None, :] + left
        want = tiles[tile_of, (r % th) * tw + (c % tw)]  # [rows, cols, D]
        torch.testing.assert_close(f[crops.grid_indices()], want, rtol=0, atol=1e-5)
    # 40x60 and 64x64 -> the 64x64 pinpoint (2x2 crops), 40x60 unpadded to 6 of 8 rows; 60x28 -> 64x32
    assert [lay.view("crops").tiles for lay in layouts] == [(2, 2), (2, 2), (2, 1)]
    assert [(lay.view("crops").rows, lay.view("crops").cols) for lay in layouts] == [(6, 8), (8, 8), (8, 4)]
    assert [lay.num_tokens for lay in layouts] == [16 + 6 * 9, 16 + 8 * 9, 16 + 8 * 5]


def test_downscaled_grid_layout(ov_small):
    """anyres_max_1: a 2x2-crop 64x64 image's 8x8 grid becomes 4x4 (ratio 2), then newlines."""
    batch = onevision_batch(ov_small)
    feats, layouts = _layouts(ov_small, batch)
    crops = [lay.view("crops") for lay in layouts]
    assert [(v.rows, v.cols, v.tiles) for v in crops] == [(3, 4, (1, 1)), (4, 4, (1, 1))]
    for f, lay in zip(feats, layouts):
        nl = lay.newline_mask()
        assert lay.num_tokens == f.shape[0]
        assert torch.equal(f[nl], ov_small.model.image_newline.expand(int(nl.sum()), -1))
        assert not (f[~nl] == ov_small.model.image_newline).all(-1).any()


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "divprune", "fopru"])
def test_keep_all_equals_unpatched(method, ov):
    batch = onevision_batch(ov)
    ref_seq, ref_logits = _gen(ov, batch)
    ref_fwd = ov(**batch).logits
    mmc.compress(ov, method, keep=1.0)
    seq, logits = _gen(ov, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert torch.equal(ov(**batch).logits, ref_fwd)
    rep = mmc.report(ov)
    assert rep.tokens_in == [70, 88]
    # FoPru's 1.0 keeps every token too (newlines follow their rows)
    assert rep.tokens_out == rep.tokens_in


def test_keep_all_equals_unpatched_downscaled(ov_small):
    batch = onevision_batch(ov_small)
    ref_seq, ref_logits = _gen(ov_small, batch)
    mmc.compress(ov_small, "random", keep=1.0)
    seq, logits = _gen(ov_small, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.compress(ov_small, "pool", keep=0.25)  # pooled on the downscaled grids, newlines dropped
    _gen(ov_small, batch)
    rep = mmc.report(ov_small)
    assert rep.tokens_in == [31, 36] and rep.tokens_out == [6, 8]


def test_restore_is_bit_identical(ov):
    batch = onevision_batch(ov)
    ref_seq, ref_logits = _gen(ov, batch)
    ref_fwd = ov(**batch).logits
    mmc.compress(ov, "divprune", keep=0.3)
    seq, _ = _gen(ov, batch)
    assert seq.shape == ref_seq.shape and mmc.report(ov).tokens_out == [21, 26]
    with mmc.disabled(ov):
        seq, logits = _gen(ov, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.restore(ov)
    assert _unpatched(ov)
    seq, logits = _gen(ov, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert torch.equal(ov(**batch).logits, ref_fwd)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cache_equals_recompute_after_pruning(positions, ov):
    batch = onevision_batch(ov)
    mmc.compress(ov, "fopru", keep=0.3, positions=positions)
    seq, logits = _gen(ov, batch)
    rep = mmc.report(ov)
    assert rep.prompt_len_out < rep.prompt_len_in and rep.kv_bytes > 0
    seq2, logits2 = _gen(ov, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("method", ["divprune", "fopru"])
def test_padded_row_equals_sample_alone(method, ov):
    batch = onevision_batch(ov)
    assert (batch["attention_mask"] == 0).any()  # row 0 is left-padded
    mmc.compress(ov, method, keep=0.4)
    seq, logits = _gen(ov, batch)
    kept = mmc.report(ov).kept
    L = batch["input_ids"].shape[1]
    for row in range(2):
        valid = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row : row + 1, valid],
            "attention_mask": batch["attention_mask"][row : row + 1, valid],
            "pixel_values": batch["pixel_values"][row : row + 1],
            "image_sizes": batch["image_sizes"][row : row + 1],
        }
        s1, l1 = _gen(ov, alone)
        assert mmc.report(ov).kept == [kept[row]]
        assert torch.equal(s1[0, int(valid.sum()) :], seq[row, L:])
        assert (l1[:, 0] - logits[:, row]).abs().max() < LOGIT_TOL


def test_multi_image_sample(ov):
    """batch_num_images=[2]: each image of the sample is one view, thumbnail + one newline (17 tokens)."""
    g = torch.Generator().manual_seed(1)
    pix = torch.randn(2, 5, 3, 32, 32, generator=g)
    ids, am = left_padded([[1, 5] + [IMG] * 17 + [3] + [IMG] * 17 + [7, 8]])
    batch = dict(
        input_ids=ids,
        attention_mask=am,
        pixel_values=pix,
        image_sizes=torch.tensor([[40, 60], [64, 64]]),
        batch_num_images=torch.tensor([2]),
    )
    ref_seq, ref_logits = _gen(ov, batch)
    mmc.compress(ov, "fopru", keep=1.0)
    seq, logits = _gen(ov, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert [[v.name for v in im.layout.views] for im in mmc.report(ov).images] == [["base", "newline"]] * 2
    mmc.compress(ov, "fopru", keep=0.25)
    seq, logits = _gen(ov, batch)
    assert mmc.report(ov).tokens_out == [5, 5]  # 4 of 16 patches + the newline (kept, not counted)
    seq2, logits2 = _gen(ov, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


def test_static_cache_route_matches_dynamic(ov):
    batch = onevision_batch(ov)
    mmc.compress(ov, "random", keep=8)
    dyn = ov.generate(**batch, **GEN)
    prep = mmc.prepare_inputs(ov, **batch)
    static = ov.generate(**prep, **GEN, cache_implementation="static")
    assert torch.equal(static[:, prep["input_ids"].shape[1] :], dyn[:, batch["input_ids"].shape[1] :])


# -- refusals: clear errors, model left usable ------------------------------------------------------------
@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_cls_methods_are_refused(method, ov):
    with pytest.raises(ValueError, match="SiglipVisionModel vision tower of this .* has no CLS token") as e:
        mmc.compress(ov, method)
    ok = ", ".join(f.title for f in support.supported_families(method))
    assert f"[LLaVA-OneVision: n/a; {method!r} supports: {ok}]" in str(e.value)
    assert "LLaVA-NeXT" in ok
    assert _unpatched(ov)


# -- vision-tower signals on downscaled crop grids ---------------------------------------------------
SEEN: list[torch.Tensor] = []


@dataclasses.dataclass(frozen=True)
class SignalSpy(PreLLMMethod):
    """Test-only: records the last layer's "received" signal of every image and keeps every token."""

    name: ClassVar[str] = "test-signal-spy"

    def needs(self) -> frozenset:
        return frozenset({VitAttention(-1, "received")})

    def select(self, tokens: VisualTokens) -> Selection:
        SEEN.append(tokens.signals[VitAttention(-1, "received")])
        return Selection(indices=torch.arange(tokens.num_tokens, device=tokens.features.device))


def test_downscaled_signals_follow_the_features(ov_small):
    """A downscaled crops view's signal is the per-crop attention (eager tower: the oracle) stitched,
    unpadded and bilinearly resized to the packed grid, like the features; the thumbnail's is its own."""
    batch = onevision_batch(ov_small)
    SEEN.clear()
    mmc.compress(ov_small, SignalSpy())
    with torch.no_grad():
        ov_small(**batch)
    layouts = [im.layout for im in mmc.report(ov_small).images]
    eager = tiny_onevision(aspect="anyres_max_1", attn="eager")
    eager.load_state_dict(ov_small.state_dict())
    with torch.no_grad():
        att = eager.model.vision_tower(batch["pixel_values"].flatten(0, 1), output_attentions=True)
    received = att.attentions[-1].mean(dim=2).view(2, 5, 4, 16)  # [images, views, heads, patches]
    for i, (sig, lay) in enumerate(zip(SEEN, layouts)):
        crops = lay.view("crops")
        n = crops.rows * crops.cols
        assert sig.shape == (2, 4, max(16, n))
        torch.testing.assert_close(sig[0, :, -16:], received[i, 0], rtol=0, atol=1e-6)
        canvas = received[i, 1:].view(2, 2, 4, 4, 4).permute(2, 0, 3, 1, 4).reshape(4, 8, 8)
        canvas = unpad_image(canvas, batch["image_sizes"][i])
        want = F.interpolate(canvas[None], [crops.rows, crops.cols], mode="bilinear")[0].flatten(1)
        torch.testing.assert_close(sig[1, :, -n:], want, rtol=0, atol=1e-6)
        assert not sig[1, :, : sig.shape[-1] - n].any()


def test_fopru_on_downscaled_grids(ov_small):
    batch = onevision_batch(ov_small)
    ref_seq, ref_logits = _gen(ov_small, batch)
    mmc.compress(ov_small, "fopru", keep=1.0)
    seq, logits = _gen(ov_small, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.compress(ov_small, "fopru", keep=0.5)
    seq, logits = _gen(ov_small, batch)
    rep = mmc.report(ov_small)
    # per view floor(n/2) tokens (base 16 -> 8; crops 3x4 -> 6, 4x4 -> 8) + the newlines of kept rows
    kept_grid = [sum(1 for k in im.kept if not im.layout.newline_mask()[k]) for im in rep.images]
    assert kept_grid == [8 + 6, 8 + 8]
    seq2, logits2 = _gen(ov_small, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


def test_video_is_compressed_and_images_still_are(ov):
    """Videos are compressed too (tests/test_adapter_video.py has the details)."""
    batch = onevision_batch(ov)
    ids, am = left_padded([[1, 5] + [OV_VID] * 9 + [7]])  # 2 frames of 2x2 pooled tokens + 1 newline
    video = dict(input_ids=ids, attention_mask=am, pixel_values_videos=torch.randn(1, 2, 3, 32, 32))
    with torch.no_grad():
        ov(**video)  # the unpatched model takes it
    mmc.compress(ov, "random", keep=0.5)
    with torch.no_grad():
        assert ov(**video).logits.shape[1] == ids.shape[1] - 5  # 4 of the 9 video tokens kept
    assert mmc.report(ov).tokens_in == [9] and mmc.report(ov).tokens_out == [4]
    with mmc.disabled(ov):
        ov(**video)
    ov.generate(**batch, **GEN)
    assert mmc.report(ov).tokens_out == [35, 44]


def test_adapter_declares_the_family(ov):
    assert HFLlavaAdapter.supports(ov)
    assert any("LlavaOnevisionForConditionalGeneration" in f for f in HFLlavaAdapter.families)
    assert ov.config.image_grid_pinpoints == PINPOINTS
