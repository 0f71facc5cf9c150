"""Fine-tune a Gemma model on user-modelling data with DeepSpeed ZeRO-3, one ablation profile per run.

Each record holds a user ``profile``, the user's interaction ``history``, a ``query`` and the ``target`` answer. The
ablation profile (``ablation_configs/<name>.json``) says which of them the prompt contains, so that runs that differ
only in that choice can be compared. Everything else comes from ``config.json`` (see README.md for every key).

Launch (from the repository root):

    # 4 GPUs on one node (accelerate picks up DeepSpeed from the generated config)
    accelerate launch --num_processes=4 Gemma/train_deepspeed.py \\
        --config config.json --ablation_config profile_and_history --output_dir Gemma/outputs/run1

    # 1 GPU, or a quick look on any machine: plain python runs a single process
    python Gemma/train_deepspeed.py --config config.json --ablation_config query_only --output_dir Gemma/outputs/q

    # your own DeepSpeed JSON instead of the generated ZeRO-3 config
    accelerate launch --num_processes=4 Gemma/train_deepspeed.py --config config.json \\
        --ablation_config history_only --output_dir Gemma/outputs/h --deepspeed_config my_ds.json

    # CPU-only machine (2 processes): accelerate needs --use_deepspeed to start several CPU processes
    accelerate launch --use_deepspeed --num_processes 2 Gemma/train_deepspeed.py \\
        --config config.json --ablation_config profile_and_history --output_dir Gemma/outputs/demo

    # continue an interrupted run from its latest complete checkpoint
    accelerate launch ... --output_dir Gemma/outputs/run1 --resume_from_checkpoint auto

    # evaluate a finished run's final/ model on the test file again, without training
    accelerate launch ... --output_dir Gemma/outputs/run1 --ablation_config profile_and_history --do_eval_only

    # will it fit? check everything and estimate memory per GPU for 4 x 80 GB, without weights or training
    python Gemma/train_deepspeed.py --config config.json --output_dir Gemma/outputs/run1 --dry_run \\
        --gpus_per_node 4 --gpu_memory_gib 80

A whole ablation study (every profile, then the comparison): Gemma/run_study.py. Exit codes: 0 done, 2 a problem in
the config, data or flags (reported before the model loads), 3 training diverged, 143 preempted by SIGTERM.

Precedence of settings: defaults (finetune/config.py) < config.json < ablation profile < command line (--set).

This file is the recipe: the command line, then the three flows (a training run, --do_eval_only, --dry_run), each a
sequence of named steps. The steps live in the package beside it, Gemma/finetune/ (README: "How the code is
organised"). Only the standard-library part of it is imported before the arguments are checked, so --help and every
config error come back at once; torch and the rest load inside the flows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import Ablation, Config
from finetune.deepspeed_config import load_custom_deepspeed_config
from finetune.errors import EXIT_INTERRUPTED, UserError
from finetune.outputs import (DRY_RUN_DIRNAME, DS_CONFIG_DIRNAME, PREDICTIONS_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME,
                              check_eval_only, check_output_dir, check_output_writable, clear_output_dir,
                              deepspeed_config_filename, estimated_storage, resolve_resume, warn_if_disk_is_short,
                              write_atomic, write_json_atomic, write_jsonl_atomic)
from finetune.runtime import Runtime, configure_logging
from finetune.settings import load_settings, local_or_hub, resolve_path

logger = logging.getLogger("train_deepspeed")
HARDWARE_FLAGS = ("gpus_per_node", "num_nodes", "gpu_memory_gib", "cpu_memory_gib")

# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_deepspeed.py",
        description="Fine-tune Gemma with DeepSpeed ZeRO-3 on user-modelling data for one ablation profile.",
        epilog="Settings precedence: defaults < config.json < ablation profile < --set. See README.md.",
    )
    p.add_argument("--config", type=Path, default=Path("config.json"),
                   help="config.json with the model, data, prompt, training and deepspeed sections (default: %(default)s).")
    p.add_argument("--ablation_config", default="profile_and_history",
                   help="ablation profile: a name in ablation_configs/ (profile_and_history, profile_only, history_only, "
                        "query_only) or a path to a JSON file (default: %(default)s).")
    p.add_argument("--output_dir", type=Path, required=True,
                   help="where the DeepSpeed config, checkpoints, final/ model and results.json go.")
    p.add_argument("--deepspeed_config", type=Path, default=None,
                   help="your own DeepSpeed JSON instead of the generated ZeRO-3 offload config; leave batch sizes, "
                        "accumulation, clipping and optimizer values 'auto' so they follow config.json.")
    p.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint directory, or 'auto' for the latest complete one in --output_dir.")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an --output_dir that holds a finished or unfinished run (its outputs are deleted).")
    p.add_argument("--do_eval_only", action="store_true",
                   help="no training: evaluate <output_dir>/final/ on data.test_file (loss, greedy answers, metrics) and "
                        "update results.json and predictions.jsonl. Pass the run's --config and --ablation_config.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config.json value, e.g. --set training.max_steps=20 (repeatable; JSON values).")
    plan = p.add_argument_group(
        "dry run", "check everything and estimate memory without loading weights or training; the hardware flags "
                   "plan for other machines than this one (default: what this launch has).")
    plan.add_argument("--dry_run", action="store_true",
                      help="validate, build the data and the DeepSpeed config, print and save a report to "
                           "<output_dir>/dry_run/ (example, token lengths, batch, memory estimate); no training.")
    plan.add_argument("--gpus_per_node", type=int, default=None, metavar="N")
    plan.add_argument("--num_nodes", type=int, default=None, metavar="N")
    plan.add_argument("--gpu_memory_gib", type=float, default=None, metavar="GIB", help="memory of one GPU, e.g. 80.")
    plan.add_argument("--cpu_memory_gib", type=float, default=None, metavar="GIB", help="host memory of one node.")
    args = p.parse_args(argv)
    planned = [f"--{k}" for k in HARDWARE_FLAGS if getattr(args, k) is not None]
    if planned and not args.dry_run:
        p.error(f"{', '.join(planned)} describe hardware for --dry_run; a run measures the hardware it runs on.")
    for k in HARDWARE_FLAGS:
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}.")
    if args.dry_run and args.do_eval_only:
        p.error("--dry_run and --do_eval_only do not go together.")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The plan: everything the user wrote, checked in about a second, before anything heavy is imported
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    cfg: Config
    config_path: Path
    ablation: Ablation
    custom_ds: dict | None  # the user's --deepspeed_config, checked against config.json
    output_dir: Path
    model_path: str
    tokenizer_path: str

    def data_file(self, split: str) -> Path | None:
        name = getattr(self.cfg.data, f"{split}_file")
        return None if name is None else resolve_path(name, self.config_path.parent)

    def resolved_config(self, args: argparse.Namespace, deepspeed_file: Path) -> dict:
        """resolved_config.json: the settings after precedence, the ablation, the command line and the paths used."""
        return {**dataclasses.asdict(self.cfg),
                "ablation": {"name": self.ablation.name, "description": self.ablation.description,
                             **self.ablation.prompt},
                "cli": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "deepspeed_config_file": str(deepspeed_file), "model_path": self.model_path,
                "tokenizer_path": self.tokenizer_path}


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Check config, ablation, --set, the DeepSpeed JSON and the output directory; every problem at once."""
    config_path = args.config.resolve()
    cfg, ablation = load_settings(config_path, args.ablation_config, args.overrides)
    custom_ds = load_custom_deepspeed_config(args.deepspeed_config, cfg) if args.deepspeed_config else None
    output_dir = args.output_dir.resolve()
    model_path = local_or_hub(cfg.model.model_name_or_path, config_path.parent)
    tokenizer_path = local_or_hub(cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path, config_path.parent)
    if args.do_eval_only:
        model_path = tokenizer_path = str(check_eval_only(output_dir, cfg))  # final/ holds the run's tokenizer
    else:
        check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        check_output_writable(output_dir)
    return RunPlan(cfg, config_path, ablation, custom_ds, output_dir, model_path, tokenizer_path)


# ----------------------------------------------------------------------------------------------------------------------
# Steps shared by the flows
# ----------------------------------------------------------------------------------------------------------------------


def prepare_data(plan: RunPlan, names: tuple[str, ...]) -> tuple[Any, Any, dict]:
    """Tokenizer, prompt encoder (its fixed parts checked against max_length) and the named splits that have a file,
    all before the model loads."""
    from finetune.data import build_split
    from finetune.prompts import PromptEncoder
    from finetune.trainer import load_tokenizer

    tokenizer = load_tokenizer(plan.tokenizer_path)
    encoder = PromptEncoder(tokenizer, plan.cfg.training.max_length)
    encoder.check_fixed_parts()
    splits = {}
    for name in names:
        if (path := plan.data_file(name)) is not None:
            splits[name] = build_split(path, name, plan.cfg, encoder)
            s = splits[name].stats
            logger.info("%s: %d records -> %d examples (%d dropped as too long, %d with history shortened), "
                        "ids sha256 %s", name, s.records, s.examples, s.dropped_too_long, s.history_shortened,
                        s.ids_sha256[:12])
    return tokenizer, encoder, splits


def deepspeed_config_for(plan: RunPlan, model_config: Any, split: Any, hardware: Any = None) -> tuple[dict, Any]:
    """(DeepSpeed config, memory plan): the user's --deepspeed_config, or the generated one with any "auto" offload
    decided by the memory plan for micro-batches of `split` (the plan is None when nothing needed it)."""
    from finetune.batching import use_padding_free
    from finetune.deepspeed_config import generate_deepspeed_config
    from finetune.memory_plan import detect_hardware, model_shape, plan_memory_for_split, resolved_offload
    from finetune.trainer import hidden_size

    choices = plan.cfg.deepspeed
    memory = None
    if hardware is not None or (plan.custom_ds is None and "auto" in (choices.offload_optimizer,
                                                                      choices.offload_params)):
        memory = plan_memory_for_split(model_shape(model_config), plan.cfg, hardware or detect_hardware(),
                                       split.stats, use_padding_free(plan.cfg))
        if hardware is None:
            logger.info("Offload \"auto\": optimizer %s, parameters %s (%s).", memory.offload_optimizer,
                        memory.offload_params, memory.reason)
    if plan.custom_ds is not None:
        return plan.custom_ds, memory
    return generate_deepspeed_config(resolved_offload(choices, memory), plan.cfg.model.dtype,
                                     hidden_size(model_config)), memory


def write_run_files(plan: RunPlan, args: argparse.Namespace, ds_config: dict) -> None:
    """Rank 0: clear an overwritten run, save the DeepSpeed config used and resolved_config.json."""
    out = plan.output_dir
    if args.overwrite_output_dir and out.exists():
        clear_output_dir(out)
    ds_file = out / DS_CONFIG_DIRNAME / deepspeed_config_filename(args.deepspeed_config)
    write_json_atomic(ds_file, ds_config)
    resolved = plan.resolved_config(args, ds_file)
    write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
    logger.info("Resolved config:\n%s", json.dumps(resolved, indent=2))


def write_results(output_dir: Path, results: dict, tested: tuple[dict, list[dict]] | None) -> None:
    """Rank 0: predictions.jsonl, then results.json (last: a run is finished when it exists)."""
    if tested is not None:
        metrics, rows = tested
        write_jsonl_atomic(output_dir / PREDICTIONS_NAME, rows)
        results["test"] = metrics
    write_json_atomic(output_dir / RESULTS_NAME, results)


# ----------------------------------------------------------------------------------------------------------------------
# The flows
# ----------------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> Path:
    """A training run: check -> data -> DeepSpeed config -> TrainingArguments -> model -> train -> save -> evaluate."""
    started = time.time()
    plan = plan_run(args)
    with Runtime.start(plan.cfg.model.dtype) as runtime:
        from finetune import trainer as tr
        from finetune.evaluation import run_test_evaluation

        cfg, t = plan.cfg, plan.cfg.training
        tokenizer, _, splits = prepare_data(plan, ("train", "validation", "test"))
        storage = estimated_storage(Path(plan.model_path), t, len(splits["train"].ids), runtime.world_size)
        warn_if_disk_is_short(plan.output_dir, storage)
        model_config = tr.load_model_config(plan.model_path)
        ds_config, memory = deepspeed_config_for(plan, model_config, splits["train"])
        training_args = tr.build_training_arguments(cfg, plan.output_dir, ds_config, "validation" in splits, runtime)
        if runtime.rank == 0:
            write_run_files(plan, args, ds_config)
        runtime.barrier()
        runtime.warn_if_alone(training_args.world_size)
        trainer = tr.build_trainer(cfg, plan.model_path, training_args, ds_config, tokenizer, splits, callbacks)
        resume = resolve_resume(args.resume_from_checkpoint, plan.output_dir)
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.fault_guard.raise_if_stopped(plan.output_dir)
        results = tr.training_results(trainer, train_result.metrics, cfg, plan.ablation, splits, memory, resume)
        final = tr.save_final_model(trainer, plan.output_dir, runtime.rank)
        tested = (run_test_evaluation(trainer.model, tokenizer, splits["test"], cfg, training_args.device)
                  if "test" in splits else None)
        if runtime.rank == 0:
            write_results(plan.output_dir, {**results, "wall_time_s": round(time.time() - started, 1)}, tested)
            logger.info("Done in %.0f s. Results: %s  Final model: %s", time.time() - started,
                        plan.output_dir / RESULTS_NAME, final)
    return plan.output_dir


def evaluate_only(args: argparse.Namespace) -> Path:
    """--do_eval_only: the test-set evaluation of a finished run's final/ model, with the prompt it was trained
    with; results.json keeps the training results and gets a new test section."""
    started = time.time()
    plan = plan_run(args)
    with Runtime.start(plan.cfg.model.dtype) as runtime:
        from finetune import trainer as tr
        from finetune.evaluation import run_test_evaluation

        tokenizer, _, splits = prepare_data(plan, ("test",))
        ds_config, _ = deepspeed_config_for(plan, tr.load_model_config(plan.model_path), splits["test"])
        training_args = tr.build_training_arguments(plan.cfg, plan.output_dir, ds_config, False, runtime)
        trainer = tr.build_trainer(plan.cfg, plan.model_path, training_args, ds_config, tokenizer, {})
        # The Trainer builds the DeepSpeed inference engine on its first evaluation; one example per rank suffices.
        trainer.evaluate(tr.as_dataset(splits["test"].examples[:training_args.world_size]))
        tested = run_test_evaluation(trainer.model, tokenizer, splits["test"], plan.cfg, training_args.device)
        if runtime.rank == 0:
            existing = plan.output_dir / RESULTS_NAME
            previous = json.loads(existing.read_text(encoding="utf-8")) if existing.is_file() else {}
            write_results(plan.output_dir, previous, tested)
            logger.info("Done in %.0f s. Results: %s", time.time() - started, existing)
    return plan.output_dir


def dry_run(args: argparse.Namespace) -> Path:
    """--dry_run, on rank 0: every check and build a run does before the model loads, plus the memory plan, as a
    report. No weights, no training, no checkpoint."""
    plan = plan_run(args)
    from finetune.batching import epoch_padding_efficiency
    from finetune.dry_run import dry_run_report, first_example
    from finetune.memory_plan import detect_hardware, memory_plan_summary
    from finetune.trainer import load_model_config

    cfg, t = plan.cfg, plan.cfg.training
    _, encoder, splits = prepare_data(plan, ("train", "validation", "test"))
    hardware = detect_hardware(*(getattr(args, k) for k in HARDWARE_FLAGS))
    ds_config, memory = deepspeed_config_for(plan, load_model_config(plan.model_path), splits["train"], hardware)
    gpus = hardware.gpus_per_node * hardware.nodes
    padding = epoch_padding_efficiency(splits["train"], t.batch_size, t.global_batch(gpus), t.seed)
    example = first_example(encoder, splits["train"], cfg)
    out = plan.output_dir / DRY_RUN_DIRNAME
    ds_file = out / deepspeed_config_filename(args.deepspeed_config)
    resolved = plan.resolved_config(args, ds_file)
    report = dry_run_report(cfg, plan.config_path.name, plan.ablation.name, plan.model_path, splits, example, memory,
                            ds_config, resolved, padding, custom_deepspeed=plan.custom_ds is not None)
    write_json_atomic(ds_file, ds_config)
    write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
    write_json_atomic(out / "plan.json", {
        "memory": memory_plan_summary(memory), "examples": {k: dataclasses.asdict(s.stats) for k, s in splits.items()},
        "example": example, "padding_efficiency": padding, "effective_batch_size": t.global_batch(gpus)})
    write_atomic(out / "report.md", report)
    print(report, flush=True)
    logger.info("Dry run report: %s", out / "report.md")
    return out


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] = ()) -> int:
    """Parse, run the flow the flags ask for, and turn a user's problem into its message and exit code. `callbacks`:
    extra TrainerCallbacks for a training run (benchmarks/ours_probed.py times steps with one)."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(rank)
    try:
        if args.dry_run:
            if rank == 0:  # the other ranks of a launch have nothing to add
                dry_run(args)
        elif args.do_eval_only:
            evaluate_only(args)
        else:
            train(args, callbacks)
    except UserError as e:
        if rank == 0:  # every rank finds the same problem; one copy of the message is enough
            print("error: " + "\n       ".join(e.problems), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
