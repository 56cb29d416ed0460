"""Signals a method can ask the adapter for (DESIGN §1).

A method declares ``needs`` as a set of these hashable descriptors; the adapter installs only the probes
that produce them and hands the values over in ``VisualTokens.signals[signal]``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VitAttention"]

_ATTN_KINDS = ("cls", "received", "cls_logits", "received_logits", "given_logits")


@dataclass(frozen=True)
class VitAttention:
    """Attention inside vision-tower layer ``layer`` (Python indexing over the encoder layers).

    ``kind="cls"``: the CLS query row, value ``[views, heads, T]`` (T includes the CLS column at 0).
    ``kind="received"``: mean attention each token receives over all queries, value ``[views, heads, T]``.
    ``kind="cls_logits"``: the CLS query row before the softmax, ``(q·k) * scale``, ``[views, heads, T]``.
    ``kind="received_logits"``: per key ``j``, the mean pre-softmax logit ``(q_i·k_j) * scale`` over the
    *patch* queries ``i`` (CLS / register tokens excluded), ``[views, heads, T]`` — the column means of the
    patch-to-patch logit block (FoPru's "received" candidate, spec §3.2).
    ``kind="given_logits"``: per query ``i``, the mean logit over the patch keys (the row means).
    Both are exact and cost ``O(T·C)``: a mean of dot products is the dot product with the mean vector.

    Layer convention: ``layer=j`` is the attention computed *inside* encoder layer ``j``, which produces
    ``hidden_states[j + 1]``; LLaVA's ``vision_feature_layer=-2`` features come from ``layer=-2``.
    """

    layer: int
    kind: str = "cls"

    def __post_init__(self) -> None:
        if self.kind not in _ATTN_KINDS:
            raise ValueError(f"VitAttention.kind={self.kind!r} is not allowed; use one of {_ATTN_KINDS}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"VitAttention.layer must be an int, got {self.layer!r}")
