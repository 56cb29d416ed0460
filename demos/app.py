"""The gradio demo (issue 8): upload an image or load a ShapesVQA sample, ask a question, pick a model,
a pre-LLM method and a budget, and see the baseline and the compressed run side by side with a picture of
the kept visual tokens.

``mmcompress demo [--host 127.0.0.1] [--port 7860] [--share] [--model shapes-llava]``; needs the ``demo``
extra (gradio). All logic is in :mod:`mmcompress.demos.engine`; this module only lays out the page and
turns results and errors into HTML. gradio is imported inside :func:`build_app` / :func:`launch` only,
so the ``mmcompress`` command line can register this subcommand without importing gradio.

Privacy: gradio's analytics and version check are switched off (``GRADIO_ANALYTICS_ENABLED=False``, set
here before gradio is imported) and no share link is made unless ``--share`` is given.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from typing import TYPE_CHECKING, Any

from PIL import Image

from mmcompress import registry, zoo

from .engine import (
    DEFAULT_MODEL,
    MAX_PIXELS,
    DemoEngine,
    DemoInputError,
    DemoResult,
    make_request,
    pre_llm_methods,
)

if TYPE_CHECKING:
    import gradio as gr

# gradio reads this when it is imported and when a Blocks is built: no telemetry, no version check
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

__all__ = [
    "MAX_UPLOAD_BYTES",
    "add_arguments",
    "answer",
    "build_app",
    "error_html",
    "launch",
    "load_sample",
    "result_html",
    "run_from_args",
]

log = logging.getLogger(__name__)

#: uploads above this are refused by gradio itself before they reach the engine
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_METHOD, DEFAULT_KEEP = "divprune", "64"
MAX_SAMPLE_INDEX = 999
_NO_SAMPLE = "Cannot load the sample:"

_TD = "padding:6px 12px;border-bottom:1px solid #ddd;text-align:left"
_TH = _TD + ";font-weight:600"


def _bytes(n: int) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _tps(v: float | None) -> str:
    return "n/a (one token)" if v is None else f"{v:.1f} tokens/s"


def error_html(message: str, title: str = "Cannot run:") -> str:
    """A message box for the page (``#mmc-error``), never a traceback."""
    return (
        '<div id="mmc-error" role="alert" style="padding:12px;border:1px solid #d33;border-radius:6px;'
        f'background:#fff0f0;color:#900"><b>{html.escape(title)}</b> {html.escape(message)}</div>'
    )


def result_html(res: DemoResult) -> str:
    """Baseline and compressed side by side; every value cell carries ``data-field`` for tests."""
    b, c = res.baseline, res.compressed
    keep = res.request.keep if res.request.keep is not None else "default"
    title = f"{res.request.method} (keep={keep})"
    pct = 100.0 * c.visual_tokens / max(b.visual_tokens, 1)
    rows = [
        ("answer", "answer", b.text or "(empty)", c.text or "(empty)"),
        ("visual tokens", "visual-tokens", str(b.visual_tokens), str(c.visual_tokens)),
        ("time to first token", "ttft", f"{b.ttft_ms:.1f} ms", f"{c.ttft_ms:.1f} ms"),
        ("decode speed", "decode", _tps(b.decode_tokens_per_s), _tps(c.decode_tokens_per_s)),
        ("KV cache", "kv-bytes", _bytes(b.kv_bytes), _bytes(c.kv_bytes)),
        ("method time", "method-ms", "-", f"{res.method_ms:.1f} ms"),
    ]
    raw = {"visual-tokens": (b.visual_tokens, c.visual_tokens), "kv-bytes": (b.kv_bytes, c.kv_bytes)}
    out = [
        '<div id="mmc-out"><table style="border-collapse:collapse;width:100%">',
        f'<tr><th style="{_TH}"></th><th style="{_TH}">baseline</th>'
        f'<th style="{_TH}" data-field="compressed-title">{html.escape(title)}</th></tr>',
    ]
    for label, key, bv, cv in rows:
        vals = raw.get(key)
        attrs = [f' data-value="{v}"' for v in vals] if vals else ["", ""]
        out.append(
            f'<tr><td style="{_TH}">{label}</td>'
            f'<td style="{_TD}" data-field="baseline-{key}"{attrs[0]}>{html.escape(bv)}</td>'
            f'<td style="{_TD}" data-field="compressed-{key}"{attrs[1]}>{html.escape(cv)}</td></tr>'
        )
    out.append("</table>")
    notes = [
        f"{c.visual_tokens} of {b.visual_tokens} visual tokens kept ({pct:.1f}%).",
        f"Model {html.escape(res.request.model)} on {html.escape(res.device)}; timings on a shared machine "
        "are noisy, and the compressed time to first token includes the method.",
    ]
    for kind, (k, n) in res.hidden_tokens().items():
        notes.append(f"{k} of {n} {html.escape(kind)} tokens kept (not drawn in the picture).")
    notes += [html.escape(n) for n in res.notes]
    out.append('<p style="margin-top:8px;color:#555">' + "<br>".join(notes) + "</p></div>")
    return "".join(out)


def _image_path(payload: Any) -> Any:
    """The upload as the run event gets it (``preprocess=False``): gradio's file dict, a path or None."""
    if isinstance(payload, dict):
        return payload.get("path")
    return payload


def answer(
    engine: DemoEngine, image: Any, question: Any, model: Any, method: Any, keep: Any
) -> tuple[str, Image.Image | None]:
    """The Run button: ``(result or error HTML, kept-token picture or None)``; never raises.

    The event runs with ``preprocess=False`` so that a file that is not an image reaches
    :func:`~mmcompress.demos.engine.load_image` (and its message) instead of failing in gradio's own
    image decoding.
    """
    try:
        req = make_request(model, method, keep, question)
        res = engine.run(_image_path(image), req)
        return result_html(res), res.overlay()
    except DemoInputError as e:
        return error_html(str(e)), None
    except Exception as e:  # noqa: BLE001  (a bug must still give a message in the page; the log keeps it)
        log.exception("demo request failed")
        return error_html(f"internal error ({type(e).__name__}): {e}"), None


def load_sample(index: Any, model: Any) -> tuple[Image.Image | None, str, str]:
    """The "Load sample" button: ShapesVQA test sample ``index`` sized for ``model``."""
    from mmcompress.evals.compare import eval_samples

    allowed = f"allowed: 0..{MAX_SAMPLE_INDEX}"
    try:
        i = int(index)
    except (TypeError, ValueError):
        return None, "", error_html(f"sample={index!r} is invalid; {allowed}", _NO_SAMPLE)
    if not 0 <= i <= MAX_SAMPLE_INDEX:
        return None, "", error_html(f"sample={i} is invalid; {allowed}", _NO_SAMPLE)
    name = model.strip() if isinstance(model, str) and model.strip() else DEFAULT_MODEL
    s = eval_samples(name, i + 1, seed=0)[i]
    info = (
        f'<p id="mmc-sample-info">ShapesVQA test sample #{i} ({html.escape(s.family)}), '
        f"{s.image.width} x {s.image.height} px; expected answer: <b>{html.escape(s.answer)}</b></p>"
    )
    return s.image, s.question, info


def _methods_md() -> str:
    lines = ["| method | what it does |", "|---|---|"]
    for name in pre_llm_methods():
        lines.append(f"| `{name}` | {getattr(registry.get(name), 'summary', '')} |")
    return "\n".join(lines)


def build_app(engine: DemoEngine | None = None, default_model: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page, on ``engine`` (a fresh :class:`DemoEngine` if None)."""
    import gradio as gr

    engine = engine if engine is not None else DemoEngine()
    models = list(zoo.EMBEDDED)
    if default_model not in models:
        models.append(default_model)
    with gr.Blocks(title="mmcompress demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# mmcompress: visual-token compression\n"
            "Ask a question about an image; the same model answers with all its visual tokens (baseline) "
            "and with the chosen method's budget. Images up to "
            f"{MAX_PIXELS:,} pixels."
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    label="Image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    format="png",
                    height=300,
                    elem_id="mmc-image",
                )
                with gr.Row():
                    index = gr.Number(
                        label="ShapesVQA sample #",
                        value=0,
                        precision=0,
                        minimum=0,
                        maximum=MAX_SAMPLE_INDEX,
                        elem_id="mmc-sample-index",
                    )
                    sample = gr.Button("Load sample", elem_id="mmc-sample")
                question = gr.Textbox(
                    label="Question",
                    placeholder="e.g. how many objects are there?",
                    lines=1,
                    max_lines=1,
                    elem_id="mmc-question",
                )
                model = gr.Dropdown(
                    choices=models,
                    value=default_model,
                    allow_custom_value=True,
                    label="Model",
                    info="embedded name, a checkpoint folder on the server, or a hub id",
                    elem_id="mmc-model",
                )
                method = gr.Dropdown(
                    choices=pre_llm_methods(), value=DEFAULT_METHOD, label="Method", elem_id="mmc-method"
                )
                keep = gr.Textbox(
                    label="Budget (keep)",
                    value=DEFAULT_KEEP,
                    info="int: visual tokens per image; fraction in (0, 1]; empty: the method's default",
                    lines=1,
                    max_lines=1,
                    elem_id="mmc-keep",
                )
                run = gr.Button("Run", variant="primary", elem_id="mmc-run")
                with gr.Accordion("Methods", open=False):
                    gr.Markdown(_methods_md())
            with gr.Column(scale=3):
                result = gr.HTML(
                    '<p id="mmc-idle">Upload an image or load a sample, then press Run.</p>',
                    elem_id="mmc-result",
                )
                overlay = gr.Image(
                    label="Kept visual tokens (yellow outline: kept; colours: merged groups; "
                    "AnyRes: thumbnail, then the crops)",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="mmc-overlay",
                )

        def on_run(image, question, model, method, keep):
            return answer(engine, image, question, model, method, keep)

        for trigger in (run.click, question.submit):
            trigger(
                on_run,
                inputs=[image, question, model, method, keep],
                outputs=[result, overlay],
                preprocess=False,
                concurrency_limit=4,  # the engine serialises requests per model (see engine docs)
            )
        sample.click(load_sample, inputs=[index, model], outputs=[image, question, result])
    return app


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    model: str = DEFAULT_MODEL,
    engine: DemoEngine | None = None,
    block: bool = True,
) -> gr.Blocks:
    """Load ``model`` (so the first user does not wait, and a bad name fails here), then serve the page."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: the demo needs gradio; install it with: pip install 'mmcompress[demo]'"
        ) from None
    engine = engine if engine is not None else DemoEngine()
    print(f"loading {model} ...", flush=True)
    engine.models.get(model)
    app = build_app(engine, default_model=model)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        show_error=False,  # errors are shown by our own message box, without server details
        ssr_mode=False,  # no node server
        max_file_size=MAX_UPLOAD_BYTES,
        prevent_thread_lock=not block,
    )
    return app


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``mmcompress demo`` options (and its handler as ``func``)."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: local only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--share", action="store_true", help="also make a public gradio.live link (off by default)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model loaded at start and selected in the page"
    )
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port={args.port} is invalid; allowed: 1..65535")
    launch(host=args.host, port=args.port, share=args.share, model=args.model)
    return 0


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(prog="python -m mmcompress.demos.app"))
    raise SystemExit(run_from_args(parser.parse_args()))
