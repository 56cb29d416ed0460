"""Method specs on the command line: ``name[:field=value...]`` -> a validated config."""

import pytest

from mmcompress import registry
from mmcompress.methods.fopru import FoPru
from mmcompress.methods.hired import HiRED


def test_plain_name_and_options_parse_to_typed_values():
    assert registry.parse_spec("divprune") == ("divprune", {})
    name, opts = registry.parse_spec("hired:alpha=0.3:budget_layer=1:split=quadrants")
    assert name == "hired"
    assert opts == {"alpha": 0.3, "budget_layer": 1, "split": "quadrants"}
    assert type(opts["budget_layer"]) is int and type(opts["alpha"]) is float


def test_create_from_spec_puts_the_budget_in_the_budget_field():
    cfg = registry.create_from_spec("fopru:significance=received:strategy=row", 0.11)
    assert cfg == FoPru(keep=0.11, significance="received", strategy="row")
    assert registry.create_from_spec("hired", None) == HiRED()
    assert registry.create_from_spec("globalcom2", 0.25).retention == 0.25


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fopru:foo=1", r"unknown option\(s\) \['foo'\]; fopru takes"),
        ("fopru:significance", r"must be field=value"),
        ("fopru:keep=0.1:keep=0.2", r"each field once"),
        ("nope:keep=1", r"unknown method 'nope'"),
        ("fopru:significance=bogus", r"significance='bogus'"),
        ("", r"expected 'name'"),
        ("fopru:keep=0.2", r"sets keep=0.2 and a budget 0.1"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        registry.create_from_spec(spec, 0.1)
