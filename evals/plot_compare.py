"""Plot a ``mmcompress compare`` JSON: accuracy vs visual tokens per method, plus a per-family table.

    python -m mmcompress.evals.plot_compare evals/results/compare_shapes-llava.json [--png OUT.png]

The PNG has one line per method (points at each budget, the uncompressed baseline as a dashed line);
the per-family table (markdown) is printed, because small-object and counting questions are where
methods differ.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from .shapesvqa import FAMILIES

__all__ = ["load_rows", "plot_rows", "family_table"]


def load_rows(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    rows = data if isinstance(data, list) else data.get("rows", [])
    if not rows or not any(r.get("method") == "none" for r in rows):
        raise ValueError(f"{path}: expected compare rows including the baseline (method 'none')")
    return rows


def plot_rows(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Write the accuracy-vs-visual-tokens PNG (atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    base = by_method.pop("none")[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.axhline(base["accuracy"], ls="--", c="k", lw=1, label=f"none ({base['visual_tokens']:.0f} tok)")
    markers = "osD^v<>pXh*"
    for i, (m, rs) in enumerate(sorted(by_method.items())):
        rs = sorted(rs, key=lambda r: r["visual_tokens"])
        ax.plot(
            [r["visual_tokens"] for r in rs],
            [r["accuracy"] for r in rs],
            marker=markers[i % len(markers)],
            label=m,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per image (log scale)")
    ax.set_ylabel("accuracy")
    n = base.get("n")
    ax.set_title(title or f"{base.get('model', '')} ShapesVQA test, n={n}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def family_table(rows: list[dict]) -> str:
    """Markdown table: one row per (method, keep), one column per question family."""
    fams = [f for f in FAMILIES if any(f in r.get("per_family", {}) for r in rows)]
    head = "| method | keep | tokens | all | " + " | ".join(fams) + " |"
    lines = [head, "|" + "---|" * (4 + len(fams))]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        pf = r.get("per_family", {})
        cells = [f"{pf[f]:.3f}" if f in pf and not math.isnan(pf[f]) else "-" for f in fams]
        lines.append(
            f"| {r['method']} | {keep} | {r['visual_tokens']:.0f} | {r['accuracy']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--png", type=Path, default=None, help="default: the JSON path with .png")
    args = p.parse_args(argv)
    rows = load_rows(args.json)
    out = plot_rows(rows, args.png or args.json.with_suffix(".png"))
    print(family_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
