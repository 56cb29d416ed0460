"""Vision-tower attention probes that leave SDPA / flash attention on (reference §3.4, §4.2).

A forward pre-hook on one attention module receives the layer-normed hidden states ``[V, T, C]`` and
recomputes only what a method asked for from ``q_proj`` / ``k_proj``:

* ``cls``: the CLS query row, ``O(T·C)`` extra work → ``[V, H, T]`` (``cls_logits``: the same before the
  softmax);
* ``received``: the mean attention each token receives over all queries → ``[V, H, T]``, computed in
  query chunks so the ``T×T`` map never exists at once;
* ``received_logits`` / ``given_logits``: column / row means of the patch-to-patch pre-softmax logit
  block → ``[V, H, T]``, as the dot product of each key (query) with the mean patch query (key), exact
  and ``O(T·C)``. "Patch" excludes the tower's prefix tokens (CLS, registers; :func:`prefix_tokens`).

Works for CLIP and SigLIP (``encoder.layers[j].self_attn``, ``num_heads``/``scale``) and DINOv2
(``encoder.layer[j].attention``, ``num_attention_heads``/``scaling``) in transformers 5.x.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcompress.signals import VitAttention

__all__ = ["AttentionProbe", "attention_signal", "prefix_tokens", "vision_attention_modules"]

_Q_CHUNK = 256


def vision_attention_modules(tower: nn.Module) -> list[nn.Module]:
    """The per-layer attention modules of a CLIP / SigLIP / DINOv2 vision tower, in layer order."""
    enc = getattr(tower, "encoder", None)
    layers = getattr(enc, "layers", None) or getattr(enc, "layer", None)
    if layers is None:
        raise TypeError(
            f"vision tower {type(tower).__name__} has no encoder.layers / encoder.layer; "
            f"supported towers: CLIP, SigLIP, DINOv2 (transformers 5.x)"
        )
    mods = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
        if attn is None or not hasattr(attn, "q_proj") or not hasattr(attn, "k_proj"):
            raise TypeError(f"vision layer {type(layer).__name__} has no attention with q_proj/k_proj")
        mods.append(attn)
    return mods


def prefix_tokens(tower: nn.Module) -> int:
    """Tokens before the patches in the tower's sequence: CLS (CLIP, DINOv2) plus DINOv2 registers."""
    cfg = getattr(tower, "config", None)
    kind = getattr(cfg, "model_type", "")
    if kind.startswith("siglip"):
        return 0
    if kind.startswith("clip") or kind.startswith("dinov2"):
        return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    raise TypeError(
        f"vision tower {type(tower).__name__} (model_type={kind!r}): unknown prefix tokens; "
        f"supported towers: CLIP, SigLIP, DINOv2"
    )


def _heads(mod: nn.Module) -> tuple[int, int, float]:
    h = getattr(mod, "num_heads", None) or getattr(mod, "num_attention_heads", None)
    hd = getattr(mod, "head_dim", None)
    scale = getattr(mod, "scale", None) or getattr(mod, "scaling", None)
    if h is None or hd is None or scale is None:
        raise TypeError(f"cannot read heads/head_dim/scale from {type(mod).__name__}")
    return int(h), int(hd), float(scale)


class AttentionProbe:
    """Records one signal per vision forward. ``value`` is ``[V, H, T]`` (float32) after each forward."""

    def __init__(self, module: nn.Module, signal: VitAttention, prefix: int = 1) -> None:
        self.signal = signal
        self.prefix = prefix  # CLS / register tokens excluded from the patch means of the *_logits kinds
        self.value: torch.Tensor | None = None
        self.enabled = True
        self.heads, self.head_dim, self.scale = _heads(module)
        self._h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._h.remove()

    @torch.no_grad()
    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.enabled:
            return
        hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        V, T, _ = hs.shape
        H, hd = self.heads, self.head_dim
        k = mod.k_proj(hs).view(V, T, H, hd).transpose(1, 2).float()  # [V, H, T, hd]
        rows = hs[:, :1] if self.signal.kind in ("cls", "cls_logits") else hs  # CLS kinds need one query
        q = mod.q_proj(rows).view(V, rows.shape[1], H, hd).transpose(1, 2).float()
        self.value = attention_signal(q, k, self.signal.kind, self.scale, self.prefix)


def attention_signal(
    q: torch.Tensor, k: torch.Tensor, kind: str, scale: float, prefix: int = 0
) -> torch.Tensor:
    """One :class:`~mmcompress.signals.VitAttention` kind from queries and keys of one attention layer.

    Args:
        q: ``[V, H, Tq, hd]`` float queries (after RoPE where the tower applies it); for ``"cls"`` /
            ``"cls_logits"`` only row 0 is used, so ``Tq`` may be 1.
        k: ``[V, H, T, hd]`` float keys.
        kind: the signal kind (module docstring).
        scale: the softmax scale (``head_dim ** -0.5``).
        prefix: tokens before the patches (CLS, registers), excluded from the ``*_logits`` patch means.

    Returns ``[V, H, T]``. ``"received"`` runs the queries in chunks, so no ``T x T`` map exists at once.
    """
    if kind in ("cls", "cls_logits"):
        logits = (q[:, :, :1] @ k.transpose(-1, -2)) * scale
        return (logits if kind == "cls_logits" else torch.softmax(logits, -1))[:, :, 0]
    if kind == "received_logits":
        q_mean = q[:, :, prefix:].mean(dim=2, keepdim=True)  # [V, H, 1, hd]
        return (q_mean @ k.transpose(-1, -2))[:, :, 0] * scale
    if kind == "given_logits":
        k_mean = k[:, :, prefix:].mean(dim=2, keepdim=True)
        return (q @ k_mean.transpose(-1, -2))[..., 0] * scale
    if kind != "received":
        raise ValueError(f"attention_signal: kind={kind!r} is not a VitAttention kind")
    V, H, T = k.shape[:3]
    acc = torch.zeros(V, H, T, device=k.device)
    for s in range(0, q.shape[2], _Q_CHUNK):
        a = torch.softmax((q[:, :, s : s + _Q_CHUNK] @ k.transpose(-1, -2)) * scale, -1)
        acc += a.sum(dim=2)
    return acc / q.shape[2]
