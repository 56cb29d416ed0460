"""Tests of the ``clip`` extra, run in their own environment (``make test-clip``: CUDA-build torch from PyPI,
the torchvision that matches it, open_clip). The main suite's torch is the CPU wheel, with which PyPI's
torchvision cannot load, so these tests are not collected there (pyproject ``testpaths = ["tests"]``)."""

import sys
from pathlib import Path

# the shared test helpers (tiny_models.py) live in tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
