"""Loaders for the official benchmark formats, on the fixtures in tests/fixtures/eval/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmcompress.evals import datasets as D

FIX = Path(__file__).parent / "fixtures" / "eval"
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def _pixels(s: D.EvalSample) -> tuple:
    img = s.load_image()
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    return img.getpixel((0, 0))


def test_vqav2():
    ss = D.load_vqav2(FIX / "vqav2")
    assert [s.id for s in ss] == ["1001", "1002", "1003"]
    assert ss[0].prompt == "What color is the bus?" + SHORT and ss[0].question == "What color is the bus?"
    assert len(ss[0].target) == 10 and ss[0].meta == {"image_id": 42, "answer_type": "other"}
    assert ss[0].image.name == "COCO_val2014_000000000042.jpg"
    assert _pixels(ss[0])[0] > 150 and _pixels(ss[2])[2] > 150  # the right COCO image per question


def test_vqav2_testdev_has_no_targets_and_uses_test2015_images():
    (s,) = D.load_vqav2(FIX / "vqav2_testdev")
    assert s.target is None and s.image.parent.name == "test2015"
    assert s.image.name == "COCO_test2015_000000000005.jpg"
    _pixels(s)


def test_gqa():
    ss = D.load_gqa(FIX / "gqa")
    assert [(s.id, s.target, s.meta["structural"]) for s in ss] == [
        ("201", "yes", "verify"),
        ("202", "cup", "query"),
        ("203", "left", "query"),
    ]
    assert ss[2].prompt == "Which side is the dog on?" + SHORT and ss[2].image.name == "n200.jpg"
    _pixels(ss[2])


def test_textvqa_with_and_without_ocr():
    plain = D.load_textvqa(FIX / "textvqa")
    ocr = D.load_textvqa(FIX / "textvqa", ocr=True)
    assert plain[0].prompt == "what brand is the camera?" + SHORT
    assert ocr[0].prompt == "what brand is the camera?\nReference OCR token: dakota, digital, camera" + SHORT
    assert ocr[1].prompt == "what number is on the shirt?\nReference OCR token: 23" + SHORT
    assert [s.id for s in ocr] == ["34602", "34603"] and len(ocr[1].target) == 10
    _pixels(ocr[1])
    # the task table knows both variants
    assert D.get_task("textvqa_ocr").options == {"ocr": True} and D.get_task("textvqa_val").name == "textvqa"


def test_textvqa_ocr_tokens_inside_entries(tmp_path):
    import json

    data = json.loads((FIX / "textvqa" / "TextVQA_0.5.1_val.json").read_text())
    for e in data["data"]:
        e["ocr_tokens"] = ["own", "tokens"]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    ss = D.load_textvqa(tmp_path, ocr=True)  # no OCR file needed
    assert "Reference OCR token: own, tokens" in ss[0].prompt


def test_pope():
    ss = D.load_pope(FIX / "pope")
    assert [s.id for s in ss][:2] == ["adversarial/1", "adversarial/2"] and ss[4].id == "random/1"
    assert [s.target for s in ss] == ["yes", "no"] * 4
    assert ss[0].prompt == "Is there a dog in the image?" + SHORT
    assert {s.meta["category"] for s in ss} == {"adversarial", "random"}
    _pixels(ss[0])
    only = D.load_pope(FIX / "pope", categories=["random"])
    assert len(only) == 4
    with pytest.raises(ValueError, match="categories"):
        D.load_pope(FIX / "pope", categories=["popular"])


def test_mme_both_layouts():
    ss = D.load_mme(FIX / "mme" / "MME_Benchmark_release_version")
    assert len(ss) == 8 and len({s.id for s in ss}) == 8
    art = [s for s in ss if s.meta["subtask"] == "artwork"]
    assert art[0].image.parent.name == "images" and art[0].meta["image"] == "10002.jpg"
    # the yes/no instruction is replaced by the short-answer one (lmms-eval)
    assert art[0].prompt == "Is this artwork created by Donatello?" + SHORT
    assert art[0].question.endswith("Please answer yes or no.") and art[0].target == "Yes"
    cr = [s for s in ss if s.meta["subtask"] == "commonsense_reasoning"]
    assert cr[0].image.suffix == ".png"
    for s in (art[0], cr[0]):
        _pixels(s)
    with pytest.raises(ValueError, match="subtasks"):
        D.load_mme(FIX / "mme" / "MME_Benchmark_release_version", subtasks=["nope"])


def test_scienceqa_img():
    ss = D.load_scienceqa_img(FIX / "scienceqa")
    assert [s.id for s in ss] == ["11", "12"]  # 13 has no image, 14 is train
    assert ss[0].prompt == (
        "Context: Penguins live in cold places.\n"
        "Which animal's feet are also adapted for walking on ice?\nA. polar bear\nB. camel" + LETTER
    )
    assert ss[1].prompt == "Which of these states is farthest north?\nA. Texas\nB. Maine\nC. Florida" + LETTER
    assert ss[1].target == "B" and ss[1].meta["choices"] == ["Texas", "Maine", "Florida"]
    _pixels(ss[0])
    with pytest.raises(ValueError, match="split"):
        D.load_scienceqa_img(FIX / "scienceqa", split="minival")


def test_mmbench_generates_circular_copies():
    ss = D.load_mmbench(FIX / "mmbench")
    by_id = {s.id: s for s in ss}
    q0 = [by_id[str(k * 1_000_000)] for k in range(4)]
    assert [s.meta["options"]["A"] for s in q0] == ["red", "green", "blue", "black"]  # rotations
    assert [s.target for s in q0] == ["A", "D", "C", "B"]  # the answer ("red") follows its option
    assert all(s.meta["options"][s.target] == "red" for s in q0)
    assert [s.meta["rotation"] for s in q0] == [0, 1, 2, 3] and {s.meta["group"] for s in q0} == {0}
    assert q0[0].prompt == (
        "Look at the whole picture.\nWhat is the main colour of the image?\n"
        "A. red\nB. green\nC. blue\nD. black" + LETTER
    )
    q1 = by_id["1"]
    assert q1.prompt.startswith("Is the image bright?\nA. yes\nB. no")  # "nan" hint dropped
    assert by_id["1000001"].target == "A" and by_id["1000001"].meta["options"] == {"A": "no", "B": "yes"}
    assert _pixels(q0[0])[0] > 200
    assert len(D.load_mmbench(FIX / "mmbench", circular=False)) == 2


def test_mmbench_official_circular_file_with_image_references():
    ss = D.load_mmbench(FIX / "mmbench_circular")
    assert [s.id for s in ss] == ["1", "1000001"]  # copies already there: nothing generated
    assert _pixels(ss[1]) == _pixels(ss[0])  # image "1" refers to row index 1


def test_shapesvqa_matches_compare_samples():
    from mmcompress.evals.compare import eval_samples

    ss = D.load_shapesvqa(n=5, seed=1)
    ref = eval_samples("shapes-llava", 5, 1)
    assert [(s.question, s.target, s.meta["family"]) for s in ss] == [
        (r.question, r.answer, r.family) for r in ref
    ]
    assert ss[0].load_image().size == (336, 336)


def test_missing_files_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="VQAv2 questions"):
        D.load_vqav2(tmp_path)
    with pytest.raises(FileNotFoundError, match="POPE"):
        D.load_pope(tmp_path)
    with pytest.raises(ValueError, match="task='vqa3' is unknown; allowed: .*gqa"):
        D.get_task("vqa3")
    # several candidate files: refuse to guess
    shutil.copy(FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "a_questions.json")
    shutil.copy(FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "b_questions.json")
    with pytest.raises(ValueError, match="several"):
        D.load_vqav2(tmp_path)
    s = D.load_vqav2(tmp_path, questions=tmp_path / "a_questions.json")[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        s.load_image()
