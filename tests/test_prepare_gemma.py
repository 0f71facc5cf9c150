"""The set-up's checks that run before any install or conversion work: setup.sh's and Gemma/prepare_gemma.py's
disk-space checks (the install and the conversion themselves run in every CI run's setup.sh)."""

from __future__ import annotations

import shutil
import subprocess

import prepare_gemma
from conftest import REPO


def test_a_disk_without_room_is_named_with_its_free_space(tmp_path):
    out = tmp_path / "not" / "yet" / "made"  # the check climbs to the nearest folder that exists
    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    assert prepare_gemma.disk_space_problem(out, required_gb=free_gb / 2) is None
    problem = prepare_gemma.disk_space_problem(out, required_gb=free_gb + 1e6)
    assert problem is not None and str(out) in problem and "GB free" in problem and "--out" in problem


def test_conversion_stops_before_any_work_when_the_disk_is_too_full(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prepare_gemma.REQUIRED_FREE_GB, "bfloat16", shutil.disk_usage(tmp_path).free / 1e9 + 1e6)
    out = tmp_path / "models" / "gemma-3-270m"
    assert prepare_gemma.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk holding") and "needs about" in err
    assert not (tmp_path / "models").exists()  # nothing written, not even the parent folder


def test_setup_stops_before_installing_when_the_disk_is_too_full(tmp_path):
    shutil.copy(REPO / "setup.sh", tmp_path / "setup.sh")
    env = {"PATH": "/usr/bin:/bin", "SETUP_MIN_FREE_MB": str(10**12)}  # more than any disk has
    proc = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {tmp_path} has ") and "about 2.5 GB" in proc.stderr
    assert not (tmp_path / ".venv").exists()
