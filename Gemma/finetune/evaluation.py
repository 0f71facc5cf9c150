"""Test-set evaluation: each example's target loss and greedy answer, sharded over the ranks in step (ZeRO-3 forwards
are collective), then scored with the metrics of metrics.py on rank 0."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from .batching import SupervisedPositionsCollator
from .config import Config
from .data import Split
from .metrics import score_predictions
from .prompts import PromptEncoder, prompt_length

logger = logging.getLogger(__name__)


def target_losses(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over each row's target tokens, target tokens per row) for one collated batch. The logits are computed
    only at the supervised positions, and no KV cache is built: nothing generates from this forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["logits_to_keep"], use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits, batch["shift_labels"], reduction="none")
    rows = len(batch["input_ids"])
    row_of = batch["logits_to_keep"].nonzero()[:, 0]
    sums = torch.zeros(rows, device=nll.device).index_add_(0, row_of, nll)
    counts = torch.bincount(row_of, minlength=rows)
    return sums / counts, counts


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, synced: bool,
                     device: Any, end_of_turn_id: int) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded), cut where the model's turn ends."""
    eot = end_of_turn_id
    pad, width = tokenizer.pad_token_id, max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                         eos_token_id=[eot, tokenizer.eos_token_id], pad_token_id=pad)
    # Under ZeRO-3 every forward gathers parameters collectively: synced_gpus keeps a rank that has finished
    # stepping until all ranks are done.
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            generation_config=generation_config, synced_gpus=synced)
    answers = []
    for row in output[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in (eot, tokenizer.eos_token_id, pad)), len(row))
        answers.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return answers


def evaluate_test(model: Any, tokenizer: Any, examples: list[dict], ids: list[str], targets: list[str],
                  batch_size: int, max_new_tokens: int, device: Any, end_of_turn_id: int) -> list[dict] | None:
    """Per-example target loss and greedy answer for every example, sharded over the ranks. Every rank runs the
    same number of batches (ZeRO-3 forwards are collective), padding its shard by repeating an example whose
    result is then dropped. Returns the rows in input order on rank 0, None elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(len(examples) / world)
    shard = list(range(rank, len(examples), world))
    real = len(shard)
    shard += [shard[0] if shard else 0] * (per_rank - len(shard))
    collate = SupervisedPositionsCollator(tokenizer)
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, per_rank, batch_size):
            idx = shard[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
            losses, counts = target_losses(model, batch)
            prompts = [examples[i]["input_ids"][:prompt_length(examples[i])] for i in idx]
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens, world > 1, device, end_of_turn_id)
            for j, i in enumerate(idx):
                rows.append({"index": i, "id": ids[i], "target": targets[i], "prediction": answers[j],
                             "loss": losses[j].item(), "target_tokens": int(counts[j])})
    model.train(was_training)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows[:real])
    if rank != 0:
        return None
    ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    for r in ordered:
        del r["index"]
    return ordered


def run_test_evaluation(model: Any, encoder: PromptEncoder, test: Split, cfg: Config,
                        device: Any) -> tuple[dict, list[dict]] | None:
    """Test loss, perplexity and greedy answers: (metrics, prediction rows) on rank 0, None elsewhere. `device` is
    where the Trainer runs: under ZeRO-3 the parameters are placeholders that cannot say."""
    n = min(len(test.examples), cfg.evaluation.max_test_examples or len(test.examples))
    logger.info("Test evaluation: loss and greedy answers for %d of %d test examples.", n, len(test.examples))
    rows = evaluate_test(model, encoder.tokenizer, test.examples[:n], test.ids[:n], test.targets[:n],
                         cfg.training.eval_batch_size, cfg.evaluation.max_new_tokens, device, encoder.end_of_turn_id)
    if rows is None:
        return None
    metrics = score_predictions(rows, len(test.examples))
    logger.info("Test: loss %.4f, perplexity %.3f, exact match %.3f%s", metrics["loss"], metrics["perplexity"],
                metrics["exact_match"], f", MAE {metrics['mae']}, RMSE {metrics['rmse']}, "
                f"{metrics['unparsable']} unparsable" if metrics["numeric"] else "")
    return metrics, rows
