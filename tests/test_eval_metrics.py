"""Official benchmark metrics: normalization rules and hand-computed scores on the fixtures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmcompress.evals import datasets as D
from mmcompress.evals import metrics as M

FIX = Path(__file__).parent / "fixtures" / "eval"


def _records(samples, preds):
    assert len(samples) == len(preds)
    return [{"id": s.id, "pred": p, "target": s.target, "meta": s.meta} for s, p in zip(samples, preds)]


# -- VQA answer normalization ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("the T-shirt", "t shirt"),  # article dropped; "-" not touching a space becomes a space
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("1,000", "1000"),  # digit,digit: every listed punctuation mark is deleted
        ("yes !", "yes"),  # "!" touching a space is deleted
        ("dont", "don't"),  # contraction table
        ("couldnt've", "couldn't've"),
        ("None", "0"),
        ("A\tcat\n", "cat"),
        ("it's red", "it's red"),  # apostrophes are not punctuation here
    ],
)
def test_normalize_vqa_answer(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out_by_hand():
    answers = ["red"] * 2 + ["dark red"] * 5 + ["maroon"] * 3
    # 2 matches: the 2 annotators who gave it see 1 other match (1/3), the other 8 see 2 (2/3)
    assert M.vqa_accuracy("Red.", answers) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    # 3 matches: 3 x 2/3 + 7 x 1 -> 0.9 (not 1: the 10-choose-9 average)
    assert M.vqa_accuracy("maroon", answers) == pytest.approx(0.9)
    assert M.vqa_accuracy("dark red", answers) == 1.0
    assert M.vqa_accuracy("blue", answers) == 0.0
    assert M.vqa_accuracy("x", ["x"] + ["y"] * 9) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="answers"):
        M.vqa_accuracy("x", [])


def test_vqav2_summary_on_fixture():
    samples = D.load_vqav2(FIX / "vqav2")
    # 1001 red x2 / dark red x5 / maroon x3: "Red" -> 0.6
    # 1002 "2" x4 + "two" x3 (normalized to 2: 7 matches) / "3" x3: "two" -> 1.0
    # 1003 no x9 / yes x1: "yes" -> 0.3
    out = M.vqa_summary(_records(samples, ["Red", "two", "yes"]))
    assert out["score"] == pytest.approx((0.6 + 1.0 + 0.3) / 3)
    assert out["accuracy_number"] == 1.0 and out["accuracy_yes/no"] == pytest.approx(0.3)
    assert out["n_scored"] == 3


def test_textvqa_summary_on_fixture():
    samples = D.load_textvqa(FIX / "textvqa", ocr=True)
    # abc1: dakota x6 -> 1.0; abc2: "23" x3 + "twenty three" x2 (not a number word: stays) -> 3 matches 0.9
    out = M.vqa_summary(_records(samples, ["Dakota", "23"]))
    assert out["score"] == pytest.approx((1.0 + 0.9) / 2)


def test_vqa_summary_skips_unanswered_split():
    samples = D.load_vqav2(FIX / "vqav2_testdev")
    out = M.vqa_summary(_records(samples, ["a dog"]))
    assert out["n_scored"] == 0 and math.isnan(out["score"])


# -- exact match (GQA) -------------------------------------------------------------------------------------


def test_gqa_summary_on_fixture():
    samples = D.load_gqa(FIX / "gqa")
    # "Yes." == yes (case and punctuation ignored); "the cup" != cup (articles are not dropped); "left" ok
    out = M.gqa_summary(_records(samples, ["Yes.", "the cup", "left"]))
    assert out["score"] == pytest.approx(2 / 3)
    assert out["accuracy_verify"] == 1.0 and out["accuracy_query"] == 0.5


# -- POPE --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is no cat.", "no"),
        ("There is not a cat", "no"),
        ("Yes. No cat though.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # the POPE rule: anything without no/not/No is yes
    ],
)
def test_pope_yes_no(text, label):
    assert M.pope_yes_no(text) == label


def test_pope_summary_on_fixture():
    samples = D.load_pope(FIX / "pope")  # adversarial then random; labels yes,no,yes,no each
    preds = [
        # adversarial: yes->yes (TP), no->yes (FP), yes->no (FN), no->no (TN)
        "Yes",
        "Yes",
        "No",
        "No",
        # random: all yes: TP, FP, TP, FP
        "Yes",
        "Yes",
        "Yes",
        "Yes",
    ]
    out = M.pope_summary(_records(samples, preds))
    # adversarial: P = 1/2, R = 1/2, F1 = 1/2, acc = 2/4, yes ratio 2/4
    assert out["adversarial_precision"] == 0.5 and out["adversarial_recall"] == 0.5
    assert out["adversarial_f1"] == 0.5 and out["adversarial_accuracy"] == 0.5
    assert out["adversarial_yes_ratio"] == 0.5
    # random: P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3, acc 0.5, yes ratio 1
    assert out["random_f1"] == pytest.approx(2 / 3) and out["random_yes_ratio"] == 1.0
    assert out["score"] == out["f1"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_pope_metrics_degenerate():
    m = M.pope_metrics(["no", "no"], ["yes", "no"])  # no positive prediction: precision 0, not a crash
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="length"):
        M.pope_metrics(["yes"], [])


# -- MME ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [("Yes", "yes"), ("no.", "no"), ("Yes, it is.", "yes"), ("Not at all", "no"), ("Maybe", "other")],
)
def test_mme_yes_no(text, label):
    assert M.mme_yes_no(text) == label


def test_mme_summary_on_fixture():
    samples = D.load_mme(FIX / "mme" / "MME_Benchmark_release_version")
    order = [(s.meta["subtask"], s.meta["image"], s.target) for s in samples]
    assert [o[0] for o in order] == ["existence"] * 4 + ["artwork"] * 2 + ["commonsense_reasoning"] * 2
    preds = [
        "Yes",  # existence img 1: right
        "No",  # right
        "Yes",  # existence img 2: right
        "Yes",  # wrong
        "No",  # artwork: wrong
        "Yes",  # wrong
        "Yes",  # commonsense: right
        "No",  # right
    ]
    out = M.mme_summary(_records(samples, preds))
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; artwork 0 + 0; commonsense 100 + 100
    assert out["existence_acc"] == 75.0 and out["existence_acc_plus"] == 50.0 and out["existence"] == 125.0
    assert out["artwork"] == 0.0 and out["commonsense_reasoning"] == 200.0
    assert out["perception"] == 125.0 and out["cognition"] == 200.0 and out["total"] == 325.0
    assert out["score"] == 125.0


# -- multiple choice ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("B. Maine", "B"), ("The answer is C.", "C"), ("b", None), ("Maine", None), ("D", None)],
)
def test_scienceqa_letter(text, letter):
    assert M.scienceqa_letter(text, 3) == letter


def test_scienceqa_summary_on_fixture():
    samples = D.load_scienceqa_img(FIX / "scienceqa")
    assert [s.target for s in samples] == ["A", "B"]
    out = M.scienceqa_summary(_records(samples, ["A", "Maine"]))  # option text is not a letter: wrong
    assert out["score"] == 0.5 and out["accuracy_natural science"] == 1.0


OPTS = {"A": "red", "B": "green", "C": "blue", "D": "black"}


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("(C)", "C"),
        ("B. green", "B"),
        ("The answer is D.", "D"),
        ("A red square is in the picture", "A"),  # option text "red" alone matches
        ("A dog sits next to a blue box", "C"),  # "A" here is an article; "blue" is the option text
        ("green or blue", None),  # two option texts: ambiguous
        ("A or B", None),  # two letters
        ("purple", None),
        ("E", None),  # not an option
    ],
)
def test_match_option(text, letter):
    assert M.match_option(text, OPTS) == letter


def test_mmbench_circular_summary_on_fixture():
    samples = D.load_mmbench(FIX / "mmbench")  # 4-option q0 (answer A) and 2-option q1 (answer B), rotated
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == sorted(["0", "1000000", "2000000", "3000000", "1", "1000001"])
    preds = {}
    for s in samples:  # answer every rotation by the option text of the right answer ...
        preds[s.id] = s.meta["options"][s.target]
    preds["1000001"] = "yes"  # ... except one rotation of q1
    out = M.mmbench_summary(_records(samples, [preds[s.id] for s in samples]))
    # q0 right in all 4 rotations, q1 wrong in one of 2 -> circular 1/2; first rotations both right -> 1
    assert out["circular_accuracy"] == 0.5 and out["score"] == 0.5
    assert out["single_accuracy"] == 1.0
    assert out["accuracy_attribute_recognition"] == 1.0 and out["accuracy_image_quality"] == 0.0
    assert out["match_rate"] == 1.0 and out["n_questions"] == 2


def test_shapes_summary():
    recs = [
        {"pred": "Three", "target": "3", "meta": {"family": "count"}},
        {"pred": "red", "target": "blue", "meta": {"family": "colour"}},
    ]
    out = M.shapes_summary(recs)
    assert out["score"] == 0.5 and out["accuracy_count"] == 1.0 and out["accuracy_colour"] == 0.0
