"""Data files -> records: reading a JSONL/JSON/CSV/Parquet file through `datasets`, where each record is (file and
line), and what can be wrong with one record or a whole file's records, said so that the user can fix it."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import datasets
import numpy as np

from .config import FieldNames, PromptConfig
from .errors import UserError
from .prompts import SECTIONS, PromptEncoder, included, shown_fields
from .settings import DATA_EXTENSIONS

RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(FieldNames))


def load_table(path: Path, fields: FieldNames, cache_dir: Path | None = None) -> datasets.Dataset:
    """A JSONL/JSON/CSV/Parquet file through `datasets`, its columns renamed to the canonical field names (a field
    the file lacks stays absent). Arrow files go into `cache_dir`, else the table is held in memory. CSV cells are all
    read as text ("4" stays "4", not 4.0)."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are re-explained below, once
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    if builder != "parquet" and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise UserError(f"{path}: the file holds no records.")  # datasets' own error for this is cryptic
    where = {"cache_dir": str(cache_dir)} if cache_dir is not None else {"keep_in_memory": True}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train",
                                      features=_csv_as_text(path) if builder == "csv" else None, **where)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the line
        raise UserError(unreadable_message(path, e)) from None
    if len(table) == 0:
        raise UserError(f"{path}: the file holds no records.")
    rename = {getattr(fields, name): name for name in RECORD_FIELDS if getattr(fields, name) in table.column_names}
    return table.select_columns(list(rename)).rename_columns(rename)


def normalize_record(row: dict, csv_cells: bool) -> dict:
    """A row of load_table as a record with every canonical field. A number as target (a rating) becomes its text, as
    the model writes it: 4 (or 4.0) -> "4", 3.5 -> "3.5". CSV profile / history cells that hold JSON objects or
    lists are decoded."""
    rec = {name: row.get(name) for name in RECORD_FIELDS}
    target = rec["target"]
    if isinstance(target, (int, float)) and not isinstance(target, bool):  # Arrow may have made 4 into 4.0
        rec["target"] = str(int(target)) if float(target).is_integer() else repr(float(target))
    if csv_cells:
        for key in (section.name for section in SECTIONS):
            if isinstance(rec[key], str) and rec[key].lstrip()[:1] in ("{", "["):
                try:
                    rec[key] = json.loads(rec[key])
                except json.JSONDecodeError:
                    pass
    return rec


def read_records(path: Path, fields: FieldNames) -> list[dict]:
    """Every record of a data file as a plain dict keyed by the canonical names (load_table, normalize_record)."""
    table = load_table(path, fields)
    try:
        rows = table.to_list()  # Arrow defers some decoding (invalid UTF-8) to here
    except Exception as e:  # noqa: BLE001
        raise UserError(unreadable_message(path, e)) from None
    csv_cells = DATA_EXTENSIONS[path.suffix.lower()] == "csv"
    return [normalize_record(row, csv_cells) for row in rows]


def _csv_as_text(path: Path) -> datasets.Features:
    """Every column of a CSV file as text: left to itself the reader makes numbers of "4" and "007"."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def record_line_numbers(path: Path) -> np.ndarray | None:
    """The line of each record of a JSONL file (blank lines, which the reader skips, counted), read as a stream;
    None for the other formats, whose records are numbered."""
    if path.suffix.lower() != ".jsonl":
        return None
    with open(path, "rb") as f:
        return np.fromiter((n for n, line in enumerate(f, 1) if line.strip()), dtype=np.int64)


def record_location(path: Path, lines: np.ndarray | None, index: int) -> str:
    """Where record `index` (from 0) is, as a person finds it: "<file>: line N" or "<file>: record N"."""
    if lines is not None and index < len(lines):
        return f"{path}: line {lines[index]}"
    return f"{path}: record {index + 1}"


def record_locations(path: Path, count: int) -> list[str]:
    lines = record_line_numbers(path)
    return [record_location(path, lines, i) for i in range(count)]


def unreadable_message(path: Path, error: Exception) -> str:
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


def check_record(rec: dict, where: str, prompt: PromptConfig) -> list[str]:
    """Type checks for one record (`where`: its file and line or record number); only the sections this ablation
    shows are required."""
    problems = []
    for key in ("query", "target"):
        if not isinstance(rec[key], str):
            what = "is missing" if rec[key] is None else f"must be a string, got {type(rec[key]).__name__}"
            problems.append(f"{where}: {key} {what}.")
    if isinstance(rec["target"], str) and not rec["target"].strip():
        problems.append(f"{where}: target is empty; every example needs an answer to learn (remove the record or "
                        "fill in its target).")
    for section in SECTIONS:
        value = rec[section.name]
        if value is None:
            if included(prompt, section):
                problems.append(f"{where}: {section.name} is missing but this ablation includes the {section.name}.")
        elif (problem := section.problem(value)) is not None:
            problems.append(f"{where}: {section.name} {problem}.")
        elif shown_fields(prompt, section) is not None:
            # Checked whether or not this ablation shows the section, so that every ablation of a study agrees.
            strings = [i for i, v in enumerate(value if section.is_list else [value], 1) if isinstance(v, str)]
            if strings:
                what = (f"history item {', '.join(map(str, strings[:5]))}{' ...' if len(strings) > 5 else ''} is"
                        if section.is_list else f"{section.name} is")
                problems.append(f"{where}: {what} a string, but prompt.{section.name}_fields selects attributes of "
                                f"objects; give it as an object, or set prompt.{section.name}_fields to null.")
    return problems


def record_attributes(rec: dict) -> dict[str, list[str] | None]:
    """For each section, the attributes its objects (the profile, or each history item) have with a value, in order;
    None when the record has no object there (Arrow gives an attribute a record lacks null, so null is no attribute)."""
    found = {}
    for section in SECTIONS:
        value = rec[section.name]
        objects = [obj for obj in (value if isinstance(value, list) else [value]) if isinstance(obj, dict)]
        found[section.name] = (list(dict.fromkeys(k for obj in objects for k, v in obj.items() if v is not None))
                               if objects else None)
    return found


def merge_attributes(parts: Iterable[dict[str, list[str] | None]]) -> dict[str, list[str] | None]:
    """record_attributes of many records as one: every attribute in first-seen order; None where no record had an
    object."""
    merged: dict[str, dict | None] = {section.name: None for section in SECTIONS}
    for part in parts:
        for name, attributes in part.items():
            if attributes is not None:
                merged[name] = merged[name] or {}
                merged[name].update(dict.fromkeys(attributes))
    return {name: None if seen is None else list(seen) for name, seen in merged.items()}


def present_attributes(records: Iterable[dict]) -> dict[str, list[str] | None]:
    return merge_attributes(map(record_attributes, records))


def field_list_problems(present: dict[str, list[str] | None], path: Path, prompt: PromptConfig) -> list[str]:
    """Each name in prompt.<section>_fields must be an attribute that some record of the (training) file has, with a
    value (`present`: present_attributes of its records): a misspelt name would otherwise show nothing, silently, in
    every example. A name that only some records have is shown where they have it."""
    problems = []
    for section in SECTIONS:
        names, have = shown_fields(prompt, section), present[section.name]
        if names is None or have is None:  # no object at all: check_record has said why (strings, or missing)
            continue
        what = "history item" if section.is_list else section.name
        for name in names:
            if name not in have:
                close = difflib.get_close_matches(name, have, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                problems.append(f"{path}: prompt.{section.name}_fields: no {what} in this file has an attribute "
                                f"{name!r}.{hint} Its {what}s have: {', '.join(have)}.")
    return problems


def duplicate_ids(ids: list[str | None], locations: list[str]) -> list[str]:
    """One problem per id that more than one record of a split has, naming where each is."""
    seen: dict[str, list[str]] = {}
    for record_id, where in zip(ids, locations, strict=True):
        if record_id is not None:
            seen.setdefault(str(record_id), []).append(where.rpartition(": ")[2])
    return [f"{locations[0].rpartition(': ')[0]}: id {record_id!r} is used by {len(places)} records ("
            f"{', '.join(places[:5])}{', ...' if len(places) > 5 else ''}); ids must be unique within a split, so "
            "that predictions and comparisons can be matched by id." for record_id, places in seen.items()
            if len(places) > 1]




def record_problems(rec: dict, where: str, prompt: PromptConfig, encoder: PromptEncoder) -> list[str]:
    """Everything wrong with one record: types, empty target, control tokens in the text (duplicate ids are found
    over the whole file, by duplicate_ids)."""
    problems = check_record(rec, where, prompt)
    for key in RECORD_FIELDS:
        value = rec[key]
        text = value if isinstance(value, str) or value is None else json.dumps(value, ensure_ascii=False)
        if key != "id" and text and (tokens := encoder.control_tokens_in(text)):
            problems.append(f"{where}: {key} holds {', '.join(map(repr, tokens))}, the tokenizer's control "
                            "token text: the model would read it as markup, not as the user's words. Remove or "
                            "rewrite it in the data (e.g. 'end of turn').")
    return problems


def content_hash(record: dict) -> str:
    """What a record says, without its id: two records with equal hashes are the same example."""
    content = {key: record[key] for key in RECORD_FIELDS if key != "id"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
