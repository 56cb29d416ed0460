"""Tiny random models of the original ``llava`` package (llava-torch 1.2.2.post1), built from configs.

No hub: the codebase's ``CLIPVisionTower`` is built with ``delay_load`` (it reads only a CLIP config,
written here to a temporary directory), then a tiny seeded ``CLIPVisionModel`` and an explicitly
constructed ``CLIPImageProcessor`` are assigned to it, as ``load_model()`` would.
"""

from __future__ import annotations

import tempfile

import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images
from llava.model import LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

IMG = IMAGE_TOKEN_INDEX  # -200: one placeholder per image, expanded by the model
PX = 32  # CLIP input size; 8 px patches -> a 4x4 grid, 16 visual tokens per view
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_CFG_DIR = tempfile.mkdtemp(prefix="tiny-clip-")


def clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=PX,
        patch_size=8,
        projection_dim=32,
    )


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": PX},
        crop_size={"height": PX, "width": PX},
        do_center_crop=True,
    )


def tiny_llava(
    kind: str = "1.5",
    seed: int = 0,
    padding_side: str = "left",
    merge: str = "spatial_unpad",
    select_feature: str = "patch",
    lm: str = "llama",
) -> LlavaLlamaForCausalLM | LlavaMistralForCausalLM:
    """A LlavaLlamaForCausalLM (``lm="mistral"``: LlavaMistralForCausalLM): ``kind="1.5"``
    (image_aspect_ratio "pad", flat merge: one 4x4 grid per image) or ``"next"`` (anyres with
    :data:`PINPOINTS`; ``merge`` "spatial_unpad": thumbnail + unpadded crops with newlines, "spatial": the
    whole crop grid, no newlines)."""
    torch.manual_seed(seed)
    clip_config().save_pretrained(_CFG_DIR)
    extra = dict(image_aspect_ratio="pad", mm_patch_merge_type="flat")
    if kind == "next":
        extra = dict(image_aspect_ratio="anyres", mm_patch_merge_type=merge, image_grid_pinpoints=PINPOINTS)
    elif kind != "1.5":
        raise ValueError(kind)
    config_cls, model_cls = (LlavaConfig, LlavaLlamaForCausalLM)
    if lm == "mistral":
        config_cls, model_cls = (LlavaMistralConfig, LlavaMistralForCausalLM)
    cfg = config_cls(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        mm_vision_tower=_CFG_DIR,  # an existing path: accepted; delay_load reads only its config
        mm_vision_select_layer=-2,
        mm_vision_select_feature=select_feature,
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=32,
        tokenizer_padding_side=padding_side,
        tokenizer_model_max_length=2048,
        **extra,
    )
    model = model_cls(cfg)
    tower = model.get_vision_tower()
    tower.vision_tower = CLIPVisionModel(clip_config()).requires_grad_(False)
    tower.image_processor = image_processor()
    tower.is_loaded = True
    if (
        kind == "next" and "unpad" in merge
    ):  # PILM's image_newline is created with torch.empty (checkpoints fill it)
        with torch.no_grad():
            model.get_model().image_newline.normal_(0, 0.5)
    return model.eval()


def pictures(sizes, seed: int = 0) -> list[Image.Image]:
    """Random RGB pictures of the given ``(width, height)`` sizes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, h in sizes:
        px = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        out.append(Image.fromarray(px))
    return out


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded with 0 on ``side``."""
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        am[i, sl] = 1
    return ids, am


def batch(
    model: LlavaLlamaForCausalLM,
    rows=((5, 6, IMG, 7, 8), (5, IMG, 7, 8, 9)),
    sizes=((60, 40), (64, 64)),
    seed: int = 0,
) -> dict:
    """A padded batch (on the model's ``tokenizer_padding_side``) with one picture per ``IMG``, through the
    codebase's own ``process_images`` (LLaVA-1.5: a ``[n, 3, 32, 32]`` tensor; NeXT: ``[n, views, 3, 32,
    32]`` or a list when view counts differ). ``image_sizes`` are PIL ``(width, height)``."""
    pics = pictures(sizes, seed)
    ids, am = pad([[1, *r] for r in rows], model.config.tokenizer_padding_side)
    images = process_images(pics, model.get_vision_tower().image_processor, model.config)
    return {"input_ids": ids, "attention_mask": am, "images": images, "image_sizes": [p.size for p in pics]}
