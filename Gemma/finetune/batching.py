"""Micro-batches: the collator that applies the LM head only where the loss is, length-grouped sampling, padding-free
batching, and how much of each batch is padding."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
from transformers.trainer_pt_utils import get_length_grouped_indices

from .config import Config
from .data import Split
from .prompts import IGNORE_INDEX


class SupervisedPositionsCollator:
    """Batches examples and makes the model apply its LM head only at the positions whose next token has a label.

    Gemma's vocabulary is 262,144 (256,000 for Gemma 2): over a prompt the LM head costs more than all the decoder
    layers together, and the full-sequence logits are the largest activation in memory. Only the target tokens carry
    labels, so the model gets a boolean `logits_to_keep` mask and the matching `shift_labels`; its own loss function
    then computes exactly the standard loss (same sum, same token count, tied embeddings and soft-capping included).

    Padded: right-padded to the longest example. Padding-free: transformers' flattening collator concatenates the
    examples into one row whose position_ids restart at 0 for each, so attention keeps them apart; each example's
    first label becomes -100, which it already is (the BOS). Either way the supervised positions and labels are
    the same, so is the loss.
    """

    def __init__(self, tokenizer: Any, padding_free: bool = False, flash_attention: bool = False):
        self.pad = (DataCollatorWithFlattening(return_flash_attn_kwargs=flash_attention) if padding_free
                    else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))

    def __call__(self, features: list[dict]) -> dict:
        batch = self.pad(features)  # the flattening collator reads input_ids and labels only
        # Position t predicts token t+1: the label for position t is labels[t+1].
        next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = next_labels != IGNORE_INDEX
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = next_labels[keep]
        return batch


def use_padding_free(cfg: Config) -> bool:
    """training.padding_free resolved: "auto" means only with flash_attention_2."""
    if cfg.training.padding_free == "auto":
        return cfg.model.attn_implementation == "flash_attention_2"
    return bool(cfg.training.padding_free)


class LengthGroupedSampler:
    """transformers' length grouping (random mega-batches of 50 batches, each sorted by length, the longest batch
    first) with a permutation that depends only on (seed, epoch): every rank draws the same one, which sharding the
    batches across ranks requires, and a resumed run replays the interrupted epoch's order."""

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's data loader calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


def padding_efficiency(lengths: list[list[int]]) -> float:
    """Real tokens / tokens processed, for micro-batches of example lengths right-padded to their longest."""
    real = sum(sum(batch) for batch in lengths)
    return real / sum(max(batch) * len(batch) for batch in lengths)


def epoch_padding_efficiency(split: Split, batch_size: int, group_size: int, seed: int) -> dict[str, float]:
    """padding_efficiency over one epoch of micro-batches, in length-grouped and in random order."""
    lengths = split.rows.data.column("length").to_numpy()
    orders = {"grouped": list(LengthGroupedSampler(split.group_lengths, group_size, seed)),
              "random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()}
    return {name: padding_efficiency([[lengths[i] for i in order[k:k + batch_size]]
                                      for k in range(0, len(order), batch_size)])
            for name, order in orders.items()}
