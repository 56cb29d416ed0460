"""open_clip towers (issue 7, ``clip`` extra): features, attention probes, scoring a LLaVA image with an
open_clip ViT (``signal_tower=``) and the question-relevance prefilter (``relevance=``), on tiny random
open_clip models built from config dicts through open_clip's own factory (no pretrained weights)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

try:
    import open_clip
except ImportError as e:  # fail loudly: CI installs the clip extra, a skip would hide a broken install
    raise ImportError(
        "tests_clip/test_open_clip_tower.py needs open_clip: run it with `make test-clip` (own environment, "
        "CUDA-build torch + matching torchvision + the clip extra)"
    ) from e
from open_clip.transformer import Transformer
from tiny_models import IMG, llava_batch, next_batch, tiny_llava, tiny_next, tiny_qwen

import mmcompress as mmc
from mmcompress.adapters.probes import vision_attention_modules
from mmcompress.methods.divprune import DivPrune
from mmcompress.methods.hired import HiRED
from mmcompress.signals import VitAttention
from mmcompress.tokens import Layout, VisualTokens
from mmcompress.towers import QuestionRelevance, prefilter_select
from mmcompress.towers.open_clip import OpenClipRelevance, OpenClipSignals, OpenClipTower

PROBE_TOL = 1e-5  # probe vs explicit eager softmax: fp32, different matmul order (seen ~1e-7)
GEN = dict(max_new_tokens=2, do_sample=False, suppress_tokens=[IMG])
VLM_MEAN, VLM_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TINY = {  # 24 px, 8 px patches: a 3x3 grid, resampled to tiny LLaVA's 4x4
    "embed_dim": 16,
    "vision_cfg": {"image_size": 24, "layers": 3, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def _create(tmp_path_factory, name: str, **vision) -> torch.nn.Module:
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision)
    path = tmp_path_factory.mktemp("oc") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _create(tmp_path_factory, "mmc-tiny-vit")


@pytest.fixture(scope="module")
def tokenizer(clip):
    return open_clip.get_tokenizer("mmc-tiny-vit")


@pytest.fixture(scope="module")
def tower(clip):
    return OpenClipTower(clip)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def llava_next():
    return tiny_next()


@pytest.fixture(autouse=True)
def _restore(llava, llava_next):
    yield
    mmc.restore(llava)
    mmc.restore(llava_next)


def _pix(b=2, seed=0):
    return torch.randn(b, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


# -- the tower ------------------------------------------------------------------------------------------
def test_shapes(clip, tower, tokenizer):
    x = _pix()
    assert tower.grid == (3, 3) and tower.num_layers == 3 and tower.heads == 4
    assert tower.features(x).shape == (2, 9, 32)
    assert tower.features(x, 0).shape == (2, 9, 32)
    for kind in ("cls", "received", "cls_logits", "received_logits", "given_logits"):
        assert tower.attention(x, 1, kind).shape == (2, 4, 10)
    assert tower.patch_embeddings(x).shape == (2, 9, 16)
    assert OpenClipRelevance(tower, tokenizer).scores(x, "a red cube").shape == (2, 9)
    # the CLS row is a softmax: sums to one over the 1 + 9 keys
    torch.testing.assert_close(tower.attention(x, -1).sum(-1), torch.ones(2, 4), rtol=0, atol=PROBE_TOL)


def test_features_are_the_block_outputs(clip, tower):
    """features(layer=j) = block j's output tokens minus CLS, as open_clip's own forward_intermediates."""
    x = _pix()
    for j in range(3):
        ref = clip.visual.forward_intermediates(x, indices=[j], intermediates_only=True, output_fmt="NLC")
        assert torch.equal(tower.features(x, j), ref["image_intermediates"][0])


def _block_input(visual, x, j, batch_first=True):
    """Block j's attention input (after ln_1) computed step by step from the weights: [B, L, D]."""
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(h.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, h], 1) + visual.positional_embedding)
    blocks = visual.transformer.resblocks
    h = h if batch_first else h.transpose(0, 1)
    for b in blocks[:j]:
        h = b(h)
    h = h if batch_first else h.transpose(0, 1)
    return blocks[j].ln_1(h)


def _eager(visual, x, j, batch_first=True) -> torch.Tensor:
    """Explicit softmax(Q K^T / sqrt(d)) ``[B, H, L, L]`` of block j."""
    attn = visual.transformer.resblocks[j].attn
    h = _block_input(visual, x, j, batch_first)
    B, L, D = h.shape
    H = attn.num_heads
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    q, k = (t.reshape(B, L, H, D // H).transpose(1, 2) for t in (q, k))
    if hasattr(attn, "ln_q"):  # open_clip's own Attention with qk-norm
        q, k = attn.ln_q(q), attn.ln_k(k)
    return torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, -1)


def _seq_first(clip):
    """The same weights with the blocks run sequence-first ([L, B, D], as open_clip < 2.26)."""
    m = copy.deepcopy(clip)
    v = m.visual
    old = v.transformer
    new = Transformer(32, 3, 4, 4.0, batch_first=False)
    new.load_state_dict(old.state_dict())
    v.transformer = new.eval()
    return m


@pytest.fixture(scope="module")
def variants(clip, tmp_path_factory):
    return {
        "mha-batch-first": clip,
        "mha-seq-first": _seq_first(clip),
        "custom-qk-norm": _create(tmp_path_factory, "mmc-tiny-vit-qknorm", qk_norm=True),
    }


@pytest.mark.parametrize("variant", ["mha-batch-first", "mha-seq-first", "custom-qk-norm"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_probe_equals_eager_softmax(variants, variant, layer):
    model = variants[variant]
    tower = OpenClipTower(model)
    assert tower.batch_first == (variant != "mha-seq-first")
    if variant == "custom-qk-norm":
        assert type(model.visual.transformer.resblocks[0].attn).__name__ == "Attention"
    x = _pix()
    with torch.no_grad():
        eager = _eager(model.visual, x, layer % 3, tower.batch_first)  # [B, H, L, L]
    tol = dict(rtol=0, atol=PROBE_TOL)
    torch.testing.assert_close(tower.attention(x, layer, "cls"), eager[:, :, 0], **tol)
    torch.testing.assert_close(tower.attention(x, layer, "received"), eager.mean(2), **tol)
    if variant.startswith("mha"):  # torch's own per-head weights agree too
        attn = model.visual.transformer.resblocks[layer].attn
        h = _block_input(model.visual, x, layer % 3, tower.batch_first)
        h = h if tower.batch_first else h.transpose(0, 1)
        with torch.no_grad():
            w = attn(h, h, h, need_weights=True, average_attn_weights=False)[1]
        torch.testing.assert_close(w, eager, **tol)


def test_seq_first_variant_is_the_same_model(clip, variants):
    x = _pix()
    with torch.no_grad():
        torch.testing.assert_close(variants["mha-seq-first"].encode_image(x), clip.encode_image(x))


def test_probes_leave_the_tower_unchanged(clip, tower):
    x = _pix()
    with torch.no_grad():
        ref = clip.encode_image(x)
        with tower.probing(-1, "received") as p:
            out = clip.encode_image(x)
        assert p.value.shape == (2, 4, 10)
        torch.testing.assert_close(p.value, tower.attention(x, -1, "received"), rtol=0, atol=0)
        tower.attention(x, 1)
        tower.features(x, 0)
        again = clip.encode_image(x)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    for b in clip.visual.transformer.resblocks:
        assert not b._forward_hooks and not b.attn._forward_pre_hooks


# -- scoring a LLaVA image with the open_clip tower -----------------------------------------------------
def _to_tower(tower, pix):
    """VLM pixels -> the tower's input, by hand: un-normalise, bicubic resize, renormalise."""
    m, s = (torch.tensor(v)[:, None, None] for v in (VLM_MEAN, VLM_STD))
    x = F.interpolate(pix * s + m, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
    tm, ts = (torch.tensor(v)[:, None, None] for v in (tower.image_mean, tower.image_std))
    return (x - tm) / ts


def _hand_signal(tower, pix, layer, grid=(4, 4)):
    """``[V, H, 1 + rows*cols]``: the tower's attention, patch columns resampled bilinearly, CLS kept."""
    a = tower.attention(_to_tower(tower, pix), layer, "cls")
    V, H, _ = a.shape
    patch = F.interpolate(a[:, :, 1:].reshape(V, H, 3, 3), size=grid, mode="bilinear", align_corners=False)
    return torch.cat([a[:, :, :1], patch.reshape(V, H, -1)], -1)


def _signals(tower):
    return OpenClipSignals(tower, image_mean=VLM_MEAN, image_std=VLM_STD)


def test_hired_with_signal_tower_single_view(llava, tower):
    batch = llava_batch()
    h = mmc.compress(llava, "hired", keep=4, signal_tower=_signals(tower))
    assert h.signal_tower is not None
    # the VLM's own attention modules carry no probe: only the pixel hook on the vision tower
    own = vision_attention_modules(llava.model.vision_tower)
    assert not any(a._forward_pre_hooks for a in own)
    assert len(llava.model.vision_tower._forward_pre_hooks) == 1
    llava.generate(**batch, **GEN)
    kept = mmc.report(llava).kept
    sig = _hand_signal(tower, batch["pixel_values"], -2)
    want = []
    for i in range(2):
        tokens = VisualTokens(
            torch.zeros(16, 4), Layout.single(4, 4), {VitAttention(-2, "cls"): sig[i : i + 1]}
        )
        want.append(HiRED(keep=4).select(tokens).indices.tolist())
    assert kept == want and all(len(k) == 4 for k in kept)


def test_hired_with_signal_tower_anyres(llava_next, tower):
    """LLaVA-NeXT: every view (thumbnail, crops) is scored by the open_clip tower on its own."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    batch = next_batch(llava_next)
    mmc.compress(llava_next, "hired", keep=0.3, signal_tower=_signals(tower))
    llava_next.generate(**batch, **GEN)
    rep = mmc.report(llava_next)
    cfg = llava_next.config
    for i, (size, im) in enumerate(zip(batch["image_sizes"], rep.images)):
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, 32)
        pix = batch["pixel_values"][i, :n]
        sigs = {VitAttention(layer, "cls"): _hand_signal(tower, pix, layer) for layer in (0, -2)}
        tokens = VisualTokens(torch.zeros(im.layout.num_tokens, 4), im.layout, sigs, image_index=i)
        assert im.kept == HiRED(keep=0.3).select(tokens).indices.tolist()


# -- question relevance ----------------------------------------------------------------------------------
def _relevance(tower, tokenizer, prefilter=0.5):
    return OpenClipRelevance(tower, tokenizer, prefilter=prefilter, image_mean=VLM_MEAN, image_std=VLM_STD)


def _hand_candidates(tower, tokenizer, pix, question, fraction=0.5, grid=(4, 4)) -> list[list[int]]:
    """Top fraction of the 4x4 tokens by cosine(text, resampled unit patch embedding), per image."""
    with torch.no_grad():
        v = tower.visual
        e = F.normalize(v.ln_post(tower.features(_to_tower(tower, pix))) @ v.proj, dim=-1)  # [B, 9, E]
        V, _, E = e.shape
        e = F.interpolate(
            e.transpose(1, 2).reshape(V, E, 3, 3), size=grid, mode="bilinear", align_corners=False
        )
        t = tower.model.encode_text(tokenizer([question]), normalize=True)[0]
        score = F.cosine_similarity(e.reshape(V, E, -1), t[None, :, None], dim=1)  # [B, 16]
    n = max(1, round(fraction * 16))
    return [sorted(torch.sort(s, descending=True, stable=True).indices[:n].tolist()) for s in score]


def _image_features(llava, pix):
    with torch.no_grad(), mmc.disabled(llava):
        return list(llava.model.get_image_features(pixel_values=pix, return_dict=True).pooler_output)


def test_relevance_prefilter_divprune(llava, tower, tokenizer):
    batch = llava_batch()
    q = "a red cube on the left"
    h = mmc.compress(llava, "divprune", keep=0.25, relevance=_relevance(tower, tokenizer), question=q)
    llava.generate(**batch, **GEN)
    kept = mmc.report(llava).kept
    cands = _hand_candidates(tower, tokenizer, batch["pixel_values"], q)
    feats = _image_features(llava, batch["pixel_values"])
    for k, c, f in zip(kept, cands, feats):
        assert len(c) == 8 and len(k) == 4 and set(k) <= set(c)  # keep=0.25 of all 16 tokens, among 8
        sub = DivPrune(keep=4).select(VisualTokens(f[c], Layout.single(1, 8)))
        assert k == [c[j] for j in sub.indices.tolist()]
    # the question is per call: a context manager, a setter, one question per image
    other = "the sky"
    with h.asking(other):
        llava.generate(**batch, **GEN)
    for k, c in zip(mmc.report(llava).kept, _hand_candidates(tower, tokenizer, batch["pixel_values"], other)):
        assert set(k) <= set(c)
    assert h.question == q
    h.set_question([q, other])
    llava.generate(**batch, **GEN)
    per = [
        _hand_candidates(tower, tokenizer, batch["pixel_values"][i : i + 1], t)[0]
        for i, t in enumerate([q, other])
    ]
    assert all(set(k) <= set(c) for k, c in zip(mmc.report(llava).kept, per))


def test_relevance_prefilter_with_signal_method(llava, tower, tokenizer):
    """HiRED under the prefilter: its CLS scores are restricted to the candidates' columns."""
    batch = llava_batch()
    q = "a blue ball"
    mmc.compress(
        llava,
        "hired",
        keep=3,
        signal_tower=_signals(tower),
        relevance=_relevance(tower, tokenizer, 0.25),
        question=q,
    )
    llava.generate(**batch, **GEN)
    kept = mmc.report(llava).kept
    sig = _hand_signal(tower, batch["pixel_values"], -2)
    for i, (k, c) in enumerate(zip(kept, _hand_candidates(tower, tokenizer, batch["pixel_values"], q, 0.25))):
        scores = sig[i, :, 1:].sum(0)[c]  # HiRED: CLS row summed over heads, on the 4 candidates
        want = sorted(c[j] for j in scores.topk(3).indices.tolist())
        assert k == want


def test_prefilter_maps_indices_back_exactly():
    """Pure function: candidates = top fraction by relevance, the method's indices map back onto them."""
    torch.manual_seed(0)
    N, E = 12, 5
    layout = Layout.single(3, 4)
    emb = F.normalize(torch.randn(1, E, N), dim=1)
    text = F.normalize(torch.randn(E), dim=0)
    tokens = VisualTokens(torch.randn(N, 8), layout, {QuestionRelevance(): emb})
    order = torch.sort(emb[0].T @ text, descending=True, stable=True).indices
    for frac in (1 / 12, 0.5, 1.0):
        cand = sorted(order[: max(1, round(frac * N))].tolist())
        sel = prefilter_select(DivPrune(keep=1.0), tokens, text, frac)  # keep all candidates
        assert sel.indices.tolist() == cand
        assert all(0 <= i < N for i in sel.indices.tolist())


def test_relevance_needs_a_question_and_leaves_the_model_usable(llava, tower, tokenizer):
    batch = llava_batch()
    h = mmc.compress(llava, "divprune", keep=4, relevance=_relevance(tower, tokenizer))
    with pytest.raises(ValueError, match="needs the question"):
        llava.generate(**batch, **GEN)
    h.set_question("a cube")
    llava.generate(**batch, **GEN)
    h.set_question(["only one"])
    with pytest.raises(ValueError, match="1 questions for the 2 images"):
        llava.generate(**batch, **GEN)


def test_restore_is_bit_identical(llava, tower, tokenizer):
    batch = llava_batch()
    ref = llava.generate(**batch, **GEN)
    state = {k: v.clone() for k, v in llava.state_dict().items()}
    mmc.compress(
        llava,
        "hired",
        keep=4,
        signal_tower=_signals(tower),
        relevance=_relevance(tower, tokenizer),
        question="q",
    )
    llava.generate(**batch, **GEN)
    with mmc.disabled(llava):
        assert torch.equal(llava.generate(**batch, **GEN), ref)
    mmc.restore(llava)
    assert not llava.model.vision_tower._forward_pre_hooks
    assert not any(k in llava.model.__dict__ for k in ("forward", "get_image_features"))
    assert torch.equal(llava.generate(**batch, **GEN), ref)
    assert all(torch.equal(v, state[k]) for k, v in llava.state_dict().items())


# -- bad input --------------------------------------------------------------------------------------------
def _unpatched(model) -> bool:
    return "_mmcompress_handle" not in model.__dict__ and not model.model.vision_tower._forward_pre_hooks


def test_bad_towers_and_options(llava, clip, tower, tokenizer):
    with pytest.raises(TypeError, match="open_clip VisionTransformer"):
        OpenClipTower(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="needs an OpenClipTower"):
        OpenClipSignals(clip, image_mean=VLM_MEAN, image_std=VLM_STD)
    with pytest.raises(ValueError, match="pixel normalisation"):
        OpenClipSignals(tower)
    with pytest.raises(ValueError, match="3 finite numbers"):
        OpenClipSignals(tower, image_mean=(0.5, 0.5), image_std=VLM_STD)
    with pytest.raises(ValueError, match="image_size=32 is not allowed"):
        OpenClipTower(clip, image_size=32)
    with pytest.raises(TypeError, match="text tower"):
        OpenClipRelevance(OpenClipTower(clip.visual), tokenizer)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"prefilter=.* is not allowed.*\(0, 1\]"):
            _relevance(tower, tokenizer, bad)
    with pytest.raises(TypeError, match="prefilter must be a number"):
        _relevance(tower, tokenizer, True)
    x = _pix()
    for layer in (3, -4):
        with pytest.raises(ValueError, match=f"layer={layer} is out of range.*3 layers"):
            tower.attention(x, layer)
        with pytest.raises(ValueError, match="out of range"):
            tower.features(x, layer)
    with pytest.raises(ValueError, match="kind='rows' is not allowed"):
        tower.attention(x, 0, "rows")
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 24, 24\]"):
        tower.features(torch.zeros(1, 3, 32, 32))


def test_scaled_cosine_towers_are_refused(tmp_path_factory):
    model = _create(tmp_path_factory, "mmc-tiny-vit-cosine", scaled_cosine_attn=True)
    with pytest.raises(TypeError, match="scaled-cosine"):
        OpenClipTower(model)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(signal_tower=object()), TypeError, "signal_tower must be a mmcompress.towers.SignalTower"),
        (dict(relevance=object(), question="q"), TypeError, "relevance must be a mmcompress.towers"),
        (dict(question="q"), ValueError, "question= is read by relevance="),
        (dict(select_layer=-4, signal_tower="sig"), ValueError, r"layer=-4 is out of range.*3 layers"),
        (dict(relevance="rel", question=""), ValueError, "non-empty strings"),
        (dict(relevance="rel-no-norm"), ValueError, "construct it with processor="),
    ],
)
def test_bad_compress_calls_leave_the_model_unpatched(llava, tower, tokenizer, kwargs, exc, match):
    towers = {
        "sig": _signals(tower),
        "rel": _relevance(tower, tokenizer),
        "rel-no-norm": OpenClipRelevance(tower, tokenizer),
    }
    kwargs = {k: towers.get(v, v) if isinstance(v, str) and k != "question" else v for k, v in kwargs.items()}
    batch = llava_batch()
    ref = llava.generate(**batch, **GEN)
    with pytest.raises(exc, match=match):
        mmc.compress(llava, "hired", keep=4, **kwargs)
    assert _unpatched(llava)
    assert torch.equal(llava.generate(**batch, **GEN), ref)


def test_tower_options_refused_for_methods_and_models_that_cannot_use_them(llava, tower, tokenizer):
    with pytest.raises(ValueError, match="method 'divprune' needs none"):
        mmc.compress(llava, "divprune", keep=4, signal_tower=_signals(tower))
    with pytest.raises(ValueError, match="'globalcom2' works on anyres layouts only"):
        mmc.compress(llava, "globalcom2", relevance=_relevance(tower, tokenizer), question="q")
    assert _unpatched(llava)
    qwen = tiny_qwen()
    with pytest.raises(ValueError, match="transformers LLaVA family only"):
        mmc.compress(qwen, "divprune", keep=4, relevance=_relevance(tower, tokenizer), question="q")
    assert "_mmcompress_handle" not in qwen.__dict__
