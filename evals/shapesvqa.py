"""ShapesVQA: a seeded synthetic visual-question-answering task (pure PIL + numpy).

Each image shows 1-6 non-overlapping shapes (circle, square, triangle, star) in well separated colours
on a dark background. Each sample asks one question from one of seven families:

- ``colour``    "what color is the star?"                      (the shape type is unique in the scene)
- ``shape``     "what shape is the blue object?"               (the colour is unique in the scene)
- ``count``     "how many objects are there?"                  (digits 1-6)
- ``existence`` "is there a red square?"                       (yes / no, half no, POPE style)
- ``position``  "is the red square on the left or the right?"  (left / right / top / bottom)
- ``relation``  "is the red square left of the blue circle?"   (yes / no, half no)
- ``small``     "what color is the smallest object?"           (colour or shape of a small object)

Answers are single words. A sample is a pure function of ``(split, seed, index, image_size)``: the
split name is folded into the seed, so the ``train`` and ``test`` splits draw from disjoint streams.
Objects are always named "<colour> <shape>" and every (colour, shape) pair appears at most once in a
scene, so each question refers to exactly one object.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "FAMILIES",
    "SHAPES",
    "SPLITS",
    "Sample",
    "SceneObject",
    "ShapesVQA",
    "make_question",
    "make_scene",
    "normalize_answer",
    "render_scene",
    "sample_scene",
    "score",
]

FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "existence", "position", "relation", "small")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Hues far apart: DINOv2's late layers blur red / orange / yellow (hue jitter in pre-training), so only
# one of each close pair is kept (see shared/reference/dinov2-feature-probe.md).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
NUMBER_WORDS = {
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
_SYNONYMS = {"colour": "color", "grey": "gray", "true": "yes", "false": "no"}

MAX_OBJECTS = 6
# Object sizes as a fraction of the shorter image side (circumscribed diameter).
_NORMAL_SIZE = (0.11, 0.24)
_SMALL_SIZE = (0.06, 0.08)
# An object used in a position / relation question must be this far (fraction of the side) from the
# midline / the other object, so the answer is never a judgement call.
_POS_MARGIN = 0.10
_REL_MARGIN = 0.08


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. ``cx, cy, size`` are in pixels; ``size`` is the circumscribed diameter."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    angle: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box of the circumscribed circle, in pixels."""
        r = self.size / 2
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


@dataclass
class Sample:
    """One ShapesVQA item. ``objects`` lists the scene (useful for drawing boxes)."""

    image: Image.Image
    question: str
    answer: str
    family: str
    index: int
    split: str = "test"
    objects: list[SceneObject] = field(default_factory=list)


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation and articles, map number words to digits and a few synonyms."""
    words = re.findall(r"[a-z0-9]+", s.lower())
    words = [w for w in words if w not in ("a", "an", "the")]
    if not words:
        return ""
    w = words[0] if len(words) == 1 else " ".join(words)
    w = NUMBER_WORDS.get(w, w)
    return _SYNONYMS.get(w, w)


def score(pred: str, answer: str) -> float:
    """Exact match after :func:`normalize_answer` (1.0 or 0.0)."""
    return float(normalize_answer(pred) == normalize_answer(answer))


def _seed_for(split: str, seed: int, index: int, salt: str = "") -> int:
    """A 64-bit seed from (split, seed, index): the split is hashed in, so splits never share streams."""
    h = hashlib.sha256(f"shapesvqa|{split}|{seed}|{index}|{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def _parse_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        w = h = int(image_size)
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
        w, h = (int(v) for v in image_size)
    else:
        raise ValueError(f"image_size={image_size!r} is invalid: expected an int or a (width, height) pair")
    if w < 64 or h < 64:
        raise ValueError(f"image_size={image_size!r} is too small: width and height must be >= 64")
    return w, h


def make_scene(
    rng: np.random.Generator, width: int, height: int, *, with_small: bool = False, min_objects: int = 1
) -> list[SceneObject]:
    """Draw 1-6 non-overlapping objects with distinct (colour, shape) pairs.

    With ``with_small`` the first object is small (6-8 % of the short side) and all others are normal
    size (11-24 %), so "the smallest object" is unambiguous.
    """
    side = min(width, height)
    n = int(rng.integers(max(min_objects, 2 if with_small else 1), MAX_OBJECTS + 1))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    objects: list[SceneObject] = []
    for k, p in enumerate(picks):
        colour, shape = combos[int(p)]
        lo, hi = _SMALL_SIZE if (with_small and k == 0) else _NORMAL_SIZE
        size = float(rng.uniform(lo, hi)) * side
        for _attempt in range(200):
            r = size / 2
            cx = float(rng.uniform(r + 2, width - r - 2))
            cy = float(rng.uniform(r + 2, height - r - 2))
            gap = 0.02 * side
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.size / 2 + gap for o in objects):
                break
            if _attempt % 50 == 49 and not (with_small and k == 0):
                size *= 0.9  # crowded: shrink a little (never below the small-object range)
                size = max(size, _NORMAL_SIZE[0] * side)
        else:
            continue  # could not place it: fewer objects (count answers use the real list)
        angle = 0.0 if shape == "circle" else float(rng.uniform(0, 2 * math.pi))
        objects.append(SceneObject(shape, colour, cx, cy, size, angle))
    return objects


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    r = obj.size / 2
    if obj.shape == "square":
        radii, k = [r] * 4, 4
    elif obj.shape == "triangle":
        radii, k = [r] * 3, 3
    else:  # five-point star, inner radius 0.45 r
        radii, k = [r if i % 2 == 0 else 0.45 * r for i in range(10)], 10
    return [
        (
            obj.cx + rad * math.cos(obj.angle + 2 * math.pi * i / k),
            obj.cy + rad * math.sin(obj.angle + 2 * math.pi * i / k),
        )
        for i, rad in enumerate(radii)
    ]


def render_scene(
    objects: list[SceneObject], width: int, height: int, rng: np.random.Generator
) -> Image.Image:
    """Dark random background (half of them noisy) with each object drawn in a jittered colour."""
    bg = rng.integers(0, 61, size=3)
    arr = np.empty((height, width, 3), np.float32)
    arr[:] = bg
    if rng.random() < 0.5:
        arr += rng.normal(0, 8, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for obj in objects:
        base = np.array(COLOURS[obj.colour])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    return img


def make_question(
    objects: list[SceneObject], family: str, rng: np.random.Generator, width: int, height: int
) -> tuple[str, str] | None:
    """One (question, answer) of ``family`` about the scene, or None if the scene cannot support it."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; allowed: {FAMILIES}")
    if not objects:
        return None
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if family == "colour":
        shapes = [o.shape for o in objects]
        unique = [o for o in objects if shapes.count(o.shape) == 1]
        if not unique:
            return None
        o = pick(unique)
        return f"what color is the {o.shape}?", o.colour
    if family == "shape":
        colours = [o.colour for o in objects]
        unique = [o for o in objects if colours.count(o.colour) == 1]
        if not unique:
            return None
        o = pick(unique)
        return f"what shape is the {o.colour} object?", o.shape
    if family == "count":
        return "how many objects are there?", str(len(objects))
    if family == "existence":
        present = {(o.colour, o.shape) for o in objects}
        if rng.random() < 0.5:
            c, s = pick(sorted(present))
            return f"is there a {c} {s}?", "yes"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # POPE-style "adversarial" negatives: prefer absent pairs sharing a colour or a shape with the scene
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        c, s = pick(near if near and rng.random() < 0.7 else absent)
        return f"is there a {c} {s}?", "no"
    if family == "position":
        options = []
        for o in objects:
            if abs(o.cx - width / 2) > _POS_MARGIN * width:
                options.append((o, "horizontal"))
            if abs(o.cy - height / 2) > _POS_MARGIN * height:
                options.append((o, "vertical"))
        if not options:
            return None
        o, axis = pick(options)
        if axis == "horizontal":
            return f"is the {o.name} on the left or the right?", "left" if o.cx < width / 2 else "right"
        return f"is the {o.name} at the top or the bottom?", "top" if o.cy < height / 2 else "bottom"
    if family == "relation":
        side = min(width, height)
        pairs = []
        for a in objects:
            for b in objects:
                if a is b:
                    continue
                if abs(a.cx - b.cx) > _REL_MARGIN * side:
                    pairs.append((a, b, "left of" if a.cx < b.cx else "right of"))
                if abs(a.cy - b.cy) > _REL_MARGIN * side:
                    pairs.append((a, b, "above" if a.cy < b.cy else "below"))
        if not pairs:
            return None
        a, b, true_rel = pick(pairs)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        if rng.random() < 0.5:
            return f"is the {a.name} {true_rel} the {b.name}?", "yes"
        return f"is the {a.name} {opposite[true_rel]} the {b.name}?", "no"
    # small: only asked when the smallest object is clearly the smallest
    sizes = sorted(objects, key=lambda o: o.size)
    if len(sizes) < 2 or sizes[0].size > 0.75 * sizes[1].size:
        return None
    o = sizes[0]
    if rng.random() < 0.5:
        return "what color is the smallest object?", o.colour
    return "what shape is the smallest object?", o.shape


def sample_scene(
    split: str, seed: int, index: int, image_size: int | Sequence[int] = 336, family: str | None = None
) -> tuple[list[SceneObject], Image.Image, np.random.Generator]:
    """The scene and image of item ``index``, built so that ``family`` (if given) has a valid question.

    Returns the objects, the image and the item's random generator (positioned after the drawing, so
    callers can draw further questions about the same scene deterministically).
    """
    width, height = _parse_size(image_size)
    rng = np.random.default_rng(_seed_for(split, seed, index))
    while True:
        objects = make_scene(
            rng, width, height, with_small=(family == "small"), min_objects=2 if family == "relation" else 1
        )
        # Check feasibility on a copy of the stream, so a rejected scene costs a fixed amount of randomness.
        probe = np.random.default_rng(rng.integers(2**63))
        if family is None or make_question(objects, family, probe, width, height) is not None:
            break
    image = render_scene(objects, width, height, rng)
    return objects, image, rng


class ShapesVQA(Sequence):
    """A deterministic sequence of :class:`Sample`; families cycle so each appears ``n / 7`` times.

    Args:
        split: "train", "val" or "test" (different seed streams).
        n: number of samples (>= 1).
        seed: base seed.
        image_size: an int (square) or a (width, height) pair, in pixels.
    """

    def __init__(
        self, split: str = "test", n: int = 500, seed: int = 0, image_size: int | Sequence[int] = 336
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is unknown; allowed: {SPLITS}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n={n!r} is invalid; allowed: an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed={seed!r} is invalid; allowed: an int")
        self.width, self.height = _parse_size(image_size)
        self.split, self.n, self.seed = split, int(n), int(seed)
        self.image_size = image_size

    def __len__(self) -> int:
        return self.n

    def family_of(self, index: int) -> str:
        # A per-split rotation so that index 0 is not always the same family in every split.
        return FAMILIES[(index + _seed_for(self.split, self.seed, -1) % len(FAMILIES)) % len(FAMILIES)]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for ShapesVQA of length {self.n}")
        return self.with_extra_questions(int(index), 0)[0]

    def with_extra_questions(self, index: int, k: int) -> tuple[Sample, list[tuple[str, str, str]]]:
        """Item ``index`` plus ``k`` further (question, answer, family) triples about its scene (training).

        The scene is drawn once. Families are drawn uniformly (a fresh random question each time, repeats
        allowed), skipping families the scene cannot support: without this, yes/no families, which have
        many distinct questions per scene, would dominate and teach little about looking at the image.
        """
        family = self.family_of(index)
        objects, image, rng = sample_scene(self.split, self.seed, index, (self.width, self.height), family)
        extra_rng = np.random.default_rng(int(rng.integers(2**63)))
        qa = make_question(objects, family, rng, self.width, self.height)
        assert qa is not None  # sample_scene guarantees feasibility
        sample = Sample(
            image=image,
            question=qa[0],
            answer=qa[1],
            family=family,
            index=index,
            split=self.split,
            objects=objects,
        )
        out: list[tuple[str, str, str]] = []
        for _ in range(4 * k):
            if len(out) >= k:
                break
            fam = FAMILIES[int(extra_rng.integers(len(FAMILIES)))]
            extra = make_question(objects, fam, extra_rng, self.width, self.height)
            if extra is not None:
                out.append((extra[0], extra[1], fam))
        return sample, out
