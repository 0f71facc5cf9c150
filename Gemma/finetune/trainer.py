"""The model, TrainingArguments and the Trainer: our Trainer subclass with its fault guard and throughput meter,
what the engine actually ran, the final model, and results.json's training part."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from .activation_offload import ActivationOffloadCallback, OffloadStats, activation_offload_for
from .batching import LengthGroupedSampler, SupervisedPositionsCollator, use_padding_free
from .chat_format import ChatFormat
from .config import Ablation, Config
from .data import Split, overlap
from .deepspeed_config import cpu_checkpointing
from .faults import FaultGuard
from .memory_plan import MemoryPlan, memory_plan_summary
from .modeling import load_model, parameter_counts
from .outputs import ADAPTER_DIRNAME, FINAL_DIRNAME, library_versions, loss_summary
from .runtime import Runtime

logger = logging.getLogger(__name__)


def build_training_arguments(cfg: Config, output_dir: Path, ds_config: dict, evaluate: bool,
                             runtime: Runtime) -> TrainingArguments:
    """TrainingArguments from config.json. Created BEFORE the model so that from_pretrained builds it partitioned
    under ZeRO-3 (zero.Init) instead of loading the whole model on every rank."""
    t = cfg.training
    evaluate = evaluate and t.eval_steps is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ds_config,  # the dict, on every rank: reading back a file rank 0 writes would race
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        activation_checkpointing=t.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True,  # one log line per logging_steps reads better in a launcher's interleaved output
        save_only_model=False,
        prediction_loss_only=True,  # evaluation needs the loss only: never gather vocabulary-sized logits
        **runtime.training_arguments(),
    )


class ThroughputMeter(TrainerCallback):
    """Times every optimizer step (from on_step_begin to on_step_end: forward, backward and optimizer, not the
    evaluation or saving that follow) and counts the tokens the model ran, real and padding."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.processed_tokens = 0
        self.real_tokens: Any = 0  # a device tensor until the end: no host sync per micro-batch
        self._started = 0.0

    def count(self, inputs: dict) -> None:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.processed_tokens += ids.numel()
        self.real_tokens = self.real_tokens + (mask.sum() if mask is not None else ids.numel())

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)

    def summary(self, device: Any) -> dict:
        """Job-wide figures (collective: every rank calls it). The first step, which pays for warm-up, is left out of
        the median."""
        counts = torch.tensor([float(self.real_tokens), float(self.processed_tokens)], dtype=torch.float64,
                              device=device)
        dist.all_reduce(counts)
        peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                 torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, peaks)
        real, processed = (int(x) for x in counts.tolist())
        seconds = sum(self.step_seconds)
        return {
            "steps": len(self.step_seconds),
            "seconds_per_step": round(statistics.median(self.step_seconds[1:] or self.step_seconds), 4)
            if self.step_seconds else None,
            "train_step_seconds": round(seconds, 3),
            "real_tokens": real,
            "processed_tokens": processed,
            "padding_efficiency": round(real / processed, 4) if processed else None,
            "tokens_per_second": round(real / seconds, 1) if seconds else None,
            "peak_rss_bytes": [g[0] for g in gathered],
            "peak_gpu_memory_bytes": [g[1] for g in gathered] if torch.cuda.is_available() else None,
        }


class OnFirstStep(TrainerCallback):
    """Calls each action once, when the first optimizer step of this launch has ended: the run has started."""

    def __init__(self, *actions: Callable[[], None]):
        self.actions = actions

    def on_step_end(self, args, state, control, **kwargs):
        for action in self.actions:
            action()
        self.actions = ()


class SaveIntoCheckpoints(TrainerCallback):
    """Copies a file of the run (its identity) into every checkpoint rank 0 saves, so that a checkpoint says what it
    was trained with wherever it goes."""

    def __init__(self, path: Path):
        self.path = path

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir() and self.path.is_file():
            shutil.copy2(self.path, checkpoint / self.path.name)


class GuardedTrainer(Trainer):
    """The Trainer with a fault guard (each micro-batch's loss shown to it; the check is lazy, no host sync), a
    throughput meter counting each micro-batch's tokens, our length-grouped sampler when one is given, and the
    CPU-offloaded activation checkpointing when asked for."""

    def __init__(self, *args, sampler: LengthGroupedSampler | None = None,
                 activation_offload: ActivationOffloadCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler, self.activation_offload = sampler, activation_offload
        self.fault_guard, self.throughput = FaultGuard(self), ThroughputMeter()
        for callback in (activation_offload, self.fault_guard, self.throughput):
            if callback is not None:
                self.add_callback(callback)

    def _get_train_sampler(self, train_dataset=None):
        return self.sampler if self.sampler is not None else super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.throughput.count(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.fault_guard.saw_loss(loss)
        return loss


def build_trainer(cfg: Config, model_path: str, training_args: TrainingArguments, ds_config: dict, tokenizer: Any,
                  splits: dict[str, Split], callbacks: Sequence[TrainerCallback] = ()) -> GuardedTrainer:
    """The model (partitioned by zero.Init as it loads) in our Trainer, with batching for these splits."""
    t, world_size = cfg.training, training_args.world_size
    padding_free = use_padding_free(cfg)
    if padding_free and cfg.model.attn_implementation != "flash_attention_2":
        logger.warning("padding_free with %s attention: correct, but attention then spans the whole concatenated "
                       "micro-batch; flash_attention_2 keeps the examples apart at no extra cost.",
                       cfg.model.attn_implementation)
    sampler = None
    if "train" in splits and t.group_by_length and not padding_free:
        # The longest micro-batches of the whole first optimizer step come first, on every rank.
        sampler = LengthGroupedSampler(splits["train"].group_lengths, t.global_batch(world_size), t.seed)
    logger.info("Batching: %s.", "padding-free (one concatenated row per micro-batch)" if padding_free
                else f"padded to the longest example, {'grouped' if sampler else 'not grouped'} by length")
    logger.info("World size %d; effective global batch size %d = batch_size %d x gradient_accumulation_steps %d x "
                "%d processes.", world_size, t.global_batch(world_size), t.batch_size, t.gradient_accumulation_steps,
                world_size)
    return GuardedTrainer(
        model=load_model(model_path, cfg),  # with what is not trained (vision / audio towers) frozen
        args=training_args,
        train_dataset=splits["train"].examples if "train" in splits else None,
        eval_dataset=splits["validation"].examples if "validation" in splits else None,
        processing_class=tokenizer,
        data_collator=SupervisedPositionsCollator(tokenizer, padding_free,
                                                  cfg.model.attn_implementation == "flash_attention_2"),
        callbacks=list(callbacks),
        sampler=sampler,
        activation_offload=activation_offload_for(t.activation_checkpointing, cpu_checkpointing(ds_config)),
    )


def describe_engine(trainer: Trainer) -> dict:
    """What actually ran, read back from the DeepSpeed engine (not from our intentions)."""
    engine = trainer.model_wrapped
    if not hasattr(engine, "zero_optimization_stage"):
        return {"engine": type(engine).__name__}
    offload_opt, offload_param = engine.zero_offload_optimizer(), engine.zero_offload_param()
    return {
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "offload_optimizer": str(getattr(offload_opt, "device", "none")).split(".")[-1],
        "offload_param": str(getattr(offload_param, "device", "none")).split(".")[-1],
        "bf16": engine.bfloat16_enabled(),
        "optimizer": type(engine.optimizer).__name__,
        "base_optimizer": type(getattr(engine.optimizer, "optimizer", None)).__name__,
        "world_size": engine.world_size,
    }


def evaluation_at(log_history: list[dict], step: int) -> dict | None:
    """The validation metrics logged at `step`, if the Trainer evaluated then (the last such entry)."""
    for entry in reversed(log_history):
        if "eval_loss" in entry and entry.get("step") == step:
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return None


def validation_metrics(trainer: Trainer) -> dict:
    """Validation metrics of the final weights; reuse the in-training evaluation when it ran at the last step."""
    return evaluation_at(trainer.state.log_history, trainer.state.global_step) or trainer.evaluate()


def save_final_model(trainer: Trainer, output_dir: Path, rank: int, chat: ChatFormat, cfg: Config,
                     model_path: str) -> Path:
    """final/: consolidated 16-bit weights (gathered by every rank) + tokenizer, renamed into place when complete;
    ready for the clients users load it with: generation stops where a model turn ends, and the tokenizer's chat
    template (the one training used, Gemma's when the base tokenizer had none) rebuilds the training prompt.
    LoRA runs first save adapter/ (the trainable parameters only), then rank 0 merges it into the base model."""
    if chat.template_given:
        trainer.processing_class.chat_template = chat.template
    if cfg.lora.enabled:
        adapter = into_place(output_dir / ADAPTER_DIRNAME, rank, lambda staging: trainer.save_model(str(staging)))
        return into_place(output_dir / FINAL_DIRNAME, rank,
                          lambda staging: save_merged_model(trainer, adapter, staging, chat, cfg, model_path),
                          on_rank0_only=True)
    stop_at_end_of_turn(trainer.model.generation_config, chat)
    config = trainer.model.config
    config.use_cache = True  # users generate from final/: give them the cache back ...
    try:
        return into_place(output_dir / FINAL_DIRNAME, rank, lambda staging: trainer.save_model(str(staging)))
    finally:
        config.use_cache = False  # ... in the saved config; the test-set loss after this needs none


def into_place(target: Path, rank: int, write: Callable[[Path], Any], on_rank0_only: bool = False) -> Path:
    """Writes `target` into a staging directory beside it (every rank calls write, as a gathering save needs, or
    rank 0 alone) and renames it into place once complete."""
    staging = target.with_name(f".{target.name}.tmp")
    if rank == 0 or not on_rank0_only:
        write(staging)
    dist.barrier()
    if rank == 0:
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    dist.barrier()
    return target


def stop_at_end_of_turn(generation: Any, chat: ChatFormat) -> None:
    """Generation stops at the token that ends a model turn as well as at the model's own end tokens."""
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    generation.eos_token_id = list(dict.fromkeys([chat.end_of_turn_id, *(t for t in eos if t is not None)]))


def save_merged_model(trainer: Trainer, adapter: Path, staging: Path, chat: ChatFormat, cfg: Config,
                      model_path: str) -> None:
    """Rank 0: the base model from disk with the adapter merged in, saved as a plain checkpoint with the tokenizer."""
    from .lora import merged_model  # peft: imported only by runs that use it

    model = merged_model(model_path, str(adapter), cfg, trainer.args.hf_deepspeed_config)
    stop_at_end_of_turn(model.generation_config, chat)
    model.config.use_cache = True
    model.save_pretrained(staging)
    trainer.processing_class.save_pretrained(staging)


def training_results(trainer: GuardedTrainer, train_metrics: dict, cfg: Config, ablation: Ablation,
                     splits: dict[str, Split], memory: MemoryPlan | None, resumed_from: str | None) -> dict:
    """results.json's training part (the test section is added by the evaluation). Collective: the throughput
    summary and the validation pass run on every rank."""
    world_size, offload = trainer.args.world_size, trainer.activation_offload
    offloaded = offload.stats if offload is not None else OffloadStats()
    throughput = trainer.throughput.summary(trainer.args.device)
    return {
        "ablation": ablation.name,
        "ablation_description": ablation.description,
        "prompt": dataclasses.asdict(cfg.prompt),  # what the prompt held (--set may refine the ablation)
        "train": train_metrics,
        "eval": validation_metrics(trainer) if trainer.eval_dataset is not None else {},
        **loss_summary(trainer.state.log_history),
        "global_step": trainer.state.global_step,
        "world_size": world_size,
        "effective_batch_size": cfg.training.global_batch(world_size),
        "examples": {name: dataclasses.asdict(split.stats) for name, split in splits.items()},
        "data_overlap": overlap(splits),  # empty unless data.allow_overlap let shared examples through
        "deepspeed": describe_engine(trainer),
        "parameters": parameter_counts(trainer.model),  # trained (the language model, or LoRA's adapters) and frozen
        "memory_plan": memory_plan_summary(memory) if memory is not None else None,
        "batching": {"padding_free": use_padding_free(cfg), "group_by_length": trainer.sampler is not None},
        "throughput": throughput,
        "activation_checkpointing": {
            "enabled": cfg.training.activation_checkpointing,
            "cpu_offload": offloaded.tensors > 0,
            "offloaded_tensors_rank0": offloaded.tensors,
            "offloaded_bytes_rank0": offloaded.bytes,
        },
        "resumed_from": resumed_from,
        "versions": library_versions(),
        "log_history": trainer.state.log_history,
    }
