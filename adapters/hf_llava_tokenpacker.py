"""TokenPacker as the projector of a transformers ``LlavaForConditionalGeneration`` (transformers 5.x).

Spec ``specs/tokenpacker-seed-lavit.md`` §1.6. :func:`install_tokenpacker` swaps
``model.model.multi_modal_projector`` for a :class:`LlavaTokenPacker` on this instance only and keeps the
placeholder count consistent:

* **features**: TokenPacker needs two views of the tower, the query layer and the concatenated
  multi-level layers. LLaVA already concatenates every hidden state listed in
  ``config.vision_feature_layer`` (CLS dropped under the ``"default"`` strategy), so we set that list to
  the multi-level layers (plus the query layer when it is not one of them) and the projector splits the
  stack again. No forward is copied; the model's own ``get_image_features`` runs unchanged.
* **token count**: ``config.image_seq_length = M = (G/s)^2`` and the processor's ``patch_size`` becomes
  ``patch * s``, so ``LlavaProcessor`` emits ``(S / (patch*s))^2 = M`` placeholders per image.
* **high resolution** (``patch_num=9|16|25``, TokenPacker-HD, §1.4): ``get_image_features`` is shadowed
  on the instance (as :mod:`mmcompress.adapters.hf_llava` does) to assemble each image's crops, global
  view and ``,`` / ``\\n`` separator embeddings, and :class:`TokenPackerHDProcessor` slices the images and
  emits each image's token count.

:func:`uninstall_tokenpacker` puts the original projector, config fields, processor patch size and
methods back. :func:`save_tokenpacker_llava` / :func:`load_tokenpacker_llava` round-trip a converted
model as a normal checkpoint folder (the TokenPacker settings travel in ``config.tokenpacker``).
:func:`official_llava_to_hf` maps an original-LLaVA TokenPacker checkpoint's keys to transformers names.

Out of scope for now: an adapter for the original LLaVA codebase (``llava`` package), LLaVA-NeXT
(AnyRes packs a fixed ``G x G`` grid per crop), and combining an installed TokenPacker-HD with
:func:`mmcompress.compress` (both shadow ``get_image_features``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcompress.projectors.tokenpacker import (
    OFFICIAL_FEATURE_LAYERS,
    TokenPacker,
    TokenPackerConfig,
    assemble_hd,
    check_scale,
    hd_token_count,
    load_official_state,
    read_official_projector,
    slice_image,
    slice_plan,
)

from .probes import prefix_tokens

__all__ = [
    "LlavaTokenPacker",
    "TokenPackerHDProcessor",
    "install_tokenpacker",
    "uninstall_tokenpacker",
    "resolve_layers",
    "save_tokenpacker_llava",
    "load_tokenpacker_llava",
    "official_llava_to_hf",
    "hf_to_official_llava",
]

_SUPPORTED = ("LlavaForConditionalGeneration",)
_STATE_ATTR = "_mmcompress_tokenpacker"


class LlavaTokenPacker(TokenPacker):
    """:class:`TokenPacker` taking LLaVA's stacked features ``[B, N, n_in * C_v]``.

    The stack holds the ``L`` multi-level layers first, then (when the query layer is not one of them) the
    query layer: ``n_in`` is ``L`` or ``L + 1``. ``query_level`` is the query layer's slot in the stack.
    Parameter names are TokenPacker's own, so the state dict is the official layout under
    ``model.multi_modal_projector.``.
    """

    def __init__(self, config: TokenPackerConfig, query_level: int) -> None:
        super().__init__(config)
        if not 0 <= query_level <= config.num_levels:
            raise ValueError(f"query_level={query_level} is out of range [0, {config.num_levels}]")
        self.query_level = query_level

    def forward(self, features: torch.Tensor, multi: torch.Tensor | None = None) -> torch.Tensor:
        if multi is not None:  # the plain two-input call
            return super().forward(features, multi)
        c, n_levels = self.config.vision_hidden_size, self.config.num_levels
        n_in = max(n_levels, self.query_level + 1)
        if features.shape[-1] != n_in * c:
            raise ValueError(
                f"LlavaTokenPacker: stacked features have {features.shape[-1]} channels, expected "
                f"{n_in} hidden states x {c} (config.vision_feature_layer changed after install?)"
            )
        single = features[..., self.query_level * c : (self.query_level + 1) * c]
        return super().forward(single, features[..., : n_levels * c])


@dataclasses.dataclass
class _Installed:
    """What install changed, to put back (a plain holder, so the old projector is not a submodule)."""

    projector: nn.Module
    vision_feature_layer: Any
    image_seq_length: Any
    had_tokenpacker_attr: bool
    processor: Any = None
    processor_patch_size: Any = None
    shadowed: bool = False


def _check_model(model: nn.Module) -> None:
    if type(model).__name__ not in _SUPPORTED or not hasattr(model, "model"):
        raise TypeError(
            f"install_tokenpacker supports transformers {', '.join(_SUPPORTED)}; got {type(model).__name__}"
        )


def resolve_layers(
    num_layers: int,
    vision_feature_layer: int | Sequence[int],
    feature_layers: Sequence[int] | None = None,
    query_layer: int | None = None,
) -> tuple[list[int], int, int]:
    """Which tower hidden states TokenPacker reads (spec §1.1, §1.5).

    Indices are ``hidden_states`` indices (0 = embeddings, i = output of layer i; negatives count from the
    end of the ``num_layers + 1`` states) and are returned normalised to ``>= 0``.

    Defaults: ``feature_layers`` is the model's ``vision_feature_layer`` when that is already a list
    (the embedded model: ``[4, -1]``), else the official ``(12, 16, 22, 23)`` on a 24-layer tower and the
    spec's small-scale rule ``(L//2, 2L//3, L-2, L-1)`` otherwise. ``query_layer`` is the model's
    ``vision_feature_layer`` when that is an int (LLaVA-1.5: -2 = index 23 = official
    ``mm_vision_select_layer``), else the last feature layer (the final layer for the embedded model).

    Returns ``(stack, query_level, num_levels)``: the list for ``config.vision_feature_layer`` (feature
    layers, then the query layer if it is not among them), the query's slot in it, and ``L``.
    """
    n_states = num_layers + 1

    def norm(i: Any, field: str) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_states <= i < n_states:
            raise ValueError(
                f"{field}={i!r} is not a hidden-state index of this {num_layers}-layer tower; "
                f"allowed: {-n_states}..{n_states - 1}"
            )
        return i % n_states

    if feature_layers is None:
        if not isinstance(vision_feature_layer, int):
            feature_layers = list(vision_feature_layer)
        elif num_layers == 24:
            feature_layers = list(OFFICIAL_FEATURE_LAYERS)
        else:
            feature_layers = [num_layers // 2, 2 * num_layers // 3, num_layers - 2, num_layers - 1]
            if len(set(feature_layers)) < 4:
                raise ValueError(
                    f"feature_layers: the default rule gives {feature_layers} for a {num_layers}-layer "
                    f"tower; pass feature_layers explicitly"
                )
    if isinstance(feature_layers, (int, str)) or len(feature_layers) == 0:
        raise ValueError(
            f"feature_layers={feature_layers!r} must be a non-empty list of hidden-state indices"
        )
    feats = [norm(i, "feature_layers") for i in feature_layers]
    if len(set(feats)) != len(feats):
        raise ValueError(f"feature_layers={list(feature_layers)} repeats a layer ({feats} after normalising)")
    if query_layer is None:
        query_layer = vision_feature_layer if isinstance(vision_feature_layer, int) else feats[-1]
    q = norm(query_layer, "query_layer")
    stack = feats if q in feats else [*feats, q]
    return stack, stack.index(q), len(feats)


def _shadow(orig, impl):
    @functools.wraps(orig)  # generate() reads the signature to pick the encoder kwargs
    def wrapper(*args, **kwargs):
        return impl(*args, **kwargs)

    return wrapper


def install_tokenpacker(
    model: nn.Module,
    processor: Any = None,
    *,
    scale: int = 2,
    feature_layers: Sequence[int] | None = None,
    query_layer: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    patch_num: int | None = None,
) -> LlavaTokenPacker:
    """Replace the projector of a transformers LLaVA model with TokenPacker (spec §1.6), in place.

    Args:
        model: a ``LlavaForConditionalGeneration``; the tower must drop or lack a CLS token (strategy
            ``"default"``, or ``"full"`` on a tower without one).
        processor: its ``LlavaProcessor``; its ``patch_size`` is set to ``patch * scale`` so it emits
            ``M`` placeholders per image. For ``patch_num`` use the returned packer's
            ``hd_processor`` (a :class:`TokenPackerHDProcessor` around it).
        scale: ``s``; must divide the patch grid ``G = image_size / patch_size``. ``M = (G/s)^2``.
        feature_layers, query_layer: tower hidden states for keys/values and for the point queries;
            defaults in :func:`resolve_layers`.
        embed_dim, num_heads: attention width (default ``C_v``) and heads (default ``embed_dim // 128``,
            at least 1), the official rules.
        weights: an official-layout projector (state dict, file or checkpoint folder, see
            :func:`~mmcompress.projectors.tokenpacker.read_official_projector`); loaded strictly.
            Default: the official random init.
        patch_num: 9 / 16 / 25 switches on TokenPacker-HD (slice mode, §1.4).

    Returns the installed :class:`LlavaTokenPacker` (also ``model.model.multi_modal_projector``).
    Installing again first uninstalls (one TokenPacker per model).
    """
    _check_model(model)
    if getattr(model, _STATE_ATTR, None) is not None:
        uninstall_tokenpacker(model)
    base, cfg = model.model, model.config
    vc = cfg.vision_config
    grid = vc.image_size // vc.patch_size
    check_scale(scale, grid, "scale")
    if patch_num is not None and patch_num not in (9, 16, 25):
        raise ValueError(f"patch_num={patch_num!r} is not allowed; choose one of (None, 9, 16, 25)")
    if patch_num is not None and getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            "patch_num needs the processor (its tokenizer gives the ',' and '\\n' separator ids)"
        )
    prefix = prefix_tokens(base.vision_tower)
    if cfg.vision_feature_select_strategy == "full" and prefix:
        raise ValueError(
            f"vision_feature_select_strategy='full' keeps {prefix} CLS/register token(s), which TokenPacker "
            f"cannot place on the patch grid (official issue #22); allowed: 'default'"
        )
    if prefix > 1:
        raise ValueError(
            f"the tower has {prefix - 1} register tokens besides CLS; TokenPacker needs patches only"
        )
    stack, query_level, n_levels = resolve_layers(
        vc.num_hidden_layers, cfg.vision_feature_layer, feature_layers, query_layer
    )
    e = vc.hidden_size if embed_dim is None else embed_dim
    tp_cfg = TokenPackerConfig(
        vision_hidden_size=vc.hidden_size,
        num_levels=n_levels,
        raw_grid=grid,
        scale_factor=scale,
        embed_dim=e,
        num_heads=max(1, e // 128) if num_heads is None else num_heads,
        text_hidden_size=cfg.text_config.hidden_size,
    )
    old = base.multi_modal_projector
    ref = next(old.parameters(), None)
    packer = LlavaTokenPacker(tp_cfg, query_level)
    if ref is not None:
        packer.to(device=ref.device, dtype=ref.dtype)
    if weights is not None:
        load_official_state(packer, weights)
    packer.train(old.training)

    state = _Installed(old, cfg.vision_feature_layer, cfg.image_seq_length, "tokenpacker" in cfg.__dict__)
    base.multi_modal_projector = packer
    cfg.vision_feature_layer = list(stack)
    cfg.image_seq_length = tp_cfg.num_tokens
    cfg.tokenpacker = {
        "scale": scale,
        "feature_layers": stack[:n_levels],
        "query_layer": stack[query_level],
        "embed_dim": tp_cfg.embed_dim,
        "num_heads": tp_cfg.num_heads,
        "patch_num": patch_num,
    }
    object.__setattr__(model, _STATE_ATTR, state)  # a plain attribute, never a submodule
    if processor is not None:
        state.processor, state.processor_patch_size = processor, processor.patch_size
        processor.patch_size = vc.patch_size * scale
    if patch_num is not None:
        _install_hd(model, packer, processor, patch_num, state)
    return packer


def uninstall_tokenpacker(model: nn.Module, processor: Any = None) -> None:
    """Undo :func:`install_tokenpacker`: the original projector, config fields, processor patch size and
    ``get_image_features`` come back (bit-identical outputs to never installed)."""
    state: _Installed | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"no TokenPacker is installed on this {type(model).__name__}")
    base, cfg = model.model, model.config
    base.multi_modal_projector = state.projector
    cfg.vision_feature_layer = state.vision_feature_layer
    cfg.image_seq_length = state.image_seq_length
    if not state.had_tokenpacker_attr and "tokenpacker" in cfg.__dict__:
        del cfg.tokenpacker
    if "get_image_features" in base.__dict__:
        delattr(base, "get_image_features")  # the class method shows through again
    for proc in (state.processor, processor):
        if proc is not None:
            proc.patch_size = state.processor_patch_size or cfg.vision_config.patch_size
    object.__delattr__(model, _STATE_ATTR)


# -- TokenPacker-HD (§1.4) --------------------------------------------------------------------------
def _install_hd(model: nn.Module, packer: LlavaTokenPacker, processor: Any, patch_num: int, state) -> None:
    base = model.model
    block = model.config.vision_config.image_size
    tok = processor.tokenizer
    # official: tokenizer.convert_tokens_to_ids([',']) and (['\n']); unknown tokens give the unk id, as-is
    sep_id, ret_id = tok.convert_tokens_to_ids(","), tok.convert_tokens_to_ids("\n")
    if sep_id is None or ret_id is None:
        raise ValueError(f"the tokenizer maps ',' -> {sep_id} and '\\n' -> {ret_id}; both need an id")
    orig = base.get_image_features

    def get_image_features(pixel_values=None, *args, image_sizes=None, **kwargs):
        if image_sizes is None:
            raise ValueError(
                "TokenPacker-HD needs image_sizes (original (height, width) per image); use the "
                "TokenPackerHDProcessor returned as packer.hd_processor"
            )
        want_tuple = kwargs.get("return_dict") is False
        kwargs["return_dict"] = True
        out = orig(pixel_values, *args, **kwargs)  # no image_sizes: one [M, H] entry per view
        views = out.pooler_output
        emb = base.get_input_embeddings()
        ids = torch.tensor([sep_id, ret_id], device=views[0].device)
        sep, ret = emb(ids)
        per_image, at = [], 0
        for hw in torch.as_tensor(image_sizes).tolist():
            hb, wb = slice_plan(int(hw[0]), int(hw[1]), patch_num, block)
            n = hb * wb + int(hb * wb > 1)
            if at + n > len(views):
                raise ValueError(
                    f"TokenPacker-HD: image_sizes ask for more than the {len(views)} views in pixel_values"
                )
            per_image.append(assemble_hd(torch.stack(views[at : at + n]), hb, wb, sep, ret))
            at += n
        if at != len(views):
            raise ValueError(f"TokenPacker-HD: image_sizes use {at} views, pixel_values holds {len(views)}")
        out.pooler_output = per_image
        return out.to_tuple() if want_tuple else out

    base.get_image_features = _shadow(orig, get_image_features)
    state.shadowed = True
    packer.hd_processor = TokenPackerHDProcessor(processor, patch_num, block, packer.num_tokens)


class TokenPackerHDProcessor:
    """Slices images for TokenPacker-HD and emits each image's token count (spec §1.4).

    Wraps a ``LlavaProcessor`` (its tokenizer, image mean/std and image token): ``__call__(images, text)``
    returns ``input_ids``, ``attention_mask``, ``pixel_values [sum of views, 3, S, S]`` and
    ``image_sizes [images, 2]`` (original height, width). Each ``<image>`` in the text becomes
    :func:`~mmcompress.projectors.tokenpacker.hd_token_count` placeholders. Other attributes (tokenizer,
    ``batch_decode`` ...) pass through to the wrapped processor.
    """

    def __init__(self, processor: Any, patch_num: int, block: int, tokens_per_view: int) -> None:
        self.processor = processor
        self.patch_num, self.block, self.tokens_per_view = patch_num, block, tokens_per_view

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)

    def image_views(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(views [n (+1), 3, S, S], (hb, wb))`` of one PIL image / ``[3, H, W]`` uint8-or-[0,1] tensor."""
        ip = self.processor.image_processor
        if not isinstance(image, torch.Tensor):
            import numpy as np

            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be RGB with 3 channels, got shape {tuple(image.shape)}")
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()  # ToTensor
        mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        std = torch.tensor(ip.image_std).view(3, 1, 1)
        return slice_image((x - mean) / std, self.patch_num, self.block)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any):
        from transformers import BatchFeature

        if images is None or text is None:
            raise ValueError("TokenPackerHDProcessor needs both images and text")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        texts = [text] if isinstance(text, str) else list(text)
        token = self.processor.image_token
        if sum(t.count(token) for t in texts) != len(images):
            raise ValueError(
                f"{sum(t.count(token) for t in texts)} {token!r} in the text for {len(images)} images"
            )
        views, sizes, counts = [], [], []
        for im in images:
            v, (hb, wb) = self.image_views(im)
            views.append(v)
            sizes.append(
                [im.shape[-2], im.shape[-1]] if isinstance(im, torch.Tensor) else [im.height, im.width]
            )
            counts.append(hd_token_count(hb, wb, self.tokens_per_view))
        it = iter(counts)
        expanded = [re.sub(re.escape(token), lambda _m: token * next(it), t) for t in texts]
        kwargs.pop("return_tensors", None)
        enc = self.processor.tokenizer(expanded, return_tensors="pt", **kwargs)
        return BatchFeature(
            {**enc, "pixel_values": torch.cat(views), "image_sizes": torch.tensor(sizes)}, tensor_type=None
        )


# -- checkpoints ---------------------------------------------------------------------------------------
def save_tokenpacker_llava(model: nn.Module, processor: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` of a model with TokenPacker installed (and its processor); load it back with
    :func:`load_tokenpacker_llava`. The projector is saved under ``model.multi_modal_projector.`` with the
    official key names; ``config.tokenpacker`` records how to rebuild it."""
    if getattr(model, _STATE_ATTR, None) is None:
        raise ValueError("save_tokenpacker_llava: no TokenPacker is installed on this model")
    out = Path(out_dir)
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def load_tokenpacker_llava(path: str | Path, **from_pretrained_kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, processor)`` from a :func:`save_tokenpacker_llava` folder.

    ``from_pretrained`` loads everything but the projector (transformers builds the MLP projector its
    config names, and renames keys on save and load: we let it); then TokenPacker is installed from
    ``config.tokenpacker`` (saved layers, scale and, for HD, ``patch_num``: the returned processor is then
    the :class:`TokenPackerHDProcessor`) with the saved projector tensors, loaded strictly. Any other
    missing, unexpected or mismatched key raises ``ValueError``. ``from_pretrained_kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map`` ...).
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    path = Path(path)
    tp = getattr(AutoConfig.from_pretrained(path), "tokenpacker", None)
    if not tp:
        raise ValueError(f"{path}: config.json has no 'tokenpacker' entry; not a TokenPacker checkpoint")
    projector = read_official_projector(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the plain MLP projector is reported missing, TokenPacker unexpected
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path, output_loading_info=True, **from_pretrained_kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {
        kind: [k for k in info.get(kind, ()) if "multi_modal_projector." not in str(k)]
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(bad.values()):
        raise ValueError(f"{path}: weights do not match the config: {bad}")
    processor = AutoProcessor.from_pretrained(path)
    del model.config.tokenpacker  # install writes it again
    packer = install_tokenpacker(
        model,
        processor,
        scale=tp["scale"],
        feature_layers=tp["feature_layers"],
        query_layer=tp["query_layer"],
        embed_dim=tp["embed_dim"],
        num_heads=tp["num_heads"],
        weights=projector,
        patch_num=tp.get("patch_num"),
    )
    # the saved processor already had patch_size = patch * scale; uninstall should give the tower's patch
    getattr(model, _STATE_ATTR).processor_patch_size = model.config.vision_config.patch_size
    return model.eval(), getattr(packer, "hd_processor", processor)


# Original LLaVA (``LlavaLlamaForCausalLM``) -> transformers ``LlavaForConditionalGeneration`` (§1.6).
_OFFICIAL_TO_HF = (
    ("model.mm_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)


def official_llava_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-LLaVA TokenPacker checkpoint's keys to transformers Llava names (§1.6).

    The released models hold the LLM and ``model.mm_projector.*`` but not the CLIP tower (it is loaded from
    ``mm_vision_tower``); a key outside the known prefixes raises ``ValueError`` naming it.
    """
    out = {}
    for k, v in state.items():
        for src, dst in _OFFICIAL_TO_HF:
            if k.startswith(src):
                out[dst + k[len(src) :]] = v
                break
        else:
            raise ValueError(f"official_llava_to_hf: key {k!r} has no transformers counterpart")
    return out


def hf_to_official_llava(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_llava_to_hf` (export to the original LLaVA layout)."""
    out = {}
    for k, v in state.items():
        for src, dst in _OFFICIAL_TO_HF:
            if k.startswith(dst):
                out[src + k[len(dst) :]] = v
                break
        else:
            raise ValueError(f"hf_to_official_llava: key {k!r} has no original-LLaVA counterpart")
    return out
