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

    # test-time ablation: run1's final/ evaluated with another prompt, into a new directory (run1 is not touched)
    accelerate launch ... --do_eval_only --test_time_ablation Gemma/outputs/run1 --ablation_config profile_only \
        --output_dir Gemma/outputs/run1@test_time_profile_only

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import Ablation, Config, LoraConfig
from finetune.deepspeed_config import load_custom_deepspeed_config
from finetune.errors import EXIT_INTERRUPTED, MESSAGE_GRACE_S, UserError
from finetune.outputs import (DRY_RUN_DIRNAME, DS_CONFIG_DIRNAME, IDENTITY_NAME, PREDICTIONS_NAME, RESOLVED_CONFIG_NAME,
                              RESULTS_NAME, OutputLock, PreviousRun, check_eval_only, check_output_dir,
                              check_output_writable, check_same_test_set, deepspeed_config_filename, estimated_storage,
                              library_versions, planned_steps, read_results, test_set_of, warn_if_disk_is_short,
                              write_atomic, write_json_atomic, write_jsonl_atomic)
from finetune.run_identity import resume_point, run_identity
from finetune.test_time import TestTimeAblation
from finetune.runtime import Runtime, configure_logging
from finetune.settings import load_settings, local_or_hub, resolve_path

logger = logging.getLogger("train_deepspeed")
HARDWARE_FLAGS = ("gpus_per_node", "num_nodes", "gpu_memory_gib", "cpu_memory_gib")

# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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
                   help="start over in an --output_dir that holds a finished or unfinished run: its outputs are "
                        "deleted once the new run's first step is done (kept if the new run stops before).")
    p.add_argument("--allow_config_changes", action="store_true",
                   help="with --resume_from_checkpoint: continue even where the settings, data or model differ from "
                        "what the checkpoint was trained with (recorded in results.json).")
    p.add_argument("--do_eval_only", action="store_true",
                   help="no training: evaluate <output_dir>/final/ on data.test_file (loss, answers, metrics) and "
                        "update results.json and predictions.jsonl. Pass the run's --config and --ablation_config.")
    p.add_argument("--replace_test_set", action="store_true",
                   help="with --do_eval_only: replace the test results of another test set (recorded).")
    p.add_argument("--test_time_ablation", type=Path, default=None, metavar="TRAINED_RUN",
                   help="with --do_eval_only: evaluate TRAINED_RUN's final/ with --ablation_config's prompt (one it "
                        "was not trained with) into a new --output_dir, labelled as a test-time ablation; "
                        "TRAINED_RUN is not written.")
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
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; flags that do not go together are usage errors (exit 2) before anything is read."""
    p = build_parser()
    args = p.parse_args(argv)
    planned = [f"--{k}" for k in HARDWARE_FLAGS if getattr(args, k) is not None]
    if planned and not args.dry_run:
        p.error(f"{', '.join(planned)} describe hardware for --dry_run; a run measures the hardware it runs on.")
    for k in HARDWARE_FLAGS:
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}.")
    if args.dry_run and args.do_eval_only:
        p.error("--dry_run and --do_eval_only do not go together.")
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        p.error("--overwrite_output_dir starts over and --resume_from_checkpoint continues: choose one.")
    if args.allow_config_changes and args.resume_from_checkpoint is None:
        p.error("--allow_config_changes applies to --resume_from_checkpoint only.")
    if args.replace_test_set and not args.do_eval_only:
        p.error("--replace_test_set applies to --do_eval_only only.")
    if args.test_time_ablation is not None and not args.do_eval_only:
        p.error("--test_time_ablation evaluates a trained run: add --do_eval_only (a test-time ablation never "
                "trains).")
    if args.test_time_ablation is not None and args.replace_test_set:
        p.error("--test_time_ablation writes into a new --output_dir, which has no test results to replace: "
                "drop --replace_test_set.")
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
    identity: dict = field(default_factory=dict)  # run_identity.json: what this run is
    resume: str | None = None  # the checkpoint to continue from
    resume_changes: list[str] = field(default_factory=list)  # differences from the checkpoint's identity, allowed
    test_time: TestTimeAblation | None = None  # --test_time_ablation: the trained run evaluated with this prompt

    def data_file(self, split: str) -> Path | None:
        name = getattr(self.cfg.data, f"{split}_file")
        return None if name is None else resolve_path(name, self.config_path.parent)

    @property
    def cache_dir(self) -> Path | None:
        """data.cache_dir, relative to config.json's directory; None: the default (finetune.data.default_cache_dir)."""
        name = self.cfg.data.cache_dir
        return None if name is None else resolve_path(name, self.config_path.parent)

    def test_set(self, test: Any) -> dict:
        """Where the test metrics come from: the test file, its content hash and the ids hash of its examples."""
        return {**self.identity["data_files"]["test"], "ids_sha256": test.stats.ids_sha256}

    def resolved_config(self, args: argparse.Namespace, deepspeed_file: Path) -> dict:
        """resolved_config.json: the settings after precedence, the ablation, the command line and the paths used."""
        return {**dataclasses.asdict(self.cfg),
                "ablation": {"name": self.ablation.name, "description": self.ablation.description,
                             **self.ablation.prompt},
                "cli": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "deepspeed_config_file": str(deepspeed_file), "model_path": self.model_path,
                "tokenizer_path": self.tokenizer_path}


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Check config, ablation, --set, the DeepSpeed JSON, the output directory and the checkpoint to resume (its
    settings against this run's), all before anything heavy is imported; every problem at once."""
    config_path = args.config.resolve()
    cfg, ablation = load_settings(config_path, args.ablation_config, args.overrides)
    custom_ds = load_custom_deepspeed_config(args.deepspeed_config, cfg) if args.deepspeed_config else None
    output_dir = args.output_dir.resolve()
    model_path = local_or_hub(cfg.model.model_name_or_path, config_path.parent)
    tokenizer_path = local_or_hub(cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path, config_path.parent)
    test_time = None
    if args.test_time_ablation is not None:  # checked before check_output_writable creates anything
        test_time = TestTimeAblation.check(args.test_time_ablation, output_dir, cfg, ablation)
        model_path = tokenizer_path = str(test_time.final)
    elif args.do_eval_only:
        model_path = tokenizer_path = str(check_eval_only(output_dir, cfg))  # final/ holds the run's tokenizer
    elif not args.dry_run:  # a dry run writes only dry_run/, beside any run
        check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    check_output_writable(output_dir)
    plan = RunPlan(cfg, config_path, ablation, custom_ds, output_dir, model_path, tokenizer_path, test_time=test_time)
    files = {split: path for split in ("train", "validation", "test") if (path := plan.data_file(split))}
    plan.identity = run_identity(cfg, ablation, files, model_path, tokenizer_path,
                                 int(os.environ.get("WORLD_SIZE", "1")), library_versions())
    if test_time is not None:
        test_time.check_settings(plan.identity)
    if not (args.do_eval_only or args.dry_run):
        plan.resume, plan.resume_changes = resume_point(args.resume_from_checkpoint, output_dir, plan.identity,
                                                        args.allow_config_changes)
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# Steps shared by the flows
# ----------------------------------------------------------------------------------------------------------------------


def prepare_data(plan: RunPlan, names: tuple[str, ...]) -> tuple[Any, Any, dict, Any]:
    """Tokenizer, prompt encoder (its fixed parts checked against max_length), the named splits that have a file and
    the answer choices the test evaluation scores (finetune.answer_choices), all before the model loads."""
    from finetune.answer_choices import answer_choices_for
    from finetune.data import build_split, overlap, overlap_problems
    from finetune.prompts import PromptEncoder, load_tokenizer

    tokenizer = load_tokenizer(plan.tokenizer_path)
    # Examples are fitted on config.json's prompt (the study's), not the ablation's: every ablation keeps the same ones.
    encoder = PromptEncoder.for_prompt(tokenizer, plan.cfg.training.max_length, plan.cfg.prompt,
                                       plan.ablation.study_prompt)
    encoder.check_fixed_parts()
    splits = {}
    for name in names:
        if (path := plan.data_file(name)) is not None:
            splits[name] = build_split(path, name, plan.cfg, encoder, plan.cache_dir)
            s = splits[name].stats
            logger.info("%s: %d records -> %d examples (%d dropped as too long, %d with history shortened), "
                        "ids sha256 %s", name, s.records, s.examples, s.dropped_too_long, s.history_shortened,
                        s.ids_sha256[:12])
    if (shared := overlap(splits)) and not plan.cfg.data.allow_overlap:
        raise UserError(overlap_problems(shared))
    return tokenizer, encoder, splits, answer_choices_for(plan.cfg, plan.data_file("train"), splits.get("test"))


def deepspeed_config_for(plan: RunPlan, model_config: Any, split: Any, hardware: Any = None) -> tuple[dict, Any]:
    """(DeepSpeed config, memory plan): the user's --deepspeed_config, or the generated one with any "auto" offload
    decided by the memory plan for micro-batches of `split` (the plan is None when nothing needed it)."""
    from finetune.batching import use_padding_free
    from finetune.deepspeed_config import generate_deepspeed_config
    from finetune.memory_plan import detect_hardware, model_shape, plan_memory_for_split, resolved_offload
    from finetune.modeling import hidden_size

    choices = plan.cfg.deepspeed
    memory = None
    if hardware is not None or (plan.custom_ds is None and "auto" in (choices.offload_optimizer,
                                                                      choices.offload_params)):
        memory = plan_memory_for_split(model_shape(model_config, plan.cfg.lora), plan.cfg,
                                       hardware or detect_hardware(), split.stats, use_padding_free(plan.cfg))
        if hardware is None:
            logger.info("Offload \"auto\": optimizer %s, parameters %s (%s).", memory.offload_optimizer,
                        memory.offload_params, memory.reason)
    if plan.custom_ds is not None:
        return plan.custom_ds, memory
    return generate_deepspeed_config(resolved_offload(choices, memory), plan.cfg.model.dtype,
                                     hidden_size(model_config)), memory


def write_run_files(plan: RunPlan, args: argparse.Namespace, ds_config: dict, previous: PreviousRun) -> None:
    """Rank 0, once every check has passed: move a replaced run aside, then save the DeepSpeed config used,
    resolved_config.json and run_identity.json."""
    out = plan.output_dir
    previous.move_aside()
    ds_file = out / DS_CONFIG_DIRNAME / deepspeed_config_filename(args.deepspeed_config)
    write_json_atomic(ds_file, ds_config)
    resolved = plan.resolved_config(args, ds_file)
    write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
    write_json_atomic(out / IDENTITY_NAME, plan.identity)
    logger.info("Resolved config:\n%s", json.dumps(resolved, indent=2))
    for change in plan.resume_changes:
        logger.warning("Resuming %s with a change: %s", plan.resume, change)


def write_results(output_dir: Path, results: dict, tested: tuple[dict, list[dict]] | None, test_set: dict) -> None:
    """Rank 0: predictions.jsonl, then results.json (last: a run is finished when it exists)."""
    if tested is not None:
        metrics, rows = tested
        write_jsonl_atomic(output_dir / PREDICTIONS_NAME, rows)
        results["test"] = {**metrics, "test_set": test_set}
    write_json_atomic(output_dir / RESULTS_NAME, results)


# ----------------------------------------------------------------------------------------------------------------------
# The flows
# ----------------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> Path:
    """A training run: check -> data -> DeepSpeed config -> TrainingArguments -> model -> train -> save -> evaluate."""
    started, plan = time.time(), plan_run(args)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with (OutputLock(plan.output_dir, held_here=rank0),
          PreviousRun(plan.output_dir, replacing=args.overwrite_output_dir and rank0) as previous):
        tokenizer, encoder, splits, answers = prepare_data(plan, ("train", "validation", "test"))
        with Runtime.start(plan.cfg.model.dtype) as runtime:
            from finetune import trainer as tr
            from finetune.evaluation import run_test_evaluation

            trainer, memory = build_training(plan, args, tokenizer, splits, runtime, [*callbacks, tr.OnFirstStep(
                previous.discard, lambda: runtime.phase(None))], previous)
            runtime.phase("starting DeepSpeed (its engine; a first run on a machine also compiles its ops)")
            train_result = trainer.train(resume_from_checkpoint=plan.resume)
            trainer.fault_guard.raise_if_stopped(plan.output_dir)
            results = {**tr.training_results(trainer, train_result.metrics, plan.cfg, plan.ablation, splits, memory,
                                             plan.resume),
                       "resume_changes": plan.resume_changes, "data_files": plan.identity["data_files"],
                       "model_identity": plan.identity["model"]}
            final = tr.save_final_model(trainer, plan.output_dir, runtime.rank, encoder.chat, plan.cfg,
                                         plan.model_path)
            tested = (run_test_evaluation(trainer.model, encoder, splits["test"], plan.cfg, trainer.args.device,
                                          answers) if "test" in splits else None)
            if runtime.rank == 0:
                test_set = {**plan.test_set(splits["test"]), "evaluated": "after training"} if tested else {}
                write_results(plan.output_dir, {**results, "wall_time_s": round(time.time() - started, 1)}, tested,
                              test_set)
                logger.info("Done in %.0f s. Results: %s  Final model: %s", time.time() - started,
                            plan.output_dir / RESULTS_NAME, final)
    return plan.output_dir


def build_training(plan: RunPlan, args: argparse.Namespace, tokenizer: Any, splits: dict, runtime: Runtime,
                   callbacks: Sequence[Any], previous: PreviousRun) -> tuple[Any, Any]:
    """(Trainer with its model, memory plan): the DeepSpeed config, TrainingArguments, the last checks before the
    model loads, then rank 0 writes the run's files (moving a replaced run aside) and the model loads."""
    from finetune import trainer as tr
    from finetune.modeling import load_model_config
    from finetune.preflight import check_before_loading

    cfg, t = plan.cfg, plan.cfg.training
    steps = planned_steps(t, len(splits["train"]), runtime.world_size)
    warn_if_disk_is_short(plan.output_dir, estimated_storage(Path(plan.model_path), t, steps))
    model_config = load_model_config(plan.model_path)
    ds_config, memory = deepspeed_config_for(plan, model_config, splits["train"])
    training_args = tr.build_training_arguments(cfg, plan.output_dir, ds_config, "validation" in splits, runtime)
    check_before_loading(cfg, ds_config, training_args, model_config, steps, args.deepspeed_config)
    if runtime.rank == 0:
        write_run_files(plan, args, ds_config, previous)
    runtime.barrier()
    runtime.warn_if_alone(training_args.world_size)
    runtime.phase("loading the model")
    trainer = tr.build_trainer(cfg, plan.model_path, training_args, ds_config, tokenizer, splits,
                               [*callbacks, tr.SaveIntoCheckpoints(plan.output_dir / IDENTITY_NAME)])
    return trainer, memory


def evaluate_only(args: argparse.Namespace) -> Path:
    """--do_eval_only: the test-set evaluation of a finished run's final/ model, with the prompt it was trained
    with; results.json keeps the training results and gets a new test section, which says which test set it is.
    With --test_time_ablation, the trained run's final/ with another ablation's prompt, into a directory of its own
    (finetune/test_time.py)."""
    started, plan = time.time(), plan_run(args)
    resolved = plan.resolved_config(args, plan.output_dir / DS_CONFIG_DIRNAME / deepspeed_config_filename(
        args.deepspeed_config))  # before LoRA is turned off below: the settings the run was trained with
    plan.cfg = dataclasses.replace(plan.cfg, lora=LoraConfig())  # a LoRA run's final/ is merged: no adapters to add
    with OutputLock(plan.output_dir, held_here=int(os.environ.get("RANK", "0")) == 0):
        tokenizer, encoder, splits, answers = prepare_data(plan, ("test",))
        test = splits["test"]
        test_set = {**plan.test_set(test), "evaluated": f"--do_eval_only, {time.strftime('%Y-%m-%d %H:%M')}"}
        if plan.test_time is not None:
            test_set["evaluated"] += f", test-time ablation of {plan.test_time.trained_run}"
            plan.test_time.check_test_set(test_set)
        else:
            check_same_test_set(plan.output_dir, test_set, args.replace_test_set)
        with Runtime.start(plan.cfg.model.dtype) as runtime:
            tested, ds_config = evaluate_final_model(plan, args, tokenizer, encoder, test, runtime, answers)
            if runtime.rank == 0:
                if plan.test_time is not None:  # a new directory: the evaluation's own files, nothing of the run
                    results = plan.test_time.results(dataclasses.asdict(test.stats), plan.identity["model"])
                    write_json_atomic(Path(resolved["deepspeed_config_file"]), ds_config)
                    write_json_atomic(plan.output_dir / RESOLVED_CONFIG_NAME,
                                      plan.test_time.resolved_config(resolved))
                else:
                    results = read_results(plan.output_dir)
                    if (replaced := test_set_of(results)) and replaced.get("ids_sha256") != test_set["ids_sha256"]:
                        test_set["replaced"] = replaced  # --replace_test_set: what these results replace
                    results.setdefault("examples", {})["test"] = dataclasses.asdict(test.stats)
                write_results(plan.output_dir, results, tested, test_set)
                logger.info("Done in %.0f s. Results: %s", time.time() - started, plan.output_dir / RESULTS_NAME)
    return plan.output_dir


def evaluate_final_model(plan: RunPlan, args: argparse.Namespace, tokenizer: Any, encoder: Any, test: Any,
                         runtime: Runtime, answers: Any) -> tuple[Any, dict]:
    """(test metrics and prediction rows on rank 0, DeepSpeed config): final/ loaded under DeepSpeed and evaluated."""
    from finetune import trainer as tr
    from finetune.evaluation import run_test_evaluation
    from finetune.modeling import load_model_config
    from finetune.preflight import check_before_loading

    model_config = load_model_config(plan.model_path)
    ds_config, _ = deepspeed_config_for(plan, model_config, test)
    training_args = tr.build_training_arguments(plan.cfg, plan.output_dir, ds_config, False, runtime)
    check_before_loading(plan.cfg, ds_config, training_args, model_config, 1, args.deepspeed_config)
    runtime.phase("loading the model")
    trainer = tr.build_trainer(plan.cfg, plan.model_path, training_args, ds_config, tokenizer, {})
    runtime.phase("starting DeepSpeed (its engine; a first run on a machine also compiles its ops)")
    # The Trainer builds the DeepSpeed inference engine on its first evaluation; one example per rank does.
    trainer.evaluate(test.examples.select(range(min(len(test), training_args.world_size))))
    runtime.phase(None)
    return run_test_evaluation(trainer.model, encoder, test, plan.cfg, training_args.device, answers), ds_config


def dry_run(args: argparse.Namespace) -> Path:
    """--dry_run, on rank 0: every check and build a run does before the model loads, plus the memory plan, as a
    report. No weights, no training, no checkpoint; only <output_dir>/dry_run/ is written."""
    plan = plan_run(args)
    with OutputLock(plan.output_dir):
        from finetune.batching import epoch_padding_efficiency
        from finetune.dry_run import dry_run_report, first_example
        from finetune.memory_plan import detect_hardware, memory_plan_summary
        from finetune.preflight import check_before_loading, trainer_arguments_like
        from finetune.modeling import load_model_config

        cfg, t = plan.cfg, plan.cfg.training
        _, encoder, splits, _ = prepare_data(plan, ("train", "validation", "test"))
        hardware = detect_hardware(*(getattr(args, k) for k in HARDWARE_FLAGS))
        model_config = load_model_config(plan.model_path)
        ds_config, memory = deepspeed_config_for(plan, model_config, splits["train"], hardware)
        gpus = hardware.gpus_per_node * hardware.nodes
        check_before_loading(cfg, ds_config, trainer_arguments_like(cfg, gpus), model_config,
                             planned_steps(t, len(splits["train"]), gpus), args.deepspeed_config)
        padding = epoch_padding_efficiency(splits["train"], t.batch_size, t.global_batch(gpus), t.seed)
        example = first_example(encoder, splits["train"], cfg)
        out = plan.output_dir / DRY_RUN_DIRNAME
        ds_file = out / deepspeed_config_filename(args.deepspeed_config)
        resolved = plan.resolved_config(args, ds_file)
        report = dry_run_report(cfg, plan.config_path.name, plan.ablation.name, plan.model_path, splits, example,
                                memory, ds_config, resolved, padding, custom_deepspeed=plan.custom_ds is not None)
        write_json_atomic(ds_file, ds_config)
        write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
        write_json_atomic(out / "plan.json", {
            "memory": memory_plan_summary(memory),
            "examples": {k: dataclasses.asdict(s.stats) for k, s in splits.items()},
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
        else:
            # A rank that exits first makes the launcher stop rank 0 before it has printed the message.
            time.sleep(MESSAGE_GRACE_S)
        return e.exit_code
    except KeyboardInterrupt:
        if rank == 0:
            print("error: interrupted (Ctrl-C); nothing was saved after the last checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
