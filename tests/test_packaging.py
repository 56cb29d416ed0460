"""The built wheel installs everything under the mmcompress namespace (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_top_level_is_only_mmcompress(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("mmcompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"mmcompress"}
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["mmcompress"]
    # the folders the project card names are inside the namespace
    for sub in ("adapters", "kernels", "demos", "evals", "methods", "zoo"):
        assert f"mmcompress/{sub}/__init__.py" in names, sub


def test_import_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import mmcompress, mmcompress.kernels.maxmin; "
        "from mmcompress.kernels._dispatch import resolve_backend; import torch; "
        "assert resolve_backend('auto', torch.device('cpu')) == 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
