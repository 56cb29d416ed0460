"""The plugin on the embedded real VLMs (DINOv2 tower + trained LM), end to end through generate()."""

from __future__ import annotations

import json

import pytest
import torch

import mmcompress as mmc
from mmcompress import zoo
from mmcompress.evals.compare import eval_samples, run_compare
from mmcompress.evals.shapesvqa import score

MAX_NEW = 4


@pytest.fixture(scope="module", params=["shapes-llava", "shapes-llava-next"])
def embedded(request):
    model, processor = zoo.load(request.param)
    processor.tokenizer.padding_side = "left"
    samples = eval_samples(request.param, 14, seed=123)
    # two prompts of different lengths, so the batch is left-padded
    lens = [len(processor.tokenizer(zoo.build_prompt(s.question))["input_ids"]) for s in samples]
    pair = [samples[0], next(s for s, n in zip(samples, lens) if n != lens[0])]
    batch = processor(
        images=[s.image for s in pair],
        text=[zoo.build_prompt(s.question) for s in pair],
        padding=True,
        return_tensors="pt",
    )
    yield request.param, model, processor, samples, batch
    mmc.restore(model)


def _gen(model, batch, **kw):
    out = model.generate(
        **batch,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits)


def test_keep_all_restore_disabled_exact(embedded):
    _, model, _, _, batch = embedded
    assert bool((batch["attention_mask"] == 0).any())  # the two prompts differ in length: left padding
    ref_seq, ref_logits = _gen(model, batch)
    ref_beam = model.generate(**batch, max_new_tokens=MAX_NEW, num_beams=2, do_sample=False)
    mmc.compress(model, "divprune", keep=1.0)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert torch.equal(
        model.generate(**batch, max_new_tokens=MAX_NEW, num_beams=2, do_sample=False), ref_beam
    )
    mmc.compress(model, "pool", keep=0.25)
    with mmc.disabled(model):
        seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    mmc.restore(model)
    seq, logits = _gen(model, batch)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("method", ["random", "pool", "divprune"])
def test_pruned_cache_equals_recompute(embedded, method):
    _, model, _, _, batch = embedded
    mmc.compress(model, method, keep=0.25)
    seq, logits = _gen(model, batch)
    rep = mmc.report(model)
    assert all(o < i for i, o in zip(rep.tokens_in, rep.tokens_out))
    seq2, logits2 = _gen(model, batch, use_cache=False)
    assert torch.equal(seq, seq2)
    assert (logits - logits2).abs().max() < 1e-4  # fp32, 4-layer LM over ~600 tokens (seen: ~1e-6)
    mmc.restore(model)


def test_quality_floor_and_output_changes(embedded):
    """Lossy methods: a floor on answers at keep=0.5 and proof that compression changed the computation.

    The floor is on the count family (0.84 / 0.93 on 80 / 40 test questions at training time for
    shapes-llava / shapes-llava-next, chance 1/6), the family the shipped models answer most reliably.
    """
    name, model, processor, _, _ = embedded
    samples = [s for s in eval_samples(name, 84, seed=7) if s.family == "count"]  # 12 count questions
    inputs = processor(
        images=[s.image for s in samples],
        text=[zoo.build_prompt(s.question) for s in samples],
        padding=True,
        return_tensors="pt",
    )

    def answers():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        texts = processor.tokenizer.batch_decode(out.sequences[:, n:], skip_special_tokens=True)
        acc = sum(score(zoo.answer_from_text(t), s.answer) for t, s in zip(texts, samples)) / len(samples)
        return acc, out.logits[0]

    n = inputs["input_ids"].shape[1]
    base_acc, base_logits = answers()
    assert base_acc >= 0.5, base_acc
    mmc.compress(model, "divprune", keep=0.5)
    acc, logits = answers()
    assert not torch.equal(logits, base_logits)  # really pruned
    assert acc >= base_acc - 0.34, (acc, base_acc)
    mmc.restore(model)


def test_compare_writes_rows_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    rows = run_compare("shapes-llava", ["none", "random"], [0.25], n=3, seed=1, json_out=out, progress=False)
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["none", "random"]
    for r in saved:
        assert {"method", "keep", "visual_tokens", "accuracy", "retained", "ttft_ms", "kv_bytes"} <= set(r)
    assert saved[0]["keep"] is None and saved[0]["retained"] == 1.0 and saved[0]["visual_tokens"] == 576
    assert saved[1]["visual_tokens"] == 144 and saved[1]["kv_bytes"] < saved[0]["kv_bytes"]
    # resume: nothing is recomputed when every row is already there
    import mmcompress.evals.compare as cmp

    monkeypatch.setattr(cmp, "evaluate_config", lambda *a, **k: pytest.fail("recomputed a finished row"))
    again = run_compare("shapes-llava", ["none", "random"], [0.25], n=3, seed=1, json_out=out, progress=False)
    assert again == rows
    # a later run with another method list adds its rows and keeps every earlier one
    monkeypatch.undo()
    more = run_compare(
        "shapes-llava", ["none", "random:seed=1"], [0.25], n=3, seed=1, json_out=out, progress=False
    )
    assert [r["method"] for r in more] == ["none", "random:seed=1"] and more[0] == rows[0]
    merged = json.loads(out.read_text())
    assert [(r["method"], r["keep"]) for r in merged] == [
        ("none", None),
        ("random", 0.25),
        ("random:seed=1", 0.25),
    ]
    assert merged[:2] == saved
    # other weights under the same name (a retrained model): every row is measured again and replaces
    # the stale one in place, never reused and never left beside it
    assert saved[0]["weights"] == zoo.weights_fingerprint("shapes-llava") != "retrained"
    calls = []
    real = cmp.evaluate_config
    monkeypatch.setattr(cmp.zoo, "weights_fingerprint", lambda name: "retrained")
    monkeypatch.setattr(cmp, "evaluate_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_compare("shapes-llava", ["none", "random"], [0.25], n=3, seed=1, json_out=out, progress=False)
    assert len(calls) == 2
    final = json.loads(out.read_text())
    assert [(r["method"], r["keep"], r["weights"]) for r in final] == [
        ("none", None, "retrained"),
        ("random", 0.25, "retrained"),
        ("random:seed=1", 0.25, saved[0]["weights"]),
    ]
