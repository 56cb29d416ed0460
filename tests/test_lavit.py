"""LaVIT tokenizer (spec ``specs/tokenpacker-seed-lavit.md`` §3): config + registry, the official checkpoint
layouts and loader, the merger's attention masks, the keep decision (deterministic / official sampling /
straight-through), dynamic token counts, the cosine codebook (nearest code, round trips, EMA, k-means),
losses, end-to-end shapes with a tiny tower, and the LLM vocabulary. Tiny random modules only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2VisionConfig, Blip2VisionModel, LlamaConfig, LlamaForCausalLM

import mmcompress as mmc
from mmcompress.tokenizers import (
    LAVIT_OFFICIAL_LAYOUT,
    CosineCodebook,
    LavitConfig,
    LavitTokenizer,
    TokenizerConfig,
    get_tokenizer,
    kmeans,
    nearest_code,
)
from mmcompress.tokenizers.lavit import (
    causal_policy,
    cross_policy,
    keep_decision,
    load_official_state,
    official_state_shapes,
    policy_softmax,
)
from mmcompress.zoo.text import build_tokenizer

C, N, K, D, LLM = 32, 16, 64, 8, 20  # width, patches (16 px / 4 px), codes, code dim, vit_proj width
SMALL = dict(
    vision_hidden_size=C,
    image_size=16,
    patch_size=4,
    merger_layers=2,
    merger_heads=4,
    merger_intermediate_size=64,
    codebook_size=K,
    codebook_dim=D,
    llm_hidden_size=LLM,
    decoder=True,
    decoder_layers=1,
    decoder_heads=4,
    decoder_intermediate_size=64,
)


def small(seed: int = 0, **kw) -> LavitTokenizer:
    torch.manual_seed(seed)
    return LavitTokenizer(LavitConfig(**{**SMALL, **kw})).eval()


def feats(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, N, C, generator=torch.Generator().manual_seed(seed))


# -- config and registry ---------------------------------------------------------------------------
def test_defaults_are_the_official_model_and_round_trip_json():
    cfg = LavitConfig()
    assert (cfg.vision_hidden_size, cfg.num_patches, cfg.merger_layers, cfg.merger_heads) == (
        1408,
        256,
        12,
        16,
    )
    assert (cfg.merger_intermediate_size, cfg.codebook_size, cfg.codebook_dim) == (6144, 16384, 32)
    assert cfg.sample is False and cfg.min_tokens == 0 and cfg.llm_hidden_size == 4096
    for c in (cfg, LavitConfig(**SMALL)):
        assert json.loads(c.to_json())["tokenizer"] == "lavit"
        assert TokenizerConfig.from_json(c.to_json()) == c
    assert get_tokenizer("lavit") is LavitConfig and "lavit" not in mmc.available_methods()


@pytest.mark.parametrize(
    "kw,err,msg",
    [
        (
            dict(vision_hidden_size=33),
            ValueError,
            "vision_hidden_size=33 is not allowed: .* must be even and >= 4",
        ),
        (
            dict(patch_size=15),
            ValueError,
            r"patch_size=15 does not divide image_size=224; allowed: \[1, 2, 4",
        ),
        (dict(min_tokens=257), ValueError, r"min_tokens=257 is out of range \[0, 256\]"),
        (dict(merger_heads=5), ValueError, "merger_heads=5 does not divide vision_hidden_size=1408"),
        (dict(keep_ratio=1.5), ValueError, r"keep_ratio=1.5 is out of range \[0.0, 1.0\]"),
        (dict(tau=0), ValueError, r"tau=0 is out of range \(0.0"),
        (dict(sample=1), TypeError, "sample must be a bool"),
        (dict(llm_hidden_size=-1), ValueError, r"llm_hidden_size=-1 is out of range \[0, None\]"),
    ],
)
def test_bad_config_names_the_field(kw, err, msg):
    with pytest.raises(err, match=msg):
        LavitConfig(**kw)


# -- official checkpoint layouts --------------------------------------------------------------------------
def test_official_shapes_match_the_released_model():
    shapes = official_state_shapes(LavitConfig(decoder=True))
    expected = {  # modeling_visual_tokenzier.py / modeling_decoder.py names, spec §3.1-§3.2 shapes
        "token_predictor.in_conv.0.weight": (1408,),
        "token_predictor.in_conv.1.weight": (1408, 1408),
        "token_predictor.out_conv.0.weight": (704, 1408),
        "token_predictor.out_conv.2.weight": (352, 704),
        "token_predictor.out_conv.4.weight": (2, 352),
        "causal_encoder.blocks.0.norm0.weight": (1408,),
        "causal_encoder.blocks.11.token_causal_attn.qkv.weight": (4224, 1408),
        "causal_encoder.blocks.11.token_causal_attn.qkv.bias": (4224,),
        "causal_encoder.blocks.11.token_causal_attn.proj.bias": (1408,),
        "causal_encoder.blocks.5.token_cross_attn.query.weight": (1408, 1408),
        "causal_encoder.blocks.5.token_cross_attn.value.bias": (1408,),
        "causal_encoder.blocks.5.mlp.fc1.weight": (6144, 1408),
        "causal_encoder.blocks.5.mlp.fc2.weight": (1408, 6144),
        "causal_encoder.ln_vision.weight": (1408,),
        "causal_encoder.norm.bias": (1408,),
        "quantize.embedding.weight": (16384, 32),
        "encode_task_layer.0.weight": (1408, 1408),
        "encode_task_layer.2.weight": (32, 1408),
        "vit_proj.weight": (4096, 1408),
        "decoder.in_proj.weight": (1408, 32),
        "decoder.pos_embed": (1, 256, 1408),
        "decoder.query_embed": (1, 256, 1408),
        "decoder.blocks.11.self_attn.qkv.weight": (4224, 1408),
        "decoder.blocks.11.cross_attn.key.weight": (1408, 1408),
        "decoder.blocks.0.norm2.weight": (1408,),
        "decoder.norm.weight": (1408,),
        "decoder.decode_task_layer.2.weight": (1408, 1408),
    }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    assert not any(k.startswith("causal_encoder.blocks.12.") for k in shapes)
    assert not any(k.startswith("decoder.") for k in official_state_shapes())  # off by default
    # the encoder side holds about 0.41 B parameters (spec §3.7: tokenizer_encoder.bin is 808 MB in bf16)
    enc = sum(
        torch.Size(s).numel() for k, s in official_state_shapes().items() if not k.startswith("vit_proj")
    )
    assert 0.39e9 < enc < 0.42e9


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_loader_reads_the_official_files(tmp_path):
    tok = small()
    shapes = official_state_shapes(tok.config)
    encoder = _random({k: s for k, s in shapes.items() if not k.startswith(("decoder.", "vit_proj."))}, 1)
    encoder["encoder.blocks.0.attn.qkv.weight"] = torch.randn(3, 3)  # EVA tower keys are ignored
    visual_weight = _random(
        {k: s for k, s in shapes.items() if k.startswith(("vit_proj.", "causal_encoder.blocks.0.mlp"))}, 2
    )
    decoder = {k[len("decoder.") :]: v for k, v in _random(shapes, 3).items() if k.startswith("decoder.")}
    decoder["unet_proj.weight"] = torch.randn(768, C)  # the UNet head is ignored
    torch.save(encoder, tmp_path / "tokenizer_encoder.bin")
    torch.save(visual_weight, tmp_path / "visual_weight.bin")
    torch.save(decoder, tmp_path / "tokenizer_decoder.bin")
    reports = load_official_state(
        tok,
        tmp_path / "tokenizer_encoder.bin",
        visual_weight=tmp_path / "visual_weight.bin",
        decoder=tmp_path / "tokenizer_decoder.bin",
    )
    assert reports["encoder"].ignored == ["encoder.blocks.0.attn.qkv.weight"]
    assert reports["decoder"].ignored == ["unet_proj.weight"]
    checks = {  # hand-written module paths
        tok.token_predictor.out_conv[4].weight: encoder["token_predictor.out_conv.4.weight"],
        tok.causal_encoder.blocks[1].token_cross_attn.key.weight: encoder[
            "causal_encoder.blocks.1.token_cross_attn.key.weight"
        ],
        tok.causal_encoder.ln_vision.bias: encoder["causal_encoder.ln_vision.bias"],
        tok.quantize.embedding.weight: encoder["quantize.embedding.weight"],
        tok.encode_task_layer[2].bias: encoder["encode_task_layer.2.bias"],
        # visual_weight.bin is loaded over the encoder file (merger tuned with the LLM)
        tok.causal_encoder.blocks[0].mlp.fc1.weight: visual_weight["causal_encoder.blocks.0.mlp.fc1.weight"],
        tok.vit_proj.weight: visual_weight["vit_proj.weight"],
        tok.decoder.in_proj.weight: decoder["in_proj.weight"],
        tok.decoder.query_embed: decoder["query_embed"],
        tok.decoder.blocks[0].cross_attn.value.weight: decoder["blocks.0.cross_attn.value.weight"],
    }
    for p, v in checks.items():
        assert torch.equal(p, v)


def test_loader_errors_name_the_key():
    tok = small()
    shapes = official_state_shapes(tok.config)
    encoder = _random({k: s for k, s in shapes.items() if not k.startswith("decoder.")}, 1)
    bad = {**encoder, "causal_encoder.blocks.1.token_causal_attn.qkv.weight": torch.randn(3 * C, C + 1)}
    with pytest.raises(
        ValueError,
        match=r"key 'causal_encoder.blocks.1.token_causal_attn.qkv.weight' has shape \(96, 33\), "
        r"expected \(96, 32\)",
    ):
        load_official_state(tok, bad)
    missing = {k: v for k, v in encoder.items() if k != "token_predictor.in_conv.1.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['token_predictor.in_conv.1.bias'\]"):
        load_official_state(tok, missing)
    no_proj = {k: v for k, v in encoder.items() if not k.startswith("vit_proj.")}
    with pytest.raises(
        ValueError, match=r"missing keys \['vit_proj.bias', 'vit_proj.weight'\].*visual_weight"
    ):
        load_official_state(tok, no_proj)
    load_official_state(small(llm_hidden_size=0, decoder=False), no_proj)  # ids only: no projection needed
    with pytest.raises(ValueError, match="unexpected keys"):
        load_official_state(tok, {**encoder, "mystery": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"key 'in_proj.weight' has shape \(32, 9\), expected \(32, 8\)"):
        load_official_state(tok, decoder={"in_proj.weight": torch.zeros(C, D + 1)})
    with pytest.raises(ValueError, match="tokenizer has no decoder; build with decoder=True"):
        load_official_state(small(decoder=False), decoder={})


# -- the merger's masked attention ---------------------------------------------------------------------
def test_policy_softmax_is_the_official_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 5, generator=g)
    a = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    e = (s - s.amax(-1, keepdim=True)).exp() * a
    ref = (e + 1e-6 / 5) / (e.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(policy_softmax(s, a), ref, rtol=0, atol=0)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.float)
    assert torch.equal(causal_policy(keep)[0, 0], want)  # causal, kept only, plus itself
    assert torch.equal(cross_policy(keep)[0, 0], torch.tensor([[0.0, 1.0, 0.0, 1.0]]).expand(4, 4))


def test_merger_masks():
    tok = small()
    blk = tok.causal_encoder.blocks[0]
    # larger weights than the 0.02 init, so "is read" is far above the tolerance; not much larger: the
    # official softmax subtracts the max over *all* positions, so when masked scores dominate, the allowed
    # weights underflow and the eps / N floor takes over (a quirk of the official formula, kept)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = feats(1)
    keep = (torch.arange(N) % 3 != 1).float()[None]  # a fixed mix of kept and dropped tokens
    i = 9  # kept; 7 is dropped (7 % 3 == 1), 6 is kept, 12 is later
    with torch.no_grad():
        base = blk.token_causal_attn(x, keep)

        def moved(j: int) -> torch.Tensor:
            x2 = x.clone()
            x2[:, j] += torch.randn(C, generator=torch.Generator().manual_seed(j))
            return blk.token_causal_attn(x2, keep)

        # self-attention: token i never reads a later token or a dropped one (up to the official eps leak)
        for j in (12, 7):
            torch.testing.assert_close(moved(j)[:, i], base[:, i], rtol=0, atol=1e-5)
        assert (moved(6)[:, i] - base[:, i]).abs().amax() > 1e-3  # an earlier kept token is read
        # cross-attention: only dropped tokens of x_origin are read, from any position
        xo = tok.causal_encoder.ln_vision(x)
        cbase = blk.token_cross_attn(x, xo, keep)
        for j, read in ((6, False), (12, False), (7, True), (13, True)):
            xo2 = xo.clone()
            xo2[:, j] += torch.randn(C, generator=torch.Generator().manual_seed(j))
            diff = (blk.token_cross_attn(x, xo2, keep) - cbase).abs().amax()
            assert (diff > 1e-3) if read else (diff < 1e-5), j
        # all kept: nothing to fuse, and the official eps makes the cross-attention a uniform mean
        ones = torch.ones(1, N)
        attn = blk.token_cross_attn
        uniform = attn.proj(attn.value(xo).mean(dim=1, keepdim=True)).expand(1, N, C)
        torch.testing.assert_close(attn(x, xo, ones), uniform, rtol=1e-5, atol=1e-5)


# -- the keep decision and dynamic counts -------------------------------------------------------------
def test_keep_decision_modes():
    lp = F.log_softmax(torch.randn(4, N, 2, generator=torch.Generator().manual_seed(0)), dim=-1)
    det = keep_decision(lp, stochastic=False)
    assert torch.equal(det, (lp[..., 0] >= lp[..., 1]).float())
    torch.manual_seed(7)
    sampled = keep_decision(lp, stochastic=True)
    torch.manual_seed(7)
    official = F.gumbel_softmax(lp, hard=True)[:, :, 0]  # modeling_visual_tokenzier.py
    assert torch.equal(sampled, official)
    # straight-through: hard values, gradient reaches the log-probabilities
    lpg = lp.clone().requires_grad_(True)
    k = keep_decision(lpg, stochastic=True)
    assert set(k.unique().tolist()) <= {0.0, 1.0}
    k.sum().backward()
    assert lpg.grad.abs().sum() > 0


def test_dynamic_counts_and_deterministic_inference():
    tok = small()
    x = feats(4)
    out = tok(features=x)  # eval mode: argmax
    ref_mask = out.log_probs[..., 0] >= out.log_probs[..., 1]
    assert torch.equal(out.mask, ref_mask)
    assert torch.equal(out.counts, ref_mask.sum(1))
    assert len(set(out.counts.tolist())) > 1  # the count is per image
    ids = tok.encode(features=x)
    assert [len(i) for i in ids] == out.counts.tolist()
    assert torch.equal(torch.cat(ids), out.ids)
    # kept tokens in raster order, gathered from the merger output of the whole grid
    full = tok.causal_encoder(x, out.keep)
    assert torch.equal(out.merged, torch.cat([full[b, out.mask[b]] for b in range(4)]))
    # deterministic: repeated calls, and train mode, give the same ids unless sampling is asked for
    assert all(torch.equal(a, b) for a, b in zip(ids, tok.encode(features=x)))
    tok.train()
    assert all(torch.equal(a, b) for a, b in zip(ids, tok.encode(features=x)))
    tok.eval()
    torch.manual_seed(0)
    s1 = tok.tokenize(features=x, sample=True)[1]
    torch.manual_seed(0)
    s2 = tok.tokenize(features=x, sample=True)[1]
    torch.manual_seed(1)
    s3 = tok.tokenize(features=x, sample=True)[1]
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)  # official sampling: seeded, varies otherwise
    assert small(sample=True).config.sample  # the documented switch
    # the official sampled mask: same RNG stream as F.gumbel_softmax on the selector's log-probabilities
    torch.manual_seed(3)
    mask = tok.tokenize(features=x, sample=True)[1]
    torch.manual_seed(3)
    assert torch.equal(mask, F.gumbel_softmax(out.log_probs, hard=True)[..., 0].bool())


def test_extreme_selections_and_min_tokens():
    tok = small()
    x = feats(2)
    last = tok.token_predictor.out_conv[4]
    with torch.no_grad():
        last.bias.copy_(torch.tensor([20.0, -20.0]))
        assert [len(i) for i in tok.encode(features=x)] == [N, N]
        last.bias.copy_(torch.tensor([-20.0, 20.0]))
        ids = tok.encode(features=x)
        assert [len(i) for i in ids] == [0, 0]  # allowed officially
        assert tok.reconstruct_ids(ids).shape == (2, N, C)  # the decoder copes with no codes
        forced = LavitTokenizer(tok.config.replace(min_tokens=3))
        forced.load_state_dict(tok.state_dict())
        out = forced.eval()(features=x)
        assert out.counts.tolist() == [3, 3]
        score = out.log_probs[..., 0] - out.log_probs[..., 1]
        for b in range(2):
            assert set(out.mask[b].nonzero().flatten().tolist()) == set(score[b].topk(3).indices.tolist())


# -- the cosine codebook ----------------------------------------------------------------------------
def test_cosine_codebook_nearest_code_and_round_trip():
    tok = small()
    z = torch.randn(300, D, generator=torch.Generator().manual_seed(0))
    book = tok.quantize.weight.detach()
    assert torch.allclose(book.norm(dim=1), torch.ones(K))  # unit rows at init
    zn = F.normalize(z, dim=-1)
    brute = ((zn.double()[:, None] - book.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(tok.quantize.assign(z), brute)
    assert torch.equal(brute, (zn.double() @ book.double().t()).argmax(1))  # = max cosine for unit rows
    assert torch.equal(nearest_code(zn, book), brute)
    ids = torch.randint(0, K, (50,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(tok.ids_from_codes(tok.lookup(ids)), ids)
    assert torch.equal(tok.ids_from_codes(tok.lookup(torch.arange(K))), torch.arange(K))
    with pytest.raises(
        ValueError, match=r"holds 64 at position \(1,\), outside the codebook; allowed: code ids 0..63"
    ):
        tok.decode_embeddings([torch.tensor([1]), torch.tensor([64])])
    # the model's ids are the nearest codes of its normalised encoder outputs
    out = tok(features=feats(3))
    zt = F.normalize(tok.encode_task_layer(out.merged), dim=-1).double()
    assert torch.equal(out.ids, ((zt[:, None] - book.double()[None]) ** 2).sum(-1).argmin(1))


def test_straight_through_losses_and_ema():
    tok = small().train()
    torch.manual_seed(0)
    out = tok(features=feats(3))
    torch.testing.assert_close(
        out.quantized.detach(), tok.quantize.weight[out.ids].detach(), rtol=0, atol=1e-6
    )
    losses = tok.losses(out)
    cfg = tok.config
    torch.testing.assert_close(
        losses["total"],
        cfg.rec_weight * losses["rec"] + cfg.keep_weight * losses["keep"] + cfg.vq_weight * losses["vq"],
    )
    torch.testing.assert_close(losses["keep"], ((cfg.keep_ratio - out.keep.mean(1)) ** 2).mean())
    recon = tok.reconstruct(out.quantized, out.counts)
    torch.testing.assert_close(losses["rec"], (1 - F.cosine_similarity(recon, out.features, dim=-1)).mean())
    losses["total"].backward()
    params = dict(tok.named_parameters())
    for name in (
        "encode_task_layer.0.weight",  # through the straight-through codes
        "quantize.embedding.weight",
        "causal_encoder.blocks.0.token_causal_attn.qkv.weight",
        "token_predictor.in_conv.1.weight",  # through the straight-through keep decision
        "decoder.in_proj.weight",
    ):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # phase 1 (no quantisation) and EMA codebooks
    p1 = tok(features=feats(2), quantize=False)
    assert p1.ids is None and float(p1.vq_loss) == 0.0
    torch.testing.assert_close(p1.quantized.norm(dim=-1), torch.ones(p1.quantized.shape[0]))
    ema = CosineCodebook(4, 3, ema=True)
    z = F.normalize(torch.randn(40, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    ids = ema.assign(z)
    before = ema.weight.detach().clone()
    out_e = ema(z.requires_grad_(True))
    out_e.loss.backward()
    assert ema.embedding.weight.grad is None  # EMA mode: the loss is commitment only
    restarted = ema.ema_update(z.detach(), ids, decay=0.5)
    assert restarted == 0
    torch.testing.assert_close(ema.weight.norm(dim=1), torch.ones(4))
    for k in ids.unique().tolist():  # each used row moves toward the mean of its vectors
        target = F.normalize(z.detach()[ids == k].mean(0), dim=0)
        assert (ema.weight[k] - target).norm() < (before[k] - target).norm()
    ema.reset_ema_()
    assert torch.equal(ema.embed_sum, ema.weight) and torch.equal(ema.cluster_size, torch.ones(4))
    c = kmeans(z.detach(), 4, iters=5, cosine=True)
    assert c.shape == (4, 3) and torch.allclose(c.norm(dim=1), torch.ones(4))


# -- end to end -------------------------------------------------------------------------------------------
def tiny_tower() -> Blip2VisionModel:
    torch.manual_seed(0)
    cfg = Blip2VisionConfig(
        hidden_size=C,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    return Blip2VisionModel(cfg).eval()


def test_encode_images_end_to_end_and_bad_input():
    tower = tiny_tower()
    tok = LavitConfig(**SMALL).build(vision_tower=tower).eval()
    images = torch.randn(3, 3, 16, 16)
    ids = tok.encode(images)
    assert len(ids) == 3 and all(i.dtype == torch.long and i.dim() == 1 for i in ids)
    patches = tower(pixel_values=images).last_hidden_state[:, 1:]  # CLS dropped (num_prefix_tokens=1)
    assert all(torch.equal(a, b) for a, b in zip(ids, tok.encode(features=patches)))
    cont = tok.encode_continuous(images)
    assert [c.shape for c in cont] == [(len(i), LLM) for i in ids]
    assert tok.decode_embeddings(ids).shape == (sum(map(len, ids)), D)
    assert tok.reconstruct_ids(ids).shape == (3, N, C)
    with pytest.raises(ValueError, match=r"images are 14x14 pixels; allowed: 16x16 \(image_size\)"):
        tok.encode(torch.randn(1, 3, 14, 14))
    with pytest.raises(ValueError, match=r"images have 4 channels; allowed: 3 \(in_channels\)"):
        tok.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(
        ValueError, match=r"features have 17 tokens; allowed: 16 = \(16/4\)\^2 .*CLS token left in"
    ):
        tok.encode(features=torch.randn(1, N + 1, C))
    with pytest.raises(ValueError, match=r"features have width 31; allowed: 32 \(vision_hidden_size\)"):
        tok.encode(features=torch.randn(1, N, C - 1))
    with pytest.raises(
        ValueError, match="the vision tower returned shape \\(1, 17, 32\\); expected \\[B, 0 \\+ 16"
    ):
        LavitTokenizer(tok.config.replace(num_prefix_tokens=0), vision_tower=tower).encode(images[:1])
    with pytest.raises(ValueError, match="counts \\[1, 1\\] must sum to the 3 codes"):
        tok.reconstruct(torch.randn(3, D), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="needs vit_proj; build with llm_hidden_size > 0"):
        small(llm_hidden_size=0).encode_continuous(features=feats(1))


# -- the LLM vocabulary ----------------------------------------------------------------------------
def test_extend_vocab_lavit_layout():
    text_tok = build_tokenizer()
    v = len(text_tok)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=v,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    old = lm.get_input_embeddings().weight.detach().clone()
    tok = small()
    layout = tok.extend_vocab(text_tok, lm)
    assert (layout.boi_id, layout.eoi_id, layout.offset, layout.vocab_size) == (v, v + 1, v + 2, v + 2 + K)
    assert text_tok.convert_tokens_to_ids("[IMG]") == v and text_tok.convert_tokens_to_ids("[/IMG]") == v + 1
    assert len(text_tok) == v + 2  # codes are injected as ids, as LaVIT does (no token strings)
    assert lm.get_input_embeddings().weight.shape[0] == v + 2 + K
    assert lm.get_output_embeddings().weight.shape[0] == v + 2 + K
    assert torch.equal(lm.get_input_embeddings().weight[:v], old)
    ids = tok.encode(features=feats(2))
    llm = [tok.to_llm_ids(i) for i in ids]
    for i, seq in zip(ids, llm):
        assert seq.tolist() == [v, *(i + v + 2).tolist(), v + 1]
        assert torch.equal(tok.from_llm_ids(seq), i)
    assert text_tok("[IMG] [/IMG]")["input_ids"][1:] == [v, v + 1]
    with torch.no_grad():
        assert lm(input_ids=llm[0][None]).logits.shape[-1] == v + 2 + K
    lay = LAVIT_OFFICIAL_LAYOUT  # §3.1 step 6: [IMG] 32000, [/IMG] 32001, codes 32002.., vocab 48386
    assert lay.to_llm_ids(torch.tensor([0, 16383])).tolist() == [32000, 32002, 48385, 32001]
    assert lay.vocab_size == 48386
    with pytest.raises(
        ValueError, match="id 31999 at position 0 is not an image code; allowed: 32002..48385"
    ):
        lay.from_llm_ids(torch.tensor([31999]))
