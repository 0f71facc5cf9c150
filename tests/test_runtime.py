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


def test_stale_build_locks_are_cleared_and_live_ones_kept(tmp_path):
    """A build of a DeepSpeed op killed half-way leaves <cache>/<op>/lock, on which every later run would wait
    forever. A lock whose builder is gone (no process works in its directory) and that is not brand new is removed;
    a new one, or one with a live builder, stays."""
    import os
    import time

    from finetune.deepspeed_ops import FRESH_LOCK_SECONDS, clear_stale_build_locks, describe_waits

    old = time.time() - FRESH_LOCK_SECONDS - 5
    locks = {}
    for op in ("cpu_adam", "fused_adam", "deepspeed_shm_comm"):
        (tmp_path / op).mkdir()
        locks[op] = tmp_path / op / "lock"
        locks[op].touch()
    os.utime(locks["cpu_adam"], (old, old))  # killed long ago
    os.utime(locks["deepspeed_shm_comm"], (old, old))  # old, but its builder is at work
    builder = subprocess.Popen(["sleep", "60"], cwd=tmp_path / "deepspeed_shm_comm")
    try:
        assert clear_stale_build_locks(tmp_path) == [locks["cpu_adam"]]
        assert not locks["cpu_adam"].exists() and locks["fused_adam"].exists() and locks["deepspeed_shm_comm"].exists()
        waits = describe_waits(tmp_path)
        assert f"deepspeed_shm_comm (build lock {locks['deepspeed_shm_comm']}, process {builder.pid})" in waits
    finally:
        builder.kill()


def test_a_long_start_up_says_what_it_waits_for(monkeypatch, caplog):
    import logging
    import time

    from finetune import runtime

    monkeypatch.setattr(runtime, "STARTUP_REPORT_SECONDS", 0.1)
    watch = runtime.StartupWatch()
    watch.start()
    watch.enter("loading the model")
    with caplog.at_level(logging.WARNING, logger="finetune.runtime"):
        time.sleep(0.35)
        watch.enter(None)  # training has begun: no more reports
        time.sleep(0.15)
        count = len(caplog.records)
        time.sleep(0.3)
    watch.stop()
    assert caplog.records and all(r.getMessage().startswith("Still loading the model after") for r in caplog.records)
    assert len(caplog.records) == count


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the finaliser's, on purpose
def test_a_signal_python_swallowed_in_a_finaliser_still_ends_the_run():
    """A signal's exception raises wherever Python is; inside a __del__ (a finaliser of some library's object) Python
    prints and ignores it. The run must still stop, at its next phase at the latest."""
    import gc
    import signal

    from finetune.runtime import Runtime, StoppedBySignal

    runtime = Runtime(rank=0, world_size=1, cpu_only=True)

    class Finalised:
        def __del__(self):
            runtime._on_signal(signal.SIGINT, None)  # as if Ctrl-C arrived while this finaliser ran

    Finalised()
    gc.collect()
    with pytest.raises(StoppedBySignal, match="stopped by Ctrl-C") as stopped:
        runtime.phase("loading the model")
    assert stopped.value.exit_code == 130
