"""Pieces shared by the speed benchmarks (``bench kernels``, ``bench e2e``, ``bench_inllm``).

* :func:`machine`: where and with what a figure was taken (DESIGN §7: a timing without its device is
  meaningless);
* :func:`time_call`: median / min wall-clock of a callable, CUDA-synchronised;
* :func:`write_json_atomic`: results are rewritten whole (temp file + ``os.replace``), so an interrupted
  run never leaves half a JSON file;
* :class:`ForwardClock` / :class:`DecoderClock`: forward hooks timing a module's forwards. On CUDA they
  synchronise around the forward, so the time is the work and not the kernel launches.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "cpu_name",
    "machine",
    "sync",
    "time_call",
    "write_json_atomic",
    "ForwardClock",
    "DecoderClock",
]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median and min wall-clock in ms over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "repeats": repeats}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Where and with what the figures were taken: device, threads, library versions, date (UTC)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except Exception:
        transformers_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class ForwardClock:
    """Wall time (ms) of every forward of ``module``, appended to :attr:`ms`; :meth:`remove` unhooks."""

    def __init__(self, module: nn.Module) -> None:
        self.ms: list[float] = []
        self.device = _module_device(module)
        self._t0 = 0.0
        self.hooks = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        sync(self.device)
        self.record((time.perf_counter() - self._t0) * 1e3, kwargs, output)

    def record(self, ms: float, kwargs: dict, output: Any) -> None:
        self.ms.append(ms)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class DecoderClock(ForwardClock):
    """Hooks on the LLM decoder (``model.get_decoder()``): the wall time of each prefill forward (more than
    one query token) in :attr:`prefill_ms`, the KV bytes right after it in :attr:`prefill_kv_bytes`, and the
    last cache object the decoder was given in :attr:`cache`."""

    def __init__(self, model: nn.Module) -> None:
        self.prefill_ms: list[float] = []
        self.prefill_kv_bytes: list[int] = []
        self.cache: Any = None
        super().__init__(model.get_decoder())

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.cache = kwargs.get("past_key_values")
        super()._pre(module, args, kwargs)

    def record(self, ms: float, kwargs: dict, output: Any) -> None:
        if output.last_hidden_state.shape[1] > 1:
            from mmcompress.report import cache_bytes

            self.prefill_ms.append(ms)
            self.prefill_kv_bytes.append(cache_bytes(getattr(output, "past_key_values", None) or self.cache))
