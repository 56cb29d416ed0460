"""Public API: ``compress`` / ``restore`` / ``disabled`` / ``report`` / ``prepare_inputs`` (DESIGN §3).

Patches are instance-scoped and reversible: they live on the model instance (never on its class), a
second ``compress`` replaces the first, and ``restore`` leaves the instance exactly as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import registry
from .config import CacheMethod, InLLMMethod, MethodConfig, PreLLMMethod, check_choice
from .report import CallReport, ImageReport
from .tokens import Layout, Selection, VisualTokens

__all__ = ["Handle", "compress", "restore", "disabled", "report", "prepare_inputs"]

_ATTR = "_mmcompress_handle"
POSITIONS = ("original", "compact")


class Handle:
    """A model's active compression: the methods, what hooks them, the last call's report.

    ``method`` is the pre-LLM method (None when only a cache method is active) with its ``adapter``;
    ``kv`` is the KV-cache method (None if none) with its ``kv_patch``; ``inllm`` the in-LLM method
    (None if none) with its ``inllm_patch``.
    """

    def __init__(
        self,
        model: nn.Module,
        method: PreLLMMethod | None,
        positions: str,
        kv: CacheMethod | None = None,
        inllm: InLLMMethod | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.kv = kv
        self.inllm = inllm
        self.inllm_patch = None
        self.positions = positions
        self.enabled = True
        self.last_report: CallReport | None = None
        self.adapter = None
        self.kv_patch = None
        # external towers (mmcompress.towers): attention signals from another ViT; question relevance
        self.signal_tower = None
        self.relevance = None
        self.question: str | tuple[str, ...] | None = None

    # -- question relevance (compress(..., relevance=..., question=...)) --------------------------------
    def set_question(self, question: str | Sequence[str] | None) -> None:
        """The question the ``relevance=`` prefilter scores tokens against from the next call on: one
        string for every image of a call, or one per image (the call's flattened image list)."""
        from .towers import check_question

        self.question = check_question(question)

    @contextlib.contextmanager
    def asking(self, question: str | Sequence[str]) -> Iterator[Handle]:
        """``with handle.asking("What colour is the cube?"): model.generate(...)`` (previous one restored)."""
        prev = self.question
        self.set_question(question)
        try:
            yield self
        finally:
            self.question = prev

    def tower_signals(self) -> frozenset:
        """The method's signals that ``signal_tower`` produces (the adapter probes only the others)."""
        from .towers import tower_signals

        return tower_signals(self)

    def tower_probes(self, vision_tower: nn.Module, patch_size: int) -> list:
        """Probes on the VLM's ``vision_tower`` for ``signal_tower`` / ``relevance`` (none if unset)."""
        from .towers import install_tower_probes

        return install_tower_probes(self, vision_tower, patch_size)

    def _text_embeddings(self, n_images: int) -> list[torch.Tensor] | None:
        if self.relevance is None:
            return None
        q = self.question
        if q is None:
            raise ValueError(
                "relevance= needs the question: pass question= to compress(), call handle.set_question(...), "
                "or run generate() inside `with handle.asking(question):`"
            )
        texts = [q] * n_images if isinstance(q, str) else list(q)
        if len(texts) != n_images:
            raise ValueError(f"got {len(texts)} questions for the {n_images} images of this call")
        uniq = sorted(set(texts))
        emb = self.relevance.text_embeddings(uniq)
        return [emb[uniq.index(t)] for t in texts]

    def __repr__(self) -> str:
        pre = self.method.to_dict() if self.method is not None else None
        kv = f", kv={self.kv.to_dict()}" if self.kv is not None else ""
        kv += f", in_llm={self.inllm.to_dict()}" if self.inllm is not None else ""
        return (
            f"Handle({type(self.model).__name__}, {pre}{kv}, positions={self.positions!r}, "
            f"enabled={self.enabled})"
        )

    # Called by adapters: one image at a time, so batch composition never changes a selection.
    def select(
        self, features: Sequence[torch.Tensor], layouts: Sequence[Layout], signals: Sequence[dict]
    ) -> list[Selection]:
        rep = CallReport(method=self.method.to_dict())
        out = []
        t0 = time.perf_counter()
        texts = self._text_embeddings(len(features))
        for i, (f, lay, sig) in enumerate(zip(features, layouts, signals)):
            if not torch.isfinite(f).all():
                raise ValueError(
                    f"image {i}: visual features contain NaN or inf; method {self.method.name!r} "
                    f"needs finite features"
                )
            tokens = VisualTokens(features=f, layout=lay, signals=sig, image_index=i)
            with torch.no_grad():
                if texts is None:
                    sel = self.method.select(tokens)
                else:  # restrict the candidates to the most question-relevant tokens (mmcompress.towers)
                    from .towers import prefilter_select

                    sel = prefilter_select(self.method, tokens, texts[i], self.relevance.prefilter)
            _check_selection(sel, f.shape[0], self.method.name, i)
            out.append(sel)
            rep.images.append(ImageReport(f.shape[0], sel.num_kept, sel.indices.tolist(), lay))
        rep.method_ms = (time.perf_counter() - t0) * 1e3
        self.last_report = rep
        return out

    def remove(self) -> None:
        restore(self.model)


def _check_selection(sel: Selection, n: int, name: str, i: int) -> None:
    idx = sel.indices
    if idx.numel() == 0:
        raise RuntimeError(f"method {name!r} kept no token of image {i}")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise RuntimeError(f"method {name!r} returned indices outside [0, {n}) for image {i}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise RuntimeError(f"method {name!r} must return strictly increasing indices (image {i})")


def _as_stages(
    method: Any, kwargs: dict
) -> tuple[PreLLMMethod | None, InLLMMethod | None, CacheMethod | None]:
    """Split ``method`` (one, or a list) into at most one pre-LLM, one in-LLM and one KV-cache method
    (an in-LLM method that brings its own cache, like ZipVL, fills the KV-cache slot)."""
    methods = list(method) if isinstance(method, (list, tuple)) else [method]
    if len(methods) != 1 and kwargs:
        raise TypeError(
            f"options as keywords ({sorted(kwargs)}) need a single method; pass config objects to compose"
        )
    cfgs = [_as_method(m, kwargs) for m in methods]
    pre = [c for c in cfgs if isinstance(c, PreLLMMethod)]
    kv = [c for c in cfgs if isinstance(c, CacheMethod)]
    inllm = [c for c in cfgs if isinstance(c, InLLMMethod)]
    if not cfgs or len(pre) > 1 or len(kv) > 1 or len(inllm) > 1:
        raise ValueError(
            f"got {len(cfgs)} methods; this version composes at most one pre-LLM method, one in-LLM "
            f"method and one KV-cache method per model ({[c.name for c in cfgs]})"
        )
    own = inllm[0].cache_method() if inllm else None
    if own is not None:
        if kv:
            raise ValueError(
                f"method {inllm[0].name!r} brings its own KV cache ({own.name}); drop {kv[0].name!r} "
                f"and set the bits on {inllm[0].name!r} instead"
            )
        kv = [own]
    return (pre[0] if pre else None), (inllm[0] if inllm else None), (kv[0] if kv else None)


def _as_method(method: Any, kwargs: dict) -> PreLLMMethod | InLLMMethod | CacheMethod:
    if isinstance(method, str):
        method = registry.create(method, **kwargs)
    elif isinstance(method, MethodConfig):
        if kwargs:
            raise TypeError(
                f"pass options either in the config object or as keywords, not both "
                f"(got a {type(method).__name__} and {sorted(kwargs)})"
            )
    else:
        raise TypeError(
            f"method must be a method name ({', '.join(registry.names())}) or a config object, got {method!r}"
        )
    if not isinstance(method, (PreLLMMethod, InLLMMethod, CacheMethod)):
        raise TypeError(
            f"method {method.name!r} (stage {method.stage!r}) is not a pre-LLM, in-LLM or KV-cache method"
        )
    return method


def compress(
    model: nn.Module,
    method: str | MethodConfig | Sequence[MethodConfig],
    *,
    positions: str = "original",
    signal_tower: Any = None,
    relevance: Any = None,
    question: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> Handle:
    """Compress ``model``'s visual tokens from now on.

    Args:
        model: a supported VLM instance (see :func:`mmcompress.adapters.base.supported_families`); with
            only a KV-cache method (``"mixed_kv"``), any transformers decoder LLM or VLM.
        method: a registered name (``"divprune"``, ``"pool"``, ``"aim"``, ``"zipvl"``, ``"mixed_kv"``, ...)
            with its options as keywords, or a config object (``mmc.DivPrune(keep=64)``), or a list of
            config objects with at most one pre-LLM, one in-LLM and one KV-cache method
            (``[mmc.AIMMerge(), mmc.AIM(), mmc.MixedKV()]``; ZipVL brings its own cache).
        positions: ``"original"`` (kept tokens keep their RoPE positions; default) or ``"compact"``
            (renumber the shortened prompt 0..L'-1, as the official LLaVA-codebase methods do).
        signal_tower: a :class:`mmcompress.towers.SignalTower` (``OpenClipSignals``) computing the
            method's vision-attention signals from the images instead of the model's own vision tower.
        relevance: a :class:`mmcompress.towers.RelevanceSource` (``OpenClipRelevance``): the method only
            picks among the top ``relevance.prefilter`` fraction of tokens by question relevance.
        question: the question for ``relevance`` (one string, or one per image of a call); change it per
            call with ``handle.set_question(...)`` or ``with handle.asking(...):``.

    Returns the :class:`Handle`. Every check runs before anything is patched, so a bad call leaves the
    model as it was; a second call replaces the first. A method that cannot run on this model family
    raises an error naming the families it supports (:mod:`mmcompress.support`).
    """
    check_choice(positions, "positions", POSITIONS)
    cfg, inllm, kv = _as_stages(method, kwargs)
    handle = Handle(model, cfg, positions, kv=kv, inllm=inllm)
    _set_towers(handle, signal_tower, relevance, question)
    adapter, inllm_patch, kv_patch = _check_stages(model, handle, name_families=True)
    if (signal_tower is not None or relevance is not None) and not getattr(adapter, "accepts_towers", False):
        raise ValueError(
            f"signal_tower= / relevance= are supported on the transformers LLaVA family only "
            f"(not {type(model).__name__})"
        )
    restore(model)
    handle.adapter, handle.kv_patch, handle.inllm_patch = adapter, kv_patch, inllm_patch
    try:
        for part in (adapter, inllm_patch, kv_patch):
            if part is not None:
                part.install()
    except BaseException:
        for part in (kv_patch, inllm_patch, adapter):
            if part is not None:
                part.uninstall()
        raise
    setattr(model, _ATTR, handle)
    return handle


def _set_towers(handle: Handle, signal_tower: Any, relevance: Any, question: Any) -> None:
    """Validate and attach the external towers (mmcompress.towers) before anything is patched."""
    if signal_tower is None and relevance is None and question is None:
        return
    from .towers import RelevanceSource, SignalTower

    method = handle.method
    if signal_tower is not None:
        if not isinstance(signal_tower, SignalTower):
            raise TypeError(
                f"signal_tower must be a mmcompress.towers.SignalTower (e.g. "
                f"mmcompress.towers.open_clip.OpenClipSignals), got {type(signal_tower).__name__}"
            )
        if method is None or not method.needs():
            name = method.name if method is not None else None
            raise ValueError(
                f"signal_tower= computes vision-attention signals, but method {name!r} needs none"
            )
        signal_tower.check(method.needs())
    if relevance is not None:
        if not isinstance(relevance, RelevanceSource):
            raise TypeError(
                f"relevance must be a mmcompress.towers.RelevanceSource (e.g. "
                f"mmcompress.towers.open_clip.OpenClipRelevance), got {type(relevance).__name__}"
            )
        if method is None:
            raise ValueError("relevance= restricts a pre-LLM method's candidates; none was given")
        if "single" not in method.layouts:
            raise ValueError(
                f"relevance= presents the candidates as one flat grid, but method {method.name!r} works on "
                f"{' / '.join(method.layouts)} layouts only"
            )
        relevance.check()
    elif question is not None:
        raise ValueError("question= is read by relevance=; pass a relevance source too")
    handle.signal_tower, handle.relevance = signal_tower, relevance
    handle.set_question(question)


def _transformers_5(cfg: Any) -> Any:
    """``cfg`` if transformers is 5.x: in-LLM and KV-cache methods hook its attention / mask interfaces
    and cache layers. The pre-LLM API also runs on transformers 4.x (the original LLaVA codebase pins
    4.37)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        stage = "an in-LLM" if cfg.stage == "in_llm" else "a KV-cache"
        raise ValueError(
            f"method {cfg.name!r} is {stage} method and needs transformers>=5; installed: transformers "
            f"{transformers.__version__}. Pre-LLM methods work with transformers 4.x"
        )
    return cfg


def _check_stages(model: nn.Module, handle: Handle, name_families: bool = False) -> tuple[Any, Any, Any]:
    """Build the ``(adapter, in-LLM patch, KV-cache patch)`` of ``handle``'s methods for ``model`` and run
    their checks; nothing is installed. :mod:`mmcompress.support` derives the support matrix from exactly
    these checks. With ``name_families``, an error of a method the matrix marks "n/a" for this model's
    family gets the families that method supports appended to its message."""
    from mmcompress.adapters.base import find_adapter

    from .kv.method import CachePatch

    stages = (
        (handle.method, lambda: find_adapter(model)(model, handle)),
        # hooks on the decoder itself: no adapter needed
        (handle.inllm, lambda: _transformers_5(handle.inllm).make_patch(model, handle)),
        # a cache method needs no adapter: any transformers decoder LLM or VLM
        (handle.kv, lambda: CachePatch(model, handle, _transformers_5(handle.kv))),
    )
    parts: list[Any] = []
    for cfg, make in stages:
        part = None
        if cfg is not None:
            try:
                part = make()
                part.check()
            except (ValueError, TypeError) as e:
                if name_families:
                    from .support import name_supported_families

                    name_supported_families(e, model, cfg.name)
                raise
        parts.append(part)
    return parts[0], parts[1], parts[2]


def _handle(model: nn.Module) -> Handle | None:
    return model.__dict__.get(_ATTR)


def restore(model: nn.Module) -> None:
    """Remove every mmcompress patch from ``model`` (no-op if none)."""
    h = _handle(model)
    if h is None:
        return
    for part in (h.kv_patch, h.inllm_patch, h.adapter):
        if part is not None:
            part.uninstall()
    del model.__dict__[_ATTR]


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the uncompressed model inside the block (same instance, patches kept but bypassed)."""
    h = _handle(model)
    if h is None:
        yield model
        return
    prev, h.enabled = h.enabled, False
    try:
        yield model
    finally:
        h.enabled = prev


def report(model: nn.Module) -> CallReport | None:
    """The last compressed call's :class:`~mmcompress.report.CallReport` (None before the first)."""
    h = _handle(model)
    return None if h is None else h.last_report


def prepare_inputs(model: nn.Module, **inputs: Any) -> dict:
    """Prune before ``generate()`` for the static-cache / ``torch.compile`` route (reference §3.2).

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` and ``mm_encoder_outputs`` for an
    already-shortened prompt::

        model.generate(**prepare_inputs(model, **batch), cache_implementation="static")

    Generated sequences are relative to the shortened prompt.
    """
    h = _handle(model)
    if h is None:
        raise ValueError(
            "prepare_inputs needs a compressed model: call mmcompress.compress(model, ...) first"
        )
    if h.adapter is None:
        raise ValueError("prepare_inputs needs a pre-LLM method; this model only has a KV-cache method")
    return h.adapter.prepare_inputs(inputs)
