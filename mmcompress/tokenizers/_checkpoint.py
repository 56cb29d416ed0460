"""Reading official tokenizer checkpoints and loading them through a key map, with errors naming keys.

Used by :mod:`.seed` and :mod:`.lavit`. Files are read with ``torch.load(weights_only=True)`` (tensors only,
no code execution) or safetensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["LoadReport", "read_state_dict", "load_mapped_state", "tower_output", "check_images"]


class LoadReport(NamedTuple):
    """What :func:`load_mapped_state` did. Keys are the checkpoint's (official) names.

    loaded: keys copied into the module; ignored: keys of parts the module deliberately does not hold (the
    vision tower, text-side heads, ...); unexpected: unknown keys skipped because ``strict=False``.
    """

    loaded: list[str]
    ignored: list[str]
    unexpected: list[str]


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A state dict from a mapping, a ``.safetensors`` file or a torch pickle (``.pt`` / ``.pth`` / ``.bin``).

    A pickle holding ``{"model": state}`` or ``{"state_dict": state}`` (LAVIS / trainer checkpoints) is
    unwrapped.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
                state = inner
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} checkpoint: expected a state dict, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what} checkpoint: entries {bad[:5]} are not tensors")
    return dict(state)


def load_mapped_state(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    to_ours: Callable[[str], str | None],
    to_official: Callable[[str], str],
    what: str,
    *,
    strict: bool = True,
    prefix: str = "",
    skip: Callable[[str], bool] | None = None,
) -> LoadReport:
    """Load an official-layout ``state`` into ``module`` through a key map.

    Args:
        to_ours: official key -> module key (without ``prefix``), or None for a key to ignore.
        to_official: module key -> official key (for error messages).
        prefix: module sub-tree the state belongs to (e.g. ``"decoder."``).
        skip: module keys under ``prefix`` this state need not provide (loaded if present).
        strict: unknown keys raise (default); with False they are skipped and reported.

    Every module key under ``prefix`` (except ``skip``) must be provided with exactly its shape: a wrong
    shape raises ``ValueError`` naming the checkpoint key, the found and the expected shape; missing keys
    raise listing them. Tensors are cast to the module's dtype and device.
    """
    own = {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    required = [k for k in own if skip is None or not skip(k)]
    mapped: dict[str, torch.Tensor] = {}
    loaded, ignored, unexpected = [], [], []
    for key, value in state.items():
        ours = to_ours(key)
        if ours is None:
            ignored.append(key)
            continue
        if ours not in own:
            unexpected.append(key)
            continue
        want = tuple(own[ours].shape)
        if tuple(value.shape) != want:
            raise ValueError(
                f"{what} checkpoint: key {key!r} has shape {tuple(value.shape)}, expected {want}"
                + (f" (module key {prefix + ours!r})" if prefix + ours != key else "")
            )
        mapped[ours] = value
        loaded.append(key)
    missing = sorted(to_official(k) for k in required if k not in mapped)
    if missing:
        raise ValueError(
            f"{what} checkpoint: missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    if unexpected and strict:
        raise ValueError(
            f"{what} checkpoint: unexpected keys {sorted(unexpected)[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}; pass strict=False to skip them"
        )
    module.load_state_dict(
        {prefix + k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in mapped.items()}, strict=False
    )
    return LoadReport(sorted(loaded), sorted(ignored), sorted(unexpected))


def tower_output(out: Any) -> torch.Tensor:
    """The feature tensor of a vision tower's output: a tensor, ``.last_hidden_state`` or element 0."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"vision tower returned {type(out).__name__}; expected a tensor [B, N, C]")


def check_images(images: Any, image_size: int, in_channels: int, what: str) -> torch.Tensor:
    """``images`` must be a float tensor ``[B, in_channels, image_size, image_size]``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what}: images must be a float tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{what}: images must be [B, {in_channels}, {image_size}, {image_size}], got shape "
            f"{tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{what}: images must be normalised float pixel values, got dtype {images.dtype}")
    _, c, h, w = images.shape
    if c != in_channels:
        raise ValueError(f"{what}: images have {c} channels; allowed: {in_channels} (in_channels)")
    if (h, w) != (image_size, image_size):
        raise ValueError(
            f"{what}: images are {h}x{w} pixels; allowed: {image_size}x{image_size} (image_size); "
            "resize first"
        )
    return images
