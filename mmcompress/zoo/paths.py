"""Where the zoo keeps things: the user cache (built checkpoints) and the shipped weights (in the package)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_home", "shipped_weights_dir"]

_SHIPPED = Path(__file__).resolve().parent / "weights"


def cache_home() -> Path:
    """``$MMCOMPRESS_HOME`` if set, else ``~/.cache/mmcompress`` (created on demand by the callers)."""
    env = os.environ.get("MMCOMPRESS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmcompress"


def shipped_weights_dir(name: str) -> Path:
    """The folder inside the package holding the trained LM, projector, tokenizer and configs of ``name``."""
    return _SHIPPED / name
