"""Random pruning: the uniform-subset baseline every pruning paper reports against.

Keeps K tokens drawn uniformly without replacement from the image's N visual tokens (newlines included:
the candidate set is every token the image contributes, like DivPrune's). The draw depends only on
``(seed, N)``: each image gets a fresh generator seeded with ``seed``, so a result never depends on the
image's position in the batch or on what ran before.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import PreLLMMethod, check_int, check_keep, resolve_keep
from ..registry import register
from ..tokens import Selection, VisualTokens

__all__ = ["RandomPrune", "random_indices"]


def random_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """``[K]`` sorted int64 indices of a uniform random K-subset of ``range(n)``, on CPU.

    A fresh CPU ``torch.Generator`` seeded with ``seed`` draws ``randperm(n)``; the first K are kept, so
    the result is a function of ``(n, k, seed)`` alone and the same on every device.
    """
    if not 0 <= k <= n:
        raise ValueError(f"random_indices: k={k} must be in [0, n={n}]")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


@register
@dataclasses.dataclass(frozen=True)
class RandomPrune(PreLLMMethod):
    """Keep a uniform random subset of ``keep`` visual tokens per image.

    Attributes:
        keep: tokens per image (int) or fraction (float in (0, 1]; rounded half to even).
        seed: generator seed, ``0 <= seed < 2**63``; the same seed and N always give the same subset.
    """

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "uniform random subset of visual tokens (baseline)"

    keep: int | float = 0.25
    seed: int = 0

    def validate(self) -> None:
        check_keep(self.keep)
        check_int(self.seed, "seed", 0, 2**63 - 1)

    def select(self, tokens: VisualTokens) -> Selection:
        k = resolve_keep(self.keep, tokens.num_tokens)
        idx = random_indices(tokens.num_tokens, k, self.seed)
        return Selection(indices=idx.to(tokens.features.device))
