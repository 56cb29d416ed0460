"""Method registry: name -> config class. Unknown names raise and list the known ones."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import MethodConfig

__all__ = ["register", "get", "names", "create", "create_with_budget", "parse_spec", "create_from_spec"]

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


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:field=value:field=value"`` -> ``(name, options)``.

    The command-line form of a method with non-default options, e.g. ``fopru:significance=received``
    or ``hired:alpha=0.3:split=quadrants``. Values read as bool (``true``/``false``), ``none``, int,
    float, else string. The name must be registered; option names are checked by the config itself.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method spec {spec!r}: expected 'name' or 'name:field=value[:field=value...]'")
    name, *parts = spec.strip().split(":")
    options: dict = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or key.strip() in options:
            raise ValueError(
                f"method spec {spec!r}: option {part!r} must be field=value, each field once "
                f"(e.g. 'fopru:significance=received')"
            )
        options[key.strip()] = _parse_value(value.strip())
    get(name)  # unknown names fail here, listing the known ones
    return name, options


def create_from_spec(spec: str, budget=None) -> MethodConfig:
    """:func:`create_with_budget` for a :func:`parse_spec` string (options override the defaults)."""
    name, options = parse_spec(spec)
    fields = {f.name for f in dataclasses.fields(get(name))}  # ClassVars are not options
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ValueError(f"method spec {spec!r}: unknown option(s) {unknown}; {name} takes {sorted(fields)}")
    field = get(name).budget_field
    if budget is not None and field in options:
        raise ValueError(
            f"method spec {spec!r} sets {field}={options[field]!r} and a budget {budget!r} is given too; "
            f"set the budget in one place"
        )
    return create_with_budget(name, budget, **options)
