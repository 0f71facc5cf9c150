"""Data files -> checked records -> encoded splits (token ids, labels, and what happened to each split).

Every split keeps the same examples whatever the ablation: which records fit in max_length, and how many history
items they keep, is decided on the full prompt (prompts.PromptEncoder.fit_full_prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .config import Config, FieldNames, PromptConfig
from .errors import UserError
from .prompts import SECTIONS, PromptEncoder, included, prompt_length
from .settings import DATA_EXTENSIONS

RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(FieldNames))


def read_records(path: Path, fields: FieldNames) -> list[dict]:
    """Read a JSONL/JSON/CSV/Parquet file through `datasets` and return plain dicts keyed by the canonical names."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are re-explained below, once
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    if builder != "parquet" and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise UserError(f"{path}: the file holds no records.")  # datasets' own error for this is cryptic
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
        rows = ds.to_list()  # Arrow defers some decoding (invalid UTF-8) to here
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the line
        raise UserError(_explain_unreadable(path, e)) from None
    if not rows:
        raise UserError(f"{path}: the file holds no records.")
    rename = {getattr(fields, name): name for name in RECORD_FIELDS}
    records = [{canon: row.get(col) for col, canon in rename.items()} for row in rows]
    if builder == "csv":  # CSV cells are text: the sections may hold JSON objects and lists
        for rec in records:
            for key in (section.name for section in SECTIONS):
                if isinstance(rec[key], str) and rec[key].lstrip()[:1] in ("{", "["):
                    try:
                        rec[key] = json.loads(rec[key])
                    except json.JSONDecodeError:
                        pass
    return records


def _explain_unreadable(path: Path, error: Exception) -> str:
    """Find the line that broke the reader, for line-oriented JSON, or fall back to the reader's own message."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"{path}: line {line}: not valid UTF-8 (byte {e.start}). Save the file as UTF-8."
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix or remove that line."
            if not isinstance(obj, dict):
                return f"{path}: line {lineno}: expected a JSON object per line."
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return (f"{path}: could not be read as {DATA_EXTENSIONS[path.suffix.lower()]} ({message}). A field must have "
            "the same type in every record (e.g. profile always an object, or always a string).")


def check_record(rec: dict, index: int, path: Path, prompt: PromptConfig) -> list[str]:
    """Type checks for one record; only the sections this ablation shows are required. Record numbers start at 1."""
    where, problems = f"{path}: record {index + 1}", []
    for key in ("query", "target"):
        if not isinstance(rec[key], str):
            what = "is missing" if rec[key] is None else f"must be a string, got {type(rec[key]).__name__}"
            problems.append(f"{where}: {key} {what}.")
    for section in SECTIONS:
        value = rec[section.name]
        if value is None:
            if included(prompt, section):
                problems.append(f"{where}: {section.name} is missing but this ablation includes the {section.name}.")
        elif (problem := section.problem(value)) is not None:
            problems.append(f"{where}: {section.name} {problem}.")
    return problems


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


@dataclass
class Split:
    examples: list[dict]  # input_ids, attention_mask, labels
    ids: list[str]
    targets: list[str]
    stats: SplitStats
    # Tokens of each example with the FULL prompt: the same in every ablation, so length grouping batches the same
    # examples together whichever sections the prompt holds, and runs stay comparable.
    group_lengths: list[int] = field(default_factory=list)
    # The first record that became an example, with the history items it keeps: what --dry_run shows.
    first_record: dict = field(default_factory=dict)
    first_history_items: int = 0


def build_split(path: Path, split: str, cfg: Config, encoder: PromptEncoder) -> Split:
    """Read, check, truncate and encode one data file."""
    records = read_records(path, cfg.data.fields)
    problems = [p for i, rec in enumerate(records) for p in check_record(rec, i, path, cfg.prompt)]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems in {path}"] if len(problems) > 20 else [])
        raise UserError(shown)
    examples, ids, targets, group_lengths = [], [], [], []
    first: tuple[dict, int] | None = None
    shortened = dropped = 0
    for i, rec in enumerate(records):
        target_len = len(encoder.target_ids(rec["target"]))
        if target_len >= encoder.max_length:
            raise UserError(f"{path}: record {i + 1}: the target alone is {target_len} tokens, which leaves no room "
                            f"for a prompt in training.max_length={encoder.max_length}. Raise max_length or shorten "
                            "the target.")
        fitted = encoder.fit_full_prompt(rec, target_len)
        if fitted is None:
            dropped += 1
            continue
        kept, full_length = fitted
        first = first or (rec, kept)
        group_lengths.append(full_length)
        shortened += kept < len(rec["history"] or [])
        examples.append(encoder.encode(rec, cfg.prompt, kept))
        ids.append(str(rec["id"]) if rec["id"] is not None else f"{split}:{i}")
        targets.append(rec["target"].strip())
    if first is None:
        raise UserError(f"{path}: no record fits in training.max_length={encoder.max_length} even without history; "
                        "raise max_length.")
    stats = split_stats(examples, ids, len(records), dropped, shortened)
    return Split(examples, ids, targets, stats, group_lengths, *first)


def split_stats(examples: list[dict], ids: list[str], records: int, dropped: int, shortened: int) -> SplitStats:
    lengths = sorted(len(e["input_ids"]) for e in examples)
    return SplitStats(
        records=records, examples=len(examples), dropped_too_long=dropped, history_shortened=shortened,
        ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        mean_tokens=round(sum(lengths) / len(lengths), 2), max_tokens=lengths[-1],
        p50_tokens=lengths[len(lengths) // 2], p95_tokens=lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        max_target_tokens=max(len(e["labels"]) - prompt_length(e) for e in examples),
    )
