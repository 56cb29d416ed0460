"""``mmcompress bench e2e``: the random-weight architectures, the ideal's replayed selection, the JSON.

The 7B builders are checked on the meta device (nothing allocated) against the published parameter counts
of llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf and Qwen/Qwen2-VL-7B-Instruct; everything that
runs uses ``--tiny`` models (same token counts, small widths).
"""

from __future__ import annotations

import json

import pytest
import torch

import mmcompress as mmc
from mmcompress.cli import main
from mmcompress.evals.bench_e2e import (
    ReplaySelection,
    _run_once,
    build_random_model,
    random_config,
    random_inputs,
    visual_token_count,
)
from mmcompress.tokens import Layout, VisualTokens

# arch -> (params, LLM layers / hidden / heads / kv heads / vocab, vision layers / hidden, visual tokens)
PUBLISHED = {
    # Vicuna-7B with a 32064 vocab (6,738,939,904) + CLIP ViT-L/14-336 (303,507,456) + MLP (20,979,712)
    "llava-1.5-7b": (7_063_427_072, (32, 4096, 32, 32, 32064), (24, 1024), 576),
    # the same + image_newline (4096); 672x672 -> 2x2 crops: 576 + 48 rows x (48 + 1 newline)
    "llava-next-7b": (7_063_431_168, (32, 4096, 32, 32, 32064), (24, 1024), 576 + 48 * 49),
    # Qwen2-VL-7B-Instruct's 8.29B; 672x672 -> 48x48 patches -> 24x24 merged tokens
    "qwen2-vl-7b": (8_291_375_616, (28, 3584, 28, 4, 152064), (32, 1280), 576),
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_random_architectures_match_the_published_ones_on_meta(arch):
    params, (layers, hidden, heads, kv, vocab), (vlayers, vhidden), tokens = PUBLISHED[arch]
    model = build_random_model(arch, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == params
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tc, vc = model.config.get_text_config(), model.config.vision_config
    assert (
        tc.num_hidden_layers,
        tc.hidden_size,
        tc.num_attention_heads,
        tc.num_key_value_heads,
        tc.vocab_size,
    ) == (layers, hidden, heads, kv, vocab)
    assert len(model.get_decoder().layers) == layers
    vision_hidden = vc.embed_dim if arch.startswith("qwen") else vc.hidden_size
    assert (vc.num_hidden_layers, vision_hidden) == (vlayers, vhidden)
    assert visual_token_count(model.config) == tokens
    if arch == "llava-1.5-7b":
        assert model.config.image_token_id == 32000 and model.config.vision_feature_layer == -2
        assert (vc.patch_size, vc.image_size, vc.num_attention_heads) == (14, 336, 16)
    if arch == "llava-next-7b":
        assert model.config.image_grid_pinpoints == [
            [336, 672],
            [672, 336],
            [672, 672],
            [1008, 336],
            [336, 1008],
        ]
        assert visual_token_count(model.config, (336, 672)) == 576 + 24 * 49  # a 1x2 grid
        assert visual_token_count(model.config, (500, 672)) < visual_token_count(model.config, (672, 672))
    if arch == "qwen2-vl-7b":
        assert model.config.image_token_id == 151655
        assert model.config.get_text_config().rope_parameters["mrope_section"] == [16, 24, 24]


def test_overrides_and_bad_input():
    cfg = random_config("random:llava-1.5-7b", tiny=True, layers=3, vision_layers=4)
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size) == (3, 128)
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_config.hidden_size) == (4, 64)
    assert visual_token_count(cfg) == 576  # tiny keeps the image geometry
    q = random_config("qwen2-vl-7b", layers=2)
    assert (q.text_config.num_hidden_layers, q.text_config.hidden_size, q.vision_config.depth) == (
        2,
        3584,
        32,
    )
    with pytest.raises(ValueError, match="random:llava-1.5-7b"):
        random_config("random:llava-13b")
    with pytest.raises(ValueError, match="layers=0"):
        random_config("llava-1.5-7b", layers=0)
    with pytest.raises(ValueError, match="multiples of 28"):
        visual_token_count(q, (336, 350))


def test_replay_selection_returns_exactly_the_given_indices():
    cfg = ReplaySelection(kept=((0, 3, 7), (2,)))
    f = torch.randn(9, 4)
    for i, want in ((0, [0, 3, 7]), (1, [2])):
        sel = cfg.select(VisualTokens(features=f, layout=Layout.single(3, 3), image_index=i))
        assert sel.indices.tolist() == want and sel.indices.dtype == torch.long
    assert cfg.needs() == frozenset()  # no probes for the ideal
    again = cfg.select(VisualTokens(features=f, layout=Layout.single(3, 3), image_index=0))
    assert again.indices is cfg.select(VisualTokens(features=f, layout=Layout.single(3, 3))).indices  # cached
    with pytest.raises(ValueError, match="image 2"):
        cfg.select(VisualTokens(features=f, layout=Layout.single(3, 3), image_index=2))
    with pytest.raises(ValueError, match="9 visual tokens"):
        ReplaySelection(kept=((0, 9),)).select(VisualTokens(features=f, layout=Layout.single(3, 3)))
    with pytest.raises(ValueError, match="strictly increasing"):
        ReplaySelection(kept=((3, 3),))
    with pytest.raises(ValueError, match="strictly increasing"):
        ReplaySelection(kept=((),))
    with pytest.raises(TypeError, match="non-empty tuple"):
        ReplaySelection(kept=[(1, 2)])


@pytest.mark.parametrize("arch", ["llava-next-7b", "qwen2-vl-7b"])
def test_synthetic_prompts_match_what_the_model_packs(arch):
    # the model itself checks placeholders against its features; the adapter prunes the run we built
    torch.manual_seed(0)
    model = build_random_model(arch, tiny=True, layers=1, vision_layers=1)
    inputs = random_inputs(model.config, text_tokens=6, dtype=torch.bfloat16)
    n = PUBLISHED[arch][3]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n
    mmc.compress(model, "random", keep=0.25)
    try:
        run = _run_once(model, inputs, decode_tokens=1)
    finally:
        mmc.restore(model)
    k = round(0.25 * n)
    assert (run["visual_tokens_in"], run["visual_tokens_out"]) == (n, k)
    extra = 2 if arch.startswith("qwen") else 0  # vision start / end
    assert run["prompt_len"] == 6 + extra + k
    tc = model.config.get_text_config()
    head_dim = tc.hidden_size // tc.num_attention_heads
    # bf16 keys + values of every layer for the shortened prompt, exactly
    assert (
        run["kv_bytes"]
        == tc.num_hidden_layers * 2 * run["prompt_len"] * tc.num_key_value_heads * head_dim * 2
    )


ROW_FIELDS = {
    "method",
    "keep",
    "config",
    "ttft_ms",
    "ttft_ms_min",
    "decode_tok_s",
    "vision_ms",
    "llm_prefill_ms",
    "method_ms",
    "kv_bytes",
    "kv_bytes_end",
    "peak_mem_bytes",
    "visual_tokens_in",
    "visual_tokens_out",
    "prompt_len",
    "kept_stable",
    "speedup_ttft",
    "speedup_llm_prefill",
    "speedup_decode",
    "kv_ratio",
    "ideal_speedup_ttft",
    "gap_vs_ideal",
    "overhead_ms",
    "baseline",
    "ideal",
}


def test_tiny_end_to_end_run_writes_the_json(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = [
        "bench",
        "e2e",
        "--model",
        "random:llava-1.5-7b",
        "--tiny",
        "--layers",
        "1",
        "--vision-layers",
        "2",
    ]
    argv += ["--methods", "none,random,divprune", "--keep", "0.25", "--repeats", "2", "--decode-tokens", "2"]
    argv += ["--text-tokens", "8", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "divprune" in printed and f"wrote {out}" in printed
    d = json.loads(out.read_text())
    assert d["settings"]["methods"] == ["none", "random", "divprune"] and d["settings"]["repeats"] == 2
    assert {"device", "torch", "transformers", "date", "threads"} <= set(d["machine"])
    assert d["machine"]["device"].startswith("cpu")
    assert d["memory_kind"].startswith("cpu: peak RSS")
    assert d["model"]["visual_tokens"] == 576 and d["model"]["prompt_tokens"] == 584
    base = d["baseline"]
    assert base["runs"] == 2 * 2 and base["visual_tokens_out"] == 576 and base["method_ms"] is None
    # 1 layer x (K + V) x 584 tokens x 4 heads x 32 dims x 2 bytes
    assert base["kv_bytes"] == 2 * 584 * 128 * 2
    assert [r["method"] for r in d["rows"]] == ["random", "divprune"]
    for r in d["rows"]:
        assert set(r) >= ROW_FIELDS, ROW_FIELDS - set(r)
        assert (r["visual_tokens_out"], r["prompt_len"]) == (144, 8 + 144)
        assert r["kv_bytes"] == 2 * 152 * 128 * 2 and r["kv_ratio"] == pytest.approx(152 / 584)
        ideal = r["ideal"]
        assert (ideal["visual_tokens_out"], ideal["prompt_len"], ideal["kv_bytes"]) == (
            144,
            152,
            r["kv_bytes"],
        )
        assert ideal["runs"] == r["runs"] == r["baseline"]["runs"] == 2
        assert r["kept_stable"] is True and r["config"]["keep"] == 0.25
        for k in ("ttft_ms", "decode_tok_s", "vision_ms", "llm_prefill_ms", "method_ms", "speedup_ttft"):
            assert r[k] > 0, k
        assert r["gap_vs_ideal"] == pytest.approx(r["ttft_ms"] / ideal["ttft_ms"] - 1)
        assert r["speedup_ttft"] == pytest.approx(r["baseline"]["ttft_ms"] / r["ttft_ms"])
        assert r["peak_mem_bytes"] is not None and ideal["peak_mem_bytes"] is not None


def test_cli_rejects_bad_input_before_building_anything(capsys):
    assert main(["bench", "e2e", "--model", "random:llava-1.5-7b", "--methods", "nope", "--keep", "4"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert (
        main(["bench", "e2e", "--model", "random:llava-1.5-7b", "--methods", "random", "--keep", "1.5"]) == 2
    )
    assert "keep=1.5" in capsys.readouterr().err
    assert main(["bench", "e2e", "--model", "random:llava-1.5-7b", "--repeats", "0"]) == 2
    assert "repeats=0" in capsys.readouterr().err
    assert main(["bench", "e2e", "--model", "random:gpt-5", "--methods", "random", "--keep", "4"]) == 2
    assert "random:qwen2-vl-7b" in capsys.readouterr().err
