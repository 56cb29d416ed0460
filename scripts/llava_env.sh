#!/usr/bin/env bash
# The second test environment: the original LLaVA codebase (`llava-torch`, haotian-liu/LLaVA) pins
# transformers 4.37, so its adapter (adapters/llava_original.py) is tested in its own virtualenv,
# .venv-llava, with `.venv-llava/bin/python -m pytest tests_llava -q`.
#
# Idempotent: a marker file records what was installed; re-running with the same script is a no-op.
# `llava-torch` is installed with --no-deps: its pinned requirements (torch 2.0.1, torchvision, gradio,
# bitsandbytes, deepspeed, ...) are for training and serving. Importing `llava.model` needs only torch,
# transformers and pillow (llava/mm_utils.py imports PIL), all installed here; nothing pulls torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-python3.11}"
VENV="${VENV_LLAVA:-.venv-llava}"
MARKER="$VENV/.installed-llava"
# the marker holds this script's hash: editing the pins below re-runs the install
STAMP="$(sha256sum "$0" | cut -d' ' -f1)"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip_install() {
  # quiet; also drops the notes about absent local index directories named in the machine's pip config
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# torch==2.13.0 resolves to the local CPU wheel (pip's find-links); any other version pulls a CUDA build.
pip_install torch==2.13.0
# transformers 4.37.2 predates numpy 2 and huggingface_hub 1.x; tokenizers comes in at its pinned range.
pip_install transformers==4.37.2 "numpy<2" "huggingface_hub<1" accelerate safetensors sentencepiece \
  pillow tqdm pytest
pip_install --no-deps llava-torch==1.2.2.post1
# mmcompress itself (its pyproject asks for transformers 5; the pre-LLM API runs on 4.37)
pip_install --no-deps -e .

"$VENV/bin/python" -c "import llava.model, mmcompress, transformers; assert transformers.__version__ == '4.37.2'"
echo "$STAMP" >"$MARKER"
