"""Visual projectors that replace a VLM's own projector (DESIGN §2): TokenPacker (spec §1).

The math is in :mod:`.tokenpacker` (no model names); installing it into a transformers LLaVA model is in
:mod:`mmcompress.adapters.hf_llava_tokenpacker`, re-exported here:

    import mmcompress as mmc
    mmc.projectors.install_tokenpacker(model, processor, scale=2)   # 576 -> 144 visual tokens
"""

from ..adapters.hf_llava_tokenpacker import (
    LlavaTokenPacker,
    TokenPackerHDProcessor,
    install_tokenpacker,
    load_tokenpacker_llava,
    official_llava_to_hf,
    save_tokenpacker_llava,
    uninstall_tokenpacker,
)
from .tokenpacker import (
    TokenPacker,
    TokenPackerConfig,
    assemble_hd,
    hd_token_count,
    load_official_state,
    num_image_tokens,
    read_official_projector,
    slice_image,
    slice_plan,
)

__all__ = [
    "TokenPacker",
    "TokenPackerConfig",
    "LlavaTokenPacker",
    "TokenPackerHDProcessor",
    "assemble_hd",
    "hd_token_count",
    "install_tokenpacker",
    "uninstall_tokenpacker",
    "load_official_state",
    "load_tokenpacker_llava",
    "save_tokenpacker_llava",
    "official_llava_to_hf",
    "num_image_tokens",
    "read_official_projector",
    "slice_image",
    "slice_plan",
]
