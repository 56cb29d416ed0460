"""FoPru and AIM merging through ``compress()`` on tiny LLaVA-1.5 / LLaVA-NeXT models, plus bad input.

The FoPru references are computed independently of the probes: eager vision attention
(``output_attentions``) averaged over queries and heads, and for AnyRes placed onto the packed sequence by
transformers' own ``pack_image_features`` (so the stitching and unpadding are checked against the model).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMG, llava_batch, next_batch, tiny_llava, tiny_next

import mmcompress as mmc
from mmcompress.config import MethodConfig
from mmcompress.kernels.merge import aim_merge, aim_merge_torch
from mmcompress.methods.aim_merge import AIMMerge, aim_merge_schedule
from mmcompress.methods.fopru import FoPru, fopru_rank, fopru_rows, fopru_significance
from mmcompress.signals import VitAttention
from mmcompress.tokens import GridView, Layout, VisualTokens

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG])
LOGIT_TOL = 1e-5  # cache vs recomputation: fp32 reduction-order noise


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(attn="eager")  # eager: the reference reads output_attentions


@pytest.fixture(scope="module")
def llava_next():
    return tiny_next(attn="eager")


@pytest.fixture(autouse=True)
def _unpatched(llava, llava_next):
    yield
    mmc.restore(llava)
    mmc.restore(llava_next)


def _gen(model, batch, **kw):
    out = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def _received(model, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """[views, T] eager attention received (mean over queries, then heads) at one vision layer."""
    with torch.no_grad():
        att = model.model.vision_tower(pixel_values, output_attentions=True).attentions[layer]
    return att.mean(2).mean(1)


def _alone(batch: dict, row: int) -> dict:
    valid = batch["attention_mask"][row].bool()
    out = {
        "input_ids": batch["input_ids"][row : row + 1, valid],
        "attention_mask": batch["attention_mask"][row : row + 1, valid],
        "pixel_values": batch["pixel_values"][row : row + 1],
    }
    if "image_sizes" in batch:
        out["image_sizes"] = batch["image_sizes"][row : row + 1]
    return out


def _next_packed_significance(model, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (significance of every packed token, newline mask), packed by transformers itself."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    out = []
    for i, size in enumerate(batch["image_sizes"]):
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        sig = _received(model, batch["pixel_values"][i, :n])[:, 1:]  # [views, 16], CLS column dropped
        marker = torch.tensor([float("nan")])
        packed, _ = model.model.pack_image_features([sig[..., None]], size[None], "default", marker)
        packed = packed[0] if isinstance(packed, list) else packed
        packed = packed.flatten()
        out.append((packed, torch.isnan(packed)))
    return out


# -- FoPru ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.25, 0.5, 3])
def test_fopru_llava_matches_eager_attention(keep, llava):
    batch = llava_batch()
    mmc.compress(llava, "fopru", keep=keep, significance="received")
    seq, logits = _gen(llava, batch)
    rep = mmc.report(llava)
    k = {0.25: 4, 0.5: 8, 3: 3}[keep]  # floor(16·keep) / the int itself
    assert rep.tokens_in == [16, 16] and rep.tokens_out == [k, k]
    sig = _received(llava, batch["pixel_values"])[:, 1:]
    for i in range(2):  # each image ranks its own attention
        ref = torch.sort(sig[i].topk(k).indices).values
        assert rep.kept[i] == ref.tolist()
    assert rep.kept[0] != rep.kept[1]
    seq2, logits2 = _gen(llava, batch, use_cache=False)
    assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL


def _patch_logits(model, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """[views, heads, P, P] pre-softmax patch-to-patch logits, from the full matrix (eager reference)."""
    from mmcompress.adapters.probes import prefix_tokens, vision_attention_modules

    mod = vision_attention_modules(model.model.vision_tower)[layer]
    seen = {}

    def grab(m, args, kwargs):
        seen["hs"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    h = mod.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model.model.vision_tower(pixel_values)
    h.remove()
    hs, heads, hd = seen["hs"], model.config.vision_config.num_attention_heads, mod.head_dim
    V, T, _ = hs.shape
    q = mod.q_proj(hs).view(V, T, heads, hd).transpose(1, 2)
    k = mod.k_proj(hs).view(V, T, heads, hd).transpose(1, 2)
    p = prefix_tokens(model.model.vision_tower)
    return (q @ k.transpose(-1, -2) * mod.scale)[:, :, p:, p:]


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_fopru_logits_match_the_official_significance(tower, strategy):
    # significance="logits": the official variance rule on the full patch-logit matrix, per image
    model = tiny_llava(tower)  # sdpa: the probe never needs eager attention
    batch = llava_batch()
    mmc.compress(model, "fopru", keep=0.5, strategy=strategy, significance="logits")
    model.generate(**batch, **GEN)
    rep = mmc.report(model)
    logits = _patch_logits(model, batch["pixel_values"])
    for i in range(2):
        sig, _which = fopru_significance(logits[i])
        ref = fopru_rank(sig, 8) if strategy == "rank" else fopru_rows(sig.view(4, 4), 2)[1]
        assert rep.kept[i] == ref.tolist()


def test_fopru_llava_rows(llava):
    batch = llava_batch()
    mmc.compress(llava, "fopru", keep=0.5, strategy="row", significance="received")
    llava(**batch)
    rep = mmc.report(llava)
    sig = _received(llava, batch["pixel_values"])[:, 1:].view(2, 4, 4)
    for i in range(2):
        rows = torch.sort(sig[i].sum(-1).topk(2).indices).values  # floor(4·0.5) = 2 whole rows
        assert rep.kept[i] == (rows[:, None] * 4 + torch.arange(4)).flatten().tolist()


def test_fopru_each_image_decides_for_itself(llava, llava_next):
    for model, batch in ((llava, llava_batch()), (llava_next, next_batch(llava_next))):
        for strategy in ("rank", "row"):
            mmc.compress(model, "fopru", keep=0.3, strategy=strategy)
            seq, _ = _gen(model, batch)
            both = mmc.report(model).kept
            L = batch["input_ids"].shape[1]
            for row in range(2):
                alone = _alone(batch, row)
                s1, _ = _gen(model, alone)
                assert mmc.report(model).kept == [both[row]]
                assert torch.equal(s1[0, alone["input_ids"].shape[1] :], seq[row, L:])


@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("newlines", ["keep", "drop"])
def test_fopru_next_anyres(strategy, newlines, llava_next):
    batch = next_batch(llava_next)
    mmc.compress(
        llava_next, mmc.FoPru(keep=0.25, strategy=strategy, newlines=newlines, significance="received")
    )
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    for img, (packed, nl) in zip(rep.images, _next_packed_significance(llava_next, batch)):
        base, crops = img.layout.views
        kept = torch.tensor(img.kept)
        assert packed.numel() == img.tokens_in and torch.equal(nl, img.layout.newline_mask())
        # thumbnail: floor(16 · 0.25) = 4 tokens or floor(4 · 0.25) = 1 row
        b = kept[kept < crops.start]
        c = kept[(kept >= crops.start) & ~nl[kept]]
        if strategy == "rank":
            assert b.tolist() == torch.sort(packed[:16].topk(4).indices).values.tolist()
            cells = crops.grid_indices().flatten()
            k = int(cells.numel() * 0.25)
            assert c.tolist() == torch.sort(cells[packed[cells].topk(k).indices]).values.tolist()
        else:
            assert b.tolist() == fopru_rows(packed[:16].view(4, 4), 1)[1].tolist()
            grid = crops.grid_indices()
            rows = fopru_rows(packed[grid], int(crops.rows * 0.25))[0]
            assert c.tolist() == grid[rows].flatten().tolist()
        kept_nl = kept[nl[kept]]
        if newlines == "drop":
            assert kept_nl.numel() == 0
        else:  # the newline of exactly the crops rows that keep a token
            rows_with = torch.unique((c - crops.start) // (crops.cols + 1))
            assert torch.equal(kept_nl, crops.newline_indices()[rows_with])


@pytest.mark.parametrize("tower", ["siglip", "dinov2"])
def test_fopru_other_towers(tower):
    # SigLIP has no CLS (T == patches), DINOv2 has one: the patch columns are the last rows·cols
    model = tiny_llava(tower, attn="eager")
    batch = llava_batch()
    mmc.compress(model, "fopru", keep=0.25, significance="received")
    model.generate(**batch, **GEN)
    rep = mmc.report(model)
    sig = _received(model, batch["pixel_values"])
    sig = sig[:, sig.shape[1] - 16 :]
    if tower == "siglip":  # "full" strategy: every token is a patch, T == 16
        assert sig.shape[1] == 16
    for i in range(2):
        assert rep.kept[i] == torch.sort(sig[i].topk(4).indices).values.tolist()


def test_fopru_signal_plumbing_errors():
    assert FoPru(keep=0.5).needs() == {VitAttention(-2, "received")}
    m = FoPru(keep=0.5, significance="logits")
    assert m.needs() == {VitAttention(-2, "received_logits"), VitAttention(-2, "given_logits")}
    tokens = VisualTokens(torch.zeros(16, 4), Layout.single(4, 4))
    with pytest.raises(ValueError, match="has no VitAttention"):
        m.select(tokens)
    bad = VisualTokens(
        torch.zeros(16, 4), Layout.single(4, 4), signals={sg: torch.rand(2, 1, 17) for sg in m.signals}
    )
    with pytest.raises(ValueError, match="layout has 1 vision view"):
        m.select(bad)
    short = VisualTokens(
        torch.zeros(16, 4), Layout.single(4, 4), signals={sg: torch.rand(1, 1, 9) for sg in m.signals}
    )
    with pytest.raises(ValueError, match="needs 1 vision view"):
        m.select(short)


def test_fopru_cls_view_and_int_budget_split():
    # "full" strategy on a CLS tower: the CLS visual token is always kept and not counted
    layout = Layout((GridView("cls", 0, 1, 1), GridView("base", 1, 4, 4)))
    sig = torch.arange(17.0)[None, None]  # column j = j: the last patches score highest
    tokens = VisualTokens(torch.zeros(17, 4), layout, signals={VitAttention(-2, "received"): sig})
    assert FoPru(keep=3, significance="received").select(tokens).indices.tolist() == [0, 14, 15, 16]
    # AnyRes-like: int budget spread over views by their sizes (16 : 48 -> 2 : 6 of 8)
    crops = GridView("crops", 16, 4, 12, newline=True, tiles=(1, 3), tile_shape=(4, 4))
    lay = Layout((GridView("base", 0, 4, 4), crops))
    sig = torch.rand(4, 1, 17, generator=torch.Generator().manual_seed(0))
    sel = FoPru(keep=8, newlines="drop", significance="received").select(
        VisualTokens(torch.zeros(lay.num_tokens, 4), lay, signals={VitAttention(-2, "received"): sig})
    )
    assert int((sel.indices < 16).sum()) == 2 and sel.num_kept == 8


# -- AIM merging -------------------------------------------------------------------------------------------


def test_aim_keep_all_equals_unpatched(llava):
    batch = llava_batch()
    ref_seq, ref_logits = _gen(llava, batch)
    mmc.compress(llava, "aim_merge", keep=1.0)
    seq, logits = _gen(llava, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("weighting", ["unweighted", "size"])
@pytest.mark.parametrize("order", ["anchor", "official"])
def test_aim_llava_merged_features_reach_the_llm(weighting, order, llava):
    batch = llava_batch()
    with torch.no_grad():
        feats = llava.model.get_image_features(
            pixel_values=batch["pixel_values"], return_dict=True
        ).pooler_output
    method = AIMMerge(keep=0.25, weighting=weighting, order=order)
    expect = [method.select(VisualTokens(f, Layout.single(4, 4))) for f in feats]
    seen = {}

    def grab(mod, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    h = llava.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        mmc.compress(llava, method)
        llava(**batch)
    finally:
        h.remove()
    rep = mmc.report(llava)
    assert rep.tokens_out == [4, 4]  # 16 -> 8 -> 4
    emb = seen["embeds"]
    for row, (sel, suffix) in enumerate(zip(expect, (2, 3))):
        assert rep.kept[row] == sel.indices.tolist()
        end = emb.shape[1] - suffix - 1  # [... IMG*K, 3, suffix]
        assert torch.equal(emb[row, end - 4 : end], sel.features)
        assert int(sel.weights.sum()) == 16 and bool((sel.groups >= 0).all())


def test_aim_each_image_decides_and_cache_consistent(llava, llava_next):
    for model, batch in ((llava, llava_batch()), (llava_next, next_batch(llava_next))):
        mmc.compress(model, "aim_merge", keep=0.3)
        seq, logits = _gen(model, batch)
        both = mmc.report(model).kept
        seq2, logits2 = _gen(model, batch, use_cache=False)
        assert torch.equal(seq, seq2) and (logits - logits2).abs().max() < LOGIT_TOL
        L = batch["input_ids"].shape[1]
        for row in range(2):
            alone = _alone(batch, row)
            s1, _ = _gen(model, alone)
            assert mmc.report(model).kept == [both[row]]
            assert torch.equal(s1[0, alone["input_ids"].shape[1] :], seq[row, L:])


def test_aim_next_groups_views_and_drops_newlines(llava_next):
    batch = next_batch(llava_next)
    with torch.no_grad():
        feats = llava_next.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        ).pooler_output
    mmc.compress(llava_next, "aim_merge", keep=0.25)
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    for img, f in zip(rep.images, feats):
        base, crops = img.layout.views
        nl = img.layout.newline_mask()
        sel = AIMMerge(keep=0.25).select(VisualTokens(f, img.layout))
        assert sel.indices.tolist() == img.kept
        assert bool((sel.groups[nl] == -1).all()) and bool((sel.groups[~nl] >= 0).all())
        assert not bool(nl[sel.indices].any())
        n_crops = crops.rows * crops.cols
        assert sel.num_kept == 4 + round(0.25 * n_crops)
        # merging never crosses the thumbnail / crops boundary
        assert bool((sel.groups[:16] < 4).all()) and bool((sel.groups[16:][~nl[16:]] >= 4).all())
        assert int(sel.weights[:4].sum()) == 16 and int(sel.weights.sum()) == 16 + n_crops
        # the crops group alone, through the kernel, gives the same features
        cells = crops.grid_indices().flatten()
        res = aim_merge_torch(f[cells], aim_merge_schedule(n_crops, round(0.25 * n_crops)))
        perm = torch.argsort(res.anchor)
        assert torch.equal(sel.features[4:], res.features[perm])
        assert torch.equal(sel.indices[4:], cells[res.anchor[perm]])


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kw,err,match",
    [
        (FoPru, dict(keep=0), ValueError, r"keep=0 is not allowed"),
        (FoPru, dict(keep=1.5), ValueError, r"keep=1.5 is not allowed"),
        (FoPru, dict(keep="all"), TypeError, r"keep must be an int"),
        (
            FoPru,
            dict(strategy="col"),
            ValueError,
            r"strategy='col' is not allowed; choose one of \('rank', 'row'\)",
        ),
        (FoPru, dict(layer=1.5), TypeError, r"layer must be an int, got 1.5"),
        (FoPru, dict(newlines="some"), ValueError, r"newlines='some' is not allowed"),
        (AIMMerge, dict(keep=-2), ValueError, r"keep=-2 is not allowed"),
        (AIMMerge, dict(weighting="mean"), ValueError, r"weighting='mean' is not allowed; choose one of"),
        (AIMMerge, dict(order="raster"), ValueError, r"order='raster' is not allowed"),
        (AIMMerge, dict(backend="cuda"), ValueError, r"backend='cuda' is not allowed"),
    ],
)
def test_config_validation(cls, kw, err, match):
    with pytest.raises(err, match=match):
        cls(**kw)


def test_configs_registered_and_round_trip():
    assert {"fopru", "aim_merge"} <= set(mmc.available_methods())
    for cfg in (
        mmc.FoPru(keep=0.2, strategy="row", newlines="drop"),
        mmc.AIMMerge(keep=64, weighting="size"),
    ):
        assert MethodConfig.from_json(cfg.to_json()) == cfg
    assert mmc.FoPru().to_dict() == {
        "method": "fopru",
        "keep": 1 / 9,
        "strategy": "rank",
        "layer": -2,
        "newlines": "keep",
        "significance": "received",
    }


def test_model_level_errors(llava):
    batch = llava_batch()
    with pytest.raises(ValueError, match=r"keep=17 exceeds the 16 visual tokens"):
        mmc.compress(llava, "fopru", keep=17)
    with pytest.raises(ValueError, match=r"asks for vision layer 7; the tower has 3 layers"):
        mmc.compress(llava, "fopru", layer=7)
    assert "forward" not in llava.__dict__  # a failed compress leaves the model as it was
    mmc.compress(llava, "fopru", keep=4)
    with torch.no_grad():
        enc = llava.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    enc = type(enc)(**{**dict(enc.items()), "pooler_output": [f.clone() for f in enc.pooler_output]})
    kw = {k: v for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="needs vision-tower signals"):
        llava(**kw, mm_encoder_outputs={"image": enc})


def test_kernel_and_function_errors():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"r_list must be an int >= 0"):
        aim_merge_torch(x, [2, -1])
    with pytest.raises(ValueError, match=r"metric must be \[F, T, C\]"):
        aim_merge_torch(x, [2], metric=torch.randn(2, 7, 3))
    with pytest.raises(TypeError, match="must be a float tensor"):
        aim_merge_torch(torch.ones(2, 8, 4, dtype=torch.long), [2])
    with pytest.raises(ValueError, match=r"x must be \[T, D\] or \[F, T, D\]"):
        aim_merge_torch(torch.randn(8), [2])
    with pytest.raises(ValueError, match="weighting='max' is not allowed"):
        aim_merge_torch(x, [2], weighting="max")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        aim_merge(x, [2], backend="triton")
    with pytest.raises(ValueError, match=r"scores must be \[n, n\] or \[heads, n, n\]"):
        fopru_significance(torch.randn(3, 4))
    with pytest.raises(ValueError, match="tie='both' is not allowed"):
        fopru_significance(torch.randn(4, 4), tie="both")
    with pytest.raises(ValueError, match=r"k=5 is out of range \[0, 4\]"):
        fopru_rank(torch.randn(4), 5)
    with pytest.raises(ValueError, match=r"n_rows=3 is out of range \[0, 2\]"):
        fopru_rows(torch.randn(2, 2), 3)


def test_merge_edge_cases():
    x = torch.randn(3, 5, 4)
    res = aim_merge_torch(x, [0, 1, 10])  # r=0: no-op; r is clamped to T // 2
    assert res.r_effective == [0, 1, 2] and res.features.shape == (3, 2, 4)
    assert torch.equal(res.sizes.sum(-1), torch.full((3,), 5))
    one = aim_merge_torch(torch.randn(1, 1, 4), [1])  # a single token cannot merge
    assert one.r_effective == [0] and one.features.shape == (1, 1, 4)
    flat = aim_merge_torch(x[0], [2])  # 2-D input: one frame, squeezed back
    assert flat.features.shape == (3, 4) and flat.slot.shape == (5,)
    with pytest.raises(ValueError, match="need t0 >= 0 and k >= 1"):
        aim_merge_schedule(10, 0)
