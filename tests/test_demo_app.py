"""The demo page's glue without a browser: error boxes, the ``mmcompress demo`` subcommand."""

from __future__ import annotations

import subprocess
import sys

from mmcompress.cli import build_parser, main
from mmcompress.demos import app
from mmcompress.demos.engine import DemoInputError


class _Failing:
    """An engine whose request fails the way ``exc`` says."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def run(self, image, request):
        raise self.exc


def test_answer_turns_every_failure_into_a_message():
    html, pic = app.answer(_Failing(AssertionError("unreachable")), None, "  ", "", "divprune", "64")
    assert pic is None and 'id="mmc-error"' in html and "the question is empty" in html
    html, pic = app.answer(_Failing(DemoInputError("bad <image>")), {"path": "x.png"}, "q?", "", "pool", "")
    assert pic is None and "bad &lt;image&gt;" in html  # escaped, never raw HTML from the user
    html, pic = app.answer(_Failing(RuntimeError("boom")), "x.png", "q?", "", "pool", "0.5")
    assert pic is None and "internal error (RuntimeError): boom" in html and "Traceback" not in html


def test_load_sample_bounds():
    _, q, html = app.load_sample(-1, "shapes-llava")
    assert q == "" and "Cannot load the sample:</b> sample=-1 is invalid; allowed: 0..999" in html
    _, q, html = app.load_sample("x", "shapes-llava")
    assert q == "" and "sample=&#x27;x&#x27; is invalid" in html  # escaped


def test_demo_subcommand_defaults_and_no_gradio_at_parse_time():
    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, "shapes-llava")
    code = (
        "import sys; from mmcompress.cli import build_parser; build_parser().parse_args(['demo']); "
        "assert 'gradio' not in sys.modules, 'building the parser imported gradio'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_subcommand_bad_options(capsys, tmp_path):
    assert main(["demo", "--port", "70000"]) == 2
    assert "--port=70000 is invalid; allowed: 1..65535" in capsys.readouterr().err
    missing = tmp_path / "no-such-checkpoint"
    assert main(["demo", "--model", str(missing)]) == 2  # fails while preloading, before serving
    assert f"model folder {str(missing)!r} does not exist on the server" in capsys.readouterr().err
