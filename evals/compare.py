"""``mmcompress compare``: the uncompressed baseline and every method × budget on ShapesVQA.

For each configuration the same N test samples run through the real ``generate()`` of the same model
instance (the baseline first, re-run in this very run as DESIGN §7 asks). A row reports accuracy,
accuracy retained vs the baseline, mean visual tokens per image, mean time to first token and mean
KV-cache bytes per sample, plus accuracy per question family.

Results are written atomically after every configuration and the run is resumable: rows already in
the output file for the same model / n / seed / batch size are kept and not recomputed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

import mmcompress as mmc
from mmcompress import registry, zoo

from .bench_common import cpu_name
from .harness import timed_generate
from .shapesvqa import FAMILIES, Sample, ShapesVQA, score

__all__ = ["eval_samples", "evaluate_config", "run_compare", "format_table"]

#: image sizes of the test images per embedded model (the AnyRes model sees two aspect ratios)
_EVAL_SIZES: dict[str, tuple] = {"shapes-llava": (336,), "shapes-llava-next": ((448, 224), (224, 448))}


def eval_samples(model_name: str, n: int, seed: int) -> list[Sample]:
    """N ShapesVQA test samples for ``model_name`` (sizes cycle over the model's eval sizes)."""
    sizes = _EVAL_SIZES.get(str(model_name), (336,))
    sets = [ShapesVQA("test", n=n, seed=seed, image_size=s) for s in sizes]
    return [sets[i % len(sets)][i] for i in range(n)]


def _batches(samples: Sequence[Sample], size: int):
    for i in range(0, len(samples), size):
        yield samples[i : i + size]


def _encode(processor, samples: Sequence[Sample]) -> dict:
    processor.tokenizer.padding_side = "left"  # generation needs left padding
    prompts = [zoo.build_prompt(s.question) for s in samples]
    return processor(images=[s.image for s in samples], text=prompts, padding=True, return_tensors="pt")


def evaluate_config(
    model,
    processor,
    samples: Sequence[Sample],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 4,
    desc: str = "",
    progress: bool = True,
) -> dict:
    """Run every sample through ``generate()`` as the model is now (compressed or not)."""
    correct, per_family, tokens, ttft, kv = [], defaultdict(list), [], [], []
    for batch in tqdm(list(_batches(samples, batch_size)), desc=desc, disable=not progress, leave=False):
        inputs = _encode(processor, batch)
        g = timed_generate(model, inputs, max_new_tokens=max_new_tokens)
        texts = processor.tokenizer.batch_decode(g.new_tokens, skip_special_tokens=True)
        for s, t in zip(batch, texts):
            ok = score(zoo.answer_from_text(t), s.answer)
            correct.append(ok)
            per_family[s.family].append(ok)
        rep = mmc.report(model)
        if rep is not None and rep.images:
            tokens.extend(rep.tokens_out)
        else:  # uncompressed: every placeholder is a visual token
            ph = (inputs["input_ids"] == model.config.image_token_id).sum(1)
            tokens.extend(ph.tolist())
        ttft.append(g.ttft_ms)
        kv.append(g.kv_bytes / len(batch))
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {
        "accuracy": mean(correct),
        "visual_tokens": mean(tokens),
        "ttft_ms": mean(ttft),
        "kv_bytes": mean(kv),
        "per_family": {f: mean(per_family[f]) for f in FAMILIES if per_family[f]},
    }


def machine_info(model) -> dict:
    """Where a row was measured (DESIGN §7: timings are meaningless without the device)."""
    param = next(model.parameters())
    dev = param.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return {
        "device": f"{dev.type}: {name}",
        "threads": torch.get_num_threads(),
        "dtype": str(param.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def _not_applicable(model, method: str) -> str | None:
    """Why ``method`` cannot run on ``model`` (``compress`` refuses it before patching), or None."""
    try:
        mmc.compress(model, registry.create_from_spec(method, None))
    except (ValueError, TypeError) as e:
        return str(e)
    mmc.restore(model)
    return None


def _write_atomic(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _row_key(row: dict) -> tuple:
    return (row["method"], row["keep"])


def run_compare(
    model_name: str,
    methods: Sequence[str],
    keeps: Sequence[int | float],
    *,
    n: int = 100,
    seed: int = 0,
    batch_size: int = 1,
    json_out: str | Path | None = None,
    progress: bool = True,
    max_new_tokens: int = 4,
) -> list[dict]:
    """The baseline plus every ``method`` at every ``keep``; returns the rows (and writes them to JSON).

    ``methods`` may include ``"none"`` (the baseline); it is always run first whether listed or not.
    A method may carry options (:func:`mmcompress.registry.parse_spec`), e.g.
    ``fopru:significance=received``; its rows are labelled with that spec.
    """
    # a method without a token budget (a KV-cache method) runs once, at its defaults
    budgets = {
        m: (keeps if registry.get(registry.parse_spec(m)[0]).budget_field else [None])
        for m in methods
        if m != "none"
    }
    for m, ks in budgets.items():  # unknown names, options and bad budgets fail before any model is loaded
        for k in ks:
            registry.create_from_spec(m, k)
    torch.manual_seed(seed)
    model, processor = zoo.load(model_name)
    samples = eval_samples(model_name, n, seed)
    machine = machine_info(model)
    # the weights' id too: rows measured on earlier weights of the same name are never reused
    settings = {
        "model": str(model_name),
        "weights": zoo.weights_fingerprint(model_name),
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
    }
    done: dict[tuple, dict] = {}
    old_rows: list[dict] = []
    if json_out is not None and Path(json_out).exists():
        old = json.loads(Path(json_out).read_text())
        old_rows = old if isinstance(old, list) else old.get("rows", [])
        done = {_row_key(r): r for r in old_rows if all(r.get(k) == v for k, v in settings.items())}
    plan: list[tuple[str, int | float | None]] = [("none", None)]
    for m, ks in budgets.items():
        reason = _not_applicable(model, m)
        if reason:  # e.g. an AnyRes-only method on a single-view model: say so, never fail the run
            print(f"skipping {m} on {model_name}: {reason}", flush=True)
            continue
        plan += [(m, k) for k in ks]
    rows: list[dict] = []

    def write() -> None:
        # Rows of the same file that this run does not plan (other methods, other settings) stay where
        # they were: a second run with another method list adds rows, it never drops earlier ones.
        if json_out is None:
            return
        fresh = {_row_key(r): r for r in rows}
        merged = [
            fresh.pop(_row_key(r)) if _row_key(r) in fresh and (r in reusable or superseded(r)) else r
            for r in old_rows
        ]
        _write_atomic(Path(json_out), merged + list(fresh.values()))

    reusable = list(done.values())

    def superseded(row: dict) -> bool:
        # the same run on earlier weights of this model (or rows from before weights were recorded):
        # stale, so a fresh row takes its place instead of standing beside it
        return row.get("weights") != settings["weights"] and all(
            row.get(k) == v for k, v in settings.items() if k != "weights"
        )

    for method, keep in tqdm(plan, desc=f"compare {model_name}", disable=not progress):
        key = (method, keep)
        if key in done:
            rows.append(done[key])
            continue
        if method == "none":
            mmc.restore(model)
        else:
            mmc.compress(model, registry.create_from_spec(method, keep))
        res = evaluate_config(
            model,
            processor,
            samples,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            desc=f"{method} {keep if keep is not None else ''}".strip(),
            progress=progress,
        )
        mmc.restore(model)
        base = rows[0]["accuracy"] if rows else res["accuracy"]
        row = {
            "method": method,
            "keep": keep,
            "visual_tokens": res["visual_tokens"],
            "accuracy": res["accuracy"],
            "retained": res["accuracy"] / base if base else float("nan"),
            "ttft_ms": res["ttft_ms"],
            "kv_bytes": res["kv_bytes"],
            "per_family": res["per_family"],
            **settings,
            "machine": machine,
        }
        rows.append(row)
        write()
    write()
    return rows


def format_table(rows: Sequence[dict]) -> str:
    cols = ("method", "keep", "vis.tok", "acc", "retained", "TTFT ms", "KV bytes")
    widths = (-10, 6, 8, 7, 9, 9, 11)
    head = " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cols, widths))
    lines = [head, "-" * len(head)]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(
            f"{r['method']:<10} {keep:>6} {r['visual_tokens']:>8.1f} {r['accuracy']:>7.3f} "
            f"{r['retained']:>9.3f} {r['ttft_ms']:>9.1f} {r['kv_bytes']:>11.0f}"
        )
    return "\n".join(lines)
