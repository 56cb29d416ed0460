"""TokenPacker: a coarse-to-fine visual projector (fewer, richer visual tokens).

Li et al., "TokenPacker: Efficient Visual Projector for Multimodal LLM", arXiv 2407.02392 (IJCV 2025);
official code CircleRadon/TokenPacker @ 771a16e (``llava/model/multimodal_projector/builder.py``,
``llava/patch_divide.py``). Spec: ``specs/tokenpacker-seed-lavit.md`` §1.

It replaces LLaVA's MLP projector. From the ViT's patch features on a ``G x G`` grid it makes
``M = (G / s)^2`` LLM tokens (s = scale factor; 576 -> 144 / 64 / 36 for s = 2 / 3 / 4 on CLIP-L/336):

1. point queries: the query-layer features bilinearly downsampled to ``(G/s) x (G/s)`` (§1.2 step 1);
2. each query attends only to the ``s x s`` patches of its own region, whose keys and values come from
   the concatenated multi-level features (§1.2 steps 2-5);
3. an MLP maps the attention output to the LLM width (§1.2 step 6).

This module is pure tensor code and knows no model family: :class:`TokenPacker` (weights named exactly
as in the official checkpoints, §1.3), the official checkpoint loader (:func:`read_official_projector`,
:func:`load_official_state`), and the high-resolution patch-divide variant's pieces (§1.4:
:func:`slice_plan`, :func:`slice_image`, :func:`assemble_hd`, :func:`hd_token_count`). Wiring into a
transformers LLaVA model lives in :mod:`mmcompress.adapters.hf_llava_tokenpacker`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_int

__all__ = [
    "OFFICIAL_FEATURE_LAYERS",
    "OFFICIAL_QUERY_LAYER",
    "OFFICIAL_PREFIXES",
    "PATCH_CANDIDATES",
    "TokenPackerConfig",
    "TokenPacker",
    "check_scale",
    "num_image_tokens",
    "downsample_queries",
    "group_regions",
    "official_state_shapes",
    "config_from_state",
    "read_official_projector",
    "load_official_state",
    "slice_plan",
    "slice_image",
    "hd_token_count",
    "assemble_hd",
]

#: CLIP ViT-L/14-336 hidden-state indices concatenated into the key/value features (§1.1).
OFFICIAL_FEATURE_LAYERS: tuple[int, ...] = (12, 16, 22, 23)
#: ``mm_vision_select_layer``: the query (single-level) hidden state, = index 23 of 25 (§1.1).
OFFICIAL_QUERY_LAYER: int = -2
#: Where the projector's keys live in official files (§1.3): full LLaVA checkpoints, the stage-1
#: ``mm_projector.bin`` (both ``model.mm_projector.``), and our transformers layout.
OFFICIAL_PREFIXES: tuple[str, ...] = (
    "model.mm_projector.",
    "mm_projector.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)


# -- configuration -----------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_scale(scale_factor: Any, raw_grid: int, field: str = "scale_factor") -> int:
    """Validate a scale factor against a ``raw_grid x raw_grid`` patch grid (§1.2: ``G % s == 0``)."""
    check_int(scale_factor, field, lo=1)
    if raw_grid % scale_factor:
        raise ValueError(
            f"{field}={scale_factor} does not divide the {raw_grid}x{raw_grid} patch grid; allowed: "
            f"{_divisors(raw_grid)} (the paper uses 2, 3, 4 on a 24x24 grid)"
        )
    return scale_factor


@dataclasses.dataclass(frozen=True)
class TokenPackerConfig:
    """Shapes of one TokenPacker (spec §1.2 constructor, §1.6); the defaults are the official CLIP-L/336 +
    Vicuna-7B model.

    Attributes:
        vision_hidden_size: ``C_v``, the width of one vision hidden state (query input; CLIP-L 1024).
        num_levels: ``L``, hidden states concatenated into the key/value input (``L * C_v`` wide; 4).
        raw_grid: ``G``, patches per side of one view (24 for 336 px / 14 px patches).
        scale_factor: ``s``; ``M = (G / s)^2`` output tokens. Must divide ``G``. Weight shapes do not
            depend on it (§1.3), so a checkpoint trained at one ``s`` loads at any other.
        embed_dim: ``E``, attention width (official: ``C_v``).
        num_heads: attention heads (official: ``E // 128``); must divide ``E``.
        text_hidden_size: ``H``, the LLM width (4096 for 7B, 5120 for 13B).
        ln_eps: LayerNorm epsilon of ``ln_q_1/ln_k_1/ln_v_1`` (1e-6).
    """

    vision_hidden_size: int = 1024
    num_levels: int = 4
    raw_grid: int = 24
    scale_factor: int = 2
    embed_dim: int = 1024
    num_heads: int = 8
    text_hidden_size: int = 4096
    ln_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in (
            "vision_hidden_size",
            "num_levels",
            "raw_grid",
            "embed_dim",
            "num_heads",
            "text_hidden_size",
        ):
            check_int(getattr(self, f), f, lo=1)
        check_scale(self.scale_factor, self.raw_grid)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}; allowed: "
                f"{_divisors(self.embed_dim)}"
            )
        if isinstance(self.ln_eps, bool) or not isinstance(self.ln_eps, (int, float)) or not self.ln_eps > 0:
            raise ValueError(f"ln_eps={self.ln_eps!r} is not allowed; must be a float > 0")

    @property
    def grid(self) -> int:
        """``G / s``: output tokens per side."""
        return self.raw_grid // self.scale_factor

    @property
    def num_tokens(self) -> int:
        """``M = (G / s)^2`` visual tokens per view."""
        return self.grid**2

    @property
    def kv_input_size(self) -> int:
        """``L * C_v``: width of the multi-level key/value input."""
        return self.num_levels * self.vision_hidden_size

    def replace(self, **changes: Any) -> TokenPackerConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenPackerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TokenPackerConfig: unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def num_image_tokens(raw_grid: int, scale_factor: int) -> int:
    """``(G / s)^2``: visual tokens one view becomes (§1.6); 144 / 64 / 36 for G = 24, s = 2 / 3 / 4."""
    check_int(raw_grid, "raw_grid", lo=1)
    return (raw_grid // check_scale(scale_factor, raw_grid)) ** 2


# -- the two layout steps ------------------------------------------------------------------------------
def downsample_queries(x: torch.Tensor, raw_grid: int, scale_factor: int) -> torch.Tensor:
    """Point-query initialisation (§1.2 step 1): ``[B, G*G, C] -> [B, (G/s)^2, C]``.

    Bilinear resize of the ``G x G`` feature map to ``G/s x G/s`` (``align_corners=False``, no
    antialiasing), computed in fp32 and cast back, as officially. On that sampling grid s = 2 is exactly
    2x2 average pooling, s = 3 picks the centre patch of each 3x3 cell, s = 4 averages the central 2x2.
    """
    b, n, c = x.shape
    if n != raw_grid * raw_grid:
        raise ValueError(f"downsample_queries: {n} tokens do not form the {raw_grid}x{raw_grid} grid")
    g = raw_grid // check_scale(scale_factor, raw_grid)
    fmap = x.reshape(b, raw_grid, raw_grid, c).permute(0, 3, 1, 2).float()
    low = F.interpolate(fmap, size=(g, g), mode="bilinear", align_corners=False)
    return low.permute(0, 2, 3, 1).reshape(b, g * g, c).to(x.dtype)


def group_regions(t: torch.Tensor, raw_grid: int, scale_factor: int) -> torch.Tensor:
    """Point-to-region grouping (§1.2 step 4): ``[B, G*G, E] -> [s^2, M*B, E]`` (sequence first).

    Column ``r*B + b`` holds, for image ``b`` and region ``r`` (row-major over the ``G/s x G/s`` regions),
    the region's ``s x s`` patches ``(s*i + a, s*j + c)`` in row-major order over ``(a, c)``. This is the
    official fold of (region, batch) into the attention batch axis, so each query sees only its region.
    """
    b, n, e = t.shape
    s = scale_factor
    g = raw_grid // s
    blocks = t.reshape(b, g, s, g, s, e)  # (b, i, a, j, c, e)
    return blocks.permute(2, 4, 1, 3, 0, 5).reshape(s * s, g * g * b, e)


# -- the module ---------------------------------------------------------------------------------------
class TokenPacker(nn.Module):
    """The TokenPacker projector (spec §1.2); submodule names are the official ones (§1.3).

    ``forward(single [B, G*G, C_v], multi [B, G*G, L*C_v]) -> [B, M, H]`` with ``M = (G/s)^2``:

    * ``Q = ln_q_1(q_proj_1(downsample(single)))``  (``q_proj_1`` has no bias)         ``[B, M, E]``
    * ``K = ln_k_1(k_proj_1(multi))``, ``V = ln_v_1(v_proj_1(multi))``  (Linear-GELU-Linear) ``[B, G*G, E]``
    * ``clip_attn``: ``nn.MultiheadAttention(E, heads)``, each query over its own ``s^2`` keys ``[B, M, E]``
      (no residual from the query and no FFN: the attention output is the packed token)
    * ``mlp``: Linear(E, H) - GELU - Linear(H, H)                                        ``[B, M, H]``

    Rows must be patch tokens only (CLS removed; the official code cannot take CLS either, §1.1).
    """

    def __init__(self, config: TokenPackerConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or TokenPackerConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        c, e, h = config.vision_hidden_size, config.embed_dim, config.text_hidden_size
        self.q_proj_1 = nn.Linear(c, e, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(config.kv_input_size, e), nn.GELU(), nn.Linear(e, e))
        self.v_proj_1 = nn.Sequential(nn.Linear(config.kv_input_size, e), nn.GELU(), nn.Linear(e, e))
        self.ln_q_1 = nn.LayerNorm(e, eps=config.ln_eps)
        self.ln_k_1 = nn.LayerNorm(e, eps=config.ln_eps)
        self.ln_v_1 = nn.LayerNorm(e, eps=config.ln_eps)
        self.clip_attn = nn.MultiheadAttention(e, config.num_heads)
        self.mlp = nn.Sequential(nn.Linear(e, h), nn.GELU(), nn.Linear(h, h))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official init (§1.2): every Linear (MHA ``out_proj`` included) trunc-normal std 0.02 and
        bias 0, LayerNorms 1 / 0; the packed MHA ``in_proj_weight`` keeps PyTorch's xavier init."""
        self.clip_attn._reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    def set_scale(self, scale_factor: int) -> None:
        """Change ``s`` in place (weights are shape-independent of ``s``, §1.3)."""
        self.config = self.config.replace(scale_factor=scale_factor)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def forward(self, single: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        g0, s = cfg.raw_grid, cfg.scale_factor
        if single.dim() != 3 or multi.dim() != 3:
            raise ValueError(
                f"TokenPacker: single and multi must be [B, N, C], got {tuple(single.shape)} and "
                f"{tuple(multi.shape)}"
            )
        b, n, c = single.shape
        if n != g0 * g0:
            hint = " (a CLS token left in? use patch tokens only)" if n == g0 * g0 + 1 else ""
            raise ValueError(
                f"TokenPacker: {n} tokens per view do not form the {g0}x{g0} patch grid (raw_grid={g0}){hint}"
            )
        if c != cfg.vision_hidden_size:
            raise ValueError(
                f"TokenPacker: single has {c} channels, vision_hidden_size={cfg.vision_hidden_size}"
            )
        if tuple(multi.shape) != (b, n, cfg.kv_input_size):
            raise ValueError(
                f"TokenPacker: multi must be [{b}, {n}, {cfg.kv_input_size}] (num_levels={cfg.num_levels} x "
                f"{cfg.vision_hidden_size}), got {tuple(multi.shape)}"
            )
        key = group_regions(self.ln_k_1(self.k_proj_1(multi)), g0, s)  # [s^2, M*B, E]
        value = group_regions(self.ln_v_1(self.v_proj_1(multi)), g0, s)
        q = self.ln_q_1(self.q_proj_1(downsample_queries(single, g0, s)))  # [B, M, E]
        m = q.shape[1]
        # region-major, batch-minor, as in group_regions: query column r*B + b
        query = q.transpose(0, 1).reshape(1, m * b, -1)
        out = self.clip_attn(query, key, value, need_weights=False)[0]  # [1, M*B, E]
        out = out.reshape(m, b, -1).transpose(0, 1)  # [B, M, E]
        return self.mlp(out)


# -- official checkpoint layout (§1.3) -----------------------------------------------------------------
def official_state_shapes(config: TokenPackerConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the projector's tensors, prefix stripped (the §1.3 table for the defaults)."""
    c, e, h, kv = config.vision_hidden_size, config.embed_dim, config.text_hidden_size, config.kv_input_size
    shapes: dict[str, tuple[int, ...]] = {"q_proj_1.weight": (e, c)}
    for p in ("k_proj_1", "v_proj_1"):
        shapes.update(
            {f"{p}.0.weight": (e, kv), f"{p}.0.bias": (e,), f"{p}.2.weight": (e, e), f"{p}.2.bias": (e,)}
        )
    for ln in ("ln_q_1", "ln_k_1", "ln_v_1"):
        shapes.update({f"{ln}.weight": (e,), f"{ln}.bias": (e,)})
    shapes.update(
        {
            "clip_attn.in_proj_weight": (3 * e, e),
            "clip_attn.in_proj_bias": (3 * e,),
            "clip_attn.out_proj.weight": (e, e),
            "clip_attn.out_proj.bias": (e,),
            "mlp.0.weight": (h, e),
            "mlp.0.bias": (h,),
            "mlp.2.weight": (h, h),
            "mlp.2.bias": (h,),
        }
    )
    return shapes


def config_from_state(state: Mapping[str, torch.Tensor], **fixed: Any) -> TokenPackerConfig:
    """Infer the widths of a projector state dict (prefix stripped); ``fixed`` sets the rest.

    ``C_v`` and ``E`` come from ``q_proj_1.weight``, ``L`` from ``k_proj_1.0.weight``, ``H`` from
    ``mlp.0.weight``. ``raw_grid``, ``scale_factor`` and ``num_heads`` are not in the weights: they default
    to the official 24, 2 and ``E // 128`` (at least 1) unless given in ``fixed``.
    """
    for k in ("q_proj_1.weight", "k_proj_1.0.weight", "mlp.0.weight"):
        if k not in state:
            raise KeyError(f"TokenPacker state: key {k!r} is missing; present: {sorted(state)[:8]}")
    e, c = state["q_proj_1.weight"].shape
    kv = state["k_proj_1.0.weight"].shape[1]
    if kv % c:
        raise ValueError(
            f"TokenPacker state: key 'k_proj_1.0.weight' has input width {kv}, not a multiple of the "
            f"query width {c} from 'q_proj_1.weight'"
        )
    h = state["mlp.0.weight"].shape[0]
    kw: dict[str, Any] = dict(
        vision_hidden_size=c, num_levels=kv // c, embed_dim=e, num_heads=max(1, e // 128), text_hidden_size=h
    )
    kw.update(fixed)
    return TokenPackerConfig(**kw)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only projector keys, without their prefix; a bare projector state dict passes unchanged."""
    for prefix in OFFICIAL_PREFIXES:
        hits = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if hits:
            return hits
    return dict(state)


def _read_file(path: Path, keep: Any = None) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                if keep is None or keep(k):
                    out[k] = f.get_tensor(k)
        return out
    # torch pickles (mm_projector.bin, pytorch_model-*.bin): tensors only, no code execution
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if keep is None or keep(k)}


def read_official_projector(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TokenPacker tensors of an official checkpoint, keys as in §1.3 (prefix stripped).

    ``source`` may be a state dict; a file (``mm_projector.bin`` from stage 1, a ``pytorch_model*.bin`` /
    ``*.safetensors`` shard); or a checkpoint folder (uses ``mm_projector.bin`` if present, else the shard
    index ``pytorch_model.bin.index.json`` / ``model.safetensors.index.json`` to open only the shards that
    hold projector keys, else every ``*.bin`` / ``*.safetensors`` file). Keys under ``model.mm_projector.``,
    ``mm_projector.`` or our ``model.multi_modal_projector.`` are recognised.
    """

    def is_proj(k: str) -> bool:
        return any(k.startswith(p) for p in OFFICIAL_PREFIXES)

    if isinstance(source, Mapping):
        return _strip_prefix(source)
    path = Path(source)
    if path.is_file():
        return _strip_prefix(_read_file(path))
    if not path.is_dir():
        raise FileNotFoundError(f"TokenPacker checkpoint {path} does not exist")
    if (path / "mm_projector.bin").is_file():
        return _strip_prefix(_read_file(path / "mm_projector.bin"))
    for index in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            files = sorted({f for k, f in weight_map.items() if is_proj(k)})
            break
    else:
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_file(path / f, keep=is_proj))
    if not state:
        raise ValueError(
            f"{path}: no TokenPacker keys (prefixes {OFFICIAL_PREFIXES}) in {files or 'no files'}"
        )
    return _strip_prefix(state)


def load_official_state(packer: TokenPacker, source: str | Path | Mapping[str, torch.Tensor]) -> TokenPacker:
    """Load an official-layout checkpoint into ``packer`` strictly; returns ``packer``.

    Every §1.3 key must be present with exactly the shape ``packer.config`` implies. A wrong shape raises
    ``ValueError`` naming the key, the expected and the found shape; missing or unexpected keys raise
    ``ValueError`` listing them. Tensors are cast to the packer's dtype and device.
    """
    state = read_official_projector(source)
    want = official_state_shapes(packer.config)
    for k, shape in want.items():
        if k in state and tuple(state[k].shape) != shape:
            raise ValueError(
                f"TokenPacker checkpoint: key {k!r} has shape {tuple(state[k].shape)}, expected {shape} "
                f"for {packer.config}"
            )
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"TokenPacker checkpoint: missing keys {missing}, unexpected keys {unexpected}")
    ref = next(packer.parameters())
    packer.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()})
    return packer


# -- TokenPacker-HD: dynamic high resolution by patch division (§1.4) ----------------------------------
# Candidate (h_blocks, w_blocks) lists in the official order (argmax keeps the first best, so order is
# part of the behaviour). 9: the 23 grids with h*w <= 9; 16: 36 grids; 25: 57 entries with (4,6) and
# (6,4) listed twice, as officially.
_P9 = (
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1), (1, 5), (5, 1), (1, 6), (6, 1),
    (2, 3), (3, 2), (1, 7), (7, 1), (4, 2), (2, 4), (1, 8), (8, 1), (3, 3), (1, 9), (9, 1),
)  # fmt: skip
_P16 = _P9 + (
    (2, 5), (5, 2), (2, 6), (6, 2), (3, 4), (4, 3), (2, 7), (7, 2), (3, 5), (5, 3), (2, 8), (8, 2), (4, 4),
)  # fmt: skip
_P25 = _P16 + (
    (3, 6), (6, 3), (2, 9), (9, 2), (4, 5), (5, 4), (2, 10), (10, 2), (3, 7), (7, 3), (11, 2), (2, 11),
    (4, 6), (6, 4), (12, 2), (2, 12), (3, 8), (8, 3), (4, 6), (6, 4), (5, 5),
)  # fmt: skip
PATCH_CANDIDATES: dict[int, tuple[tuple[int, int], ...]] = {9: _P9, 16: _P16, 25: _P25}


def slice_plan(height: int, width: int, patch_num: int = 9, block: int = 336) -> tuple[int, int]:
    """``(h_blocks, w_blocks)`` for an image of ``height x width`` pixels (§1.4 step 2).

    For each candidate grid: fit ratio ``r = min(block*hb/h, block*wb/w)``; fill
    ``round(h r) round(w r) / (block^2 hb wb)``; score = fill + 0.1 * IoU of the boxes
    ``[0, 0, block*hb, block*wb]`` and ``[0, 0, 1.4h, 1.4w]`` (IoU denominator + 1e-5); first argmax.
    Computed in float32 like the official torch code, so ties break the same way.
    """
    if patch_num not in PATCH_CANDIDATES:
        raise ValueError(f"patch_num={patch_num!r} is not allowed; choose one of {tuple(PATCH_CANDIDATES)}")
    check_int(height, "height", lo=1)
    check_int(width, "width", lo=1)
    cand = PATCH_CANDIDATES[patch_num]
    hb = torch.tensor([p[0] for p in cand], dtype=torch.float32) * block
    wb = torch.tensor([p[1] for p in cand], dtype=torch.float32) * block
    area = hb * wb
    r = torch.minimum(hb / height, wb / width)
    fill = torch.round(height * r) * torch.round(width * r) / area
    bh, bw = torch.tensor(height * 1.4, dtype=torch.float32), torch.tensor(width * 1.4, dtype=torch.float32)
    inter = torch.minimum(hb, bh) * torch.minimum(wb, bw)
    iou = inter / (area + bh * bw - inter + 1e-5)
    return cand[int(torch.argmax(fill + 0.1 * iou))]


def _fit(h: int, w: int, box_h: int, box_w: int) -> tuple[int, int]:
    """Size of an ``h x w`` image resized (aspect kept) to fit ``box_h x box_w``, official rounding."""
    rh, rw = box_h / h, box_w / w
    if rh <= rw:
        return box_h, min(box_w, round(w * rh))
    return min(box_h, round(h * rw)), box_w


def slice_image(
    image: torch.Tensor, patch_num: int = 9, block: int = 336
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a normalised image into TokenPacker-HD views (§1.4 steps 1-4).

    Args:
        image: ``[3, h, w]`` float tensor, already normalised (official: ToTensor + CLIP mean/std of the
            original image, no resize).
        patch_num: 9, 16 or 25 (the candidate grid list).
        block: crop side in pixels (the tower's input size).

    Returns:
        ``(views [n (+1), 3, block, block], (hb, wb))``: the ``n = hb*wb`` crops of the padded canvas in
        row-major order, then, when ``n > 1``, one global view. The image is resized bilinearly to fit
        ``block*hb x block*wb`` and pasted top-left on a zero canvas (zero = mean colour). The global view
        resizes that **padded canvas** to the original image's fitted size and pastes it top-left on a zero
        ``block x block`` canvas (the official quirk, kept for weight parity).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"slice_image: image must be [3, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"slice_image: image must be a normalised float tensor, got dtype {image.dtype}")
    _, h, w = image.shape
    hb, wb = slice_plan(h, w, patch_num, block)
    th, tw = _fit(h, w, block * hb, block * wb)
    canvas = image.new_zeros(1, 3, block * hb, block * wb)
    canvas[:, :, :th, :tw] = F.interpolate(image[None], size=(th, tw), mode="bilinear", align_corners=False)
    views = [
        canvas[:, :, block * i : block * (i + 1), block * j : block * (j + 1)]
        for i in range(hb)
        for j in range(wb)
    ]
    if hb * wb > 1:
        gh, gw = _fit(h, w, block, block)
        glob = image.new_zeros(1, 3, block, block)
        glob[:, :, :gh, :gw] = F.interpolate(canvas, size=(gh, gw), mode="bilinear", align_corners=False)
        views.append(glob)
    return torch.cat(views), (hb, wb)


def hd_token_count(h_blocks: int, w_blocks: int, tokens_per_view: int) -> int:
    """LLM tokens of one sliced image (§1.4): ``n*M + [n>1]*M + hb*(wb-1) + hb + [n>1]`` with ``n = hb*wb``.

    (crops, the global view, one ``,`` between crops of a row, one ``\\n`` after each row and after the
    global view.)
    """
    n = h_blocks * w_blocks
    many = int(n > 1)
    return n * tokens_per_view + many * tokens_per_view + h_blocks * (w_blocks - 1) + h_blocks + many


def assemble_hd(
    view_tokens: torch.Tensor, h_blocks: int, w_blocks: int, sep: torch.Tensor, newline: torch.Tensor
) -> torch.Tensor:
    """One image's LLM sequence from its packed views (§1.4, official ``mode='slice'`` assembly).

    Args:
        view_tokens: ``[n (+1), M, H]`` TokenPacker output of the crops (row-major) and, when ``n > 1``,
            the global view last.
        h_blocks, w_blocks: the slice plan.
        sep, newline: ``[H]`` LLM input embeddings placed between crops of a row (``,``) and after each
            row and the global view (``\\n``; with a SentencePiece LLaMA tokenizer this is the ``<unk>``
            embedding, reproduced as is).

    Returns:
        ``[hd_token_count(hb, wb, M), H]``: for each crop row ``crop , crop , ... crop \\n``, then
        ``global \\n`` if ``n > 1``.
    """
    n = h_blocks * w_blocks
    want = n + int(n > 1)
    if view_tokens.dim() != 3 or view_tokens.shape[0] != want:
        raise ValueError(
            f"assemble_hd: expected [{want}, M, H] view tokens for a {h_blocks}x{w_blocks} plan, got "
            f"{tuple(view_tokens.shape)}"
        )
    sep, newline = sep.reshape(1, -1).to(view_tokens), newline.reshape(1, -1).to(view_tokens)
    parts = []
    for i in range(h_blocks):
        for j in range(w_blocks):
            parts.append(view_tokens[i * w_blocks + j])
            if j < w_blocks - 1:
                parts.append(sep)
        parts.append(newline)
    if n > 1:
        parts += [view_tokens[n], newline]
    return torch.cat(parts)
