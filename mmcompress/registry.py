"""Method registry: name -> config class. Unknown names raise and list the known ones."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import MethodConfig

__all__ = ["register", "get", "names", "create", "create_with_budget"]

_METHODS: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``cls`` reachable by ``cls.name``."""
    name = cls.name
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_METHODS[name].__qualname__}")
    _METHODS[name] = cls
    return cls


def _ensure_loaded() -> None:
    # importing the package registers every built-in method
    importlib.import_module("mmcompress.methods")


def names() -> list[str]:
    """Registered method names, sorted."""
    _ensure_loaded()
    return sorted(_METHODS)


def get(name: str) -> type[MethodConfig]:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def create(name: str, **kwargs) -> MethodConfig:
    """Build and validate the config of method ``name``."""
    return get(name)(**kwargs)


def create_with_budget(name: str, budget, **kwargs) -> MethodConfig:
    """Like :func:`create`, with ``budget`` put in the method's budget field (``keep`` for most methods,
    ``retention`` for GlobalCom²), so one ``--keep`` list drives every method of a comparison.

    ``budget=None`` uses the method's default; a budget for a method without one (a KV-cache method)
    raises.
    """
    cls = get(name)
    if budget is None:
        return cls(**kwargs)
    if cls.budget_field is None:
        raise ValueError(f"method {name!r} takes no token budget (keep={budget!r}); leave keep unset")
    return cls(**{cls.budget_field: budget}, **kwargs)
