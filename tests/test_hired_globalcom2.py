"""HiRED and GlobalCom² through ``compress()`` on the tiny LLaVA / LLaVA-NeXT models, plus bad input.

The tiny towers have a 4x4 patch grid (16 tokens per view) and 2x2 / 1x2 / 2x1 crop grids, so nothing
here assumes CLIP-336's 24x24.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMG, PINPOINTS, llava_batch, next_batch, tiny_llava, tiny_next

import mmcompress as mmc
from mmcompress.adapters.probes import AttentionProbe, vision_attention_modules
from mmcompress.methods.globalcom2 import GlobalCom2
from mmcompress.methods.hired import HiRED, tile_packed_index
from mmcompress.signals import VitAttention
from mmcompress.tokens import GridView, VisualTokens

GEN = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMG])


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


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _alone(batch: dict, row: int) -> dict:
    valid = batch["attention_mask"][row].bool()
    one = {
        "input_ids": batch["input_ids"][row : row + 1, valid],
        "attention_mask": batch["attention_mask"][row : row + 1, valid],
        "pixel_values": batch["pixel_values"][row : row + 1],
    }
    if "image_sizes" in batch:
        one["image_sizes"] = batch["image_sizes"][row : row + 1]
    return one


# -- the new probe kind -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, -1])
def test_cls_logits_probe_softmaxes_to_eager_attention(layer: int):
    sdpa = tiny_llava().model.vision_tower
    eager = tiny_llava(attn="eager").model.vision_tower
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probe = AttentionProbe(vision_attention_modules(sdpa)[layer], VitAttention(layer, "cls_logits"))
    with torch.no_grad():
        sdpa(pix)
        want = eager(pix, output_attentions=True).attentions[layer][:, :, 0]  # [V, H, T] probabilities
    probe.remove()
    assert probe.value.shape == want.shape
    assert (torch.softmax(probe.value, -1) - want).abs().max() < 1e-6
    assert float(probe.value.min()) < 0  # logits, not probabilities


# -- each image decides for itself --------------------------------------------------------------------------

CASES = [
    ("llava", "hired", dict(keep=0.5)),
    ("llava", "hired", dict(keep=5)),
    ("next", "hired", dict(keep=0.3)),
    ("next", "hired", dict(keep=0.3, split="quadrants", newlines="keep")),
    ("next", "globalcom2", dict(retention=0.25)),
    ("next", "globalcom2", dict(retention=0.5, official_padding_bug=True, thumbnail_order="score")),
]


@pytest.mark.parametrize("kind,method,kw", CASES)
def test_batch_of_two_equals_each_alone(kind, method, kw, llava, llava_next):
    model, batch = (llava, llava_batch()) if kind == "llava" else (llava_next, next_batch(llava_next))
    positions = "compact" if kw.get("official_padding_bug") else "original"
    mmc.compress(model, method, positions=positions, **kw)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    assert all(o < i for i, o in zip(rep.tokens_in, rep.tokens_out))
    L = batch["input_ids"].shape[1]
    for row in range(2):
        one = _alone(batch, row)
        s1, l1 = _gen(model, one)
        assert mmc.report(model).kept == [rep.kept[row]]
        assert torch.equal(s1[0, one["input_ids"].shape[1] :], seq[row, L:])
        assert (l1[:, 0] - logits[:, row]).abs().max() < 1e-5
    assert rep.kept[0] != rep.kept[1]


def _eager_signals(model, pixel_values: torch.Tensor, layers: list[int]) -> dict:
    """CLS rows of an eager copy of ``model``'s tower: an independent source of the probed signal."""
    eager = type(model)._from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    return {VitAttention(layer, "cls"): att[layer][:, :, 0] for layer in layers}


def test_hired_llava15_keeps_top_feature_layer_attention(llava):
    batch = llava_batch()
    mmc.compress(llava, "hired", keep=0.25)
    llava.generate(**batch, **GEN)
    sig = _eager_signals(llava, batch["pixel_values"], [-2])[VitAttention(-2, "cls")]
    want = [a[:, 1:].sum(0).topk(4).indices.sort().values.tolist() for a in sig]  # heads summed
    assert mmc.report(llava).kept == want


def test_hired_next_uses_the_right_views_and_layers(llava_next):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    batch = next_batch(llava_next)
    cfg = HiRED(keep=0.4, alpha=0.3)
    mmc.compress(llava_next, cfg)
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    for i, im in enumerate(rep.images):
        n = image_size_to_num_patches(batch["image_sizes"][i], PINPOINTS, 32)
        sig = _eager_signals(llava_next, batch["pixel_values"][i, :n], [0, -2])
        tokens = VisualTokens(torch.zeros(im.tokens_in, 2), im.layout, sig, image_index=i)
        assert cfg.select(tokens).indices.tolist() == im.kept
        crops = im.layout.view("crops")
        # budget: B = int(V * 16 * 0.4), thumbnail min(int(0.3 B), 16); newlines dropped
        B = int(n * 16 * 0.4)
        kept = torch.tensor(im.kept)
        assert int((kept < 16).sum()) == min(int(B * 0.3), 16)
        assert im.tokens_out <= B
        assert not bool(torch.isin(kept, crops.newline_indices()).any())


# -- keep everything ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_hired_keep_all_equals_unpatched(kind, llava, llava_next):
    model, batch = (llava, llava_batch()) if kind == "llava" else (llava_next, next_batch(llava_next))
    ref_seq, ref_logits = _gen(model, batch)
    ref_fwd = model(**batch).logits
    mmc.compress(model, "hired", keep=1.0, newlines="keep")
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert torch.equal(model(**batch).logits, ref_fwd)
    assert mmc.report(model).tokens_in == mmc.report(model).tokens_out


def test_hired_keep_all_official_drops_only_newlines(llava_next):
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "hired", keep=1.0)  # newlines="drop", as officially even at rate 1
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    for im in rep.images:
        nl = im.layout.view("crops").newline_indices()
        assert im.tokens_out == im.tokens_in - nl.numel()
        assert sorted(set(range(im.tokens_in)) - set(im.kept)) == nl.tolist()


def test_globalcom2_retention_one(llava_next):
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "globalcom2", retention=1.0)
    llava_next.generate(**batch, **GEN)
    for im in mmc.report(llava_next).images:
        crops: GridView = im.layout.view("crops")
        kept = torch.tensor(im.kept)
        assert torch.equal(kept[:16], torch.arange(16))  # the whole thumbnail
        assert bool(torch.isin(crops.newline_indices(), kept).all())  # every newline
        # r_j = min(1, 1 + σ_j - 1/n): the top crop keeps all its tokens, the others fewer
        packed = tile_packed_index(crops)
        per_crop = [int(torch.isin(p[p >= 0], kept).sum()) for p in packed]
        valid = [int((p >= 0).sum()) for p in packed]
        assert any(k == v for k, v in zip(per_crop, valid)) and per_crop != valid


def test_globalcom2_official_sequence_end_to_end(llava_next):
    batch = next_batch(llava_next)
    ref = llava_next.generate(**batch, **GEN)
    mmc.compress(
        llava_next,
        "globalcom2",
        retention=0.5,
        official_padding_bug=True,
        thumbnail_order="score",
        positions="compact",
    )
    out = llava_next.generate(**batch, **GEN)
    assert out.shape[0] == 2 and not torch.equal(out, ref)
    for im in mmc.report(llava_next).images:
        crops = im.layout.view("crops")
        crop_part = torch.tensor([k for k in im.kept if k >= crops.start])
        # the official sequence sits on consecutive positions from the crop grid's start
        assert torch.equal(crop_part, crops.start + torch.arange(crop_part.numel()))


def test_hired_alpha_one_spreads_pool_evenly(llava_next):
    # alpha=1: the content map is empty (the official code divides by zero); the pool is split evenly
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "hired", keep=0.5, alpha=1.0)
    llava_next.generate(**batch, **GEN)
    for im in mmc.report(llava_next).images:
        kept = torch.tensor(im.kept)
        assert torch.equal(kept[kept < 16], torch.arange(16))  # B0 = min(B, 16)
        assert im.tokens_out > 16


def test_tile_packed_index_matches_grid_view():
    crops = GridView("crops", 16, 6, 8, newline=True, tiles=(2, 2), tile_shape=(4, 4), offset=(1, 0))
    packed = tile_packed_index(crops)
    assert packed.shape == (4, 16)
    grid = crops.grid_indices()  # [6, 8]
    tile = crops.tile_of()
    assert sorted(packed[packed >= 0].tolist()) == sorted(grid.flatten().tolist())
    for j in range(4):
        for p in packed[j][packed[j] >= 0].tolist():
            r, c = divmod(p - crops.start, crops.cols + 1)
            assert int(tile[r, c]) == j
    # padding: rows 0 and 7 of the 8x8 canvas -> first row of crops 0/1, last row of crops 2/3
    assert (packed[0, :4] == -1).all() and (packed[3, 12:] == -1).all() and int((packed == -1).sum()) == 16


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,exc,text",
    [
        (HiRED, {"alpha": -0.1}, ValueError, r"alpha=-0.1 .*\[0, 1\]"),
        (HiRED, {"alpha": 1.5}, ValueError, r"alpha=1.5 .*\[0, 1\]"),
        (HiRED, {"alpha": float("nan")}, ValueError, "alpha=nan"),
        (HiRED, {"alpha": True}, TypeError, "alpha.*True"),
        (HiRED, {"alpha": "0.5"}, TypeError, "alpha.*'0.5'"),
        (HiRED, {"keep": 0.0}, ValueError, "keep=0.0"),
        (HiRED, {"keep": 1.5}, ValueError, "keep=1.5"),
        (HiRED, {"split": "grid"}, ValueError, "split='grid'.*bands"),
        (HiRED, {"newlines": "some"}, ValueError, "newlines='some'.*drop"),
        (HiRED, {"select_layer": 1.5}, TypeError, "select_layer.*1.5"),
        (GlobalCom2, {"retention": 0.0}, ValueError, r"retention=0.0 .*\(0, 1\]"),
        (GlobalCom2, {"retention": -0.25}, ValueError, r"retention=-0.25 .*\(0, 1\]"),
        (GlobalCom2, {"retention": 1.01}, ValueError, r"retention=1.01 .*\(0, 1\]"),
        (GlobalCom2, {"retention": float("inf")}, ValueError, "retention=inf"),
        (GlobalCom2, {"retention": "0.25"}, TypeError, "retention.*'0.25'"),
        (GlobalCom2, {"temperature": 0.0}, ValueError, "temperature=0.0"),
        (GlobalCom2, {"thumbnail_order": "best"}, ValueError, "thumbnail_order='best'"),
        (GlobalCom2, {"official_padding_bug": "yes"}, TypeError, "official_padding_bug.*'yes'"),
        (GlobalCom2, {"layer": None}, TypeError, "layer.*None"),
    ],
)
def test_bad_fields(cls, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        cls(**kwargs)


def test_globalcom2_on_single_view_model(llava):
    batch = llava_batch()
    ref = llava.generate(**batch, **GEN)
    with pytest.raises(
        ValueError,
        match="'globalcom2' needs a layout of kind anyres; LlavaForConditionalGeneration packs a single",
    ):
        mmc.compress(llava, "globalcom2", retention=0.25)
    assert mmc.report(llava) is None and "forward" not in llava.model.__dict__
    assert torch.equal(llava.generate(**batch, **GEN), ref)


def test_globalcom2_select_without_crops():
    tokens = VisualTokens(torch.zeros(16, 2), mmc.Layout.single(4, 4))
    with pytest.raises(ValueError, match=r"globalcom2 needs an AnyRes image.*\['base'\]"):
        GlobalCom2().select(tokens)


def test_hired_on_tower_without_cls():
    model = tiny_llava("siglip")
    batch = llava_batch()
    ref = model.generate(**batch, **GEN)
    mmc.compress(model, "hired", keep=0.5)
    with pytest.raises(ValueError, match="hired needs a vision tower with a CLS token.*16 keys for 16 patch"):
        model.generate(**batch, **GEN)
    mmc.restore(model)
    assert torch.equal(model.generate(**batch, **GEN), ref)


def test_hired_int_keep_larger_than_image(llava_next):
    batch = next_batch(llava_next)
    mmc.compress(llava_next, "hired", keep=81)  # image 0: 5 views x 16 grid tokens
    with pytest.raises(ValueError, match="keep=81 exceeds the 80 grid tokens"):
        llava_next.generate(**batch, **GEN)
    mmc.compress(llava_next, "hired", keep=20)
    llava_next.generate(**batch, **GEN)
    assert all(n <= 20 for n in mmc.report(llava_next).tokens_out)


def test_configs_round_trip():
    for cfg in (
        HiRED(keep=64, alpha=0.3, split="quadrants", newlines="keep", budget_layer=1, select_layer=-1),
        GlobalCom2(
            retention=0.111, temperature=5.0, layer=-2, official_padding_bug=True, thumbnail_order="score"
        ),
    ):
        assert mmc.MethodConfig.from_json(cfg.to_json()) == cfg
    assert HiRED().needs() == {VitAttention(0, "cls"), VitAttention(-2, "cls")}
    assert GlobalCom2().needs() == {VitAttention(-1, "cls_logits")}
