"""The lmms-eval plugin, through lmms-eval's documented model interface.

lmms-eval is not installed here (its wheel needs torchvision, which would replace the CPU torch build,
plus wandb, spacy, sentence-transformers, ...), so these tests run against ``tests/fixtures/lmms_eval_stub``,
a stand-in with only that interface; with the real lmms-eval importable they use it instead. What is
checked: the ``lmms_eval.models`` entry point in pyproject and in the installed metadata resolves, as
lmms-eval's registry does it, to an ``lmms`` subclass; ``create_from_arg_string`` builds a compressed
model; ``generate_until`` / ``loglikelihood`` answer simple-model requests consistently.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
STUB = Path(__file__).parent / "fixtures" / "lmms_eval_stub"
EP = "mmcompress.evals.lmms_plugin:manifest"

if importlib.util.find_spec("lmms_eval") is None:
    sys.path.insert(0, str(STUB))

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402


def test_entry_point_declared_and_installed():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split('[project.entry-points."lmms_eval.models"]\n', 1)[1].split("\n[", 1)[0]
    assert f'mmcompress = "{EP}"' in section
    eps = importlib.metadata.entry_points(group="lmms_eval.models")
    assert [e.value for e in eps if e.name == "mmcompress"] == [EP], (
        "reinstall the package (pip install -e .)"
    )


def test_registry_resolves_the_plugin_class():
    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests(overwrite=True)
    assert "mmcompress" in reg.list_model_names()
    cls = reg.get_model_class("mmcompress")
    from mmcompress.evals.lmms_plugin import MMCompressLMM

    assert cls is MMCompressLMM and issubclass(cls, lmms) and cls.is_simple


def test_bad_model_args_fail_before_loading():
    from mmcompress.evals.lmms_plugin import MMCompressLMM

    with pytest.raises(ValueError, match=r"\['bogus'\] are not fields of method 'divprune'; allowed: .*keep"):
        MMCompressLMM.create_from_arg_string("pretrained=nowhere,method=divprune,keep=64,bogus=1")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        MMCompressLMM.create_from_arg_string("pretrained=nowhere,method=nope")
    with pytest.raises(ValueError, match="not plugin options"):
        MMCompressLMM.create_from_arg_string("pretrained=nowhere,colour=red")


@pytest.fixture(scope="module")
def lm():
    from mmcompress.evals.lmms_plugin import MMCompressLMM

    # lmms-eval passes batch_size / device next to the user's model_args
    m = MMCompressLMM.create_from_arg_string(
        "pretrained=shapes-llava,method=divprune,keep=64", {"batch_size": 2, "device": "cpu"}
    )
    from mmcompress.evals.shapesvqa import ShapesVQA

    docs = [
        {"question": s.question, "answer": s.answer, "image": s.image} for s in ShapesVQA("test", 4, seed=5)
    ]
    m.task_dict = {"shapes": {"test": docs}}
    return m


def _gen(i: int, doc: dict, **gen_kwargs) -> Instance:
    kw = {"max_new_tokens": 4, "until": ["\n"], **gen_kwargs}
    args = (doc["question"], kw, lambda d: [d["image"]], i, "shapes", "test")
    return Instance("generate_until", args, i, {"task": "shapes", "doc_id": i, "repeats": 1})


def test_generate_until_compresses_and_matches_the_runner(lm):
    import mmcompress as mmc

    docs = lm.task_dict["shapes"]["test"]
    answers = lm.generate_until([_gen(i, d) for i, d in enumerate(docs)])
    assert len(answers) == 4 and all(isinstance(a, str) and a for a in answers)
    assert mmc.report(lm.model).tokens_out == [64, 64]  # the last batch of 2, pruned to 64 tokens each
    assert lm.rank == 0 and lm.world_size == 1 and lm.batch_size == 2
    # the runner's backend on the same (compressed) model gives the same answers one by one
    from mmcompress.evals.datasets import EvalSample

    samples = [EvalSample(str(i), d["question"], d["question"], None, d["image"]) for i, d in enumerate(docs)]
    assert [lm.backend.answer([s], 4)[0].pred for s in samples] == answers


def test_loglikelihood_is_consistent_with_greedy_answers(lm):
    docs = lm.task_dict["shapes"]["test"][:2]
    greedy = lm.generate_until([_gen(i, d) for i, d in enumerate(docs)])
    for i, (d, g) in enumerate(zip(docs, greedy)):
        other = "no" if g != "no" else "yes"
        reqs = [
            Instance(
                "loglikelihood",
                (d["question"], " " + cont, lambda x: [x["image"]], i, "shapes", "test"),
                i,
                {"task": "shapes", "doc_id": i, "repeats": 1},
            )
            for cont in (g, other)
        ]
        (lp_g, is_g), (lp_o, is_o) = lm.loglikelihood(reqs)
        # one-token answers: the greedy token has the largest probability
        assert is_g and not is_o and lp_o < lp_g <= 0.0


def test_one_image_per_request(lm):
    doc = lm.task_dict["shapes"]["test"][0]
    req = Instance(
        "generate_until",
        (doc["question"], {}, lambda d: [d["image"], d["image"]], 0, "shapes", "test"),
        0,
        {"task": "shapes", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(ValueError, match="2 images"):
        lm.generate_until([req])
