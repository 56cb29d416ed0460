"""One measured ``generate()`` call: answers, time to first token, KV-cache bytes.

Time to first token (TTFT) runs from the ``generate()`` call to the moment the first token's logits
exist: it includes the vision tower, the compression method and the prefill (generate encodes images
before prefill), i.e. what a user waits for. It is taken with a logits processor, which generate calls
once per produced token, so no second run is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmcompress.report import cache_bytes

__all__ = ["Generation", "timed_generate", "parse_keep"]


class _FirstTokenClock(LogitsProcessor):
    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


@dataclass
class Generation:
    """Result of :func:`timed_generate` for a batch of B prompts."""

    sequences: torch.Tensor  # [B, L_prompt' + new], relative to the (possibly shortened) prompt
    new_tokens: torch.Tensor  # [B, new]
    ttft_ms: float
    total_ms: float
    kv_bytes: int  # bytes held by the whole batch's cache at the end


@torch.no_grad()
def timed_generate(model, inputs: dict, max_new_tokens: int = 4, **gen_kwargs) -> Generation:
    """Greedy ``generate()`` with TTFT and KV bytes. ``inputs`` come from the model's processor."""
    clock = _FirstTokenClock()
    procs = LogitsProcessorList([clock, *gen_kwargs.pop("logits_processor", [])])
    t0 = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=procs,
        return_dict_in_generate=True,
        **gen_kwargs,
    )
    t1 = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    # generate returns sequences relative to the prompt it saw; with transparent pruning that is the
    # original prompt (input_ids are shortened inside forward, generate's own copy is not).
    new = out.sequences[:, prompt_len:]
    return Generation(
        sequences=out.sequences,
        new_tokens=new,
        ttft_ms=((clock.first or t1) - t0) * 1e3,
        total_ms=(t1 - t0) * 1e3,
        kv_bytes=cache_bytes(out.past_key_values),
    )


def parse_keep(text: str) -> int | float:
    """``"64"`` → 64 tokens per image; ``"0.25"`` → a quarter. Validation happens in the method config."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"keep={text!r} is not a number; allowed: an int >= 1 (tokens per image) or a fraction in (0, 1]"
        ) from None
