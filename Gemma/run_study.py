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
profile attribute of the training file), history_lengths N1 N2 ... (history_<N>: N history items, the most
recent or as prompt.history_selection chooses; reference the largest N; the comparison adds
<output_dir>/comparison_by_max_history_items.png, the main metric against N). Generated profiles are written into
<output_dir>/designs/<name>.json and passed by path; a rerun that would write a different one is refused. --design
combines with --seeds.

On a cluster: --slurm writes <output_dir>/study.sbatch, a SLURM job array with one task per run (each an srun +
accelerate launch over --nodes nodes; a resubmitted task resumes its run), instead of training. --status shows every
run's state and the time left, --collect compares once every task has finished, and --print_commands prints each
run's launch command for another scheduler (finetune/study.py).

Disk: every finished run keeps its checkpoints (optimizer state included) unless --prune_checkpoints removes them once
it has finished; after each run the study warns when the runs left would not fit at that run's size.

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

    # on SLURM: 4 ablations x 3 seeds, each run on 2 nodes of 8 GPUs (an array of 12 tasks), then the comparison
    python Gemma/run_study.py --config config.json --output_dir /shared/study --seeds 1 2 3 --num_processes 16 \\
        --slurm --nodes 2 --sbatch_option partition=gpu --sbatch_option time=48:00:00
    sbatch /shared/study/study.sbatch
    python Gemma/run_study.py --config config.json --output_dir /shared/study --seeds 1 2 3 --status
    python Gemma/run_study.py --config config.json --output_dir /shared/study --seeds 1 2 3 --collect
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from finetune.comparison import DEFAULT_REFERENCE_ABLATION, SEED_KEY
from finetune.designs import (DESIGN_USAGE, DESIGNS_DIRNAME, SECTIONS_ABLATIONS, load_design, parse_design,
                              write_profiles)
from finetune.errors import EXIT_INTERRUPTED, UserError, positive_int
from finetune.outputs import write_atomic
from finetune.settings import MAX_SEED
from finetune.study import (DONE, SBATCH_NAME, SLURM_LOGS_DIRNAME, StudyRun, directory_bytes, planned_runs,
                            progress_summary, prune_checkpoints, run_for_task, run_state, sbatch_script,
                            slurm_launcher_args, status_table, storage_warning, unfinished_problems)

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("config.json"), help="config.json shared by every run.")
    p.add_argument("--output_dir", type=Path, required=True,
                   help="study directory: one sub-directory per ablation (and seed), plus comparison.{md,csv,png}.")
    p.add_argument("--ablations", nargs="+",
                   help="ablation names or JSON paths (default: the four shipped profiles).")
    p.add_argument("--design", nargs="+", metavar="DESIGN",
                   help="generate the ablations instead of listing them: " + "; ".join(DESIGN_USAGE.values()) +
                        f" (see finetune/designs.py; profiles go into <output_dir>/{DESIGNS_DIRNAME}/).")
    p.add_argument("--num_processes", type=positive_int, default=1,
                   help="processes per run (GPUs, or CPU processes), over all its nodes.")
    p.add_argument("--launcher_args", default="", help="extra arguments for `accelerate launch`, as one string.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override applied to every run (repeatable), as in train_deepspeed.py.")
    p.add_argument("--reference", help=f"the run the others are compared with (default: the design's reference, "
                                        f"else {DEFAULT_REFERENCE_ABLATION}).")
    p.add_argument("--seeds", nargs="+", type=_seed, metavar="SEED",
                   help="train every ablation once per seed, into <ablation>-seed<SEED> (default: once, with the "
                        "config's training.seed, into <ablation>).")
    p.add_argument("--prune_checkpoints", action="store_true",
                   help="remove each run's checkpoint-* folders once it has finished (its final/ model, results and "
                        "predictions stay): a study of many runs otherwise keeps every run's optimizer state.")
    where = p.add_argument_group("where the runs train (default: here, one after another, then the comparison)")
    mode = where.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true",
                      help=f"write <output_dir>/{SBATCH_NAME}, a SLURM job array with one task per run, instead of "
                           "training; submit it with sbatch, then --collect.")
    mode.add_argument("--print_commands", action="store_true",
                      help="print the accelerate launch command of every run not done, one per line (for another "
                           "scheduler), instead of training.")
    mode.add_argument("--array_task", type=int, metavar="INDEX",
                      help=f"train run INDEX of the study only (what {SBATCH_NAME}'s tasks call; --status lists "
                           "the indices).")
    mode.add_argument("--status", action="store_true",
                      help="show every run's state (done, running, resumable, failed, not started) and the time "
                           "left, and train nothing.")
    mode.add_argument("--collect", action="store_true",
                      help="compare the finished runs (after a job array); refused while any run is not done.")
    where.add_argument("--nodes", type=positive_int, default=1,
                       help="--slurm: nodes per run; --num_processes (the total over the nodes) is split evenly.")
    where.add_argument("--sbatch_option", dest="sbatch_options", action="append", default=[], metavar="KEY=VALUE",
                       help="--slurm: one more #SBATCH --KEY=VALUE line (repeatable), e.g. partition=gpu, "
                            "time=24:00:00, account=my_project.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: usage errors exit 2 with argparse's message before anything is read or trained."""
    p = build_parser()
    args = p.parse_args(argv)
    check_where(p, args)
    check_runs(p, args)
    return args


def check_where(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The job-array options, which only --slurm takes; sets args.gpus_per_node and the #SBATCH lines."""
    if (args.nodes != 1 or args.sbatch_options) and not args.slurm:
        p.error("--nodes and --sbatch_option describe the job array; give them with --slurm.")
    if args.prune_checkpoints and (args.status or args.print_commands):
        p.error("--prune_checkpoints acts on the runs this command trains (here, as array tasks, or with --collect); "
                f"--{'status' if args.status else 'print_commands'} trains nothing.")
    if args.num_processes % args.nodes:
        p.error(f"--num_processes {args.num_processes} (the total over the nodes) does not split evenly over "
                f"--nodes {args.nodes}; give a multiple of {args.nodes}.")
    args.gpus_per_node = args.num_processes // args.nodes
    bad = [o for o in args.sbatch_options if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"--sbatch_option {bad[0]}: write it as KEY=VALUE without dashes, e.g. --sbatch_option partition=gpu.")
    args.sbatch_options = [f"--{o}" for o in args.sbatch_options]


def check_runs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--ablations / --design and --seeds: each run once, the seed set one way; sets args.ablations (default: the
    shipped profiles), args.design and args.x_axis."""
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


def apply_design(args: argparse.Namespace) -> None:
    """With --design: its ablations (the generated profiles written into <output_dir>/designs/ first), reference
    (unless --reference names one) and the comparison's x axis, in args. Without: the reference defaults."""
    if args.design:
        design = load_design(*args.design, args.config, args.overrides)
        args.ablations = write_profiles(design, args.output_dir / DESIGNS_DIRNAME)
        args.reference = args.reference or design.reference
        args.x_axis = design.x_axis
    args.reference = args.reference or DEFAULT_REFERENCE_ABLATION


def launch_command(args: argparse.Namespace, run: StudyRun, cuda: bool, node_args: Sequence[str] = ()) -> list[str]:
    """accelerate launch of the training script for one run; resumes an interrupted one. `node_args`: this node's
    part of a multi-node launch (study.slurm_launcher_args)."""
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes",
                str(args.num_processes), *node_args]
    if not cuda:
        launcher.append("--use_deepspeed")  # without it accelerate starts a single process on a CPU-only machine
    script = [str(HERE / "train_deepspeed.py"), "--config", str(args.config), "--ablation_config", run.ablation,
              "--output_dir", str(run.directory)]
    if any(run.directory.glob("checkpoint-*")):
        script += ["--resume_from_checkpoint", "auto"]
    for item in args.overrides:
        script += ["--set", item]
    if run.seed is not None:
        script += ["--set", f"{SEED_KEY}={run.seed}"]
    return launcher + shlex.split(args.launcher_args) + script


def train(args: argparse.Namespace, run: StudyRun, cuda: bool, node_args: Sequence[str] = ()) -> bool:
    """Train one run unless it is done (resuming it when it stopped after a checkpoint), then prune its checkpoints
    when asked; False when it failed."""
    if run_state(run.directory) == DONE:
        print(f"[study] {run.name}: finished earlier, kept.", flush=True)
    else:
        cmd = launch_command(args, run, cuda, node_args)
        print(f"[study] {run.name}: {shlex.join(cmd)}", flush=True)
        started = time.time()
        if subprocess.run(cmd).returncode != 0:
            print(f"[study] {run.name} failed; fix the problem above and rerun this command to continue.",
                  file=sys.stderr, flush=True)
            return False
        print(f"[study] {run.name}: done in {time.time() - started:.0f} s.", flush=True)
    if args.prune_checkpoints:
        report_pruned(run)
    return True


def report_pruned(run: StudyRun) -> None:
    if freed := prune_checkpoints(run.directory):
        print(f"[study] {run.name}: checkpoints removed ({freed / 1e9:.2f} GB freed).", flush=True)


def warn_if_the_rest_will_not_fit(args: argparse.Namespace, run: StudyRun, runs: list[StudyRun]) -> None:
    """After a run: would the runs left, each the size of this one, fit on the disk? (study.storage_warning)"""
    runs_left = sum(run_state(r.directory) != DONE for r in runs)
    if runs_left and (warning := storage_warning(directory_bytes(run.directory), runs_left,
                                                 shutil.disk_usage(args.output_dir).free)):
        print(f"[study] warning: {warning}", file=sys.stderr, flush=True)


def compare(args: argparse.Namespace, runs: list[StudyRun]) -> int:
    """compare_ablations.py over every run: comparison.md (also printed), .csv and .png in --output_dir."""
    command = [sys.executable, str(HERE / "compare_ablations.py"), *(str(r.directory) for r in runs),
               "--reference", args.reference, "--csv", str(args.output_dir / "comparison.csv"),
               "--figure", str(args.output_dir / "comparison.png")]
    command += ["--x_axis", args.x_axis] if args.x_axis else []
    table = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if table.returncode != 0:
        return table.returncode
    (args.output_dir / "comparison.md").write_text(table.stdout, encoding="utf-8")
    print(table.stdout, end="")
    print(f"[study] comparison: {args.output_dir / 'comparison.md'}, .csv, .png", flush=True)
    return 0


def task_command(args: argparse.Namespace) -> list[str]:
    """This study as one run_study.py command with absolute paths and the resolved ablations (a design's profile
    files), for the job array's tasks: --array_task I then picks run I of the same plan."""
    command = [sys.executable, str(HERE / "run_study.py"), "--config", str(args.config.resolve()),
               "--output_dir", str(args.output_dir.resolve()), "--num_processes", str(args.num_processes),
               "--ablations", *(str(Path(a).resolve()) if Path(a).suffix == ".json" else a for a in args.ablations)]
    command += ["--seeds", *map(str, args.seeds)] if args.seeds else []
    command += ["--launcher_args", args.launcher_args] if args.launcher_args else []
    command += ["--prune_checkpoints"] if args.prune_checkpoints else []
    for item in args.overrides:
        command += ["--set", item]
    return command


def write_job_array(args: argparse.Namespace, runs: list[StudyRun]) -> Path:
    logs = args.output_dir.resolve() / SLURM_LOGS_DIRNAME
    logs.mkdir(parents=True, exist_ok=True)
    script = sbatch_script(runs, task_command(args), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           sbatch_options=args.sbatch_options, workdir=Path.cwd(), logs=logs,
                           job_name=args.output_dir.resolve().name)
    path = args.output_dir / SBATCH_NAME
    write_atomic(path, script)
    print(f"[study] {len(runs)} array tasks, {args.nodes} node(s) each: {path}\n"
          f"        submit it with: sbatch {shlex.quote(str(path))}\n"
          "        when every task has finished, compare: this command with --collect instead of --slurm "
          "(--status shows where the study is).", flush=True)
    return path


def run_study(args: argparse.Namespace, runs: list[StudyRun]) -> int:
    """Every run here, one after another, then the comparison."""
    import torch  # only to ask whether CUDA is here: the launcher needs to know

    cuda = torch.cuda.is_available()
    if args.print_commands:  # for another scheduler: the launch of every run not done, one per line
        print("\n".join(shlex.join(launch_command(args, r, cuda)) for r in runs if run_state(r.directory) != DONE))
        return 0
    if args.array_task is not None:
        return 0 if train(args, run_for_task(runs, args.array_task), cuda, slurm_launcher_args(os.environ, cuda)) \
            else 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs, 1):
        print(f"[study] run {i} of {len(runs)}, {run.name}. {progress_summary(runs)}", flush=True)
        if not train(args, run, cuda):
            return 1
        warn_if_the_rest_will_not_fit(args, run, runs)
    return compare(args, runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        apply_design(args)
        runs = planned_runs(args.ablations, args.seeds, args.output_dir)
        if args.status:
            print(status_table(runs))
            return 0
        if args.slurm:
            write_job_array(args, runs)
            return 0
        if args.collect:
            if problems := unfinished_problems(runs):
                raise UserError(problems)
            if args.prune_checkpoints:
                for run in runs:
                    report_pruned(run)
            return compare(args, runs)
        return run_study(args, runs)
    except UserError as e:
        print("\n".join([f"error: {e.problems[0]}", *e.problems[1:]]), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # the run being trained got the Ctrl-C too and stopped; its checkpoints stay
        print("error: interrupted (Ctrl-C); rerun the same command to continue the study (--status shows where it "
              "is).", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
