"""Run a whole ablation study: train every ablation profile with the same config and seed, then compare them.

Each ablation goes into a sibling directory of --output_dir; a finished one (results.json) is kept and skipped, an
interrupted one is resumed from its last checkpoint, so rerunning the same command continues a study. The comparison
(Markdown table, CSV, PNG) is written into --output_dir by Gemma/compare_ablations.py.

Usage (from the repository root):

    # 4 GPUs, all four shipped ablations
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study --num_processes 4

    # the CPU demo (2 processes; --use_deepspeed is added on machines without CUDA), fewer steps
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study --num_processes 2 \\
        --set training.max_steps=60 --set training.eval_steps=30

    # a subset, with arguments for the launcher (e.g. several nodes)
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study \\
        --ablations profile_only query_only --launcher_args "--num_machines 2 --machine_rank 0 ..."
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from finetune.outputs import RESULTS_NAME

HERE = Path(__file__).resolve().parent
SHIPPED_ABLATIONS = ["profile_and_history", "profile_only", "history_only", "query_only"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("config.json"), help="config.json shared by every run.")
    p.add_argument("--output_dir", type=Path, required=True,
                   help="study directory: one sub-directory per ablation, plus comparison.{md,csv,png}.")
    p.add_argument("--ablations", nargs="+", default=SHIPPED_ABLATIONS,
                   help="ablation names or JSON paths (default: the four shipped profiles).")
    p.add_argument("--num_processes", type=int, default=1, help="processes per run (GPUs, or CPU processes).")
    p.add_argument("--launcher_args", default="", help="extra arguments for `accelerate launch`, as one string.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every run (repeatable), as in train_deepspeed.py.")
    p.add_argument("--reference", default="profile_and_history", help="the run the others are compared with.")
    return p.parse_args(argv)


def launch_command(args: argparse.Namespace, ablation: str, run_dir: Path, cuda: bool) -> list[str]:
    """accelerate launch of the training script for one ablation; resumes an interrupted run."""
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes",
                str(args.num_processes)]
    if not cuda:
        launcher.append("--use_deepspeed")  # without it accelerate starts a single process on a CPU-only machine
    script = [str(HERE / "train_deepspeed.py"), "--config", str(args.config), "--ablation_config", ablation,
              "--output_dir", str(run_dir)]
    if any(run_dir.glob("checkpoint-*")):
        script += ["--resume_from_checkpoint", "auto"]
    for item in args.overrides:
        script += ["--set", item]
    return launcher + shlex.split(args.launcher_args) + script


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # only to ask whether CUDA is here: the launcher needs to know

    cuda = torch.cuda.is_available()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for ablation in args.ablations:
        run_dir = args.output_dir / Path(ablation).stem
        run_dirs.append(run_dir)
        if (run_dir / RESULTS_NAME).is_file():
            print(f"[study] {run_dir.name}: finished earlier, kept.", flush=True)
            continue
        cmd = launch_command(args, ablation, run_dir, cuda)
        print(f"[study] {run_dir.name}: {shlex.join(cmd)}", flush=True)
        started = time.time()
        if subprocess.run(cmd).returncode != 0:
            print(f"[study] {run_dir.name} failed; fix the problem above and rerun this command to continue.",
                  file=sys.stderr)
            return 1
        print(f"[study] {run_dir.name}: done in {time.time() - started:.0f} s.", flush=True)

    compare = [sys.executable, str(HERE / "compare_ablations.py"), *map(str, run_dirs), "--reference", args.reference,
               "--csv", str(args.output_dir / "comparison.csv"), "--figure", str(args.output_dir / "comparison.png")]
    table = subprocess.run(compare, stdout=subprocess.PIPE, text=True)
    if table.returncode != 0:
        return table.returncode
    (args.output_dir / "comparison.md").write_text(table.stdout, encoding="utf-8")
    print(table.stdout, end="")
    print(f"[study] comparison: {args.output_dir / 'comparison.md'}, .csv, .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
