"""CLI: argument parsing and bad input (fast), and `mmcompress run` on the embedded model."""

from __future__ import annotations

import pytest

from mmcompress.cli import main
from mmcompress.evals.harness import parse_keep


def test_parse_keep():
    assert parse_keep("64") == 64 and isinstance(parse_keep("64"), int)
    assert parse_keep("0.25") == 0.25
    with pytest.raises(ValueError, match="keep='abc' is not a number"):
        parse_keep("abc")


def test_compare_unknown_method_fails_before_loading(capsys):
    assert main(["compare", "--methods", "none,bogus", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'bogus'" in err and "divprune" in err


def test_compare_bad_keep(capsys):
    assert main(["compare", "--methods", "random", "--keep", "1.5", "--n", "2"]) != 0


def test_run_missing_image(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        main(["run", "--image", str(tmp_path / "nope.png"), "--question", "what?"])


def test_run_end_to_end(tmp_path, capsys):
    from mmcompress.evals.shapesvqa import ShapesVQA

    s = ShapesVQA("test", n=1, seed=3)[0]
    path = tmp_path / "img.png"
    s.image.save(path)
    assert (
        main(["run", "--image", str(path), "--question", s.question, "--method", "divprune", "--keep", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "visual tokens kept:  64 / 576" in out
    assert "time to first token:" in out and "KV-cache bytes:" in out
