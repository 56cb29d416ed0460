"""The embedded model's training recipe (``evals/train_shapes.py``, ``evals/shapes_patch_labels.py``).

What is checked: which objects a question is about and in which order (the retrieval targets), the
per-head target layout (a relation question splits its two objects across heads), the retrieval loss
against the attention probabilities an eager Llama layer reports, the block mask, the per-family word
hits of ``train_step_loss``, and a two-step ``main`` run end to end (report keys, per-family training
accuracy, shipped weights in ``--out``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from mmcompress.evals import train_shapes as ts
from mmcompress.evals.shapes_patch_labels import (
    LABEL_CLASSES,
    READOUT_KEYS,
    absent_mention_position,
    mention_positions,
    object_label,
    question_tokens,
    referenced_groups,
    referenced_objects,
    relation_targets,
)
from mmcompress.evals.shapesvqa import FAMILIES, SceneObject
from mmcompress.zoo.text import build_tokenizer

SCENE = [
    SceneObject("circle", "blue", 50, 50, 40, 0.0),
    SceneObject("square", "red", 250, 60, 40, 0.3),
    SceneObject("star", "green", 150, 250, 20, 0.1),
]


def test_referenced_objects_follow_the_question_order():
    # the relation's subject comes first even though it is later in the scene list
    assert referenced_objects(SCENE, "is the red square left of the blue circle?") == [1, 0]
    assert referenced_objects(SCENE, "is the blue circle left of the red square?") == [0, 1]
    assert referenced_objects(SCENE, "what color is the star?") == [2]
    assert referenced_objects(SCENE, "what shape is the red object?") == [1]
    assert referenced_objects(SCENE, "how many objects are there?") == [0, 1, 2]
    assert referenced_objects(SCENE, "what color is the smallest object?") == [2]
    assert referenced_objects(SCENE, "is there a purple star?") == []


def test_referenced_groups_split_relations_only():
    assert referenced_groups(SCENE, "is the red square above the blue circle?") == [[1], [0]]
    assert referenced_groups(SCENE, "is the red square on the left or the right?") == [[1]]
    assert referenced_groups(SCENE[:2], "how many objects are there?") == [[0, 1]]  # two, but one group
    assert referenced_groups(SCENE, "is there a purple star?") == []
    with pytest.raises(ValueError, match="matches no ShapesVQA template"):
        referenced_groups(SCENE, "why?")


def test_object_label_uses_the_label_class_indexing():
    lab = object_label(SCENE[1], grid=24, patch=14)  # red square at (250, 60), 40 px on a 336 px side
    assert lab == {"colour": 1, "shape": 2, "size": 2, "row": 4, "col": 17}  # 40 px: lowest third
    assert set(lab) == set(READOUT_KEYS)
    classes = LABEL_CLASSES(24)
    assert all(0 <= lab[k] < classes[k] for k in READOUT_KEYS)


@pytest.mark.parametrize(
    ("question", "words"),
    [
        ("is the red square left of the blue circle?", ["square", "circle"]),
        ("is the blue circle above the red square?", ["circle", "square"]),
        ("is there a green star?", ["star"]),
        ("is there a purple star?", []),
        ("is the red square at the top or the bottom?", ["square"]),
        ("what color is the star?", ["star"]),
        ("what shape is the red object?", ["red"]),
        ("how many objects are there?", ["objects"]),
        ("what shape is the smallest object?", ["smallest"]),
    ],
)
def test_mention_positions_name_the_referring_word(question, words):
    toks = question_tokens(question)
    assert [toks[i] for i in mention_positions(SCENE, question)] == words


def test_retrieval_rows_add_mention_rows_with_their_object():
    tok = build_tokenizer()
    qas = [("is the red square left of the blue circle?", "no", "relation"), ("how many?", "3", "count")]
    qas[1] = ("how many objects are there?", "3", "count")
    seqs = [ts.SequenceBuilder(tok).build(4, qas)]
    patches = [[torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3])]]
    rows, groups, labels = ts.retrieval_rows(seqs, [qas], [SCENE], patches, 2, 24, 14, tok)
    names = [tok.convert_ids_to_tokens(seqs[0][0][p]) for _b, p in rows]
    assert names == [":", "square", "circle", ":", "objects"]  # answer row, then its mentions, per QA
    assert [[g.tolist() for g in gs] for gs in groups] == [
        [[2], [1]],
        [[2]],
        [[1]],
        [[1, 2, 3, 4]],
        [[1, 2, 3, 4]],
    ]
    assert labels[0][0]["colour"] == 1 and labels[0][1]["colour"] == 3  # red square, blue circle
    assert labels[3][0]["colour"] == -100  # several objects: no readout
    rows_only, groups_only, _ = ts.retrieval_rows(seqs, [qas], [SCENE], patches, 2, 24, 14, None)
    assert rows_only == [rows[0], rows[3]]
    # the shipped recipe: no split, every head towards both objects of the relation
    _, unsplit, labels_unsplit = ts.retrieval_rows(seqs, [qas], [SCENE], patches, 2, 24, 14, None, False)
    assert [g.tolist() for g in unsplit[0]] == [[2, 1]]
    assert labels_unsplit[0][0]["colour"] == -100


def test_relation_targets_follow_the_named_order_the_margin_and_the_word():
    # red square (250, 60) vs blue circle (50, 50): right of it; 10 px apart vertically is within the margin
    assert relation_targets(SCENE, "is the red square left of the blue circle?", 336) == (0, -100, 0)
    assert relation_targets(SCENE, "is the blue circle right of the red square?", 336) == (1, -100, 1)
    # blue circle (50, 50) vs green star (150, 250): left of and above it, both beyond 0.08 * 336 px
    assert relation_targets(SCENE, "is the blue circle below the green star?", 336) == (1, 1, 3)
    assert relation_targets(SCENE, "is the green star above the blue circle?", 336) == (0, 0, 2)
    for q in ("is the red square on the left or the right?", "how many objects are there?"):
        assert relation_targets(SCENE, q, 336) is None


def test_relation_rows_pick_the_relation_answer_rows():
    tok = build_tokenizer()
    qas = [
        ("how many objects are there?", "3", "count"),
        ("is the blue circle below the green star?", "no", "relation"),
    ]
    seqs = [ts.SequenceBuilder(tok).build(4, qas)]
    rows, targets = ts.relation_rows(seqs, [qas], [SCENE], 336)
    assert rows == [ts.answer_rows(seqs)[1]]
    assert targets.tolist() == [[1, 1, 3]]
    only_count = [ts.SequenceBuilder(tok).build(4, qas[:1])]
    assert ts.relation_rows(only_count, [qas[:1]], [SCENE], 336)[1].shape == (0, 3)


def test_pointer_rows_point_the_relation_answer_row_at_its_two_names():
    tok = build_tokenizer()
    qas = [
        ("is the blue circle below the green star?", "no", "relation"),
        ("is the red square on the left or the right?", "right", "position"),
        ("is the green star above the red square?", "no", "relation"),
    ]
    seqs = [ts.SequenceBuilder(tok).build(4, qas)]
    rows, groups = ts.pointer_rows(seqs, [qas], [SCENE])
    answers = ts.answer_rows(seqs)
    assert rows == [answers[0], answers[2]]
    names = [[tok.convert_ids_to_tokens(seqs[0][0][int(g)]) for g in gs] for gs in groups]
    assert names == [["circle", "star", "below"], ["star", "square", "above"]]  # subject, reference, word
    # the pointed-at words come before the row, inside its own QA
    _rows, allowed, target = ts.retrieval_masks(seqs, rows, groups, 3)
    assert (target <= allowed[:, None]).all() and target.sum(-1).tolist() == [[1, 1, 1], [1, 1, 1]]


def test_absent_mention_position_is_the_shape_word_of_an_absent_object_only():
    toks = question_tokens("is there a purple star?")
    assert toks[absent_mention_position(SCENE, "is there a purple star?")] == "star"
    for q in (
        "is there a green star?",
        "what shape is the red object?",
        "is the red square above the blue circle?",
    ):
        assert absent_mention_position(SCENE, q) is None


def test_null_rows_send_an_absent_existence_question_to_the_sink():
    tok = build_tokenizer()
    qas = [("is there a purple star?", "no", "existence"), ("is there a green star?", "yes", "existence")]
    seqs = [ts.SequenceBuilder(tok).build(4, qas)]
    patches = [[torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3])]]
    answers = ts.answer_rows(seqs)
    off, _, _ = ts.retrieval_rows(seqs, [qas], [SCENE], patches, 2, 24, 14, tok)
    assert off[0] == answers[1]  # by default the absent object's question adds no row
    rows, groups, labels = ts.retrieval_rows(seqs, [qas], [SCENE], patches, 2, 24, 14, tok, True, True)
    names = [tok.convert_ids_to_tokens(seqs[0][0][p]) for _b, p in rows]
    assert names == [":", "star", ":", "star"] and rows[0] == answers[0] and rows[2] == answers[1]
    assert [[g.tolist() for g in gs] for gs in groups] == [
        [[0]],
        [[0]],
        [[3, 4]],
        [[3, 4]],
    ]  # sink; green star
    assert labels[0] == [dict.fromkeys(READOUT_KEYS, -100)] * 2
    assert tok.convert_ids_to_tokens(seqs[0][0][0]) == "<s>"
    _rows, allowed, target = ts.retrieval_masks(seqs, rows, groups, 2)
    assert (target <= allowed[:, None]).all() and allowed[:, 0].all()  # the sink is visible to every row


def test_pointer_rows_for_all_families_point_at_the_naming_word():
    tok = build_tokenizer()
    qas = [
        ("what shape is the red object?", "square", "shape"),
        ("is there a purple star?", "no", "existence"),
        ("is the blue circle below the green star?", "no", "relation"),
        ("how many objects are there?", "3", "count"),
    ]
    seqs = [ts.SequenceBuilder(tok).build(4, qas)]
    assert ts.pointer_rows(seqs, [qas], [SCENE])[0] == [ts.answer_rows(seqs)[2]]  # default: relations
    rows, groups = ts.pointer_rows(seqs, [qas], [SCENE], all_families=True)
    assert rows == ts.answer_rows(seqs)
    names = [[tok.convert_ids_to_tokens(seqs[0][0][int(g)]) for g in gs] for gs in groups]
    assert names == [["red"], ["star"], ["circle", "star", "below"], ["objects"]]
    _rows, allowed, target = ts.retrieval_masks(seqs, rows, groups, 3)
    assert (target <= allowed[:, None]).all() and (target.sum(-1) == 1).all()


def test_layer_output_tap_keeps_the_layer_output_and_removes_cleanly():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=50,
    )
    lm = LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    tap = ts.LayerOutputTap(lm.layers[1])
    with torch.no_grad():
        out = lm(ids, output_hidden_states=True)
    torch.testing.assert_close(tap.out, out.hidden_states[2], rtol=0, atol=0)  # [0] is the embeddings
    tap.remove()
    tap.out = None
    with torch.no_grad():
        lm(ids)
    assert tap.out is None


def _seqs(tok, n_img=5):
    builder = ts.SequenceBuilder(tok)
    return [
        builder.build(n_img, [("what color is the star?", "green", "colour"), ("how many?", "3", "count")]),
        builder.build(n_img, [("is there a red square?", "yes", "existence")]),
    ]


def test_block_mask_isolates_qas():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1]])
    m = ts.block_mask(seg)[0]
    assert m[4, :5].tolist() == [True, True, True, True, True]  # image + own QA, causal
    assert m[6, :7].tolist() == [True, True, True, False, False, True, True]  # never the first QA
    assert not m[2, 3]  # causal
    assert m[7].tolist() == [False] * 7 + [True]  # padding attends to itself only


def test_retrieval_masks_alternate_groups_over_heads():
    tok = build_tokenizer()
    seqs = _seqs(tok)
    rows = ts.answer_rows(seqs)
    assert len(rows) == 3
    groups = [[torch.tensor([1, 2])], [torch.tensor([3])], [torch.tensor([1]), torch.tensor([4, 5])]]
    r, allowed, target = ts.retrieval_masks(seqs, rows, groups, heads=3)
    assert r.tolist() == [list(x) for x in rows]
    assert target.shape == (3, 3, allowed.shape[1])
    assert target[0].nonzero()[:, 1].tolist() == [1, 2, 1, 2, 1, 2]  # one group: every head
    assert target[2, 0].nonzero().flatten().tolist() == [1]  # two groups: heads alternate
    assert target[2, 1].nonzero().flatten().tolist() == [4, 5]
    assert target[2, 2].nonzero().flatten().tolist() == [1]
    seg = torch.tensor(seqs[0][2])
    b, p = rows[1]
    assert (
        allowed[1, : len(seg)].tolist()
        == (((seg == 0) | (seg == seg[p])) & (torch.arange(len(seg)) <= p)).tolist()
    )


def test_retrieval_loss_matches_eager_attention():
    """-log of the softmax mass on the targets, per head, from the tap's recomputation == from the
    probabilities an eager Llama layer returns (the same mask, positions and RoPE)."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    seqs = _seqs(tok)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager",
    )  # fmt: skip
    lm = LlamaModel(cfg).eval()
    L = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    seg = torch.full((len(seqs), L), -1)
    pos = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, (s_ids, _t, s_seg, s_pos) in enumerate(seqs):
        ids[b, : len(s_ids)], seg[b, : len(s_ids)] = torch.tensor(s_ids), torch.tensor(s_seg)
        pos[b, : len(s_ids)] = torch.tensor(s_pos)
    mask = ts.block_mask(seg)[:, None]
    # eager adds a 4-D mask to the scores, so it needs the additive form; training runs SDPA on the bool
    # mask itself (True = may attend), and both must give the same hidden states
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    rows = ts.answer_rows(seqs)
    groups = [[torch.tensor([1, 3])], [torch.tensor([2])], [torch.tensor([1]), torch.tensor([4, 5])]]
    tap = ts.RetrievalTap(lm.layers[1].self_attn, heads=2)
    seen = {}
    o_hook = lm.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=additive, position_ids=pos, output_attentions=True)
        got, retrieved = tap.loss(*ts.retrieval_masks(seqs, rows, groups, heads=2))
        # rows in any order (sequences interleaved): the same per-row results, in that order
        back = list(range(len(rows)))[::-1]
        got_back, retrieved_back = tap.loss(
            *ts.retrieval_masks(seqs, [rows[i] for i in back], [groups[i] for i in back], heads=2)
        )
    o_hook.remove()
    assert len({b for b, _p in rows}) > 1
    torch.testing.assert_close(retrieved_back, retrieved[back], rtol=0, atol=0)
    torch.testing.assert_close(got_back, got, rtol=1e-6, atol=1e-6)
    # what the tap says each head retrieved == the head's slice of the layer's own input to o_proj
    hd = cfg.hidden_size // cfg.num_attention_heads
    want_out = torch.stack([seen["x"][b, p].view(-1, hd)[:2] for b, p in rows])
    torch.testing.assert_close(retrieved, want_out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lm.config._attn_implementation = "sdpa"
        sdpa = lm(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    tap.remove()
    real = seg >= 0
    torch.testing.assert_close(sdpa[real], out.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    probs = out.attentions[1]  # (B, heads, L, L)
    want = []
    for (b, p), g in zip(rows, groups, strict=True):
        for h in range(2):
            want.append(-torch.log(probs[b, h, p, g[h % len(g)]].sum()))
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-5, atol=1e-5)


def test_train_step_loss_reports_word_hits_per_qa():
    torch.manual_seed(0)
    model, _proc, tok = ts.build_untrained("shapes-llava")
    model.model.language_model.config._attn_implementation = "sdpa"
    seqs = _seqs(tok, n_img=576)
    feats = torch.randn(2, 1, 576, 768)
    hits: list = []
    _loss, _c, _t, w_correct, w_total = ts.train_step_loss(
        model, "shapes-llava", feats, None, seqs, tok.image_token_id, tok.pad_token_id, tok.eos_token_id, hits
    )
    assert len(hits) == w_total == 3  # one answer word per QA
    assert sum(h for *_, h in hits) == w_correct
    assert sorted((b, k) for b, k, _ in hits) == [(0, 1), (0, 2), (1, 1)]


def test_main_two_steps_end_to_end(tmp_path):
    report = ts.main(
        [
            *("--model", "shapes-llava", "--images", "8", "--qas", "6", "--qas-per-seq", "4"),
            *("--steps", "2", "--batch", "2", "--eval-n", "7", "--threads", "1", "--attn-heads", "2"),
            *("--split-relations", "--mention-rows", "--readout-weight", "1", "--rope-theta", "1e6"),
            *("--feature-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "w")),
            *("--results", str(tmp_path / "r.json")),
        ]
    )
    assert report["steps_done"] == 2
    assert set(report["test_accuracy_per_family"]) == set(FAMILIES)
    first = report["train_log"][0]
    assert set(first["word_acc_per_family"]) <= set(FAMILIES) and first["word_acc_per_family"]
    assert json.loads((tmp_path / "r.json").read_text())["test_accuracy"] == report["test_accuracy"]
    assert (tmp_path / "w" / "trained.safetensors").is_file()
    assert report["hyper_parameters"]["readout_weight"] == 1.0 and "readout_loss" in first
    assert json.loads((tmp_path / "w" / "config.json").read_text())["text_config"]["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": 1e6,
    }


def test_main_goes_on_from_a_weights_folder_with_the_relation_loss(tmp_path):
    common = [
        *("--model", "shapes-llava", "--images", "8", "--qas", "6", "--qas-per-seq", "6"),
        *("--batch", "4", "--eval-n", "7", "--threads", "1", "--attn-heads", "2"),
        *("--split-relations", "--feature-cache", str(tmp_path / "cache")),
    ]
    ts.main(
        [*common, "--steps", "1", "--rope-theta", "1e6", "--out", str(tmp_path / "a")]
        + ["--results", str(tmp_path / "a.json")]
    )
    assert ts.weights_rope_theta(tmp_path / "a") == 1e6
    report = ts.main(
        [
            *common,
            *("--steps", "3", "--relation-weight", "1", "--init-from", str(tmp_path / "a")),
            *("--pointer-weight", "1", "--pointer-heads", "3", "--pointer-all", "--null-rows"),
            *("--mention-rows", "--readout-weight", "1"),
            *("--out", str(tmp_path / "b"), "--results", str(tmp_path / "b.json")),
        ]
    )
    assert report["hyper_parameters"]["relation_weight"] == 1.0
    # no --rope-theta: the model goes on with the RoPE base its weights were trained with
    assert report["hyper_parameters"]["rope_theta"] == 1e6 and ts.weights_rope_theta(tmp_path / "b") == 1e6
    assert all("relation_loss" in row and "pointer_loss" in row for row in report["train_log"])
    with pytest.raises(ValueError, match="--init-from='nowhere' is invalid"):
        ts.main([*common, "--steps", "1", "--init-from", "nowhere", "--out", str(tmp_path / "c")])


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--model", "shapes-llava-next", "--relation-weight", "1"], "--relation-weight=1.0"),
        (["--model", "shapes-llava-next", "--pointer-weight", "1"], "--pointer-weight=1.0"),
        (["--model", "shapes-llava", "--pointer-weight", "-1"], "--pointer-weight=-1.0"),
        (["--model", "shapes-llava", "--pointer-all"], "--pointer-all"),
        (["--model", "shapes-llava", "--attn-weight", "0", "--null-rows"], "--null-rows"),
    ],
)
def test_relation_losses_reject_bad_weights_before_any_work(argv, field):
    with pytest.raises(ValueError, match=re.escape(field) + " is invalid"):
        ts.main(argv)
