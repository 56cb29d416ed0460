"""In-LLM methods and KV-cache quantization on an embedded model: AIM, ZipVL, mixed KV, transformers' cache.

    python -m mmcompress.evals.bench_inllm --n 20                  # quick (minutes on a CPU)
    python -m mmcompress.evals.bench_inllm --n 500 --json evals/results/bench_inllm_shapes-llava.json

Rows (all on the same model instance, the uncompressed baseline first, DESIGN §7):

* ``aim``: default (the official schedule scaled to the depth) and two earlier cuts; ``aim_merge+aim``:
  the official pairing (merging 576 -> 144 before the LLM, then pruning);
* ``zipvl``: default (τ = 0.975, 4/2 bits) and τ = 0.9 / τ = 0.8 with one dense layer;
* ``mixed_kv``: 8/4 and 4/2 bits (text tokens high, image tokens low), and 4/2 with a 10% important set
  (text first, then evenly spaced image tokens up to 10% of the prompt; everything else 2-bit);
* ``hf_<backend>``: transformers' ``QuantizedCache`` (``fp8`` needs nothing; ``quanto`` / ``hqq`` rows are
  recorded as skipped when their package is missing) — the anchor.

Columns:

* ``accuracy`` / ``retained`` on ``n`` ShapesVQA test samples (``evaluate_config``, greedy, as ``compare``);
* ``ttft_ms`` (vision + method + prefill) and ``llm_prefill_ms`` (the decoder's prefill forward alone,
  timed by hooks on it), means per batch;
* ``llm_prefill_flops_rel``: analytic decoder-prefill FLOPs vs dense (projections, MLP, attention scores
  and values, plus the method's own scoring: AIM's PageRank logits, ZipVL's probe rows), from the
  per-layer token counts each method reports — CPU timings of a 4-layer LLM behind a 12-layer ViT are
  noise-dominated, the counts are not;
* on ``sqnr_n`` samples, teacher-forced on the baseline's ``sqnr_tokens`` greedy tokens (EOS suppressed, so
  every config decodes the same sequence): ``sqnr_db`` of the final-layer logits vs the baseline's
  (unquantized, unpruned cache), pooled over samples and steps; ``decode_tok_s`` (steps after the
  first token / their wall time); ``kv_bytes`` held at the end and ``kv_x_smaller_vs_fp16`` =
  the baseline cache's bytes in fp16 / the config's bytes with its full-precision tensors counted as
  fp16 (packed codes, scales and bookkeeping as held).

The JSON (``{"settings", "machine", "rows"}``) is rewritten atomically after every row. Timings depend
on the machine (recorded per run); compare them only within one file.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

import mmcompress as mmc
from mmcompress import zoo
from mmcompress.config import MethodConfig
from mmcompress.kv import MixedKV

from .bench_common import DecoderClock, write_json_atomic
from .compare import eval_samples, evaluate_config, machine_info
from .harness import timed_generate
from .shapesvqa import Sample

__all__ = ["Row", "default_rows", "run_bench", "main"]

HF_BACKENDS: tuple[str, ...] = ("fp8", "quanto", "hqq")


class Row:
    """One configuration: a name, the methods given to ``compress`` and optional extra generate options."""

    def __init__(
        self,
        name: str,
        methods: Sequence[MethodConfig] = (),
        *,
        hf_backend: str | None = None,
        important_fraction: float | None = None,
    ) -> None:
        self.name = name
        self.methods = list(methods)
        self.hf_backend = hf_backend
        self.important_fraction = important_fraction

    def describe(self) -> dict:
        return {
            "name": self.name,
            "methods": [m.to_dict() for m in self.methods],
            "hf_backend": self.hf_backend,
            "important_fraction": self.important_fraction,
        }


def default_rows(residual: int = 32) -> list[Row]:
    """The issue's grid (module docstring); ``residual`` = full-precision window of the mixed-KV rows."""
    kv = dict(residual=residual, group_size=32)
    return [
        Row("none"),
        Row("aim", [mmc.AIM()]),
        Row("aim start=1", [mmc.AIM(start=1)]),
        Row("aim start=0", [mmc.AIM(start=0)]),
        Row("aim_merge+aim", [mmc.AIMMerge(keep=0.25), mmc.AIM()]),
        Row("zipvl", [mmc.ZipVL(**kv)]),
        Row("zipvl tau=0.9", [mmc.ZipVL(tau=0.9, **kv)]),
        Row("zipvl tau=0.8 dense=1", [mmc.ZipVL(tau=0.8, dense_layers=1, **kv)]),
        Row("mixed_kv 8/4", [MixedKV(high_bits=8, low_bits=4, **kv)]),
        Row("mixed_kv 4/2", [MixedKV(high_bits=4, low_bits=2, **kv)]),
        Row(
            "mixed_kv 4/2 +10%",
            [MixedKV(high_bits=4, low_bits=2, important="none", **kv)],
            important_fraction=0.1,
        ),
        *[Row(f"hf_{b}", hf_backend=b) for b in HF_BACKENDS],
    ]


# -- generate shadows for the rows that need extra generate() options ---------------------------------------


def important_set(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, fraction: float, visual: int):
    """``[B, L]`` bool: per row ``round(fraction * n)`` of its ``n`` real tokens — text first (the most recent
    if there are too many), then evenly spaced image tokens."""
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        real = am[b].bool()
        k = int(round(fraction * int(real.sum())))
        text = (real & (input_ids[b] != visual)).nonzero().flatten()
        img = (real & (input_ids[b] == visual)).nonzero().flatten()
        take = text[-k:] if k else text[:0]
        rest = k - take.numel()
        if rest > 0 and img.numel():
            pick = [int((i + 0.5) * img.numel() / rest) for i in range(min(rest, img.numel()))]
            take = torch.cat([take, img[pick]])
        out[b, take] = True
    return out


def _shadow_generate(model, extra: Callable[[dict], None]) -> None:
    orig = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        extra(kwargs)
        return orig(*args, **kwargs)

    model.generate = generate  # removed by restore (the cache patch deletes the instance attribute)


def _unshadow(model) -> None:
    model.__dict__.pop("generate", None)


def _install(model, row: Row) -> Any:
    """Compress ``model`` for ``row``; returns the handle (None for the baseline / transformers rows)."""
    mmc.restore(model)
    _unshadow(model)
    handle = mmc.compress(model, row.methods) if row.methods else None
    if row.important_fraction is not None:
        kv = handle.kv
        visual = int(model.config.image_token_id)

        def with_cache(kwargs: dict) -> None:
            cache = kv.make_cache(model)
            cache.set_important(
                important_set(
                    kwargs["input_ids"], kwargs.get("attention_mask"), row.important_fraction, visual
                )
            )
            kwargs["past_key_values"] = cache

        _shadow_generate(model, with_cache)
    if row.hf_backend is not None:
        from transformers.cache_utils import QuantizedCache

        QuantizedCache(backend=row.hf_backend, config=model.config)  # ImportError when the backend is missing

        def quantized(kwargs: dict) -> None:
            kwargs["cache_implementation"] = "quantized"
            kwargs["cache_config"] = {"backend": row.hf_backend}

        _shadow_generate(model, quantized)
    return handle


# -- measurements -------------------------------------------------------------------------------------------


class _Forced(LogitsProcessor):
    """Records the logits of every step, then forces the given token (teacher forcing through generate)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.logits: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = len(self.logits)
        self.logits.append(scores[0].float().clone())
        forced = torch.full_like(scores, float("-inf"))
        forced[:, int(self.tokens[step])] = 0.0
        return forced


def cache_bytes_fp16(cache: Any, model_dtype: torch.dtype) -> tuple[int, int]:
    """``(bytes held, bytes with full-precision tensors counted as fp16)`` for any transformers cache."""
    from mmcompress.kv import MixedPrecisionCache

    size = torch.tensor([], dtype=model_dtype).element_size()
    if isinstance(cache, MixedPrecisionCache):
        mem = cache.memory()
        held = sum(mem.values())
        return held, held - mem["full_precision"] + mem["full_precision"] * 2 // size
    held = fp16 = 0
    seen: set[int] = set()

    def visit(x: Any) -> None:
        nonlocal held, fp16
        if isinstance(x, torch.Tensor):
            if x.numel() == 0 or x.data_ptr() in seen:
                return
            seen.add(x.data_ptr())
            held += x.numel() * x.element_size()
            fp16 += x.numel() * (2 if x.dtype == model_dtype else x.element_size())
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    for layer in getattr(cache, "layers", []):
        for v in vars(layer).values():
            visit(v)
    return held, fp16


def _encode(processor, samples: Sequence[Sample]) -> dict:
    processor.tokenizer.padding_side = "left"
    prompts = [zoo.build_prompt(s.question) for s in samples]
    return processor(images=[s.image for s in samples], text=prompts, padding=True, return_tensors="pt")


def _to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _prefill_flops(model, stats: dict | None, method: MethodConfig | None, n0: int) -> tuple[float, float]:
    """Analytic decoder-prefill FLOPs ``(method, dense)`` for one ``n0``-token prompt (module docstring)."""
    cfg = model.get_decoder().config
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    dq, dkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def linear(n: float) -> float:  # q, k, v, o projections and the gated MLP
        return 2.0 * n * (d * (dq + 2 * dkv) + dq * d + 3 * d * f)

    def attn(nq: float, nk: float, causal: bool = True) -> float:  # scores + weighted values
        return 4.0 * nq * nk * dq * (0.5 if causal else 1.0)

    dense = layers * (linear(n0) + attn(n0, n0))
    if not stats or method is None:
        return dense, dense
    if method.name == "aim":
        toks = stats.get("layer_tokens", [n0] * layers)
        total = sum(linear(n) + attn(n, n) for n in toks)
        visual = stats.get("layer_visual", [])
        for i in range(layers - 1):  # PageRank layers: full fp32 logits + 5 power iterations
            if i + 1 < len(visual) and visual[i + 1] != visual[i] and all(v > 0 for v in visual[i + 1]):
                total += 2.0 * toks[i] * toks[i] * dq + 5 * 2.0 * cfg.num_attention_heads * toks[i] ** 2
        return total, dense
    if method.name == "zipvl":
        imp = [sum(r) / len(r) for r in stats.get("important", [])] or [n0] * layers
        probes = 0.0 + max(1, math.ceil(method.probe_recent * n0)) + math.ceil(method.probe_spread * n0)
        total = 0.0
        for i, p in enumerate(imp):
            total += linear(n0) + 2.0 * probes * n0 * dq  # probe logits
            if i < method.dense_layers or p >= n0:
                total += attn(n0, n0)
            elif method.rest == "zero":
                total += attn(p, p)
            else:
                total += attn(n0, p)
        return total, dense
    return dense, dense


def _measure(model, processor, row: Row, handle, samples, forced_samples, forced_tokens, args) -> dict:
    clock = DecoderClock(model)
    try:
        res = evaluate_config(
            model,
            processor,
            samples,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            desc=row.name,
            progress=args.progress,
        )
        prefill_ms = clock.prefill_ms[:]
        dtype = next(model.parameters()).dtype
        logits, held, fp16, decode_s, steps, flops, dense = [], [], [], 0.0, 0, [], []
        inllm = getattr(handle, "inllm", None)
        for s, toks in zip(forced_samples, forced_tokens):
            inputs = _to(_encode(processor, [s]), model.device)
            rec = _Forced(toks)
            clock.cache = None
            g = timed_generate(
                model,
                inputs,
                max_new_tokens=len(toks),
                min_new_tokens=len(toks),
                logits_processor=[rec],
            )
            logits.append(torch.stack(rec.logits))
            h, f16 = cache_bytes_fp16(clock.cache, dtype)
            held.append(h)
            fp16.append(f16)
            decode_s += (g.total_ms - g.ttft_ms) / 1e3
            steps += len(toks) - 1
            stats = handle.inllm_patch.stats if inllm is not None else None
            fl, dn = _prefill_flops(model, stats, inllm, int(inputs["input_ids"].shape[1]))
            flops.append(fl)
            dense.append(dn)
    finally:
        clock.remove()
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    row_out = {
        **row.describe(),
        "accuracy": res["accuracy"],
        "per_family": res["per_family"],
        "visual_tokens_in": res["visual_tokens"],
        "ttft_ms": res["ttft_ms"],
        "llm_prefill_ms": mean(prefill_ms),
        "llm_prefill_flops_rel": sum(flops) / sum(dense) if dense else float("nan"),
        "kv_bytes": mean(held),
        "kv_bytes_fp16_counted": mean(fp16),
        "decode_tok_s": steps / decode_s if decode_s > 0 else float("nan"),
        "_logits": logits,
    }
    if inllm is not None:
        row_out["in_llm_stats_last"] = handle.inllm_patch.stats
    return row_out


def _sqnr_db(logits: list[torch.Tensor], ref: list[torch.Tensor]) -> float | None:
    sig = noise = 0.0
    for x, r in zip(logits, ref):
        fin = torch.isfinite(r) & torch.isfinite(x)
        sig += float((r[fin].double() ** 2).sum())
        noise += float(((x[fin].double() - r[fin].double()) ** 2).sum())
    return None if noise == 0 else 10.0 * math.log10(sig / noise)


@torch.no_grad()
def run_bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model, processor = zoo.load(args.model)
    model = model.to(args.device)
    samples = eval_samples(args.model, args.n, args.seed)
    forced_samples = samples[: min(args.sqnr_n, len(samples))]
    rows = [r for r in default_rows(args.residual) if not args.only or r.name in args.only]
    if rows[0].name != "none":
        rows.insert(0, Row("none"))
    settings = {k: getattr(args, k) for k in ("model", "n", "seed", "batch_size", "max_new_tokens")}
    settings.update(sqnr_n=len(forced_samples), sqnr_tokens=args.sqnr_tokens, residual=args.residual)
    payload = {"settings": settings, "machine": machine_info(model), "rows": []}
    out_path = Path(args.json) if args.json else None

    # the baseline's own greedy continuation (EOS suppressed) is the teacher-forcing target for every row
    mmc.restore(model)
    forced_tokens = []
    for s in forced_samples:
        inputs = _to(_encode(processor, [s]), model.device)
        g = timed_generate(model, inputs, max_new_tokens=args.sqnr_tokens, min_new_tokens=args.sqnr_tokens)
        forced_tokens.append(g.new_tokens[0].cpu())
    ref_logits = base = base_fp16 = base_prefill = None
    for row in rows:
        t0 = time.perf_counter()
        try:
            handle = _install(model, row)
        except ImportError as e:
            payload["rows"].append({**row.describe(), "skipped": f"{type(e).__name__}: {e}"})
            print(f"{row.name:<24} skipped: {e}", flush=True)
            continue
        try:
            r = _measure(model, processor, row, handle, samples, forced_samples, forced_tokens, args)
        finally:
            mmc.restore(model)
            _unshadow(model)
        logits = r.pop("_logits")
        if ref_logits is None:  # the baseline row
            ref_logits, base = logits, r["accuracy"]
            base_fp16, base_prefill = r["kv_bytes_fp16_counted"], r["llm_prefill_ms"]
        r["retained"] = r["accuracy"] / base if base else float("nan")
        r["sqnr_db"] = _sqnr_db(logits, ref_logits)
        r["kv_x_smaller_vs_fp16"] = (
            base_fp16 / r["kv_bytes_fp16_counted"] if r["kv_bytes_fp16_counted"] else None
        )
        r["llm_prefill_ms_rel"] = r["llm_prefill_ms"] / base_prefill if base_prefill else None
        r["wall_s"] = time.perf_counter() - t0
        payload["rows"].append(r)
        sq = "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
        print(
            f"{row.name:<24} acc {r['accuracy']:.3f} ({r['retained']:.3f}) "
            f"KV x{r['kv_x_smaller_vs_fp16']:.2f} SQNR {sq} prefill FLOPs {r['llm_prefill_flops_rel']:.2f} "
            f"LLM prefill {r['llm_prefill_ms']:.1f} ms decode {r['decode_tok_s']:.1f} tok/s",
            flush=True,
        )
        if out_path is not None:
            write_json_atomic(out_path, payload)
    if out_path is not None:
        write_json_atomic(out_path, payload)
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmcompress.evals.bench_inllm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="shapes-llava", help="embedded name or local checkpoint folder")
    p.add_argument("--n", type=int, default=20, help="ShapesVQA test samples for accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--sqnr-n", type=int, default=20, help="samples for SQNR / decode speed / KV bytes")
    p.add_argument("--sqnr-tokens", type=int, default=8, help="teacher-forced decode steps per sample")
    p.add_argument("--residual", type=int, default=32, help="full-precision window of the quantized rows")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help="comma-separated row names (the baseline always runs)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--json", default=None, help="output path (default evals/results/bench_inllm_<model>.json)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.sqnr_n < 1 or args.sqnr_tokens < 2:
        raise SystemExit("error: --n and --sqnr-n must be >= 1 and --sqnr-tokens >= 2")
    if args.json is None:
        args.json = f"evals/results/bench_inllm_{Path(str(args.model)).name}.json"
    run_bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
