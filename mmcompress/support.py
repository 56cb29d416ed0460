"""The support matrix: which registered method runs on which model family, and why not (issue 7).

Nothing here is a hand-written table. A cell is what :func:`mmcompress.compress` decides: the method's
config at its defaults (``registry.create_with_budget(name, None)``) is split into stages and the very
checks ``compress`` runs before it patches anything (``api._check_stages``: the adapter's ``check()``,
the in-LLM patch's, the KV-cache patch's) run against the family's **reference architecture**. A cell
is ``("supported", "")`` when they pass and ``("n/a", reason)`` with the error they raise otherwise, so
the README table and the errors users see cannot disagree. ``tests/test_support_matrix.py`` runs every
"supported" cell end to end on a tiny random model of its family and checks that every "n/a" cell raises
an error naming the families the method supports (:func:`name_supported_families`, called by
``compress``).

A reference architecture is the family's public checkpoint config (tower type and depth, patch grid,
AnyRes pinpoints, LLM depth, placeholder ids) at a minimal width, built on the ``meta`` device: no weights,
no memory, a fraction of a second. What the checks look at (tower type and CLS token, layer counts,
layouts, decoder layer types, attention implementation) is exactly the checkpoint's.

``python -m mmcompress.support`` prints the markdown table; ``--write README.md`` refreshes the block
between ``<!-- support-matrix:start -->`` and ``<!-- support-matrix:end -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from . import registry

__all__ = [
    "SUPPORTED",
    "NOT_APPLICABLE",
    "Family",
    "families",
    "family",
    "family_of",
    "reference_model",
    "cell",
    "support_matrix",
    "supported_families",
    "name_supported_families",
    "render_markdown",
    "readme_block",
    "replace_readme_block",
    "main",
]

SUPPORTED = "supported"
NOT_APPLICABLE = "n/a"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
_STAGES = {"pre_llm": "pre-LLM", "in_llm": "in-LLM", "kv_cache": "KV cache"}
_WIDTH = 16  # hidden size of the reference architectures: the checks never look at widths


@dataclasses.dataclass(frozen=True)
class Family:
    """One column of the matrix.

    Attributes:
        key: short id (``"llava-1.5"``).
        title: display name, used in the table and in error messages.
        model_class: the transformers class name the family's models have.
        reference: the public checkpoint whose architecture :attr:`build` reproduces.
        build: returns the reference architecture (on the ``meta`` device, random-free).
        tokenpacker: True for a LLaVA model with a TokenPacker projector installed.
    """

    key: str
    title: str
    model_class: str
    reference: str
    build: Callable[[], nn.Module] = dataclasses.field(repr=False, compare=False)
    tokenpacker: bool = False

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` (an instance) belongs to this family."""
        if type(model).__name__ != self.model_class:
            return False
        return _has_tokenpacker(model) == self.tokenpacker


def _has_tokenpacker(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "config", None), "tokenpacker", None), dict)


# -- reference architectures (public checkpoint configs at minimal width) ------------------------------
def _llama(layers: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=2 * _WIDTH,
        intermediate_size=2 * _WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def _clip_l336() -> object:
    """CLIP ViT-L/14-336 (LLaVA-1.5 / LLaVA-NeXT): 24 layers, 24x24 patches + CLS."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=_WIDTH,
        intermediate_size=_WIDTH,
        num_hidden_layers=24,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
    )


def _on_meta(cls: type, cfg: object) -> nn.Module:
    with torch.device("meta"):
        return cls._from_config(cfg, attn_implementation="sdpa").eval()


def _llava_15() -> nn.Module:
    """llava-hf/llava-1.5-7b-hf: CLIP-L/336 layer -2 without CLS, Llama-2-7B (32 layers)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=_clip_l336(),
        text_config=LlamaConfig(**_llama(32, 32064)),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )
    return _on_meta(LlavaForConditionalGeneration, cfg)


def _llava_next() -> nn.Module:
    """llava-hf/llava-v1.6-vicuna-7b-hf: CLIP-L/336 AnyRes (5 pinpoints), Vicuna-7B (32 layers)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=_clip_l336(),
        text_config=LlamaConfig(**_llama(32, 32064)),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )
    return _on_meta(LlavaNextForConditionalGeneration, cfg)


def _llava_next_video() -> nn.Module:
    """llava-hf/LLaVA-NeXT-Video-7B-hf: CLIP-L/336 AnyRes images (5 pinpoints), videos average-pooled with
    stride 2 (24x24 -> 12x12 tokens per frame), Vicuna-7B (32 layers)."""
    from transformers import LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    cfg = LlavaNextVideoConfig(
        vision_config=_clip_l336(),
        text_config=LlamaConfig(**_llama(32, 32064)),
        image_token_index=32001,
        video_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        spatial_pool_mode="average",
        spatial_pool_stride=2,
    )
    return _on_meta(LlavaNextVideoForConditionalGeneration, cfg)


def _llava_tokenpacker() -> nn.Module:
    """The LLaVA-1.5 reference with TokenPacker (scale 2: 144 tokens, official layers 12/16/22/23)."""
    from mmcompress.adapters.hf_llava_tokenpacker import install_tokenpacker

    model = _llava_15()
    with torch.device("meta"):
        install_tokenpacker(model, scale=2)
    return model


def _llava_onevision() -> nn.Module:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m/384 (26 layers, 27x27 patches, no CLS),
    AnyRes up to 6x6 crops with ``anyres_max_9``, Qwen2-7B (28 layers)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=_WIDTH,
        intermediate_size=_WIDTH,
        num_hidden_layers=26,
        num_attention_heads=2,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_llama(28, 152000)),
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return _on_meta(LlavaOnevisionForConditionalGeneration, cfg)


def _qwen_text() -> dict:
    # M-RoPE sections sum to head_dim / 2 (Qwen2-VL-7B: [16, 24, 24] of 64; here [2, 3, 3] of 8)
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    return {**_llama(28, 152064), "rope_parameters": rope}


def _qwen2_vl() -> nn.Module:
    """Qwen/Qwen2-VL-7B-Instruct: 32 full-attention vision blocks, patch 14, 2x2 merge; 28 LLM layers."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(
        depth=32,
        embed_dim=_WIDTH,
        hidden_size=2 * _WIDTH,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(text_config=_qwen_text(), vision_config=vision)
    return _on_meta(Qwen2VLForConditionalGeneration, cfg)


def _qwen2_5_vl() -> nn.Module:
    """Qwen/Qwen2.5-VL-7B-Instruct: 32 vision blocks, windowed except 7/15/23/31; 28 LLM layers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=32,
        hidden_size=_WIDTH,
        out_hidden_size=2 * _WIDTH,
        intermediate_size=_WIDTH,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text(), vision_config=vision)
    return _on_meta(Qwen2_5_VLForConditionalGeneration, cfg)


_FAMILIES: tuple[Family, ...] = (
    Family("llava-1.5", "LLaVA-1.5", "LlavaForConditionalGeneration", "llava-hf/llava-1.5-7b-hf", _llava_15),
    Family(
        "llava-next",
        "LLaVA-NeXT",
        "LlavaNextForConditionalGeneration",
        "llava-hf/llava-v1.6-vicuna-7b-hf",
        _llava_next,
    ),
    Family(
        "llava-next-video",
        "LLaVA-NeXT-Video",
        "LlavaNextVideoForConditionalGeneration",
        "llava-hf/LLaVA-NeXT-Video-7B-hf",
        _llava_next_video,
    ),
    Family(
        "llava-tokenpacker",
        "LLaVA-1.5 + TokenPacker",
        "LlavaForConditionalGeneration",
        "llava-hf/llava-1.5-7b-hf + TokenPacker scale 2",
        _llava_tokenpacker,
        tokenpacker=True,
    ),
    Family(
        "llava-onevision",
        "LLaVA-OneVision",
        "LlavaOnevisionForConditionalGeneration",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        _llava_onevision,
    ),
    Family("qwen2-vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen/Qwen2-VL-7B-Instruct", _qwen2_vl),
    Family(
        "qwen2.5-vl",
        "Qwen2.5-VL",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        _qwen2_5_vl,
    ),
)


def families() -> tuple[Family, ...]:
    """The matrix's columns, in display order."""
    return _FAMILIES


def family(key: str) -> Family:
    """The family with this key; unknown keys raise naming the known ones."""
    for f in _FAMILIES:
        if f.key == key:
            return f
    raise ValueError(f"unknown model family {key!r}; known families: {', '.join(f.key for f in _FAMILIES)}")


def family_of(model: nn.Module) -> Family | None:
    """The family ``model`` belongs to (by class, and TokenPacker for LLaVA), or None."""
    return next((f for f in _FAMILIES if f.matches(model)), None)


@functools.cache
def reference_model(key: str) -> nn.Module:
    """The reference architecture of family ``key`` on the meta device (built once per process)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "vision_config is None" chatter of the config classes
    try:
        return family(key).build()
    finally:
        transformers.logging.set_verbosity(verbosity)


# -- cells ---------------------------------------------------------------------------------------------
def cell(method: str, family_key: str) -> tuple[str, str]:
    """``("supported", "")`` or ``("n/a", reason)`` for ``method`` at its defaults on the family's reference.

    The reason is the message of the error ``compress`` raises there (without the appended list of
    supported families).
    """
    from .api import Handle, _as_stages, _check_stages

    model = reference_model(family_key)
    pre, inllm, kv = _as_stages(registry.create_with_budget(method, None), {})
    handle = Handle(model, pre, "original", kv=kv, inllm=inllm)
    try:
        _check_stages(model, handle)
    except (ValueError, TypeError) as e:
        return NOT_APPLICABLE, str(e)
    return SUPPORTED, ""


def support_matrix(methods: Sequence[str] | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """``matrix[method][family_key] = ("supported" | "n/a", reason)`` for every registered method (or
    ``methods``), families in :func:`families` order."""
    names = registry.names() if methods is None else list(methods)
    return {m: {f.key: cell(m, f.key) for f in _FAMILIES} for m in names}


def supported_families(method: str) -> list[Family]:
    """The families on which ``method`` runs at its defaults."""
    return [f for f in _FAMILIES if cell(method, f.key)[0] == SUPPORTED]


def name_supported_families(err: BaseException, model: nn.Module, method: str) -> None:
    """Append the families ``method`` supports to ``err``'s message, in place, when the matrix marks
    ``method`` "n/a" for ``model``'s family (an error about an option on a supported family is left
    alone). Called by :func:`mmcompress.compress` before it re-raises a check's error."""
    fam = family_of(model)
    if fam is None or not err.args or not isinstance(err.args[0], str):
        return
    try:
        if cell(method, fam.key)[0] == SUPPORTED:
            return
        ok = [f.title for f in supported_families(method)]
    except Exception:  # noqa: BLE001  (a hint must never hide the real error)
        return
    where = ", ".join(ok) if ok else "no model family at its default options"
    err.args = (f"{err.args[0]} [{fam.title}: n/a; {method!r} supports: {where}]", *err.args[1:])


# -- markdown ------------------------------------------------------------------------------------------
def _md(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def render_markdown(matrix: dict[str, dict[str, tuple[str, str]]] | None = None) -> str:
    """The matrix as a markdown table with numbered n/a reasons (identical reasons share a number)."""
    matrix = support_matrix() if matrix is None else matrix
    fams = [f for f in _FAMILIES if any(f.key in row for row in matrix.values())]
    notes: dict[str, int] = {}
    where: dict[str, list[str]] = {}
    lines = [
        "| method | stage | " + " | ".join(f.title for f in fams) + " |",
        "|---|---|" + "|".join(":-:" for _ in fams) + "|",
    ]
    for name, row in matrix.items():
        cells = []
        for f in fams:
            status, reason = row[f.key]
            if status == SUPPORTED:
                cells.append("✓")
                continue
            n = notes.setdefault(reason, len(notes) + 1)
            where.setdefault(reason, []).append(f"`{name}` on {f.title}")
            cells.append(f"n/a ({n})")
        stage = _STAGES.get(registry.get(name).stage, registry.get(name).stage)
        lines.append(f"| `{name}` | {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "✓: `mmc.compress(model, name)` runs at the method's default options. Columns are each family's "
        "reference architecture: "
        + "; ".join(f"{f.title}: `{f.reference}`" for f in fams)
        + ". Generated by `python -m mmcompress.support` from the method registry and the adapters' "
        "checks; `tests/test_support_matrix.py` runs every cell on a tiny random model of its family.",
    ]
    if notes:
        lines += ["", "Why n/a (the error `compress` raises):", ""]
        lines += [f"{n}. {', '.join(where[r])}: {_md(r)}" for r, n in notes.items()]
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    """The text between the support-matrix markers of a README (raises if they are missing)."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"no {START} ... {END} block found")
    return text[i + len(START) : j].strip("\n") + "\n"


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with the support-matrix block replaced by ``block``."""
    readme_block(text)  # the markers must exist
    i, j = text.find(START) + len(START), text.find(END)
    return text[:i] + "\n" + block.strip("\n") + "\n" + text[j:]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mmcompress.support",
        description="Print the method x model-family support matrix (markdown), or refresh a README block.",
    )
    p.add_argument("--write", metavar="README", help="replace the support-matrix block of this file")
    p.add_argument(
        "--check", metavar="README", help="exit 1 if this file's support-matrix block is out of date"
    )
    args = p.parse_args(argv)
    table = render_markdown()
    if args.write or args.check:
        path = Path(args.write or args.check)
        text = path.read_text()
        if args.check:
            ok = readme_block(text) == table
            print(f"{path}: support matrix {'up to date' if ok else 'OUT OF DATE'}")
            return 0 if ok else 1
        path.write_text(replace_readme_block(text, table))
        print(f"{path}: support matrix written")
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
