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

Videos (``pixel_values_videos``; LLaVA-NeXT-Video and LLaVA-OneVision, reference §2.3-2.4).
``model.model.get_video_features`` is shadowed like ``get_image_features``. A video is **one item**: its
layout has one ``"frame<i>"`` view per frame, ``rows x cols`` of the pooled grid, frames consecutive and
raster order inside, as ``get_video_features`` packs them. LLaVA-NeXT-Video pools every frame's ``h x w``
patch grid with its ``vision_resampler`` (kernel = stride = ``spatial_pool_stride`` s: ``h//s x w//s``)
and adds no newline. LLaVA-OneVision bilinearly resizes every frame's projected grid to
``ceil(h/2) x ceil(w/2)`` (``apply_pooling``) and appends **one** ``image_newline`` after the last frame
(transformers 5.23: one per video, not one per frame), laid out as a 1x1 view named ``"newline"``, the
marker methods treat like the AnyRes newlines (as the lone newline of a OneVision multi-image view).
Budgets: ``keep`` is per image; a video counts as one image (all its frames together), and each method
documents how it spreads that budget over the ``"frame<i>"`` views.

Video signals are per frame, ``[frames, heads, prefix + rows * cols]``: the vision tower's values for each
frame (CLIP's CLS column first, as for images; SigLIP has none) with the patch columns pooled the way the
features are, so a method's per-frame scores line up index for index with the pooled tokens: NeXT-Video
average / max pooling with the resampler's kernel and stride (its ``"conv"`` mode is a learned kernel that
cannot act on attention maps: its window is averaged instead), OneVision ``F.interpolate(..., "bilinear")``
to the same ``ceil(h/2) x ceil(w/2)`` grid. That pooling is ours; no official method scores pooled frames.

The video placeholder runs (``config.video_token_id``) are shrunk in the same pass as the image runs, so
image+video prompts, left padding, ``forward()`` and ``generate()`` work as for images. Pruned video
features go back as one ``(1, sum K, D)`` tensor, the container type ``get_video_features`` returns
(OneVision's forward calls ``.flatten(0, 1)`` on it; NeXT-Video's iterates it). ``generate()`` re-stacks
the video tensor for beams / ``num_return_sequences``, so a video's selection is found by identity, else by
equal content. Frames must be stacked at the tower's ``image_size`` (one 5-D tensor); methods that need a
thumbnail + crops layout (HiRED, GlobalCom²) refuse videos with a clear error at call time, while images
on the same model still compress.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
    "LlavaNextVideoForConditionalGeneration": "anyres",
    "LlavaOnevisionForConditionalGeneration": "anyres",
}
#: the classes with a video path (``get_video_features``, ``pixel_values_videos``, ``video_token_id``)
_VIDEO = ("LlavaNextVideoForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
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
        "LLaVA-NeXT-Video images and videos (transformers LlavaNextVideoForConditionalGeneration)",
        "LLaVA-OneVision images and videos (transformers LlavaOnevisionForConditionalGeneration)",
    )
    layouts = ("single", "anyres")
    accepts_towers: ClassVar[bool] = True  # signal_tower= / relevance= probes (mmcompress.towers)
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
        self._video = type(model).__name__ in _VIDEO
        self.video_token_id = int(model.config.video_token_id) if self._video else None
        self._selected_videos: list[tuple[torch.Tensor, Selection]] = []
        self._image_report = None  # this call's image report, until its videos are selected
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
        own = method.needs() - self.handle.tower_signals()  # a signal_tower= serves the others
        if own:
            mods = vision_attention_modules(tower)
            for sig in own:
                if not -len(mods) <= sig.layer < len(mods):
                    raise ValueError(
                        f"{sig} asks for vision layer {sig.layer}; the tower has {len(mods)} layers"
                    )

    # -- install / uninstall -----------------------------------------------------------------------
    def install(self) -> None:
        # signal_tower= / relevance= probes read the vision tower's pixel_values; ours serve the rest
        self.probes = self.handle.tower_probes(self.base.vision_tower, self.config.vision_config.patch_size)
        needs = sorted(self.handle.method.needs() - self.handle.tower_signals(), key=str)
        mods = vision_attention_modules(self.base.vision_tower) if needs else []
        prefix = prefix_tokens(self.base.vision_tower) if any("logits" in s.kind for s in needs) else 1
        self.probes += [AttentionProbe(mods[s.layer], s, prefix) for s in needs]
        self._orig_gif = self.base.get_image_features
        self._gif_sig = inspect.signature(self._orig_gif)
        self._orig_forward = self.base.forward
        self._orig_outer = self.model.forward
        # functools.wraps keeps the original signatures visible: generate() inspects them to decide which
        # kwargs the model takes and whether it accepts mm_encoder_outputs.
        self.base.get_image_features = _shadow(self._orig_gif, self._get_image_features)
        self.base.forward = _shadow(self._orig_forward, self._forward)
        self.model.forward = _shadow(self._orig_outer, self._outer_forward)
        if self._video:
            self._orig_gvf = self.base.get_video_features
            self._gvf_sig = inspect.signature(self._orig_gvf)
            self.base.get_video_features = _shadow(self._orig_gvf, self._get_video_features)

    def uninstall(self) -> None:
        for p in self.probes:
            p.remove()
        self.probes = []
        patched = (
            (self.base, "get_image_features"),
            (self.base, "get_video_features"),
            (self.base, "forward"),
            (self.model, "forward"),
        )
        for obj, attr in patched:
            if attr in obj.__dict__:
                delattr(obj, attr)  # the class method shows through again: bit-identical to never patched
        self._selected.clear()
        self._selected_videos.clear()
        self._prepared.clear()
        self._state = None
        self._image_report = None

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

    def _video_grid(self) -> tuple[int, int, bool]:
        """``(rows, cols, newline)``: one frame's pooled token grid and whether the video ends with a
        newline token (module docstring)."""
        h = self._patch_grid()
        if self._onevision:  # LlavaOnevisionModel.apply_pooling: bilinear to ceil(h/2) x ceil(w/2)
            return math.ceil(h / 2), math.ceil(h / 2), True
        s = int(self.config.spatial_pool_stride)  # LlavaNextVideoPooler: kernel = stride = s, no padding
        return h // s, h // s, False

    def _video_layout(self, n: int, frames: int | None = None) -> Layout:
        """One video's layout: ``"frame<i>"`` views of the pooled grid (+ OneVision's trailing newline).

        ``frames`` is the number of frames the tower saw; without it (features encoded elsewhere) it is
        inferred from ``n``.
        """
        rows, cols, newline = self._video_grid()
        per = rows * cols
        body = n - int(newline)
        count = body // per if body > 0 else 0
        if count < 1 or body % per or (frames is not None and count != frames):
            want = f"{frames} frame(s)" if frames is not None else "whole frames"
            raise ValueError(
                f"cannot lay out {n} video tokens as {want} of {rows}x{cols} pooled tokens"
                f"{' plus one newline' if newline else ''}, the packing of {type(self.model).__name__}"
            )
        views = [GridView(f"frame{i}", i * per, rows, cols) for i in range(count)]
        if newline:
            views.append(GridView("newline", count * per, 1, 1))
        return Layout(tuple(views))

    def _pool_frame_signal(self, chunk: torch.Tensor) -> torch.Tensor:
        """``[frames, heads, T]`` per-frame vision signal -> ``[frames, heads, prefix + rows * cols]``:
        the prefix (CLS) columns unchanged, the ``h x w`` patch map pooled like the features (module
        docstring)."""
        h = self._patch_grid()
        n_frames, heads, T = chunk.shape
        prefix = T - h * h
        grid = chunk[:, :, prefix:].reshape(n_frames, heads, h, h)  # heads as channels
        rows, cols, _ = self._video_grid()
        if self._onevision:
            pooled = F.interpolate(grid, size=[rows, cols], mode="bilinear")
        else:
            s = int(self.config.spatial_pool_stride)
            if self.config.spatial_pool_mode == "max":
                pooled = F.max_pool2d(grid, kernel_size=s, stride=s)
            else:  # "average"; "conv" is a learned kernel over the same window: averaged here
                pooled = F.avg_pool2d(grid, kernel_size=s, stride=s)
        return torch.cat([chunk[:, :, :prefix], pooled.flatten(2)], dim=-1)

    def _check_video_pixels(self, pixels: Any) -> int:
        """Frames per video of ``pixel_values_videos``, or a ValueError naming what the model needs."""
        size = self.config.vision_config.image_size
        need = f"one [videos, frames, channels, {size}, {size}] tensor"
        if isinstance(pixels, (list, tuple)):
            shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in pixels]
            raise ValueError(
                f"pixel_values_videos must be {need} (every frame of every video the same size); got a "
                f"{type(pixels).__name__} of shapes {shapes}. Resize the frames to {size}x{size} (the "
                f"model's video processor does) and stack them"
            )
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or 0 in pixels.shape[:2]:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"pixel_values_videos must be {need}; got {got}")
        if tuple(pixels.shape[-2:]) != (size, size):
            h = self._patch_grid()
            raise ValueError(
                f"pixel_values_videos frames are {pixels.shape[-2]}x{pixels.shape[-1]} px; "
                f"{type(self.model).__name__} pools every frame on the {h}x{h} patch grid of "
                f"{size}x{size} px frames (vision_config.image_size); resize the frames to {size}x{size}"
            )
        return int(pixels.shape[1])

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
        self._image_report = self.handle.last_report  # the videos of the same call add theirs after it
        return out.to_tuple() if want_tuple else out

    def _get_video_features(self, *args, **kwargs):
        if not self.handle.enabled:
            return self._orig_gvf(*args, **kwargs)
        bound = self._gvf_sig.bind_partial(*args, **kwargs).arguments
        frames = self._check_video_pixels(bound.get("pixel_values_videos"))
        want_tuple = kwargs.get("return_dict") is False
        kwargs["return_dict"] = True
        for p in self.probes:
            p.value = None
        out = self._orig_gvf(*args, **kwargs)
        feats = list(out.pooler_output)  # a [videos, N, D] tensor: one [N, D] item per video
        layouts = [self._video_layout(f.shape[0], frames) for f in feats]
        signals: list[dict] = [{} for _ in feats]
        for p in self.probes:
            if p.value is None:
                raise RuntimeError(f"probe for {p.signal} did not fire during the vision forward")
            for i, chunk in enumerate(torch.split(p.value, frames)):  # the tower saw videos x frames views
                signals[i][p.signal] = self._pool_frame_signal(chunk)
        images = self._image_report
        self._image_report = None
        try:
            selections = self.handle.select(feats, layouts, signals)
        except ValueError as e:
            names = [v.name for v in layouts[0].views] if layouts else []
            raise ValueError(
                f"mmcompress: method {self.handle.method.name!r} cannot compress the video(s) of this call, "
                f"laid out one view per frame (views {names}): {e}"
            ) from e
        report = self.handle.last_report
        if images is not None:  # one report per call: the images first, then the videos
            report.images[:0] = images.images
            report.method_ms += images.method_ms
        self._selected_videos = list(zip(feats, selections))
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

    def _video_selection_for(self, feat: torch.Tensor) -> Selection:
        """The selection of one video's ``[N, D]`` features: by identity (same storage), else by equal
        content (``generate()`` re-stacks the video tensor for beams); features encoded elsewhere are
        laid out from their count and selected here (methods without vision signals only)."""
        for f, sel in self._selected_videos:
            if f.shape != feat.shape or f.device != feat.device:
                continue
            if (f.data_ptr() == feat.data_ptr() and f.stride() == feat.stride()) or torch.equal(f, feat):
                return sel
        if self.handle.method.needs():
            raise ValueError(
                f"method {self.handle.method.name!r} needs vision-tower signals, which only exist when the "
                f"videos are encoded by this model; pass pixel_values_videos instead of precomputed "
                f"mm_encoder_outputs"
            )
        sel = self.handle.select([feat], [self._video_layout(feat.shape[0])], [{}])[0]
        self._selected_videos.append((feat, sel))
        return sel

    def _check_video_runs(self, input_ids: torch.Tensor, counts: list[int]) -> None:
        """Every video has its own placeholder run of its token count (clear errors before the merge)."""
        slots = (input_ids == self.video_token_id).flatten().nonzero().flatten()
        rows, cols, newline = self._video_grid()
        if slots.numel() != sum(counts):
            raise ValueError(
                f"the prompt has {slots.numel()} video placeholder tokens (id {self.video_token_id}) but "
                f"the {len(counts)} video(s) give {sum(counts)} visual tokens ({counts} per video: frames x "
                f"{rows}x{cols} pooled tokens{' + 1 newline' if newline else ''}); every video needs its "
                f"own placeholder run of that length and every run needs a video"
            )
        L, off = input_ids.shape[1], 0
        for i, n in enumerate(counts):
            run = slots[off : off + n]
            if n and run[0] // L != run[-1] // L:
                raise ValueError(
                    f"video {i}'s {n} placeholder tokens span two batch rows; the videos do not match the "
                    f"prompts' video placeholder runs"
                )
            off += n

    def _encode_video(self, kw: dict) -> Any:
        """Encode ``pixel_values_videos`` through our (shadowed) get_video_features, as the model would."""
        args = {k: kw[k] for k in self._gvf_sig.parameters if kw.get(k) is not None}
        enc = self.base.get_video_features(**args, return_dict=True)
        kw["pixel_values_videos"] = None
        return enc

    def _is_prepared(self, enc: Any, vid: Any) -> bool:
        """Whether prepare_inputs() already pruned these encoder outputs (static-cache route)."""
        ids = [id(f) for f in enc.pooler_output] if enc is not None else []
        ids += [id(vid.pooler_output)] if vid is not None else []
        return bool(ids) and all(i in self._prepared for i in ids)

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
        if not self._video and (mm.get("video") is not None or kw.get("pixel_values_videos") is not None):
            raise ValueError(
                f"{type(self.model).__name__} has no video path, so it cannot take a video "
                f"(pixel_values_videos); the transformers LLaVA classes with one are {' and '.join(_VIDEO)}"
            )
        if enc is None and kw.get("pixel_values") is not None:
            enc = self._encode(kw)
        vid = mm.get("video")
        if vid is None and kw.get("pixel_values_videos") is not None:
            vid = self._encode_video(kw)
        if enc is not None or vid is not None:
            if self._is_prepared(enc, vid):  # prepare_inputs() already pruned
                self._state = None
                return self._orig_forward(**kw)
            if past > 0:
                raise ValueError(
                    "mmcompress: images arrived with a non-empty KV cache; compressed prompts "
                    "must start a new cache"
                )
            return self._prefill({"image": enc, "video": vid}, mm, kw, pkv)
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

    def _shrink(self, encs: dict, kw: dict) -> tuple[dict, dict, dict]:
        """Apply the selections of ``encs`` (``{"image": output or None, "video": output or None}``):
        returns (new kwargs, new encoder output per modality, decode state)."""
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "mmcompress needs input_ids at prefill to find the image placeholders "
                "(got inputs_embeds only)"
            )
        keep_tok, new_encs = None, {}
        for modality, enc in encs.items():
            if enc is None:
                continue
            feats = list(enc.pooler_output)  # video: a [videos, N, D] tensor, one item per video
            counts = [f.shape[0] for f in feats]
            if modality == "video":
                self._check_video_runs(input_ids, counts)
                sels, token_id = [self._video_selection_for(f) for f in feats], self.video_token_id
            else:
                sels, token_id = [self._selection_for(f) for f in feats], self.token_id
            mask = placeholder_keep_mask(input_ids, token_id, counts, [s.indices for s in sels])
            keep_tok = mask if keep_tok is None else keep_tok & mask
            pruned = [s.kept_features(f) for f, s in zip(feats, sels)]
            if isinstance(enc.pooler_output, torch.Tensor):  # keep the container type: (1, sum K, D)
                pruned = torch.cat(pruned).unsqueeze(0)
            # a new output object: generate re-sends the same one every step when use_cache=False (§3.5.2)
            new_encs[modality] = type(enc)(**{**dict(enc.items()), "pooler_output": pruned})
        am = kw.get("attention_mask")
        if am is not None and am.dim() != 2:
            raise ValueError(f"mmcompress needs a 2-D attention_mask at prefill, got shape {tuple(am.shape)}")
        shr = shrink_batch(keep_tok, am)
        am_full = am if am is not None else torch.ones_like(input_ids)
        pos = kw.get("position_ids")
        if pos is None:  # what the decoder would use (LlamaModel: arange over the padded row)
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        pad_id = next(i for i in range(3) if i not in (self.token_id, self.video_token_id))
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
        state = dict(orig_len=input_ids.shape[1], prefix_mask=new["attention_mask"], shift=shr.shift)
        report = self.handle.last_report
        if report is not None:
            report.prompt_len_in = int(am_full.sum(1).max())
            report.prompt_len_out = int(shr.attention_mask.sum(1).max())
        return new, new_encs, state

    def _prefill(self, encs: dict, mm: dict, kw: dict, pkv: Any):
        new, new_encs, state = self._shrink(encs, kw)
        mm.update(new_encs)
        new["mm_encoder_outputs"] = mm
        new["pixel_values"] = None
        self._state = state
        self._image_report = None
        return self._record_kv(self._orig_forward(**new), pkv)

    # -- static cache / torch.compile route (reference §3.2, approach A) ------------------------------
    def prepare_inputs(self, inputs: dict) -> dict:
        kw = dict(inputs)
        has_video = self._video and kw.get("pixel_values_videos") is not None
        if kw.get("pixel_values") is None and not has_video:
            raise ValueError(
                "prepare_inputs needs pixel_values (an image prompt)"
                + (" or pixel_values_videos (a video prompt)" if self._video else "")
            )
        encs = {
            "image": self._encode(kw) if kw.get("pixel_values") is not None else None,
            "video": self._encode_video(kw) if has_video else None,
        }
        new, new_encs, _ = self._shrink(encs, kw)
        self._image_report = None
        new["attention_mask"] = (
            new["attention_mask"] if new["attention_mask"] is not None else torch.ones_like(new["input_ids"])
        )
        self._prepared = {id(f): f for f in new_encs["image"].pooler_output} if "image" in new_encs else {}
        if "video" in new_encs:  # a tensor: the model iterates it, so its rows are new objects each time
            self._prepared[id(new_encs["video"].pooler_output)] = new_encs["video"].pooler_output
        new.pop("pixel_values", None)
        for k in (
            "image_sizes",
            "vision_feature_layer",
            "vision_feature_select_strategy",
            "vision_aspect_ratio",
            "batch_num_images",
            "pixel_values_videos",
            "image_sizes_videos",
        ):
            new.pop(k, None)
        new["mm_encoder_outputs"] = new_encs
        return new
