"""``mmcompress bench e2e``: end-to-end speed of each method against the baseline and against the *ideal*.

Issue 5, "Benchmarks" (a script, not a timed test; DESIGN §7 "Measuring")::

    mmcompress bench e2e --model shapes-llava --methods none,random,divprune,hired --keep 0.5,0.11
    mmcompress bench e2e --model random:llava-next-7b --methods divprune,hired --keep 640,320,160 \\
        --json evals/results/bench_e2e_cuda_llava-next-7b.json        # on a GPU
    mmcompress bench e2e --model random:llava-1.5-7b --tiny ...       # smoke test on a CPU

Models (``--model``): an embedded model (``shapes-llava``, ``shapes-llava-next``) or a local LLaVA /
LLaVA-NeXT checkpoint folder, fed one ShapesVQA test image and question through its processor; or
``random:llava-1.5-7b`` / ``random:llava-next-7b`` / ``random:qwen2-vl-7b``: the published architecture
(:data:`RANDOM_ARCHS`) built from its config with random weights (bf16 by default) and fed a synthetic
prompt (random text ids around one image's placeholder run, random pixels). Random weights give honest
speed figures with no download: the work per token does not depend on the weights' values. ``--tiny``
shrinks the widths and depths (visual token counts unchanged) and ``--layers`` / ``--vision-layers`` set
the depths, for CPU smoke tests; the full 7B models are meant for a GPU.

Columns, per method × budget (batch of one prompt, greedy, exactly ``--decode-tokens`` decode steps after
the first token: ``min_new_tokens = max_new_tokens``, so EOS never ends a run early):

* ``ttft_ms``: from the ``generate()`` call to the first token's logits (vision tower, the method's
  probes and selection, the shortened prefill), CUDA-synchronised at the first logits-processor call;
* ``vision_ms`` / ``llm_prefill_ms``: the vision tower's and the LLM decoder's prefill forwards alone
  (hooks, synchronised), ``method_ms``: time inside the method's selection (``report(model).method_ms``);
* ``decode_tok_s``: decode steps per second between the first and the last token's logits;
* ``kv_bytes``: KV-cache bytes right after prefill (``kv_bytes_end``: after the last step);
* ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call
  (weights excluded); on CPU the peak resident set size above the one before the call, sampled every
  millisecond from ``/proc/self/statm`` (psutil elsewhere) after returning freed heap to the OS with
  ``malloc_trim`` — approximate (the allocator may reuse pages it holds), and taken in a separate untimed
  run so the sampler never disturbs a timing. ``memory_kind`` in the JSON says which.

The ideal. "The same model run on K visual tokens whose choice costs nothing" is built by *replaying*: the
method's own kept indices from its first (warm-up) run become a :class:`ReplaySelection` config, which
returns them from a cache without computing anything and asks for no vision-tower signals (so no probes are
installed). The ideal therefore runs the same vision tower, the same adapter path (gather of the kept
features, shortened ``input_ids`` / mask / positions) and a prefill over exactly the same K tokens at the
same positions, so the gap ``ttft / ideal_ttft - 1`` is precisely what choosing the tokens costs: the
selection itself plus any probe the method needs. This is more honest than timing the ``random`` method and
subtracting its selection time (a subtraction of two noisy numbers, and random keeps other positions) and
than a shorter prompt without the adapter (it would also drop the gather every method pays). In-LLM and
KV-cache methods (``aim``, ``zipvl``, ``mixed_kv``) have no pre-LLM choice to replay: their ideal is
``null``.

Timing protocol. Every row runs its three arms — the uncompressed baseline, the method, the ideal —
interleaved: ``--warmup`` untimed runs of each, then ``--repeats`` rounds of one timed run per arm (the
order rotating each round), so machine drift (another job, clocks, thermals) hits all arms alike; figures
are medians. Speed-ups are against the row's own baseline runs; the top-level ``baseline`` aggregates all
baseline runs. The JSON (``{"settings", "machine", "model", "baseline", "rows", ...}``) is rewritten
atomically after every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmcompress.config import MethodConfig, PreLLMMethod, check_int
from mmcompress.tokens import Selection, VisualTokens

from .bench_common import DecoderClock, ForwardClock, machine, sync, write_json_atomic

__all__ = [
    "RANDOM_ARCHS",
    "ReplaySelection",
    "random_config",
    "build_random_model",
    "visual_token_count",
    "random_inputs",
    "run_bench",
    "format_table",
    "add_arguments",
]

# -- the published architectures (random weights) ---------------------------------------------------------

_CLIP_L14_336 = {  # openai/clip-vit-large-patch14-336, as in llava-hf's configs
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_VICUNA_7B = {  # lmsys/vicuna-7b-v1.5 with LLaVA's 32064-entry vocabulary
    "model_type": "llama",
    "vocab_size": 32064,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32001,
    "tie_word_embeddings": False,
}

#: ``random:<name>`` → the config of the published checkpoint (llava-hf/llava-1.5-7b-hf,
#: llava-hf/llava-v1.6-vicuna-7b-hf, Qwen/Qwen2-VL-7B-Instruct), as nested dicts.
RANDOM_ARCHS: dict[str, dict] = {
    "llava-1.5-7b": {
        "model_type": "llava",
        "vision_config": _CLIP_L14_336,
        "text_config": _VICUNA_7B,
        "image_token_index": 32000,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",  # the 2-layer MLP projector (1024 -> 4096 -> 4096)
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    },
    "llava-next-7b": {
        "model_type": "llava_next",
        "vision_config": _CLIP_L14_336,
        "text_config": _VICUNA_7B,
        "image_token_index": 32000,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "tie_word_embeddings": False,
    },
    "qwen2-vl-7b": {
        "model_type": "qwen2_vl",
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,  # the merger's output width = the LLM's
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "hidden_act": "quick_gelu",
        },
        "text_config": {
            "model_type": "qwen2_vl_text",
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "max_window_layers": 28,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
    },
}

#: default image size (height, width) per family: LLaVA-1.5 resizes to 336; 672x672 is LLaVA-NeXT's
#: square 2x2 pinpoint (5 views, 2928 tokens with newlines) and gives Qwen2-VL 576 merged tokens.
_DEFAULT_IMAGE = {"llava": (336, 336), "llava_next": (672, 672), "qwen2_vl": (672, 672)}

#: published speed-ups to report beside ours (shared/reference/peers-and-eval-conventions.md §2.4 Table D)
PUBLISHED = {
    "llava-next-7b": [
        "DART Table 2 (LLaVA-NeXT-7B, POPE, 2880 -> 320 tokens): FastV 2.97x prefill / 1.98x total, "
        "DART 2.99x prefill / 1.99x total",
        "HiRED (AAAI 2025): 4.7x throughput at a 20% token budget (LLaVA-NeXT-7B)",
    ]
}


def _arch_name(model: str) -> str:
    arch = model.removeprefix("random:")
    if arch not in RANDOM_ARCHS:
        raise ValueError(
            f"model={model!r} is not a known random architecture; allowed: "
            f"{', '.join('random:' + a for a in RANDOM_ARCHS)}"
        )
    return arch


def random_config(
    arch: str, *, tiny: bool = False, layers: int | None = None, vision_layers: int | None = None
) -> Any:
    """The transformers config of ``RANDOM_ARCHS[arch]`` (``arch`` with or without ``random:``).

    ``tiny`` keeps the vocabulary, image geometry and visual token counts but shrinks widths to 64 (vision)
    / 128 (LLM) and depths to 2; ``layers`` / ``vision_layers`` then set the LLM / vision-tower depth.
    """
    from transformers import AutoConfig

    arch = _arch_name(arch)
    for value, field in ((layers, "layers"), (vision_layers, "vision_layers")):
        if value is not None:
            check_int(value, field, 1, 1000)
    spec = copy.deepcopy(RANDOM_ARCHS[arch])
    text, vision = spec["text_config"], spec["vision_config"]
    qwen = spec["model_type"] == "qwen2_vl"
    depth_key = "depth" if qwen else "num_hidden_layers"
    if tiny:
        text.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        text["num_key_value_heads"] = 2 if qwen else 4
        if qwen:  # M-RoPE sections must add up to head_dim / 2 = 16
            text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [4, 6, 6]}
            vision.update(embed_dim=64, hidden_size=128, num_heads=4, depth=2)
        else:
            vision.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    if layers is not None:
        text["num_hidden_layers"] = layers
        if qwen:
            text["max_window_layers"] = layers
    if vision_layers is not None:
        vision[depth_key] = vision_layers
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def _model_class(model_type: str) -> type[nn.Module]:
    import transformers

    names = {
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
    }
    if model_type not in names:
        raise ValueError(f"model_type={model_type!r} has no random builder; allowed: {sorted(names)}")
    return getattr(transformers, names[model_type])


@torch.no_grad()
def _fill_random(model: nn.Module, seed: int, std: float) -> None:
    """Weights ~ N(0, std) (transformers' ``initializer_range``), norm scales 1, biases 0 — the values of a
    fresh transformers model at the cost of one ``normal_`` per tensor (no per-module init)."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith(".bias"):
            p.zero_()
        elif p.dim() == 1 and name.endswith(".weight"):  # LayerNorm / RMSNorm scales
            p.fill_(1.0)
        else:  # matrices, convolutions, embeddings, CLIP's class embedding, LLaVA-NeXT's image_newline
            p.normal_(0.0, std, generator=gen)


def build_random_model(
    arch: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    tiny: bool = False,
    layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """The architecture of ``RANDOM_ARCHS[arch]`` with random weights, built directly on ``device``.

    Built under transformers' ``no_init_weights`` (no per-module initialisation, which takes minutes for 7B
    parameters on a CPU) and then filled by :func:`_fill_random`. ``device="meta"`` allocates nothing (for
    counting parameters) and leaves the weights unset.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights

    cfg = random_config(arch, tiny=tiny, layers=layers, vision_layers=vision_layers)
    cls = _model_class(cfg.model_type)
    dev = torch.device(device)
    with dev, no_init_weights():
        model = cls._from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    if dev.type != "meta":
        std = float(getattr(cfg.get_text_config(), "initializer_range", 0.02))
        _fill_random(model, seed, std)
    return model.eval()


def _image_hw(image_size: Sequence[int] | None, model_type: str) -> tuple[int, int]:
    hw = tuple(image_size) if image_size is not None else _DEFAULT_IMAGE[model_type]
    if len(hw) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in hw):
        raise ValueError(f"image_size={image_size!r} must be (height, width) in pixels, both ints >= 1")
    return hw  # type: ignore[return-value]


def visual_token_count(config: Any, image_size: Sequence[int] | None = None) -> int:
    """Visual tokens one ``image_size = (height, width)`` image contributes to the prompt of a model with
    ``config`` (LLaVA: 576 for CLIP-L/336; LLaVA-NeXT: thumbnail + unpadded crop grid + one newline per crop
    row, 2928 at 672x672; Qwen2-VL: one token per 2x2 merge of 14 px patches, 576 at 672x672)."""
    mt = config.model_type
    h, w = _image_hw(image_size, mt)
    vc = config.vision_config
    if mt == "llava":
        side = vc.image_size // vc.patch_size
        return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    if mt == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        from mmcompress.adapters.hf_llava import _index_canvas_unpad

        side = vc.image_size // vc.patch_size
        nph, npw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, vc.image_size)
        rows, cols, _, _ = _index_canvas_unpad(nph * side, npw * side, (h, w))
        return side * side + rows * (cols + 1)
    if mt == "qwen2_vl":
        unit = vc.patch_size * vc.spatial_merge_size
        if h % unit or w % unit:
            raise ValueError(f"image_size={(h, w)} must be multiples of {unit} px for Qwen2-VL")
        return (h // vc.patch_size) * (w // vc.patch_size) // vc.spatial_merge_size**2
    raise ValueError(f"model_type={mt!r} is not supported; allowed: 'llava', 'llava_next', 'qwen2_vl'")


def random_inputs(
    config: Any,
    *,
    image_size: Sequence[int] | None = None,
    text_tokens: int = 48,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A batch of one synthetic prompt for ``config``'s model, as its processor would build it.

    ``[bos] + text_tokens // 3 - 1`` random text ids, one image's placeholder run (Qwen2-VL: wrapped in
    vision start / end), then the remaining random text ids; random pixels of the right shape
    (LLaVA ``[1, 3, S, S]``; LLaVA-NeXT ``[1, views, 3, S, S]`` + ``image_sizes``; Qwen2-VL flattened
    patches ``[t*h*w, 3*2*14*14]`` + ``image_grid_thw`` + ``mm_token_type_ids``).
    """
    check_int(text_tokens, "text_tokens", 2, 100_000)
    mt = config.model_type
    h, w = _image_hw(image_size, mt)
    n_vis = visual_token_count(config, (h, w))
    tc, vc = config.get_text_config(), config.vision_config
    g = torch.Generator().manual_seed(seed)
    img_id = int(config.image_token_id)
    top = min(img_id, int(tc.vocab_size)) - 1  # ordinary text ids sit below the special tokens
    text = torch.randint(3, top, (text_tokens,), generator=g).tolist()
    bos = int(tc.bos_token_id if tc.bos_token_id is not None else 1)
    pre, post = [bos] + text[: text_tokens // 3 - 1], text[text_tokens // 3 - 1 : text_tokens - 1]
    out: dict[str, torch.Tensor] = {}
    if mt == "qwen2_vl":
        run = [int(config.vision_start_token_id)] + [img_id] * n_vis + [int(config.vision_end_token_id)]
        grid = torch.tensor([[1, h // vc.patch_size, w // vc.patch_size]])
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        out["pixel_values"] = torch.randn(int(grid.prod()), patch_dim, generator=g)
        out["image_grid_thw"] = grid
    else:
        run = [img_id] * n_vis
        s = vc.image_size
        if mt == "llava_next":
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            views = image_size_to_num_patches((h, w), config.image_grid_pinpoints, s)
            out["pixel_values"] = torch.randn(1, views, 3, s, s, generator=g)
            out["image_sizes"] = torch.tensor([[h, w]])
        else:
            out["pixel_values"] = torch.randn(1, 3, s, s, generator=g)
    ids = torch.tensor([pre + run + post])
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    if mt == "qwen2_vl":
        out["mm_token_type_ids"] = (ids == img_id).long()
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


# -- the ideal: kept indices replayed at no cost ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplaySelection(PreLLMMethod):
    """Keep given indices: ``kept[i]`` for the call's ``i``-th image. The ideal arm of ``bench e2e``.

    Not registered (it is not a compression method). ``select`` returns a tensor cached per image and
    device, so after the first call a selection costs a dictionary lookup; ``needs()`` is empty, so no
    vision-tower probe is installed.

    Attributes:
        kept: per image, strictly increasing 0-based indices into that image's packed visual tokens.
    """

    name: ClassVar[str] = "replay"
    summary: ClassVar[str] = "replays precomputed kept indices (the ideal of bench e2e)"
    budget_field: ClassVar[str | None] = None

    kept: tuple[tuple[int, ...], ...] = ()

    def validate(self) -> None:
        if not isinstance(self.kept, tuple) or not self.kept:
            raise TypeError(
                f"kept must be a non-empty tuple of per-image index tuples, got a {type(self.kept).__name__} "
                f"of length {len(self.kept) if hasattr(self.kept, '__len__') else '?'}"
            )
        for i, idx in enumerate(self.kept):
            ok = isinstance(idx, tuple) and idx and all(type(x) is int for x in idx)
            if not ok or idx[0] < 0 or any(b <= a for a, b in zip(idx, idx[1:])):
                shown = repr(idx) if len(repr(idx)) <= 80 else repr(idx)[:77] + "..."
                raise ValueError(
                    f"kept[{i}]={shown} is not allowed: it must be a non-empty tuple of strictly "
                    f"increasing ints >= 0"
                )
        object.__setattr__(self, "_cache", {})

    def select(self, tokens: VisualTokens) -> Selection:
        i = tokens.image_index
        if i >= len(self.kept):
            raise ValueError(f"replay: image {i} has no kept indices (kept covers {len(self.kept)} images)")
        key = (i, tokens.features.device)
        idx = self._cache.get(key)  # type: ignore[attr-defined]
        if idx is None:
            if self.kept[i][-1] >= tokens.num_tokens:
                raise ValueError(
                    f"replay: kept[{i}] reaches index {self.kept[i][-1]} but image {i} has "
                    f"{tokens.num_tokens} visual tokens"
                )
            idx = torch.tensor(self.kept[i], dtype=torch.long, device=tokens.features.device)
            self._cache[key] = idx  # type: ignore[attr-defined]
        return Selection(indices=idx)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "kept_per_image": [len(k) for k in self.kept]}


# -- loading ----------------------------------------------------------------------------------------------


def _param_bytes(model: nn.Module) -> tuple[int, int]:
    n = b = 0
    for p in model.parameters():
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b


def load_for_bench(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tiny: bool = False,
    layers: int | None = None,
    vision_layers: int | None = None,
    image_size: Sequence[int] | None = None,
    text_tokens: int = 48,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[nn.Module, dict, dict]:
    """``(model, inputs on device, model info)`` for ``--model`` (module docstring)."""
    name = str(name)
    if name.startswith("random:"):
        arch = _arch_name(name)
        dt = dtype or torch.bfloat16
        model = build_random_model(
            arch,
            device=device,
            dtype=dt,
            tiny=tiny,
            layers=layers,
            vision_layers=vision_layers,
            seed=seed,
            attn_implementation=attn_implementation,
        )
        inputs = random_inputs(
            model.config, image_size=image_size, text_tokens=text_tokens, seed=seed, dtype=dt
        )
        kind = "random weights, published architecture" + (" (tiny)" if tiny else "")
    else:
        if tiny or layers is not None or vision_layers is not None or image_size is not None:
            raise ValueError(
                f"--tiny / --layers / --vision-layers / --image-size apply to random: models only, "
                f"not to {name!r}"
            )
        from mmcompress import zoo

        from .compare import eval_samples

        model, processor = zoo.load(
            name, dtype=dtype or torch.float32, attn_implementation=attn_implementation
        )
        model = model.to(device)
        sample = eval_samples(name, 1, seed)[0]
        inputs = dict(
            processor(images=sample.image, text=zoo.build_prompt(sample.question), return_tensors="pt")
        )
        dt = next(model.parameters()).dtype
        inputs = {k: v.to(dt) if torch.is_floating_point(v) else v for k, v in inputs.items()}
        kind = "checkpoint"
    inputs = {k: v.to(device) for k, v in inputs.items()}
    n_params, n_bytes = _param_bytes(model)
    tc = model.config.get_text_config()
    vc = model.config.vision_config
    info = {
        "name": name,
        "kind": kind,
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "params": n_params,
        "weights_bytes": n_bytes,
        "llm_layers": tc.num_hidden_layers,
        "llm_hidden": tc.hidden_size,
        "vision_layers": getattr(vc, "num_hidden_layers", None),
        "vision_hidden": getattr(vc, "hidden_size", None),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "visual_tokens": int((inputs["input_ids"] == int(model.config.image_token_id)).sum()),
    }
    return model, inputs, info


# -- one measured generate() ------------------------------------------------------------------------------


class _StepClock:
    """A logits processor (duck-typed: transformers stays a lazy import for the CLI) timestamping each
    produced token's logits — generate calls processors once per step — CUDA-synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _vision_module(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "model", model)
    return getattr(base, "vision_tower", None) or getattr(base, "visual", None)


def _generate(model: nn.Module, inputs: dict, new_tokens: int, procs: list) -> Any:
    from transformers import LogitsProcessorList

    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # exactly this many steps: EOS is suppressed
        do_sample=False,
        logits_processor=LogitsProcessorList(procs),
        return_dict_in_generate=True,
    )


@torch.no_grad()
def _run_once(model: nn.Module, inputs: dict, decode_tokens: int) -> dict:
    import mmcompress as mmc
    from mmcompress.report import cache_bytes

    device = inputs["input_ids"].device
    steps = _StepClock(device)
    dec = DecoderClock(model)
    vis_mod = _vision_module(model)
    vis = ForwardClock(vis_mod) if vis_mod is not None else None
    try:
        sync(device)
        t0 = time.perf_counter()
        out = _generate(model, inputs, decode_tokens + 1, [steps])
        sync(device)
        t1 = time.perf_counter()
    finally:
        dec.remove()
        if vis is not None:
            vis.remove()
    t = steps.times
    rep = mmc.report(model)
    n_in = int((inputs["input_ids"] == int(model.config.image_token_id)).sum())
    run = {
        "ttft_ms": (t[0] - t0) * 1e3,
        "total_ms": (t1 - t0) * 1e3,
        "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else float("nan"),
        "vision_ms": sum(vis.ms) if vis is not None else None,
        "llm_prefill_ms": dec.prefill_ms[0] if dec.prefill_ms else None,
        "kv_bytes": dec.prefill_kv_bytes[0] if dec.prefill_kv_bytes else None,
        "kv_bytes_end": cache_bytes(out.past_key_values),
        "method_ms": None,
        "visual_tokens_in": n_in,
        "visual_tokens_out": n_in,
        "prompt_len": int(inputs["input_ids"].shape[1]),
        "kept": None,
    }
    if rep is not None and rep.images:
        run.update(
            method_ms=rep.method_ms,
            visual_tokens_in=sum(rep.tokens_in),
            visual_tokens_out=sum(rep.tokens_out),
            prompt_len=rep.prompt_len_out,
            kept=[tuple(k) for k in rep.kept],
        )
    return run


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class _RssPeak:
    """Peak RSS above the starting RSS over a ``with`` block, polled by a thread every ``interval`` s."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.start = self.peak = 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssPeak:
        _trim_heap()
        self.start = self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda: torch.cuda.max_memory_allocated above the allocation before the call (weights excluded)"
    src = "/proc/self/statm" if _rss_bytes() is not None and Path("/proc/self/statm").exists() else "psutil"
    return (
        f"{device.type}: peak RSS above the RSS before the call, sampled every 1 ms from {src} after "
        f"malloc_trim (approximate: the allocator may reuse pages it already holds)"
    )


@torch.no_grad()
def _peak_memory(model: nn.Module, inputs: dict, decode_tokens: int) -> int:
    device = inputs["input_ids"].device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _generate(model, inputs, decode_tokens + 1, [])
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with _RssPeak() as rss:
        _generate(model, inputs, decode_tokens + 1, [])
    return int(rss.peak - rss.start)


# -- arms, rows, summaries --------------------------------------------------------------------------------


def _install(model: nn.Module, cfg: MethodConfig | None) -> None:
    import mmcompress as mmc

    mmc.restore(model)
    if cfg is not None:
        mmc.compress(model, cfg)


_MEDIAN_KEYS = ("ttft_ms", "total_ms", "decode_tok_s", "vision_ms", "llm_prefill_ms", "method_ms")
_LAST_KEYS = ("kv_bytes", "kv_bytes_end", "visual_tokens_in", "visual_tokens_out", "prompt_len")


def _summary(runs: list[dict], peak: int | None) -> dict:
    out: dict[str, Any] = {}
    for k in _MEDIAN_KEYS:
        vals = [r[k] for r in runs if r[k] is not None and not math.isnan(r[k])]
        out[k] = statistics.median(vals) if vals else None
    out["ttft_ms_min"] = min(r["ttft_ms"] for r in runs)
    out["ttft_ms_runs"] = [round(r["ttft_ms"], 3) for r in runs]
    for k in _LAST_KEYS:
        out[k] = runs[-1][k]
    out["peak_mem_bytes"] = peak
    out["runs"] = len(runs)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _plan(methods: Sequence[str], keeps: Sequence[int | float]) -> list[tuple[str, int | float | None]]:
    from mmcompress import registry

    if not methods:
        raise ValueError("methods is empty; give at least one method name (or 'none')")
    plan: list[tuple[str, int | float | None]] = []
    for m in methods:
        if m == "none":
            continue
        ks: Sequence[int | float | None] = keeps if registry.get(m).budget_field else [None]
        if registry.get(m).budget_field and not keeps:
            raise ValueError(f"method {m!r} takes a token budget; give --keep")
        for k in ks:
            registry.create_with_budget(m, k)  # bad names and budgets fail before the model is built
            plan.append((m, k))
    return plan


@torch.no_grad()
def run_bench(
    model: str = "shapes-llava",
    methods: Sequence[str] = ("none", "random", "divprune"),
    keeps: Sequence[int | float] = (0.5, 0.11),
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    tiny: bool = False,
    layers: int | None = None,
    vision_layers: int | None = None,
    image_size: Sequence[int] | None = None,
    text_tokens: int = 48,
    decode_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 5,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    json_out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Baseline, method and ideal for every method × budget (module docstring); returns the JSON payload.

    ``warmup >= 1``: the first warm-up run of a method also gives the kept indices its ideal replays.
    """
    from mmcompress import registry

    check_int(warmup, "warmup", 1, 1000)
    check_int(repeats, "repeats", 1, 10_000)
    check_int(decode_tokens, "decode_tokens", 1, 100_000)
    plan = _plan(methods, keeps)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench e2e: device='cuda' but no GPU is available")
    torch.manual_seed(seed)
    t_load = time.perf_counter()
    net, inputs, info = load_for_bench(
        model,
        device=dev,
        dtype=dtype,
        tiny=tiny,
        layers=layers,
        vision_layers=vision_layers,
        image_size=image_size,
        text_tokens=text_tokens,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    info["load_s"] = time.perf_counter() - t_load
    payload: dict[str, Any] = {
        "settings": {
            "model": str(model),
            "methods": list(methods),
            "keeps": list(keeps),
            "tiny": tiny,
            "layers": layers,
            "vision_layers": vision_layers,
            "image_size": list(image_size) if image_size is not None else None,
            "text_tokens": text_tokens,
            "decode_tokens": decode_tokens,
            "warmup": warmup,
            "repeats": repeats,
            "seed": seed,
            "attn_implementation": attn_implementation,
            "batch_size": 1,
        },
        "machine": machine(dev),
        "model": info,
        "memory_kind": memory_kind(dev),
        "ideal": "the method's own kept indices (first warm-up run) replayed by ReplaySelection: same vision "
        "tower, adapter path and K tokens at the same positions, no selection cost, no probes",
        "baseline": None,
        "rows": [],
    }
    arch = str(model).removeprefix("random:")
    if arch in PUBLISHED:
        payload["published"] = PUBLISHED[arch]
    if dev.type != "cuda":
        payload["note"] = "CPU figures; GPU figures are still to be taken"
    log(
        f"{info['name']}: {info['architecture']} {info['dtype']}, {info['params'] / 1e6:.1f}M params, "
        f"{info['visual_tokens']} visual tokens in a {info['prompt_tokens']}-token prompt, on {dev}"
    )
    base_runs: list[dict] = []
    for _ in range(warmup):
        _install(net, None)
        _run_once(net, inputs, decode_tokens)
    base_peak = _peak_memory(net, inputs, decode_tokens)

    def flush() -> None:
        payload["baseline"] = _summary(base_runs, base_peak) if base_runs else None
        if json_out is not None:
            write_json_atomic(json_out, payload)

    log(format_table([], header=True))
    for method, keep in plan:
        cfg = registry.create_with_budget(method, keep)
        try:
            _install(net, cfg)  # compress() refuses a method the model cannot run, before patching
        except (ValueError, TypeError) as e:
            payload["rows"].append({"method": method, "keep": keep, "skipped": str(e)})
            log(f"{method:<12} {keep!s:>6}  skipped: {e}")
            flush()
            continue
        first = _run_once(net, inputs, decode_tokens)
        for _ in range(warmup - 1):
            _install(net, cfg)
            _run_once(net, inputs, decode_tokens)
        arms: dict[str, MethodConfig | None] = {"baseline": None, "method": cfg}
        if isinstance(cfg, PreLLMMethod) and first["kept"] is not None:
            arms["ideal"] = ReplaySelection(kept=tuple(first["kept"]))
            for _ in range(warmup):
                _install(net, arms["ideal"])
                _run_once(net, inputs, decode_tokens)
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        names = list(arms)
        for r in range(repeats):
            for a in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
                _install(net, arms[a])
                runs[a].append(_run_once(net, inputs, decode_tokens))
        peaks = {}
        for a in names:
            _install(net, arms[a])
            peaks[a] = _peak_memory(net, inputs, decode_tokens)
        _install(net, None)
        base_runs.extend(runs["baseline"])
        s = {a: _summary(runs[a], peaks[a]) for a in names}
        m, b, ideal = s["method"], s["baseline"], s.get("ideal")
        row = {
            "method": method,
            "keep": keep,
            "config": cfg.to_dict(),
            **m,
            "kept_stable": all(x["kept"] == first["kept"] for x in runs["method"]),
            "speedup_ttft": _ratio(b["ttft_ms"], m["ttft_ms"]),
            "speedup_llm_prefill": _ratio(b["llm_prefill_ms"], m["llm_prefill_ms"]),
            "speedup_decode": _ratio(m["decode_tok_s"], b["decode_tok_s"]),
            "kv_ratio": _ratio(m["kv_bytes"], b["kv_bytes"]),
            "ideal_speedup_ttft": _ratio(b["ttft_ms"], ideal["ttft_ms"]) if ideal else None,
            "gap_vs_ideal": (_ratio(m["ttft_ms"], ideal["ttft_ms"]) - 1.0) if ideal else None,
            "overhead_ms": (m["ttft_ms"] - ideal["ttft_ms"]) if ideal else None,
            "baseline": b,
            "ideal": ideal,
        }
        payload["rows"].append(row)
        log(format_table([row], header=False))
        flush()
    if not base_runs:  # only skipped rows (or only "none"): time the baseline on its own
        for _ in range(repeats):
            _install(net, None)
            base_runs.append(_run_once(net, inputs, decode_tokens))
    flush()
    return payload


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(rows: list[dict], baseline: dict | None = None, header: bool = True) -> str:
    """One line per row (and the baseline first when given): TTFT vs baseline and vs the ideal."""
    lines = []
    if header:
        lines.append(
            f"{'method':<12} {'keep':>6} {'tokens':>11} {'TTFT ms':>9} {'x base':>7} {'ideal ms':>9} "
            f"{'gap':>7} {'sel ms':>8} {'vision':>8} {'LLM pf':>8} {'tok/s':>7} {'KV MiB':>8} {'peak MiB':>9}"
        )
    if baseline is not None:
        rows = [{"method": "none", "keep": None, **baseline}, *rows]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['method']:<12} {r['keep']!s:>6}  skipped: {r['skipped']}")
            continue
        ideal = r.get("ideal") or {}
        gap = r.get("gap_vs_ideal")
        lines.append(
            f"{r['method']:<12} {'' if r['keep'] is None else r['keep']!s:>6} "
            f"{str(r['visual_tokens_in']) + '->' + str(r['visual_tokens_out']):>11} "
            f"{r['ttft_ms']:>9.1f} {_f(r.get('speedup_ttft'), '.2f'):>7} "
            f"{_f(ideal.get('ttft_ms'), '.1f'):>9} {'-' if gap is None else f'{gap:+.1%}':>7} "
            f"{_f(r.get('method_ms'), '.2f'):>8} {_f(r.get('vision_ms'), '.1f'):>8} "
            f"{_f(r.get('llm_prefill_ms'), '.1f'):>8} {_f(r.get('decode_tok_s'), '.1f'):>7} "
            f"{_mib(r.get('kv_bytes')):>8} {_mib(r.get('peak_mem_bytes')):>9}"
        )
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _keeps(text: str) -> list[int | float]:
    from .harness import parse_keep

    try:
        return [parse_keep(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hw(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or S in pixels, got {text!r}") from None
    return h, w


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _cmd(args: argparse.Namespace) -> int:
    out = run_bench(
        args.model,
        args.methods,
        args.keep,
        device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        tiny=args.tiny,
        layers=args.layers,
        vision_layers=args.vision_layers,
        image_size=args.image_size,
        text_tokens=args.text_tokens,
        decode_tokens=args.decode_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        attn_implementation=args.attn,
        json_out=args.json,
        log=lambda s: print(s, flush=True),
    )
    print()
    print(format_table(out["rows"], baseline=out["baseline"]))
    for line in out.get("published", []):
        print(f"published: {line}")
    if "note" in out:
        print(f"note: {out['note']}")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``bench e2e`` options (used by :mod:`mmcompress.cli`)."""
    p.add_argument(
        "--model",
        default="shapes-llava",
        help="embedded name, local checkpoint folder, or random:" + "|random:".join(RANDOM_ARCHS),
    )
    p.add_argument("--methods", type=_names, default=["none", "random", "divprune"], help="comma-separated")
    p.add_argument(
        "--keep",
        type=_keeps,
        default=[0.5, 0.11],
        help="comma-separated budgets: ints = tokens per image, floats in (0, 1] = fractions",
    )
    p.add_argument("--tiny", action="store_true", help="random: models: small widths, same token counts")
    p.add_argument("--layers", type=int, default=None, help="random: models: LLM decoder layers")
    p.add_argument("--vision-layers", type=int, default=None, help="random: models: vision tower layers")
    p.add_argument("--image-size", type=_hw, default=None, help="random: models: HxW pixels of the image")
    p.add_argument("--text-tokens", type=int, default=48, help="random: models: text tokens in the prompt")
    p.add_argument("--decode-tokens", type=int, default=16, help="forced decode steps after the first token")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--dtype",
        default=None,
        choices=tuple(_DTYPES),
        help="default: bfloat16 for random:, float32 otherwise",
    )
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument(
        "--json", default=None, help="write the results here (e.g. evals/results/bench_e2e_....json)"
    )
    p.set_defaults(func=_cmd)
    return p


if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(prog="python -m mmcompress.evals.bench_e2e"))
    a = parser.parse_args()
    sys.exit(a.func(a))
