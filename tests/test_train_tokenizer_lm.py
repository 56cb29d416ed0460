"""Phase 3 of the discrete tokenizers (``evals/train_tokenizer_lm.py``, issue 6): an LM reading SEED / LaVIT
ids. A SEED and a LaVIT tokenizer are trained for 2 steps by ``train_tokenizers``' own smoke path into a
tmp folder (16 cached images), then the LM script runs in ``--smoke`` mode on each. Checks: the report's
keys and numbers, the saved LM, the id sequences the LM reads (vocabulary range, exactly the encoded codes
between BOI / EOI, the eval prompt is the training layout), the loss on a fixed batch, the exact fold of
the image rows, and left-padded batched generation against one by one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mmcompress.evals import train_shapes as ts
from mmcompress.evals import train_tokenizer_lm as tlm
from mmcompress.evals import train_tokenizers as tt
from mmcompress.evals.shapesvqa import FAMILIES

KINDS = ("seed", "lavit")
N_IMAGES = tlm.SMOKE["images"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_lm")
    cache = root / "cache"
    out = {"cache": cache}
    for kind in KINDS:
        tt.main(
            [
                *("--tokenizer", kind, "--images", str(N_IMAGES), "--eval-images", "4"),
                *("--steps", "2", "--phase1-steps", "1", "--threads", "1"),
                *("--out", str(root / kind), "--results", str(root / f"{kind}.json")),
                *("--feature-cache", str(cache)),
            ]
        )
        report = tlm.main(
            [
                *("--tokenizer-dir", str(root / kind), "--smoke", "--threads", "1"),
                *("--feature-cache", str(cache), "--out", str(root / f"lm-{kind}")),
                *("--results", str(root / f"lm-{kind}.json")),
            ]
        )
        out[kind] = {
            "report": report,
            "tok_dir": root / kind,
            "lm_dir": root / f"lm-{kind}",
            "json": root / f"lm-{kind}.json",
        }
    return out


def _codes(run, cache):
    tok, features = tt.load_trained_tokenizer(run["tok_dir"])
    feats = torch.load(cache / f"shapes-llava-n{N_IMAGES}-s0.pt")["feats"]
    return tok, features, tlm.encode_features(tok, feats, features)


def _fresh_lm(tok, seed: int = 0):
    torch.manual_seed(seed)
    lm, text_tok = tlm.load_text_lm()
    layout, rows = tlm.extend_lm(lm, text_tok, tok)
    return lm, text_tok, layout, rows


def _qas(index: int, n: int):
    ds, i = ts._datasets(tlm.NAME, "train", N_IMAGES, 0)[index]
    return ts.qa_pool(ds, i, n)


@pytest.mark.parametrize("kind", KINDS)
def test_report(runs, kind):
    run = runs[kind]
    rep = run["report"]
    assert json.loads(run["json"].read_text()) == json.loads(json.dumps(rep))  # written = returned
    for key in [
        "model",
        "test_accuracy",
        "test_accuracy_per_family",
        "test_n_per_family",
        "comparison",
        "eval",
        "tokens_per_image",
        "codebook_usage",
        "tokenizer",
        "vocab",
        "language_model",
        "hyper_parameters",
        "steps_done",
        "trainable_parameters",
        "wall_time_s",
        "cpu_s_per_step",
        "machine",
        "versions",
        "train_log",
        "examples",
    ]:
        assert key in rep, key
    assert rep["model"] == f"shapes-{kind}-lm"
    assert rep["steps_done"] == 2 and [e["step"] for e in rep["train_log"]] == [0, 1]
    assert rep["test_n_per_family"] == {f: 1 for f in FAMILIES}  # eval_n = 7: one per family
    acc = rep["test_accuracy_per_family"]
    assert rep["test_accuracy"] == round(sum(acc.values()) / len(acc), 4)
    for k in ("features", "encode", "train", "eval", "total"):
        assert rep["wall_time_s"][k] >= 0

    # the comparison is read from the continuous model's own report, not hard-coded
    base = json.loads((tlm.RESULTS_DIR / "train_shapes-llava.json").read_text())
    cmp = rep["comparison"]
    assert cmp["continuous"]["test_accuracy"] == base["test_accuracy"]
    assert cmp["delta_accuracy"] == round(rep["test_accuracy"] - base["test_accuracy"], 4)
    assert f"{base['test_accuracy']:.3f}" in cmp["line"]

    k_codes = rep["tokenizer"]["config"]["codebook_size"]
    test = rep["tokens_per_image"]["test"]
    assert sum(test["histogram"].values()) == 7
    if kind == "seed":
        assert rep["tokens_per_image"]["fixed"] and test["min"] == test["max"] == 32
    else:  # pool 2: at most 12 x 12 kept tokens, at least config.min_tokens = 1
        assert not rep["tokens_per_image"]["fixed"] and 1 <= test["min"] <= test["max"] <= 144
    usage = rep["codebook_usage"]["test"]
    assert usage["n"] == sum(int(c) * n for c, n in test["histogram"].items())
    assert usage["used"] + usage["dead"] == k_codes and 1 <= usage["perplexity"] <= usage["used"]

    # the saved LM is a plain LlamaForCausalLM with the extended vocabulary
    from transformers import AutoTokenizer, LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(run["lm_dir"])
    assert lm.get_input_embeddings().weight.shape[0] == rep["vocab"]["vocab_size"]
    saved = json.loads((run["lm_dir"] / "image_vocab.json").read_text())["layout"]
    assert saved == {k: v for k, v in rep["vocab"].items() if k != "words"}
    n_strings = rep["vocab"]["words"] + 2 + (k_codes if kind == "seed" else 0)  # LaVIT codes have no strings
    assert len(AutoTokenizer.from_pretrained(run["lm_dir"])) == n_strings


@pytest.mark.parametrize("kind", KINDS)
def test_sequences_hold_exactly_the_encoded_ids(runs, kind):
    run = runs[kind]
    tok, features, codes = _codes(run, runs["cache"])
    assert all(torch.equal(a, b) for a, b in zip(codes, _codes(run, runs["cache"])[2]))  # deterministic
    assert tlm.count_stats([len(c) for c in codes]) == run["report"]["tokens_per_image"]["train"]
    if kind == "seed":
        assert {len(c) for c in codes} == {32}
    lm, text_tok, layout, _ = _fresh_lm(tok)
    rows = lm.get_input_embeddings().base.weight.shape[0]
    assert rows == layout.vocab_size == run["report"]["vocab"]["vocab_size"]
    builder = ts.SequenceBuilder(text_tok)
    for i in range(4):
        qas = _qas(i, 3)
        ids, targets, segments, positions = tlm.build_sequence(builder, layout, codes[i], qas)
        assert len(ids) == len(targets) == len(segments) == len(positions)
        assert all(0 <= t < rows for t in ids)  # every id the LM reads has a row
        assert text_tok.image_token_id not in ids
        assert ids[0] == text_tok.bos_token_id and ids.count(layout.boi_id) == ids.count(layout.eoi_id) == 1
        b, e = ids.index(layout.boi_id), ids.index(layout.eoi_id)
        assert b == 1 and e - b - 1 == len(codes[i])
        assert ids[b + 1 : e] == (codes[i] + layout.offset).tolist()
        assert sum(t in layout.code_range for t in ids) == len(codes[i])  # no code outside the image
        assert torch.equal(layout.from_llm_ids(torch.tensor(ids[b : e + 1])), codes[i])
        assert set(segments[: e + 1]) == {0} and positions[: e + 1] == list(range(e + 1))
        # evaluation prompt = this layout up to the first answer target
        prompt = tlm.prompt_ids(builder, layout, codes[i], qas[0][0])
        assert ids[: len(prompt)] == prompt and targets[len(prompt) - 1] != -100
        assert targets[len(prompt) - 2] == -100


@pytest.mark.parametrize("kind", KINDS)
def test_loss_decreases_on_a_fixed_batch_and_fold_is_exact(runs, kind):
    tok, _, codes = _codes(runs[kind], runs["cache"])
    lm, text_tok, layout, rows = _fresh_lm(tok)
    builder = ts.SequenceBuilder(text_tok)
    seqs = [tlm.build_sequence(builder, layout, codes[i], _qas(i, 4)) for i in range(2)]
    opt = tlm.make_optimizer(lm, 1e-3, 0.0)
    lm.train()
    losses = []
    for step in range(10):
        loss = tlm.step_loss(lm, text_tok, seqs)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # the map and exactly the residual rows of the codes in the batch get gradients
            assert rows.proj.weight.grad.abs().sum() > 0
            used = torch.cat(codes[:2]).unique()
            assert torch.equal(rows.residual.grad.abs().sum(1).nonzero().flatten(), used)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    ids = torch.tensor([seqs[0][0]])
    with torch.no_grad():
        before = lm.get_input_embeddings()(ids)
        tlm.fold_image_rows(lm)
        emb = lm.get_input_embeddings()
        assert isinstance(emb, torch.nn.Embedding) and torch.equal(emb(ids), before)


def test_padded_batch_generation_matches_one_by_one(runs):
    tok, _, codes = _codes(runs["lavit"], runs["cache"])
    lm, text_tok, layout, _ = _fresh_lm(tok)
    tlm.fold_image_rows(lm)
    builder = ts.SequenceBuilder(text_tok)
    samples = [ds[i] for ds, i in ts._datasets(tlm.NAME, "train", N_IMAGES, 0)[:7]]
    assert len({len(tlm.prompt_ids(builder, layout, c, s.question)) for c, s in zip(codes, samples)}) > 1
    batched = tlm.evaluate(lm, text_tok, builder, layout, codes[:7], samples, batch_size=7)
    single = tlm.evaluate(lm, text_tok, builder, layout, codes[:7], samples, batch_size=1)
    assert batched["predictions"] == single["predictions"]
    # not vacuous: the shipped text LM with fresh image rows answers differently across the samples (an
    # empty first word can happen for some: the image rows are untrained)
    assert len(set(batched["predictions"])) >= 3, batched["predictions"]
    assert batched["overall"] == single["overall"]


def test_bad_arguments(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        tlm.main(["--tokenizer-dir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--steps=0"):
        tlm.main(["--tokenizer-dir", str(runs["seed"]["tok_dir"]), "--steps", "0"])
    other = tmp_path / "other"
    shutil.copytree(runs["seed"]["tok_dir"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["features"]["model"] = "shapes-llava-next"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shapes-llava-next"):
        tlm.main(["--tokenizer-dir", str(other)])
