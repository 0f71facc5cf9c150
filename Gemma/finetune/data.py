"""Checked records -> encoded splits (token ids, labels, and what happened to each split); records.py reads and
checks the records, answer_choices.py resolves the test evaluation's answer set.

Every split keeps the same examples whatever the ablation: which records fit in max_length, and how many history
items they keep, is decided on config.json's full prompt (prompts.PromptEncoder.fit_full_prompt).

A split is prepared once: read through `datasets`, checked and encoded by a batched `map` over several processes,
and stored as Arrow in the prepared-data cache (data_cache.py), which every rank of every run asking for the same
split memory-maps. The Trainer reads the Arrow rows; no rank holds the examples as Python objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import Config, PromptConfig
from .data_cache import EXAMPLES_DIRNAME, cached_build, key_of, tokenizer_fingerprint
from .errors import UserError
from .prompts import SECTIONS, PromptEncoder, prompt_length
from .records import (content_hash, duplicate_ids, field_list_problems, load_table, normalize_record,
                      record_attributes, record_line_numbers, record_location, record_problems, unreadable_message)
from .run_identity import file_sha256
from .settings import DATA_EXTENSIONS

logger = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """What happened to one split, recorded in results.json so that runs can be checked for comparability."""

    records: int
    examples: int
    dropped_too_long: int
    history_shortened: int
    ids_sha256: str
    mean_tokens: float
    max_tokens: int
    p50_tokens: int = 0
    p95_tokens: int = 0
    max_target_tokens: int = 0  # target + <end_of_turn>: the supervised positions of the longest answer


MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")  # what the Trainer and the evaluation feed the model
INT32_LIST = datasets.List(datasets.Value("int32"))
STRINGS = datasets.List(datasets.Value("string"))
# One row per example of a prepared split. group_length: the example's tokens with the FULL prompt, the same in every
# ablation, so length grouping batches the same examples together whichever sections the prompt holds. index: its
# record's position in the data file; history_items: the history items it keeps.
EXAMPLE_FEATURES = datasets.Features({
    "input_ids": INT32_LIST, "attention_mask": datasets.List(datasets.Value("int8")), "labels": INT32_LIST,
    "length": datasets.Value("int32"), "group_length": datasets.Value("int32"),
    "target_tokens": datasets.Value("int32"), "id": datasets.Value("string"), "target": datasets.Value("string"),
    "content_hash": datasets.Value("string"), "index": datasets.Value("int64"),
    "history_items": datasets.Value("int32"),
})
# What the preparation also says of every record, checked once all are prepared, then dropped.
RECORD_FEATURES = datasets.Features({
    **EXAMPLE_FEATURES, "problems": STRINGS, "dropped": datasets.Value("bool"), "shortened": datasets.Value("bool"),
    "outgrown": datasets.Value("string"), "raw_id": datasets.Value("string"),
    **{f"{section.name}_attributes": STRINGS for section in SECTIONS},
})
# Fewer records are prepared in one process: starting workers costs more than it saves.
PARALLEL_FROM_RECORDS = 20_000
MAX_WORKERS = 8


@dataclass
class Split:
    """One split's examples, memory-mapped from the prepared-data cache: `rows` has EXAMPLE_FEATURES' columns."""

    rows: datasets.Dataset
    stats: SplitStats
    path: Path  # the data file, for where each record is
    # The first record that became an example, with the history items it keeps: what --dry_run shows.
    first_record: dict
    first_history_items: int

    def __len__(self) -> int:
        return self.rows.num_rows

    @property
    def examples(self) -> datasets.Dataset:
        """The model inputs: input_ids, attention_mask, labels."""
        return self.rows.select_columns(list(MODEL_COLUMNS))

    def column(self, name: str) -> list:
        return self.rows.data.column(name).to_pylist()

    @property
    def ids(self) -> list[str]:
        return self.column("id")

    @property
    def targets(self) -> list[str]:
        return self.column("target")

    @property
    def group_lengths(self) -> np.ndarray:
        return self.rows.data.column("group_length").to_numpy()

    @property
    def locations(self) -> list[str]:
        lines = record_line_numbers(self.path)
        return [record_location(self.path, lines, index) for index in self.column("index")]


@dataclass(frozen=True)
class Preparation:
    """What each process preparing a file's records needs (it is sent to them): prepare_records' settings."""

    split: str
    path: Path
    lines: np.ndarray | None  # record_line_numbers
    csv_cells: bool
    prompt: PromptConfig  # the run's: what its examples show
    encoder: PromptEncoder


def prepare_record(rec: dict, index: int, job: Preparation) -> dict:
    """One record -> its RECORD_FEATURES row: checked, fitted on the full prompt (dropped when nothing fits, its
    history shortened when not all of it does), then encoded with the run's prompt."""
    where = record_location(job.path, job.lines, index)
    encoder = job.encoder
    row = {"problems": record_problems(rec, where, job.prompt, encoder), "dropped": False, "shortened": False,
           "outgrown": None, "raw_id": None if rec["id"] is None else str(rec["id"]), "index": index,
           "id": str(rec["id"]) if rec["id"] is not None else f"{job.split}:{index}",
           "target": rec["target"].strip() if isinstance(rec["target"], str) else "",
           "content_hash": content_hash(rec), "input_ids": [], "attention_mask": [], "labels": [], "length": 0,
           "group_length": 0, "target_tokens": 0, "history_items": 0,
           **{f"{name}_attributes": found for name, found in record_attributes(rec).items()}}
    if row["problems"]:
        return row
    target_len = len(encoder.target_ids(rec["target"]))
    if target_len >= encoder.max_length:
        row["problems"].append(f"{where}: the target alone is {target_len} tokens, which leaves no room for a prompt "
                               f"in training.max_length={encoder.max_length}. Raise max_length or shorten the target.")
        return row
    fitted = encoder.fit_full_prompt(rec, target_len)
    if fitted is None:
        row["dropped"] = True
        return row
    kept, row["group_length"] = fitted
    example = encoder.encode(rec, job.prompt, kept)
    length = len(example["input_ids"])
    row.update(example, length=length, target_tokens=length - prompt_length(example), history_items=kept,
               shortened=kept < len(rec["history"] or []))
    if length > encoder.max_length:  # longer with the run's prompt than with the full prompt it was fitted on
        row["outgrown"] = f"{where} ({length} tokens)"
    return row


def prepare_records(batch: dict[str, list], indices: list[int], job: Preparation) -> dict[str, list]:
    """Dataset.map's function: a batch of load_table rows -> RECORD_FEATURES columns."""
    rows = [prepare_record(normalize_record({k: v[j] for k, v in batch.items()}, job.csv_cells), index, job)
            for j, index in enumerate(indices)]
    return {name: [row[name] for row in rows] for name in RECORD_FEATURES}


def preparation_workers(records: int, configured: int | None) -> int:
    """data.preprocessing_num_workers, or by default one process per CPU (at most MAX_WORKERS) for large files."""
    if configured is not None:
        return configured
    return min(MAX_WORKERS, len(os.sched_getaffinity(0))) if records >= PARALLEL_FROM_RECORDS else 1


def _problems_in(prepared: datasets.Dataset, path: Path, lines: np.ndarray | None, split: str,
                 prompt: PromptConfig) -> list[str]:
    """Every record's problems, the ids used twice, and (training file) the field lists' unknown names."""
    found = prepared.data.column("problems")
    problems = [p for row in pc.filter(found, pc.greater(pc.list_value_length(found), 0)).to_pylist() for p in row]
    raw_ids = prepared.data.column("raw_id")
    counts = pc.value_counts(raw_ids.drop_null())
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        rows = np.flatnonzero(pc.is_in(raw_ids, value_set=repeated).to_numpy(zero_copy_only=False))
        problems += duplicate_ids([raw_ids[int(i)].as_py() for i in rows],
                                  [record_location(path, lines, int(i)) for i in rows])
    if split == "train":  # merge_attributes in Arrow: the distinct names in first-seen order, None where all null
        columns = {section.name: prepared.data.column(f"{section.name}_attributes") for section in SECTIONS}
        present = {name: None if column.null_count == len(column) else pc.unique(pc.list_flatten(column)).to_pylist()
                   for name, column in columns.items()}
        problems += field_list_problems(present, path, prompt)
    return problems


def prepare_split(directory: Path, path: Path, split: str, cfg: Config, encoder: PromptEncoder) -> dict:
    """Read, check, fit and encode one data file into `directory` (a cache entry being built): the examples as Arrow
    under examples/, and what the manifest holds (statistics, first record, the processes used)."""
    work = directory / "work"  # the file's Arrow copy and the map's output, removed once the examples are saved
    table = load_table(path, cfg.data.fields, cache_dir=work / "read")
    csv_cells = DATA_EXTENSIONS[path.suffix.lower()] == "csv"
    lines = record_line_numbers(path)
    workers = preparation_workers(len(table), cfg.data.preprocessing_num_workers)
    job = Preparation(split, path, lines, csv_cells, cfg.prompt, encoder)
    try:
        prepared = table.map(prepare_records, batched=True, batch_size=500, with_indices=True, fn_kwargs={"job": job},
                             num_proc=workers if workers > 1 else None, remove_columns=table.column_names,
                             features=RECORD_FEATURES, cache_file_name=str(work / "prepared.arrow"),
                             new_fingerprint=directory.name)
    except (UnicodeDecodeError, pa.ArrowException) as e:  # Arrow defers some decoding (invalid UTF-8) to here
        raise UserError(unreadable_message(path, e)) from None
    problems = _problems_in(prepared, path, lines, split, cfg.prompt)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems in {path}"] if len(problems) > 20 else [])
        raise UserError(shown)
    dropped = prepared.data.column("dropped").to_numpy()
    if dropped.all():
        raise UserError(f"{path}: no record fits in training.max_length={encoder.max_length} even without history; "
                        "raise max_length.")
    outgrown = prepared.data.column("outgrown").drop_null().to_pylist()
    if outgrown:
        raise UserError(outgrown_problem(outgrown, cfg.prompt, encoder))
    kept = prepared.select(np.flatnonzero(~dropped)).select_columns(list(EXAMPLE_FEATURES))
    kept.save_to_disk(str(directory / EXAMPLES_DIRNAME))
    examples = datasets.load_from_disk(str(directory / EXAMPLES_DIRNAME))  # its table holds the kept rows alone
    first = examples[0]
    first_record = normalize_record(table[int(first["index"])], csv_cells)
    stats = split_stats(examples, records=len(table), dropped=int(dropped.sum()),
                        shortened=int(prepared.data.column("shortened").to_numpy().sum()))
    del table, prepared, kept, examples
    shutil.rmtree(work)
    return {"split": split, "data_file": str(path), "workers": workers, "stats": dataclasses.asdict(stats),
            "first_record": first_record, "first_history_items": first["history_items"]}


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "gemma_prepared"


def build_split(path: Path, split: str, cfg: Config, encoder: PromptEncoder, cache_dir: Path | None = None) -> Split:
    """One data file as a prepared split: from the cache (data.cache_dir resolved, else default_cache_dir()) when it
    holds this file prepared with these settings (any process of any run may have built it), else prepared here and
    stored there first (data_cache.cached_build)."""
    key = key_of({"split": split, "data_sha256": file_sha256(path), "fields": dataclasses.asdict(cfg.data.fields),
                  "max_length": encoder.max_length, "prompt": dataclasses.asdict(cfg.prompt),
                  "encoder_prompt": dataclasses.asdict(encoder.prompt),
                  "fitted_on": dataclasses.asdict(encoder.full_prompt),
                  "tokenizer": tokenizer_fingerprint(encoder.tokenizer)})
    entry, manifest, built = cached_build(cache_dir or default_cache_dir(), key, lambda d: prepare_split(d, path, split, cfg, encoder))
    rows = datasets.load_from_disk(str(entry / EXAMPLES_DIRNAME))
    logger.info("%s: %s (%s)", split, f"prepared in {manifest['built_s']} s with {manifest['workers']} process(es)"
                if built else "prepared data from the cache", entry)
    return Split(rows, SplitStats(**manifest["stats"]), path, manifest["first_record"],
                 manifest["first_history_items"])


def outgrown_problem(too_long: list[str], prompt: PromptConfig, encoder: PromptEncoder) -> str:
    """Examples that fit with config.json's full prompt but not with the run's: its texts are longer (an ablation
    profile's or a --set's instruction or system text, thinking) or its attributes tokenize longer in their order."""
    study = encoder.full_prompt
    changed = [f"prompt.{k}" for k in ("system", "instruction", "enable_thinking", "profile_fields", "history_fields",
                                       "history_selection") if getattr(prompt, k) != getattr(study, k)]
    return (f"{len(too_long)} examples are longer than training.max_length={encoder.max_length} with this run's "
            f"prompt (e.g. {', '.join(too_long[:3])}), though they fit with config.json's full prompt. Which examples "
            "are kept is decided on config.json's prompt so that every ablation keeps the same ones; this run's "
            f"{' and '.join(changed) or 'prompt'} (from the ablation profile or --set) makes them longer. Give "
            "config.json the longest system text and instruction of the study, or raise training.max_length.")


def _shared(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """The values of `a` that are also in `b` (Arrow's hash join: no Python set of a large split's values)."""
    return pc.filter(a, pc.is_in(a, value_set=b.combine_chunks()))


def overlap(splits: dict[str, Split]) -> dict[str, dict]:
    """What the splits share: ids in two splits, and examples whose whole content (profile, history, query and target)
    appears in both train and an evaluation split. Either makes an evaluation measure memory, not skill."""
    found: dict[str, dict] = {}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(_shared(splits[a].rows.data.column("id"), splits[b].rows.data.column("id"))
                                .to_pylist()))
            if shared:
                found[f"{a}/{b}"] = {"shared_ids": len(shared), "examples": shared[:3]}
    train = splits.get("train")
    for name in ("validation", "test"):
        if train is None or name not in splits:
            continue
        rows = splits[name].rows.data
        hashes = _shared(train.rows.data.column("content_hash"), rows.column("content_hash")).unique()
        # one id per identical content: the last example of the split that has it
        last = {h: record_id for h, record_id in zip(rows.column("content_hash").to_pylist(),
                                                     rows.column("id").to_pylist(), strict=True)}
        same = [last[h] for h in hashes.to_pylist()]
        if same:
            found.setdefault(f"train/{name}", {}).update(identical_examples=len(same), identical=sorted(same)[:3])
    return found


def overlap_problems(found: dict[str, dict]) -> list[str]:
    problems = []
    for pair, what in found.items():
        if what.get("shared_ids"):
            problems.append(f"data: {what['shared_ids']} ids are in both the {pair.replace('/', ' and the ')} "
                            f"file (e.g. {', '.join(what['examples'])}).")
        if what.get("identical_examples"):
            problems.append(f"data: {what['identical_examples']} {pair.split('/')[1]} examples are identical to "
                            f"training examples (profile, history, query and target; e.g. {', '.join(what['identical'])}).")
    if problems:
        problems.append("A model evaluated on what it trained on is measured on memory. Split the data so that no "
                        "example is in two files, or set data.allow_overlap to true to go on (recorded in "
                        "results.json).")
    return problems


def split_stats(examples: datasets.Dataset, records: int, dropped: int, shortened: int) -> SplitStats:
    """The statistics of a split's EXAMPLE_FEATURES rows; the ids hash is sha256 over the ids joined by newlines,
    taken in chunks so that a large split is never joined in memory."""
    lengths = np.sort(examples.data.column("length").to_numpy())
    digest, first = hashlib.sha256(), True
    for chunk in examples.data.column("id").chunks:
        for record_id in chunk.to_pylist():
            digest.update((record_id if first else "\n" + record_id).encode())
            first = False
    return SplitStats(
        records=records, examples=len(lengths), dropped_too_long=dropped, history_shortened=shortened,
        ids_sha256=digest.hexdigest(), mean_tokens=round(float(lengths.mean()), 2), max_tokens=int(lengths[-1]),
        p50_tokens=int(lengths[len(lengths) // 2]), p95_tokens=int(lengths[min(len(lengths) - 1,
                                                                               int(0.95 * len(lengths)))]),
        max_target_tokens=int(pc.max(examples.data.column("target_tokens")).as_py()),
    )
