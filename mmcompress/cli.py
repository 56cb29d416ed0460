"""``mmcompress`` command line: ``run`` (one question), ``compare`` (the main job), ``eval``, ``zoo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _keeps(text: str) -> list[int | float]:
    from mmcompress.evals.harness import parse_keep

    return [parse_keep(t) for t in text.split(",") if t.strip()]


def _cmd_run(args: argparse.Namespace) -> int:
    from PIL import Image

    import mmcompress as mmc
    from mmcompress import registry, zoo
    from mmcompress.evals.harness import parse_keep, timed_generate

    path = Path(args.image)
    if not path.is_file():
        raise SystemExit(f"error: --image {args.image!r} is not a file")
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise SystemExit(f"error: --image {args.image!r} is not a readable image ({e})") from None
    if not args.question.strip():
        raise SystemExit("error: --question is empty")
    model, processor = zoo.load(args.model)
    if args.method and args.method != "none":
        keep = None if args.keep is None else parse_keep(args.keep)
        mmc.compress(model, registry.create_from_spec(args.method, keep))
    inputs = processor(images=image, text=zoo.build_prompt(args.question), return_tensors="pt")
    g = timed_generate(model, inputs, max_new_tokens=args.max_new_tokens)
    answer = zoo.answer_from_text(processor.tokenizer.decode(g.new_tokens[0], skip_special_tokens=True))
    rep = mmc.report(model)
    n_in = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_out = rep.tokens_out[0] if rep is not None else n_in
    print(f"answer:              {answer}")
    print(f"visual tokens kept:  {n_out} / {n_in}")
    print(f"time to first token: {g.ttft_ms:.1f} ms")
    print(f"KV-cache bytes:      {g.kv_bytes}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mmcompress.evals.compare import format_table, run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = run_compare(
        args.model,
        methods,
        _keeps(args.keep),
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        json_out=args.json,
        max_new_tokens=args.max_new_tokens,
    )
    print(format_table(rows))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mmcompress.evals.runner import run_from_args

    return run_from_args(args)


def _cmd_zoo(args: argparse.Namespace) -> int:
    from mmcompress import zoo

    if args.name != "all":
        print(f"{args.name}: {zoo.checkpoint_dir(args.name)}")
        return 0
    for name in zoo.EMBEDDED:  # list every embedded model; one without shipped weights is reported, not fatal
        try:
            print(f"{name}: {zoo.checkpoint_dir(name)}")
        except FileNotFoundError as e:
            print(f"{name}: not available: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcompress", description="visual-token compression for VLMs")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer one question about one image, with or without compression")
    r.add_argument("--image", required=True)
    r.add_argument("--question", required=True)
    r.add_argument("--model", default="shapes-llava", help="embedded name, local checkpoint folder or hub id")
    r.add_argument("--method", default="none")
    r.add_argument(
        "--keep",
        default=None,
        help="int: tokens per image; float in (0, 1]: fraction (default: the method's own default)",
    )
    r.add_argument("--max-new-tokens", type=int, default=4)
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("compare", help="baseline + methods x budgets on ShapesVQA (the main job)")
    c.add_argument("--model", default="shapes-llava")
    c.add_argument("--methods", default="none,random,pool,divprune")
    c.add_argument("--keep", default="0.5,0.25,0.11")
    c.add_argument("--n", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--batch-size", type=int, default=1, help="prompts per generate(); TTFT and KV are per batch / B"
    )
    c.add_argument("--max-new-tokens", type=int, default=4)
    c.add_argument("--json", default=None, help="write the rows here (atomically; resumes from it)")
    c.set_defaults(func=_cmd_compare)

    from mmcompress.evals.runner import add_eval_arguments

    e = sub.add_parser("eval", help="a benchmark (VQAv2, GQA, ..., ShapesVQA): baseline + methods, resumable")
    add_eval_arguments(e).set_defaults(func=_cmd_eval)

    from mmcompress.evals.bench_kernels import add_arguments as add_bench_kernels_arguments

    b = sub.add_parser("bench", help="speed benchmarks (JSON with the device, versions and date)")
    bench_sub = b.add_subparsers(dest="bench", required=True)
    add_bench_kernels_arguments(
        bench_sub.add_parser("kernels", help="each kernel vs its torch reference vs the official-style code")
    )
    from mmcompress.evals.bench_e2e import add_arguments as add_bench_e2e_arguments

    add_bench_e2e_arguments(
        bench_sub.add_parser("e2e", help="TTFT, decode tok/s, memory, KV per method vs baseline and ideal")
    )

    from mmcompress.demos.app import add_arguments as add_demo_arguments  # gradio is imported on launch only

    add_demo_arguments(sub.add_parser("demo", help="the gradio demo in a browser (needs the 'demo' extra)"))

    z = sub.add_parser("zoo", help="build (once) and locate the embedded models")
    z.add_argument("name", nargs="?", default="all")
    z.set_defaults(func=_cmd_zoo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad input: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a hub id while offline, an unreadable checkpoint folder
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
