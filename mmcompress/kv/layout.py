"""Validation of the mixed-precision cache layout (light: no transformers import)."""

from __future__ import annotations

from typing import Any

from ..kernels.kvquant import check_bits

__all__ = ["check_layout", "resolve_value_group", "check_int_min"]

_MAX_DEFAULT_VALUE_GROUP = 32


def check_int_min(value: Any, field: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"{field}={value} is out of range; allowed: >= {lo}")
    return value


def check_layout(
    high_bits: int, low_bits: int, residual: int, group_size: int, value_group_size: int | None
) -> None:
    """Validate the cache's quantization settings (ValueError/TypeError naming field and value)."""
    check_bits(high_bits, "high_bits")
    check_bits(low_bits, "low_bits")
    if high_bits < low_bits:
        raise ValueError(
            f"high_bits={high_bits} < low_bits={low_bits}: important tokens may not get fewer bits; "
            f"allowed: high_bits >= low_bits"
        )
    check_int_min(residual, "residual", 0)
    per = 8 // low_bits  # the finest packing in use (codes per byte)
    check_int_min(group_size, "group_size", 1)
    if group_size % per:
        raise ValueError(
            f"group_size={group_size} must be a multiple of {per}: keys pack {per} {low_bits}-bit codes per "
            f"byte along the token axis"
        )
    if value_group_size is not None:
        check_int_min(value_group_size, "value_group_size", 1)
        if value_group_size % per:
            raise ValueError(
                f"value_group_size={value_group_size} must be a multiple of {per} "
                f"({low_bits}-bit codes, {per} per byte)"
            )


def resolve_value_group(value_group_size: int | None, head_dim: int, low_bits: int) -> int:
    """Channels per value group for ``head_dim``: the given size (must divide it), or by default 32 when
    it divides ``head_dim`` and else the whole head (one group per token and head)."""
    if value_group_size is None:
        return _MAX_DEFAULT_VALUE_GROUP if head_dim % _MAX_DEFAULT_VALUE_GROUP == 0 else head_dim
    if head_dim % value_group_size:
        raise ValueError(
            f"value_group_size={value_group_size} does not divide the head dimension {head_dim}; "
            f"allowed: a divisor of {head_dim} that is a multiple of {8 // low_bits}"
        )
    return value_group_size
