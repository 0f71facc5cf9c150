"""Benchmark (not a test): does the ablation study find the signal planted in the demo data?

Trains the real Gemma 3 270M on Gemma/data/demo once per shipped ablation profile (Gemma/run_study.py, CPU demo
settings below), compares them with paired bootstrap intervals, prints the table and records it, with the settings
and the wall time, in benchmarks/results/ablation_study.md. Expected: profile_and_history best, query_only worst.

    .venv/bin/python benchmarks/ablation_study.py [--output_dir Gemma/outputs/study_demo] [--num_processes 2]
        [--seeds 1 2]   # every ablation once per seed (run_study.py --seeds): means over seeds, seed-and-example CIs

A finished ablation in --output_dir is reused (rerun after an interruption to continue); delete the directory to
measure from scratch.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# 60 optimizer steps of 8 examples (4 per process x 2): enough for Gemma 3 270M to pick up the occupation -> genre
# map and part of the history signal; about 15-20 minutes a run on a 2-core CPU. The answer is one of the five
# genres, so it is scored as a closed answer set (accuracy, macro-F1) by likelihood, without generation.
STUDY_SETTINGS = ["training.max_steps=60", "training.batch_size=4", "training.eval_steps=30",
                  "training.save_steps=30", "training.learning_rate=0.0002", "evaluation.answer_choices=auto"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, default=REPO / "Gemma" / "outputs" / "study_demo")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--record", type=Path, default=REPO / "benchmarks" / "results" / "ablation_study.md")
    p.add_argument("--seeds", nargs="+", default=None, metavar="SEED",
                   help="train every ablation once per seed (passed to run_study.py --seeds)")
    args = p.parse_args(argv)

    started = time.time()
    cmd = [sys.executable, str(REPO / "Gemma" / "run_study.py"), "--config", str(REPO / "config.json"),
           "--output_dir", str(args.output_dir), "--num_processes", str(args.num_processes),
           "--prune_checkpoints"]  # 7.6 GB per run otherwise; the results need final/ and results.json alone
    for item in STUDY_SETTINGS:
        cmd += ["--set", item]
    if args.seeds:
        cmd += ["--seeds", *args.seeds]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        return 1
    wall = time.time() - started
    table = (args.output_dir / "comparison.md").read_text(encoding="utf-8")
    per_run = []
    for run in sorted(p for p in args.output_dir.iterdir() if (p / "results.json").is_file()):
        results = json.loads((run / "results.json").read_text())
        per_run.append(f"| {run.name} | {results['wall_time_s']:.0f} | {results['train']['train_runtime']:.0f} | "
                       f"{results['global_step']} |")
    record = "\n".join([
        "# Ablation study on the demo data (Gemma 3 270M, CPU)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{args.num_processes} processes, with `{' '.join(cmd[1:])}` (via `benchmarks/ablation_study.py`).",
        f"Wall time of this invocation: {wall / 60:.1f} min (runs reused from an earlier invocation cost nothing here).",
        "",
        table.strip(),
        "",
        "| run | run wall time (s) | train runtime (s) | steps |",
        "|---|---|---|---|",
        *per_run,
        "",
    ])
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(record, encoding="utf-8")
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
