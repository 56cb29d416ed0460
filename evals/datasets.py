"""Loaders for the official local release formats of the VQA benchmarks, plus ShapesVQA.

Every loader returns a list of :class:`EvalSample` in a fixed order (the order of the official file),
with the prompt the LLaVA-1.5 evaluation scripts / lmms-eval give the model and the target the task's
metric needs. Images are opened lazily, when the runner reaches the sample.

Expected layouts (``--data DIR``; the names are those of the official downloads):

==============  ===========================================================================================
vqav2           ``v2_OpenEnded_mscoco_<sub>_questions.json`` (+ ``v2_mscoco_<sub>_annotations.json`` when
                scored locally; test-dev has none) and COCO images ``<sub>/COCO_<sub>_<id:012d>.jpg``
gqa             ``testdev_balanced_questions.json`` and ``images/<imageId>.jpg``
textvqa(_ocr)   ``TextVQA_0.5.1_val.json``, ``train_images/<image_id>.jpg``; the ``_ocr`` variant adds the
                Rosetta OCR tokens (``TextVQA_Rosetta_OCR_v0.2_val.json``, or ``ocr_tokens`` in the entries)
pope            ``coco_pope_{adversarial,popular,random}.json`` (JSON lines) and ``val2014/<image>``
mme             ``MME_Benchmark_release_version/<subtask>/``: either ``images/`` + ``questions_answers_YN/``
                or image files with same-named ``.txt`` files (two ``question<TAB>answer`` lines)
scienceqa_img   ``problems.json``, ``pid_splits.json`` and ``images/test/<pid>/image.png``; the IMG subset
                is the test problems that have an image
mmbench         ``MMBench_DEV_EN.tsv`` (base64 images; circular copies at ``index + k * 1e6``, generated
                here when the file holds only the originals)
shapesvqa       generated (no files): ``evals.shapesvqa`` test split
==============  ===========================================================================================
"""

from __future__ import annotations

import base64
import csv
import io
import json
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import metrics

__all__ = [
    "ALIASES",
    "EvalSample",
    "TASKS",
    "Task",
    "get_task",
    "load_gqa",
    "load_mmbench",
    "load_mme",
    "load_pope",
    "load_scienceqa_img",
    "load_shapesvqa",
    "load_textvqa",
    "load_vqav2",
]

#: the LLaVA-1.5 / lmms-eval instruction for short answers
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
#: ... and for multiple choice
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
#: MME questions end with this; lmms-eval replaces it by :data:`SHORT_ANSWER`
_MME_SUFFIX = " Please answer yes or no."
_MMB_STRIDE = 1_000_000  # MMBench circular copies live at index + k * 1e6


@dataclass
class EvalSample:
    """One evaluation item.

    ``id`` is unique within the task (a string, the JSONL key); ``prompt`` is the full instruction for a
    chat model, ``question`` the bare question (what the embedded ShapesVQA models were trained on);
    ``target`` is what the metric compares against (10 answers for VQA accuracy, a string, an option
    letter, or None when the split has no public answers); ``meta`` carries what the summary groups by.
    """

    id: str
    question: str
    prompt: str
    target: Any
    image: Path | bytes | Image.Image | Callable[[], Image.Image] | None
    meta: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        src = self.image
        if src is None:
            raise ValueError(f"sample {self.id!r} has no image")
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, bytes):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, Path):
            if not src.is_file():
                raise FileNotFoundError(f"sample {self.id!r}: image {src} does not exist")
            img = Image.open(src)
        else:
            img = src()
        return img.convert("RGB")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _one(root: Path, pattern: str, what: str, required: bool = True) -> Path | None:
    """The single file in ``root`` matching ``pattern`` (sorted); a clear error for none or several."""
    hits = sorted(Path(root).glob(pattern))
    if len(hits) == 1:
        return hits[0]
    if not hits:
        if required:
            raise FileNotFoundError(f"no {what} ({pattern}) in {root}")
        return None
    names = ", ".join(h.name for h in hits)
    raise ValueError(f"several {what} files in {root}: {names}; pass the one to use explicitly")


def _first_dir(root: Path, names: Sequence[str]) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return root


# ----------------------------------------------------------------------------------------------------------
# VQAv2


def load_vqav2(
    root: str | Path,
    *,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
) -> list[EvalSample]:
    """VQAv2 from the official questions (+ annotations) JSON and COCO images.

    Targets are the 10 annotator answers; without an annotations file (test-dev) they are None and
    only predictions are produced (the runner writes the EvalAI submission file).
    """
    root = Path(root)
    qpath = Path(questions) if questions else _one(root, "*questions*.json", "VQAv2 questions")
    qdata = _read_json(qpath)
    apath = Path(annotations) if annotations else _one(root, "*annotations*.json", "annotations", False)
    answers: dict[int, dict] = {}
    if apath is not None:
        answers = {a["question_id"]: a for a in _read_json(apath)["annotations"]}
    sub = qdata.get("data_subtype", "val2014")
    img_sub = "test2015" if str(sub).startswith("test") else sub  # test-dev images are in test2015
    img_dir = Path(images) if images else _first_dir(root, (img_sub, "images"))
    out = []
    for q in qdata["questions"]:
        ann = answers.get(q["question_id"])
        target = [a["answer"] for a in ann["answers"]] if ann else None
        meta = {"image_id": q["image_id"]}
        if ann:
            meta["answer_type"] = ann.get("answer_type")
        out.append(
            EvalSample(
                id=str(q["question_id"]),
                question=q["question"],
                prompt=q["question"] + SHORT_ANSWER,
                target=target,
                image=img_dir / f"COCO_{img_sub}_{int(q['image_id']):012d}.jpg",
                meta=meta,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# GQA


def load_gqa(
    root: str | Path, *, questions: str | Path | None = None, images: str | Path | None = None
) -> list[EvalSample]:
    """GQA from a balanced questions JSON (``{qid: {"imageId", "question", "answer", "types", ...}}``)."""
    root = Path(root)
    qpath = Path(questions) if questions else _one(root, "*questions*.json", "GQA questions")
    img_dir = Path(images) if images else _first_dir(root, ("images",))
    out = []
    for qid, q in _read_json(qpath).items():
        out.append(
            EvalSample(
                id=str(qid),
                question=q["question"],
                prompt=q["question"] + SHORT_ANSWER,
                target=q.get("answer"),
                image=img_dir / f"{q['imageId']}.jpg",
                meta={"structural": q.get("types", {}).get("structural")},
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# TextVQA


def load_textvqa(
    root: str | Path,
    *,
    ocr: bool = False,
    split: str = "val",
    questions: str | Path | None = None,
    ocr_file: str | Path | None = None,
    images: str | Path | None = None,
) -> list[EvalSample]:
    """TextVQA 0.5.1; with ``ocr`` the prompt lists the OCR tokens as LLaVA-1.5 does
    (``"<question>\\nReference OCR token: a, b, c\\nAnswer the question using a single word or phrase."``).
    """
    root = Path(root)
    qpath = Path(questions) if questions else _one(root, f"TextVQA_0.5.1_{split}.json", "TextVQA questions")
    entries = _read_json(qpath)["data"]
    tokens: dict[str, list[str]] = {}
    if ocr and not all("ocr_tokens" in e for e in entries):
        opath = Path(ocr_file) if ocr_file else _one(root, f"*OCR*_{split}.json", "TextVQA OCR tokens")
        tokens = {str(e["image_id"]): e["ocr_tokens"] for e in _read_json(opath)["data"]}
    img_dir = Path(images) if images else _first_dir(root, ("train_images", "test_images", "images"))
    out = []
    for e in entries:
        prompt = e["question"]
        if ocr:
            words = e["ocr_tokens"] if "ocr_tokens" in e else tokens.get(str(e["image_id"]), [])
            prompt += "\nReference OCR token: " + ", ".join(words)
        out.append(
            EvalSample(
                id=str(e["question_id"]),
                question=e["question"],
                prompt=prompt + SHORT_ANSWER,
                target=e.get("answers"),
                image=img_dir / f"{e['image_id']}.jpg",
                meta={"image_id": e["image_id"]},
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# POPE


def load_pope(
    root: str | Path, *, categories: Sequence[str] | None = None, images: str | Path | None = None
) -> list[EvalSample]:
    """POPE question files (JSON lines ``{"question_id", "image", "text", "label"}``), one per category.

    ``categories`` picks among the ``coco_pope_<category>.json`` files present (default: all of them, in
    sorted order). Question ids repeat across files, so sample ids are ``"<category>/<question_id>"``.
    """
    root = Path(root)
    files = {p.stem.split("pope_", 1)[1]: p for p in sorted(root.glob("*pope_*.json"))}
    if not files:
        raise FileNotFoundError(f"no POPE question files (*pope_*.json) in {root}")
    if categories is not None:
        unknown = [c for c in categories if c not in files]
        if unknown:
            raise ValueError(f"categories={list(categories)!r} is invalid; present: {sorted(files)}")
        files = {c: files[c] for c in categories}
    img_dir = Path(images) if images else _first_dir(root, ("val2014", "images"))
    out = []
    for cat, path in files.items():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from None
            out.append(
                EvalSample(
                    id=f"{cat}/{q['question_id']}",
                    question=q["text"],
                    prompt=q["text"] + SHORT_ANSWER,
                    target=q["label"].strip().lower(),
                    image=img_dir / q["image"],
                    meta={"category": cat},
                )
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# MME

_IMAGE_EXT = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def load_mme(root: str | Path, *, subtasks: Sequence[str] | None = None) -> list[EvalSample]:
    """MME: every subtask folder present (perception then cognition order), two questions per image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder {root} does not exist")
    known = metrics.MME_PERCEPTION + metrics.MME_COGNITION
    if subtasks is not None:
        bad = [s for s in subtasks if s not in known]
        if bad:
            raise ValueError(f"subtasks={list(subtasks)!r} has unknown names {bad}; allowed: {known}")
    wanted = [s for s in (subtasks or known) if (root / s).is_dir()]
    if not wanted:
        raise FileNotFoundError(f"no MME subtask folder ({', '.join(known)}) in {root}")
    out = []
    for sub in wanted:
        folder = root / sub
        if (folder / "questions_answers_YN").is_dir():
            txt_dir, img_dir = folder / "questions_answers_YN", folder / "images"
        else:
            txt_dir = img_dir = folder
        for txt in sorted(txt_dir.glob("*.txt")):
            image = next(
                (img_dir / (txt.stem + e) for e in _IMAGE_EXT if (img_dir / (txt.stem + e)).is_file()), None
            )
            if image is None:
                raise FileNotFoundError(f"MME {sub}: no image for {txt.name} in {img_dir}")
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                if "\t" not in line:
                    raise ValueError(f"{txt}:{k + 1}: expected 'question<TAB>answer', got {line!r}")
                q, a = line.rsplit("\t", 1)
                q = q.strip()
                out.append(
                    EvalSample(
                        id=f"{sub}/{image.name}/{k}",
                        question=q,
                        prompt=q.replace(_MME_SUFFIX, "") + SHORT_ANSWER,
                        target=a.strip(),
                        image=image,
                        meta={"subtask": sub, "image": image.name},
                    )
                )
    return out


# ----------------------------------------------------------------------------------------------------------
# ScienceQA-IMG


def _options_block(options: Sequence[str]) -> str:
    return "\n".join(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options))


def load_scienceqa_img(root: str | Path, *, split: str = "test") -> list[EvalSample]:
    """ScienceQA ``problems.json`` + ``pid_splits.json``: the problems of ``split`` that have an image.

    Prompt (LLaVA-1.5 / lmms-eval): ``"Context: <hint>\\n"`` when there is a hint, the question, the
    options as ``"A. ..."`` lines, then the letter instruction. Target: the answer's letter.
    """
    root = Path(root)
    problems = _read_json(root / "problems.json")
    splits = _read_json(root / "pid_splits.json")
    if split not in splits:
        raise ValueError(f"split={split!r} is not in pid_splits.json; present: {sorted(splits)}")
    img_root = _first_dir(root, ("images",))
    out = []
    for pid in splits[split]:
        p = problems[str(pid)]
        if not p.get("image"):
            continue
        context = f"Context: {p['hint']}\n" if p.get("hint") else ""
        prompt = f"{context}{p['question']}\n{_options_block(p['choices'])}{LETTER_ANSWER}"
        out.append(
            EvalSample(
                id=str(pid),
                question=p["question"],
                prompt=prompt,
                target=string.ascii_uppercase[int(p["answer"])],
                image=img_root / split / str(pid) / p["image"],
                meta={"choices": list(p["choices"]), "subject": p.get("subject")},
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# MMBench


def _nan(v: str | None) -> bool:
    return v is None or str(v).strip() == "" or str(v).strip().lower() == "nan"


def load_mmbench(
    root: str | Path, *, tsv: str | Path | None = None, circular: bool = True
) -> list[EvalSample]:
    """MMBench TSV (``index, question, hint, A..E, answer, category, image(base64), ...``).

    With ``circular`` and a file that holds only the original questions, each question with n options
    gets its n-1 rotations at ``index + k * 1e6`` (option i of rotation k is original option (i+k) mod n),
    as in the official circular files. An image field that is a short number refers to that index's
    image (how the official files store the copies). Targets are letters; the summary groups rows by
    ``index % 1e6``.
    """
    path = Path(tsv) if tsv else _one(Path(root), "*.tsv", "MMBench TSV")
    csv.field_size_limit(sys.maxsize)  # base64 images
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "index" not in rows[0]:
        raise ValueError(f"{path}: expected a TSV with an 'index' column")
    by_index = {int(r["index"]): r for r in rows}
    has_copies = any(i >= _MMB_STRIDE for i in by_index)
    letters = [c for c in "ABCDE" if c in rows[0]]

    def image_of(r: dict) -> bytes:
        field_ = r["image"]
        if len(field_) <= 64 and field_.strip().isdigit():
            field_ = by_index[int(field_)]["image"]
        return base64.b64decode(field_)

    def make(idx: int, r: dict, options: list[str], answer: str | None, rotation: int) -> EvalSample:
        opts = {string.ascii_uppercase[i]: o for i, o in enumerate(options)}
        head = "" if _nan(r.get("hint")) else r["hint"] + "\n"
        prompt = f"{head}{r['question']}\n{_options_block(options)}{LETTER_ANSWER}"
        return EvalSample(
            id=str(idx),
            question=r["question"],
            prompt=prompt,
            target=answer,
            image=lambda r=r: Image.open(io.BytesIO(image_of(r))),
            meta={
                "group": idx % _MMB_STRIDE,
                "rotation": idx // _MMB_STRIDE,
                "options": opts,
                "category": r.get("category"),
                "l2_category": r.get("l2-category") or r.get("L2-category"),
            },
        )

    out = []
    for r in rows:
        idx = int(r["index"])
        options = [r[c] for c in letters if not _nan(r.get(c))]
        answer = None if _nan(r.get("answer")) else r["answer"].strip()
        out.append(make(idx, r, options, answer, idx // _MMB_STRIDE))
        if circular and not has_copies:
            n = len(options)
            for k in range(1, n):
                rot = options[k:] + options[:k]
                ans = None
                if answer is not None:
                    ans = string.ascii_uppercase[(string.ascii_uppercase.index(answer) - k) % n]
                out.append(make(idx + k * _MMB_STRIDE, r, rot, ans, k))
    return out


# ----------------------------------------------------------------------------------------------------------
# ShapesVQA


def load_shapesvqa(
    root: str | Path | None = None, *, n: int = 100, seed: int = 0, model_name: str = "shapes-llava"
) -> list[EvalSample]:
    """ShapesVQA test samples, the same ones ``mmcompress compare`` uses for ``model_name``."""
    from .compare import eval_samples

    out = []
    for s in eval_samples(model_name, n, seed):
        out.append(
            EvalSample(
                id=str(s.index),
                question=s.question,
                prompt=s.question + SHORT_ANSWER,
                target=s.answer,
                image=s.image,
                meta={"family": s.family},
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Task table


@dataclass(frozen=True)
class Task:
    """A benchmark: how to load it, how to score it, and its generation length (lmms-eval defaults)."""

    name: str
    load: Callable[..., list[EvalSample]]
    summarize: Callable[[Sequence[dict]], dict]
    metric: str  # what "score" is, for tables and plots
    max_new_tokens: int = 16
    needs_data: bool = True
    options: dict = field(default_factory=dict)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("vqav2", load_vqav2, metrics.vqa_summary, "VQA accuracy"),
        Task("gqa", load_gqa, metrics.gqa_summary, "exact-match accuracy"),
        Task("textvqa", load_textvqa, metrics.vqa_summary, "VQA accuracy", options={"ocr": False}),
        Task("textvqa_ocr", load_textvqa, metrics.vqa_summary, "VQA accuracy", options={"ocr": True}),
        Task("pope", load_pope, metrics.pope_summary, "F1 (mean over categories)"),
        Task("mme", load_mme, metrics.mme_summary, "perception score"),
        Task("scienceqa_img", load_scienceqa_img, metrics.scienceqa_summary, "accuracy"),
        Task("mmbench", load_mmbench, metrics.mmbench_summary, "circular accuracy"),
        Task(
            "shapesvqa",
            load_shapesvqa,
            metrics.shapes_summary,
            "accuracy",
            max_new_tokens=4,
            needs_data=False,
        ),
    )
}
#: lmms-eval task names for the same benchmarks
ALIASES: dict[str, str] = {
    "vqav2_val": "vqav2",
    "textvqa_val": "textvqa",
    "scienceqa": "scienceqa_img",
    "mmbench_en_dev": "mmbench",
    "mmbench_en": "mmbench",
    "shapes": "shapesvqa",
}


def get_task(name: str) -> Task:
    """The :class:`Task` for a name or an lmms-eval alias; unknown names list the known ones."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        known = ", ".join(sorted(TASKS) + sorted(ALIASES))
        raise ValueError(f"task={name!r} is unknown; allowed: {known}")
    return TASKS[key]
