"""Tiny random VLMs built from configs (no weights, no hub), after reference §9."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipVisionConfig,
)

IMG = 199
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def tiny_llava(tower: str = "clip", seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """LLaVA-1.5 shaped: 32 px images, 8 px patches -> 16 visual tokens per image (CLS dropped)."""
    torch.manual_seed(seed)
    if tower == "clip":
        vc, strategy = clip_config(), "default"
    elif tower == "siglip":
        vc = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        strategy = "full"
    elif tower == "dinov2":
        vc = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            mlp_ratio=2,
            patch_size=8,
            image_size=32,
        )
        strategy = "default"
    else:
        raise ValueError(tower)
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=text_config(),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_seq_length=16,
    )
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def tiny_next(seed: int = 0, attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        vision_config=clip_config(),
        text_config=text_config(),
        image_token_index=IMG,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
    )
    return LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = torch.tensor(s)
        am[i, L - len(s) :] = 1
    return ids, am


def llava_batch(
    n_tokens: int = 16,
    prefixes=([5, 6], [5]),
    suffixes=([7, 8], [7, 8, 9]),
    images_per_row=(1, 1),
    seed: int = 0,
) -> dict:
    """Left-padded batch; row i holds images_per_row[i] image placeholder runs."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for pre, suf, k in zip(prefixes, suffixes, images_per_row):
        s = [1] + list(pre)
        for _ in range(k):
            s += [IMG] * n_tokens + [3]
        seqs.append(s + list(suf))
    ids, am = left_padded(seqs)
    n_img = sum(images_per_row)
    return {
        "input_ids": ids,
        "attention_mask": am,
        "pixel_values": torch.randn(n_img, 3, 32, 32, generator=g),
    }


def next_batch(
    model: LlavaNextForConditionalGeneration, image_sizes=((40, 60), (64, 64)), seed: int = 0
) -> dict:
    """A LLaVA-NeXT batch with the exact per-image token counts the model packs."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(image_sizes)
    n_patches = [image_size_to_num_patches(s, PINPOINTS, 32) for s in sizes]
    pix = torch.randn(len(sizes), max(n_patches), 3, 32, 32, generator=g)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pix, image_sizes=sizes, return_dict=True
        ).pooler_output
    lens = [f.shape[0] for f in feats]
    seqs = [[1, 5, 6] + [IMG] * lens[0] + [7, 8], [1, 5] + [IMG] * lens[1] + [7, 8, 9]][: len(lens)]
    ids, am = left_padded(seqs)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pix, "image_sizes": sizes}


# -- Qwen2-VL / Qwen2.5-VL (reference §9, tiny_qwen.py) --------------------------------------------------
QWEN_VID, QWEN_VS, QWEN_VE = 198, 197, 196  # video placeholder, vision start / end; images use IMG
QWEN_PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal_patch_size * patch_size**2


def tiny_qwen(kind: str = "2", seed: int = 0, attn: str = "sdpa"):
    """Qwen2-VL (``kind="2"``, 2 full-attention vision blocks) or Qwen2.5-VL (``"2.5"``, 4 blocks, windowed
    except ``fullatt_block_indexes=[1, 3]``, 2x2-unit windows); patch 4, 2x2 merge, text like tiny LLaVA's."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    ids = dict(
        image_token_id=IMG,
        video_token_id=QWEN_VID,
        vision_start_token_id=QWEN_VS,
        vision_end_token_id=QWEN_VE,
    )
    if kind == "2":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            mlp_ratio=2,
        )
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2VLForConditionalGeneration
    elif kind == "2.5":
        vision = dict(
            depth=4,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=16,
            fullatt_block_indexes=[1, 3],
        )
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(kind)
    return cls._from_config(cfg, attn_implementation=attn).eval()


def qwen_batch(
    rows=((("image", (1, 8, 8)),), (("image", (1, 8, 12)),)),
    prefixes=([5, 6], [5]),
    suffixes=([7, 8], [7, 8, 9]),
    seed: int = 0,
) -> dict:
    """A left-padded Qwen-VL batch as the processor builds it (no processor needed).

    ``rows[i]`` lists row i's visual inputs in order, each ``("image" | "video", (t, h, w))`` with the patch
    grid ``(t, h, w)``; each becomes ``<vision_start> placeholder * (t*h*w/4) <vision_end>`` followed by a
    text token. Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, as present,
    ``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw``."""
    g = torch.Generator().manual_seed(seed)
    seqs, types, grids = [], [], {"image": [], "video": []}
    for items, pre, suf in zip(rows, prefixes, suffixes):
        s = [1] + list(pre)
        for kind, (t, h, w) in items:
            tok = IMG if kind == "image" else QWEN_VID
            s += [QWEN_VS] + [tok] * (t * h * w // 4) + [QWEN_VE, 3]
            grids[kind].append((t, h, w))
        s += list(suf)
        seqs.append(s)
        types.append([1 if x == IMG else 2 if x == QWEN_VID else 0 for x in s])
    ids, am = left_padded(seqs)
    tt = torch.zeros_like(ids)
    for i, ty in enumerate(types):
        tt[i, ids.shape[1] - len(ty) :] = torch.tensor(ty)
    out = {"input_ids": ids, "attention_mask": am, "mm_token_type_ids": tt}
    for kind, pix_key, grid_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[pix_key] = torch.randn(int(grid.prod(-1).sum()), QWEN_PATCH_DIM, generator=g)
            out[grid_key] = grid
    return out


# -- LLaVA-OneVision (reference §2.3, §9 tiny_next.py "onevision") ---------------------------------------
OV_VID = QWEN_VID  # video placeholder id of the tiny OneVision model


def tiny_onevision(seed: int = 0, attn: str = "sdpa", aspect: str = "anyres_max_9"):
    """LLaVA-OneVision shaped: SigLIP tower (no CLS; 32 px, 8 px patches -> 4x4), strategy "full", layer -1,
    AnyRes pinpoints like tiny LLaVA-NeXT, Qwen2 text model. ``aspect="anyres_max_1"`` makes every
    multi-crop image's grid downscaled (pack_image_features' bilinear branch)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    torch.manual_seed(seed)
    vc = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vc,
        text_config=Qwen2Config(**text_config().to_dict()),
        image_token_index=IMG,
        video_token_index=OV_VID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    return LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def onevision_batch(model, image_sizes=((40, 60), (64, 64)), seed: int = 0) -> dict:
    """A left-padded LLaVA-OneVision batch (one image per row) with the exact token counts the model packs.

    The same batch as :func:`next_batch`: transformers' OneVision ``image_size_to_num_patches`` is a copy of
    LLaVA-NeXT's, and the token counts are read from the model's own ``get_image_features``."""
    return next_batch(model, image_sizes, seed)


# -- LLaVA-NeXT-Video (reference §2.4) and videos for LLaVA-NeXT-Video / LLaVA-OneVision ----------------
NV_VID = QWEN_VID  # video placeholder id of the tiny LLaVA-NeXT-Video model (OneVision's is OV_VID, the same)


def tiny_next_video(seed: int = 0, attn: str = "sdpa", pool_mode: str = "average"):
    """LLaVA-NeXT-Video shaped: CLIP tower (32 px, 4 px patches -> 8x8 + CLS, strategy "default", layer -2),
    AnyRes images with tiny LLaVA-NeXT's pinpoints, videos pooled by the resampler with stride 2 ->
    4x4 = 16 tokens per frame, no newline."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=32,
    )
    cfg = LlavaNextVideoConfig(
        vision_config=vc,
        text_config=text_config(),
        image_token_index=IMG,
        video_token_index=NV_VID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode=pool_mode,
        spatial_pool_stride=2,
    )
    return LlavaNextVideoForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def video_batch(
    model,
    rows=((("video", None),), (("video", None),)),
    frames: int = 3,
    prefixes=([5, 6], [5]),
    suffixes=([7, 8], [7, 8, 9]),
    seed: int = 0,
) -> dict:
    """A left-padded LLaVA-NeXT-Video / LLaVA-OneVision batch. ``rows[i]`` lists row i's visual inputs in
    order, each ``("image", (height, width))`` or ``("video", None)``; every video has ``frames`` frames of
    32x32 px. Placeholder runs get the exact token counts of the model's own (class, never patched)
    encoders. Returns ``input_ids``, ``attention_mask`` and, as present, ``pixel_values`` / ``image_sizes``
    / ``pixel_values_videos``."""
    g = torch.Generator().manual_seed(seed)
    base = model.model
    sizes = [s for items in rows for kind, s in items if kind == "image"]
    n_videos = sum(kind == "video" for items in rows for kind, _ in items)
    out: dict = {}
    img_lens: list[int] = []
    if sizes:
        mod = __import__(type(base).__module__, fromlist=["image_size_to_num_patches"])
        sizes_t = torch.tensor(sizes)
        n_patches = [mod.image_size_to_num_patches(s, PINPOINTS, 32) for s in sizes_t]
        out["pixel_values"] = torch.randn(len(sizes), max(n_patches), 3, 32, 32, generator=g)
        out["image_sizes"] = sizes_t
        with torch.no_grad():
            feats = (
                type(base)
                .get_image_features(
                    base, pixel_values=out["pixel_values"], image_sizes=sizes_t, return_dict=True
                )
                .pooler_output
            )
        img_lens = [f.shape[0] for f in feats]
    vid_len = 0
    if n_videos:
        out["pixel_values_videos"] = torch.randn(n_videos, frames, 3, 32, 32, generator=g)
        with torch.no_grad():
            vid_len = (
                type(base)
                .get_video_features(base, pixel_values_videos=out["pixel_values_videos"], return_dict=True)
                .pooler_output.shape[1]
            )
    vid = int(model.config.video_token_id)
    seqs, img_i = [], 0
    for items, pre, suf in zip(rows, prefixes, suffixes):
        s = [1] + list(pre)
        for kind, _ in items:
            if kind == "image":
                s += [IMG] * img_lens[img_i] + [3]
                img_i += 1
            else:
                s += [vid] * vid_len + [3]
        seqs.append(s + list(suf))
    ids, am = left_padded(seqs)
    return {"input_ids": ids, "attention_mask": am, **out}
