"""tests_llava runs only in the second environment (scripts/llava_env.sh -> .venv-llava, transformers 4.37 and
the original `llava` package): `.venv-llava/bin/python -m pytest tests_llava -q`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

try:
    import llava.model  # noqa: F401
except ImportError as e:  # the main environment: say how to run these instead of failing 40 times
    pytest.exit(
        f"tests_llava needs the original LLaVA package ({e}); run `bash scripts/llava_env.sh` and then "
        f"`.venv-llava/bin/python -m pytest tests_llava -q`",
        returncode=4,
    )
