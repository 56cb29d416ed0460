"""Exact per-patch labels of ShapesVQA scenes, for the auxiliary heads of the training recipe.

For each patch of a single-view grid (LLaVA-1.5 style, ``grid × grid`` patches of ``patch`` pixels) the
generator's scene description gives, exactly:

- ``colour``: the object covering ≥ 25 % of the patch (0 = background, 1..6 in ``COLOURS`` order);
- ``shape``: its shape (0 = background, 1..4 in ``SHAPES`` order);
- ``centre``: 1 where an object's centre falls in the patch;
- ``size``: the covering object's size bin (0 = background, 1 = small-object range, 2..4 = thirds of
  the normal range), which "what is the smallest object" questions hinge on;
- ``row`` / ``col``: the patch's own grid row and column, so the projector output carries absolute
  position explicitly (the LM sees a flattened sequence with RoPE, i.e. only relative offsets) — what
  position and relation questions need.

For the retrieval loss (``train_shapes --attn-weight``) :func:`referenced_objects` names the objects a
question is about and :func:`object_patches` the patches each object covers.

Why these heads exist: a from-scratch LM trained on the answer loss alone must discover *what* each
patch shows and *where* it is before it can learn *where to look*; it plateaus at its text prior.
Telling the projector what each patch shows lets the LM spend its steps on the lookup. The heads are
training-only and are not shipped.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .shapesvqa import (
    _NORMAL_SIZE,
    _REL_MARGIN,
    _SMALL_SIZE,
    COLOURS,
    SHAPES,
    SceneObject,
    ShapesVQA,
    _polygon,
)

__all__ = [
    "LABEL_CLASSES",
    "READOUT_KEYS",
    "object_label",
    "mention_positions",
    "object_patches",
    "question_tokens",
    "patch_labels",
    "referenced_groups",
    "is_relation",
    "referenced_objects",
    "relation_targets",
    "relation_word_position",
    "absent_mention_position",
]

COVER = 0.25  # an object label needs this fraction of the patch


def LABEL_CLASSES(grid: int) -> dict[str, int]:  # noqa: N802 - reads as a table
    """Number of classes of every label, in head order."""
    return {
        "colour": len(COLOURS) + 1,
        "shape": len(SHAPES) + 1,
        "centre": 2,
        "size": 5,
        "row": grid,
        "col": grid,
    }


def _size_bin(size: float, side: float) -> int:
    frac = size / side
    if frac <= _SMALL_SIZE[1] + 1e-6:
        return 1
    lo, hi = _NORMAL_SIZE
    return 2 + min(2, max(0, int(3 * (frac - lo) / (hi - lo))))


def referenced_objects(objects: list[SceneObject], question: str) -> list[int]:
    """Indices of the objects a ShapesVQA question is about (empty: about nothing, e.g. "is there" → no).

    Exact for the generator's templates (``shapesvqa.make_question``): full "<colour> <shape>" names first
    (existence, position, relation; in the order the question names them), then "the <shape>" (colour
    family) or "the <colour> object" (shape family); counting is about every object, "smallest" about the
    smallest one.
    """
    q = question.lower()
    if q.startswith("how many"):
        return list(range(len(objects)))
    if "smallest" in q:
        return [min(range(len(objects)), key=lambda i: objects[i].size)]
    # named objects in the order the question mentions them (relation: subject first, then reference)
    hits = {i: re.search(rf"\b{o.colour} {o.shape}\b", q) for i, o in enumerate(objects)}
    named = sorted((i for i, m in hits.items() if m), key=lambda i: hits[i].start())
    if named or q.startswith("is there"):
        return named
    m = re.match(r"what color is the (\w+)\?", q)
    if m:
        return [i for i, o in enumerate(objects) if o.shape == m.group(1)]
    m = re.match(r"what shape is the (\w+) object\?", q)
    if m:
        return [i for i, o in enumerate(objects) if o.colour == m.group(1)]
    raise ValueError(f"referenced_objects: question {question!r} matches no ShapesVQA template")


def referenced_groups(objects: list[SceneObject], question: str) -> list[list[int]]:
    """The referenced objects grouped by what one retrieval head should look at.

    A relation question ("is the A left of the B?") needs the two objects' positions *separately* — one
    head that averages over both cannot tell left from right — so it gives ``[[A], [B]]``; every other
    question gives one group, ``[referenced_objects(...)]`` (or ``[]`` when it is about nothing).
    """
    refs = referenced_objects(objects, question)
    if not refs:
        return []
    q = question.lower()
    named_two = len(refs) == 2 and not q.startswith("how many") and "smallest" not in q
    return [[refs[0]], [refs[1]]] if named_two else [refs]


_RELATION_WORDS = ("left", "right", "above", "below")


def is_relation(objects: list[SceneObject], question: str) -> bool:
    """Whether ``question`` is a relation question ("is the A left of / above ... the B?")."""
    toks = question_tokens(question)
    return any(w in toks for w in _RELATION_WORDS) and len(referenced_groups(objects, question)) == 2


def relation_targets(objects: list[SceneObject], question: str, side: float) -> tuple[int, int, int] | None:
    """For a relation question about A and B ("is the A left of the B?"): ``(A left of B, A above B,
    word)``, the first two 1 / 0, or -100 where the two centres are within the generator's margin on that
    axis (it never asks about that axis then), ``word`` the index of the relation word in
    ``("left", "right", "above", "below")``; ``None`` for every other question.

    Why: the answer is the XOR of the relation word and the sign of A - B on its axis, so no single
    feature correlates with it and the answer loss alone gives neither part any gradient (measured: the
    72.0 % model stays at 0.50 on relations, in training too). A probe that must tell the two signs and
    the word from one residual row makes both parts exist there, for the next layer to combine.
    """
    if not is_relation(objects, question):
        return None
    groups = referenced_groups(objects, question)
    a, b = objects[groups[0][0]], objects[groups[1][0]]
    margin = _REL_MARGIN * side
    x = -100 if abs(a.cx - b.cx) <= margin else int(a.cx < b.cx)
    y = -100 if abs(a.cy - b.cy) <= margin else int(a.cy < b.cy)
    return x, y, relation_word_index(question)


def relation_word_index(question: str) -> int:
    """Which relation word a relation question asks about: 0 left, 1 right, 2 above, 3 below."""
    toks = question_tokens(question)
    return next(i for i, w in enumerate(_RELATION_WORDS) if w in toks)


def relation_word_position(question: str) -> int:
    """Index in :func:`question_tokens` of the relation word of a relation question."""
    toks = question_tokens(question)
    return next(i for i, w in enumerate(toks) if w in _RELATION_WORDS)


def absent_mention_position(objects: list[SceneObject], question: str) -> int | None:
    """For "is there a <colour> <shape>?" when the scene has no such object: the index in
    :func:`question_tokens` of the shape word (where :func:`mention_positions` would put the object's
    mention); ``None`` for every other question (including existence questions answered "yes").

    Why: these questions are about nothing, so the retrieval loss used to skip them, and measured on the
    80.9 % model the answer was at chance on them (0.50 on "no", 0.91 on "yes"): the heads look at the
    nearest partial match (same colour or same shape, as the POPE-style negatives are built), which
    reads much like the named object. Supervising the heads towards the ``<s>`` sink there instead makes
    "found nothing" a distinct, linearly readable retrieval.
    """
    q = question.lower()
    if not q.startswith("is there") or referenced_objects(objects, question):
        return None
    named = _named_shape_positions(question_tokens(question))
    if len(named) != 1:
        raise ValueError(f"absent_mention_position: {question!r} names {len(named)} objects; allowed: 1")
    return named[0]


def _named_shape_positions(toks: list[str]) -> list[int]:
    """Indices of the shape word of each "<colour> <shape>" name in ``toks``, in order."""
    return [i + 1 for i in range(len(toks) - 1) if toks[i] in COLOURS and toks[i + 1] in SHAPES]


def question_tokens(question: str) -> list[str]:
    """The words and punctuation of a question, as the embedded word-level tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]", question.lower())


def mention_positions(objects: list[SceneObject], question: str) -> list[int]:
    """Per group of :func:`referenced_groups`, the index in :func:`question_tokens` of the word that names
    it: the shape of "<colour> <shape>" (existence, position, both objects of a relation, in order), the
    shape of "what color is the <shape>?", the colour of "what shape is the <colour> object?", "objects"
    for counting and "smallest" for the small-object questions.

    Why: the word itself can look the object up — its query depends on the word (and, one layer up, the
    word before it), not on gathering the whole question first — so the retrieval loss on these rows
    trains a static word ↔ attribute match, which the "answer:" row can then read from a fixed place.
    """
    groups = referenced_groups(objects, question)
    if not groups:
        return []
    toks = question_tokens(question)
    if toks[:2] == ["how", "many"]:
        return [toks.index("objects")]
    if "smallest" in toks:
        return [toks.index("smallest")]
    named = _named_shape_positions(toks)
    if named:
        if len(named) != len(groups):
            raise ValueError(
                f"mention_positions: {question!r} names {len(named)} objects, {len(groups)} groups"
            )
        return named
    if toks[:2] == ["what", "color"]:
        return [len(toks) - 2]  # "... the <shape> ?"
    if toks[:2] == ["what", "shape"]:
        return [toks.index("object") - 1]  # "... the <colour> object ?"
    raise ValueError(f"mention_positions: question {question!r} matches no ShapesVQA template")


READOUT_KEYS = ("colour", "shape", "size", "row", "col")


def object_label(obj: SceneObject, grid: int, patch: int) -> dict[str, int]:
    """The object's own labels in the class indexing of :func:`LABEL_CLASSES` (colour 1..6, shape 1..4,
    size bin 1..4, and the grid row / column of its centre): what a retrieval head that looks at it
    should carry (``train_shapes --readout-weight``)."""
    side = grid * patch
    return {
        "colour": list(COLOURS).index(obj.colour) + 1,
        "shape": list(SHAPES).index(obj.shape) + 1,
        "size": _size_bin(obj.size, side),
        "row": min(int(obj.cy) // patch, grid - 1),
        "col": min(int(obj.cx) // patch, grid - 1),
    }


def object_patches(
    labels: dict[str, torch.Tensor], i: int, objects: list[SceneObject], grid: int, patch: int
) -> list[torch.Tensor]:
    """Per object of image ``i``: its patch indices (colour and shape labels both match — every
    (colour, shape) pair is unique in a scene); an object too small to own a patch gets its centre patch."""
    ci = {c: k + 1 for k, c in enumerate(COLOURS)}
    si = {s: k + 1 for k, s in enumerate(SHAPES)}
    out = []
    for o in objects:
        hit = (labels["colour"][i] == ci[o.colour]) & (labels["shape"][i] == si[o.shape])
        idx = hit.nonzero().flatten()
        if idx.numel() == 0:
            r, c = min(int(o.cy) // patch, grid - 1), min(int(o.cx) // patch, grid - 1)
            idx = torch.tensor([r * grid + c])
        out.append(idx)
    return out


def patch_labels(
    ds: ShapesVQA, n: int, grid: int, patch: int
) -> tuple[dict[str, torch.Tensor], list[list[SceneObject]]]:
    """Labels of the first ``n`` items of ``ds``: name -> ``[n, grid*grid]`` int64 (names as LABEL_CLASSES),
    and each item's scene objects.

    ``ds`` must be square with side ``grid * patch`` pixels (the processor's resize is then the identity,
    so pixel coordinates are patch coordinates).
    """
    side = grid * patch
    if (ds.width, ds.height) != (side, side):
        raise ValueError(
            f"patch_labels: dataset images are {ds.width}x{ds.height}; allowed: square {side}x{side} "
            f"(grid {grid} x patch {patch})"
        )
    ci = {c: i + 1 for i, c in enumerate(COLOURS)}
    si = {s: i + 1 for i, s in enumerate(SHAPES)}
    p = grid * grid
    out = {k: torch.zeros(n, p, dtype=torch.long) for k in ("colour", "shape", "centre", "size")}
    rc = torch.arange(p)
    out["row"] = (rc // grid).expand(n, p).clone()
    out["col"] = (rc % grid).expand(n, p).clone()
    scenes = []
    for i in tqdm(range(n), desc="patch labels", mininterval=10):
        objs = ds.with_extra_questions(i, 0)[0].objects
        scenes.append(objs)
        planes = {k: Image.new("L", (side, side), 0) for k in ("colour", "shape", "size")}
        draws = {k: ImageDraw.Draw(v) for k, v in planes.items()}
        for o in objs:
            values = {"colour": ci[o.colour], "shape": si[o.shape], "size": _size_bin(o.size, side)}
            for k, d in draws.items():
                if o.shape == "circle":
                    d.ellipse(o.box, fill=values[k])
                else:
                    d.polygon(_polygon(o), fill=values[k])
            r, c = min(int(o.cy) // patch, grid - 1), min(int(o.cx) // patch, grid - 1)
            out["centre"][i, r * grid + c] = 1
        for k, classes in (("colour", len(COLOURS) + 1), ("shape", len(SHAPES) + 1), ("size", 5)):
            arr = np.array(planes[k])
            blocks = arr.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(p, -1)
            counts = np.stack([(blocks == v).sum(1) for v in range(classes)], 1)
            # background only where no object covers enough of the patch
            counts[:, 0] = np.where(counts[:, 1:].max(1) >= COVER * patch * patch, 0, counts[:, 0])
            out[k][i] = torch.from_numpy(counts.argmax(1))
    return out, scenes
