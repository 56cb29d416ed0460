"""Vision-attention probes (SDPA stays on) against eager attention maps, for CLIP, SigLIP and DINOv2."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llava

from mmcompress.adapters.probes import AttentionProbe, vision_attention_modules
from mmcompress.signals import VitAttention

TOL = 1e-6  # fp32: the probe recomputes the same q/k products in a different order (seen: <= 3e-8)


@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("layer", [0, -2, -1])
@pytest.mark.parametrize("kind", ["cls", "received"])
def test_probe_matches_eager(tower, layer, kind):
    sdpa = tiny_llava(tower).model.vision_tower
    eager = tiny_llava(tower, attn="eager").model.vision_tower
    assert sdpa.config._attn_implementation == "sdpa"
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    probe = AttentionProbe(vision_attention_modules(sdpa)[layer], VitAttention(layer, kind))
    with torch.no_grad():
        sdpa(pix)
        att = eager(pix, output_attentions=True).attentions[layer]  # [V, H, T, T]
    want = att[:, :, 0] if kind == "cls" else att.mean(2)
    assert probe.value.shape == want.shape
    assert (probe.value - want).abs().max() < TOL
    probe.remove()
    probe.value = None
    with torch.no_grad():
        sdpa(pix)
    assert probe.value is None  # removed hooks never fire again


def test_signal_validation():
    with pytest.raises(ValueError, match="kind='row' is not allowed"):
        VitAttention(0, "row")
    with pytest.raises(TypeError, match="layer must be an int"):
        VitAttention(1.5)
