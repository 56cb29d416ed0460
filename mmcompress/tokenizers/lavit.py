"""LaVIT: a discrete visual tokenizer with a dynamic number of tokens per image.

Jin et al., "Unified Language-Vision Pretraining in LLM with Dynamic Discrete Visual Tokenization",
arXiv 2309.04669 (ICLR 2024); official code jy0205/LaVIT @ 8cde9b4
(``LaVIT/models/modeling_visual_tokenzier.py``, ``modeling_decoder.py``). Spec:
``specs/tokenpacker-seed-lavit.md`` §3.

Image -> ids (§3.1), shapes for the official model (N = 256 patches, C = 1408)::

    vision tower (EVA01-CLIP-g/14, frozen, not part of this module), CLS dropped     [B, N, C]
    token selector (TokenPredictor): per-patch keep / drop log-probabilities         [B, N, 2]
    keep decision D: hard Gumbel-softmax (training; straight-through), else argmax    [B, N] in {0, 1}
    token merger (12 CausalFuserBlocks): causal self-attention over kept tokens,
    cross-attention from every token to the dropped ones                             [B, N, C]
    kept rows in raster order                                                         [sum_b k_b, C]
    encode_task_layer + L2 normalisation                                              [sum_b k_b, 32]
    nearest code of a 16384 x 32 L2-normalised codebook                               [sum_b k_b] ids

``k_b`` varies per image (0 <= k_b <= N; the official code does not forbid 0). Ids are returned as one tensor
per image. **Determinism**: the official code samples the Gumbel decision at inference too, so the count and
the kept set change between runs; here inference takes the argmax of the log-probabilities (deterministic)
unless ``sample=True`` (config or call), which reproduces the official sampling exactly
(``F.gumbel_softmax(logits, hard=True)[..., 0]`` on the same RNG stream). The official code draws an
independent binary decision per token, not a fixed-k top-k: the count is what the selector makes it.

ids -> embeddings: codebook rows (:meth:`LavitTokenizer.decode_embeddings`); the feature decoder
(:class:`LavitFeatureDecoder`, the ``VQDecoder`` of §3.2 without its UNet heads) reconstructs the N ViT
features from them, which is the tokenizer's training target (§3.4: cosine reconstruction + keep-ratio
regulariser + VQ). In the LLM (§3.3) ids are ``code + offset`` between ``[IMG]`` and ``[/IMG]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_int
from ._checkpoint import LoadReport, check_images, load_mapped_state, read_state_dict, tower_output
from .config import (
    TokenizerConfig,
    _check_divides,
    _check_positive_ints,
    check_bool,
    check_float,
    register_tokenizer,
)
from .seed import _Attention
from .vq import LAVIT_OFFICIAL_LAYOUT, CosineCodebook, LlmVocabMixin, VocabLayout, check_ids

__all__ = [
    "LavitConfig",
    "LavitTokenizer",
    "LavitOutput",
    "TokenPredictor",
    "TokenMerger",
    "CausalFuserBlock",
    "LavitFeatureDecoder",
    "policy_softmax",
    "causal_policy",
    "cross_policy",
    "keep_decision",
    "official_state_shapes",
    "load_official_state",
    "LAVIT_DECODER_IGNORED_PREFIXES",
]


@register_tokenizer
@dataclasses.dataclass(frozen=True)
class LavitConfig(TokenizerConfig):
    """Shapes and training settings of a LaVIT tokenizer (spec §3.1-§3.4); defaults are the official model.

    Attributes:
        vision_hidden_size: ``C``, width of the ViT features (EVA01-CLIP-g: 1408). Must be even (the
            selector splits it into a local and a global half) and >= 4.
        image_size, patch_size, in_channels: the tower's input (224, 14, 3) -> ``N = (224/14)^2 = 256``
            patch tokens.
        num_prefix_tokens: leading tokens of the tower output dropped before the selector (1: CLS).
        merger_layers, merger_heads, merger_intermediate_size, merger_ln_eps: the token merger (12
            ``CausalFuserBlock``\\ s, 16 heads, MLP 6144 = int(1408 * 4.3637), LayerNorm eps 1e-5).
        predictor_ln_eps: the selector's LayerNorm eps (1e-5).
        policy_eps: the ``eps`` of the official masked softmax (1e-6, kept for parity: masked positions get
            a weight of about ``eps / N``).
        codebook_size, codebook_dim: the cosine codebook (16384 x 32).
        beta: commitment weight; ema: update the codebook by EMA instead of gradients (§3.4 trick).
        sample: sample the keep decision at inference like the official code (default: deterministic argmax).
        tau: Gumbel-softmax temperature (1.0).
        min_tokens: keep at least this many tokens per image (the highest keep scores are added); 0 = the
            official behaviour, where an image can get no token at all.
        llm_hidden_size: output width of ``vit_proj`` (the understanding path's Linear(C, 4096)); 0 = none.
        decoder: build :class:`LavitFeatureDecoder` (needed to train, not to encode); decoder_layers,
            decoder_heads, decoder_intermediate_size: its shape (official 12, 16, 6144).
        keep_ratio, keep_weight: target ``rho`` and weight ``lambda`` of the keep-ratio regulariser
            ``lambda * (rho - mean D)^2`` (§3.4; the official values are not published, these are ours).
        rec_weight, vq_weight: weights of the cosine reconstruction and VQ losses.
    """

    name: ClassVar[str] = "lavit"
    summary: ClassVar[str] = (
        "LaVIT dynamic discrete tokenizer: token selector + merger + cosine codebook "
        "(ICLR 2024, arXiv 2309.04669)"
    )

    vision_hidden_size: int = 1408
    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    num_prefix_tokens: int = 1
    merger_layers: int = 12
    merger_heads: int = 16
    merger_intermediate_size: int = 6144
    merger_ln_eps: float = 1e-5
    predictor_ln_eps: float = 1e-5
    policy_eps: float = 1e-6
    codebook_size: int = 16384
    codebook_dim: int = 32
    beta: float = 0.25
    ema: bool = False
    sample: bool = False
    tau: float = 1.0
    min_tokens: int = 0
    llm_hidden_size: int = 4096
    decoder: bool = False
    decoder_layers: int = 12
    decoder_heads: int = 16
    decoder_intermediate_size: int = 6144
    keep_ratio: float = 0.5
    keep_weight: float = 2.0
    rec_weight: float = 1.0
    vq_weight: float = 1.0

    def validate(self) -> None:
        _check_positive_ints(
            self,
            (
                "vision_hidden_size",
                "image_size",
                "patch_size",
                "in_channels",
                "merger_layers",
                "merger_heads",
                "merger_intermediate_size",
                "codebook_size",
                "codebook_dim",
                "decoder_layers",
                "decoder_heads",
                "decoder_intermediate_size",
            ),
        )
        check_int(self.num_prefix_tokens, "num_prefix_tokens", lo=0)
        check_int(self.llm_hidden_size, "llm_hidden_size", lo=0)
        c = self.vision_hidden_size
        if c % 2 or c < 4:
            raise ValueError(
                f"vision_hidden_size={c} is not allowed: the token selector splits it in two halves and "
                f"narrows it to C/4, so it must be even and >= 4"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; allowed: "
                f"{[d for d in range(1, self.image_size + 1) if self.image_size % d == 0]}"
            )
        check_int(self.min_tokens, "min_tokens", lo=0, hi=self.num_patches)
        _check_divides(self, "vision_hidden_size", "merger_heads")
        _check_divides(self, "vision_hidden_size", "decoder_heads")
        for f in ("merger_ln_eps", "predictor_ln_eps", "policy_eps", "tau"):
            check_float(getattr(self, f), f, lo=0.0, lo_open=True)
        check_float(self.keep_ratio, "keep_ratio", lo=0.0, hi=1.0)
        for f in ("beta", "keep_weight", "rec_weight", "vq_weight"):
            check_float(getattr(self, f), f, lo=0.0)
        for f in ("ema", "sample", "decoder"):
            check_bool(getattr(self, f), f)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """``N``: patch tokens per image (256 officially), the maximum token count."""
        return self.grid**2

    def build(self, vision_tower: Callable[[torch.Tensor], Any] | None = None) -> LavitTokenizer:
        return LavitTokenizer(self, vision_tower=vision_tower)


class LavitOutput(NamedTuple):
    """:meth:`LavitTokenizer.forward`. ``K = sum_b k_b`` kept tokens of the batch, image-major, raster order.

    ids: ``[K]`` code ids (None without quantisation); counts: ``[B]`` k_b; keep: ``[B, N]`` float decision
    (hard 0/1 values; straight-through gradient to the selector when sampled in training); mask: ``[B, N]``
    bool of the same; log_probs: ``[B, N, 2]`` selector output (index 0 = keep); merged: ``[K, C]`` kept
    merger outputs; quantized: ``[K, d]`` straight-through codes (the normalised encoder output without
    quantisation); vq_loss: scalar; z: ``[K, d]`` normalised encoder outputs; features: ``[B, N, C]`` the
    ViT patch features (the reconstruction target).
    """

    ids: torch.Tensor | None
    counts: torch.Tensor
    keep: torch.Tensor
    mask: torch.Tensor
    log_probs: torch.Tensor
    merged: torch.Tensor
    quantized: torch.Tensor
    vq_loss: torch.Tensor
    z: torch.Tensor
    features: torch.Tensor


# -- masked attention (official softmax_with_policy) ---------------------------------------------------
def policy_softmax(scores: torch.Tensor, allowed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The official masked softmax: ``(exp(s - max) * a + eps/N) / (sum(exp(s - max) * a) + eps)``.

    ``scores [B, H, N, M]``, ``allowed [B, 1, N, M]`` in {0, 1} (or a straight-through float), computed in
    fp32. The max runs over all positions, masked or not, and every position gets ``eps/N`` on top, so a
    masked position keeps a weight of order ``eps / N`` and a row with nothing allowed becomes uniform
    (reproduced for weight parity). Gradients flow into ``allowed`` (that is how the selector learns).
    """
    n = scores.shape[-1]
    m = scores.amax(dim=-1, keepdim=True)
    w = (scores - m).float().exp() * allowed.float()
    w = (w + eps / n) / (w.sum(dim=-1, keepdim=True) + eps)
    return w.to(scores.dtype)


def causal_policy(keep: torch.Tensor) -> torch.Tensor:
    """Self-attention mask of the merger ``[B, N] -> [B, 1, N, N]``: i may attend to j iff j <= i and j is
    kept, and every i to itself (a dropped token still sees itself) (§3.1 step 4)."""
    b, n = keep.shape
    a = keep[:, None, None, :]
    eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
    a = a + (1.0 - a) * eye
    return a * torch.ones(n, n, dtype=keep.dtype, device=keep.device).tril()


def cross_policy(keep: torch.Tensor) -> torch.Tensor:
    """Cross-attention mask of the merger ``[B, N] -> [B, 1, N, N]``: every token attends to the **dropped**
    tokens only (their information is fused into the kept ones)."""
    b, n = keep.shape
    return (1.0 - keep)[:, None, None, :].expand(b, 1, n, n)


def keep_decision(log_probs: torch.Tensor, *, stochastic: bool, tau: float = 1.0) -> torch.Tensor:
    """Keep decision ``[B, N, 2] -> [B, N]`` float in {0, 1} (index 0 of the last axis = keep).

    ``stochastic``: ``F.gumbel_softmax(log_probs, tau, hard=True)[..., 0]``, the official training and
    inference op (straight-through gradient). Else the argmax, ties kept (deterministic).
    """
    if stochastic:
        return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]
    return (log_probs[..., 0] >= log_probs[..., 1]).to(log_probs.dtype)


def _force_min(keep: torch.Tensor, log_probs: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """Add the highest-scoring dropped tokens until each image keeps ``min_tokens`` (no gradient there)."""
    if min_tokens <= 0:
        return keep
    score = (log_probs[..., 0] - log_probs[..., 1]).detach()
    score = score.masked_fill(keep.detach() > 0.5, float("inf"))  # already kept tokens rank first
    top = score.topk(min_tokens, dim=-1).indices
    forced = torch.zeros_like(keep).scatter_(1, top, 1.0)
    return torch.maximum(keep, forced)


# -- modules with the official names ---------------------------------------------------------------------
class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as the official ``LayerNorm`` / ``FusedLayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


class TokenPredictor(nn.Module):
    """The token selector (§3.1 step 3), DynamicViT style: ``[B, N, C] -> [B, N, 2]`` log-probabilities.

    ``h = GELU(Linear(LN(x)))``; the first half of ``h`` stays local, the second half is averaged over the
    tokens of ``policy`` (all ones at inference) and broadcast; ``out_conv`` maps ``C -> C/2 -> C/4 -> 2``
    with GELUs, then log-softmax. Names match the official ``in_conv`` / ``out_conv`` Sequentials.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(_LayerNorm(dim, eps=eps), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        h = self.in_conv(x)
        b, n, c = h.shape
        if policy is None:
            policy = h.new_ones(b, n, 1)
        local = h[..., : c // 2]
        glob = (h[..., c // 2 :] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, glob.expand(b, n, c - c // 2)], dim=-1))


class _CausalAttention(nn.Module):
    """Official ``TokenCausalAttention``: packed ``qkv``, ``proj``, masked by :func:`causal_policy`."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        w = policy_softmax(scores, causal_policy(keep), self.eps)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, c))


class _CrossAttention(nn.Module):
    """Official ``TokenCrossAttention``: queries from ``x``, keys / values from ``x_origin``, masked by
    :func:`cross_policy`."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = _heads(self.query(x), self.heads)
        k = _heads(self.key(x_origin), self.heads)
        v = _heads(self.value(x_origin), self.heads)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        w = policy_softmax(scores, cross_policy(keep), self.eps)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, c))


class CausalFuserBlock(nn.Module):
    """One merger block (§3.1 step 4), pre-LN residual: causal self-attention over kept tokens,
    cross-attention to the dropped tokens of ``x_origin``, MLP."""

    def __init__(
        self, dim: int, heads: int, hidden: int, ln_eps: float = 1e-5, policy_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm0 = _LayerNorm(dim, eps=ln_eps)
        self.token_causal_attn = _CausalAttention(dim, heads, policy_eps)
        self.norm1 = _LayerNorm(dim, eps=ln_eps)
        self.token_cross_attn = _CrossAttention(dim, heads, policy_eps)
        self.norm2 = _LayerNorm(dim, eps=ln_eps)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.token_causal_attn(self.norm0(x), keep)
        x = x + self.token_cross_attn(self.norm1(x), x_origin, keep)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """The token merger (§3.1 step 4): ``x_origin = ln_vision(x)``, the blocks, final ``norm``.
    ``[B, N, C], keep [B, N] -> [B, N, C]``."""

    def __init__(
        self, dim: int, heads: int, depth: int, hidden: int, ln_eps: float = 1e-5, policy_eps: float = 1e-6
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            CausalFuserBlock(dim, heads, hidden, ln_eps, policy_eps) for _ in range(depth)
        )
        self.ln_vision = _LayerNorm(dim, eps=ln_eps)
        self.norm = _LayerNorm(dim, eps=ln_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x_origin = self.ln_vision(x)
        for blk in self.blocks:
            x = blk(x, x_origin, keep)
        return self.norm(x)


class _DecoderCrossAttention(nn.Module):
    """Queries attend to the padded code sequence; padding gets the official additive ``-10000``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, code_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = _heads(self.query(x), self.heads)
        k = _heads(self.key(codes), self.heads)
        v = _heads(self.value(codes), self.heads)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        scores = scores + (1.0 - code_mask.to(scores.dtype))[:, None, None, :] * -10000.0
        return self.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, ln_eps: float) -> None:
        super().__init__()
        self.norm0 = _LayerNorm(dim, eps=ln_eps)
        self.self_attn = _Attention(dim, heads)  # the same timm-style block as SEED's
        self.norm1 = _LayerNorm(dim, eps=ln_eps)
        self.cross_attn = _DecoderCrossAttention(dim, heads)
        self.norm2 = _LayerNorm(dim, eps=ln_eps)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, code_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), codes, code_mask)
        return x + self.mlp(self.norm2(x))


class LavitFeatureDecoder(nn.Module):
    """The feature part of the official ``VQDecoder`` (§3.2): codes of a variable number of kept tokens ->
    the ``N`` ViT features. Names match ``tokenizer_decoder.bin`` (its UNet projection heads are left out).

    ``in_proj`` ``d -> C``; codes padded to ``[B, k_max, C]`` plus ``pos_embed[:, :k_max]`` (position = order
    in the kept sequence, not the grid position, as officially); ``N`` learned ``query_embed`` run
    self-attention -> cross-attention to the codes (padding masked) -> MLP per block; ``norm``;
    ``decode_task_layer`` ``C -> C -> C`` with Tanh -> ``[B, N, C]``.
    """

    def __init__(
        self,
        code_dim: int,
        dim: int,
        num_patches: int,
        depth: int,
        heads: int,
        hidden: int,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_proj = nn.Linear(code_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.query_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList(_DecoderBlock(dim, heads, hidden, ln_eps) for _ in range(depth))
        self.norm = _LayerNorm(dim, eps=ln_eps)
        self.decode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))

    def forward(self, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``codes [sum k_b, d]`` (image-major), ``counts [B]`` -> ``[B, N, C]``."""
        x = self.in_proj(codes)
        b = counts.shape[0]
        kmax = int(counts.max()) if b else 0
        slots = torch.arange(kmax, device=x.device)[None, :] < counts[:, None]  # [B, kmax]
        padded = x.new_zeros(b, kmax, x.shape[-1]).masked_scatter(slots[..., None], x)
        padded = padded + self.pos_embed[:, :kmax]
        q = self.query_embed.expand(b, -1, -1)
        for blk in self.blocks:
            q = blk(q, padded, slots)
        return self.decode_task_layer(self.norm(q))


def _trunc_normal_init(module: nn.Module) -> None:
    """Official init of the selector and the merger: Linear trunc-normal std 0.02, bias 0; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -- the tokenizer ------------------------------------------------------------------------------------
class LavitTokenizer(LlmVocabMixin, nn.Module):
    """The LaVIT tokenizer (spec §3.1); submodule names are the official ``DynamicVisualTokenizer`` ones
    (``token_predictor``, ``causal_encoder``, ``quantize``, ``encode_task_layer``, ``vit_proj``) plus our
    optional ``decoder`` (:class:`LavitFeatureDecoder`, official ``tokenizer_decoder.bin`` names).

    Args:
        config: a :class:`LavitConfig` (default: official shapes); ``overrides`` replace fields.
        vision_tower: optional callable ``pixel_values -> [B, num_prefix_tokens + N, C]`` (EVA:
            ``forward_features(return_all_features=True)``, no final norm); needed only to encode images.
            Not a submodule: not in the state dict, not moved by ``.to()``.
    """

    _vocab_style: ClassVar[str] = "lavit"
    _official_layout: ClassVar[VocabLayout] = LAVIT_OFFICIAL_LAYOUT

    def __init__(
        self,
        config: LavitConfig | None = None,
        vision_tower: Callable[[torch.Tensor], Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        config = config or LavitConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.__dict__["vision_tower"] = vision_tower
        self.vocab: VocabLayout | None = None
        c = config.vision_hidden_size
        self.token_predictor = TokenPredictor(c, config.predictor_ln_eps)
        self.causal_encoder = TokenMerger(
            c,
            config.merger_heads,
            config.merger_layers,
            config.merger_intermediate_size,
            config.merger_ln_eps,
            config.policy_eps,
        )
        _trunc_normal_init(self.token_predictor)
        _trunc_normal_init(self.causal_encoder)
        self.quantize = CosineCodebook(
            config.codebook_size, config.codebook_dim, beta=config.beta, ema=config.ema
        )
        self.encode_task_layer = nn.Sequential(nn.Linear(c, c), nn.Tanh(), nn.Linear(c, config.codebook_dim))
        if config.llm_hidden_size:
            self.vit_proj = nn.Linear(c, config.llm_hidden_size)
        if config.decoder:
            self.decoder = LavitFeatureDecoder(
                config.codebook_dim,
                c,
                config.num_patches,
                config.decoder_layers,
                config.decoder_heads,
                config.decoder_intermediate_size,
                config.merger_ln_eps,
            )

    # -- image -> kept tokens -> ids ------------------------------------------------------------------
    def _features(self, images: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if (images is None) == (features is None):
            raise ValueError("LavitTokenizer: pass exactly one of images= and features=")
        n = cfg.num_patches
        if images is not None:
            check_images(images, cfg.image_size, cfg.in_channels, "LavitTokenizer")
            tower = self.__dict__["vision_tower"]
            if tower is None:
                raise ValueError(
                    "LavitTokenizer: encoding images needs a vision_tower (pass features= to skip the tower)"
                )
            with torch.no_grad():  # the tower is frozen
                out = tower_output(tower(images))
            if out.dim() != 3 or out.shape[1] != n + cfg.num_prefix_tokens:
                raise ValueError(
                    f"LavitTokenizer: the vision tower returned shape {tuple(out.shape)}; expected "
                    f"[B, {cfg.num_prefix_tokens} + {n}, {cfg.vision_hidden_size}] "
                    "(num_prefix_tokens + patches)"
                )
            features = out[:, cfg.num_prefix_tokens :]
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(
                f"LavitTokenizer: features must be [B, {n}, {cfg.vision_hidden_size}], got {shape}"
            )
        if features.shape[1] != n:
            hint = " (a CLS token left in? pass patch tokens only)" if features.shape[1] == n + 1 else ""
            raise ValueError(
                f"LavitTokenizer: features have {features.shape[1]} tokens; allowed: {n} = "
                f"({cfg.image_size}/{cfg.patch_size})^2 patch tokens{hint}"
            )
        if features.shape[-1] != cfg.vision_hidden_size:
            raise ValueError(
                f"LavitTokenizer: features have width {features.shape[-1]}; allowed: "
                f"{cfg.vision_hidden_size} (vision_hidden_size)"
            )
        return features

    def _select(self, x: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs [B, N, 2], keep [B, N])``; the selector runs in fp32 as officially."""
        log_probs = self.token_predictor(x.float())
        keep = keep_decision(log_probs, stochastic=stochastic, tau=self.config.tau)
        return log_probs, _force_min(keep, log_probs, self.config.min_tokens)

    def _stochastic(self, sample: bool | None) -> bool:
        if sample is not None:
            return sample
        return self.training or self.config.sample

    def forward(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        sample: bool | None = None,
        quantize: bool = True,
    ) -> LavitOutput:
        """Select, merge and (optionally) quantise (§3.1 steps 3-5).

        ``sample``: Gumbel-sample the keep decision (default: in training mode, or when ``config.sample``);
        ``False`` takes the argmax. ``quantize=False`` is training phase 1 (§3.4): ``quantized`` is then the
        normalised continuous encoder output and ``ids`` is None.
        """
        x = self._features(images, features)
        log_probs, keep = self._select(x, self._stochastic(sample))
        merged = self.causal_encoder(x, keep.to(x.dtype))
        mask = keep > 0.5
        counts = mask.sum(dim=1)
        kept = merged[mask]  # [K, C], image-major, raster order within an image
        z = self.encode_task_layer(kept.to(self.encode_task_layer[-1].weight.dtype))
        if quantize:
            vq = self.quantize(z)
            ids, quantized, vq_loss, zn = vq.ids, vq.quantized, vq.loss, vq.z
        else:
            zn = F.normalize(z, dim=-1)
            ids, quantized, vq_loss = None, zn, zn.new_zeros(())
        return LavitOutput(ids, counts, keep, mask, log_probs, kept, quantized, vq_loss, zn, x)

    @torch.no_grad()
    def tokenize(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        sample: bool | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(ids per image, keep mask [B, N] bool)``; deterministic unless sampling (``sample`` argument,
        else ``config.sample``), whatever the module's train / eval mode."""
        x = self._features(images, features)
        stochastic = self.config.sample if sample is None else sample
        _, keep = self._select(x, stochastic)
        merged = self.causal_encoder(x, keep.to(x.dtype))
        mask = keep > 0.5
        z = self.encode_task_layer(merged[mask].to(self.encode_task_layer[-1].weight.dtype))
        ids = self.quantize.assign(z)
        return list(ids.split(mask.sum(dim=1).tolist())), mask

    def encode(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        sample: bool | None = None,
    ) -> list[torch.Tensor]:
        """``[B, C, S, S]`` images (or ``[B, N, C_v]`` patch features) -> one int64 id tensor ``[k_b]`` per
        image (codes ``0..K-1``, raster order; ``k_b`` varies, 0 allowed unless ``min_tokens``)."""
        return self.tokenize(images, features=features, sample=sample)[0]

    @torch.no_grad()
    def encode_continuous(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        sample: bool | None = None,
    ) -> list[torch.Tensor]:
        """Understanding path (§3.1): kept merger outputs through ``vit_proj``, ``[k_b, llm_hidden_size]``
        per image (the official LLM reads these, not the codes)."""
        if not self.config.llm_hidden_size:
            raise ValueError(
                "LavitTokenizer.encode_continuous needs vit_proj; build with llm_hidden_size > 0"
            )
        x = self._features(images, features)
        _, keep = self._select(x, self.config.sample if sample is None else sample)
        merged = self.causal_encoder(x, keep.to(x.dtype))
        mask = keep > 0.5
        return list(self.vit_proj(merged[mask]).split(mask.sum(dim=1).tolist()))

    # -- ids <-> codes <-> features ------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of ``ids``: ``[...] -> [..., d]`` (raises on ids outside the codebook)."""
        return self.quantize.lookup(ids)

    def ids_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Nearest-code ids ``[..., d] -> [...]`` (codes are L2-normalised first, as encoder outputs are);
        ``ids_from_codes(lookup(ids)) == ids``."""
        return self.quantize.assign(codes)

    def decode_embeddings(self, ids: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Codebook rows of ``ids`` (a tensor, or the per-image list of :meth:`encode`, concatenated):
        ``[..., d]``, the input of the de-tokenizer (spec ``code_embeddings``)."""
        if isinstance(ids, (list, tuple)):
            ids = torch.cat([i.reshape(-1) for i in ids]) if ids else torch.zeros(0, dtype=torch.long)
        return self.lookup(ids)

    def reconstruct(self, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The feature decoder: ``codes [sum k_b, d]``, ``counts [B]`` -> ``[B, N, C]`` reconstructed ViT
        features (§3.2, the training target of §3.4)."""
        if not self.config.decoder:
            raise ValueError("LavitTokenizer.reconstruct needs the feature decoder; build with decoder=True")
        if counts.dim() != 1 or int(counts.sum()) != codes.shape[0]:
            raise ValueError(
                f"LavitTokenizer.reconstruct: counts {counts.tolist()} must sum to the {codes.shape[0]} codes"
            )
        if bool((counts > self.config.num_patches).any()):
            raise ValueError(f"LavitTokenizer.reconstruct: counts must be <= {self.config.num_patches}")
        return self.decoder(codes, counts)

    def reconstruct_ids(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Per-image ids (as :meth:`encode` returns them) -> ``[B, N, C]`` reconstructed features."""
        counts = torch.tensor([len(i) for i in ids], device=self.quantize.weight.device)
        return self.reconstruct(self.decode_embeddings(ids), counts)

    def losses(self, out: LavitOutput) -> dict[str, torch.Tensor]:
        """Training losses (§3.4): ``total = rec_weight L_rec + keep_weight L_keep + vq_weight L_vq``.

        * ``rec``: mean over all ``B x N`` patches of ``1 - cos(reconstruct(quantized), sg(features))``;
        * ``keep``: ``mean_b (keep_ratio - mean_n D_bn)^2`` with the straight-through decision ``D``;
        * ``vq``: the codebook's loss (commitment, plus the codebook term unless EMA).
        """
        cfg = self.config
        rec = out.vq_loss.new_zeros(())
        if cfg.decoder:
            recon = self.reconstruct(out.quantized, out.counts)
            rec = (1 - F.cosine_similarity(recon.float(), out.features.detach().float(), dim=-1)).mean()
        keep = ((cfg.keep_ratio - out.keep.mean(dim=1)) ** 2).mean()
        total = cfg.rec_weight * rec + cfg.keep_weight * keep + cfg.vq_weight * out.vq_loss
        return {"total": total, "rec": rec, "keep": keep, "vq": out.vq_loss}

    # -- LLM vocabulary -----------------------------------------------------------------------------
    def to_llm_ids(
        self, ids: torch.Tensor, add_special: bool = True, layout: VocabLayout | None = None
    ) -> torch.Tensor:
        """One image's ids ``[k]`` -> ``[IMG] ids+offset [/IMG]`` (``[k + 2]``); layout: ``self.vocab`` after
        :meth:`extend_vocab`, else the official one (32000 / 32001 / 32002+)."""
        check_ids(ids, self.config.codebook_size)
        return self._layout(layout).to_llm_ids(ids, add_special)


# -- official checkpoint layout (§3.7) -----------------------------------------------------------------
#: ``tokenizer_decoder.bin`` / ``highres_tokenizer_decoder.bin`` keys of the UNet conditioning heads, which
#: this module does not hold (pixel decoding is out of scope).
LAVIT_DECODER_IGNORED_PREFIXES: tuple[str, ...] = ("unet_proj", "unet_attnpool.")


def official_state_shapes(config: LavitConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of ``tokenizer_encoder.bin`` (+ ``vit_proj``) and, with ``decoder=True``, of
    ``tokenizer_decoder.bin`` under ``decoder.`` (official files have no prefix); built on the meta device."""
    with torch.device("meta"):
        tok = LavitTokenizer(config or LavitConfig())
    return {k: tuple(v.shape) for k, v in tok.state_dict().items()}


def load_official_state(
    tokenizer: LavitTokenizer,
    encoder: str | Path | Mapping[str, torch.Tensor] | None = None,
    *,
    visual_weight: str | Path | Mapping[str, torch.Tensor] | None = None,
    decoder: str | Path | Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
) -> dict[str, LoadReport]:
    """Load official LaVIT files into ``tokenizer`` (key names as in the module; §3.7).

    Args:
        encoder: ``visual_tokenizer/tokenizer_encoder.bin``: every tensor of ``token_predictor``,
            ``causal_encoder``, ``quantize`` and ``encode_task_layer`` is required (``vit_proj`` is loaded
            if present). Keys of the EVA tower (``encoder.``) are ignored.
        visual_weight: ``language_model/visual_weight.bin``: merger + ``vit_proj`` tuned with the LLM for
            understanding; loaded after (over) ``encoder``, nothing required.
        decoder: ``visual_tokenizer/tokenizer_decoder.bin`` (or the high-res one) into ``tokenizer.decoder``
            (needs ``decoder=True``); the UNet heads (:data:`LAVIT_DECODER_IGNORED_PREFIXES`) are ignored.
        strict: unknown keys raise (default) or are skipped and reported.

    A wrong shape raises ``ValueError`` naming the key and both shapes; missing required keys raise listing
    them. With ``llm_hidden_size > 0``, ``vit_proj`` must come from ``encoder`` or ``visual_weight``.
    Returns one :class:`~._checkpoint.LoadReport` per file given.
    """
    reports: dict[str, LoadReport] = {}

    def enc_key(k: str) -> str | None:
        return None if k.startswith("encoder.") else k  # the EVA tower, loaded separately

    def not_encoder_side(k: str) -> bool:
        return k.startswith(("decoder.", "vit_proj."))

    def identity(k: str) -> str:
        return k

    if encoder is not None:
        reports["encoder"] = load_mapped_state(
            tokenizer,
            read_state_dict(encoder, "LaVIT encoder"),
            enc_key,
            identity,
            "LaVIT encoder",
            strict=strict,
            skip=not_encoder_side,
        )
    if visual_weight is not None:
        reports["visual_weight"] = load_mapped_state(
            tokenizer,
            read_state_dict(visual_weight, "LaVIT visual_weight"),
            enc_key,
            identity,
            "LaVIT visual_weight",
            strict=strict,
            skip=lambda k: True,
        )
    if tokenizer.config.llm_hidden_size and (encoder is not None or visual_weight is not None):
        got = {k for r in reports.values() for k in r.loaded}
        if not {"vit_proj.weight", "vit_proj.bias"} <= got:
            raise ValueError(
                "LaVIT checkpoint: missing keys ['vit_proj.bias', 'vit_proj.weight'] (the understanding "
                "projection); pass visual_weight= (language_model/visual_weight.bin) or build with "
                "llm_hidden_size=0"
            )
    if decoder is not None:
        if not tokenizer.config.decoder:
            raise ValueError(
                "LaVIT decoder checkpoint given but the tokenizer has no decoder; build with decoder=True"
            )
        reports["decoder"] = load_mapped_state(
            tokenizer,
            read_state_dict(decoder, "LaVIT decoder"),
            lambda k: None if k.startswith(LAVIT_DECODER_IGNORED_PREFIXES) else k,
            identity,
            "LaVIT decoder",
            strict=strict,
            prefix="decoder.",
        )
    return reports
