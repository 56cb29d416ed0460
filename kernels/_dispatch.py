"""Backend choice for the kernels in :mod:`mmcompress.kernels` (DESIGN §5).

Every op has a plain-torch reference (the oracle, and the path on CPU) and, on CUDA, a Triton kernel.
``backend="auto"`` picks Triton on CUDA when ``import triton`` works and the torch reference elsewhere;
``"torch"`` / ``"triton"`` force one. Triton is imported lazily, only here, so ``import mmcompress`` works
without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "triton_available", "triton_interpret", "resolve_backend"]

#: accepted values of every ``backend=`` argument
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (cached; a failing import is not retried)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. no matching CUDA libs) counts as "not available"
        return False
    return True


def triton_interpret() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), which tests use to run kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map a user's ``backend`` choice to the implementation that runs on ``device``.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        device: where the op's inputs live.

    Returns:
        ``"torch"`` or ``"triton"``. ``"auto"`` gives ``"triton"`` only on CUDA with Triton importable.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: ``"triton"`` was asked for explicitly but cannot run here (no Triton, or a non-CUDA
            device without ``TRITON_INTERPRET=1``).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {BACKENDS}")
    dev = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    # explicit "triton": fail loudly rather than silently measuring the reference
    if not triton_available():
        raise RuntimeError(
            "backend='triton' was requested but Triton is not installed "
            "(pip install 'mmcompress[triton]'); use backend='torch' or 'auto'"
        )
    if dev.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"backend='triton' needs a CUDA device (got {dev.type!r}); set TRITON_INTERPRET=1 "
            f"to run Triton kernels on CPU through the interpreter, or use backend='torch'"
        )
    return "triton"
