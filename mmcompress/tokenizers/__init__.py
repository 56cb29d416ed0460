"""Discrete visual tokenizers (DESIGN §2, spec ``specs/tokenpacker-seed-lavit.md`` §2-§3): images become ids
in an LLM's extended vocabulary.

* :mod:`.seed`: SEED, a causal Q-Former with 32 queries and a Euclidean codebook (32 ids per image);
* :mod:`.lavit`: LaVIT, a token selector + merger and a cosine codebook (a dynamic number of ids);
* :mod:`.vq`: the shared pieces (codebooks, id checks, codebook usage, :func:`~.vq.extend_vocab`);
* :mod:`.config`: frozen, validated configs in their own registry (a separate kind from the pruning
  methods of :mod:`mmcompress.registry`).

    from mmcompress.tokenizers import SeedTokenizer
    tok = SeedTokenizer(vision_tower=tower).eval()
    ids = tok.encode(pixel_values)                    # [B, 32] in 0..8191
    layout = tok.extend_vocab(text_tokenizer, llm)    # <img_00000>.. + <img> </img>, embeddings resized
    llm_ids = tok.to_llm_ids(ids)                     # [B, 34]
"""

from .config import TokenizerConfig, create_tokenizer, get_tokenizer, register_tokenizer, tokenizer_names
from .lavit import LavitConfig, LavitOutput, LavitTokenizer
from .seed import SeedConfig, SeedOutput, SeedTokenizer
from .vq import (
    LAVIT_OFFICIAL_LAYOUT,
    SEED_OFFICIAL_LAYOUT,
    CosineCodebook,
    EuclideanCodebook,
    VocabLayout,
    check_ids,
    codebook_usage,
    extend_vocab,
    kmeans,
    nearest_code,
)

__all__ = [
    "TokenizerConfig",
    "create_tokenizer",
    "get_tokenizer",
    "register_tokenizer",
    "tokenizer_names",
    "SeedConfig",
    "SeedOutput",
    "SeedTokenizer",
    "LavitConfig",
    "LavitOutput",
    "LavitTokenizer",
    "VocabLayout",
    "SEED_OFFICIAL_LAYOUT",
    "LAVIT_OFFICIAL_LAYOUT",
    "CosineCodebook",
    "EuclideanCodebook",
    "check_ids",
    "codebook_usage",
    "extend_vocab",
    "kmeans",
    "nearest_code",
]
