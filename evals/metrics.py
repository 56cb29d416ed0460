"""The official scoring rules of the VQA benchmarks, as pure functions on predictions and targets.

Conventions (``shared/reference/peers-and-eval-conventions.md`` §2.2-2.3):

- **VQA accuracy** (VQAv2, TextVQA): the prediction and each of the 10 annotator answers go through the
  standard answer normalization (:func:`normalize_vqa_answer`); the score is the mean over the 10
  leave-one-annotator-out subsets of ``min(1, #matches among the other 9 / 3)``.
- **Exact match** (GQA, ScienceQA): case and punctuation ignored (lmms-eval's ``exact_match`` with
  ``ignore_case`` / ``ignore_punctuation``).
- **POPE**: the yes/no reading of the POPE evaluation script (first sentence; "no" / "not" anywhere means
  no), then accuracy, precision, recall, F1 with "yes" as the positive class, and the ratio of "yes"
  predictions.
- **MME**: the yes/no/other reading of the MME ``calculation.py``; per subtask ``acc`` (questions) plus
  ``acc+`` (images whose two questions are both right), both in %; perception = sum over the 10
  perception subtasks (max 2000), cognition = sum over the 4 cognition subtasks (max 800).
- **MMBench**: heuristic option matching (:func:`match_option`, no GPT fallback: an unmatched answer is
  wrong) and circular evaluation: a question counts only if every rotation of its options is right.

Each ``*_summary`` function takes the per-sample records the runner writes (dicts with ``pred``,
``target`` and ``meta``) and returns a flat dict of metrics plus ``"score"``: the headline number of the
task (the one papers report).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "exact_match",
    "gqa_summary",
    "mmbench_summary",
    "match_option",
    "mme_summary",
    "mme_yes_no",
    "normalize_exact",
    "normalize_vqa_answer",
    "pope_metrics",
    "pope_summary",
    "pope_yes_no",
    "scienceqa_letter",
    "scienceqa_summary",
    "shapes_summary",
    "vqa_accuracy",
    "vqa_summary",
]

# ----------------------------------------------------------------------------------------------------------
# VQA answer normalization (VQA evaluation code, ``processPunctuation`` + ``processDigitArticle``)

# Characters that are deleted when they touch a space (or the answer has a digit,digit), else become spaces.
_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit is dropped ("3.5" keeps its period, "dog." loses it).
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Misspelled contractions -> the contraction, reproducing the VQA evaluation's table.

    The table is regular, so it is generated from the contractions themselves: a word with one
    apostrophe is reached from its spelling without it ("dont" -> "don't"); a word with several is
    reached from each spelling that misses exactly one of them ("couldnt've", "couldn'tve" ->
    "couldn't've"; the spelling missing all of them is not in the table).
    """
    words = [
        "ain't",
        "aren't",
        "can't",
        "could've",
        "couldn't",
        "couldn't've",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hadn't've",
        "hasn't",
        "haven't",
        "he'd",
        "he'd've",
        "he's",
        "how'd",
        "how'll",
        "how's",
        "isn't",
        "it'd",
        "it'd've",
        "it'll",
        "ma'am",
        "mightn't",
        "mightn't've",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "not've",
        "o'clock",
        "oughtn't",
        "'ow's'at",
        "shan't",
        "she'd've",
        "should've",
        "shouldn't",
        "shouldn't've",
        "somebody'd've",
        "somebody'll",
        "somebody's",
        "someone'd",
        "someone'd've",
        "someone'll",
        "someone's",
        "something'd",
        "something'd've",
        "something'll",
        "that's",
        "there'd",
        "there'd've",
        "there're",
        "there's",
        "they'd",
        "they'd've",
        "they'll",
        "they're",
        "they've",
        "'twas",
        "wasn't",
        "we'd've",
        "we've",
        "weren't",
        "what'll",
        "what're",
        "what's",
        "what've",
        "when's",
        "where'd",
        "where's",
        "where've",
        "who'd",
        "who'd've",
        "who'll",
        "who's",
        "who've",
        "why'll",
        "why're",
        "why's",
        "won't",
        "would've",
        "wouldn't",
        "wouldn't've",
        "y'all",
        "y'all'll",
        "y'all'd've",
        "you'd",
        "you'd've",
        "you'll",
        "you're",
        "you've",
    ]
    table: dict[str, str] = {}
    for word in words:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        if len(cuts) == 1:
            table[word.replace("'", "")] = word
        else:
            for i in cuts:
                table[word[:i] + word[i + 1 :]] = word
    # Quirks of the original table, kept so that scores match it exactly: two identity entries and a
    # typo (the entries with capitals, "Im", "Ive", "Id've", never fire after lower-casing).
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    # The decision for each character looks at the whole original answer, as the reference code does.
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "") if drop_all or (p + " " in text or " " + p in text) else out.replace(p, " ")
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalization (§2.3): whitespace, punctuation, number words, articles,
    contractions. ``"Two dogs."`` -> ``"2 dogs"``, ``"the T-shirt"`` -> ``"t shirt"``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 in VQAv2 / TextVQA).

    Mean over the leave-one-annotator-out subsets of ``min(1, #matches / 3)``: with 10 answers, a
    prediction given by 4 or more annotators scores 1, by 3 scores 0.9, by 2 scores 0.6, by 1 scores 0.3.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers={answers!r} is invalid; allowed: a non-empty list of strings")
    p = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in answers]
    hits = sum(g == p for g in gts)
    # leaving out annotator j removes one match exactly when annotator j gave the prediction
    accs = [min(1.0, (hits - (g == p)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


# ----------------------------------------------------------------------------------------------------------
# Exact match (GQA, ScienceQA)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (lmms-eval ``exact_match`` options)."""
    return " ".join(str(text).lower().translate(_PUNCT_TABLE).split())


def exact_match(pred: str, target: str) -> float:
    return float(normalize_exact(pred) == normalize_exact(target))


# ----------------------------------------------------------------------------------------------------------
# POPE


def pope_yes_no(text: str) -> str:
    """The POPE script's reading: first sentence, commas removed; "no"/"not"/"No" as a word -> no."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy / precision / recall / F1 ("yes" positive) and yes-ratio of yes/no predictions."""
    if len(preds) != len(labels):
        raise ValueError(f"preds and labels differ in length: {len(preds)} vs {len(labels)}")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else float("nan"),
        "n": n,
    }


# ----------------------------------------------------------------------------------------------------------
# MME

MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def mme_yes_no(text: str) -> str:
    """MME ``calculation.py`` reading: "yes" / "no" exactly, else by the first 4 characters, else "other"."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


# ----------------------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMBench)

_LETTER_TOKEN = re.compile(r"^[(:]?([A-Z])(?:[.,:)]|\)\.|\):)?$")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str, n_choices: int) -> str | None:
    """The option letter of a ScienceQA answer, or None (scored wrong), as LLaVA's ScienceQA evaluation
    reads it: the bare letter, a letter followed by ``". "``, or a single "The answer is X." in the text."""
    letters = string.ascii_uppercase[:n_choices]
    t = text.strip()
    if len(t) == 1 and t in letters:
        return t
    if len(t) >= 3 and t[0] in letters and t[1:3] == ". ":
        return t[0]
    found = _ANSWER_IS.findall(t)
    if len(found) == 1 and found[0] in letters:
        return found[0]
    return None


def match_option(text: str, options: Mapping[str, str]) -> str | None:
    """Heuristic option matching for multiple choice (MMBench): the chosen letter, or None.

    1. Letter tokens: whitespace-split the answer; a token that is an option letter, optionally wrapped
       (``A``, ``A.``, ``(A)``, ``A)``, ``A:``), names that option if exactly one distinct letter appears.
       A bare ``A`` in an answer of more than 3 words is ignored (it may be the article).
    2. Option text: if exactly one option's text occurs in the answer (case-insensitive), that option.
    3. Otherwise None (VLMEvalKit would ask a GPT judge here; we do not, so the answer counts as wrong).
    """
    letters = {k for k, v in options.items() if v is not None and str(v) != ""}
    tokens = text.split()
    found: set[str] = set()
    for tok in tokens:
        m = _LETTER_TOKEN.match(tok)
        if not m or m.group(1) not in letters:
            continue
        if tok == "A" and len(tokens) > 3:
            continue
        found.add(m.group(1))
    if len(found) == 1:
        return found.pop()
    low = text.lower()
    hits = [k for k in sorted(letters) if str(options[k]).lower() in low]
    if len(hits) == 1:
        return hits[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# Task summaries over runner records: {"id", "pred", "target", "meta": {...}}


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def vqa_summary(records: Sequence[dict]) -> dict:
    """VQAv2 / TextVQA: mean VQA accuracy (in [0, 1]); records without answers (test-dev) are skipped."""
    scored = [r for r in records if r.get("target")]
    accs = [vqa_accuracy(r["pred"], r["target"]) for r in scored]
    by_type: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(scored, accs):
        t = r.get("meta", {}).get("answer_type")
        if t:
            by_type[t].append(a)
    out = {"score": _mean(accs), "vqa_accuracy": _mean(accs), "n_scored": len(accs)}
    out.update({f"accuracy_{t}": _mean(v) for t, v in sorted(by_type.items())})
    return out


def gqa_summary(records: Sequence[dict]) -> dict:
    """GQA: exact-match accuracy, also per structural question type."""
    accs = [exact_match(r["pred"], r["target"]) for r in records]
    by_type: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(records, accs):
        t = r.get("meta", {}).get("structural")
        if t:
            by_type[t].append(a)
    out = {"score": _mean(accs), "accuracy": _mean(accs)}
    out.update({f"accuracy_{t}": _mean(v) for t, v in sorted(by_type.items())})
    return out


def pope_summary(records: Sequence[dict]) -> dict:
    """POPE: metrics per category (adversarial / popular / random) and their mean; score = mean F1."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_cat[r.get("meta", {}).get("category", "all")].append(r)
    out: dict = {}
    per = {}
    for cat, rs in sorted(by_cat.items()):
        per[cat] = pope_metrics([pope_yes_no(r["pred"]) for r in rs], [r["target"] for r in rs])
        out.update({f"{cat}_{k}": v for k, v in per[cat].items() if k != "n"})
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[k] = _mean(m[k] for m in per.values())
    out["score"] = out["f1"]
    return out


def mme_summary(records: Sequence[dict]) -> dict:
    """MME: per subtask acc + acc+ (each in %); perception / cognition totals; score = perception."""
    by_task: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        meta = r.get("meta", {})
        ok = float(mme_yes_no(r["pred"]) == str(r["target"]).lower().strip().replace(".", ""))
        by_task[meta["subtask"]][meta["image"]].append(ok)
    out: dict = {}
    for task, images in sorted(by_task.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * _mean(answers)
        acc_plus = 100.0 * _mean(float(all(oks)) for oks in images.values())
        out[f"{task}_acc"], out[f"{task}_acc_plus"], out[task] = acc, acc_plus, acc + acc_plus
    out["perception"] = sum(out[t] for t in MME_PERCEPTION if t in out)
    out["cognition"] = sum(out[t] for t in MME_COGNITION if t in out)
    out["total"] = out["perception"] + out["cognition"]
    out["score"] = out["perception"]
    return out


def scienceqa_summary(records: Sequence[dict]) -> dict:
    """ScienceQA-IMG: option-letter accuracy, also per subject."""
    accs = []
    by_subject: dict[str, list[float]] = defaultdict(list)
    for r in records:
        n = len(r["meta"]["choices"])
        ok = float(scienceqa_letter(r["pred"], n) == r["target"])
        accs.append(ok)
        if r["meta"].get("subject"):
            by_subject[r["meta"]["subject"]].append(ok)
    out = {"score": _mean(accs), "accuracy": _mean(accs)}
    out.update({f"accuracy_{s}": _mean(v) for s, v in sorted(by_subject.items())})
    return out


def mmbench_summary(records: Sequence[dict]) -> dict:
    """MMBench: circular accuracy (score), per-category circular accuracy, single-pass accuracy on the
    first rotation only, and how often the heuristic matched an option at all."""
    groups: dict[int, list[tuple[dict, bool]]] = defaultdict(list)
    matched = 0
    for r in records:
        meta = r["meta"]
        choice = match_option(r["pred"], meta["options"])
        matched += choice is not None
        groups[int(meta["group"])].append((r, choice == r["target"]))
    circ = {g: all(ok for _, ok in rows) for g, rows in groups.items()}
    single = [ok for rows in groups.values() for r, ok in rows if int(r["meta"]["rotation"]) == 0]
    by_cat: dict[str, list[float]] = defaultdict(list)
    for g, rows in groups.items():
        cat = rows[0][0]["meta"].get("category")
        if cat:
            by_cat[cat].append(float(circ[g]))
    out = {
        "score": _mean(float(v) for v in circ.values()),
        "circular_accuracy": _mean(float(v) for v in circ.values()),
        "single_accuracy": _mean(float(v) for v in single),
        "match_rate": matched / len(records) if records else float("nan"),
        "n_questions": len(groups),
    }
    out.update({f"accuracy_{c}": _mean(v) for c, v in sorted(by_cat.items())})
    return out


def shapes_summary(records: Sequence[dict]) -> dict:
    """ShapesVQA: exact match after ShapesVQA's own answer normalization, also per question family."""
    from .shapesvqa import FAMILIES, score

    accs = [score(r["pred"], r["target"]) for r in records]
    fam: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(records, accs):
        fam[r["meta"]["family"]].append(a)
    out = {"score": _mean(accs), "accuracy": _mean(accs)}
    out.update({f"accuracy_{f}": _mean(fam[f]) for f in FAMILIES if fam[f]})
    return out
