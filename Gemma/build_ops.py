"""Compile the DeepSpeed ops a training run uses into this environment's cache, once (setup.sh runs it).

    .venv/bin/python Gemma/build_ops.py

Without it the first run on a machine compiles them itself (about 50 s each on a 2-core CPU), and a run killed
during that build used to leave a lock that made every later run wait forever. The cache is
<environment>/torch_extensions (or $TORCH_EXTENSIONS_DIR); builds use -march=native, so a cache serves one CPU model.
Rerunning is instant once they are built for this CPU and DeepSpeed version (a stamp file in the cache says so). A
build that fails is reported, and the run builds the op on first use.
"""

from __future__ import annotations

import logging
import sys
import time

from finetune.deepspeed_ops import build_ops, build_stamp, extensions_dir, use_environment_cache


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    stamp = use_environment_cache() / ".built"
    if stamp.is_file() and stamp.read_text() == build_stamp():
        print(f"DeepSpeed ops: already built in {stamp.parent}.")
        return 0
    import torch

    started = time.time()
    try:
        names = build_ops(cpu_only=not torch.cuda.is_available())
    except Exception as e:  # noqa: BLE001 - a compiler missing or failing: the run will try again and say why
        print(f"warning: DeepSpeed's ops could not be built now ({type(e).__name__}: {str(e)[:300]}); a training run "
              "builds them on first use.", file=sys.stderr)
        return 0
    stamp.write_text(build_stamp())
    print(f"DeepSpeed ops {', '.join(n.removesuffix('Builder') for n in names)} ready in {extensions_dir()} "
          f"({time.time() - started:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
