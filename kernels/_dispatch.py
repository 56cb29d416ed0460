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
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "BACKENDS",
    "TRITON_DTYPES",
    "triton_available",
    "triton_interpret",
    "resolve_backend",
    "triton_module",
    "check_float",
    "next_power_of_2",
]

#: float dtypes every Triton kernel here loads (computing in fp32, which is exact for comparisons of these)
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: accepted values of every ``backend=`` argument
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (cached; a failing import is not retried)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
    except Exception:  # a broken install (or one blocked via sys.modules) counts as "not available"
        return False
    return True


def triton_interpret() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``), which tests use to run kernels.

    Parsed like Triton's own knob (``1 / true / on / yes``, any case), read at call time.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_module(name: str) -> ModuleType:
    """Load the ``@triton.jit`` kernels of ``kernels/<name>.py`` on first use (cached per interpreter mode).

    The kernels live in their own modules, beside the launcher and reference in the public module, for
    three reasons: Triton resolves a kernel's helpers through the defining module's globals (the
    interpreter also requires ``triton.language`` there, so kernels cannot be defined inside a function);
    ``triton.jit`` decides at definition time whether a kernel is compiled or interpreted (it reads
    ``TRITON_INTERPRET`` then); and ``import mmcompress`` must not import Triton. Each setting gets its
    own module object, so a process that turns the interpreter on later (the tests) gets interpreted
    kernels rather than compiled ones it cannot run on CPU.
    """
    interpret = triton_interpret()
    key = (name, interpret)
    if key not in _TRITON_MODULES:
        path = Path(__file__).with_name(f"{name}.py")
        mod_name = f"{__package__}.{name}{'__interpreted' if interpret else ''}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a broken install
            raise ImportError(f"cannot load the Triton kernels {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[mod_name]
            raise
        _TRITON_MODULES[key] = mod
    return _TRITON_MODULES[key]


_TRITON_MODULES: dict[tuple[str, bool], ModuleType] = {}


def check_float(t: object, name: str, op: str, allowed: tuple[torch.dtype, ...] = TRITON_DTYPES) -> None:
    """Raise ``TypeError`` unless ``t`` is a tensor of one of the ``allowed`` dtypes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {names}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)`` (Triton block sizes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


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
