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
