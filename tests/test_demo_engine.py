"""The demo engine (issue 8), without gradio: input checks, model loading messages, the kept-token picture,
one request against the plain API, and concurrent requests on one shared model."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mmcompress as mmc
from mmcompress import registry, zoo
from mmcompress.demos import engine as eng
from mmcompress.demos.engine import (
    MAX_PIXELS,
    DemoEngine,
    DemoInputError,
    DemoRequest,
    ModelCache,
    check_question,
    hidden_tokens,
    hub_reachable,
    load_image,
    make_request,
    model_views,
    parse_budget,
    pre_llm_methods,
    render_overlay,
)
from mmcompress.evals.harness import timed_generate
from mmcompress.evals.shapesvqa import ShapesVQA
from mmcompress.tokens import GridView, Layout

MAX_NEW = 4


# -- inputs ------------------------------------------------------------------------------------------


def test_load_image_rejects_bad_uploads(tmp_path):
    text = tmp_path / "notes.png"  # an image name, text inside
    text.write_text("not a picture")
    with pytest.raises(DemoInputError, match="not an image"):
        load_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DemoInputError, match="empty"):
        load_image(empty)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DemoInputError, match="not an image"):
        load_image(truncated)
    with pytest.raises(DemoInputError, match="no image"):
        load_image(None)
    with pytest.raises(DemoInputError, match="missing"):
        load_image(tmp_path / "gone.png")


def test_load_image_size_limits(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 4000)).save(huge)  # 20 MP > MAX_PIXELS; a 1-bit PNG is a few KB
    assert MAX_PIXELS < 5000 * 4000
    with pytest.raises(DemoInputError, match=r"5000 x 4000 = 20,000,000 pixels; the limit is 16,777,216"):
        load_image(huge)
    with pytest.raises(DemoInputError, match="limit is 100 pixels"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)
    with pytest.raises(DemoInputError, match="at least 14 px"):
        load_image(Image.new("RGB", (200, 10)))


def test_load_image_converts_to_rgb(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (1, 2, 3, 4)).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (30, 20) and im.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(Image.new("L", (16, 16), 7)).getpixel((3, 3)) == (7, 7, 7)


def test_question_and_budget_checks():
    for bad in ("", "   ", None, 3):
        with pytest.raises(DemoInputError, match="question is empty"):
            check_question(bad)
    with pytest.raises(DemoInputError, match="301 characters; the limit is 300"):
        check_question("x" * 301)
    assert check_question("  how many?  ") == "how many?"
    assert parse_budget("") is None and parse_budget(None) is None and parse_budget("  ") is None
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget("0.25") == 0.25 and isinstance(parse_budget("0.25"), float)
    with pytest.raises(DemoInputError, match="keep='abc' is not a number"):
        parse_budget("abc")
    with pytest.raises(DemoInputError, match="keep=True"):
        parse_budget(True)


def test_make_request_validates_method_and_budget():
    methods = pre_llm_methods()
    assert {"random", "pool", "divprune", "hired", "fopru", "globalcom2", "aim_merge"} <= set(methods)
    assert not {"aim", "zipvl", "mixed_kv"} & set(methods)  # in-LLM / KV-cache methods are not choosable
    with pytest.raises(DemoInputError, match=r"method='zipvl' is not available; allowed: aim_merge, "):
        make_request("shapes-llava", "zipvl", "", "q?")
    with pytest.raises(DemoInputError, match="divprune: .*keep"):
        make_request("shapes-llava", "divprune", "0", "q?")
    with pytest.raises(DemoInputError, match="question is empty"):
        make_request("shapes-llava", "divprune", "64", " ")
    req = make_request("  ", "globalcom2", "0.5", " how many? ")
    assert req == DemoRequest("how many?", "globalcom2", 0.5, "shapes-llava")
    assert req.config().retention == 0.5  # GlobalCom²'s budget field


# -- models ------------------------------------------------------------------------------------------


def _never(_):
    raise AssertionError("the loader must not be called")


def test_hub_id_offline_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(
        DemoInputError, match=r"'llava-hf/llava-1.5-7b-hf' is a hub id, but .* cannot be reached"
    ):
        ModelCache(loader=_never).get("llava-hf/llava-1.5-7b-hf")
    assert time.perf_counter() - t0 < 10  # not transformers' minutes of retries


def test_hub_reachable_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:  # a local port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_reachable(timeout=2) is False
    with socket.socket() as server:  # and one that listens
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=2) is True


def test_model_name_messages(tmp_path):
    cache = ModelCache(loader=_never)
    with pytest.raises(DemoInputError, match="does not exist on the server"):
        cache.get(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(DemoInputError, match=r"model='bad name!' is invalid; allowed: shapes-llava"):
        cache.get("bad name!")

    def broken(_):
        raise OSError("config.json not found")

    with pytest.raises(DemoInputError, match=r"could not load model .*: OSError: config.json not found"):
        ModelCache(loader=broken).get(str(tmp_path))  # an existing folder without a checkpoint
    with pytest.raises(ValueError, match="capacity=0"):
        ModelCache(capacity=0)


def test_model_cache_loads_once_and_evicts_lru():
    loads = []

    def loader(name):
        loads.append(name)
        return object(), object()

    cache = ModelCache(loader=loader, capacity=2, warmup=False)
    a = cache.get("shapes-llava")
    assert cache.get("shapes-llava") is a
    cache.get("shapes-llava-next")
    cache.get("shapes-llava")  # now most recent
    cache.get(".")  # a folder: evicts shapes-llava-next, the least recently used
    assert "shapes-llava" in cache and "." in cache and "shapes-llava-next" not in cache
    assert [str(x) for x in loads] == ["shapes-llava", "shapes-llava-next", "."]


# -- the picture -------------------------------------------------------------------------------------

FADE = np.array(eng._FADE, dtype=np.float32)


def _blend(rgb, colour, a):
    return np.round(np.array(rgb, np.float32) * (1 - a) + np.asarray(colour, np.float32) * a)


def _close(pixel, expected):  # bicubic resize at the same size is a copy; the blend rounds: ±1
    assert np.abs(np.array(pixel, np.float32) - expected).max() <= 1, (pixel, expected)


def test_overlay_single_view_pruning():
    rgb = (40, 90, 160)
    view = Image.new("RGB", (40, 40), rgb)  # a 2x2 token grid of 20 px cells
    out = render_overlay([view], Layout.single(2, 2), kept=[0, 3], height=40)
    assert out.size == (40, 40)
    _close(out.getpixel((10, 10)), np.array(rgb))  # kept: untouched inside
    _close(out.getpixel((30, 30)), np.array(rgb))
    assert out.getpixel((0, 0)) == eng._OUTLINE and out.getpixel((39, 20)) == eng._OUTLINE  # outlines
    _close(out.getpixel((30, 10)), _blend(rgb, FADE, 0.72))  # dropped: faded
    _close(out.getpixel((10, 30)), _blend(rgb, FADE, 0.72))


def test_overlay_merge_groups_are_coloured():
    rgb = (200, 100, 0)
    view = Image.new("RGB", (40, 40), rgb)
    out = render_overlay([view], Layout.single(2, 2), kept=[0, 2], groups=[0, 0, 1, -1], height=80)
    assert out.size == (80, 80)  # scaled to the display height
    _close(out.getpixel((60, 20)), _blend(rgb, eng._group_colour(0), 0.45))  # member of group 0
    _close(out.getpixel((20, 20)), _blend(rgb, eng._group_colour(0), 0.45))  # its outlined slot
    assert out.getpixel((0, 0)) == eng._OUTLINE
    _close(out.getpixel((20, 60)), _blend(rgb, eng._group_colour(1), 0.45))
    _close(out.getpixel((60, 60)), _blend(rgb, FADE, 0.72))  # dropped (pool's ragged edge)
    assert eng._group_colour(0) != eng._group_colour(1)


def test_overlay_anyres_maps_crops_and_unpadding():
    # base 2x2 (0..3); crops 1x2 tiles of 2x2 tokens, the top token row unpadded away: one packed row
    # [4 5 | 6 7] + newline 8. Token 6 is the bottom-left cell of the second crop.
    crops = GridView("crops", 4, 1, 4, newline=True, tiles=(1, 2), tile_shape=(2, 2), offset=(1, 0))
    layout = Layout((GridView("base", 0, 2, 2), crops))
    a, b, c = (250, 0, 0), (0, 250, 0), (0, 0, 250)
    views = [Image.new("RGB", (20, 20), col) for col in (a, b, c)]
    out = render_overlay(views, layout, kept=[0, 6, 8], height=20, gap=8)
    assert out.size == (20 + 8 + 20 + 8 + 20, 20)
    _close(out.getpixel((5, 5)), np.array(a))  # base (0, 0): kept
    _close(out.getpixel((15, 15)), _blend(a, FADE, 0.72))  # base (1, 1): dropped
    _close(out.getpixel((28 + 5, 15)), _blend(b, FADE, 0.72))  # crop 1 bottom-left: token 4, dropped
    _close(out.getpixel((56 + 5, 15)), np.array(c))  # crop 2 bottom-left: token 6, kept
    _close(out.getpixel((56 + 15, 15)), _blend(c, FADE, 0.72))  # token 7
    _close(out.getpixel((56 + 5, 5)), _blend(c, eng._ABSENT_RGB, 0.85))  # unpadded away: not a token
    assert out.getpixel((24, 10)) == (255, 255, 255)  # the gap
    assert hidden_tokens(layout, [0, 6, 8]) == {"newline": (1, 1)}
    with pytest.raises(ValueError, match=r"kept indices must lie in \[0, 9\)"):
        render_overlay(views, layout, kept=[9])
    with pytest.raises(ValueError, match="groups has 3 entries for 9 tokens"):
        render_overlay(views, layout, kept=[0], groups=[0, 0, 0])


# -- the model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    e = DemoEngine(ModelCache(warmup=False))
    e.models.get("shapes-llava")
    return e


@pytest.fixture(scope="module")
def sample():
    return ShapesVQA("test", n=2, seed=0)[1]


def _req(method, keep, question, model="shapes-llava"):
    return make_request(model, method, keep, question, max_new_tokens=MAX_NEW)


def test_model_views_undo_the_processor(engine, sample):
    entry = engine.models.get("shapes-llava")
    pv = entry.processor(images=sample.image, text=zoo.build_prompt("q"), return_tensors="pt")["pixel_values"]
    (view,) = model_views(pv, entry.processor.image_processor)
    assert view.size == sample.image.size == (336, 336)  # already the tower's size: no resize, no pad
    diff = np.abs(np.asarray(view, np.int16) - np.asarray(sample.image, np.int16))
    assert diff.max() <= 1  # float normalisation round trip


def test_run_matches_the_plain_api(engine, sample):
    res = engine.run(sample.image, _req("divprune", "64", sample.question))
    model, processor = engine.models.get("shapes-llava").model, engine.models.get("shapes-llava").processor
    assert "_mmcompress_handle" not in model.__dict__  # restored after the request
    inputs = processor(images=sample.image, text=zoo.build_prompt(sample.question), return_tensors="pt")
    base = timed_generate(model, inputs, max_new_tokens=MAX_NEW)
    mmc.compress(model, "divprune", keep=64)
    try:
        comp = timed_generate(model, inputs, max_new_tokens=MAX_NEW)
        rep = mmc.report(model)
    finally:
        mmc.restore(model)
    assert res.baseline.token_ids == tuple(base.new_tokens[0].tolist())
    assert res.compressed.token_ids == tuple(comp.new_tokens[0].tolist())
    assert (res.baseline.kv_bytes, res.compressed.kv_bytes) == (base.kv_bytes, comp.kv_bytes)
    assert res.baseline.visual_tokens == 576 and res.compressed.visual_tokens == 64
    assert list(res.kept) == rep.kept[0] and len(res.kept) == 64 and res.groups is None
    assert res.baseline.text == processor.tokenizer.decode(base.new_tokens[0], skip_special_tokens=True)
    assert res.method_config == registry.create("divprune", keep=64).to_dict()
    assert res.compressed.kv_bytes < res.baseline.kv_bytes
    assert res.overlay().size == (336, 336)


def test_merging_method_reports_groups(engine, sample):
    res = engine.run(sample.image, _req("aim_merge", "0.25", sample.question))
    g = torch.tensor(res.groups)
    assert g.shape == (576,) and res.compressed.visual_tokens == len(res.kept) == 144
    assert set(g[g >= 0].tolist()) == set(range(144))  # every merged token has members, no other slot


def test_method_the_model_cannot_run(engine, sample):
    with pytest.raises(DemoInputError, match="globalcom2 cannot run on shapes-llava: .*anyres"):
        engine.run(sample.image, _req("globalcom2", "", sample.question))
    assert "_mmcompress_handle" not in engine.models.get("shapes-llava").model.__dict__


def test_anyres_views_thumbnail_and_crops():
    e = DemoEngine(ModelCache(warmup=False))
    s = ShapesVQA("test", n=1, seed=3, image_size=(448, 224))[0]
    res = e.run(s.image, _req("hired", "0.2", s.question, model="shapes-llava-next"))
    crops = res.layout.view("crops")
    assert crops.tiles == (1, 2) and len(res.views) == 3  # thumbnail + 2 crops
    assert res.baseline.visual_tokens == res.layout.num_tokens == 256 + 16 * 33
    assert res.compressed.visual_tokens == len(res.kept) < res.baseline.visual_tokens
    assert res.hidden_tokens()["newline"][1] == 16
    assert res.overlay(height=224).size == (224 + 8 + 224 + 8 + 224, 224)


def test_concurrent_requests_never_leak(engine, sample, monkeypatch):
    reqs = [
        _req("divprune", "32", sample.question),
        _req("pool", "0.25", sample.question),
        _req("random", "100", sample.question),
    ]
    alone = [engine.run(sample.image, r).outcome() for r in reqs]
    assert len({a["compressed"][2] for a in alone}) == 3  # three different budgets: a leak would show

    # count generate() calls in flight on the shared model; the sleep widens any race window
    active, peak, guard = [0], [0], threading.Lock()

    def counting(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return timed_generate(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(eng, "timed_generate", counting)
    start = threading.Barrier(len(reqs))
    results: list = [None] * len(reqs)

    def worker(i):
        start.wait()
        try:
            results[i] = engine.run(sample.image, reqs[i]).outcome()
        except Exception as e:  # noqa: BLE001  (reported below, not lost in the thread)
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] == 1  # the model's lock serialised them
    for i, r in enumerate(results):
        assert r == alone[i], f"request {i} ({reqs[i].method}) differs when run concurrently"
