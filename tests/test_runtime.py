"""The Runtime leaves the process group cleanly however a run ends (gloo can abort a process at exit otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, script_env

SCRIPT = """
import sys
sys.path.insert(0, "Gemma")
import torch.distributed as dist
from finetune.errors import UserError
from finetune.runtime import Runtime

errors = {"none": None, "user": UserError("a bad value found after start"), "other": RuntimeError("a bug")}
try:
    with Runtime.start("bfloat16") as runtime:
        assert dist.is_initialized() and dist.get_world_size() == 1 and runtime.cpu_only
        if errors[sys.argv[1]] is not None:
            raise errors[sys.argv[1]]
except (UserError, RuntimeError) as e:
    print("raised", type(e).__name__)
print("initialized after", dist.is_initialized())
"""


@pytest.mark.parametrize("ending", ["none", "user", "other"])
def test_the_process_group_is_closed_whatever_ends_the_run(ending):
    """A one-process run (plain python: the Runtime describes the group itself) on a CPU machine."""
    env = {k: v for k, v in script_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ending], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "initialized after False" in proc.stdout
    assert ("raised" in proc.stdout) == (ending != "none")
