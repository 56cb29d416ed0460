"""External vision towers as signal sources (issue 7): no model names here, open_clip lives in
:mod:`mmcompress.towers.open_clip` (the ``clip`` extra).

Two roles, both fed by the pixels the VLM's own vision tower receives:

* a :class:`SignalTower` produces the :class:`~mmcompress.signals.VitAttention` signals a method asks for
  from *another* ViT (``compress(model, "hired", signal_tower=...)``), with the shapes the adapter's own
  probes give (``[views, heads, prefix + rows*cols]`` on the VLM's patch grid), so methods consume them
  unchanged;
* a :class:`RelevanceSource` scores each visual token against the question in a joint image-text space.
  With ``compress(model, method, relevance=..., question=...)`` the :class:`~mmcompress.api.Handle`
  restricts the method's candidates to the top ``prefilter`` fraction by relevance (:func:`prefilter_select`).

Adapters reach both through :meth:`mmcompress.api.Handle.tower_probes`, which returns
:class:`TowerProbe` s (the surface of :class:`~mmcompress.adapters.probes.AttentionProbe`: ``signal``,
``value``, ``remove()``) filled by one forward pre-hook on the VLM's vision tower.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmcompress.config import PreLLMMethod, resolve_keep
from mmcompress.signals import VitAttention
from mmcompress.tokens import Layout, Selection, VisualTokens

if TYPE_CHECKING:
    from mmcompress.api import Handle

__all__ = [
    "QuestionRelevance",
    "SignalTower",
    "RelevanceSource",
    "TowerProbe",
    "install_tower_probes",
    "token_sources",
    "prefilter_select",
    "check_prefilter",
    "check_question",
]


@dataclass(frozen=True)
class QuestionRelevance:
    """Signal key of a :class:`RelevanceSource`'s per-patch embeddings.

    Value ``[views, E, rows*cols]``: one joint-space embedding per patch of each vision view, resampled
    to the VLM's patch grid (channels in dim 1, like the heads of an attention signal, so the adapters'
    per-view resampling treats both alike). Never declared by a method: the Handle adds it.
    """


class SignalTower(abc.ABC):
    """Produces :class:`~mmcompress.signals.VitAttention` signals from the VLM's pixel values."""

    @abc.abstractmethod
    def check(self, needs: frozenset) -> None:
        """Raise ``ValueError`` if a signal of ``needs`` cannot be produced (e.g. a layer out of range)."""

    @abc.abstractmethod
    def compute(
        self, pixel_values: torch.Tensor, grid: tuple[int, int], signals: Sequence[VitAttention]
    ) -> dict[VitAttention, torch.Tensor]:
        """``pixel_values``: the VLM vision tower's input ``[V, 3, H, W]`` (the VLM's normalisation);
        ``grid``: the VLM's patch grid ``(rows, cols)``. Returns each signal as ``[V, heads,
        prefix + rows*cols]`` float32 (prefix = CLS / register columns first, as the adapters' probes)."""


class RelevanceSource(abc.ABC):
    """Per-patch question relevance in a joint image-text space (``prefilter``: fraction kept)."""

    prefilter: float

    @abc.abstractmethod
    def check(self) -> None:
        """Raise ``ValueError`` if this source cannot serve a VLM (e.g. no VLM normalisation given)."""

    @abc.abstractmethod
    def patch_embeddings(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """VLM pixels ``[V, 3, H, W]`` -> ``[V, E, rows*cols]`` embeddings on the VLM's patch grid."""

    @abc.abstractmethod
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[n, E]`` unit-norm text embeddings."""


def check_prefilter(value: Any) -> float:
    """A prefilter fraction: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"prefilter must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(
            f"prefilter={value!r} is not allowed: the fraction of visual tokens kept as candidates must be "
            f"in (0, 1]"
        )
    return float(value)


def check_question(question: Any) -> str | tuple[str, ...] | None:
    """``None``, one non-empty string (every image of a call) or a sequence of them (one per image)."""
    if question is None:
        return None
    if isinstance(question, str):
        items: tuple = (question,)
    elif isinstance(question, Sequence) and len(question) > 0:
        items = tuple(question)
    else:
        raise TypeError(f"question must be a string or a non-empty list of strings, got {question!r}")
    for q in items:
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question must hold non-empty strings, got {q!r}")
    return question if isinstance(question, str) else items


# -- probes on the VLM's vision tower ---------------------------------------------------------------------


class TowerProbe:
    """One signal computed by an external tower; ``value`` is set on every vision forward."""

    def __init__(self, signal: Any, hook: torch.utils.hooks.RemovableHandle) -> None:
        self.signal = signal
        self.value: torch.Tensor | None = None
        self._hook = hook

    def remove(self) -> None:
        self._hook.remove()  # idempotent: the probes of one install share the hook


def install_tower_probes(handle: Handle, vision_tower: nn.Module, patch_size: int) -> list[TowerProbe]:
    """Probes for ``handle.signal_tower``'s signals (those of ``handle.method.needs()``) and for
    ``handle.relevance``, all filled by one forward pre-hook on ``vision_tower`` reading its
    ``pixel_values`` (first argument or keyword). The VLM's patch grid is ``H // patch_size`` x
    ``W // patch_size``. Nothing runs while the handle is disabled."""
    sigs = sorted(tower_signals(handle), key=str)
    rel = handle.relevance
    if not sigs and rel is None:
        return []
    probes: list[TowerProbe] = []

    @torch.no_grad()
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not handle.enabled:
            return
        pix = args[0] if args else kwargs.get("pixel_values")
        if pix is None:
            return  # the adapter reports probes that did not fire
        grid = (pix.shape[-2] // patch_size, pix.shape[-1] // patch_size)
        values = handle.signal_tower.compute(pix, grid, sigs) if sigs else {}
        if rel is not None:
            values[QuestionRelevance()] = rel.patch_embeddings(pix, grid)
        for p in probes:
            p.value = values[p.signal]

    h = vision_tower.register_forward_pre_hook(hook, with_kwargs=True)
    probes += [TowerProbe(s, h) for s in sigs]
    if rel is not None:
        probes.append(TowerProbe(QuestionRelevance(), h))
    return probes


def tower_signals(handle: Handle) -> frozenset:
    """The signals of ``handle``'s pre-LLM method that its ``signal_tower`` serves (all VitAttention)."""
    if handle.signal_tower is None or handle.method is None:
        return frozenset()
    return frozenset(s for s in handle.method.needs() if isinstance(s, VitAttention))


# -- the relevance prefilter -------------------------------------------------------------------------------


def token_sources(layout: Layout, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each grid token of ``layout`` sits in a per-view signal ``[views, C, width]``.

    Returns ``(packed, row, col)``, each ``[M]`` int64 over the grid tokens in packed order. Views are
    right-aligned in the signal (prefix columns such as CLS first, as every adapter probe): the
    ``"base"`` view is row 0; an AnyRes ``"crops"`` view is rows ``1 + tile`` (crop tokens in the
    unpadding removed), or row 1 as one grid when the model resampled it (``tiles == (1, 1)``).
    ``"cls"`` and ``"newline"`` tokens have no patch: they are not listed.
    """
    from mmcompress.methods.hired import tile_packed_index

    parts = []
    for v in layout.views:
        if v.name == "base":
            n = v.rows * v.cols
            packed = v.grid_indices().flatten()
            row = torch.zeros(n, dtype=torch.long)
            col = width - n + torch.arange(n)
        elif v.name == "crops":
            per_tile = tile_packed_index(v)  # [tiles, th*tw], -1 in the padding
            n = per_tile.shape[1]
            tile, p = (per_tile >= 0).nonzero(as_tuple=True)
            packed, row, col = per_tile[tile, p], 1 + tile, width - n + p
            order = packed.argsort()
            packed, row, col = packed[order], row[order], col[order]
        elif v.name in ("cls", "newline"):
            continue
        else:
            raise ValueError(
                f"the relevance prefilter works on single-view and AnyRes layouts; got a view {v.name!r}"
            )
        if n > width:
            raise ValueError(f"view {v.name!r} has {n} tokens per vision view but the signal only {width}")
        parts.append((packed, row, col))
    packed, row, col = (torch.cat(t) for t in zip(*parts))
    order = packed.argsort()
    return packed[order], row[order], col[order]


def _budgeted(method: PreLLMMethod, n_all: int, n_cand: int) -> PreLLMMethod:
    """``method`` with its budget as a token count of the image's ``n_all`` tokens (a fraction keeps its
    meaning: of the whole image, not of the candidates), capped at the ``n_cand`` candidates."""
    field = type(method).budget_field
    keep = getattr(method, field, None) if field else None
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        return method
    k = min(resolve_keep(keep, n_all, field) if isinstance(keep, float) else int(keep), n_cand)
    return dataclasses.replace(method, **{field: k})


def _check_rows(value: torch.Tensor, row: torch.Tensor, what: Any) -> None:
    if value.dim() != 3 or int(row.max()) >= value.shape[0]:
        raise ValueError(
            f"{what}: signal of shape {tuple(value.shape)} does not cover the layout's "
            f"{int(row.max()) + 1} vision views"
        )


def prefilter_select(
    method: PreLLMMethod, tokens: VisualTokens, text_embedding: torch.Tensor, fraction: float
) -> Selection:
    """Run ``method`` on the top ``fraction`` of ``tokens`` by question relevance; indices mapped back.

    Relevance of a grid token = cosine between ``text_embedding`` ``[E]`` and its patch embedding
    (``tokens.signals[QuestionRelevance()]``). The ``M`` grid tokens are ranked (ties: lower packed index
    first) and the top ``max(1, round(fraction * M))`` become the candidates; newline / CLS tokens are
    never candidates (they carry no patch), so they are dropped. The method sees the candidates in packed
    order as one ``1 x n`` grid (``Layout.single(1, n)``) with every attention signal restricted to their
    columns (prefix columns kept), and a budget counted against the whole image (:func:`_budgeted`).
    Its indices ``i`` map back to ``candidates[i]``; merged ``groups`` to the original ``N`` (-1 = dropped).
    """
    rel = tokens.signals.get(QuestionRelevance())
    if rel is None:
        raise ValueError(
            f"image {tokens.image_index}: no question-relevance signal; the relevance prefilter needs "
            f"the images encoded by this model (pixel_values, not precomputed features)"
        )
    packed, row, col = token_sources(tokens.layout, rel.shape[-1])
    _check_rows(rel, row, "question relevance")
    emb = rel[row, :, col].float()  # [M, E]
    score = torch.nn.functional.cosine_similarity(emb, text_embedding.float().to(emb.device)[None], dim=-1)
    n_cand = max(1, round(fraction * packed.numel()))
    top = torch.sort(score, descending=True, stable=True).indices[:n_cand].cpu()
    top = top.sort().values  # packed order (packed is ascending)
    cand = packed[top]
    signals = {}
    for sig, value in tokens.signals.items():
        if isinstance(sig, QuestionRelevance):
            continue
        if not isinstance(sig, VitAttention):
            raise ValueError(f"the relevance prefilter cannot restrict signal {sig} to its candidates")
        _, r, c = token_sources(tokens.layout, value.shape[-1])
        _check_rows(value, r, sig)
        prefix = int(c[r == 0].min())  # the first view's columns before its patches: CLS / registers
        picked = value[r[top], :, c[top]].T  # [C, n]
        signals[sig] = torch.cat([value[:1, :, :prefix], picked[None]], dim=-1)
    sub = VisualTokens(
        features=tokens.features[cand.to(tokens.features.device)],
        layout=Layout.single(1, n_cand),
        signals=signals,
        image_index=tokens.image_index,
    )
    sel = _budgeted(method, tokens.num_tokens, n_cand).select(sub)
    groups = None
    if sel.groups is not None:
        groups = torch.full((tokens.num_tokens,), -1, dtype=torch.long, device=sel.groups.device)
        groups[cand.to(groups.device)] = sel.groups
    return Selection(
        indices=cand.to(sel.indices.device)[sel.indices],
        features=sel.features,
        weights=sel.weights,
        groups=groups,
    )
