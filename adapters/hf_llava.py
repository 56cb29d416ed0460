"""transformers LLaVA-1.5 (``LlavaForConditionalGeneration``), LLaVA-NeXT AnyRes
(``LlavaNextForConditionalGeneration``) and LLaVA-OneVision images
(``LlavaOnevisionForConditionalGeneration``), transformers 5.x.

Hook points (reference §1, §2.1–2.2, §3.3):

* ``model.model.get_image_features`` is shadowed on the instance. It runs the original (probes fire in
  the vision tower), builds each image's :class:`~mmcompress.tokens.VisualTokens`, runs the method once
  per image and remembers each image's :class:`~mmcompress.tokens.Selection` by the identity of its
  feature tensor. ``generate()`` encodes images *before* prefill and, for beams /
  ``num_return_sequences``, repeats the same tensor objects, so the identity survives the expansion.
* ``model.model.forward`` is shadowed on the instance. At prefill it drops the placeholder slots of the
  unkept tokens from ``input_ids`` / ``attention_mask`` / ``position_ids`` (re-left-padding the batch),
  swaps in the kept features, and remembers the shortened prefix mask; at decode steps it translates
  generate's full-length 2-D mask (and, for compact positions, the positions) to the shortened cache.
* ``model.forward`` is shadowed only to shrink ``labels`` for log-likelihood evaluation.

LLaVA-OneVision (reference §2.3) packs an image like LLaVA-NeXT (thumbnail, then the stitched, unpadded
crops with a newline per row; one view plus one newline for the images of a multi-image sample,
``batch_num_images``), with two differences the layout follows: its SigLIP tower has no CLS token (methods
asking for CLS attention are refused in :meth:`HFLlavaAdapter.check`), and when the unpadded crop grid
exceeds ``vision_aspect_ratio="anyres_max_<m>"`` (``sqrt(R*C / (m*h*w)) > 1.1``) it is bilinearly
downscaled to ``int(R // ratio) x int(C // ratio)`` before the newlines are appended. Such a crops view is
laid out as one resampled grid (``tiles=(1, 1)``, ``tile_shape=(rows, cols)``), and its vision-tower
signals are resampled the same way: the per-crop maps go through the model's own
``pack_image_features`` (heads as channels, no newline), so the image's signal is ``[2, heads, T']`` (the
thumbnail, then the resampled crops grid; each view's values are its last ``rows * cols`` columns, the
columns before them are zeros). That resampling is ours: no official method scores downscaled grids.
Videos (``pixel_values_videos``) are not compressed yet and raise.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any, ClassVar

import torch
from torch import nn

from mmcompress.report import cache_bytes
from mmcompress.tokens import GridView, Layout, Selection

from ._sequence import LabelShrinking, placeholder_keep_mask, shrink_batch
from .base import Adapter, register_adapter
from .probes import AttentionProbe, prefix_tokens, vision_attention_modules

__all__ = ["HFLlavaAdapter"]

_SUPPORTED = {
    "LlavaForConditionalGeneration": "single",
    "LlavaNextForConditionalGeneration": "anyres",
    "LlavaOnevisionForConditionalGeneration": "anyres",
}
_CLS_KINDS = ("cls", "cls_logits")


def _index_canvas_unpad(
    rows: int, cols: int, image_size: Any, unpad_image: Any = None
) -> tuple[int, int, int, int]:
    """Run transformers' own ``unpad_image`` (LLaVA-NeXT's unless another is given) on an index canvas
    to learn what it keeps.

    Returns ``(new_rows, new_cols, top, left)`` — exact by construction, whatever rounding it uses.
    """
    if unpad_image is None:
        from transformers.models.llava_next.modeling_llava_next import unpad_image

    canvas = torch.arange(rows * cols).view(1, rows, cols)
    out = unpad_image(canvas, image_size)
    first = int(out[0, 0, 0])
    return out.shape[1], out.shape[2], first // cols, first % cols


def _shadow(orig, impl):
    """A plain function calling ``impl`` that carries ``orig``'s name, docstring and signature."""

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        return impl(*args, **kwargs)

    return wrapper


@register_adapter
class HFLlavaAdapter(LabelShrinking, Adapter):
    name = "hf-llava"
    families = (
        "LLaVA-1.5 (transformers LlavaForConditionalGeneration)",
        "LLaVA-NeXT AnyRes (transformers LlavaNextForConditionalGeneration)",
        "LLaVA-OneVision images (transformers LlavaOnevisionForConditionalGeneration)",
    )
    layouts = ("single", "anyres")
    _pos_keys_1d: ClassVar[tuple[str, ...]] = ("token_type_ids", "mm_token_type_ids")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in _SUPPORTED and hasattr(model, "model")

    def __init__(self, model: nn.Module, handle) -> None:
        super().__init__(model, handle)
        self.base = model.model
        self.config = model.config
        self.token_id = int(model.config.image_token_id)
        # the family's own AnyRes helpers (get_anyres_image_grid_shape, unpad_image, ...)
        self._mod = importlib.import_module(type(model).__module__)
        self._onevision = type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
        self.probes: list[AttentionProbe] = []
        self._selected: dict[int, tuple[torch.Tensor, Selection]] = {}
        self._prepared: dict[int, torch.Tensor] = {}
        self._state: dict | None = None
        self._pending_labels: torch.Tensor | None = None
        self._shrunk_labels: torch.Tensor | None = None

    # -- facts about the model ----------------------------------------------------------------------
    def layout_kind(self) -> str:
        return _SUPPORTED[type(self.model).__name__]

    def _patch_grid(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def check(self) -> None:
        method = self.handle.method
        if self.layout_kind() not in method.layouts:
            raise ValueError(
                f"method {method.name!r} needs a layout of kind {' or '.join(method.layouts)}; "
                f"{type(self.model).__name__} packs a {self.layout_kind()} layout"
            )
        keep = getattr(method, "keep", None)
        n = getattr(self.config, "image_seq_length", None)
        if self.layout_kind() == "single" and isinstance(keep, int) and n and keep > n:
            raise ValueError(
                f"keep={keep} exceeds the {n} visual tokens per image of this model "
                f"(config.image_seq_length); allowed: 1..{n} or a fraction in (0, 1]"
            )
        tower = self.base.vision_tower
        cls_sigs = sorted((s for s in method.needs() if s.kind in _CLS_KINDS), key=str)
        # OneVision's SigLIP tower never has a CLS token: refuse before patching. (A LLaVA-1.5 / NeXT
        # model given a CLS-less tower is refused by the CLS methods themselves at call time.)
        if cls_sigs and self._onevision and prefix_tokens(tower) == 0:
            raise ValueError(
                f"method {method.name!r} needs {cls_sigs[0]} (CLS-token attention), but the "
                f"{type(tower).__name__} vision tower of this {type(self.model).__name__} has no CLS "
                f"token; methods scoring with attention received (kinds 'received', 'received_logits', "
                f"'given_logits') work"
            )
        packer = getattr(self.config, "tokenpacker", None)
        scale = int(packer.get("scale") or 1) if isinstance(packer, dict) else 1
        if method.needs() and scale != 1:
            sig = sorted(method.needs(), key=str)[0]
            raise ValueError(
                f"method {method.name!r} needs {sig} (vision-tower attention per patch of the "
                f"{self._patch_grid()}x{self._patch_grid()} grid), but the TokenPacker projector of this "
                f"model packs each {scale}x{scale} patch region into one visual token, so the scores do not "
                f"map onto its tokens; methods without vision-tower signals work"
            )
        if method.needs():
            mods = vision_attention_modules(tower)
            for sig in method.needs():
                if not -len(mods) <= sig.layer < len(mods):
                    raise ValueError(
                        f"{sig} asks for vision layer {sig.layer}; the tower has {len(mods)} layers"
                    )

    # -- install / uninstall -----------------------------------------------------------------------
    def install(self) -> None:
        mods = vision_attention_modules(self.base.vision_tower) if self.handle.method.needs() else []
        needs = sorted(self.handle.method.needs(), key=str)
        prefix = prefix_tokens(self.base.vision_tower) if any("logits" in s.kind for s in needs) else 1
        self.probes = [AttentionProbe(mods[s.layer], s, prefix) for s in needs]
        self._orig_gif = self.base.get_image_features
        self._gif_sig = inspect.signature(self._orig_gif)
        self._orig_forward = self.base.forward
        self._orig_outer = self.model.forward
        # functools.wraps keeps the original signatures visible: generate() inspects them to decide which
        # kwargs the model takes and whether it accepts mm_encoder_outputs.
        self.base.get_image_features = _shadow(self._orig_gif, self._get_image_features)
        self.base.forward = _shadow(self._orig_forward, self._forward)
        self.model.forward = _shadow(self._orig_outer, self._outer_forward)

    def uninstall(self) -> None:
        for p in self.probes:
            p.remove()
        self.probes = []
        for obj, attr in ((self.base, "get_image_features"), (self.base, "forward"), (self.model, "forward")):
            if attr in obj.__dict__:
                delattr(obj, attr)  # the class method shows through again: bit-identical to never patched
        self._selected.clear()
        self._prepared.clear()
        self._state = None

    # -- layouts ----------------------------------------------------------------------------------
    def _single_layout(self, n: int, pixel_shape: tuple[int, ...] | None) -> Layout:
        patch = self.config.vision_config.patch_size
        packer = getattr(self.config, "tokenpacker", None)
        if isinstance(packer, dict) and packer.get("scale"):
            patch *= int(packer["scale"])  # a TokenPacker projector emits one token per scale x scale region
        if pixel_shape is not None:
            rows, cols = pixel_shape[-2] // patch, pixel_shape[-1] // patch
        else:
            rows = cols = int(round(n**0.5))
        if rows * cols == n:
            return Layout.single(rows, cols)
        if rows * cols + 1 == n:  # "full" strategy on a CLS tower: the CLS token is a visual token too
            return Layout((GridView("cls", 0, 1, 1), GridView("base", 1, rows, cols)))
        raise ValueError(f"cannot lay out {n} visual tokens on a {rows}x{cols} patch grid")

    def _anyres_layout(self, n: int, image_size: Any, aspect: str | None = None) -> tuple[Layout, bool]:
        """The image's AnyRes layout and whether its crop grid was downscaled (OneVision ``aspect``)."""
        h = w = self._patch_grid()
        base = GridView("base", 0, h, w)
        if n == h * w + 1:  # a single patch: thumbnail + one trailing newline (pack_image_features)
            return Layout((base, GridView("newline", h * w, 1, 1))), False
        nph, npw = self._mod.get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        rows, cols, top, left = _index_canvas_unpad(nph * h, npw * w, image_size, self._mod.unpad_image)
        ratio = 0.0
        if aspect is not None:  # LlavaOnevisionModel.pack_image_features: "anyres_max_<m>" caps R*C
            ratio = math.sqrt(rows * cols / (int(aspect.removeprefix("anyres_max_")) * h * h))
        if ratio > 1.1:  # bilinearly downscaled: one resampled grid, no longer made of crop patches
            crops = GridView("crops", h * w, int(rows // ratio), int(cols // ratio), newline=True)
        else:
            crops = GridView(
                "crops",
                h * w,
                rows,
                cols,
                newline=True,
                tiles=(nph, npw),
                tile_shape=(h, w),
                offset=(top, left),
            )
        layout = Layout((base, crops))
        if layout.num_tokens != n:
            raise ValueError(
                f"AnyRes layout mismatch: computed {layout.num_tokens} tokens for image size "
                f"{list(image_size)}, the model packed {n}"
            )
        return layout, ratio > 1.1

    def _views_per_image(self, image_sizes: Any, layouts: list[Layout]) -> list[int]:
        """Vision-tower views (thumbnail + crops) of each image, in the order the tower saw them."""
        if self.layout_kind() == "single":
            return [1] * len(layouts)
        return [
            1  # thumbnail + newline only: one view (a OneVision multi-image sample, batch_num_images)
            if lay.views[-1].name == "newline"
            else self._mod.image_size_to_num_patches(
                s, self.config.image_grid_pinpoints, self.config.vision_config.image_size
            )
            for s, lay in zip(image_sizes, layouts)
        ]

    def _downscaled_signal(self, chunk: torch.Tensor, image_size: Any, aspect: str) -> torch.Tensor:
        """``[1 + crops, heads, T]`` signal of an image whose crop grid OneVision downscaled ->
        ``[2, heads, T']``: the thumbnail row, then the crops resampled by the model's own
        ``pack_image_features`` (heads as channels, no newline), each right-aligned, zeros before."""
        hw = self._patch_grid() ** 2
        prefix = chunk.shape[-1] - hw  # CLS / register columns: not patches, not resampled
        packed, _ = self.base.pack_image_features(
            [chunk[:, :, prefix:].transpose(1, 2)],
            [image_size],
            image_newline=None,
            vision_aspect_ratio=aspect,
        )
        crops = packed[0][hw:].T  # [heads, rows * cols]
        width = max(chunk.shape[-1], crops.shape[-1])
        out = chunk.new_zeros(2, chunk.shape[1], width)
        out[0, :, width - chunk.shape[-1] :] = chunk[0]
        out[1, :, width - crops.shape[-1] :] = crops
        return out

    # -- the hooks ---------------------------------------------------------------------------------
    def _get_image_features(self, *args, **kwargs):
        if not self.handle.enabled:
            return self._orig_gif(*args, **kwargs)
        bound = self._gif_sig.bind_partial(*args, **kwargs).arguments
        want_tuple = bound.get("return_dict") is False
        kwargs["return_dict"] = True
        for p in self.probes:
            p.value = None
        out = self._orig_gif(*args, **kwargs)
        feats = list(out.pooler_output)
        pixel_values = bound.get("pixel_values")
        image_sizes = bound.get("image_sizes")
        scaled, aspect = [False] * len(feats), None
        if self.layout_kind() == "anyres":
            if self._onevision:
                aspect = bound.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
            both = [self._anyres_layout(f.shape[0], s, aspect) for f, s in zip(feats, image_sizes)]
            layouts, scaled = [b[0] for b in both], [b[1] for b in both]
        else:
            shape = tuple(pixel_values.shape) if pixel_values is not None else None
            layouts = [self._single_layout(f.shape[0], shape) for f in feats]
        views = self._views_per_image(image_sizes, layouts)
        signals: list[dict] = [{} for _ in feats]
        for p in self.probes:
            if p.value is None:
                raise RuntimeError(f"probe for {p.signal} did not fire during the vision forward")
            for i, chunk in enumerate(torch.split(p.value, views)):
                signals[i][p.signal] = (
                    self._downscaled_signal(chunk, image_sizes[i], aspect) if scaled[i] else chunk
                )
        selections = self.handle.select(feats, layouts, signals)
        self._selected = {id(f): (f, s) for f, s in zip(feats, selections)}
        return out.to_tuple() if want_tuple else out

    def _selection_for(self, feat: torch.Tensor) -> Selection:
        hit = self._selected.get(id(feat))
        if hit is not None and hit[0] is feat:
            return hit[1]
        # features that did not come through our get_image_features (user-encoded mm_encoder_outputs)
        if self.handle.method.needs():
            raise ValueError(
                f"method {self.handle.method.name!r} needs vision-tower signals, which only exist "
                f"when the images are encoded by this model; pass pixel_values instead of "
                f"precomputed mm_encoder_outputs"
            )
        n = feat.shape[0]
        layout = self._single_layout(n, None) if self.layout_kind() == "single" else None
        if layout is None:
            raise ValueError(
                "precomputed AnyRes features carry no image sizes; pass pixel_values and image_sizes"
            )
        sel = self.handle.select([feat], [layout], [{}])[0]
        self._selected[id(feat)] = (feat, sel)
        return sel

    def _encode(self, kw: dict) -> Any:
        """Encode ``pixel_values`` through our (shadowed) get_image_features, as the model would."""
        args = {k: kw[k] for k in self._gif_sig.parameters if kw.get(k) is not None}
        enc = self.base.get_image_features(**args, return_dict=True)
        kw["pixel_values"] = None
        return enc

    def _forward(self, *args, **kw):
        if not self.handle.enabled:
            return self._orig_forward(*args, **kw)
        if args:  # LlavaNext passes input_ids positionally
            kw["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("mmcompress: pass everything after input_ids by keyword")
        pkv = kw.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None else 0
        mm = dict(kw.get("mm_encoder_outputs") or {})
        enc = mm.get("image")
        if mm.get("video") is not None or kw.get("pixel_values_videos") is not None:
            raise ValueError(
                f"mmcompress compresses {type(self.model).__name__} images only; got a video "
                f"(pixel_values_videos). Run it uncompressed inside `with mmcompress.disabled(model):`"
            )
        if enc is None and kw.get("pixel_values") is not None:
            enc = self._encode(kw)
        if enc is not None:
            feats = list(enc.pooler_output)
            if feats and all(id(f) in self._prepared for f in feats):  # prepare_inputs() already pruned
                self._state = None
                return self._orig_forward(**kw)
            if past > 0:
                raise ValueError(
                    "mmcompress: images arrived with a non-empty KV cache; compressed prompts "
                    "must start a new cache"
                )
            return self._prefill(enc, mm, kw, pkv)
        if past == 0:
            self._state = (
                None  # text-only prompt: nothing to translate (resets state from an earlier image call)
            )
        elif self._state is not None:
            self._translate_decode(kw, past)
            return self._record_kv(self._orig_forward(**kw), pkv)
        return self._orig_forward(**kw)

    def _record_kv(self, out: Any, pkv: Any) -> Any:
        cache = getattr(out, "past_key_values", None) or pkv
        if self.handle.last_report is not None and cache is not None:
            self.handle.last_report.kv_bytes = cache_bytes(cache)
        return out

    def _translate_decode(self, kw: dict, past: int) -> None:
        st = self._state
        ids = kw.get("input_ids")
        q = (ids if ids is not None else kw["inputs_embeds"]).shape[1]
        am = kw.get("attention_mask")
        if am is not None and am.dim() == 2:
            kw["attention_mask"] = torch.cat([st["prefix_mask"], am[:, st["orig_len"] :]], dim=1)
        elif am is None and st["prefix_mask"] is not None:
            pm = st["prefix_mask"]
            kw["attention_mask"] = torch.cat([pm, pm.new_ones(pm.shape[0], past + q - pm.shape[1])], 1)
        if kw.get("position_ids") is not None and self.handle.positions == "compact":
            kw["position_ids"] = kw["position_ids"] - st["shift"][:, None].to(kw["position_ids"].device)

    def _shrink(self, enc: Any, kw: dict) -> tuple[dict, Any, dict]:
        """Apply the selections: returns (new kwargs, new encoder output, decode state)."""
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "mmcompress needs input_ids at prefill to find the image placeholders "
                "(got inputs_embeds only)"
            )
        feats = list(enc.pooler_output)
        sels = [self._selection_for(f) for f in feats]
        keep_tok = placeholder_keep_mask(
            input_ids, self.token_id, [f.shape[0] for f in feats], [s.indices for s in sels]
        )
        am = kw.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"mmcompress needs a 2-D attention_mask at prefill, got shape {tuple(am.shape)}")
        shr = shrink_batch(keep_tok, am)
        am_full = am if am is not None else torch.ones_like(input_ids)
        pos = kw.get("position_ids")
        if pos is None:  # what the decoder would use (LlamaModel: arange over the padded row)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        pad_id = 0 if self.token_id != 0 else 1
        new = dict(kw)
        new["input_ids"] = shr.take(input_ids, pad_id)
        for k in self._pos_keys_1d:
            if kw.get(k) is not None:
                new[k] = shr.take(kw[k])
        if self.handle.positions == "original":
            new["position_ids"] = shr.take(pos)
        else:
            new["position_ids"] = (shr.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # Gapped (original) positions with attention_mask=None and no cache make masking_utils treat every
        # position jump as a new packed sequence (reference §3.5.1): always pass the 2-D mask then.
        need_mask = am is not None or bool((~shr.valid).any()) or self.handle.positions == "original"
        new["attention_mask"] = shr.attention_mask if need_mask else None
        if self._pending_labels is not None:
            self._shrunk_labels = shr.take(self._pending_labels, -100)
        pruned = [s.kept_features(f) for f, s in zip(feats, sels)]
        if isinstance(enc.pooler_output, torch.Tensor):
            pruned = torch.cat(pruned).unsqueeze(0)
        # a new output object: generate re-sends the same one every step when use_cache=False (§3.5.2)
        new_enc = type(enc)(**{**dict(enc.items()), "pooler_output": pruned})
        state = dict(orig_len=input_ids.shape[1], prefix_mask=new["attention_mask"], shift=shr.shift)
        report = self.handle.last_report
        if report is not None:
            report.prompt_len_in = int(am_full.sum(1).max())
            report.prompt_len_out = int(shr.attention_mask.sum(1).max())
        return new, new_enc, state

    def _prefill(self, enc: Any, mm: dict, kw: dict, pkv: Any):
        new, new_enc, state = self._shrink(enc, kw)
        mm["image"] = new_enc
        new["mm_encoder_outputs"] = mm
        new["pixel_values"] = None
        self._state = state
        return self._record_kv(self._orig_forward(**new), pkv)

    # -- static cache / torch.compile route (reference §3.2, approach A) ------------------------------
    def prepare_inputs(self, inputs: dict) -> dict:
        kw = dict(inputs)
        if kw.get("pixel_values") is None:
            raise ValueError("prepare_inputs needs pixel_values (an image prompt)")
        enc = self._encode(kw)
        new, new_enc, _ = self._shrink(enc, kw)
        new["attention_mask"] = (
            new["attention_mask"] if new["attention_mask"] is not None else torch.ones_like(new["input_ids"])
        )
        self._prepared = {id(f): f for f in new_enc.pooler_output}
        new.pop("pixel_values", None)
        for k in (
            "image_sizes",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "vision_aspect_ratio",
            "batch_num_images",
        ):
            new.pop(k, None)
        new["mm_encoder_outputs"] = {"image": new_enc}
        return new
