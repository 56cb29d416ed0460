"""ShapesVQA: determinism, split disjointness, balance, the public API's validation."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from mmcompress.evals.shapesvqa import FAMILIES, Sample, ShapesVQA, normalize_answer, score


def _key(s: Sample) -> tuple:
    return (s.question, s.answer, np.asarray(s.image).tobytes())


def test_deterministic_for_seed_and_index():
    a, b = ShapesVQA("test", n=20, seed=3), ShapesVQA("test", n=20, seed=3)
    for i in (0, 7, 19):
        assert _key(a[i]) == _key(b[i])
    # random access gives the same item as sequential access
    assert _key(a[7]) == _key(list(a)[7])
    assert _key(ShapesVQA("test", n=20, seed=4)[0]) != _key(a[0])


def test_splits_are_disjoint():
    train = {np.asarray(s.image).tobytes() for s in ShapesVQA("train", n=150)}
    test = {np.asarray(s.image).tobytes() for s in ShapesVQA("test", n=150)}
    assert not train & test


def test_every_family_present_and_balanced():
    ds = ShapesVQA("test", n=140)
    fams = collections.Counter(s.family for s in ds)
    assert set(fams) == set(FAMILIES)
    assert all(v == 20 for v in fams.values())


def test_yes_no_balance():
    ds = ShapesVQA("test", n=700)
    for fam in ("existence", "relation"):
        answers = [s.answer for s in ds if s.family == fam]
        assert set(answers) == {"yes", "no"}
        assert 0.35 < answers.count("no") / len(answers) < 0.65, fam


def test_answers_are_single_words_and_consistent_with_scene():
    for s in ShapesVQA("test", n=70):
        assert s.answer and " " not in s.answer
        assert s.image.size == (336, 336)
        if s.family == "count":
            assert s.answer == str(len(s.objects))
        names = [o.name for o in s.objects]
        assert len(names) == len(set(names))  # every (colour, shape) pair at most once


def test_rectangular_images():
    ds = ShapesVQA("test", n=7, image_size=(448, 224))
    assert all(s.image.size == (448, 224) for s in ds)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"split": "dev"}, "split"), ({"n": 0}, "n"), ({"image_size": (1, 2, 3)}, "image_size")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapesVQA(**kwargs)


def test_indexing():
    ds = ShapesVQA("test", n=5)
    assert len(ds) == 5 and ds[-1].index == 4 and len(ds[1:3]) == 2
    with pytest.raises(IndexError):
        ds[5]


def test_normalize_and_score():
    assert normalize_answer(" Three. ") == "3"
    assert normalize_answer("The Red") == "red"
    assert normalize_answer("Colour") == "color"
    assert score("Yes!", "yes") == 1.0 and score("no", "yes") == 0.0
