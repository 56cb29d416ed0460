"""Public API surface: method objects, registry, config round trip, composition rules."""

from __future__ import annotations

import pytest
from tiny_models import llava_batch, tiny_llava

import mmcompress as mmc
from mmcompress.config import MethodConfig


def test_method_classes_and_names():
    assert {"random", "pool", "divprune"} <= set(mmc.available_methods())
    assert mmc.DivPrune(keep=64).to_dict() == {
        "method": "divprune",
        "keep": 64,
        "official_compat": False,
        "backend": "auto",
    }
    with pytest.raises(AttributeError, match="NoSuchMethod"):
        mmc.NoSuchMethod  # noqa: B018


def test_config_json_round_trip_and_unknown_field():
    cfg = mmc.Pool(keep=0.25)
    assert MethodConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['kep'\] for method 'pool'"):
        MethodConfig.from_dict({"method": "pool", "kep": 3})
    with pytest.raises(ValueError, match="no 'method' key"):
        MethodConfig.from_dict({"keep": 3})


def test_compress_argument_rules():
    model = tiny_llava()
    with pytest.raises(TypeError, match="either in the config object or as keywords"):
        mmc.compress(model, mmc.DivPrune(keep=4), keep=8)
    with pytest.raises(ValueError, match="got 2 methods"):
        mmc.compress(model, [mmc.DivPrune(keep=4), mmc.Pool(keep=4)])
    with pytest.raises(TypeError, match="method must be a method name"):
        mmc.compress(model, 42)
    assert mmc.report(model) is None
    h = mmc.compress(model, [mmc.DivPrune(keep=4)])
    assert h.method == mmc.DivPrune(keep=4) and h.enabled
    model(**llava_batch())
    rep = mmc.report(model)
    assert rep.tokens_in == [16, 16] and rep.tokens_out == [4, 4] and all(len(k) == 4 for k in rep.kept)
    assert rep.method == mmc.DivPrune(keep=4).to_dict() and rep.method_ms > 0
    assert rep.to_dict()["images"][0]["layout"]["views"][0]["num_tokens"] == 16
    h.remove()
    assert mmc.report(model) is None


def test_prepare_inputs_needs_compress():
    with pytest.raises(ValueError, match="call mmcompress.compress"):
        mmc.prepare_inputs(tiny_llava(), **llava_batch())
