"""The two embedded architectures: their transformers configs and processors (no weights here).

- ``shapes-llava``: ``LlavaForConditionalGeneration``, one 336 px view -> 24x24 = 576 visual tokens.
- ``shapes-llava-next``: ``LlavaNextForConditionalGeneration`` (AnyRes), 224 px base thumbnail (256 tokens)
  plus a grid of 224 px crops chosen from ``NEXT_PINPOINTS``, each crop row ended by ``image_newline``.
  A 448x224 image gives 256 + 16 x (32 + 1) = 784 visual tokens.

Both feed the projector DINOv2 layers 4 and 12 (``vision_feature_layer=[4, -1]``, 768-d per patch):
layer 12 carries shape, layer 4 colour (the late layers blur red / yellow, see the feature probe doc).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NEXT_PINPOINTS",
    "SPECS",
    "ZooSpec",
    "make_config",
    "make_processor",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NEXT_PINPOINTS = [[224, 448], [448, 224], [448, 448]]  # (height, width)
VISION_FEATURE_LAYER = [4, -1]


@dataclass(frozen=True)
class ZooSpec:
    """What differs between the embedded models; the language model shape is shared."""

    name: str
    arch: str  # "llava" | "llava_next"
    image_size: int  # tower input (and base view) side, pixels
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 1024
    max_positions: int = 2048

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // 14) ** 2


SPECS: dict[str, ZooSpec] = {
    "shapes-llava": ZooSpec("shapes-llava", "llava", 336),
    "shapes-llava-next": ZooSpec("shapes-llava-next", "llava_next", 224),
}


def _spec(name: str) -> ZooSpec:
    if name not in SPECS:
        raise ValueError(f"name={name!r} is not an embedded model; allowed: {tuple(SPECS)}")
    return SPECS[name]


def make_config(name: str, vision_config, tokenizer, rope_theta: float = 10000.0):
    """A ``LlavaConfig`` / ``LlavaNextConfig`` around ``vision_config`` (a ``Dinov2Config``, spec size).

    ``rope_theta``: the language model's RoPE base (a larger base leaves more of each head's dimensions
    nearly position-free over the ~600 tokens between a question and the image, for content lookups).
    """
    from transformers import LlamaConfig, LlavaConfig, LlavaNextConfig

    spec = _spec(name)
    if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
        raise ValueError(f"rope_theta={rope_theta!r} is invalid; allowed: a number > 0")
    text = LlamaConfig(
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    common = dict(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=list(VISION_FEATURE_LAYER),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    if spec.arch == "llava":
        return LlavaConfig(image_seq_length=spec.tokens_per_view, **common)
    return LlavaNextConfig(
        image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS],
        image_seq_length=spec.tokens_per_view,
        **common,
    )


def make_processor(name: str, tokenizer):
    """``LlavaProcessor`` (pad to square, 336 px) or ``LlavaNextProcessor`` (AnyRes, 224 px crops).

    The PIL-backend image processors are used so nothing needs torchvision (there is no CPU wheel here).
    """
    from transformers import (
        LlavaImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    spec = _spec(name)
    s = spec.image_size
    # CLS is dropped from 14 px patches; the processor expands <image> to the model's visual-token count
    text_side = dict(
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=tokenizer.image_token,
        num_additional_image_tokens=1,
    )
    if spec.arch == "llava":
        # LLaVA-1.5 pads non-square images to a square instead of cropping them, so no object is cut off.
        improc = LlavaImageProcessorPil(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            do_pad=True,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        return LlavaProcessor(image_processor=improc, **text_side)
    improc = LlavaNextImageProcessorPil(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS],
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return LlavaNextProcessor(image_processor=improc, **text_side)
