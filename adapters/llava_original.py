"""The original LLaVA codebase (haotian-liu/LLaVA; PyPI ``llava-torch`` 1.2.2.post1, transformers 4.37):
``llava.model.LlavaLlamaForCausalLM`` and ``LlavaMistralForCausalLM`` (both built on the
``LlavaMetaForCausalLM`` mixin), as LLaVA-1.5 (one patch grid per image) and LLaVA-NeXT
(``image_aspect_ratio="anyres"`` with ``mm_patch_merge_type="spatial_unpad"`` or ``"spatial"``).

How the codebase feeds images: a prompt holds ONE ``IMAGE_TOKEN_INDEX`` (-200) per image, and
``prepare_inputs_labels_for_multimodal`` (PILM below) encodes the images (``encode_images``: CLIP tower, then
projector), packs each into its run of visual tokens (NeXT: the thumbnail grid, then the stitched, unpadded
crops grid with ``image_newline`` after every row; one view: the grid plus one newline), splices the runs
into ``inputs_embeds`` row by row (padding removed, then padded again on ``config.tokenizer_padding_side``,
default right, and cut at ``config.tokenizer_model_max_length``) and returns
``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)``. ``forward`` calls PILM
when it gets no ``inputs_embeds``; ``generate`` calls it once and runs transformers' generate on the
embeddings.

Hook points (instance attributes shadowing the class methods, deleted by :meth:`uninstall`):

* PILM runs the original (the probes on the CLIP tower fire inside its ``encode_images``), locates every
  image's run in the spliced output from ``input_ids`` / ``attention_mask`` and the layout's token counts
  (checked against the output's length), hands the method each image's packed features, layout and signals,
  and removes the unkept rows, padding again on the same side. Merged features replace their slots.
* ``forward`` tells PILM which positions the decoder is about to use, and at decode steps after a pruned
  prompt translates positions and a mask over the unpruned prompt to the shortened cache.

Positions. ``"original"`` (default): every kept token keeps the position the decoder would have given it
without pruning, and generated tokens continue after the unpruned prompt. In ``forward()`` that is
PILM's ``position_ids`` if the caller gave any, else LLaMA's ``arange`` over the padded row; in
``generate()`` the mask's cumulative sum (what ``prepare_inputs_for_generation`` computes), so PILM returns no
positions there (generate would reuse a full-prompt tensor at every step) and the prefill and decode
positions are corrected in ``forward``. ``"compact"``: the shortened rows are numbered ``0..L'-1`` over their
real tokens, as the official LLaVA-codebase methods do.

transformers 4.37's LLaMA / Mistral attention asks its rotary embedding for ``seq_len`` = the cache length
and indexes the returned table with ``position_ids``, so positions past the shortened length would fall off
it. With original positions each layer's ``rotary_emb.forward`` is shadowed to return at least the table
up to the largest position of the current call (a longer slice of the same table: identical values).

``tokenizer_model_max_length`` cuts the spliced prompt before pruning, as PILM does.

Not handled: MPT (``LlavaMptForCausalLM`` in this release calls PILM with an outdated signature and fails
unpatched), ``mm_patch_merge_type="flat"`` with AnyRes crops (views concatenated without a grid), images
the ``tokenizer_model_max_length`` cut reaches, and images that arrive with a non-empty KV cache.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from typing import Any

import torch
from torch import nn

from mmcompress.report import cache_bytes
from mmcompress.tokens import GridView, Layout, Selection

from .base import Adapter, register_adapter
from .probes import AttentionProbe, prefix_tokens, vision_attention_modules

__all__ = ["LlavaOriginalAdapter"]

_ARCH = "llava.model.llava_arch"
_IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX: labels of image and padding slots


def _meta_class() -> type | None:
    # Looked up, never imported: a model of the package can only exist once the package was imported.
    return getattr(sys.modules.get(_ARCH), "LlavaMetaForCausalLM", None)


def _shadow(orig, impl):
    """A plain function calling ``impl`` that carries ``orig``'s name, docstring and signature
    (transformers' generate inspects ``forward``'s parameters)."""

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        return impl(*args, **kwargs)

    return wrapper


def _past_len(pkv: Any) -> int:
    """Tokens in a transformers 4.x cache: a ``Cache`` object or the legacy per-layer ``(k, v)`` tuples."""
    if pkv is None:
        return 0
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length())
    if len(pkv) == 0 or pkv[0] is None:
        return 0
    return int(pkv[0][0].shape[-2])


def _kv_bytes(pkv: Any) -> int:
    """Bytes of keys and values in a transformers 4.x cache (``DynamicCache`` lists or legacy tuples)."""
    if pkv is None:
        return 0
    if hasattr(pkv, "layers") or hasattr(pkv, "nbytes"):
        return cache_bytes(pkv)
    if hasattr(pkv, "key_cache"):
        pkv = list(zip(pkv.key_cache, pkv.value_cache))
    return sum(t.numel() * t.element_size() for layer in pkv for t in layer if isinstance(t, torch.Tensor))


def _unpad_canvas(rows: int, cols: int, image_size: Any, unpad_image: Any) -> tuple[int, int, int, int]:
    """Run the codebase's own ``unpad_image`` on an index canvas to learn what it keeps.

    Returns ``(new_rows, new_cols, top, left)``, exact whatever its rounding (``image_size`` is the
    codebase's ``(width, height)``).
    """
    canvas = torch.arange(rows * cols).view(1, rows, cols)
    out = unpad_image(canvas, image_size)
    first = int(out[0, 0, 0])
    return out.shape[1], out.shape[2], first // cols, first % cols


def _plan(keep: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather plan that compacts each row's ``keep`` columns (in order) and pads on the given side.

    Args:
        keep: ``[B, L]`` bool.
        left: pad on the left (else on the right), as PILM does for ``tokenizer_padding_side``.

    Returns ``(gather, valid)``, both ``[B, L']`` with ``L' = max kept``: the source column of every output
    slot (meaningless where ``valid`` is false) and whether the slot holds a real token.
    """
    counts = keep.sum(1)
    new_len = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]  # kept columns first
    ar = torch.arange(new_len, device=keep.device)[None]
    if not left:
        return order, ar < counts[:, None]
    pad = new_len - counts
    return torch.gather(order, 1, (ar - pad[:, None]).clamp(min=0)), ar >= pad[:, None]


@register_adapter
class LlavaOriginalAdapter(Adapter):
    """Pre-LLM methods on models of the original ``llava`` package (module docstring)."""

    name = "llava-original"
    # The support matrix (mmcompress.support) has one column per transformers family, built in the main
    # environment where the `llava` package cannot be installed; this family is tested in tests_llava/.
    families = ()
    layouts = ("single", "anyres")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        meta = _meta_class()
        if meta is None or not isinstance(model, meta):
            return False
        params = inspect.signature(type(model).forward).parameters
        return "position_ids" in params and "images" in params  # not the MPT variant (module docstring)

    def __init__(self, model: nn.Module, handle) -> None:
        super().__init__(model, handle)
        self.config = model.config
        self._utils = importlib.import_module("llava.mm_utils")
        self._arch = importlib.import_module(_ARCH)
        self._image_token = int(importlib.import_module("llava.constants").IMAGE_TOKEN_INDEX)
        self.probes: list[AttentionProbe] = []
        self._in_forward = False  # PILM called by our forward shadow (else by generate())
        self._pending: dict | None = None  # state of a generate()-side PILM until its prefill forward
        self._state: dict | None = None  # decode translation after a pruned prompt
        self._rotary: list[nn.Module] = []  # rotary embeddings shadowed for original positions
        self._rope_len = 0  # largest position of the current call + 1

    # -- facts about the model ----------------------------------------------------------------------
    def layout_kind(self) -> str:
        return "anyres" if getattr(self.config, "image_aspect_ratio", None) == "anyres" else "single"

    def _merge_type(self) -> str:
        return getattr(self.config, "mm_patch_merge_type", "flat")

    def _tower(self) -> nn.Module:
        tower = self.model.get_vision_tower()
        if tower is None or not getattr(tower, "is_loaded", False):
            raise ValueError(
                f"the vision tower of this {type(self.model).__name__} is not loaded (built with "
                f"delay_load); call model.get_vision_tower().load_model() before mmcompress.compress"
            )
        return tower

    def _clip(self) -> nn.Module:
        """The transformers vision transformer inside the codebase's ``CLIPVisionTower``."""
        clip = self._tower().vision_tower
        return getattr(clip, "vision_model", clip)  # transformers 4.x: CLIPVisionModel.vision_model

    def _grid(self) -> int:
        return int(self._tower().num_patches_per_side)

    def _with_cls(self) -> bool:
        return getattr(self._tower(), "select_feature", "patch") == "cls_patch"

    def check(self) -> None:
        method = self.handle.method
        self._tower()
        kind = self.layout_kind()
        if kind not in method.layouts:
            raise ValueError(
                f"method {method.name!r} needs a layout of kind {' or '.join(method.layouts)}; this "
                f"{type(self.model).__name__} (image_aspect_ratio="
                f"{getattr(self.config, 'image_aspect_ratio', None)!r}) packs a {kind} layout"
            )
        merge = self._merge_type()
        if kind == "anyres" and not merge.startswith("spatial"):
            raise ValueError(
                f"mm_patch_merge_type={merge!r} with image_aspect_ratio='anyres' concatenates the crops "
                f"without a grid; supported: 'spatial_unpad' (LLaVA-NeXT) and 'spatial'"
            )
        keep = getattr(method, "keep", None)
        n = self._grid() ** 2 + int(self._with_cls())
        if kind == "single" and isinstance(keep, int) and not isinstance(keep, bool) and keep > n:
            raise ValueError(
                f"keep={keep} exceeds the {n} visual tokens per image of this model; allowed: 1..{n} or "
                f"a fraction in (0, 1]"
            )
        if method.needs():
            clip = self._clip()
            mods = vision_attention_modules(clip)
            prefix_tokens(clip)  # raises for a tower without a known CLS / prefix layout
            for sig in method.needs():
                if not -len(mods) <= sig.layer < len(mods):
                    raise ValueError(
                        f"{sig} asks for vision layer {sig.layer}; the tower has {len(mods)} layers"
                    )

    # -- install / uninstall -----------------------------------------------------------------------
    def install(self) -> None:
        needs = sorted(self.handle.method.needs(), key=str)
        if needs:
            clip = self._clip()
            mods, prefix = vision_attention_modules(clip), prefix_tokens(clip)
            self.probes = [AttentionProbe(mods[s.layer], s, prefix) for s in needs]
        self._orig_prepare = self.model.prepare_inputs_labels_for_multimodal
        self._orig_forward = self.model.forward
        self._fwd_sig = inspect.signature(self._orig_forward)
        self.model.prepare_inputs_labels_for_multimodal = _shadow(self._orig_prepare, self._prepare)
        self.model.forward = _shadow(self._orig_forward, self._forward)
        if self.handle.positions == "original":
            for mod in self.model.get_model().modules():
                fwd = getattr(type(mod), "forward", None)
                # transformers 4.37: forward(x, seq_len) returns the first seq_len rows of the table;
                # later versions take position_ids and need nothing
                if (
                    type(mod).__name__.endswith("RotaryEmbedding")
                    and "seq_len" in inspect.signature(fwd).parameters
                ):
                    mod.forward = _shadow(mod.forward, functools.partial(self._rope_forward, mod.forward))
                    self._rotary.append(mod)

    def uninstall(self) -> None:
        for p in self.probes:
            p.remove()
        self.probes = []
        for mod in self._rotary:
            mod.__dict__.pop("forward", None)
        self._rotary = []
        for attr in ("prepare_inputs_labels_for_multimodal", "forward"):
            if attr in self.model.__dict__:
                delattr(self.model, attr)  # the class method shows through again: as never patched
        self._pending = self._state = None

    # -- layouts ----------------------------------------------------------------------------------
    def _views_per_image(self, images: Any) -> tuple[list[int], bool]:
        """Vision-tower views of each image, and whether PILM takes its list / 5-D path (views packed
        by ``mm_patch_merge_type``) rather than the 4-D one (one view per image, no merging)."""
        if isinstance(images, list):
            return [x.shape[0] if x.dim() == 4 else 1 for x in images], True
        if images.dim() == 5:
            return [images.shape[1]] * images.shape[0], True
        return [1] * images.shape[0], False

    def _layout(self, views: int, merged: bool, image_size: Any) -> Layout:
        """One image's packing, following PILM (module docstring)."""
        h = w = self._grid()
        base = [GridView("base", 0, h, w)]
        if self._with_cls():  # "cls_patch": the CLS token leads each view
            base = [GridView("cls", 0, 1, 1), GridView("base", 1, h, w)]
        merge = self._merge_type()
        if not merged or (views == 1 and merge == "flat"):
            return Layout(tuple(base))
        if not merge.startswith("spatial"):
            raise ValueError(
                f"mm_patch_merge_type={merge!r} concatenates an image's {views} views without a grid; "
                f"mmcompress supports 'spatial_unpad' and 'spatial' for multi-view images"
            )
        n = base[-1].stop
        if views == 1:  # one view: the grid, plus one newline under spatial_unpad
            extra = [GridView("newline", n, 1, 1)] if "unpad" in merge else []
            return Layout(tuple(base + extra))
        # PILM: num_patch_width, num_patch_height = get_anyres_image_grid_shape(...)
        npw, nph = self._utils.get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self._tower().config.image_size
        )
        if "unpad" in merge:
            rows, cols, top, left = _unpad_canvas(nph * h, npw * w, image_size, self._arch.unpad_image)
            crops = GridView(
                "crops",
                n,
                rows,
                cols,
                newline=True,
                tiles=(nph, npw),
                tile_shape=(h, w),
                offset=(top, left),
            )
        else:
            crops = GridView("crops", n, nph * h, npw * w, tiles=(nph, npw), tile_shape=(h, w))
        return Layout((*base, crops))

    # -- where PILM put every image ---------------------------------------------------------------
    def _locate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, counts: list[int], out_len: int
    ) -> tuple[dict[int, tuple[int, torch.Tensor]], torch.Tensor]:
        """Replay PILM's splicing on lengths only.

        Returns ``({image: (row, [N_i] columns in the spliced output)}, real)`` with ``real`` the
        ``[B, out_len]`` bool mask of the output's real (non-padding) slots. An image PILM consumed without
        splicing (a row without placeholders takes the next image and drops it) is not in the dict.
        """
        B = input_ids.shape[0]
        real_in = (
            attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=bool)
        )
        starts: dict[int, tuple[int, int]] = {}
        lengths: list[int] = []
        img = 0
        for b in range(B):
            ids = input_ids[b][real_in[b]]
            where = (ids == self._image_token).nonzero().flatten().tolist()
            if not where:
                img += 1
                lengths.append(ids.numel())
                continue
            pos, prev = 0, -1
            for at in where:
                if img >= len(counts):
                    raise ValueError(
                        f"the prompts hold more image placeholders ({self._image_token}) than the "
                        f"{len(counts)} images given"
                    )
                pos += at - prev - 1  # text tokens before this placeholder
                starts[img] = (b, pos)
                pos += counts[img]
                img, prev = img + 1, at
            lengths.append(pos + ids.numel() - prev - 1)
        max_len = getattr(self.config, "tokenizer_model_max_length", None)
        if max_len is not None:
            lengths = [min(n, int(max_len)) for n in lengths]
        L = max(lengths) if lengths else 0
        if out_len != L:
            raise RuntimeError(
                f"mmcompress: the image layouts give a {L}-token spliced prompt, but "
                f"prepare_inputs_labels_for_multimodal returned {out_len} tokens"
            )
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        offsets = [L - n if left else 0 for n in lengths]
        real = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        for b, (off, n) in enumerate(zip(offsets, lengths)):
            real[b, off : off + n] = True
        slots = {}
        for i, (b, start) in starts.items():
            if start + counts[i] > lengths[b]:
                raise ValueError(
                    f"image {i} is cut by tokenizer_model_max_length={max_len}; mmcompress needs whole "
                    f"images (shorten the prompt or raise the limit)"
                )
            cols = torch.arange(counts[i], device=input_ids.device) + offsets[b] + start
            slots[i] = (b, cols)
        return slots, real

    # -- the hooks ---------------------------------------------------------------------------------
    def _prepare(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        args = (input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        if (
            not self.handle.enabled
            or images is None
            or input_ids is None
            or input_ids.shape[1] == 1
            or self.model.get_vision_tower() is None
        ):
            return self._orig_prepare(*args)  # PILM's own early exits, and the text-only path
        if _past_len(past_key_values) > 0:
            raise ValueError(
                "mmcompress: images arrived with a non-empty KV cache; compressed prompts must start a "
                "new cache"
            )
        for p in self.probes:
            p.value = None
        _, pos_out, am_out, pkv, embeds, labels_out = self._orig_prepare(*args)

        views, merged = self._views_per_image(images)
        sizes = image_sizes if image_sizes is not None else [None] * len(views)
        layouts = [self._layout(v, merged, s) for v, s in zip(views, sizes)]
        counts = [lay.num_tokens for lay in layouts]
        slots, real = self._locate(input_ids, attention_mask, counts, embeds.shape[1])
        used = sorted(slots)
        signals: list[dict] = [{} for _ in views]
        for p in self.probes:
            if p.value is None:
                raise RuntimeError(f"probe for {p.signal} did not fire during the vision forward")
            for i, chunk in enumerate(torch.split(p.value, views)):
                signals[i][p.signal] = chunk
        feats = [embeds[slots[i][0], slots[i][1]] for i in used]
        sels: list[Selection] = self.handle.select(
            feats, [layouts[i] for i in used], [signals[i] for i in used]
        )

        keep = real.clone()
        merged_into: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, sel in zip(used, sels):
            b, cols = slots[i]
            drop = torch.ones(cols.numel(), dtype=torch.bool, device=cols.device)
            drop[sel.indices.to(cols.device)] = False
            keep[b, cols[drop]] = False
            if sel.features is not None:  # merging: the merged features take the kept slots
                merged_into.append((b, cols[sel.indices.to(cols.device)], sel.features))
        if merged_into:
            embeds = embeds.clone()
            for b, cols, f in merged_into:
                embeds[b, cols] = f.to(device=embeds.device, dtype=embeds.dtype)

        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        gather, valid = _plan(keep, left)
        B, L = keep.shape
        L_out = valid.shape[1]
        D = embeds.shape[-1]
        g = gather.to(embeds.device)[..., None].expand(-1, -1, D)
        new_embeds = torch.where(valid.to(embeds.device)[..., None], torch.gather(embeds, 1, g), 0.0)
        new_labels = None
        if labels_out is not None:
            new_labels = torch.where(valid, torch.gather(labels_out, 1, gather), _IGNORE_INDEX)
        new_mask = None
        # PILM returns no mask when it got none, even if it padded rows of different lengths; a mask is
        # added only where pruning made the padding
        if am_out is not None or (bool(real.all()) and not bool(valid.all())):
            new_mask = valid.to(am_out.dtype if am_out is not None else torch.long)

        # the positions the decoder would give the unpruned prompt (module docstring)
        from_generate = not self._in_forward and pos_out is None
        if pos_out is not None:
            full_pos = pos_out
        elif from_generate:  # LlamaForCausalLM.prepare_inputs_for_generation: mask cumsum, 1 at padding
            gm = (
                am_out.long()
                if am_out is not None
                else torch.ones(B, L, dtype=torch.long, device=real.device)
            )
            full_pos = (gm.cumsum(-1) - 1).masked_fill(gm == 0, 1)
        else:  # LlamaModel without position_ids: arange over the padded row
            full_pos = torch.arange(L, device=real.device)[None].expand(B, L)
        # padding slots get what the decoder would give them unpruned (keep-all stays bit-identical there too)
        # (generate numbers from the mask it gets: 1 at padding, or arange when it gets none)
        pad_pos = (
            1 if from_generate and new_mask is not None else torch.arange(L_out, device=valid.device)[None]
        )
        if self.handle.positions == "original":
            new_pos = torch.where(valid, torch.gather(full_pos, 1, gather), pad_pos)
        else:
            new_pos = torch.where(valid, valid.long().cumsum(-1) - 1, pad_pos)

        state = dict(
            embeds=new_embeds,
            prefill_pos=new_pos if from_generate and self.handle.positions == "original" else None,
            shift=(real.sum(1) - valid.sum(1)).to(new_pos.device),
            full_len=L,
            short_len=valid.shape[1],
            prefix_mask=new_mask,
        )
        if self._in_forward:
            self._state = state
            self._note_positions(new_pos)
        else:
            self._pending = state
        report = self.handle.last_report
        if report is not None:
            report.prompt_len_in = int(real.sum(1).max())
            report.prompt_len_out = int(valid.sum(1).max())
        # generate(): no positions back (it would reuse the prompt's tensor at every step); forward fixes them
        ret_pos = None if from_generate else new_pos
        return None, ret_pos, new_mask, pkv, new_embeds, new_labels

    def _forward(self, *args, **kwargs):
        if not self.handle.enabled:
            self._pending = self._state = None
            return self._orig_forward(*args, **kwargs)
        kw = dict(self._fwd_sig.bind_partial(*args, **kwargs).arguments)
        for name, p in self._fwd_sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(kw.pop(name, {}))
        past = _past_len(kw.get("past_key_values"))
        if past == 0:
            pending, self._pending, self._state = self._pending, None, None
            state = self._match_pending(pending, kw.get("inputs_embeds"))
            if state is not None:  # generate()'s prefill of a pruned prompt
                self._state = pending = state
                if pending["prefill_pos"] is not None:
                    kw["position_ids"] = pending["prefill_pos"]
                    self._note_positions(kw["position_ids"])
                return self._record_kv(self._orig_forward(**kw))
            self._in_forward = True
            try:
                return self._record_kv(self._orig_forward(**kw))
            finally:
                self._in_forward = False
        if self._state is not None:
            self._translate_decode(kw, past)
            self._note_positions(kw.get("position_ids"))
            return self._record_kv(self._orig_forward(**kw))
        return self._orig_forward(**kw)

    @staticmethod
    def _match_pending(pending: dict | None, emb: torch.Tensor | None) -> dict | None:
        """The state of the pruned prompt ``emb`` is, or None. generate() passes PILM's embeddings as they
        are, or repeated ``r`` times per row (``repeat_interleave``) for beams / ``num_return_sequences``;
        the state is expanded the same way."""
        if pending is None or emb is None:
            return None
        ref = pending["embeds"]
        if emb is ref:
            return pending
        B = ref.shape[0]
        r = emb.shape[0] // B if B else 0
        if r < 2 or emb.shape != (r * B, *ref.shape[1:]) or not torch.equal(emb[::r], ref):
            return None
        rep = {k: v.repeat_interleave(r, 0) for k, v in pending.items() if isinstance(v, torch.Tensor)}
        return {**pending, **rep}

    def _translate_decode(self, kw: dict, past: int) -> None:
        """Decode step after a pruned prompt: the cache is ``full_len - short_len`` tokens shorter."""
        st = self._state
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        B, q = x.shape[0], x.shape[1]
        delta = st["full_len"] - st["short_len"]
        am = kw.get("attention_mask")
        if delta > 0 and am is not None and am.dim() == 2 and am.shape[1] == past + q + delta:
            # a mask over the unpruned prompt (a hand-written decode loop): swap in the shortened prefix
            pm = st["prefix_mask"]
            if pm is None:
                pm = am.new_ones(B, st["short_len"])
            kw["attention_mask"] = torch.cat([pm.to(am), am[:, st["full_len"] :]], dim=1)
        if self.handle.positions != "original":
            return
        pos = kw.get("position_ids")
        if pos is None:  # LlamaModel would count from the cache length: count from the unpruned one
            kw["position_ids"] = torch.arange(past, past + q, device=x.device)[None].expand(B, q) + delta
        else:  # positions from the mask's cumsum (generate): add the tokens each row lost
            kw["position_ids"] = pos + st["shift"][:, None].to(pos.device)

    def _rope_forward(self, orig, x: torch.Tensor, seq_len: int | None = None, **kw):
        if seq_len is not None and self.handle.enabled:
            seq_len = max(int(seq_len), self._rope_len)
        return orig(x, seq_len=seq_len, **kw)

    def _note_positions(self, pos: torch.Tensor | None) -> None:
        if self._rotary and pos is not None and pos.numel():
            self._rope_len = int(pos.max()) + 1

    def _record_kv(self, out: Any) -> Any:
        report = self.handle.last_report
        if self._state is not None and report is not None:
            pkv = (
                out.get("past_key_values") if isinstance(out, dict) else getattr(out, "past_key_values", None)
            )
            if pkv is not None:
                report.kv_bytes = _kv_bytes(pkv)
        return out
