"""open_clip vision towers as feature, attention and question-relevance sources (issue 7, ``clip`` extra).

* :class:`OpenClipTower` wraps an open_clip CLIP model (or a bare ``open_clip.transformer.
  VisionTransformer``): patch features of any block, and the :class:`~mmcompress.signals.VitAttention`
  signals of any block recomputed from q/k in a forward *pre*-hook on that block's attention module, so
  the tower's own attention path (SDPA / ``nn.MultiheadAttention``'s fused kernel) runs untouched. Both
  ``nn.MultiheadAttention`` blocks (packed ``in_proj_weight``, ``batch_first`` or sequence-first) and
  open_clip's own ``Attention`` (custom blocks, optional qk-norm) are read.
* :class:`OpenClipSignals` scores a VLM's image with it: ``compress(model, "hired", keep=...,
  signal_tower=OpenClipSignals(tower, processor=vlm_processor))``. The VLM's pixel values are
  un-normalised with the VLM's mean / std, resized (bicubic, antialiased) to the tower's input size,
  renormalised with the tower's, and every attention map is resampled bilinearly on the patch grid to
  the VLM's grid (the CLS column kept as is), so the method sees ``[views, heads, 1 + rows*cols]`` like
  the adapter's own probe. (Resampled CLS rows no longer sum to one: the methods only rank them.)
* :class:`OpenClipRelevance` scores each patch against a question: the cosine between the text
  embedding and each patch token of the last block mapped into the joint space with the tower's own
  ``ln_post`` and ``proj`` (dense CLIP as in MaskCLIP, Zhou et al., ECCV 2022, §3.2 — here without
  MaskCLIP's value-embedding substitution in the last block). ``compress(model, method,
  relevance=OpenClipRelevance(tower, tokenizer, prefilter=0.5, processor=p), question="...")`` restricts
  the method to the top ``prefilter`` fraction of tokens (:func:`mmcompress.towers.prefilter_select`).

Input pixel values of :meth:`OpenClipTower.features` / :meth:`~OpenClipTower.attention` /
:meth:`OpenClipRelevance.scores` are the tower's own: ``[B, 3, h, w]`` at ``image_size``, normalised with
``image_mean`` / ``image_std``. Run the tower in eval mode (patch dropout would drop tokens).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import open_clip
    from open_clip.transformer import Attention as _OcAttention
    from open_clip.transformer import VisionTransformer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mmcompress.towers.open_clip needs open_clip: pip install 'mmcompress[clip]' (open_clip_torch and "
        "a torchvision built for your torch)"
    ) from e

from mmcompress.adapters.probes import attention_signal
from mmcompress.signals import VitAttention

from . import RelevanceSource, SignalTower, check_prefilter

__all__ = ["OpenClipTower", "OpenClipSignals", "OpenClipRelevance", "resample_patches"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class _Stop(Exception):
    """Raised by a hook once everything asked for is captured: the remaining blocks never run."""


def _triple(value: Any, field: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{field} must be 3 numbers (one per RGB channel), got {value!r}") from None
    if len(t) != 3 or not all(math.isfinite(v) for v in t):
        raise ValueError(f"{field} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return t


def _vlm_norm(image_mean: Any, image_std: Any, processor: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The VLM's pixel normalisation: given directly, or read from its (image) processor; None if neither."""
    if processor is not None:
        if image_mean is not None or image_std is not None:
            raise ValueError("pass either processor= or image_mean= / image_std= for the VLM, not both")
        ip = getattr(processor, "image_processor", processor)
        image_mean, image_std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if image_mean is None or image_std is None:
            raise TypeError(
                f"processor {type(processor).__name__} has no image_mean / image_std (nor an image_processor "
                f"with them); pass image_mean= and image_std= of the VLM instead"
            )
    if image_mean is None and image_std is None:
        return None
    if image_mean is None or image_std is None:
        raise ValueError("the VLM's image_mean and image_std must be given together")
    mean, std = _triple(image_mean, "image_mean"), _triple(image_std, "image_std")
    if min(std) <= 0:
        raise ValueError(f"image_std must be positive, got {std}")
    return torch.tensor(mean), torch.tensor(std)


def resample_patches(
    values: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], prefix: int
) -> torch.Tensor:
    """``[B, C, prefix + src_h*src_w]`` -> ``[B, C, prefix + dst_h*dst_w]``: the patch columns resampled
    bilinearly on the grid (``align_corners=False``), the ``prefix`` columns (CLS) kept as they are."""
    if tuple(src) == tuple(dst):
        return values
    B, C, _ = values.shape
    grid = values[:, :, prefix:].reshape(B, C, src[0], src[1])
    out = F.interpolate(grid.float(), size=tuple(dst), mode="bilinear", align_corners=False)
    return torch.cat([values[:, :, :prefix].float(), out.reshape(B, C, -1)], dim=-1)


def _qk(attn: nn.Module, x: torch.Tensor, batch_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (already multiplied by the softmax scale) and keys ``[B, H, L, hd]`` float32 of one
    attention module, from its input ``x`` (after ``ln_1``), exactly as the module computes them."""
    if not batch_first:
        x = x.transpose(0, 1)  # [L, B, D] -> [B, L, D]
    B, L, _ = x.shape
    if isinstance(attn, nn.MultiheadAttention):
        H, hd = attn.num_heads, attn.head_dim
        if attn._qkv_same_embed_dim:
            wq, wk, _ = attn.in_proj_weight.chunk(3)
        else:
            wq, wk = attn.q_proj_weight, attn.k_proj_weight
        bq, bk = (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)[:2]
        q, k = F.linear(x, wq, bq), F.linear(x, wk, bk)
        q, k = (t.reshape(B, L, H, hd).transpose(1, 2).float() for t in (q, k))
        return q * hd**-0.5, k
    # open_clip's own Attention (custom blocks): packed in_proj, optional per-head qk layer norm
    H, hd = attn.num_heads, attn.head_dim
    q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.reshape(B, L, H, hd).transpose(1, 2) for t in (q, k))
    if getattr(attn, "ln_q", None) is not None:  # qk-norm (identity modules when off)
        q, k = attn.ln_q(q), attn.ln_k(k)
    return q.float() * hd**-0.5, k.float()


class OpenClipTower:
    """An open_clip ViT as a source of patch features and attention signals.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` whose ``visual`` is a ``VisionTransformer``, or
            such a ``VisionTransformer`` itself (then no text tower: :class:`OpenClipRelevance` refuses it).
        image_mean, image_std: the tower's input normalisation (default: the model's preprocess config,
            else OpenAI CLIP's).
        image_size: the tower's input size, int or ``(h, w)``; must equal the size its positional
            embedding was built for (default: that size).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        if isinstance(model, VisionTransformer):
            visual = model
        elif isinstance(getattr(model, "visual", None), VisionTransformer):
            visual = model.visual
        else:
            raise TypeError(
                f"OpenClipTower needs an open_clip model whose .visual is an open_clip VisionTransformer "
                f"(or that VisionTransformer), got {type(model).__name__}"
                + (f" with .visual {type(model.visual).__name__}" if hasattr(model, "visual") else "")
            )
        self.model, self.visual = model, visual
        self.blocks = visual.transformer.resblocks
        # open_clip < 2.26 always ran the blocks sequence-first
        self.batch_first = bool(getattr(visual.transformer, "batch_first", False))
        for i, b in enumerate(self.blocks):
            a = getattr(b, "attn", None)
            if not isinstance(a, (nn.MultiheadAttention, _OcAttention)):
                raise TypeError(f"block {i}: unsupported attention module {type(a).__name__}")
            if getattr(a, "logit_scale", None) is not None:
                raise TypeError(
                    f"block {i}: scaled-cosine attention is not supported (its logits are not q·k/sqrt(d))"
                )
        get_cfg = getattr(open_clip, "get_model_preprocess_cfg", None)
        cfg = (get_cfg(model) if get_cfg is not None else None) or {}
        self.image_mean = _triple(
            image_mean if image_mean is not None else cfg.get("mean", _OPENAI_MEAN), "image_mean"
        )
        self.image_std = _triple(
            image_std if image_std is not None else cfg.get("std", _OPENAI_STD), "image_std"
        )
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        own = tuple(int(s) for s in visual.image_size)
        if image_size is None:
            image_size = own
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if isinstance(image_size, bool) or len(size) != 2 or size != own:
            raise ValueError(
                f"image_size={image_size!r} is not allowed: this tower's positional embedding is built for "
                f"{own[0]}x{own[1]} inputs"
            )
        self.image_size: tuple[int, int] = own
        self.grid: tuple[int, int] = tuple(int(g) for g in visual.grid_size)
        self.num_layers = len(self.blocks)
        self.heads = int(self.blocks[0].attn.num_heads)

    def __repr__(self) -> str:
        return (
            f"OpenClipTower({self.num_layers} layers, {self.heads} heads, "
            f"grid {self.grid[0]}x{self.grid[1]}, input {self.image_size[0]}x{self.image_size[1]})"
        )

    # -- checks ------------------------------------------------------------------------------------------
    def check_layer(self, layer: Any, field: str = "layer") -> int:
        """``layer`` as a non-negative block index (Python indexing over the blocks)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{field} must be an int, got {layer!r}")
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"{field}={layer} is out of range: the open_clip tower has {self.num_layers} layers "
                f"(allowed {-self.num_layers}..{self.num_layers - 1})"
            )
        return layer % self.num_layers

    def _check_pixels(self, pixel_values: Any) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if (
            pixel_values.dim() != 4
            or pixel_values.shape[1] != 3
            or tuple(pixel_values.shape[-2:]) != self.image_size
        ):
            raise ValueError(
                f"pixel_values must be [B, 3, {self.image_size[0]}, {self.image_size[1]}] (the tower's input "
                f"size), got {tuple(pixel_values.shape)}"
            )

    def _run(self, pixel_values: torch.Tensor) -> None:
        """Run the tower until a hook raises :class:`_Stop`."""
        self._check_pixels(pixel_values)
        w = self.visual.conv1.weight
        try:
            self.visual(pixel_values.to(device=w.device, dtype=w.dtype))
        except _Stop:
            return
        raise RuntimeError("the open_clip tower finished without reaching the hooked block")

    # -- features ---------------------------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """``[B, T, D]`` patch tokens (CLS excluded, ``T = grid_h * grid_w``, row-major) output by block
        ``layer`` (before ``ln_post``). Blocks after ``layer`` do not run."""
        j = self.check_layer(layer)
        out: list[torch.Tensor] = []

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out.append(output if self.batch_first else output.transpose(0, 1))
            raise _Stop

        h = self.blocks[j].register_forward_hook(hook)
        try:
            self._run(pixel_values)
        finally:
            h.remove()
        tokens = out[0][:, 1:]
        if tokens.shape[1] != self.grid[0] * self.grid[1]:
            raise RuntimeError(
                f"block {j} output {tokens.shape[1]} patch tokens for a {self.grid} grid; is patch dropout "
                f"active (tower in training mode)?"
            )
        return tokens

    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` last-block patch tokens mapped into the joint image-text space with the tower's
        own ``ln_post`` and ``proj`` (dense CLIP, module docstring); not normalised."""
        if getattr(self.visual, "attn_pool", None) is not None:
            raise TypeError(
                "this open_clip tower pools with an attentional pooler (CoCa-style): its patch tokens have "
                "no per-token projection into the joint space"
            )
        x = self.visual.ln_post(self.features(pixel_values, -1))
        return x @ self.visual.proj if self.visual.proj is not None else x

    # -- attention ---------------------------------------------------------------------------------------
    def attention(self, pixel_values: torch.Tensor, layer: int, kind: str = "cls") -> torch.Tensor:
        """``[B, heads, 1 + T]`` attention signal ``kind`` of block ``layer`` (a
        :class:`~mmcompress.signals.VitAttention` kind: ``"cls"`` = the CLS query row, ``"received"`` =
        column means over all queries, ...; column 0 is the CLS key)."""
        sig = VitAttention(layer, kind)
        return self.attention_signals(pixel_values, [sig])[sig]

    def attention_signals(
        self, pixel_values: torch.Tensor, signals: Sequence[VitAttention]
    ) -> dict[VitAttention, torch.Tensor]:
        """Several signals in one forward (each ``[B, heads, 1 + T]`` float32); blocks after the deepest
        requested one do not run."""
        layers: dict[int, list[VitAttention]] = {}
        for s in signals:
            if not isinstance(s, VitAttention):
                raise TypeError(f"open_clip towers produce VitAttention signals, got {s!r}")
            layers.setdefault(self.check_layer(s.layer, f"{s} layer"), []).append(s)
        out: dict[VitAttention, torch.Tensor] = {}
        last = max(layers)
        handles = [
            self.blocks[j].attn.register_forward_pre_hook(
                self._probe_hook(sigs, out, stop=j == last), with_kwargs=True
            )
            for j, sigs in layers.items()
        ]
        try:
            with torch.no_grad():
                self._run(pixel_values)
        finally:
            for h in handles:
                h.remove()
        return out

    def _probe_hook(self, sigs: list[VitAttention], out: dict, stop: bool) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            q, k = _qk(mod, x, getattr(mod, "batch_first", True))  # open_clip's Attention: batch first
            for s in sigs:
                out[s] = attention_signal(q, k, s.kind, 1.0, prefix=1)  # q carries the scale
            if stop:
                raise _Stop

        return hook

    @contextlib.contextmanager
    def probing(self, layer: int, kind: str = "cls") -> Iterator[Any]:
        """Install a persistent probe while the block runs normally: ``with tower.probing(-1) as p:
        model.encode_image(x)``; then ``p.value`` is ``[B, heads, 1 + T]`` from that forward."""
        sig = VitAttention(self.check_layer(layer), kind)
        box: dict = {}

        class _Probe:
            signal = sig

            @property
            def value(self) -> torch.Tensor | None:
                return box.get(sig)

        h = self.blocks[sig.layer].attn.register_forward_pre_hook(
            self._probe_hook([sig], box, stop=False), with_kwargs=True
        )
        try:
            yield _Probe()
        finally:
            h.remove()

    # -- pixels ------------------------------------------------------------------------------------------
    def from_vlm_pixels(
        self, pixel_values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """A VLM's normalised pixels ``[V, 3, H, W]`` -> this tower's input ``[V, 3, h, w]``: un-normalise
        with the VLM's ``mean`` / ``std``, resize (bicubic, antialiased; skipped at equal size), normalise
        with the tower's."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"VLM pixel_values must be [views, 3, H, W], got {tuple(pixel_values.shape)}")
        x = pixel_values.float()
        x = x * std.to(x.device)[:, None, None] + mean.to(x.device)[:, None, None]
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        m = torch.tensor(self.image_mean, device=x.device)[:, None, None]
        s = torch.tensor(self.image_std, device=x.device)[:, None, None]
        return (x - m) / s


def _check_tower(tower: Any, who: str) -> OpenClipTower:
    if not isinstance(tower, OpenClipTower):
        raise TypeError(f"{who} needs an OpenClipTower, got {type(tower).__name__}")
    return tower


class OpenClipSignals(SignalTower):
    """Vision-attention signals of a VLM's images computed by an open_clip tower (module docstring).

    Args:
        tower: the :class:`OpenClipTower`.
        image_mean, image_std: the VLM's pixel normalisation, or
        processor: the VLM's processor (its ``image_processor.image_mean`` / ``image_std`` are used).
    """

    def __init__(
        self,
        tower: OpenClipTower,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        processor: Any = None,
    ) -> None:
        self.tower = _check_tower(tower, "OpenClipSignals")
        norm = _vlm_norm(image_mean, image_std, processor)
        if norm is None:
            raise ValueError(
                "OpenClipSignals needs the VLM's pixel normalisation to un-normalise its pixel values: pass "
                "processor=<the VLM's processor> or image_mean= and image_std="
            )
        self.vlm_mean, self.vlm_std = norm

    def __repr__(self) -> str:
        return f"OpenClipSignals({self.tower!r})"

    def check(self, needs: frozenset) -> None:
        for s in needs:
            if not isinstance(s, VitAttention):
                raise ValueError(f"an open_clip signal tower produces VitAttention signals only, not {s}")
            self.tower.check_layer(s.layer, f"{s} layer")

    def compute(
        self, pixel_values: torch.Tensor, grid: tuple[int, int], signals: Sequence[VitAttention]
    ) -> dict[VitAttention, torch.Tensor]:
        x = self.tower.from_vlm_pixels(pixel_values, self.vlm_mean, self.vlm_std)
        vals = self.tower.attention_signals(x, signals)
        dev = pixel_values.device  # the tower may live elsewhere; the methods get the VLM's device
        return {s: resample_patches(v, self.tower.grid, grid, prefix=1).to(dev) for s, v in vals.items()}


class OpenClipRelevance(RelevanceSource):
    """Question relevance of each patch: cosine(text embedding, dense patch embedding) (module docstring).

    Args:
        tower: an :class:`OpenClipTower` over a CLIP model with a text tower (``encode_text``).
        tokenizer: texts -> ``[n, context]`` token ids (``open_clip.get_tokenizer(name)``).
        prefilter: fraction of each image's grid tokens kept as candidates for the method, in (0, 1].
        image_mean, image_std / processor: the VLM's pixel normalisation (needed with ``compress``).
    """

    def __init__(
        self,
        tower: OpenClipTower,
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        prefilter: float = 0.5,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        processor: Any = None,
    ) -> None:
        self.tower = _check_tower(tower, "OpenClipRelevance")
        if not callable(getattr(tower.model, "encode_text", None)):
            raise TypeError(
                f"OpenClipRelevance needs a CLIP model with a text tower (encode_text); the tower wraps a "
                f"{type(tower.model).__name__}"
            )
        if getattr(tower.visual, "attn_pool", None) is not None:
            raise TypeError(
                "OpenClipRelevance: attentional-pooler towers (CoCa) have no per-patch projection"
            )
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable (texts -> token ids), got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.prefilter = check_prefilter(prefilter)
        self.vlm_norm = _vlm_norm(image_mean, image_std, processor)

    def __repr__(self) -> str:
        return f"OpenClipRelevance({self.tower!r}, prefilter={self.prefilter})"

    def check(self) -> None:
        if self.vlm_norm is None:
            raise ValueError(
                "OpenClipRelevance scores a VLM's images from its pixel values: construct it with "
                "processor=<the VLM's processor> or image_mean= and image_std="
            )

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts))
        device = self.tower.visual.conv1.weight.device
        with torch.no_grad():
            return self.tower.model.encode_text(ids.to(device), normalize=True).float()

    def scores(self, pixel_values: torch.Tensor, texts: str | Sequence[str]) -> torch.Tensor:
        """``[B, T]`` cosine between each image's text (one string: all images) and its patch embeddings;
        ``pixel_values`` in the tower's own input format."""
        B = pixel_values.shape[0]
        texts = [texts] * B if isinstance(texts, str) else list(texts)
        if len(texts) != B:
            raise ValueError(f"got {len(texts)} texts for {B} images; give one per image or a single string")
        with torch.no_grad():
            patches = F.normalize(self.tower.patch_embeddings(pixel_values).float(), dim=-1)
        return torch.einsum("bte,be->bt", patches, self.text_embeddings(texts))

    def patch_embeddings(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """VLM pixels -> ``[V, E, rows*cols]`` unit patch embeddings resampled bilinearly to the VLM grid."""
        self.check()
        x = self.tower.from_vlm_pixels(pixel_values, *self.vlm_norm)
        with torch.no_grad():
            e = F.normalize(self.tower.patch_embeddings(x).float(), dim=-1)  # [V, T, E]
        return resample_patches(e.transpose(1, 2), self.tower.grid, grid, prefix=0).to(pixel_values.device)
