"""mmcompress: drop-in visual-token compression for vision-language models.

import mmcompress as mmc
mmc.compress(model, "divprune", keep=64)   # model.generate() now runs on 64 visual tokens per image
mmc.report(model)                          # what the last call did
with mmc.disabled(model): ...              # the baseline on the same instance
mmc.restore(model)                         # bit-identical to never patched
"""

from . import projectors  # noqa: F401  (mmc.projectors.install_tokenpacker)
from .api import Handle, compress, disabled, prepare_inputs, report, restore
from .config import CacheMethod, InLLMMethod, MethodConfig, PreLLMMethod
from .kv import make_cache
from .registry import names as available_methods
from .signals import VitAttention
from .tokens import GridView, Layout, Selection, VisualTokens

__version__ = "0.1.0"

__all__ = [
    "compress",
    "restore",
    "disabled",
    "report",
    "prepare_inputs",
    "Handle",
    "available_methods",
    "MethodConfig",
    "PreLLMMethod",
    "CacheMethod",
    "InLLMMethod",
    "make_cache",
    "VitAttention",
    "VisualTokens",
    "Selection",
    "Layout",
    "GridView",
]


def __getattr__(name: str):
    # Method configs by class name (mmc.DivPrune, mmc.Pool, ...) without importing every method eagerly.
    from . import registry

    for n in registry.names():
        cls = registry.get(n)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'mmcompress' has no attribute {name!r}")
