"""``mmcompress eval``: one model on one benchmark, the baseline and every method x budget, resumable and
data-parallel.

    mmcompress eval --model shapes-llava --task shapesvqa --method divprune,pool --keep 64,0.25 --out DIR
    accelerate launch --multi_gpu --num_processes 2 -m mmcompress.evals --model ... --out DIR

Output (``DIR``):

- ``records/<model>/<task>/<config>.jsonl``: one JSON record per sample (prediction, target, visual
  tokens, time to first token, KV bytes); ``<config>`` is ``none`` for the baseline or
  ``<method>_keep<K>``. A sibling ``<config>.meta.json`` holds the settings the records were made with.
- ``summary.json``: one row per (model, task, config) found under ``records/``, with the task's metrics.
- ``accuracy_vs_tokens_<model>_<task>.png``: the headline score vs mean visual tokens, one line per method.
- ``submissions/...json``: VQAv2 answers in the EvalAI format when the split has no public answers.

Resuming: a record is appended (one ``write`` of one line, flushed and fsynced) only after its sample is
done, so an interrupted run leaves complete records plus at most one torn last line; a rerun drops the
torn line and skips every sample whose id is already recorded. Records never repeat and none is lost.

Data parallel: with ``WORLD_SIZE`` > 1 (``accelerate launch`` / ``torchrun``) every process loads the
model on its own device, takes every W-th of the pending samples and appends to its own
``<config>.part<rank>.jsonl``; after a barrier, process 0 merges the parts into ``<config>.jsonl`` in the
task's sample order (deduplicated by id) with an atomic rename, then removes the parts. The merged file
does not depend on the number of processes. On CPU, ``accelerate launch --cpu`` starts a single process
unless MPI is installed; ``--multi_gpu --num_processes N`` starts N torchrun processes, which use gloo
on CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .datasets import EvalSample, Task, get_task

__all__ = [
    "HFBackend",
    "Output",
    "add_eval_arguments",
    "build_prompt",
    "config_label",
    "main",
    "merge_records",
    "read_records",
    "run_eval",
    "summarize_dir",
]

PROMPT_STYLES = ("auto", "zoo", "chat", "llava")


# ----------------------------------------------------------------------------------------------------------
# Model side


@dataclass
class Output:
    """What one sample produced: the decoded continuation, the answer as scored, and the costs."""

    text: str
    pred: str
    visual_tokens: int
    ttft_ms: float
    total_ms: float
    kv_bytes: float


class Backend(Protocol):
    def set_method(self, method: str, keep: int | float | None) -> None: ...
    def answer(self, samples: Sequence[EvalSample], max_new_tokens: int) -> list[Output]: ...
    def machine(self) -> dict: ...


def build_prompt(processor: Any, text: str, style: str) -> str:
    """The model's input text for one image and ``text``.

    ``zoo``: the embedded models' training format; ``chat``: the processor's chat template with one
    image (falls back to ``llava`` without a template); ``llava``: LLaVA-1.5's
    ``"USER: <image>\\n{text} ASSISTANT:"``.
    """
    if style == "zoo":
        from mmcompress import zoo

        return zoo.build_prompt(text)
    if style == "chat" and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    if style in ("chat", "llava"):
        token = getattr(processor, "image_token", None) or "<image>"
        return f"USER: {token}\n{text} ASSISTANT:"
    raise ValueError(f"prompt_style={style!r} is unknown; allowed: {PROMPT_STYLES[1:]}")


def resolve_prompt_style(style: str, model_name: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={style!r} is unknown; allowed: {PROMPT_STYLES}")
    if style != "auto":
        return style
    from mmcompress import zoo

    return "zoo" if str(model_name) in zoo.EMBEDDED else "chat"


def make_method(method: str, keep: int | float | None = None, **fields: Any):
    """The config of ``method`` at budget ``keep`` (None: the method's default; ignored by methods without
    a budget) with extra config ``fields``; unknown fields raise ValueError listing the allowed ones."""
    import dataclasses

    from mmcompress import registry

    cls = registry.get(method)
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    bad = sorted(set(fields) - set(allowed))
    if bad:
        raise ValueError(f"{bad} are not fields of method {method!r}; allowed: {allowed}")
    if keep is None or cls.budget_field is None:
        return cls(**fields)
    return registry.create_with_budget(method, keep, **fields)


def _resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if getattr(device, "type", str(device)).startswith("cuda") else torch.float32
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is unknown; allowed: auto, {', '.join(allowed)}")
    return allowed[dtype]


class HFBackend:
    """A transformers VLM (embedded name, folder or hub id) answering with greedy ``generate()``."""

    def __init__(
        self,
        model_name: str,
        *,
        device: Any = None,
        dtype: str = "auto",
        prompt_style: str = "auto",
    ) -> None:
        import torch

        from mmcompress import zoo

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.processor = zoo.load(model_name, dtype=_resolve_dtype(dtype, self.device))
        self.model.to(self.device)
        self.style = resolve_prompt_style(prompt_style, model_name)
        self._method: str | None = None

    def set_method(self, method: str, keep: int | float | None, **fields: Any) -> None:
        """Compress the model with ``method`` from now on (``"none"``: the uncompressed model)."""
        import mmcompress as mmc

        mmc.restore(self.model)
        if method != "none":
            mmc.compress(self.model, make_method(method, keep, **fields))
        elif fields:
            raise ValueError(f"method options {sorted(fields)} given without a method")
        self._method = method

    def machine(self) -> dict:
        from .compare import machine_info

        return machine_info(self.model)

    def answer(self, samples: Sequence[EvalSample], max_new_tokens: int) -> list[Output]:
        import mmcompress as mmc
        from mmcompress import zoo

        from .harness import timed_generate

        proc = self.processor
        proc.tokenizer.padding_side = "left"  # generation needs left padding
        text = [s.question if self.style == "zoo" else s.prompt for s in samples]
        prompts = [build_prompt(proc, t, self.style) for t in text]
        inputs = proc(
            images=[s.load_image() for s in samples], text=prompts, padding=True, return_tensors="pt"
        )
        dtype = next(self.model.parameters()).dtype
        inputs = {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        g = timed_generate(self.model, inputs, max_new_tokens=max_new_tokens)
        texts = proc.tokenizer.batch_decode(g.new_tokens, skip_special_tokens=True)
        rep = mmc.report(self.model) if self._method not in (None, "none") else None
        if rep is not None and rep.images and len(rep.tokens_out) == len(samples):
            tokens = list(rep.tokens_out)
        else:  # uncompressed: every placeholder is a visual token
            tokens = (inputs["input_ids"] == self.model.config.image_token_id).sum(1).tolist()
        outs = []
        for t, n_tok in zip(texts, tokens):
            pred = zoo.answer_from_text(t) if self.style == "zoo" else t.strip()
            outs.append(
                Output(
                    text=t,
                    pred=pred,
                    visual_tokens=int(n_tok),
                    ttft_ms=g.ttft_ms,
                    total_ms=g.total_ms,
                    kv_bytes=g.kv_bytes / len(samples),
                )
            )
        return outs


# ----------------------------------------------------------------------------------------------------------
# Records on disk


def config_label(method: str, keep: int | float | None) -> str:
    """File stem of one configuration: ``none`` or ``<method>_keep<K>``."""
    if method == "none" or keep is None:
        return method
    return f"{method}_keep{keep:g}" if isinstance(keep, float) else f"{method}_keep{keep}"


def _tag(name: str) -> str:
    """A path-safe name for a model (embedded name, folder or hub id)."""
    p = Path(str(name))
    base = p.name if p.exists() else str(name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def read_records(path: Path) -> list[dict]:
    """The complete records of a JSONL file; a torn last line (no newline: the writer was killed
    mid-write) is ignored, a bad line elsewhere raises ValueError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not a valid JSON record ({e}); the file is corrupt") from None
    del torn
    return out


def _repair(path: Path) -> None:
    """Cut a torn last line off ``path`` before appending to it."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class _Appender:
    """Appends one record per line; each record is on disk (flushed, fsynced) before the next sample."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair(path)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _parts(main: Path) -> list[Path]:
    return sorted(main.parent.glob(main.stem + ".part*.jsonl"))


def merge_records(main: Path, order: dict[str, int] | None = None) -> list[dict]:
    """Merge ``<stem>.part*.jsonl`` into ``main``: deduplicated by id (first seen wins, main first, then
    parts by rank), sorted by ``order`` (sample id -> position; unknown ids last, by id), written
    atomically; then the parts are removed. Returns the merged records."""
    main = Path(main)
    parts = _parts(main)
    seen: dict[str, dict] = {}
    for p in [main, *parts]:
        for r in read_records(p):
            seen.setdefault(str(r["id"]), r)
    order = order or {}
    big = len(order)
    recs = sorted(seen.values(), key=lambda r: (order.get(str(r["id"]), big), str(r["id"])))
    tmp = main.with_name(main.name + ".merge.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main)
    for p in parts:  # after the rename: a crash in between leaves duplicates, which the next merge drops
        p.unlink()
    return recs


# ----------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: Any = None


def _dist() -> _Dist:
    """This process's place in a data-parallel launch (``WORLD_SIZE`` set by accelerate / torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return _Dist(state.process_index, state.num_processes, state.wait_for_everyone, state.device)


# ----------------------------------------------------------------------------------------------------------
# The run


def _settings(model: str, task: Task, method: str, keep, data, seed: int, max_new: int, style: str) -> dict:
    from mmcompress.zoo import weights_fingerprint

    cfg = None if method == "none" else make_method(method, keep).to_dict()
    return {
        "model": str(model),
        "weights": weights_fingerprint(model),  # records made with other weights are never mixed in
        "task": task.name,
        "method": method,
        "keep": keep if method != "none" else None,
        "method_config": cfg,
        "data": None if data is None else str(Path(data).resolve()),
        "seed": seed,
        "max_new_tokens": max_new,
        "prompt_style": style,
    }


def _check_meta(meta_path: Path, settings: dict) -> dict:
    """The config's meta (created if missing); refuses to mix records made with other settings."""
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        old = meta.get("settings", {})
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ValueError(
                f"{meta_path.parent} holds records made with {k}={a!r}, this run has {k}={b!r}; "
                "use another --out folder (or delete those records) to evaluate different settings"
            )
        return meta
    return {"settings": settings, "runs": []}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_eval(
    model: str,
    task: str,
    methods: Sequence[str],
    keeps: Sequence[int | float],
    out: str | Path,
    *,
    data: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    prompt_style: str = "auto",
    dtype: str = "auto",
    baseline: bool = True,
    progress: bool = True,
    backend: Backend | None = None,
) -> list[dict]:
    """Evaluate ``model`` on ``task`` for the baseline and every ``method`` x ``keep``; returns the summary
    rows of ``out`` (every configuration recorded there for any model and task).

    ``n`` takes the first n samples (all by default; 100 for ShapesVQA); raising it later extends the
    same records. ``backend`` replaces the transformers model (tests).
    """
    from mmcompress import registry

    from .compare import _write_atomic

    t = get_task(task)
    if isinstance(n, bool) or (n is not None and (not isinstance(n, int) or n < 1)):
        raise ValueError(f"n={n!r} is invalid; allowed: an int >= 1 or None (all samples)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an int >= 1")
    if t.needs_data and data is None:
        raise ValueError(f"task {t.name!r} needs --data (the folder of its official files)")
    style = resolve_prompt_style(prompt_style, model)
    max_new = max_new_tokens or t.max_new_tokens
    plan: list[tuple[str, int | float | None]] = [("none", None)] if baseline else []
    for m in methods:
        if m == "none":
            if not baseline:
                plan.append(("none", None))
            continue
        plan += [(m, None)] if registry.get(m).budget_field is None else [(m, k) for k in keeps]
    if not plan:
        raise ValueError("nothing to evaluate: give --method (and --keep) or keep the baseline")
    settings = {c: _settings(model, t, c[0], c[1], data, seed, max_new, style) for c in plan}  # validates

    if t.needs_data:
        samples = t.load(Path(data), **t.options)
    else:
        samples = t.load(None, n=n or 100, seed=seed, model_name=str(model), **t.options)
    if n is not None:
        samples = samples[:n]
    order = {s.id: i for i, s in enumerate(samples)}
    if len(order) != len(samples):
        raise ValueError(f"task {t.name!r}: sample ids are not unique")

    dist = _dist()
    if backend is None:
        backend = HFBackend(model, device=dist.device, dtype=dtype, prompt_style=style)
    folder = Path(out) / "records" / _tag(model) / t.name
    for method, keep in plan:
        label = config_label(method, keep)
        main = folder / f"{label}.jsonl"
        meta_path = folder / f"{label}.meta.json"
        meta = _check_meta(meta_path, settings[(method, keep)])
        done = {str(r["id"]) for p in [main, *_parts(main)] for r in read_records(p)}
        dist.barrier()  # everyone has read the files before anyone appends
        if dist.rank == 0:
            meta["runs"].append(
                {
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "world_size": dist.world,
                    "machine": backend.machine(),
                }
            )
            _write_atomic(meta_path, meta)
        pending = [s for s in samples if s.id not in done]
        mine = pending[dist.rank :: dist.world]
        if mine:
            backend.set_method(method, keep)
            sink = _Appender(main if dist.world == 1 else main.with_name(f"{label}.part{dist.rank}.jsonl"))
            try:
                bar = tqdm(total=len(mine), desc=f"{t.name} {label}", disable=not progress or dist.rank != 0)
                for batch in _batches(mine, batch_size):
                    for s, o in zip(batch, backend.answer(batch, max_new)):
                        sink.write(
                            {
                                "id": s.id,
                                "pred": o.pred,
                                "text": o.text,
                                "target": s.target,
                                "meta": s.meta,
                                "visual_tokens": o.visual_tokens,
                                "ttft_ms": o.ttft_ms,
                                "total_ms": o.total_ms,
                                "kv_bytes": o.kv_bytes,
                                "rank": dist.rank,
                            }
                        )
                    bar.update(len(batch))
                bar.close()
            finally:
                sink.close()
                backend.set_method("none", None)
        dist.barrier()
        if dist.rank == 0:
            merge_records(main, order)
        dist.barrier()
    rows: list[dict] = []
    if dist.rank == 0:
        rows = summarize_dir(out, progress=progress)
    dist.barrier()
    return rows


# ----------------------------------------------------------------------------------------------------------
# Summary and plot


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize_dir(out: str | Path, *, plot: bool = True, progress: bool = False) -> list[dict]:
    """Recompute ``summary.json`` (and the plots, submissions) from every record file under ``out``."""
    from .compare import _write_atomic

    out = Path(out)
    rows = []
    for meta_path in sorted((out / "records").glob("*/*/*.meta.json")):
        meta = json.loads(meta_path.read_text())
        st = meta["settings"]
        recs = read_records(meta_path.with_name(meta_path.name.removesuffix(".meta.json") + ".jsonl"))
        if not recs:
            continue
        t = get_task(st["task"])
        metrics = t.summarize(recs)
        run = meta["runs"][-1] if meta.get("runs") else {}
        rows.append(
            {
                "model": st["model"],
                "task": st["task"],
                "method": st["method"],
                "keep": st["keep"],
                "n": len(recs),
                "visual_tokens": _mean([r["visual_tokens"] for r in recs]),
                "score": metrics["score"],
                "metric": t.metric,
                "metrics": metrics,
                "ttft_ms": _mean([r["ttft_ms"] for r in recs]),
                "kv_bytes": _mean([r["kv_bytes"] for r in recs]),
                "world_size": run.get("world_size"),
                "machine": run.get("machine"),
                "method_config": st["method_config"],
            }
        )
        if st["task"] == "vqav2" and any(r["target"] is None for r in recs):
            sub = out / "submissions" / meta_path.parent.relative_to(out / "records")
            _write_atomic(
                sub / (meta_path.name.removesuffix(".meta.json") + ".json"),
                [{"question_id": int(r["id"]), "answer": r["pred"]} for r in recs],
            )
    # the baseline first, then methods by name and budget (tokens before fractions)
    rows.sort(key=lambda r: (r["model"], r["task"], r["method"] != "none", r["method"], -r["visual_tokens"]))
    base = {(r["model"], r["task"]): r["score"] for r in rows if r["method"] == "none"}
    for r in rows:
        b = base.get((r["model"], r["task"]))
        r["retained"] = r["score"] / b if b and not math.isnan(b) else float("nan")
    _write_atomic(out / "summary.json", {"rows": rows})
    if plot:
        _plot(out, rows)
    return rows


def _plot(out: Path, rows: list[dict]) -> list[Path]:
    from .plot_compare import plot_rows

    written = []
    for model, task in sorted({(r["model"], r["task"]) for r in rows}):
        rs = [dict(r, accuracy=r["score"]) for r in rows if r["model"] == model and r["task"] == task]
        if not any(r["method"] == "none" for r in rs):
            continue  # the plot draws every method against the baseline
        title = f"{model} on {task} ({rs[0]['metric']}), n={max(r['n'] for r in rs)}"
        written.append(plot_rows(rs, out / f"accuracy_vs_tokens_{_tag(model)}_{task}.png", title=title))
    return written


def format_rows(rows: Sequence[dict]) -> str:
    head = f"{'task':<14} {'method':<10} {'keep':>6} {'n':>6} {'vis.tok':>8} {'score':>9} {'retained':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(
            f"{r['task']:<14} {r['method']:<10} {keep:>6} {r['n']:>6} {r['visual_tokens']:>8.1f} "
            f"{r['score']:>9.4g} {r['retained']:>9.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line (shared by ``mmcompress eval`` and ``python -m mmcompress.evals``)


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .datasets import ALIASES, TASKS

    p.add_argument("--model", default="shapes-llava", help="embedded name, local checkpoint folder or hub id")
    p.add_argument("--task", default="shapesvqa", help=f"one of {', '.join(sorted(TASKS) + sorted(ALIASES))}")
    p.add_argument("--method", default="none", help="comma list of methods; the baseline is always added")
    p.add_argument(
        "--keep", default="0.25", help="comma list; int: tokens per image, float in (0, 1]: fraction"
    )
    p.add_argument("--out", required=True, help="results folder (resumes from what it holds)")
    p.add_argument("--data", default=None, help="folder of the task's official files (not for shapesvqa)")
    p.add_argument("--n", type=int, default=None, help="first N samples (default: all; shapesvqa: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (lmms-eval) value")
    p.add_argument("--prompt-style", default="auto", choices=PROMPT_STYLES)
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16"
    )
    p.add_argument("--no-baseline", action="store_true", help="do not run the uncompressed baseline")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from .harness import parse_keep

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    keeps = [parse_keep(k) for k in args.keep.split(",") if k.strip()]
    rows = run_eval(
        args.model,
        args.task,
        methods,
        keeps,
        args.out,
        data=args.data,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_style=args.prompt_style,
        dtype=args.dtype,
        baseline=not args.no_baseline,
        progress=not args.quiet,
    )
    if rows:
        print(format_rows(rows))
        print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    p = add_eval_arguments(
        argparse.ArgumentParser(prog="python -m mmcompress.evals", description=__doc__.split("\n")[0])
    )
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
