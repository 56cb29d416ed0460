"""SEED: a discrete, causal, fixed-length visual tokenizer (32 ids per image) for an LLM's vocabulary.

Ge et al., "Planting a SEED of Vision in Large Language Model", arXiv 2307.08041, and "Making LLaMA SEE and
Draw with SEED Tokenizer", arXiv 2310.01218 (ICLR 2024); official code AILab-CVC/SEED @ 93b3cf4
(``models/seed_qformer/qformer_quantizer.py``, ``qformer_causual.py``,
``SEED_Tokenizer/lavis/models/blip2_models/blip2_qformer_codebook_all_image.py``). Spec:
``specs/tokenpacker-seed-lavit.md`` §2 (SEED-2, the tokenizer of SEED-LLaMA).

Image -> ids (§2.2), shapes for the official model::

    vision tower (EVA ViT-g/14, frozen, not part of this module)   [B, 257, 1408]
    ln_vision                                                       [B, 257, 1408]
    causal Q-Former: 32 learned queries, lower-triangular self-attention among them, cross-attention to
    the image every 2nd layer (transformers' Blip2QFormerModel)     [B, 32, 768]   "causal embeddings"
    encode_task_layer: Linear-Tanh-Linear                           [B, 32, 32]
    Euclidean VQ over 8192 x 32 codes                                [B, 32] ids in 0..8191

ids -> embeddings: ``decode_task_layer(codebook[ids])`` ``[B, 32, 768]``
(:meth:`SeedTokenizer.decode_embeddings`); the de-tokenizer head (``blocks_image`` + ``image_down`` +
``distill_image_proj``) maps them to the 1024-d unCLIP image embedding that SD-2.1-unCLIP decodes (§2.3;
the diffusion step itself is out of scope).
Training (stage 2, §2.4): ``5 L_vq + 2 L_rec + 0.5 L_img`` (:meth:`SeedTokenizer.losses`); stage-1 ITC is
:func:`itc_loss`. In the LLM (§2.5) the ids are ordinary vocabulary rows ``<img_00000>``... between ``<img>``
and ``</img>`` (:meth:`SeedTokenizer.extend_vocab`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checkpoint import LoadReport, check_images, load_mapped_state, read_state_dict, tower_output
from .config import (
    TokenizerConfig,
    _check_divides,
    _check_positive_ints,
    check_bool,
    check_float,
    register_tokenizer,
)
from .vq import SEED_OFFICIAL_LAYOUT, EuclideanCodebook, LlmVocabMixin, VocabLayout, check_ids

__all__ = [
    "SeedConfig",
    "SeedTokenizer",
    "SeedOutput",
    "SeedBlock",
    "causal_query_mask",
    "itc_loss",
    "official_key",
    "our_key",
    "official_state_shapes",
    "load_official_state",
    "SEED_IGNORED_PREFIXES",
]


@register_tokenizer
@dataclasses.dataclass(frozen=True)
class SeedConfig(TokenizerConfig):
    """Shapes and training weights of a SEED tokenizer (spec §2.2-§2.4); defaults are the official model.

    Attributes:
        vision_hidden_size: width of the vision features the Q-Former reads (EVA ViT-g: 1408).
        image_size, in_channels: pixel input of the vision tower (224, 3); checked by
            :meth:`~SeedTokenizer.encode`.
        num_query_tokens: learned queries = ids per image (32).
        qformer_hidden_size, qformer_layers, qformer_heads, qformer_intermediate_size: the BERT-base
            Q-Former (768, 12, 12, 3072).
        cross_attention_frequency: a cross-attention to the image every n-th layer (2: layers 0, 2, ...).
        qformer_ln_eps: Q-Former LayerNorm eps (BERT 1e-12).
        qformer_dropout: BERT dropout (0.1, active in training only).
        vision_ln_eps: eps of ``ln_vision`` (LAVIS LayerNorm default 1e-5).
        causal: lower-triangular self-attention among the queries (SEED's point: query i sees queries <= i).
            The official code switches it on exactly when 32 queries are present; here it is this flag.
        codebook_size, codebook_dim: the VQ codebook (8192 x 32).
        beta, legacy_beta: VQ loss weight and taming's legacy placement (beta on the codebook term, §2.4).
        decoder: build the de-tokenizer / training heads (``pos_embed`` + ``blocks`` reconstructing the
            causal embeddings; ``pos_embed_image`` + ``blocks_image`` + ``image_down`` +
            ``distill_image_proj`` predicting the image embedding). Not needed to encode.
        decoder_depth, decoder_heads, decoder_ln_eps: those ViT blocks (4, 12, 1e-6).
        image_embed_dim: width of the predicted image embedding (unCLIP / CLIP-ViT-H: 1024).
        vq_weight, rec_weight, img_weight: stage-2 loss weights (5, 2, 0.5).
    """

    name: ClassVar[str] = "seed"
    summary: ClassVar[str] = (
        "SEED causal Q-Former tokenizer, 32 discrete ids per image (ICLR 2024, arXiv 2310.01218)"
    )

    vision_hidden_size: int = 1408
    image_size: int = 224
    in_channels: int = 3
    num_query_tokens: int = 32
    qformer_hidden_size: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    qformer_ln_eps: float = 1e-12
    qformer_dropout: float = 0.1
    vision_ln_eps: float = 1e-5
    causal: bool = True
    codebook_size: int = 8192
    codebook_dim: int = 32
    beta: float = 0.25
    legacy_beta: bool = True
    decoder: bool = True
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_ln_eps: float = 1e-6
    image_embed_dim: int = 1024
    vq_weight: float = 5.0
    rec_weight: float = 2.0
    img_weight: float = 0.5

    def validate(self) -> None:
        _check_positive_ints(
            self,
            (
                "vision_hidden_size",
                "image_size",
                "in_channels",
                "num_query_tokens",
                "qformer_hidden_size",
                "qformer_layers",
                "qformer_heads",
                "qformer_intermediate_size",
                "cross_attention_frequency",
                "codebook_size",
                "codebook_dim",
                "decoder_depth",
                "decoder_heads",
                "image_embed_dim",
            ),
        )
        _check_divides(self, "qformer_hidden_size", "qformer_heads")
        _check_divides(self, "qformer_hidden_size", "decoder_heads")
        for f in ("qformer_ln_eps", "vision_ln_eps", "decoder_ln_eps"):
            check_float(getattr(self, f), f, lo=0.0, lo_open=True)
        check_float(self.qformer_dropout, "qformer_dropout", lo=0.0, hi=1.0)
        for f in ("beta", "vq_weight", "rec_weight", "img_weight"):
            check_float(getattr(self, f), f, lo=0.0)
        for f in ("causal", "legacy_beta", "decoder"):
            check_bool(getattr(self, f), f)

    def build(self, vision_tower: Callable[[torch.Tensor], Any] | None = None) -> SeedTokenizer:
        return SeedTokenizer(self, vision_tower=vision_tower)


class SeedOutput(NamedTuple):
    """:meth:`SeedTokenizer.forward`: ids ``[B, Q]``; quantized ``[B, Q, d]`` (straight-through codes);
    vq_loss (scalar); z ``[B, Q, d]`` encoder outputs; causal_embeds ``[B, Q, H]`` Q-Former outputs."""

    ids: torch.Tensor
    quantized: torch.Tensor
    vq_loss: torch.Tensor
    z: torch.Tensor
    causal_embeds: torch.Tensor


# -- pieces -------------------------------------------------------------------------------------------
def causal_query_mask(n: int, batch: int, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """Additive ``[batch, 1, n, n]`` mask: 0 where query i may see query j (j <= i), dtype-min elsewhere.

    transformers' Q-Former passes a prepared 4-D mask through unchanged (``create_bidirectional_mask``),
    and its cross-attention uses only the encoder mask, so this makes only the query self-attention causal,
    as ``qformer_causual.get_extended_attention_mask`` does (§2.2 step 3).
    """
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, n, n)


class _Attention(nn.Module):
    """timm-style multi-head self-attention (``qkv`` packed, ``proj``), the official block's attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SeedBlock(nn.Module):
    """Pre-LN ViT block of SEED's de-tokenizer (§2.3 step 2): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``;
    MLP ratio 4, qkv bias, no dropout. Submodule names match ``models/seed_qformer/vit.py`` ``Block``."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor | float,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Stage-1 image-text contrastive loss (§2.4): symmetric cross-entropy over ``cos / temp``.

    Args:
        image_feats: ``[B, D]`` projection of the **last** causal query (issue #13); normalised here.
        text_feats: ``[B, D]`` projection of the paired texts' [CLS]; normalised here.
        temp: temperature (learnable in SEED, init 0.07).
        label_smoothing: 0.1 officially.

    Row ``i`` of each side is the positive of row ``i`` of the other.
    """
    if image_feats.shape != text_feats.shape or image_feats.dim() != 2:
        raise ValueError(
            f"itc_loss: image_feats {tuple(image_feats.shape)} and text_feats {tuple(text_feats.shape)} must "
            f"both be [B, D]"
        )
    i = F.normalize(image_feats, dim=-1)
    t = F.normalize(text_feats, dim=-1)
    sim = i @ t.t() / temp
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (
        F.cross_entropy(sim, target, label_smoothing=label_smoothing)
        + F.cross_entropy(sim.t(), target, label_smoothing=label_smoothing)
    )


# -- the tokenizer ------------------------------------------------------------------------------------
class SeedTokenizer(LlmVocabMixin, nn.Module):
    """The SEED tokenizer (spec §2.2-§2.4). Submodule names follow the official checkpoint except the
    Q-Former, which is transformers' ``Blip2QFormerModel`` (key map: :func:`official_key`).

    Args:
        config: a :class:`SeedConfig` (default: the official shapes); ``overrides`` replace fields.
        vision_tower: optional callable ``pixel_values [B, C, S, S] -> [B, N, vision_hidden_size]`` (a
            tensor, or an output with ``last_hidden_state``), returning the features **before**
            ``ln_vision`` (for EVA ViT-g: the last block's output, CLS included). Needed only by
            ``encode(images)``; it is not a submodule, so it is not in the state dict (the official
            ``seed_quantizer.pt`` does not hold the ViT either) and is not moved by ``.to()``.
    """

    _vocab_style: ClassVar[str] = "seed"
    _official_layout: ClassVar[VocabLayout] = SEED_OFFICIAL_LAYOUT

    def __init__(
        self,
        config: SeedConfig | None = None,
        vision_tower: Callable[[torch.Tensor], Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        config = config or SeedConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.__dict__["vision_tower"] = vision_tower  # deliberately not registered (see the docstring)
        self.vocab: VocabLayout | None = None
        h, q = config.qformer_hidden_size, config.num_query_tokens
        self.ln_vision = nn.LayerNorm(config.vision_hidden_size, eps=config.vision_ln_eps)
        # LAVIS init_Qformer: normal(0, initializer_range=0.02)
        self.query_tokens = nn.Parameter(torch.randn(1, q, h) * 0.02)
        qcfg = Blip2QFormerConfig(
            hidden_size=h,
            num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads,
            intermediate_size=config.qformer_intermediate_size,
            cross_attention_frequency=config.cross_attention_frequency,
            encoder_hidden_size=config.vision_hidden_size,
            layer_norm_eps=config.qformer_ln_eps,
            hidden_dropout_prob=config.qformer_dropout,
            attention_probs_dropout_prob=config.qformer_dropout,
            use_qformer_text_input=False,  # the tokenizer deletes the text FFN (§2.2 step 3)
        )
        self.qformer = Blip2QFormerModel(qcfg)
        self.encode_task_layer = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, config.codebook_dim))
        self.quantize = EuclideanCodebook(
            config.codebook_size, config.codebook_dim, beta=config.beta, legacy=config.legacy_beta
        )
        self.decode_task_layer = nn.Sequential(
            nn.Linear(config.codebook_dim, config.codebook_dim), nn.Tanh(), nn.Linear(config.codebook_dim, h)
        )
        if config.decoder:
            heads, eps = config.decoder_heads, config.decoder_ln_eps
            self.pos_embed = nn.Parameter(torch.zeros(1, q, h))
            self.blocks = nn.ModuleList(SeedBlock(h, heads, eps) for _ in range(config.decoder_depth))
            self.pos_embed_image = nn.Parameter(torch.zeros(1, q, h))
            self.blocks_image = nn.ModuleList(SeedBlock(h, heads, eps) for _ in range(config.decoder_depth))
            # the released (use_qformer_image=False) head: 768 -> 256 -> 128 -> 32 per token, no bias
            self.image_down = nn.Sequential(
                nn.Linear(h, 256, bias=False),
                nn.ReLU(),
                nn.Linear(256, 128, bias=False),
                nn.ReLU(),
                nn.Linear(128, 32, bias=False),
            )
            self.distill_image_proj = nn.Linear(q * 32, config.image_embed_dim)

    # -- image -> ids ---------------------------------------------------------------------------------
    def _features(self, images: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if (images is None) == (features is None):
            raise ValueError("SeedTokenizer: pass exactly one of images= and features=")
        if images is not None:
            check_images(images, cfg.image_size, cfg.in_channels, "SeedTokenizer")
            tower = self.__dict__["vision_tower"]
            if tower is None:
                raise ValueError(
                    "SeedTokenizer: encoding images needs a vision_tower (pass features= to skip the tower)"
                )
            with torch.no_grad():  # the tower is frozen in every SEED stage
                features = tower_output(tower(images))
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"SeedTokenizer: features must be [B, N, {cfg.vision_hidden_size}], got {shape}")
        if features.shape[-1] != cfg.vision_hidden_size:
            raise ValueError(
                f"SeedTokenizer: features have width {features.shape[-1]}; allowed: "
                f"{cfg.vision_hidden_size} (vision_hidden_size)"
            )
        return features

    def causal_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Q-Former over ``ln_vision(features)``: ``[B, N, C_v] -> [B, Q, H]`` (§2.2 steps 2-3)."""
        image_embeds = self.ln_vision(features)
        b = image_embeds.shape[0]
        queries = self.query_tokens.expand(b, -1, -1)
        dtype = self.qformer.layernorm.weight.dtype  # the Q-Former computes in its own dtype (fp32)
        mask = causal_query_mask(queries.shape[1], b, dtype, queries.device) if self.config.causal else None
        out = self.qformer(query_embeds=queries, attention_mask=mask, encoder_hidden_states=image_embeds)
        return out.last_hidden_state

    def forward(
        self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None
    ) -> SeedOutput:
        """Image (or tower features) -> ids and everything the losses need (§2.2 steps 2-5)."""
        q = self.causal_embeddings(self._features(images, features))
        vq = self.quantize(self.encode_task_layer(q))
        return SeedOutput(vq.ids, vq.quantized, vq.loss, vq.z, q)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, C, S, S]`` images (or ``[B, N, C_v]`` tower features) -> ``[B, Q]`` int64 ids in ``0..K-1``.

        Deterministic (no sampling anywhere); call ``.eval()`` first so the Q-Former's dropout is off.
        """
        q = self.causal_embeddings(self._features(images, features))
        return self.quantize.assign(self.encode_task_layer(q))

    # -- ids <-> codes <-> embeddings ---------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of ``ids``: ``[...] -> [..., d]`` (raises on ids outside the codebook)."""
        return self.quantize.lookup(ids)

    def ids_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids ``[..., d] -> [...]``; ``ids_from_codes(lookup(ids)) == ids``."""
        return self.quantize.ids_from_codes(codes)

    def decode_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``decode_task_layer(codebook[ids])``: ``[B, Q] -> [B, Q, H]`` (§2.3 step 1; the spec's
        ``code_embeddings``)."""
        return self.decode_task_layer(self.lookup(ids))

    def _need_decoder(self, what: str) -> None:
        if not self.config.decoder:
            raise ValueError(f"SeedTokenizer.{what} needs the de-tokenizer heads; build with decoder=True")

    def _check_length(self, x: torch.Tensor, what: str) -> None:
        q = self.config.num_query_tokens
        if x.dim() != 3 or x.shape[1] != q:
            raise ValueError(
                f"SeedTokenizer.{what}: expected [B, {q}, ...] (num_query_tokens={q}; the head flattens all "
                f"{q} tokens), got shape {tuple(x.shape)}"
            )

    def reconstruct_causal(self, quantized: torch.Tensor) -> torch.Tensor:
        """Training branch (§2.3 step 5): ``blocks(decode_task_layer(codes) + pos_embed)`` ``[B, Q, H]``, the
        reconstruction of the causal embeddings."""
        self._need_decoder("reconstruct_causal")
        self._check_length(quantized, "reconstruct_causal")
        x = self.decode_task_layer(quantized) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x

    def image_embedding(self, quantized: torch.Tensor) -> torch.Tensor:
        """De-tokenizer head (§2.3 steps 1-3, released ``image_down`` path): codes ``[B, Q, d]`` ->
        ``[B, image_embed_dim]`` (the unCLIP image embedding in the official model)."""
        self._need_decoder("image_embedding")
        self._check_length(quantized, "image_embedding")
        x = self.decode_task_layer(quantized) + self.pos_embed_image
        for blk in self.blocks_image:
            x = blk(x)
        return self.distill_image_proj(self.image_down(x).flatten(1))

    def image_embedding_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, Q]`` ids -> ``[B, image_embed_dim]`` (spec ``unclip_embeds``)."""
        return self.image_embedding(self.lookup(ids))

    def losses(self, out: SeedOutput, image_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage-2 losses (§2.4): ``total = vq_weight L_vq + rec_weight L_rec + img_weight L_img``.

        * ``vq``: the codebook's legacy-beta loss (:class:`~.vq.EuclideanCodebook`);
        * ``rec``: mean over tokens of ``1 - cos(reconstruct_causal(quantized), sg(causal_embeds))``;
        * ``img``: ``MSE(image_embedding(quantized), image_target)`` when a target ``[B, image_embed_dim]``
          is given (officially the CLIP-ViT-H/14 image embedding of the same image), else 0.
        """
        cfg = self.config
        zero = out.vq_loss.new_zeros(())
        rec = img = zero
        if cfg.decoder:
            recon = self.reconstruct_causal(out.quantized)
            rec = (1 - F.cosine_similarity(recon, out.causal_embeds.detach(), dim=-1)).mean()
            if image_target is not None:
                pred = self.image_embedding(out.quantized)
                if image_target.shape != pred.shape:
                    raise ValueError(
                        f"SeedTokenizer.losses: image_target has shape {tuple(image_target.shape)}, "
                        f"expected {tuple(pred.shape)} (image_embed_dim={cfg.image_embed_dim})"
                    )
                img = F.mse_loss(pred, image_target)
        elif image_target is not None:
            self._need_decoder("losses(image_target=...)")
        total = cfg.vq_weight * out.vq_loss + cfg.rec_weight * rec + cfg.img_weight * img
        return {"total": total, "vq": out.vq_loss, "rec": rec, "img": img}

    # -- LLM vocabulary -----------------------------------------------------------------------------
    def to_llm_ids(
        self, ids: torch.Tensor, add_special: bool = True, layout: VocabLayout | None = None
    ) -> torch.Tensor:
        """``[B, Q]`` ids -> ``[B, Q + 2]`` LLM ids ``<img> codes+offset </img>``; layout: ``self.vocab``
        after :meth:`extend_vocab`, else the official SEED-LLaMA one."""
        check_ids(ids, self.config.codebook_size)
        return self._layout(layout).to_llm_ids(ids, add_special)


# -- official checkpoint layout (seed_quantizer.pt, §2.7 key map) --------------------------------------
#: Official keys of parts this module deliberately does not hold: the EVA ViT (``visual_encoder``, loaded
#: separately), the Q-Former's text side (word / position embeddings, MLM head, text FFN, pooler), the
#: stage-1 ITC heads, and the LAVIS training file's Reverse-Q-Former image head.
SEED_IGNORED_PREFIXES: tuple[str, ...] = (
    "visual_encoder.",
    "Qformer.cls.",
    "Qformer.bert.embeddings.word_embeddings.",
    "Qformer.bert.embeddings.position_embeddings.",
    "Qformer.bert.embeddings.position_ids",
    "Qformer.bert.pooler.",
    "Reverse_Qformer.",
    "reverse_tokens",
    "vision_proj.",
    "text_proj.",
    "itm_head.",
    "temp",
)
_TEXT_FFN = re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.")
_OURS_TO_OFFICIAL = (
    ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.encoder.layer.", "Qformer.bert.encoder.layer."),
)


def official_key(key: str) -> str:
    """Our state-dict key -> the official (LAVIS) one: ``qformer.layernorm`` ->
    ``Qformer.bert.embeddings.LayerNorm``, ``qformer.encoder.layer.{i}.(cross)attention.attention`` ->
    ``Qformer.bert.encoder.layer.{i}.(cross)attention.self``; every other key is unchanged."""
    for ours, theirs in _OURS_TO_OFFICIAL:
        if key.startswith(ours):
            rest = key[len(ours) :]
            rest = re.sub(r"^(\d+\.(?:cross)?attention\.)attention\.", r"\1self.", rest)
            return theirs + rest
    return key


def our_key(key: str) -> str | None:
    """Official key -> ours, or None for keys of parts we do not hold (:data:`SEED_IGNORED_PREFIXES`, the
    text FFN ``layer.{i}.intermediate/output``)."""
    if key.startswith(SEED_IGNORED_PREFIXES) or _TEXT_FFN.match(key):
        return None
    for ours, theirs in _OURS_TO_OFFICIAL:
        if key.startswith(theirs):
            rest = key[len(theirs) :]
            rest = re.sub(r"^(\d+\.(?:cross)?attention\.)self\.", r"\1attention.", rest)
            return ours + rest
    return key


def official_state_shapes(config: SeedConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for ``config`` (default: the released 8192 x 32 model), built on the meta
    device (no memory)."""
    with torch.device("meta"):
        tok = SeedTokenizer(config or SeedConfig())
    return {official_key(k): tuple(v.shape) for k, v in tok.state_dict().items()}


def load_official_state(
    tokenizer: SeedTokenizer, source: str | Path | Mapping[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load a ``seed_quantizer.pt``-layout checkpoint (LAVIS key names) into ``tokenizer``.

    Every tensor ``tokenizer`` holds must be present with exactly its shape (wrong shape -> ``ValueError``
    naming the official key; missing -> ``ValueError`` listing them; build with ``decoder=False`` to load
    only the encoder side from a file without de-tokenizer heads). Keys of parts we do not hold
    (:data:`SEED_IGNORED_PREFIXES`, the text FFN) are ignored and reported; any other unknown key raises
    unless ``strict=False``.
    """
    state = read_state_dict(source, "SEED")
    return load_mapped_state(tokenizer, state, our_key, official_key, "SEED", strict=strict)
