"""Shared pieces of the kernel tests: where the Triton kernels run, and an ahead-of-time compile check.

Why the Triton-path cases run in a child process (``test_kernels_*.py`` -> ``triton_*_cases.py``):

* Triton decides whether its own library functions (``tl.argmax``, ``tl.sort``, ``tl.cumsum``, ...) are
  compiled or interpreted once, when ``triton`` is first imported. In a full test session ``torch._dynamo``
  imports Triton during collection, before any fixture could set ``TRITON_INTERPRET=1``, and interpreted
  kernels calling compiled library functions fail ("Cannot call @triton.jit'd outside of the scope of a
  kernel").
* The Triton 3.9 interpreter leaves ``triton.language.core`` patched after a kernel calls a helper
  function, so nothing can be compiled in that process afterwards.

A child ``pytest`` started with ``TRITON_INTERPRET=1`` in its environment (when there is no GPU; on a GPU
it runs the compiled kernels on CUDA) avoids both and leaves the rest of the suite untouched. The compile
check runs in its own clean child too. Running a cases file directly also works:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton_topk_cases.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mmcompress.kernels._dispatch import triton_interpret

ROOT = Path(__file__).resolve().parent.parent


def kernel_device() -> str:
    """Device for the cases files: ``"cuda"`` with a GPU, else ``"cpu"``, which needs the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if not triton_interpret():
        raise RuntimeError(
            "no GPU: run the Triton cases with TRITON_INTERPRET=1 set before Triton is imported, e.g. "
            "through tests/test_kernels_*.py or `TRITON_INTERPRET=1 python -m pytest tests/triton_*_cases.py`"
        )
    return "cpu"


def run_cases(name: str) -> None:
    """Run ``tests/<name>`` in a child pytest (interpreter on when there is no GPU); fail with its output."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).parent / name)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{name} failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    )
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


_COMPILE = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mmcompress.kernels._dispatch import triton_module
mod = triton_module(sys.argv[1])
for kernel, sig, const, warps in json.loads(sys.argv[2]):
    const = {k: getattr(tl, v[3:]) if str(v).startswith("tl.") else v for k, v in const.items()}
    full = dict(sig, **{k: "constexpr" for k in const})
    out = triton.compile(ASTSource(getattr(mod, kernel), full, constexprs=const),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert out.asm["ptx"] and out.asm["cubin"], kernel
    print("compiled", kernel, const)
"""


def compile_for_sm90(module: str, specs: list[tuple[str, dict, dict, int]]) -> str:
    """Compile kernels of ``mmcompress.kernels.<module>`` to PTX + cubin for sm_90 in a clean child process
    (Triton's bundled ptxas; no GPU needed). ``specs``: ``(kernel, signature, constexprs, num_warps)``;
    a constexpr written ``"tl.float16"`` is that Triton dtype. Returns the child's output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: really compile, write nothing to $HOME
        env["TRITON_CACHE_DIR"] = cache
        cmd = [sys.executable, "-c", _COMPILE, module, json.dumps(specs)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"compiling {module} failed:\n{proc.stderr[-6000:]}"
    return proc.stdout
