"""transformers Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``), transformers 5.x.

Hook points (reference §1, §2.5, §3.3, §4.2), all instance attributes removed by :meth:`uninstall`:

* ``model.model.get_image_features`` / ``get_video_features`` are shadowed. Each runs the original (probes
  fire in the vision tower), lays every image / video out on its merged grid (rows = h/2, cols = w/2 for
  the 2x2 merge; a video has one ``"frame<i>"`` view per temporal patch group), runs the method once per
  image / video and remembers each :class:`~mmcompress.tokens.Selection` by the identity of its feature
  tensor (``generate()`` encodes before prefill and repeats the same tensors for beams).
* ``model.model.forward`` is shadowed. At prefill it drops the placeholder slots of unkept tokens from
  ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the M-RoPE ``position_ids``, re-left-pads
  the batch, swaps in the kept features and calls the original with explicit positions. At decode it
  maps generate's full-length 2-D mask onto the shortened cache.
* ``model.forward`` is shadowed only to shrink ``labels``; ``model._prepare_position_ids_for_generation``
  only to check the prompt against ``image_grid_thw`` / ``video_grid_thw`` before the model's own
  ``get_rope_index`` runs on it (a mismatch there otherwise surfaces as an opaque shape error).

Positions. Kept tokens keep their **original** 3-D M-RoPE positions: ``generate()`` computes them with
the model's ``get_rope_index`` on the unpruned prompt (``(4, B, L)``: text row + t/h/w) and the adapter
gathers them; for a plain ``forward()`` without ``position_ids`` the adapter calls ``get_rope_index``
itself on the unpruned ids (as the unpatched model would) and gathers. The model never recomputes
positions after pruning (its ``rope_deltas`` describe the unpruned prompt). ``positions="compact"`` has
no meaning for an M-RoPE grid and is refused.

Index order. Feature ``i`` of an image is merged cell ``i`` in raster order (row-major over the merged
grid, frame by frame for video): Qwen2.5-VL's vision tower works in window order but un-permutes its
output; the attention probes undo the same permutation.

Attention signals. There is no CLS token: methods that ask for ``kind="cls"`` / ``"cls_logits"``
(HiRED, GlobalCom²) raise a clear error; ``"received"``, ``"received_logits"`` and ``"given_logits"``
work. They are computed inside a **full-attention** vision block (every Qwen2-VL block; Qwen2.5-VL's
``fullatt_block_indexes``, the others attend only within windows): a requested ``layer`` that names a
windowed block is served by the nearest full-attention block (ties: the later one, closer to the
features the LLM sees); :attr:`Qwen2VLAdapter.probe_blocks` tells which. Per-patch values are averaged
over each 2x2 merge unit, so a signal is ``[frames, heads, rows * cols]`` in the features' index order.

Budgets. ``keep`` is per image; a video counts as one image (all its frames together), and each method
documents how it spreads that budget over the ``"frame<i>"`` views.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmcompress.report import cache_bytes
from mmcompress.signals import VitAttention
from mmcompress.tokens import GridView, Layout, Selection

from ._sequence import LabelShrinking, placeholder_keep_mask, shrink_batch
from .base import Adapter, register_adapter
from .hf_llava import _shadow
from .probes import attention_signal

if TYPE_CHECKING:
    from mmcompress.api import Handle

__all__ = ["Qwen2VLAdapter", "QwenVisionProbe", "qwen_layout", "full_attention_blocks", "probe_block"]

_SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_NO_CLS_KINDS = ("cls", "cls_logits")


@dataclass(frozen=True)
class _Modality:
    """Per-modality names: pixel key, grid key, config token-id attribute, ``mm_token_type_ids`` value."""

    name: str
    pixels: str
    grid: str
    token_attr: str
    type_id: int


_MODALITIES = (
    _Modality("image", "pixel_values", "image_grid_thw", "image_token_id", 1),
    _Modality("video", "pixel_values_videos", "video_grid_thw", "video_token_id", 2),
)


def _run_lengths(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of ``True`` in a ``[B, L]`` bool mask, row-major (a run never spans two rows)."""
    zero = torch.zeros(mask.shape[0], 1, dtype=torch.int8, device=mask.device)
    edges = torch.diff(mask.to(torch.int8), dim=1, prepend=zero, append=zero)
    starts, stops = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    return (stops - starts).tolist()


def qwen_layout(t: int, h: int, w: int, merge: int, video: bool) -> Layout:
    """The packing of one image / video with patch grid ``(t, h, w)`` after the ``merge x merge`` merge.

    A still image (``t == 1``) is one ``"base"`` view of ``h/merge x w/merge`` tokens; a video (or an image
    with ``t > 1``) is one ``"frame<i>"`` view per temporal patch group, frames consecutive, raster order
    inside each (the order of ``get_image_features`` / ``get_video_features``).
    """
    rows, cols = h // merge, w // merge
    if t == 1 and not video:
        return Layout.single(rows, cols)
    return Layout(tuple(GridView(f"frame{i}", i * rows * cols, rows, cols) for i in range(t)))


def full_attention_blocks(visual: nn.Module) -> list[int]:
    """Indices of the vision blocks that attend over a whole image / frame (not within windows)."""
    depth = len(visual.blocks)
    full = getattr(visual, "fullatt_block_indexes", None)  # Qwen2.5-VL; Qwen2-VL has no windows
    return sorted(int(i) % depth for i in full) if full is not None else list(range(depth))


def probe_block(visual: nn.Module, layer: int) -> int:
    """The full-attention block serving ``VitAttention(layer, ...)``: ``layer`` itself when it is one,
    else the nearest full-attention block (ties: the later one)."""
    depth = len(visual.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"vision layer {layer} is out of range: the Qwen vision tower has {depth} blocks")
    want = layer % depth
    return min(full_attention_blocks(visual), key=lambda b: (abs(b - want), -b))


class QwenVisionProbe:
    """Attention signals from one Qwen2-VL / Qwen2.5-VL vision block, SDPA left on (reference §4.2).

    A forward pre-hook on ``visual.blocks[block].attn`` receives the packed, normed patches ``[S, C]`` of
    every image / frame of the call, ``cu_seqlens`` (one segment per frame in a full-attention block) and
    the vision RoPE ``(cos, sin)``. It recomputes q / k with the fused ``qkv`` projection and the tower's
    own ``apply_rotary_pos_emb_vision``, computes each requested kind per segment
    (:func:`~mmcompress.adapters.probes.attention_signal`, patches only: there is no prefix token), averages
    each 2x2 merge unit's patches and, for Qwen2.5-VL, undoes the window permutation.

    After a vision forward, ``frames[kind]`` is a list with one ``[H, rows * cols]`` tensor per frame, in the
    order of the features (images / videos in ``grid_thw`` order, frames in order, raster inside). The
    adapter sets ``enabled`` only around its own encoder calls, so other uses of the tower cost nothing.
    """

    def __init__(self, visual: nn.Module, block: int, kinds: set[str]) -> None:
        self.visual, self.block, self.kinds = visual, block, sorted(kinds)
        self.enabled = False
        self.frames: dict[str, list[torch.Tensor]] | None = None
        self._grid: torch.Tensor | None = None
        self._window_index: torch.Tensor | None = None
        attn = visual.blocks[block].attn
        self.heads = int(attn.num_heads)
        self.scale = float(attn.scaling)
        # the tower's own vision RoPE (Qwen2-VL and Qwen2.5-VL each define one in their modeling module)
        self._rope = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision
        self._handles = [
            visual.register_forward_pre_hook(self._grab_grid, with_kwargs=True),
            attn.register_forward_pre_hook(self._hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _grab_grid(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        self._grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        self._window_index = kwargs.get("window_index")  # a caller's precomputed permutation, if any

    @torch.no_grad()
    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.enabled:
            return
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [S, C]
        cu = kwargs["cu_seqlens"].tolist()
        cos, sin = kwargs["position_embeddings"]
        S = hs.shape[0]
        q, k, _ = mod.qkv(hs).reshape(S, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, hd]
        q, k = self._rope(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, S, hd]
        unit = self.visual.spatial_merge_size**2
        per_kind = {kind: [] for kind in self.kinds}
        for a, b in zip(cu[:-1], cu[1:]):  # block-diagonal: each segment attends only to itself
            qs, ks = q[None, :, a:b], k[None, :, a:b]
            for kind in self.kinds:
                per_kind[kind].append(attention_signal(qs, ks, kind, self.scale, prefix=0)[0])  # [H, n]
        grid = self._grid
        merged_sizes = [int(h * w) // unit for t, h, w in grid.tolist() for _ in range(int(t))]
        order = self._raster_order(grid, hs.device)
        self.frames = {}
        for kind, segs in per_kind.items():
            v = torch.cat(segs, dim=1)  # [H, S], block order
            v = v.view(self.heads, S // unit, unit).mean(-1)  # the merger's 2x2 units are consecutive
            if order is not None:
                v = v[:, order]
            self.frames[kind] = list(torch.split(v, merged_sizes, dim=1))

    def _raster_order(self, grid: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Qwen2.5-VL: merged units run in window order inside the blocks; the tower restores raster order
        with ``argsort(window_index)`` after the merger, and so does the probe."""
        if not hasattr(self.visual, "window_size"):
            return None
        widx = self._window_index
        if widx is None:
            from transformers.vision_utils import get_vision_window_index

            widx, _ = get_vision_window_index(
                grid,
                spatial_merge_size=self.visual.spatial_merge_size,
                window_size=self.visual.window_size,
                patch_size=self.visual.patch_size,
            )
        return torch.argsort(widx.to(device))


@register_adapter
class Qwen2VLAdapter(LabelShrinking, Adapter):
    name = "hf-qwen2vl"
    families = (
        "Qwen2-VL (transformers Qwen2VLForConditionalGeneration)",
        "Qwen2.5-VL (transformers Qwen2_5_VLForConditionalGeneration)",
    )
    layouts = ("single",)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in _SUPPORTED and hasattr(model, "model")

    def __init__(self, model: nn.Module, handle: Handle) -> None:
        super().__init__(model, handle)
        self.base = model.model
        self.visual = model.model.visual
        self.config = model.config
        self.merge = int(self.config.vision_config.spatial_merge_size)
        self.token_ids = {m.name: int(getattr(self.config, m.token_attr)) for m in _MODALITIES}
        self.probes: list[QwenVisionProbe] = []
        #: requested signal -> the vision block that computes it
        self.probe_blocks: dict[VitAttention, int] = {}
        self._orig: dict[str, Any] = {}
        self._sigs: dict[str, inspect.Signature] = {}
        self._selected: dict[str, dict[int, tuple[torch.Tensor, Selection]]] = {"image": {}, "video": {}}
        self._prepared: dict[int, torch.Tensor] = {}
        self._image_report = None
        self._state: dict | None = None
        self._pending_labels: torch.Tensor | None = None
        self._shrunk_labels: torch.Tensor | None = None

    def layout_kind(self) -> str:
        return "single"

    def check(self) -> None:
        method = self.handle.method
        if self.handle.positions != "original":
            raise ValueError(
                f"positions={self.handle.positions!r} is not supported for {type(self.model).__name__}: "
                f"kept tokens keep their original 3-D M-RoPE positions (positions='original')"
            )
        for sig in sorted(method.needs(), key=str):
            if sig.kind in _NO_CLS_KINDS:
                raise ValueError(
                    f"method {method.name!r} needs {sig} (CLS-token attention), but the "
                    f"{type(self.model).__name__} vision tower has no CLS token; methods scoring with "
                    f"attention received (kinds 'received', 'received_logits', 'given_logits') work"
                )
            probe_block(self.visual, sig.layer)  # range check
        if self.layout_kind() not in method.layouts:
            raise ValueError(
                f"method {method.name!r} needs a layout of kind {' or '.join(method.layouts)}; "
                f"{type(self.model).__name__} packs a {self.layout_kind()} layout (one grid per image, "
                f"one per frame for video)"
            )

    # -- install / uninstall -----------------------------------------------------------------------
    def install(self) -> None:
        by_block: dict[int, set[str]] = {}
        for sig in self.handle.method.needs():
            block = probe_block(self.visual, sig.layer)
            self.probe_blocks[sig] = block
            by_block.setdefault(block, set()).add(sig.kind)
        self.probes = [QwenVisionProbe(self.visual, b, kinds) for b, kinds in sorted(by_block.items())]
        for m in _MODALITIES:
            attr = f"get_{m.name}_features"
            orig = getattr(self.base, attr)
            self._orig[m.name] = orig
            self._sigs[m.name] = inspect.signature(orig)
            # functools.wraps keeps the signatures generate() inspects (encoder kwargs, mm_encoder_outputs)
            setattr(self.base, attr, _shadow(orig, self._features_hook(m)))
        self._orig_forward = self.base.forward
        self._orig_outer = self.model.forward
        self._orig_positions = self.model._prepare_position_ids_for_generation
        self.base.forward = _shadow(self._orig_forward, self._forward)
        self.model.forward = _shadow(self._orig_outer, self._outer_forward)
        self.model._prepare_position_ids_for_generation = _shadow(self._orig_positions, self._gen_positions)

    def uninstall(self) -> None:
        for p in self.probes:
            p.remove()
        self.probes = []
        patched = (
            (self.base, "get_image_features"),
            (self.base, "get_video_features"),
            (self.base, "forward"),
            (self.model, "forward"),
            (self.model, "_prepare_position_ids_for_generation"),
        )
        for obj, attr in patched:
            if attr in obj.__dict__:
                delattr(obj, attr)  # the class method shows through again: bit-identical to never patched
        for sel in self._selected.values():
            sel.clear()
        self._prepared.clear()
        self._state = None
        self._image_report = None

    # -- input checks -------------------------------------------------------------------------------
    def _check_grid(self, m: _Modality, pixels: Any, grid: Any) -> torch.Tensor:
        if not isinstance(grid, torch.Tensor):
            raise ValueError(f"{m.grid} is required with {m.pixels} (a [num_{m.name}s, 3] tensor of t, h, w)")
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point():
            raise ValueError(
                f"{m.grid} must be an integer [num_{m.name}s, 3] tensor, got {tuple(grid.shape)}"
            )
        g = grid.tolist()
        bad = [row for row in g if row[0] < 1 or row[1] % self.merge or row[2] % self.merge or min(row) < 1]
        if bad:
            raise ValueError(
                f"{m.grid}={g}: every (t, h, w) needs t >= 1 and h, w positive multiples of the "
                f"spatial merge size {self.merge}; bad rows {bad}"
            )
        patches = int(grid.prod(-1).sum())
        if isinstance(pixels, torch.Tensor) and pixels.shape[0] != patches:
            raise ValueError(
                f"{m.grid}={g} describes {patches} patches but {m.pixels} has {pixels.shape[0]} rows; "
                f"they must come from the same processor call"
            )
        return grid

    def _check_prompt(self, kw: dict) -> None:
        """Before ``get_rope_index`` sees the prompt: each placeholder run matches the next grid of its
        modality (row by row, the order ``get_rope_index`` and ``masked_scatter`` consume them), and
        ``mm_token_type_ids`` marks exactly the placeholders."""
        ids, tt, am = kw.get("input_ids"), kw.get("mm_token_type_ids"), kw.get("attention_mask")
        if ids is None:
            return
        real = torch.ones_like(ids, dtype=torch.bool)
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            real = am.bool()
        for m in _MODALITIES:
            grid = kw.get(m.grid)
            is_tok = (ids == self.token_ids[m.name]) & real
            if grid is not None:
                grid = self._check_grid(m, kw.get(m.pixels), grid)
                per_item = (grid.prod(-1) // self.merge**2).tolist()
                self._check_count(m, int(is_tok.sum()), sum(per_item), f"{m.grid}={grid.tolist()} gives")
                runs = _run_lengths(is_tok)
                if runs != per_item:
                    raise ValueError(
                        f"{m.grid}={grid.tolist()} gives {per_item} visual tokens per {m.name} but the "
                        f"prompt's {m.name} placeholder runs have lengths {runs} (row by row); each {m.name} "
                        f"needs its own run, in the order of {m.grid}"
                    )
                if tt is None:
                    raise ValueError(
                        f"mm_token_type_ids is required with {m.grid} (the Qwen-VL processor returns it): "
                        f"the model needs it to compute M-RoPE positions"
                    )
            if tt is not None and not torch.equal((tt == m.type_id) & real, is_tok):
                raise ValueError(
                    f"mm_token_type_ids marks {int(((tt == m.type_id) & real).sum())} tokens as {m.name} "
                    f"(type {m.type_id}) but input_ids has {int(is_tok.sum())} {m.name} placeholders "
                    f"(id {self.token_ids[m.name]}); they must mark the same positions"
                )

    def _check_count(self, m: _Modality, n_tokens: int, n_feats: int, source: str) -> None:
        if n_tokens != n_feats:
            raise ValueError(
                f"the prompt has {n_tokens} {m.name} placeholder tokens (id {self.token_ids[m.name]}) but "
                f"{source} {n_feats} visual tokens (t*h*w/{self.merge**2} per {m.name}); every {m.name} "
                f"needs its own placeholder run of that length"
            )

    # -- encoding ------------------------------------------------------------------------------------
    def _features_hook(self, m: _Modality):
        def hook(*args, **kwargs):
            orig = self._orig[m.name]
            if not self.handle.enabled:
                return orig(*args, **kwargs)
            bound = self._sigs[m.name].bind_partial(*args, **kwargs).arguments
            grid = self._check_grid(m, bound.get(m.pixels), bound.get(m.grid))
            want_tuple = kwargs.get("return_dict") is False
            kwargs["return_dict"] = True
            for p in self.probes:
                p.frames, p.enabled = None, True
            try:
                out = orig(*args, **kwargs)
            finally:
                for p in self.probes:
                    p.enabled = False
            feats = list(out.pooler_output)
            thw = grid.tolist()
            layouts = [qwen_layout(t, h, w, self.merge, m.name == "video") for t, h, w in thw]
            signals = self._signals([t for t, _, _ in thw])
            prev = self._image_report if m.name == "video" else None
            selections = self.handle.select(feats, layouts, signals)
            rep = self.handle.last_report
            if prev is not None:  # one report per call: the images first, then the videos
                rep.images[:0] = prev.images
                rep.method_ms += prev.method_ms
            self._image_report = rep if m.name == "image" else None
            self._selected[m.name] = {id(f): (f, s) for f, s in zip(feats, selections)}
            return out.to_tuple() if want_tuple else out

        return hook

    def _signals(self, frames_per_item: list[int]) -> list[dict]:
        """Each item's signals ``{VitAttention: [frames, H, rows*cols]}`` from the probes' frame values."""
        out: list[dict] = [{} for _ in frames_per_item]
        for sig, block in self.probe_blocks.items():
            probe = next(p for p in self.probes if p.block == block)
            if probe.frames is None:
                raise RuntimeError(
                    f"probe for {sig} (vision block {block}) did not fire during the vision forward"
                )
            values = probe.frames[sig.kind]
            if len(values) != sum(frames_per_item):
                raise RuntimeError(
                    f"probe for {sig}: {len(values)} frames for {sum(frames_per_item)} expected"
                )
            start = 0
            for i, t in enumerate(frames_per_item):
                out[i][sig] = torch.stack(values[start : start + t])
                start += t
        return out

    def _encode(self, m: _Modality, kw: dict) -> Any:
        """Encode ``kw[m.pixels]`` through our (shadowed) get_*_features, as the model's forward would."""
        fn = getattr(self.base, f"get_{m.name}_features")
        enc = fn(kw[m.pixels], kw.get(m.grid), return_dict=True)
        kw[m.pixels] = None
        return enc

    def _selection_for(self, m: _Modality, feat: torch.Tensor) -> Selection:
        hit = self._selected[m.name].get(id(feat))
        if hit is not None and hit[0] is feat:
            return hit[1]
        raise ValueError(
            f"mmcompress: precomputed Qwen-VL {m.name} features carry no grid (and no vision signals); "
            f"pass {m.pixels} and {m.grid} so the {m.name}s are encoded by this model"
        )

    # -- forward ---------------------------------------------------------------------------------------
    def _forward(self, *args, **kw):
        if not self.handle.enabled:
            return self._orig_forward(*args, **kw)
        if args:
            kw["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("mmcompress: pass everything after input_ids by keyword")
        pkv = kw.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None else 0
        mm = dict(kw.get("mm_encoder_outputs") or {})
        if past == 0 and any(kw.get(m.pixels) is not None and mm.get(m.name) is None for m in _MODALITIES):
            self._check_prompt(kw)  # before the vision tower runs: a bad grid fails fast and clearly
        encs = {}
        for m in _MODALITIES:
            enc = mm.get(m.name)
            if enc is None and kw.get(m.pixels) is not None:
                enc = self._encode(m, kw)
            if enc is not None:
                encs[m.name] = enc
        if encs:
            feats = [f for e in encs.values() for f in e.pooler_output]
            if feats and all(id(f) in self._prepared for f in feats):  # prepare_inputs() already pruned
                self._state = None
                kw["mm_encoder_outputs"] = {**mm, **encs}
                return self._orig_forward(**kw)
            if past > 0:
                raise ValueError(
                    "mmcompress: images arrived with a non-empty KV cache; compressed prompts must start a "
                    "new cache"
                )
            new, new_mm, state = self._shrink(encs, kw)
            new["mm_encoder_outputs"] = {**mm, **new_mm}
            self._state = state
            self._image_report = None
            return self._record_kv(self._orig_forward(**new), pkv)
        if past == 0:
            self._state = None  # text-only prompt: nothing to translate (resets an earlier image call)
        elif self._state is not None:
            self._translate_decode(kw, past)
            return self._record_kv(self._orig_forward(**kw), pkv)
        return self._orig_forward(**kw)

    def _record_kv(self, out: Any, pkv: Any) -> Any:
        cache = getattr(out, "past_key_values", None) or pkv
        if self.handle.last_report is not None and cache is not None:
            self.handle.last_report.kv_bytes = cache_bytes(cache)
        return out

    def _rope_positions(self, kw: dict) -> torch.Tensor:
        """``(3, B, L)`` M-RoPE positions of the **unpruned** prompt from the model's own ``get_rope_index``
        (what the unpatched forward computes when no ``position_ids`` are given); records ``rope_deltas``
        on the model as it does."""
        if kw.get("mm_token_type_ids") is None:
            raise ValueError(
                "mm_token_type_ids is required with images / videos (the Qwen-VL processor returns it): "
                "the model needs it to compute M-RoPE positions"
            )
        extra = (
            {"second_per_grid_ts": kw["second_per_grid_ts"]}
            if kw.get("second_per_grid_ts") is not None
            else {}
        )
        pos, deltas = self.base.get_rope_index(
            kw["input_ids"],
            mm_token_type_ids=kw["mm_token_type_ids"],
            image_grid_thw=kw.get("image_grid_thw"),
            video_grid_thw=kw.get("video_grid_thw"),
            attention_mask=kw.get("attention_mask"),
            **extra,
        )
        self.base.rope_deltas = deltas
        return pos

    def _shrink(self, encs: dict, kw: dict) -> tuple[dict, dict, dict]:
        """Apply the selections: returns (new kwargs, new encoder outputs per modality, decode state)."""
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "mmcompress needs input_ids at prefill to find the image / video placeholders "
                "(got inputs_embeds only)"
            )
        am = kw.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"mmcompress needs a 2-D attention_mask at prefill, got shape {tuple(am.shape)}")
        keep_tok = torch.ones_like(input_ids, dtype=torch.bool)
        new_mm, sels_by = {}, {}
        for m in _MODALITIES:
            enc = encs.get(m.name)
            if enc is None:
                continue
            feats = list(enc.pooler_output)
            sels = [self._selection_for(m, f) for f in feats]
            counts = [f.shape[0] for f in feats]
            n_tok = int((input_ids == self.token_ids[m.name]).sum())
            self._check_count(m, n_tok, sum(counts), f"the {m.name}s' features give")
            keep_tok &= placeholder_keep_mask(
                input_ids, self.token_ids[m.name], counts, [s.indices for s in sels]
            )
            pruned = [s.kept_features(f) for f, s in zip(feats, sels)]
            # a new output object: generate re-sends the same one every step when use_cache=False (§3.5.2)
            new_mm[m.name] = type(enc)(**{**dict(enc.items()), "pooler_output": pruned})
            sels_by[m.name] = sels
        pos = kw.get("position_ids")
        if pos is None:
            pos = self._rope_positions(kw)
        shr = shrink_batch(keep_tok, am)
        am_full = am if am is not None else torch.ones_like(input_ids)
        pad_id = next(i for i in range(3) if i not in self.token_ids.values())
        new = dict(kw)
        new["input_ids"] = shr.take(input_ids, pad_id)
        if kw.get("mm_token_type_ids") is not None:
            new["mm_token_type_ids"] = shr.take(kw["mm_token_type_ids"])
        new["position_ids"] = shr.take(pos)
        # Gapped positions with attention_mask=None and no cache make masking_utils treat every jump of the
        # text-position row as a new packed sequence (reference §3.5.1): always pass the 2-D mask.
        new["attention_mask"] = shr.attention_mask
        for m in _MODALITIES:
            new[m.pixels] = None
        if self._pending_labels is not None:
            self._shrunk_labels = shr.take(self._pending_labels, -100)
        # next M-RoPE position minus the text position, per row, for decode steps without position_ids
        mrope = pos[-3:] if pos.dim() == 3 else pos[None]
        deltas = (mrope.amax(dim=(0, 2)) + 1 - am_full.sum(1)).to(torch.long)
        state = dict(
            orig_len=input_ids.shape[1],
            prefix_mask=shr.attention_mask,
            shift=shr.shift,
            deltas=deltas[:, None],
            rows=pos.shape[0] if pos.dim() == 3 else 0,
        )
        report = self.handle.last_report
        if report is not None:
            report.prompt_len_in = int(am_full.sum(1).max())
            report.prompt_len_out = int(shr.attention_mask.sum(1).max())
        return new, new_mm, state

    def _translate_decode(self, kw: dict, past: int) -> None:
        """Map a decode step's full-length 2-D mask (and missing positions) onto the shortened cache."""
        st = self._state
        ids = kw.get("input_ids")
        q = (ids if ids is not None else kw["inputs_embeds"]).shape[1]
        am = kw.get("attention_mask")
        if kw.get("position_ids") is None:
            # the unpruned prompt's positions continue: text position of the new tokens + the M-RoPE delta
            if am is not None and am.dim() == 2:
                text = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
            else:
                start = st["orig_len"] + past - st["prefix_mask"].shape[1]
                text = torch.arange(start, start + q, device=st["deltas"].device)[None]
            pos = text.to(st["deltas"].device) + st["deltas"]
            rows = max(st["rows"], 3)
            kw["position_ids"] = (
                pos[None].expand(rows, -1, -1)
                if rows == 3
                else torch.cat([text.expand_as(pos)[None], pos[None].expand(3, -1, -1)])
            )
        if am is not None and am.dim() == 2:
            kw["attention_mask"] = torch.cat([st["prefix_mask"], am[:, st["orig_len"] :]], dim=1)
        elif am is None:
            pm = st["prefix_mask"]
            kw["attention_mask"] = torch.cat([pm, pm.new_ones(pm.shape[0], past + q - pm.shape[1])], 1)

    def _gen_positions(self, inputs_tensor, model_kwargs):
        if self.handle.enabled:
            ids = model_kwargs.get("input_ids")
            if ids is None and isinstance(inputs_tensor, torch.Tensor) and inputs_tensor.dim() == 2:
                ids = inputs_tensor
            cache = model_kwargs.get("past_key_values")
            if ids is not None and (cache is None or cache.get_seq_length() == 0):
                self._check_prompt({**model_kwargs, "input_ids": ids})
        return self._orig_positions(inputs_tensor, model_kwargs)

    # -- static cache / torch.compile route (reference §3.2, approach A) ------------------------------
    def prepare_inputs(self, inputs: dict) -> dict:
        kw = dict(inputs)
        if all(kw.get(m.pixels) is None for m in _MODALITIES):
            raise ValueError(
                "prepare_inputs needs pixel_values or pixel_values_videos (an image / video prompt)"
            )
        if kw.get("input_ids") is None:
            raise ValueError("prepare_inputs needs input_ids")
        self._check_prompt(kw)
        if kw.get("position_ids") is None:  # what generate() builds: [text row; t; h; w] (reference §2.5)
            am = kw.get("attention_mask")
            ids = kw["input_ids"]
            if am is not None:
                text = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 0)
            else:
                text = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
            kw["position_ids"] = torch.cat([text[None], self._rope_positions(kw)], dim=0)
        encs = {m.name: self._encode(m, kw) for m in _MODALITIES if kw.get(m.pixels) is not None}
        new, new_mm, _ = self._shrink(encs, kw)
        self._image_report = None
        self._prepared = {id(f): f for enc in new_mm.values() for f in enc.pooler_output}
        for k in (
            "pixel_values",
            "pixel_values_videos",
            "image_grid_thw",
            "video_grid_thw",
            "second_per_grid_ts",
        ):
            new.pop(k, None)
        new["mm_encoder_outputs"] = new_mm
        return new
