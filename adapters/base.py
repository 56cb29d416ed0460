"""Adapter base: how a model family is hooked, and the adapter registry (DESIGN §4).

An adapter answers, for one model family: how to get visual features and their layout; how to probe a
requested signal; how to apply a :class:`~mmcompress.tokens.Selection` to the model's inputs for both
``generate()`` and plain ``forward()``. Everything is instance-scoped: patches are instance attributes
shadowing class methods and forward hooks on the instance's modules, removed by :meth:`uninstall`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

if TYPE_CHECKING:
    from mmcompress.api import Handle

__all__ = ["Adapter", "register_adapter", "find_adapter", "adapters", "supported_families"]

_ADAPTERS: list[type[Adapter]] = []


class Adapter:
    """Base class. Subclasses set ``name`` / ``families`` and implement the hooks."""

    name: ClassVar[str] = ""
    #: human-readable families this adapter handles, e.g. "LLaVA-1.5 (LlavaForConditionalGeneration)"
    families: ClassVar[tuple[str, ...]] = ()
    #: layouts the adapter produces: "single" and/or "anyres"
    layouts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, handle: Handle) -> None:
        self.model = model
        self.handle = handle

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def layout_kind(self) -> str:
        """The layout kind of this particular model instance ("single" or "anyres")."""
        raise NotImplementedError

    def check(self) -> None:
        """Validate the handle's methods against this model before anything is patched."""

    def install(self) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        raise NotImplementedError


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def adapters() -> list[type[Adapter]]:
    from . import hf_llava, hf_qwen2vl, llava_original  # noqa: F401  (registers the built-in adapters)

    return list(_ADAPTERS)


def supported_families() -> list[str]:
    return [f for a in adapters() for f in a.families]


def find_adapter(model: nn.Module) -> type[Adapter]:
    """The adapter class for ``model``; raises ``TypeError`` naming the supported families."""
    for a in adapters():
        if a.supports(model):
            return a
    raise TypeError(
        f"mmcompress does not support {type(model).__name__}; supported model families: "
        f"{'; '.join(supported_families())}"
    )
