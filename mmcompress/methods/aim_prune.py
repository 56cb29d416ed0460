"""AIM in-LLM pruning: PageRank importance of the visual tokens and a per-layer keep schedule.

Zhong, Liu, Li, Wang: "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv 2412.03248; official code LaVi-Lab/AIM @ edc24e9 (forked transformers
``models/qwen2/modeling_qwen2.py``: ``get_importance``, the pruning block of ``Qwen2Model.forward``;
``other_packages/LLaVA-PruMerge/modeling_llama.py`` for Vicuna). Spec:
``specs/divprune-aim-zipvl-kvquant.md`` §2.3–2.5. The pre-LLM merging half is ``"aim_merge"``.

The math (pure functions here, index-exact on the golden ``ap*`` vectors):

* :func:`pagerank_importance` — on a layer's attention logits ``L = QKᵀ/√d + mask`` (every query row),
  ``M = softmax(L / τ)`` (τ = 0.1), ``π⁰ = 1/N``, ``πᵏ⁺¹ = πᵏ M (1 − d) + d/N`` five times (d = 0: no
  damping), importance = ``sqrt(mean_h π_h²)`` (RMS over heads).
* :func:`aim_schedule` — the official piecewise-linear retention of the visual tokens after each
  layer: 1 up to layer ``start - 1``, then ``max(0, 1 - (l - start + 1) * step)``.
* :func:`aim_keep_num` / :func:`aim_select` — after layer ``l`` keep the ``int((N − P)·ρ_l + P)`` best
  positions, where text (``P`` protected tokens) scores +1, dead positions −1 and visual tokens their
  importance; a full descending ``torch.sort`` as officially.

What differs from the official code (the runtime in :mod:`mmcompress.adapters.llm_hooks`): the official
code only *masks* pruned tokens, so nothing is saved. Here they leave the hidden states, and the layers
after the cut cache only the surviving tokens, so compute and KV memory really drop. Two consequences,
both documented approximations: (1) pruned tokens no longer vote as query rows in later layers'
PageRank (spec §2.4 "parity trap"); (2) the PageRank runs only at layers where a ranking is needed
(some row keeps more than zero and fewer than its live visual tokens); every other layer runs the model's
own SDPA / eager attention untouched. Kept tokens keep their original RoPE positions, as officially.
Batches: each row decides with its own counts (``N``, ``P`` of that row), so a padded row prunes exactly
like the same prompt alone (the official code uses row 0's counts for every row).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from ..config import InLLMMethod, check_int
from ..registry import register

__all__ = [
    "AIM",
    "OFFICIAL_SCHEDULES",
    "aim_schedule",
    "pagerank_pi",
    "pagerank_importance",
    "attention_logits",
    "aim_keep_num",
    "aim_select",
]

#: official (start, step) per LLM depth: Qwen2-7B (LLaVA-OV, Qwen2-VL) and Vicuna-7B (LLaVA-1.5)
OFFICIAL_SCHEDULES: dict[int, tuple[int, float]] = {28: (14, 0.125), 32: (13, 0.125)}
#: the Qwen2 schedule's ramp, 8 layers of 0.125 on a 28-layer LLM, as a drop per layer per 28 layers
_STEP_DEPTH = 0.125 * 28


def default_start_step(num_layers: int) -> tuple[int, float]:
    """The official ``(start, step)`` for a 28- or 32-layer LLM; else Qwen2's scaled to the depth:
    pruning starts after half the layers and reaches 0 after another ``8/28`` of them."""
    if num_layers in OFFICIAL_SCHEDULES:
        return OFFICIAL_SCHEDULES[num_layers]
    return int(round(num_layers / 2)), min(1.0, _STEP_DEPTH / num_layers)


def aim_schedule(num_layers: int, start: int | None = None, step: float | None = None) -> list[float]:
    """Retention ``ρ_l`` of the visual tokens after layer ``l`` (fraction of the original count), spec §2.3.

    ``ρ_l = 1`` for ``l < start`` and ``max(0, 1 - (l - start + 1) * step)`` from ``start`` on, so layers
    ``0..start`` see every visual token. Defaults: :func:`default_start_step`. ``aim_schedule(28)`` is the
    official Qwen2-7B list ``[1.0]*14 + [0.875, 0.75, ..., 0.125] + [0]*7``; ``aim_schedule(32)`` Vicuna's.
    """
    check_int(num_layers, "num_layers", 1)
    d_start, d_step = default_start_step(num_layers)
    start = d_start if start is None else start
    step = d_step if step is None else step
    return [
        1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) * step) for layer in range(num_layers)
    ]


def attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    alive: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    official_mask: bool = False,
) -> torch.Tensor:
    """Causal attention logits in fp32, ``[B, H, N, d] x [B, H_kv, N, d] -> [B, H, N, N]`` (spec §2.3 step 1).

    Keys ``j > i`` and keys with ``alive[b, j]`` false are masked. ``official_mask=True`` adds the
    official fp16 additive mask (``finfo(float16).min = -65504``, golden quirk 14) instead of ``-inf``;
    after the division by τ both give masked keys exactly zero weight, but ``-inf`` turns a query row
    with no visible key into NaN (drop such rows with ``voters`` in :func:`pagerank_importance`).
    Grouped-query keys are repeated to the query heads. ``scaling`` defaults to ``1/√d``.
    """
    b, h, n, d = query.shape
    if key.shape[0] != b or key.shape[2] != n or h % key.shape[1]:
        raise ValueError(
            f"attention_logits: query {tuple(query.shape)} and key {tuple(key.shape)} do not match "
            f"(same batch and length; query heads a multiple of key heads)"
        )
    k = key.float().repeat_interleave(h // key.shape[1], dim=1)
    logits = query.float() @ k.transpose(-1, -2)
    logits = logits * scaling if scaling is not None else logits / math.sqrt(d)
    visible = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()[None, None]
    if alive is not None:
        visible = visible & alive.to(torch.bool)[:, None, None, :]
    if official_mask:
        add = torch.zeros(visible.shape, dtype=torch.float16, device=query.device)
        add = add.masked_fill(~visible, torch.finfo(torch.float16).min)
        return logits + add.float()
    return logits.masked_fill(~visible, float("-inf"))


def pagerank_pi(
    logits: torch.Tensor,
    *,
    tau: float = 0.1,
    iters: int = 5,
    damping: float = 0.0,
    voters: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-head PageRank vector ``[B, H, N, N] -> [B, H, N]`` fp32 (spec §2.3 steps 2–3).

    ``M = softmax(logits / tau)`` row-wise in fp32; ``π`` starts uniform and is updated ``iters`` times as
    ``π ← (π M)(1 − damping) + damping / N``.

    ``voters`` (``[B, N]`` bool, optional): only these query rows vote (padding rows, whose logits are all
    masked, must not); ``π`` then starts at ``1/n`` on the ``n`` voters and the damping term spreads over
    them. ``None`` is the official behaviour (every row votes, ``π⁰ = 1/N``).
    """
    if logits.dim() != 4 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"pagerank: logits must be [B, H, N, N], got {tuple(logits.shape)}")
    if not tau > 0:
        raise ValueError(f"tau={tau!r} is not allowed; the temperature must be > 0")
    b, h, n, _ = logits.shape
    m = torch.softmax(logits / tau, dim=-1, dtype=torch.float32)
    if voters is None:
        pi = torch.full((b, h, 1, n), 1.0 / n, dtype=torch.float32, device=logits.device)
        teleport = damping / n
    else:
        v = voters.to(device=logits.device, dtype=torch.float32)[:, None, None, :]  # [B, 1, 1, N]
        count = v.sum(-1, keepdim=True).clamp(min=1.0)
        pi = (v / count).expand(b, h, 1, n)
        teleport = v * (damping / count)
        # a non-voting row (e.g. padding: every key masked, softmax NaN) carries no mass
        m = torch.where(voters.to(device=m.device, dtype=torch.bool)[:, None, :, None], m, 0.0)
    for _ in range(iters):
        pi = (pi @ m) * (1.0 - damping) + teleport
    return pi[:, :, 0]


def pagerank_importance(
    logits: torch.Tensor,
    *,
    tau: float = 0.1,
    iters: int = 5,
    damping: float = 0.0,
    voters: torch.Tensor | None = None,
) -> torch.Tensor:
    """AIM's importance ``[B, H, N, N] -> [B, N]`` fp32: the RMS over heads of :func:`pagerank_pi`,
    ``sqrt(mean_h π_h²)`` (spec §2.3 step 4; official ``get_importance``)."""
    pi = pagerank_pi(logits, tau=tau, iters=iters, damping=damping, voters=voters)
    return pi.pow(2).mean(dim=1).sqrt()


def aim_keep_num(n: int, n_protected: int, rate: float) -> int:
    """Positions kept after a layer with retention ``rate``: ``int((n - P) * rate + P)`` (truncated, as
    officially: V = 25 at 0.875 keeps 21 visual tokens, golden ap05)."""
    return int((n - n_protected) * rate + n_protected)


def aim_select(
    importance: torch.Tensor,
    alive: torch.Tensor,
    protected: torch.Tensor,
    keep_num: int | torch.Tensor,
) -> torch.Tensor:
    """The positions alive after a layer, ``[B, N]`` bool (spec §2.3 steps 5–7).

    Scores are the importance, ``-1`` where not ``alive``, ``+1`` on ``protected`` text (text overrides);
    the ``keep_num`` best (an int, or one per row) under a full descending ``torch.sort`` are kept, and
    the result is ``alive & kept``: text stays, pruned tokens never come back.
    """
    if importance.shape != alive.shape or alive.shape != protected.shape or importance.dim() != 2:
        raise ValueError(
            f"aim_select: importance {tuple(importance.shape)}, alive {tuple(alive.shape)} and protected "
            f"{tuple(protected.shape)} must be the same [B, N] shape"
        )
    alive = alive.to(torch.bool)
    score = importance.float().masked_fill(~alive, -1.0).masked_fill(protected.to(torch.bool), 1.0)
    order = torch.sort(score, dim=-1, descending=True).indices
    b, n = score.shape
    k = torch.as_tensor(keep_num, device=score.device).reshape(-1, 1).expand(b, 1)
    top = torch.arange(n, device=score.device)[None, :] < k  # rank < keep_num
    kept = torch.zeros_like(alive).scatter(1, order, top)
    return alive & kept


@register
@dataclasses.dataclass(frozen=True)
class AIM(InLLMMethod):
    """AIM progressive PageRank pruning of visual tokens inside the LLM (ICCV 2025, arXiv 2412.03248).

    Attributes:
        start: first layer after which visual tokens are dropped (layers ``0..start`` see all of them);
            None: the official 14 (28 layers) / 13 (32 layers), else half the depth.
        step: retention lost per layer from ``start`` on (official 0.125); None: 0.125 for 28/32-layer
            LLMs, else ``3.5 / num_layers`` (the official 8-layer ramp scaled to the depth).
        schedule: explicit retention per layer (``ρ_l`` after layer ``l``, fractions of the visual tokens),
            instead of ``start`` / ``step``; layers past its end keep its last value. Must not be longer
            than the LLM.
        tau: PageRank softmax temperature (official 0.1).
        iters: power iterations (official 5).
        damping: PageRank damping (official 0: none).
        head_chunk: heads scored at once (memory bound ``B·head_chunk·N²`` floats); None: all.

    Usage: ``mmc.compress(model, "aim")`` or with merging before the LLM, as AIM ships it:
    ``mmc.compress(model, [mmc.AIMMerge(keep=0.25), mmc.AIM()])``.
    """

    name: ClassVar[str] = "aim"
    summary: ClassVar[str] = (
        "AIM in-LLM PageRank pruning of visual tokens with a per-layer schedule; pruned tokens leave the "
        "hidden states and KV cache (ICCV 2025, arXiv 2412.03248)"
    )

    start: int | None = None
    step: float | None = None
    schedule: tuple[float, ...] | None = None
    tau: float = 0.1
    iters: int = 5
    damping: float = 0.0
    head_chunk: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.schedule, list):  # JSON round trip gives a list
            object.__setattr__(self, "schedule", tuple(self.schedule))
        super().__post_init__()

    def validate(self) -> None:
        if self.start is not None:
            check_int(self.start, "start", 0)
        if self.step is not None:
            _check_float(self.step, "step")
            if not 0.0 < self.step <= 1.0:
                raise ValueError(f"step={self.step!r} is not allowed; allowed: a retention drop in (0, 1]")
        if self.schedule is not None:
            if self.start is not None or self.step is not None:
                raise ValueError(
                    f"give either schedule={self.schedule!r} or start/step (got start={self.start!r}, "
                    f"step={self.step!r}), not both"
                )
            if not isinstance(self.schedule, tuple) or not self.schedule:
                raise TypeError(f"schedule must be a non-empty tuple of fractions, got {self.schedule!r}")
            for i, r in enumerate(self.schedule):
                _check_float(r, f"schedule[{i}]")
                if not 0.0 <= r <= 1.0:
                    raise ValueError(f"schedule[{i}]={r!r} is not allowed; retentions lie in [0, 1]")
        _check_float(self.tau, "tau")
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau!r} is not allowed; the temperature must be > 0")
        check_int(self.iters, "iters", 1)
        _check_float(self.damping, "damping")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"damping={self.damping!r} is not allowed; allowed: [0, 1)")
        if self.head_chunk is not None:
            check_int(self.head_chunk, "head_chunk", 1)

    def rates(self, num_layers: int) -> list[float]:
        """Per-layer retention for an LLM of ``num_layers`` layers; raises if the config does not fit."""
        if self.schedule is not None:
            if len(self.schedule) > num_layers:
                raise ValueError(
                    f"schedule has {len(self.schedule)} entries but the LLM has {num_layers} layers; "
                    f"allowed: at most one retention per layer"
                )
            return [float(r) for r in self.schedule] + [float(self.schedule[-1])] * (
                num_layers - len(self.schedule)
            )
        if self.start is not None and self.start >= num_layers:
            raise ValueError(
                f"start={self.start} is out of range for an LLM with {num_layers} layers; "
                f"allowed: 0..{num_layers - 1}"
            )
        return aim_schedule(num_layers, self.start, self.step)

    def make_patch(self, model: Any, handle: Any) -> Any:
        from mmcompress.adapters.llm_hooks import AIMPatch

        return AIMPatch(model, handle, self)


def _check_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{field} must be a finite number, got {value!r}")
    return float(value)
