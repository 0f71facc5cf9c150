"""Run a whole ablation study: train every ablation profile with the same config and seed(s), then compare them.

Each ablation goes into a sub-directory of --output_dir named for it; a finished one (results.json) is kept and
skipped, an interrupted one is resumed from its last checkpoint, so rerunning the same command continues a study. The
comparison (Markdown table, CSV, PNG) is written into --output_dir by Gemma/compare_ablations.py.

--seeds S1 S2 ... trains every ablation once per seed, into <output_dir>/<ablation>-seed<S>, passing
--set training.seed=S to the training script; without it each ablation trains once with the config's training.seed,
into <output_dir>/<ablation>. Runs go seed by seed (every ablation of S1, then of S2, ...), so a study stopped part-way
already holds complete seeds. Runs of one seed train on the same batches in every ablation: the training order
depends only on the seed and the full-prompt lengths, never on which sections the prompt holds (see
finetune/batching.LengthGroupedSampler; without length grouping accelerate's seedable sampler draws it from the seed).
The comparison then gives each ablation's mean over seeds with intervals that resample seeds and test examples.

--design NAME [ARGS] generates the ablations instead of --ablations (finetune/designs.py): sections (the four
shipped profiles, as without it), leave_one_out (all_attributes, the reference, then without_<attribute> for each
profile attribute of the training file), history_lengths N1 N2 ... (history_<N>: the N most recent history items;
reference the largest N; the comparison adds <output_dir>/comparison_by_max_history_items.png, the main metric
against N). Generated profiles are written into <output_dir>/designs/<name>.json and passed by path; a rerun that
would write a different one is refused. --design combines with --seeds.

Usage (from the repository root):

    # 4 GPUs, all four shipped ablations
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study --num_processes 4

    # the CPU demo (2 processes; --use_deepspeed is added on machines without CUDA), fewer steps
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study --num_processes 2 \\
        --set training.max_steps=60 --set training.eval_steps=30

    # a subset, with arguments for the launcher (e.g. several nodes)
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study \\
        --ablations profile_only query_only --launcher_args "--num_machines 2 --machine_rank 0 ..."

    # every ablation with three training seeds (12 runs: profile_and_history-seed1, profile_only-seed1, ...)
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study_seeds --num_processes 4 \\
        --seeds 1 2 3

    # which profile attribute matters: the full profile, then each attribute left out
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study_loo --num_processes 4 \\
        --design leave_one_out

    # how much history is enough: 0, 1, 2, 4 and 8 most recent items, each with two seeds
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study_history --num_processes 4 \\
        --design history_lengths 0 1 2 4 8 --seeds 1 2
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from finetune.comparison import DEFAULT_REFERENCE_ABLATION, SEED_KEY
from finetune.designs import (DESIGN_USAGE, DESIGNS_DIRNAME, SECTIONS_ABLATIONS, load_design, parse_design,
                              write_profiles)
from finetune.errors import UserError
from finetune.outputs import RESULTS_NAME
from finetune.settings import MAX_SEED

HERE = Path(__file__).resolve().parent
SHIPPED_ABLATIONS = list(SECTIONS_ABLATIONS)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:  # the range training.seed accepts
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, {MAX_SEED}], got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("config.json"), help="config.json shared by every run.")
    p.add_argument("--output_dir", type=Path, required=True,
                   help="study directory: one sub-directory per ablation (and seed), plus comparison.{md,csv,png}.")
    p.add_argument("--ablations", nargs="+",
                   help="ablation names or JSON paths (default: the four shipped profiles).")
    p.add_argument("--design", nargs="+", metavar="DESIGN",
                   help="generate the ablations instead of listing them: " + "; ".join(DESIGN_USAGE.values()) +
                        f" (see finetune/designs.py; profiles go into <output_dir>/{DESIGNS_DIRNAME}/).")
    p.add_argument("--num_processes", type=int, default=1, help="processes per run (GPUs, or CPU processes).")
    p.add_argument("--launcher_args", default="", help="extra arguments for `accelerate launch`, as one string.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every run (repeatable), as in train_deepspeed.py.")
    p.add_argument("--reference", help=f"the run the others are compared with (default: the design's reference, "
                                        f"else {DEFAULT_REFERENCE_ABLATION}).")
    p.add_argument("--seeds", nargs="+", type=_seed, metavar="SEED",
                   help="train every ablation once per seed, into <ablation>-seed<SEED> (default: once, with the "
                        "config's training.seed, into <ablation>).")
    args = p.parse_args(argv)
    args.x_axis = None  # a design's: the resolved-config key the comparison plots the main metric against
    if args.design:
        if args.ablations:
            p.error("--ablations and --design both choose the runs; give one of them.")
        try:
            args.design = parse_design(args.design)
        except UserError as e:
            p.error(" ".join(e.problems))
    args.ablations = args.ablations or list(SHIPPED_ABLATIONS)
    names = [Path(a).stem for a in args.ablations]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        p.error(f"--ablations: {', '.join(repeated)} given more than once (each names its run directory); list each "
                "ablation once.")
    if args.seeds:
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if repeated:
            p.error(f"--seeds: {', '.join(map(str, repeated))} given more than once; list each seed once.")
        fixed = [o for o in args.overrides if o.partition("=")[0] == SEED_KEY]
        if fixed:
            p.error(f"--set {fixed[0]} and --seeds both set the seed; drop the --set (--seeds sets {SEED_KEY} "
                    "for each run).")
    return args


def apply_design(args: argparse.Namespace) -> None:
    """With --design: its ablations (the generated profiles written into <output_dir>/designs/ first), reference
    (unless --reference names one) and the comparison's x axis, in args. Without: the reference defaults."""
    if args.design:
        design = load_design(*args.design, args.config, args.overrides)
        args.ablations = write_profiles(design, args.output_dir / DESIGNS_DIRNAME)
        args.reference = args.reference or design.reference
        args.x_axis = design.x_axis
    args.reference = args.reference or DEFAULT_REFERENCE_ABLATION


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int | None, Path]]:
    """(ablation, seed, run directory) of every run, in training order: seed by seed, so that a study stopped part-way
    holds every ablation of its first seeds. seed None: no --seeds, the config's training.seed."""
    def run_dir(ablation: str, seed: int | None) -> Path:
        return args.output_dir / (Path(ablation).stem + ("" if seed is None else f"-seed{seed}"))

    return [(a, s, run_dir(a, s)) for s in (args.seeds or [None]) for a in args.ablations]


def launch_command(args: argparse.Namespace, ablation: str, run_dir: Path, cuda: bool,
                   seed: int | None = None) -> list[str]:
    """accelerate launch of the training script for one ablation (and seed); resumes an interrupted run."""
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
    if seed is not None:
        script += ["--set", f"{SEED_KEY}={seed}"]
    return launcher + shlex.split(args.launcher_args) + script


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        apply_design(args)
    except UserError as e:
        print("\n".join([f"error: {e.problems[0]}", *e.problems[1:]]), file=sys.stderr, flush=True)
        return e.exit_code
    import torch  # only to ask whether CUDA is here: the launcher needs to know

    cuda = torch.cuda.is_available()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs = planned_runs(args)
    run_dirs = [run_dir for _, _, run_dir in runs]
    for ablation, seed, run_dir in runs:
        if (run_dir / RESULTS_NAME).is_file():
            print(f"[study] {run_dir.name}: finished earlier, kept.", flush=True)
            continue
        cmd = launch_command(args, ablation, run_dir, cuda, seed)
        print(f"[study] {run_dir.name}: {shlex.join(cmd)}", flush=True)
        started = time.time()
        if subprocess.run(cmd).returncode != 0:
            print(f"[study] {run_dir.name} failed; fix the problem above and rerun this command to continue.",
                  file=sys.stderr)
            return 1
        print(f"[study] {run_dir.name}: done in {time.time() - started:.0f} s.", flush=True)

    compare = [sys.executable, str(HERE / "compare_ablations.py"), *map(str, run_dirs), "--reference", args.reference,
               "--csv", str(args.output_dir / "comparison.csv"), "--figure", str(args.output_dir / "comparison.png")]
    compare += ["--x_axis", args.x_axis] if args.x_axis else []
    table = subprocess.run(compare, stdout=subprocess.PIPE, text=True)
    if table.returncode != 0:
        return table.returncode
    (args.output_dir / "comparison.md").write_text(table.stdout, encoding="utf-8")
    print(table.stdout, end="")
    print(f"[study] comparison: {args.output_dir / 'comparison.md'}, .csv, .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
