"""``mmcompress bench kernels``: wall-clock of each kernel vs its torch reference vs the official-style code.

Issue 5's speed half (a script, not a timed test). For every N in ``--sizes`` (default the issue's
576 / 2880 / 8192 / 32768 candidates) and K = round(N / 9) (11 %, LLaVA-NeXT's 2880 -> 320):

* ``divprune``: greedy max-min selection on a given fp16 cosine-distance matrix (the part the kernel
  replaces; the GEMM that builds the matrix is the same cuBLAS call for all and is timed on its own as
  ``gemm_dist``):
  ``official_loop`` (spec §1.3: per pick, gather all t picked rows and re-take their minimum, ~5 launches,
  Σt·N reads), ``torch_running_min`` (:func:`~mmcompress.kernels.maxmin.greedy_maxmin_torch`, one row per
  pick), ``triton_matrix`` (one launch per image), and ``triton_cosine`` (distances on the fly from
  ``[N, dim]`` features, distance computation included);
* ``topk``: ``[8, N]`` fp16 scores: ``torch.topk`` (unspecified tie order), the reference
  (:func:`~mmcompress.kernels.topk.topk_torch`, two stable sorts) and the Triton kernel;
* ``merge``: one ToMe / AIM bipartite step removing N / 2 of N tokens of width ``dim`` (the first AIM
  step): the torch reference (:func:`~mmcompress.kernels.merge.aim_merge_step_torch`, which is the
  official algorithm) and the Triton kernels;
* ``kvquant``: group-wise KV quantize and dequantize of a ``[1, 32, T, 128]`` fp16 cache (T = N rounded
  down to a multiple of the group, 32 tokens / channels), 4 and 2 bits, keys per channel and values per
  token as the mixed-precision cache stores them: the torch reference and the Triton kernels, with the
  bytes each moves and the achieved GB/s against the device's measured copy bandwidth (and its nominal
  peak where known), so that the issue's "KV quantize at >= 50 % of memory bandwidth" can be judged;
  plus decode attention over that cache (4-bit K / 2-bit V): dequantize-then-SDPA against the fused
  dequantize-and-attend kernel (the issue keeps the fused path only if it measures faster).

Triton rows run only on CUDA: interpreter timings say nothing about speed and are never reported. Rows
whose work or memory would be unreasonable on the device are recorded as skipped, with the reason. The JSON
holds the device, the library versions, the date and every row (median and min over ``--repeats``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import torch

from .bench_common import machine, write_json_atomic
from .bench_common import time_call as _time

__all__ = ["run_bench", "format_rows", "add_arguments", "official_divprune_loop"]

SIZES = (576, 2880, 8192, 32768)
KERNELS = ("divprune", "topk", "merge", "kvquant")
#: nominal DRAM bandwidth (GB/s) by a substring of ``torch.cuda.get_device_name``, most specific first
_NOMINAL_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
)


def official_divprune_loop(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The official greedy loop as the spec describes it (§1.2 steps 3-4, §1.3): re-gathers every picked
    row at every step. Written here for timing only (same picks as ``exclude_picked=False``)."""
    s = torch.empty(k, dtype=torch.long, device=dist.device)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dist, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
    return s


def _limits(device: torch.device) -> dict:
    """What counts as unreasonable here: element reads of the official loop, bytes of one matrix, FLOPs of
    one GEMM (fp16 GEMMs are slow on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return {"loop_reads": 2e12, "bytes": free * 0.4, "flops": math.inf}
    return {"loop_reads": 3e9, "bytes": 2e9, "flops": 2e10}


def bandwidth(device: torch.device, mib: int | None = None) -> dict:
    """Reference bandwidths for the kvquant rows: a measured device copy (``clone`` of ``mib`` MiB, default
    256 on a GPU and 32 on CPU: bytes read + written, best of 5) and, on a GPU in :data:`_NOMINAL_GBPS`,
    the nominal peak."""
    mib = mib or (256 if device.type == "cuda" else 32)
    x = torch.empty(mib << 18, dtype=torch.float32, device=device)  # mib MiB
    t = _time(lambda: x.clone(), device, 5)
    out = {"copy_gbps": 2 * x.numel() * 4 / (t["ms_min"] * 1e6), "copy_mib": mib}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["nominal_gbps"] = next((v for key, v in _NOMINAL_GBPS if key in name), None)
    return out


def _bench_kvquant(
    n: int, device: torch.device, repeats: int, use_triton: bool, bw: dict | None = None
) -> list[dict]:
    from mmcompress.kernels.kvquant import (
        dequantize_torch,
        dequantize_triton,
        quantize_torch,
        quantize_triton,
    )

    heads, dim, group = 32, 128, 32
    tokens = max(group, n // group * group)
    numel = heads * tokens * dim
    base = {"kernel": "kvquant", "N": n, "tokens": tokens, "heads": heads, "dim": dim, "group": group}
    base["dtype"] = "float16"
    if numel * 4 * 6 > _limits(device)["bytes"]:  # the reference holds ~6 fp32 temporaries
        return [dict(base, impl="all", skipped=f"{numel:.1e} elements: the reference's fp32 temporaries")]
    x = torch.randn(1, heads, tokens, dim, generator=torch.Generator().manual_seed(n))
    x = x.to(device, torch.float16)
    rows = []
    for bits in (4, 2):
        for name, axis in (("K", 2), ("V", 3)):  # keys per channel (groups of tokens), values per token
            groups = numel // group
            quant_bytes = numel * 2 + numel * bits // 8 + 2 * 2 * groups  # read fp16, write codes + pairs
            deq_bytes = numel * bits // 8 + 2 * 2 * groups + numel * 2
            common = dict(base, bits=bits, layout="per_channel" if axis == 2 else "per_token")
            q = quantize_torch(x, bits, group, axis)
            impls = [
                ("torch", "quant", lambda b=bits, a=axis: quantize_torch(x, b, group, a), quant_bytes),
                ("torch", "dequant", lambda q=q: dequantize_torch(q), deq_bytes),
            ]
            if use_triton:
                got = quantize_triton(x, bits, group, axis)
                assert torch.equal(got.packed, q.packed) and torch.equal(got.scale, q.scale), "triton differs"
                impls += [
                    ("triton", "quant", lambda b=bits, a=axis: quantize_triton(x, b, group, a), quant_bytes),
                    ("triton", "dequant", lambda q=q: dequantize_triton(q), deq_bytes),
                ]
            for backend, op, fn, nbytes in impls:
                row = dict(common, impl=f"{backend} {op} {name}", bytes=nbytes, **_time(fn, device, repeats))
                row["gbps"] = nbytes / (row["ms_min"] * 1e6)
                for key in ("copy_gbps", "nominal_gbps"):
                    if bw and bw.get(key):
                        row[f"frac_{key.removesuffix('_gbps')}"] = row["gbps"] / bw[key]
                rows.append(row)
    rows += _bench_decode(x, group, device, repeats, use_triton, bw, base)
    return rows


def _bench_decode(
    x: torch.Tensor,
    group: int,
    device: torch.device,
    repeats: int,
    use_triton: bool,
    bw: dict | None,
    base: dict,
) -> list[dict]:
    """Decode attention (one query per head) over the cache ``x`` quantized 4-bit K / 2-bit V (ZipVL's mix):
    dequantize-then-SDPA (torch, and with the Triton dequantize) against the fused kernel. ``bytes`` is the
    quantized cache, the least any of them must read, so GB/s is an effective figure."""
    from mmcompress.kernels.kvquant import (
        decode_attention_torch,
        decode_attention_triton,
        dequantize_triton,
        quantize_torch,
    )

    k, v = quantize_torch(x, 4, group, 2), quantize_torch(x, 2, group, 3)
    q = x[:, :, -1].contiguous()  # [1, heads, dim]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls = [("torch attend", lambda: decode_attention_torch(q, k, v))]
    if use_triton:

        def deq_sdpa() -> torch.Tensor:
            kd, vd = dequantize_triton(k), dequantize_triton(v)
            return sdpa(q[:, :, None], kd, vd)[:, :, 0]

        err = (decode_attention_triton(q, k, v).float() - deq_sdpa().float()).abs().max().item()
        assert err < 5e-3, f"fused decode attention differs from dequantize-then-SDPA by {err}"
        impls += [("triton deq+sdpa", deq_sdpa), ("triton fused", lambda: decode_attention_triton(q, k, v))]
    rows = []
    nbytes = k.nbytes + v.nbytes
    for impl, fn in impls:
        row = dict(base, bits="4/2", layout="decode", impl=impl, bytes=nbytes, **_time(fn, device, repeats))
        row["gbps"] = nbytes / (row["ms_min"] * 1e6)
        if bw and bw.get("copy_gbps"):
            row["frac_copy"] = row["gbps"] / bw["copy_gbps"]
        rows.append(row)
    return rows


def _bench_divprune(
    n: int, k: int, dim: int, device: torch.device, repeats: int, use_triton: bool
) -> list[dict]:
    from mmcompress.kernels.maxmin import (
        greedy_maxmin_cosine_triton,
        greedy_maxmin_torch,
        greedy_maxmin_triton,
    )
    from mmcompress.methods.divprune import cosine_distance

    rows: list[dict] = []
    lim = _limits(device)
    base = {"kernel": "divprune", "N": n, "K": k, "dtype": "float16", "dim": dim}
    if n * n * 2 > lim["bytes"]:
        return [
            dict(
                base,
                impl="all",
                skipped=f"the {n}x{n} fp16 matrix ({n * n * 2 / 2**30:.1f} GiB) is too big here",
            )
        ]
    g = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, dim, generator=g).to(device=device, dtype=torch.float16)
    if 2 * n * n * dim > lim["flops"]:
        rows.append(dict(base, impl="gemm_dist", skipped=f"{2 * n * n * dim:.1e} FLOPs in fp16"))
    else:
        rows.append(dict(base, impl="gemm_dist", **_time(lambda: cosine_distance(x), device, repeats)))
    dist = cosine_distance(x.float()).half()  # the selection timings need a matrix, not its fp16 GEMM
    reads = k * k * n / 2
    if reads > lim["loop_reads"]:
        rows.append(dict(base, impl="official_loop", skipped=f"~{reads:.1e} element reads (K^2 N / 2)"))
    else:
        rows.append(
            dict(
                base, impl="official_loop", **_time(lambda: official_divprune_loop(dist, k), device, repeats)
            )
        )
    ref = lambda: greedy_maxmin_torch(dist, k, exclude_picked=False)  # noqa: E731
    rows.append(dict(base, impl="torch_running_min", **_time(ref, device, repeats)))
    if use_triton:
        tri = lambda: greedy_maxmin_triton(dist, k, exclude_picked=False)  # noqa: E731
        assert torch.equal(tri(), ref()), "triton and torch picks differ"
        rows.append(dict(base, impl="triton_matrix", **_time(tri, device, repeats)))
        cos = lambda: greedy_maxmin_cosine_triton(x, k, exclude_picked=True)  # noqa: E731
        rows.append(dict(base, impl="triton_cosine", **_time(cos, device, repeats)))
    return rows


def _bench_topk(n: int, k: int, device: torch.device, repeats: int, use_triton: bool) -> list[dict]:
    from mmcompress.kernels.topk import topk_torch, topk_triton

    rows_b = 8
    scores = torch.randn(rows_b, n, generator=torch.Generator().manual_seed(n)).to(device, torch.float16)
    base = {
        "kernel": "topk",
        "N": n,
        "K": k,
        "B": rows_b,
        "dtype": "float16",
        "bytes": rows_b * (2 * n + 10 * k),
    }
    rows = [
        dict(base, impl="torch.topk", **_time(lambda: torch.topk(scores, k), device, repeats)),
        dict(base, impl="torch_reference", **_time(lambda: topk_torch(scores, k), device, repeats)),
    ]
    if use_triton:
        assert torch.equal(topk_triton(scores, k)[1], topk_torch(scores, k)[1]), "triton and torch differ"
        for sorted_ in (True, False):
            fn = lambda s=sorted_: topk_triton(scores, k, sorted=s)  # noqa: E731
            rows.append(
                dict(base, impl=f"triton_{'sorted' if sorted_ else 'unsorted'}", **_time(fn, device, repeats))
            )
    return rows


def _bench_merge(n: int, dim: int, device: torch.device, repeats: int, use_triton: bool) -> list[dict]:
    from mmcompress.kernels.merge import aim_merge_step_torch
    from mmcompress.kernels.merge_triton import merge_step_triton

    r = n // 2
    base = {
        "kernel": "merge",
        "N": n,
        "r": r,
        "dim": dim,
        "dtype": "float16",
        "bytes": n * dim * 2 + (n - r) * dim * 2,
    }
    flops = 2 * (n // 2) ** 2 * dim
    if flops > _limits(device)["flops"]:
        return [dict(base, impl="all", skipped=f"{flops:.1e} FLOPs of fp16 scores")]
    x = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(n)).to(device, torch.float16)
    rows = [dict(base, impl="torch_reference", **_time(lambda: aim_merge_step_torch(x, r), device, repeats))]
    if use_triton:
        rows.append(dict(base, impl="triton", **_time(lambda: merge_step_triton(x, r), device, repeats)))
    return rows


def run_bench(
    sizes: tuple[int, ...] = SIZES,
    kernels: tuple[str, ...] = KERNELS,
    *,
    device: str | None = None,
    repeats: int = 5,
    dim: int = 1024,
    json_out: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every kernel in ``kernels`` at every N in ``sizes``; optionally write the JSON to ``json_out``."""
    for name in kernels:
        if name not in KERNELS:
            raise ValueError(f"bench kernels: unknown kernel {name!r}; choose from {KERNELS}")
    if not sizes or any(not isinstance(n, int) or n < 2 for n in sizes):
        raise ValueError(f"bench kernels: sizes={sizes!r} must be ints >= 2")
    if repeats < 1:
        raise ValueError(f"bench kernels: repeats={repeats} must be >= 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench kernels: --device cuda but no GPU is available")
    from mmcompress.kernels._dispatch import triton_available

    use_triton = dev.type == "cuda" and triton_available()
    out = {"machine": machine(dev), "repeats": repeats, "rows": []}
    bw = bandwidth(dev) if "kvquant" in kernels else None
    if bw is not None:
        out["bandwidth"] = bw
    if not use_triton:
        out["note"] = (
            "Triton rows need CUDA (interpreter timings are not speed); GPU figures are still to be taken"
            if dev.type != "cuda"
            else "Triton is not installed: torch rows only"
        )
    for n in sizes:
        k = max(1, round(n / 9))
        for name in kernels:
            if name == "divprune":
                rows = _bench_divprune(n, k, dim, dev, repeats, use_triton)
            elif name == "topk":
                rows = _bench_topk(n, k, dev, repeats, use_triton)
            elif name == "kvquant":
                rows = _bench_kvquant(n, dev, repeats, use_triton, bw)
            else:
                rows = _bench_merge(n, dim, dev, repeats, use_triton)
            for row in rows:
                log(format_rows([row], header=False))
            out["rows"].extend(rows)
    if json_out is not None:
        write_json_atomic(json_out, out)
    return out


def format_rows(rows: list[dict], header: bool = True) -> str:
    lines = (
        [f"{'kernel':9} {'impl':18} {'N':>6} {'K/r':>6} {'median ms':>10} {'min ms':>9}"] if header else []
    )
    for r in rows:
        kr = r.get("K", r.get("r", r.get("bits", "")))
        if "skipped" in r:
            lines.append(f"{r['kernel']:9} {r['impl']:18} {r['N']:>6} {kr:>6}   skipped: {r['skipped']}")
        else:
            t = f"{r['ms_median']:>10.3f} {r['ms_min']:>9.3f}"
            gbps = f" {r['gbps']:8.1f} GB/s" if "gbps" in r else ""
            lines.append(f"{r['kernel']:9} {r['impl']:18} {r['N']:>6} {kr:>6} {t}{gbps}")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd(args: argparse.Namespace) -> int:
    out = run_bench(
        args.sizes, args.kernels, device=args.device, repeats=args.repeats, dim=args.dim, json_out=args.json
    )
    if "note" in out:
        print(f"note: {out['note']}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bench kernels`` options (used by :mod:`mmcompress.cli`)."""
    p.add_argument("--sizes", type=_ints, default=SIZES, help="candidates N, comma-separated")
    p.add_argument("--kernels", type=_names, default=KERNELS, help=f"subset of {','.join(KERNELS)}")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dim", type=int, default=1024, help="feature width for the merge and the distance GEMM")
    p.add_argument(
        "--json", default=None, help="write the results here (e.g. evals/results/bench_kernels_cpu.json)"
    )
    p.set_defaults(func=_cmd)
    return p


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(prog="python -m mmcompress.evals.bench_kernels"))
    a = parser.parse_args()
    sys.exit(a.func(a))
