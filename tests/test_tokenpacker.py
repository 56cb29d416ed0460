"""TokenPacker (spec ``specs/tokenpacker-seed-lavit.md`` §1): the projector math, the transformers LLaVA
drop-in (token and placeholder counts, generate, reversibility), the official checkpoint layout, and the
high-resolution patch-divide variant. Tiny random models only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models import llava_batch, text_config, tiny_llava
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

import mmcompress as mmc
from mmcompress import zoo
from mmcompress.adapters.hf_llava_tokenpacker import hf_to_official_llava, resolve_layers
from mmcompress.projectors import (
    TokenPacker,
    TokenPackerConfig,
    assemble_hd,
    hd_token_count,
    install_tokenpacker,
    load_official_state,
    load_tokenpacker_llava,
    num_image_tokens,
    official_llava_to_hf,
    read_official_projector,
    save_tokenpacker_llava,
    slice_image,
    slice_plan,
    uninstall_tokenpacker,
)
from mmcompress.projectors.tokenpacker import (
    PATCH_CANDIDATES,
    config_from_state,
    downsample_queries,
    group_regions,
    official_state_shapes,
)
from mmcompress.zoo.text import build_tokenizer

SIDE, PATCH, GRID = 96, 8, 12  # 12x12 patch grid: scales 2 / 3 / 4 give 36 / 16 / 9 tokens
LAYERS = [1, 2, 3, 4]  # every layer of the 4-layer tiny tower (the default rule needs >= 8 layers)


# -- helpers ----------------------------------------------------------------------------------------------
def grid12_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 shaped with a 12x12 CLIP patch grid (so 2, 3 and 4 all divide it); 144 visual tokens."""
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=SIDE,
        patch_size=PATCH,
    )
    tok = build_tokenizer()
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=text_config(),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=GRID * GRID,
    )
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


def processor() -> LlavaProcessor:
    tok = build_tokenizer()
    tok.padding_side = "left"
    improc = LlavaImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    return LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def pictures(sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


PROMPTS = ["<image> question: what color is the star ?", "<image> what"]


def small_config(**kw) -> TokenPackerConfig:
    base = dict(
        vision_hidden_size=8,
        num_levels=2,
        raw_grid=6,
        scale_factor=2,
        embed_dim=8,
        num_heads=2,
        text_hidden_size=12,
    )
    return TokenPackerConfig(**{**base, **kw})


def spec_table(c: int, kv: int, e: int, h: int) -> dict[str, tuple[int, ...]]:
    """The §1.3 key/shape table, written out independently of the module."""
    return {
        "q_proj_1.weight": (e, c),
        "k_proj_1.0.weight": (e, kv),
        "k_proj_1.0.bias": (e,),
        "k_proj_1.2.weight": (e, e),
        "k_proj_1.2.bias": (e,),
        "v_proj_1.0.weight": (e, kv),
        "v_proj_1.0.bias": (e,),
        "v_proj_1.2.weight": (e, e),
        "v_proj_1.2.bias": (e,),
        "ln_q_1.weight": (e,),
        "ln_q_1.bias": (e,),
        "ln_k_1.weight": (e,),
        "ln_k_1.bias": (e,),
        "ln_v_1.weight": (e,),
        "ln_v_1.bias": (e,),
        "clip_attn.in_proj_weight": (3 * e, e),
        "clip_attn.in_proj_bias": (3 * e,),
        "clip_attn.out_proj.weight": (e, e),
        "clip_attn.out_proj.bias": (e,),
        "mlp.0.weight": (h, e),
        "mlp.0.bias": (h,),
        "mlp.2.weight": (h, h),
        "mlp.2.bias": (h,),
    }


def random_official_state(table: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in table.items()}


def reference_forward(p: TokenPacker, single: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
    """Per query, per head, written out from §1.2 with explicit loops (no shared code with the module)."""
    cfg = p.config
    G, s, e, nh = cfg.raw_grid, cfg.scale_factor, cfg.embed_dim, cfg.num_heads
    g, d = G // s, e // nh
    b = single.shape[0]
    fmap = single.reshape(b, G, G, -1).permute(0, 3, 1, 2).float()
    q_low = F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    q = p.ln_q_1(q_low @ p.q_proj_1.weight.T)  # [b, g, g, e]
    k = p.ln_k_1(p.k_proj_1(multi)).reshape(b, G, G, e)
    v = p.ln_v_1(p.v_proj_1(multi)).reshape(b, G, G, e)
    wq, wk, wv = p.clip_attn.in_proj_weight.chunk(3)
    bq, bk, bv = p.clip_attn.in_proj_bias.chunk(3)
    out = torch.empty(b, g, g, e)
    for bi in range(b):
        for i in range(g):
            for j in range(g):
                keys = k[bi, s * i : s * i + s, s * j : s * j + s].reshape(s * s, e)
                vals = v[bi, s * i : s * i + s, s * j : s * j + s].reshape(s * s, e)
                qq = (q[bi, i, j] @ wq.T + bq).reshape(nh, d)
                kk = (keys @ wk.T + bk).reshape(s * s, nh, d)
                vv = (vals @ wv.T + bv).reshape(s * s, nh, d)
                att = torch.softmax(torch.einsum("hd,nhd->hn", qq, kk) / d**0.5, dim=-1)
                heads = torch.einsum("hn,nhd->hd", att, vv).reshape(e)
                out[bi, i, j] = heads @ p.clip_attn.out_proj.weight.T + p.clip_attn.out_proj.bias
    return p.mlp(out.reshape(b, g * g, e))


# -- the projector ----------------------------------------------------------------------------------------
def test_official_shapes_and_parameter_count():
    """§1.3 key table and the [I] parameter counts 36,722,688 (H=4096) / 47,210,496 (H=5120)."""
    for h, count in ((4096, 36_722_688), (5120, 47_210_496)):
        with torch.device("meta"):
            p = TokenPacker(TokenPackerConfig(text_hidden_size=h))
        assert sum(x.numel() for x in p.parameters()) == count
        table = spec_table(1024, 4096, 1024, h)
        assert {k: tuple(v.shape) for k, v in p.state_dict().items()} == table
        assert official_state_shapes(p.config) == table
    # shapes do not depend on s: a 144-token and a 36-token checkpoint fit the same module
    assert official_state_shapes(TokenPackerConfig(scale_factor=4)) == official_state_shapes(
        TokenPackerConfig()
    )


def test_token_counts_and_config_errors():
    assert [num_image_tokens(24, s) for s in (2, 3, 4)] == [144, 64, 36]
    assert TokenPackerConfig(scale_factor=3).num_tokens == 64
    with pytest.raises(
        ValueError, match=r"scale_factor=5 does not divide the 24x24 patch grid; allowed: \[1, 2, 3, 4, 6"
    ):
        TokenPackerConfig(scale_factor=5)
    with pytest.raises(ValueError, match=r"scale_factor=0 is out of range"):
        TokenPackerConfig(scale_factor=0)
    with pytest.raises(TypeError, match="scale_factor must be an int, got '2'"):
        TokenPackerConfig(scale_factor="2")
    with pytest.raises(ValueError, match=r"num_heads=3 does not divide embed_dim=1024"):
        TokenPackerConfig(num_heads=3)
    with pytest.raises(ValueError, match="unknown fields"):
        TokenPackerConfig.from_dict({"scale": 2})
    assert TokenPackerConfig.from_dict(small_config().to_dict()) == small_config()


def test_downsampling_is_pooling_or_centre_pick():
    """§1.2 step 1 on its sampling grid: s=2 = 2x2 mean, s=3 = centre patch, s=4 = mean of the central 2x2."""
    x = torch.randn(2, 12 * 12, 5)
    fmap = x.reshape(2, 12, 12, 5).permute(0, 3, 1, 2)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(2, -1, 5)  # noqa: E731
    torch.testing.assert_close(downsample_queries(x, 12, 2), flat(F.avg_pool2d(fmap, 2)), rtol=0, atol=1e-6)
    assert torch.equal(downsample_queries(x, 12, 3), flat(fmap[:, :, 1::3, 1::3]))
    central = (
        fmap[:, :, 1::4, 1::4] + fmap[:, :, 1::4, 2::4] + fmap[:, :, 2::4, 1::4] + fmap[:, :, 2::4, 2::4]
    ) / 4
    torch.testing.assert_close(downsample_queries(x, 12, 4), flat(central), rtol=0, atol=1e-6)


@pytest.mark.parametrize("s", [2, 3])
def test_group_regions_layout(s):
    """§1.2 step 4: column r*B + b holds region r (row-major) of image b, its patches row-major."""
    G, B = 6, 2
    g = G // s
    t = (torch.arange(B)[:, None] * 1000 + torch.arange(G * G)[None, :]).float()[..., None]  # [B, 36, 1]
    out = group_regions(t, G, s)[..., 0]
    assert out.shape == (s * s, g * g * B)
    want = torch.empty(s * s, g * g * B)
    for i in range(g):
        for j in range(g):
            for b in range(B):
                for a in range(s):
                    for c in range(s):
                        want[a * s + c, (i * g + j) * B + b] = b * 1000 + (s * i + a) * G + (s * j + c)
    assert torch.equal(out, want)


@pytest.mark.parametrize("s", [2, 3])
def test_forward_matches_written_out_reference(s):
    torch.manual_seed(0)
    p = TokenPacker(small_config(scale_factor=s)).eval()
    single, multi = torch.randn(2, 36, 8), torch.randn(2, 36, 16)
    with torch.no_grad():
        out = p(single, multi)
        assert out.shape == (2, (6 // s) ** 2, 12)
        torch.testing.assert_close(out, reference_forward(p, single, multi), rtol=1e-5, atol=1e-5)


def test_each_query_sees_only_its_region():
    """Spec §4: permuting patches inside a region leaves the output unchanged; moving one to another region
    changes exactly the two regions involved."""
    torch.manual_seed(1)
    p = TokenPacker(small_config()).eval()
    with torch.no_grad():  # unit-scale weights, so a changed region shows up far above rounding
        for x in p.parameters():
            x.normal_()
    single, multi = torch.randn(1, 36, 8), torch.randn(1, 36, 16)
    swap = lambda t, a, b: t.index_copy(1, torch.tensor([a, b]), t[:, [b, a]])  # noqa: E731
    with torch.no_grad():
        base = p(single, multi)
        inside = p(single, swap(multi, 0, 7))  # patches (0,0) and (1,1): region 0
        torch.testing.assert_close(inside, base, rtol=1e-5, atol=1e-5)
        across = p(single, swap(multi, 0, 2))  # (0,0) in region 0, (0,2) in region 1
    diff = (across - base).abs().amax(-1)[0]
    assert (diff[:2] > 1e-2).all() and (diff[2:] == 0).all()


def test_scale_one_ignores_the_query():
    """§1.5 sanity: with s=1 each query has one key, so out = MLP(out_proj(W_v LN_v(MLP_v(multi)) + b_v))."""
    torch.manual_seed(2)
    p = TokenPacker(small_config(scale_factor=1)).eval()
    multi = torch.randn(2, 36, 16)
    with torch.no_grad():
        a, b = p(torch.randn(2, 36, 8), multi), p(torch.randn(2, 36, 8), multi)
        _, wv = p.clip_attn.in_proj_weight.split([16, 8])
        bv = p.clip_attn.in_proj_bias[16:]
        v = p.ln_v_1(p.v_proj_1(multi)) @ wv.T + bv
        want = p.mlp(p.clip_attn.out_proj(v))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)


def test_forward_rejects_cls_and_wrong_widths():
    p = TokenPacker(small_config())
    with pytest.raises(ValueError, match="37 tokens per view do not form the 6x6 patch grid .*CLS"):
        p(torch.randn(1, 37, 8), torch.randn(1, 37, 16))
    with pytest.raises(ValueError, match=r"multi must be \[1, 36, 16\]"):
        p(torch.randn(1, 36, 8), torch.randn(1, 36, 24))


# -- layers ------------------------------------------------------------------------------------------------
def test_resolve_layers():
    # official CLIP-L/336: keys/values from 12, 16, 22, 23; queries from -2 = 23 (already in the stack)
    assert resolve_layers(24, -2) == ([12, 16, 22, 23], 3, 4)
    # the embedded model: vision_feature_layer [4, -1] on a 12-layer DINOv2; queries from the final layer
    assert resolve_layers(12, [4, -1]) == ([4, 12], 1, 2)
    assert resolve_layers(12, -2, feature_layers=[2, 5], query_layer=-1) == ([2, 5, 12], 2, 2)
    assert resolve_layers(12, -2) == ([6, 8, 10, 11], 3, 4)  # the spec's small-scale rule; -2 = 11
    with pytest.raises(ValueError, match=r"feature_layers=30 is not a hidden-state index of this 12-layer"):
        resolve_layers(12, -2, feature_layers=[4, 30])
    with pytest.raises(ValueError, match="repeats a layer"):
        resolve_layers(12, -2, feature_layers=[4, -9])
    with pytest.raises(ValueError, match="pass feature_layers explicitly"):
        resolve_layers(4, -2)
    with pytest.raises(ValueError, match="query_layer=13"):
        resolve_layers(12, -2, feature_layers=[4], query_layer=13)


# -- the transformers LLaVA drop-in -------------------------------------------------------------------------
@pytest.mark.parametrize("s", [2, 3, 4])
def test_llava_drop_in_counts_and_generate(s):
    model, proc = grid12_llava(), processor()
    packer = install_tokenpacker(model, proc, scale=s, feature_layers=LAYERS)
    m = (GRID // s) ** 2
    assert model.model.multi_modal_projector is packer and packer.num_tokens == m
    assert model.config.image_seq_length == m and proc.patch_size == PATCH * s
    inputs = proc(images=pictures([(SIDE, SIDE)] * 2), text=PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == proc.tokenizer.image_token_id).sum(1).tolist() == [m, m]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert [tuple(f.shape) for f in feats] == [(m, 64)] * 2
        logits = model(**inputs).logits
        assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    assert out.shape == (2, n + 3) and torch.equal(out[:, :n], inputs["input_ids"])


def test_pruning_on_top_of_tokenpacker():
    """A pre-LLM method sees the packed (G/s)^2 grid: the layout follows the TokenPacker scale."""
    import mmcompress as mmc

    model, proc = grid12_llava(), processor()
    install_tokenpacker(model, proc, scale=2, feature_layers=LAYERS)
    inputs = proc(images=pictures([(SIDE, SIDE)] * 2), text=PROMPTS, return_tensors="pt", padding=True)
    mmc.compress(model, "pool", keep=9)  # 6x6 packed grid pooled to 3x3
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    rep = mmc.report(model)
    assert rep.tokens_in == [36, 36] and rep.tokens_out == [9, 9]
    assert [(v.rows, v.cols) for v in rep.images[0].layout.views] == [(6, 6)]
    mmc.restore(model)


def test_projector_reads_the_named_hidden_states():
    model = grid12_llava()
    pv = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
        for feature_layers, query_layer, stack in (([1, 3], None, [1, 3]), ([1, 3], 2, [1, 3, 2])):
            packer = install_tokenpacker(
                model, scale=2, feature_layers=feature_layers, query_layer=query_layer
            )
            assert model.config.vision_feature_layer == stack
            q = query_layer if query_layer is not None else feature_layers[-1]
            want = packer(hs[q][:, 1:], torch.cat([hs[i][:, 1:] for i in feature_layers], -1))
            got = torch.stack(model.model.get_image_features(pixel_values=pv).pooler_output)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_tiny_llava_from_tiny_models():
    model = tiny_llava()  # 32 px, 8 px patches: a 4x4 grid, 3-layer CLIP
    install_tokenpacker(model, scale=2, feature_layers=[1, 2, 3])
    batch = llava_batch(n_tokens=4)
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
        out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match=r"scale=3 does not divide the 4x4 patch grid; allowed: \[1, 2, 4\]"):
        install_tokenpacker(tiny_llava(), scale=3, feature_layers=[1, 2, 3])
    # SigLIP has no CLS, so the 'full' strategy already gives the bare patch grid
    siglip = tiny_llava("siglip")
    install_tokenpacker(siglip, scale=4, feature_layers=[1, 2])
    with torch.no_grad():
        assert (
            siglip(**llava_batch(n_tokens=1)).logits.shape[1] == llava_batch(n_tokens=1)["input_ids"].shape[1]
        )
    clip_full = tiny_llava()
    clip_full.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full' keeps 1 CLS"):
        install_tokenpacker(clip_full, scale=2, feature_layers=[1, 2, 3])
    with pytest.raises(TypeError, match="supports transformers LlavaForConditionalGeneration"):
        install_tokenpacker(torch.nn.Linear(2, 2))


def test_uninstall_is_bit_identical_and_install_replaces():
    model, proc = grid12_llava(), processor()
    inputs = proc(images=pictures([(SIDE, SIDE)]), text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    mlp = model.model.multi_modal_projector
    install_tokenpacker(model, proc, scale=2, feature_layers=LAYERS)
    install_tokenpacker(model, proc, scale=4, feature_layers=LAYERS)  # replaces, does not stack
    assert proc.patch_size == PATCH * 4 and model.config.image_seq_length == 9
    uninstall_tokenpacker(model)
    assert model.model.multi_modal_projector is mlp and proc.patch_size == PATCH
    assert model.config.vision_feature_layer == -2 and model.config.image_seq_length == GRID * GRID
    assert "tokenpacker" not in model.config.to_dict()
    assert not hasattr(model, "_mmcompress_tokenpacker")
    assert all(not k.startswith("model.multi_modal_projector.q_proj") for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(
            model(**proc(images=pictures([(SIDE, SIDE)]), text=PROMPTS[:1], return_tensors="pt")).logits,
            before,
        )
    with pytest.raises(ValueError, match="no TokenPacker is installed"):
        uninstall_tokenpacker(model)
    assert mmc.projectors.install_tokenpacker is install_tokenpacker


def test_save_load_round_trip(tmp_path):
    model, proc = grid12_llava(), processor()
    install_tokenpacker(model, proc, scale=3, feature_layers=LAYERS)
    inputs = proc(images=pictures([(SIDE, SIDE)] * 2), text=PROMPTS, return_tensors="pt", padding=True)
    save_tokenpacker_llava(model, proc, tmp_path)
    loaded, proc2 = load_tokenpacker_llava(tmp_path)
    again = proc2(images=pictures([(SIDE, SIDE)] * 2), text=PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert (again["input_ids"] == proc2.tokenizer.image_token_id).sum(1).tolist() == [16, 16]
    with torch.no_grad():
        assert torch.equal(loaded(**again).logits, model(**inputs).logits)
    # zoo.load (what `mmcompress compare --model FOLDER` uses) recognises the folder and installs TokenPacker
    zoo_model, zoo_proc = zoo.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(zoo_model(**again).logits, model(**inputs).logits)
    assert zoo_model.config.tokenpacker["scale"] == 3
    uninstall_tokenpacker(loaded)
    assert proc2.patch_size == PATCH
    grid12_llava().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'tokenpacker' entry"):
        load_tokenpacker_llava(tmp_path / "plain")


# -- the official checkpoint layout ---------------------------------------------------------------------
def test_official_layout_round_trip(tmp_path):
    """Random tensors saved in the §1.3 layout (stage-1 mm_projector.bin, a sharded full checkpoint, a
    safetensors file) load 1:1; the 32-wide tiny tower with 4 levels and a 64-wide LM."""
    table = spec_table(32, 128, 32, 64)
    state = random_official_state(table)
    torch.save({"model.mm_projector." + k: v for k, v in state.items()}, tmp_path / "mm_projector.bin")
    # a checkpoint "trained at s=2" loads at s=3: weight shapes do not depend on s
    model, proc = grid12_llava(), processor()
    packer = install_tokenpacker(model, proc, scale=3, feature_layers=LAYERS, weights=tmp_path)
    got = packer.state_dict()
    assert set(got) == set(table) and all(torch.equal(got[k], v) for k, v in state.items())
    assert config_from_state(state, raw_grid=GRID) == packer.config.replace(scale_factor=2)

    # full LLaVA checkpoint in two shards with an index: only the projector shards are read
    full = tmp_path / "full"
    full.mkdir()
    keys = sorted(state)
    shard1 = {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)} | {
        "model.mm_projector." + k: state[k] for k in keys[:10]
    }
    shard2 = {"model.mm_projector." + k: state[k] for k in keys[10:]} | {"lm_head.weight": torch.zeros(2, 2)}
    torch.save(shard1, full / "pytorch_model-00001-of-00002.bin")
    torch.save(shard2, full / "pytorch_model-00002-of-00002.bin")
    wmap = {k: "pytorch_model-00001-of-00002.bin" for k in shard1} | {
        k: "pytorch_model-00002-of-00002.bin" for k in shard2
    }
    (full / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    read = read_official_projector(full)
    assert set(read) == set(table) and all(torch.equal(read[k], state[k]) for k in keys)

    from safetensors.torch import save_file

    save_file({"model.mm_projector." + k: v for k, v in state.items()}, str(tmp_path / "proj.safetensors"))
    p = load_official_state(
        TokenPacker(config_from_state(state, raw_grid=GRID)), tmp_path / "proj.safetensors"
    )
    assert all(torch.equal(p.state_dict()[k], v) for k, v in state.items())


def test_official_layout_errors(tmp_path):
    table = spec_table(32, 128, 32, 64)
    cfg = TokenPackerConfig(
        vision_hidden_size=32, num_levels=4, raw_grid=GRID, embed_dim=32, num_heads=1, text_hidden_size=64
    )
    state = random_official_state(table)
    wrong = dict(state, **{"k_proj_1.0.weight": torch.zeros(32, 96)})  # a 3-level checkpoint's shape
    torch.save({"model.mm_projector." + k: v for k, v in wrong.items()}, tmp_path / "mm_projector.bin")
    with pytest.raises(
        ValueError, match=r"key 'k_proj_1.0.weight' has shape \(32, 96\), expected \(32, 128\)"
    ):
        load_official_state(TokenPacker(cfg), tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"key 'mlp.0.weight' has shape \(64, 32\), expected \(80, 32\)"):
        load_official_state(TokenPacker(cfg.replace(text_hidden_size=80)), state)
    missing = {k: v for k, v in state.items() if k != "ln_q_1.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['ln_q_1.bias'\], unexpected keys \[\]"):
        load_official_state(TokenPacker(cfg), missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_official_state(TokenPacker(cfg), dict(state, **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(FileNotFoundError):
        read_official_projector(tmp_path / "nowhere")


def test_official_llava_key_mapping():
    model = grid12_llava()
    install_tokenpacker(model, scale=2, feature_layers=LAYERS)
    hf = model.state_dict()
    official = hf_to_official_llava(hf)
    prefixes = ("model.mm_projector.", "model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")
    assert all(k.startswith((*prefixes, "model.vision_tower.vision_tower.")) for k in official)
    assert "model.mm_projector.clip_attn.in_proj_weight" in official
    back = official_llava_to_hf(official)
    assert set(back) == set(hf) and all(back[k] is hf[k] for k in hf)
    with pytest.raises(ValueError, match="key 'model.mm_projector_extra' has no transformers counterpart"):
        official_llava_to_hf({"model.mm_projector_extra": torch.zeros(1)})


# -- TokenPacker-HD (§1.4) ----------------------------------------------------------------------------------
def test_slice_plan():
    assert [len(PATCH_CANDIDATES[n]) for n in (9, 16, 25)] == [23, 36, 57]
    assert PATCH_CANDIDATES[25].count((4, 6)) == 2  # listed twice, as officially
    # a 336 square: (1,1) scores 1 + 0.1 * 336²/470.4² = 1.051 > (2,2)'s 1 + 0.1 * 470.4²/672² = 1.049
    assert slice_plan(336, 336) == (1, 1)
    assert slice_plan(336, 672) == (1, 2) and slice_plan(672, 336) == (2, 1)
    # a 672 square: (3,3) (box 1008² ≈ 1.4 * 672 = 940.8) beats (2,2): IoU 0.871 vs 0.510, both fill 1
    assert slice_plan(672, 672) == (3, 3)
    assert slice_plan(672, 672, patch_num=16) == (3, 3)
    with pytest.raises(ValueError, match=r"patch_num=10 is not allowed; choose one of \(9, 16, 25\)"):
        slice_plan(336, 336, patch_num=10)


def test_slice_image():
    torch.manual_seed(0)
    img = torch.randn(3, 96, 192)  # h=96, w=192 -> plan (1, 2), no resize needed
    views, plan = slice_image(img, block=96)
    assert plan == (1, 2) and views.shape == (3, 3, 96, 96)
    assert torch.equal(views[0], img[:, :, :96]) and torch.equal(views[1], img[:, :, 96:])
    # global view: the canvas resized to the fitted 48x96, top-left on a zero 96x96 canvas
    want = F.interpolate(img[None], size=(48, 96), mode="bilinear", align_corners=False)[0]
    assert torch.equal(views[2, :, :48], want) and (views[2, :, 48:] == 0).all()
    single, plan = slice_image(torch.randn(3, 96, 96), block=96)
    assert plan == (1, 1) and single.shape == (1, 3, 96, 96)
    with pytest.raises(ValueError, match=r"must be \[3, H, W\], got shape \(4, 96, 96\)"):
        slice_image(torch.randn(4, 96, 96), block=96)


@pytest.mark.parametrize("plan", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 3)])
def test_hd_token_count_matches_assembly(plan):
    hb, wb = plan
    n = hb * wb
    m, h = 4, 5
    views = torch.randn(n + int(n > 1), m, h)
    sep, ret = torch.full((h,), -1.0), torch.full((h,), -2.0)
    seq = assemble_hd(views, hb, wb, sep, ret)
    assert seq.shape == (hd_token_count(hb, wb, m), h)
    # written out: per row "crop , crop , ... crop \n", then "global \n" when there is more than one crop
    want = []
    for i in range(hb):
        for j in range(wb):
            want.append(views[i * wb + j])
            if j < wb - 1:
                want.append(sep[None])
        want.append(ret[None])
    if n > 1:
        want += [views[n], ret[None]]
    assert torch.equal(seq, torch.cat(want))
    with pytest.raises(ValueError, match="view tokens"):
        assemble_hd(views[:1] if n > 1 else torch.randn(2, m, h), hb, wb, sep, ret)


def test_hd_drop_in_generate():
    model, proc = grid12_llava(), processor()
    packer = install_tokenpacker(model, proc, scale=2, feature_layers=LAYERS, patch_num=9)
    hdp = packer.hd_processor
    inputs = hdp(images=pictures([(96, 192), (96, 96)]), text=PROMPTS, padding=True)
    counts = [hd_token_count(1, 2, 36), hd_token_count(1, 1, 36)]  # 111, 37
    assert counts == [111, 37]
    assert (inputs["input_ids"] == proc.tokenizer.image_token_id).sum(1).tolist() == counts
    assert inputs["pixel_values"].shape == (4, 3, SIDE, SIDE) and inputs["image_sizes"].tolist() == [
        [96, 192],
        [96, 96],
    ]
    tok = proc.tokenizer
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
        assert [f.shape[0] for f in feats] == counts
        emb = model.get_input_embeddings()
        assert torch.equal(feats[0][36], emb(torch.tensor(tok.convert_tokens_to_ids(","))))
        assert torch.equal(feats[0][-1], emb(torch.tensor(tok.convert_tokens_to_ids("\n"))))
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="needs image_sizes"):
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="3 channels"):
        hdp.image_views(torch.zeros(4, 96, 96, dtype=torch.uint8))
    uninstall_tokenpacker(model)
    assert "get_image_features" not in model.model.__dict__
