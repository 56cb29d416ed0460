"""The evaluation runner: records, resume after an interrupt (in-process and SIGKILL), deterministic merge of
data-parallel shards, summary and plot; end to end on the embedded model, incl. 2 processes via accelerate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmcompress.cli import main as cli_main
from mmcompress.evals import runner
from mmcompress.evals.runner import Output, merge_records, read_records, run_eval

FIX = Path(__file__).parent / "fixtures" / "eval"


class FakeBackend:
    """Answers GQA fixture questions: right for the baseline, wrong on question 202 when compressed."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.method = None
        self.seen: list[tuple[str, str]] = []
        self.stop_after = stop_after

    def set_method(self, method, keep):
        self.method = (method, keep)

    def machine(self):
        return {"device": "fake"}

    def answer(self, samples, max_new_tokens):
        outs = []
        for s in samples:
            if self.stop_after is not None and len(self.seen) >= self.stop_after:
                raise KeyboardInterrupt  # an interrupt between two samples
            self.seen.append((self.method[0], s.id))
            wrong = self.method[0] != "none" and s.id == "202"
            tokens = 100 if self.method[0] == "none" else self.method[1]
            outs.append(
                Output("x" if wrong else s.target, "x" if wrong else s.target, tokens, 1.0, 2.0, 10.0)
            )
        return outs


def _run(out, backend, **kw):
    args = dict(methods=["pool"], keeps=[4, 8], data=FIX / "gqa", progress=False, backend=backend)
    args.update(kw)
    return run_eval("fake-model", "gqa", out=out, **args)


def test_records_summary_and_plot(tmp_path):
    rows = _run(tmp_path, FakeBackend())
    folder = tmp_path / "records" / "fake-model" / "gqa"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == [
        "none.jsonl",
        "pool_keep4.jsonl",
        "pool_keep8.jsonl",
    ]
    recs = read_records(folder / "pool_keep4.jsonl")
    assert [r["id"] for r in recs] == ["201", "202", "203"]
    assert recs[1]["pred"] == "x" and recs[1]["target"] == "cup" and recs[0]["visual_tokens"] == 4
    by = {(r["method"], r["keep"]): r for r in rows}
    assert by[("none", None)]["score"] == 1.0 and by[("none", None)]["visual_tokens"] == 100
    assert by[("pool", 8)]["score"] == pytest.approx(2 / 3) and by[("pool", 8)]["retained"] == pytest.approx(
        2 / 3
    )
    assert by[("pool", 8)]["metric"] == "exact-match accuracy" and by[("pool", 4)]["n"] == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 3 and summary["rows"][0]["machine"] == {"device": "fake"}
    png = tmp_path / "accuracy_vs_tokens_fake-model_gqa.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((folder / "pool_keep4.meta.json").read_text())
    assert meta["settings"]["method_config"]["keep"] == 4 and len(meta["runs"]) == 1


def test_resume_after_interrupt_no_loss_no_duplicates(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, FakeBackend(stop_after=4))  # baseline done (3), 1 of pool@4
    folder = tmp_path / "records" / "fake-model" / "gqa"
    assert [r["id"] for r in read_records(folder / "pool_keep4.jsonl")] == ["201"]
    # a writer killed mid-line leaves a torn last line: it is dropped, not parsed, not kept
    with open(folder / "pool_keep4.jsonl", "a") as f:
        f.write('{"id": "202", "pred": "cu')
    assert [r["id"] for r in read_records(folder / "pool_keep4.jsonl")] == ["201"]
    again = FakeBackend()
    rows = _run(tmp_path, again)
    # only what was missing ran: 2 of pool@4 and all 3 of pool@8
    assert again.seen == [("pool", "202"), ("pool", "203")] + [("pool", i) for i in ("201", "202", "203")]
    for name in ("none", "pool_keep4", "pool_keep8"):
        lines = (folder / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in lines] == ["201", "202", "203"]
    assert len(rows) == 3
    # a finished run resumes to a no-op
    idle = FakeBackend()
    _run(tmp_path, idle)
    assert idle.seen == []
    meta = json.loads((folder / "none.meta.json").read_text())
    assert len(meta["runs"]) == 3


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path, FakeBackend(), methods=[], keeps=[])
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        _run(tmp_path, FakeBackend(), methods=[], keeps=[], seed=1)


def test_resume_refuses_records_made_with_other_weights(tmp_path, monkeypatch):
    import mmcompress.zoo

    _run(tmp_path, FakeBackend(), methods=[], keeps=[])
    monkeypatch.setattr(mmcompress.zoo, "weights_fingerprint", lambda name: "retrained")
    with pytest.raises(ValueError, match="weights.*hub:fake-model.*retrained"):
        _run(tmp_path, FakeBackend(), methods=[], keeps=[])


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "1"}\nnot json\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        read_records(p)


def test_merge_is_sorted_deduplicated_and_atomic(tmp_path):
    main = tmp_path / "none.jsonl"
    rec = lambda i, tag="": json.dumps({"id": str(i), "pred": tag}) + "\n"  # noqa: E731
    main.write_text(rec(4, "main") + '{"id": "9", "pr')  # earlier single-process run, torn tail
    (tmp_path / "none.part0.jsonl").write_text(rec(2) + rec(0) + rec(4, "dup"))
    (tmp_path / "none.part1.jsonl").write_text(rec(3) + rec(1))
    order = {str(i): i for i in range(5)}
    merged = merge_records(main, order)
    assert [r["id"] for r in merged] == ["0", "1", "2", "3", "4"]
    assert merged[4]["pred"] == "main"  # first seen wins: the main file, then the parts by rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.jsonl"]
    assert main.read_text() == "".join(rec(i, "main" if i == 4 else "") for i in range(5))


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    assert cli_main(["eval", "--task", "vqa3", "--out", str(tmp_path)]) == 2
    assert "task='vqa3' is unknown" in capsys.readouterr().err
    assert cli_main(["eval", "--task", "gqa", "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert cli_main(["eval", "--method", "bogus", "--out", str(tmp_path)]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert cli_main(["eval", "--method", "pool", "--keep", "1.5", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "records").exists()


def test_prompt_styles():
    class Proc:
        image_token = "<image>"
        chat_template = None

    assert runner.build_prompt(Proc(), "what?", "llava") == "USER: <image>\nwhat? ASSISTANT:"
    assert runner.build_prompt(Proc(), "what?", "chat") == "USER: <image>\nwhat? ASSISTANT:"  # no template
    assert runner.build_prompt(Proc(), "what?", "zoo") == "<image>\nquestion: what? answer:"
    assert runner.resolve_prompt_style("auto", "shapes-llava") == "zoo"
    assert runner.resolve_prompt_style("auto", "llava-hf/llava-1.5-7b-hf") == "chat"
    with pytest.raises(ValueError, match="prompt_style"):
        runner.resolve_prompt_style("fancy", "x")


# -- end to end on the embedded model -----------------------------------------------------------------------

N = 10
ARGS = ["--model", "shapes-llava", "--task", "shapesvqa", "--n", str(N), "--seed", "3", "--quiet"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> Path:
    """A single-process run SIGKILLed after a few records, then resumed to completion."""
    out = tmp_path_factory.mktemp("eval_kill")
    jsonl = out / "records" / "shapes-llava" / "shapesvqa" / "none.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcompress.evals", *ARGS, "--out", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = jsonl.read_bytes().count(b"\n")
    assert 3 <= done < N, done  # killed midway
    with open(jsonl, "ab") as f:  # as if killed inside a write
        f.write(b'{"id": "7", "pred": "re')
    assert runner.main([*ARGS, "--out", str(out)]) == 0
    return out


def test_kill_midway_and_resume(killed_and_resumed):
    out = killed_and_resumed
    lines = (out / "records" / "shapes-llava" / "shapesvqa" / "none.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]  # every line is a whole record
    assert [r["id"] for r in recs] == [str(i) for i in range(N)]  # none lost, none twice, in order
    assert all(r["visual_tokens"] == 576 and r["pred"] for r in recs)
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert row["n"] == N and row["task"] == "shapesvqa" and row["world_size"] == 1
    assert row["score"] == pytest.approx(sum(r["pred"] == r["target"] for r in recs) / N)
    assert (out / "accuracy_vs_tokens_shapes-llava_shapesvqa.png").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_accelerate_merge_deterministically(killed_and_resumed, tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is not installed"
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",  # torchrun-style processes; on CPU they use gloo (--cpu alone starts one without MPI)
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "mmcompress.evals",
        *ARGS,
        "--method",
        "divprune",
        "--keep",
        "64",
        "--out",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    folder = tmp_path / "records" / "shapes-llava" / "shapesvqa"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["divprune_keep64.jsonl", "none.jsonl"]  # merged
    base = read_records(folder / "none.jsonl")
    single = read_records(killed_and_resumed / "records" / "shapes-llava" / "shapesvqa" / "none.jsonl")
    # the same samples in the same order with the same answers as the single-process run
    assert [(r["id"], r["pred"]) for r in base] == [(r["id"], r["pred"]) for r in single]
    pruned = read_records(folder / "divprune_keep64.jsonl")
    assert [r["id"] for r in pruned] == [str(i) for i in range(N)]
    assert {r["visual_tokens"] for r in pruned} == {64}
    # sharded: process r answered every second sample starting at r
    assert [r["rank"] for r in pruned] == [i % 2 for i in range(N)]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert {(r["method"], r["world_size"]) for r in rows} == {("none", 2), ("divprune", 2)}
    meta = json.loads((folder / "none.meta.json").read_text())
    assert meta["runs"][0]["machine"]["device"].startswith("cpu")
