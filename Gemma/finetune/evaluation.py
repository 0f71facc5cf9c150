"""Test-set evaluation: each example's target loss and its answer (greedy generation, or with answer choices the most
likely choice), sharded over the ranks in step (ZeRO-3 forwards are collective), then scored with the metrics of
metrics.py on rank 0."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from .batching import SupervisedPositionsCollator
from .config import Config
from .answer_choices import AnswerChoices
from .data import Split
from .metrics import score_predictions
from .prompts import IGNORE_INDEX, PromptEncoder, prompt_length

logger = logging.getLogger(__name__)


def target_nll_sums(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over each row's target tokens, target tokens per row) for one collated batch. The logits are
    computed only at the supervised positions, and no KV cache is built: nothing generates from this forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=batch["logits_to_keep"], use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits, batch["shift_labels"], reduction="none")
    rows = len(batch["input_ids"])
    row_of = batch["logits_to_keep"].nonzero()[:, 0]
    sums = torch.zeros(rows, device=nll.device).index_add_(0, row_of, nll)
    return sums, torch.bincount(row_of, minlength=rows)


def target_losses(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over each row's target tokens, target tokens per row) for one collated batch."""
    sums, counts = target_nll_sums(model, batch)
    return sums / counts, counts


def choice_rows(prompt: list[int], choice_ids: list[list[int]]) -> list[dict]:
    """The prompt followed by each choice's tokens (its text and <end_of_turn>, as a training target), supervised on
    the choice: one row per choice, as the collator takes them."""
    return [{"input_ids": prompt + ids, "attention_mask": [1] * (len(prompt) + len(ids)),
             "labels": [IGNORE_INDEX] * len(prompt) + ids} for ids in choice_ids]


def choice_log_likelihoods(model: Any, collate: Any, prompts: list[list[int]], choice_ids: list[list[int]],
                           batch_size: int, device: Any) -> torch.Tensor:
    """(prompts, choices) summed log-likelihood of each choice's tokens after each prompt, in forwards of at most
    batch_size rows (one row per (prompt, choice)), so memory stays that of an evaluation batch. The number of
    forwards depends only on len(prompts), len(choice_ids) and batch_size: ranks given as many prompts stay in step."""
    rows = [row for prompt in prompts for row in choice_rows(prompt, choice_ids)]
    scores = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
        scores.append(-target_nll_sums(model, batch)[0].double())
    return torch.cat(scores).view(len(prompts), len(choice_ids))


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


def evaluate_test(model: Any, tokenizer: Any, examples: Sequence[dict], ids: list[str], targets: list[str],
                  batch_size: int, max_new_tokens: int, device: Any, end_of_turn_id: int,
                  choices: list[str] | None = None, choice_ids: list[list[int]] | None = None) -> list[dict] | None:
    """Per-example target loss and answer for every example, sharded over the ranks. The answer is the greedy one,
    or with choices (their token ids in choice_ids) the most likely choice, with every choice's probability: the
    softmax of the choices' summed log-likelihoods, so normalised over the set. Every rank runs the same number of
    batches (ZeRO-3 forwards are collective), padding its shard by repeating an example whose result is then
    dropped. Returns the rows in input order on rank 0, None elsewhere."""
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
            if choices:
                probabilities = torch.softmax(choice_log_likelihoods(model, collate, prompts, choice_ids, batch_size,
                                                                     device), dim=1).tolist()
                answers = [choices[max(range(len(choices)), key=p.__getitem__)] for p in probabilities]
            else:
                answers = generate_answers(model, tokenizer, prompts, max_new_tokens, world > 1, device,
                                           end_of_turn_id)
            for j, i in enumerate(idx):
                rows.append({"index": i, "id": ids[i], "target": targets[i], "prediction": answers[j],
                             "loss": losses[j].item(), "target_tokens": int(counts[j])})
                if choices:
                    rows[-1]["choice_probabilities"] = dict(zip(choices, probabilities[j], strict=True))
    model.train(was_training)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows[:real])
    if rank != 0:
        return None
    ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    for r in ordered:
        del r["index"]
    return ordered


def run_test_evaluation(model: Any, encoder: PromptEncoder, test: Split, cfg: Config, device: Any,
                        answer_choices: AnswerChoices | None = None) -> tuple[dict, list[dict]] | None:
    """Test loss, perplexity and answers (greedy, or the most likely of the answer choices): (metrics, prediction
    rows) on rank 0, None elsewhere. `device` is where the Trainer runs: under ZeRO-3 the parameters are placeholders
    that cannot say."""
    n = min(len(test), cfg.evaluation.max_test_examples or len(test))
    choices = answer_choices.choices if answer_choices else None
    logger.info("Test evaluation: loss and %s for %d of %d test examples.",
                f"the likelihood of {len(choices)} answer choices" if choices else "greedy answers", n,
                len(test))
    rows = evaluate_test(model, encoder.tokenizer, test.examples.select(range(n)), test.ids[:n], test.targets[:n],
                         cfg.training.eval_batch_size, cfg.evaluation.max_new_tokens, device, encoder.end_of_turn_id,
                         choices, [encoder.target_ids(c) for c in choices] if choices else None)
    if rows is None:
        return None
    metrics = score_predictions(rows, len(test), choices)
    if answer_choices is not None:
        metrics["answer_choices"] = answer_choices.record()
    shown = {k: metrics[k] for k in ("exact_match", "macro_f1", "auc", "mae", "rmse", "expected_mae",
                                     "expected_rmse", "rouge1", "rougeL") if metrics.get(k) is not None}
    logger.info("Test: loss %.4f, perplexity %.3f, %s%s; main metric %s", metrics["loss"], metrics["perplexity"],
                ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
                f", {metrics['unparsable']} unparsable" if metrics["numeric"] else "", metrics["main_metric"])
    return metrics, rows
