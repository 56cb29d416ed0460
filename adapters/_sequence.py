"""Shrinking placeholder runs in a left-padded batch (shared by every transformers adapter).

After a method keeps K_i of the N_i visual tokens of image i, the LLM input must lose the same
placeholder positions: ``input_ids``, the 2-D ``attention_mask``, ``position_ids`` (2-D, or
``(3|4, B, L)`` for M-RoPE) and any per-token 1-D side inputs (``mm_token_type_ids``, ``labels``). Rows
then have different lengths, so they are re-left-padded (reference §3.3, approach B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LabelShrinking", "placeholder_keep_mask", "ShrunkBatch", "shrink_batch"]


def placeholder_keep_mask(
    input_ids: torch.Tensor, token_id: int, counts: list[int], kept: list[torch.Tensor]
) -> torch.Tensor:
    """``[B, L]`` bool: false at the placeholder slots of dropped visual tokens.

    Placeholders are consumed in row-major (batch, seq) order, image ``i`` owning the next ``counts[i]``
    slots, exactly like transformers' ``masked_scatter`` merge.

    Raises:
        ValueError: when the placeholder count differs from the sum of ``counts`` or an image's
            placeholders straddle two rows (images and prompts do not line up).
    """
    flat = (input_ids == token_id).flatten().nonzero().flatten()
    total = sum(counts)
    if flat.numel() != total:
        raise ValueError(
            f"the prompt has {flat.numel()} image placeholder tokens (id {token_id}) but the images give "
            f"{total} visual tokens ({counts} per image); every image needs its own placeholder run of "
            f"that length and every run needs an image"
        )
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    L = input_ids.shape[1]
    off = 0
    for i, (n, k) in enumerate(zip(counts, kept)):
        slots = flat[off : off + n]
        if n and slots[0] // L != slots[-1] // L:
            raise ValueError(
                f"image {i}'s {n} placeholder tokens span two batch rows; the number of images "
                f"does not match the prompts' <image> placeholders"
            )
        drop = torch.ones(n, dtype=torch.bool, device=input_ids.device)
        drop[k.to(input_ids.device)] = False
        keep[slots[drop]] = False
        off += n
    return keep.view_as(input_ids)


@dataclass
class ShrunkBatch:
    """The re-left-padded batch after dropping tokens.

    Attributes:
        gather: ``[B, L']`` source column of every kept position (undefined where ``valid`` is false).
        valid: ``[B, L']`` true at real (non-padding) positions.
        attention_mask: ``[B, L']`` the new 2-D mask.
        shift: ``[B]`` how many real tokens each row lost (for compact positions at decode).
    """

    gather: torch.Tensor
    valid: torch.Tensor
    attention_mask: torch.Tensor
    shift: torch.Tensor

    def take(self, t: torch.Tensor, pad_value: int | float = 0) -> torch.Tensor:
        """Gather a ``[B, L]`` (or ``[R, B, L]`` M-RoPE) per-token tensor into the new layout."""
        if t.dim() == 3:
            idx = self.gather[None].expand(t.shape[0], -1, -1)
            return torch.where(self.valid[None], torch.gather(t, 2, idx), pad_value)
        return torch.where(self.valid, torch.gather(t, 1, self.gather), pad_value)


def shrink_batch(keep_tok: torch.Tensor, attention_mask: torch.Tensor | None) -> ShrunkBatch:
    """Plan the gather that removes ``~keep_tok`` positions (and existing padding) and left-pads again.

    Args:
        keep_tok: ``[B, L]`` bool, false at dropped placeholder slots.
        attention_mask: ``[B, L]`` 0/1 or ``None`` (no padding).
    """
    full = torch.ones_like(keep_tok, dtype=torch.long) if attention_mask is None else attention_mask.long()
    keep = keep_tok & full.bool()
    counts = keep.sum(1)
    new_len = int(counts.max()) if counts.numel() else 0
    pad = new_len - counts
    # stable sort puts kept columns first, in their original order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]
    ar = torch.arange(new_len, device=keep.device)[None]
    valid = ar >= pad[:, None]
    gather = torch.gather(order, 1, (ar - pad[:, None]).clamp(min=0))
    new_mask = valid.to(full.dtype)
    if attention_mask is not None:
        new_mask = new_mask.to(attention_mask.dtype)
    return ShrunkBatch(gather=gather, valid=valid, attention_mask=new_mask, shift=full.sum(1) - counts)


class LabelShrinking:
    """The outer ``forward`` shadow shared by the VLM adapters: ``labels`` are taken out of the call,
    shrunk with the prompt at prefill (the adapter's inner forward stores ``_shrunk_labels`` from
    ``_pending_labels``), and the loss is recomputed on the shortened logits.

    Needs ``self.handle``, ``self.model``, ``self.config``, ``self._orig_outer`` and the two label slots.
    """

    def _outer_forward(self, *args, **kw):
        if kw.get("labels") is None or not self.handle.enabled:
            return self._orig_outer(*args, **kw)
        labels = kw.pop("labels")
        self._pending_labels, self._shrunk_labels = labels, None
        try:
            out = self._orig_outer(*args, **kw)
        finally:
            self._pending_labels = None
        shrunk = self._shrunk_labels if self._shrunk_labels is not None else labels
        self._shrunk_labels = None
        out.loss = self.model.loss_function(
            logits=out.logits, labels=shrunk, vocab_size=self.config.text_config.vocab_size
        )
        out.labels = shrunk
        return out
