"""Data files -> checked records -> encoded splits (token ids, labels, and what happened to each split).

Every split keeps the same examples whatever the ablation: which records fit in max_length, and how many history
items they keep, is decided on config.json's full prompt (prompts.PromptEncoder.fit_full_prompt).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .config import MAX_AUTO_CHOICES, Config, FieldNames, PromptConfig
from .errors import UserError
from .prompts import SECTIONS, PromptEncoder, included, prompt_length, shown_fields
from .settings import DATA_EXTENSIONS

logger = logging.getLogger(__name__)

RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(FieldNames))


def read_records(path: Path, fields: FieldNames) -> list[dict]:
    """Read a JSONL/JSON/CSV/Parquet file through `datasets` and return plain dicts keyed by the canonical names.
    A number as target (a rating) becomes its text, as the model writes it: 4 (or 4.0) -> "4", 3.5 -> "3.5". CSV
    cells are all read as text ("4" stays "4", not 4.0), and profile / history cells that hold JSON objects or lists
    are decoded."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are re-explained below, once
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    if builder != "parquet" and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise UserError(f"{path}: the file holds no records.")  # datasets' own error for this is cryptic
    try:
        features = _csv_as_text(path) if builder == "csv" else None
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True,
                                   features=features)
        rows = ds.to_list()  # Arrow defers some decoding (invalid UTF-8) to here
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the line
        raise UserError(_explain_unreadable(path, e)) from None
    if not rows:
        raise UserError(f"{path}: the file holds no records.")
    rename = {getattr(fields, name): name for name in RECORD_FIELDS}
    records = [{canon: row.get(col) for col, canon in rename.items()} for row in rows]
    for rec in records:
        target = rec["target"]
        if isinstance(target, (int, float)) and not isinstance(target, bool):  # Arrow may have made 4 into 4.0
            rec["target"] = str(int(target)) if float(target).is_integer() else repr(float(target))
        if builder == "csv":
            for key in (section.name for section in SECTIONS):
                if isinstance(rec[key], str) and rec[key].lstrip()[:1] in ("{", "["):
                    try:
                        rec[key] = json.loads(rec[key])
                    except json.JSONDecodeError:
                        pass
    return records


def _csv_as_text(path: Path) -> datasets.Features:
    """Every column of a CSV file as text: left to itself the reader makes numbers of "4" and "007"."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({column: datasets.Value("string") for column in header})


def record_locations(path: Path, count: int) -> list[str]:
    """Where each record is, as a person finds it: "<file>: line N" in a JSONL file (blank lines, which the reader
    skips, counted), "<file>: record N" in the other formats."""
    if path.suffix.lower() != ".jsonl":
        return [f"{path}: record {i}" for i in range(1, count + 1)]
    lines = [n for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    return [f"{path}: line {n}" for n in lines[:count]] + [f"{path}: record {i}" for i in range(len(lines) + 1,
                                                                                                   count + 1)]


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


def section_objects(records: list[dict], section_name: str) -> list[dict]:
    """The objects a section's attributes are read from, in every record: the profile, or each history item."""
    objects = []
    for rec in records:
        value = rec[section_name]
        for obj in value if isinstance(value, list) else [value]:
            if isinstance(obj, dict):
                objects.append(obj)
    return objects


def attribute_names(objects: list[dict]) -> list[str]:
    """Every attribute that some object has with a value, in first-seen order (Arrow gives an attribute a record
    lacks null, so null is no attribute)."""
    return list(dict.fromkeys(k for obj in objects for k, v in obj.items() if v is not None))


def field_list_problems(records: list[dict], path: Path, prompt: PromptConfig) -> list[str]:
    """Each name in prompt.<section>_fields must be an attribute that some record of the (training) file has, with a
    value: a misspelt name would otherwise show nothing, silently, in every example. A name that only some records
    have is shown where they have it (Arrow gives the others null, which renders as absent)."""
    problems = []
    for section in SECTIONS:
        names = shown_fields(prompt, section)
        objects = section_objects(records, section.name)
        if names is None or not objects:  # no object at all: check_record has said why (strings, or missing)
            continue
        present = attribute_names(objects)
        what = "history item" if section.is_list else section.name
        for name in names:
            if name not in present:
                close = difflib.get_close_matches(name, present, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                problems.append(f"{path}: prompt.{section.name}_fields: no {what} in this file has an attribute "
                                f"{name!r}.{hint} Its {what}s have: {', '.join(present)}.")
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
    content_hashes: list[str] = field(default_factory=list)  # content_hash of each example's record
    locations: list[str] = field(default_factory=list)  # where each example's record is (file and line)


def record_problems(records: list[dict], locations: list[str], prompt: PromptConfig,
                    encoder: PromptEncoder) -> list[str]:
    """Everything wrong with a file's records: types, empty targets, control tokens in the text, duplicate ids."""
    problems = []
    for rec, where in zip(records, locations, strict=True):
        problems += check_record(rec, where, prompt)
        for key in RECORD_FIELDS:
            value = rec[key]
            text = value if isinstance(value, str) or value is None else json.dumps(value, ensure_ascii=False)
            if key != "id" and text and (tokens := encoder.control_tokens_in(text)):
                problems.append(f"{where}: {key} holds {', '.join(map(repr, tokens))}, the tokenizer's control "
                                "token text: the model would read it as markup, not as the user's words. Remove or "
                                "rewrite it in the data (e.g. 'end of turn').")
    return problems + duplicate_ids([rec["id"] for rec in records], locations)


def content_hash(record: dict) -> str:
    """What a record says, without its id: two records with equal hashes are the same example."""
    content = {key: record[key] for key in RECORD_FIELDS if key != "id"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def build_split(path: Path, split: str, cfg: Config, encoder: PromptEncoder) -> Split:
    """Read, check, truncate and encode one data file."""
    records = read_records(path, cfg.data.fields)
    locations = record_locations(path, len(records))
    problems = record_problems(records, locations, cfg.prompt, encoder)
    if split == "train":
        problems += field_list_problems(records, path, cfg.prompt)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems in {path}"] if len(problems) > 20 else [])
        raise UserError(shown)
    examples, ids, targets, group_lengths, hashes, kept_at = [], [], [], [], [], []
    first: tuple[dict, int] | None = None
    shortened = dropped = 0
    too_long: list[str] = []  # longer with the run's prompt than with the full prompt they were fitted on
    for i, rec in enumerate(records):
        target_len = len(encoder.target_ids(rec["target"]))
        if target_len >= encoder.max_length:
            raise UserError(f"{locations[i]}: the target alone is {target_len} tokens, which leaves no room for a "
                            f"prompt in training.max_length={encoder.max_length}. Raise max_length or shorten the "
                            "target.")
        fitted = encoder.fit_full_prompt(rec, target_len)
        if fitted is None:
            dropped += 1
            continue
        kept, full_length = fitted
        first = first or (rec, kept)
        group_lengths.append(full_length)
        shortened += kept < len(rec["history"] or [])
        examples.append(encoder.encode(rec, cfg.prompt, kept))
        if len(examples[-1]["input_ids"]) > encoder.max_length:
            too_long.append(f"{locations[i]} ({len(examples[-1]['input_ids'])} tokens)")
        ids.append(str(rec["id"]) if rec["id"] is not None else f"{split}:{i}")
        targets.append(rec["target"].strip())
        hashes.append(content_hash(rec))
        kept_at.append(locations[i])
    if first is None:
        raise UserError(f"{path}: no record fits in training.max_length={encoder.max_length} even without history; "
                        "raise max_length.")
    if too_long:
        raise UserError(outgrown_problem(too_long, cfg.prompt, encoder))
    stats = split_stats(examples, ids, len(records), dropped, shortened)
    return Split(examples, ids, targets, stats, group_lengths, *first, content_hashes=hashes, locations=kept_at)


@dataclass(frozen=True)
class AnswerChoices:
    """The closed answer set of the test evaluation (evaluation.answer_choices resolved), and where it came from."""

    choices: list[str] | None  # None: free generation
    source: str  # "config.json", or what "auto" found

    def record(self) -> dict:
        """results.json's test.answer_choices."""
        return {"choices": self.choices, "source": self.source}


def _choice_order(choice: str) -> tuple:
    """Numbers by value (a rating 1-5), other answers alphabetically ("no" before "yes": the second of two choices,
    yes, is AUC's positive class)."""
    number = _as_number(choice)
    return (0, number, choice) if number is not None else (1, 0.0, choice)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def resolve_answer_choices(setting: str | list[str] | None, train_targets: list[str] | None,
                           test: Split | None) -> AnswerChoices | None:
    """evaluation.answer_choices -> the choices the test evaluation scores, checked before the model loads: every test
    target must be one of them (an error names each target's file and line otherwise). "auto": the distinct
    training targets, ordered (numbers by value, else alphabetically), when there are at most MAX_AUTO_CHOICES of
    them; else free generation. None when there is no test file."""
    if test is None:
        return None
    if setting is None:
        return AnswerChoices(None, "evaluation.answer_choices is null: free generation")
    if setting == "auto":
        distinct = sorted(set(train_targets or []), key=_choice_order)
        if len(distinct) > MAX_AUTO_CHOICES:
            return AnswerChoices(None, f"auto: {len(distinct)} distinct training targets, more than "
                                       f"{MAX_AUTO_CHOICES}: free generation")
        answers = AnswerChoices(distinct, f"auto: the {len(distinct)} distinct training targets")
        fix = ("these targets are not among the training targets that evaluation.answer_choices \"auto\" "
               "found; list the choices in config.json, or set answer_choices to null to generate answers")
    else:
        answers = AnswerChoices(list(setting), "config.json")
        fix = "add these answers to evaluation.answer_choices in config.json, or fix the targets"
    known = set(answers.choices)
    missing = [f"{where}: target {target!r} is not one of the answer choices"
               for where, target in zip(test.locations, test.targets, strict=True) if target not in known]
    if missing:
        shown = missing[:10] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else [])
        raise UserError([*shown, f"{fix} ({', '.join(map(repr, answers.choices[:10]))}"
                                 f"{', ...' if len(answers.choices) > 10 else ''})."])
    return answers


def answer_choices_for(cfg: Config, train_file: Path, test: Split | None) -> AnswerChoices | None:
    """evaluation.answer_choices resolved against the data ("auto": the training file's distinct targets) and checked
    against the test targets (resolve_answer_choices), logged; None without a test file."""
    setting, train_targets = cfg.evaluation.answer_choices, None
    if setting == "auto" and test is not None:
        train_targets = [r["target"].strip() for r in read_records(train_file, cfg.data.fields)
                         if isinstance(r["target"], str) and r["target"].strip()]
    answers = resolve_answer_choices(setting, train_targets, test)
    if setting is not None and answers is not None:
        logger.info("Answer choices (%s): %s", answers.source,
                    "free generation" if answers.choices is None else ", ".join(map(repr, answers.choices)))
    return answers


def outgrown_problem(too_long: list[str], prompt: PromptConfig, encoder: PromptEncoder) -> str:
    """Examples that fit with config.json's full prompt but not with the run's: its texts are longer (an ablation
    profile's or a --set's instruction or system text, thinking) or its attributes tokenize longer in their order."""
    study = encoder.full_prompt
    changed = [f"prompt.{k}" for k in ("system", "instruction", "enable_thinking", "profile_fields", "history_fields")
               if getattr(prompt, k) != getattr(study, k)]
    return (f"{len(too_long)} examples are longer than training.max_length={encoder.max_length} with this run's "
            f"prompt (e.g. {', '.join(too_long[:3])}), though they fit with config.json's full prompt. Which examples "
            "are kept is decided on config.json's prompt so that every ablation keeps the same ones; this run's "
            f"{' and '.join(changed) or 'prompt'} (from the ablation profile or --set) makes them longer. Give "
            "config.json the longest system text and instruction of the study, or raise training.max_length.")


def overlap(splits: dict[str, Split]) -> dict[str, dict]:
    """What the splits share: ids in two splits, and examples whose whole content (profile, history, query and target)
    appears in both train and an evaluation split. Either makes an evaluation measure memory, not skill."""
    found: dict[str, dict] = {}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(splits[a].ids) & set(splits[b].ids))
            if shared:
                found[f"{a}/{b}"] = {"shared_ids": len(shared), "examples": shared[:3]}
    train = splits.get("train")
    for name in ("validation", "test"):
        if train is None or name not in splits:
            continue
        positions = {h: k for k, h in enumerate(splits[name].content_hashes)}
        same = [splits[name].ids[positions[h]] for h in set(train.content_hashes) if h in positions]
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


def split_stats(examples: list[dict], ids: list[str], records: int, dropped: int, shortened: int) -> SplitStats:
    lengths = sorted(len(e["input_ids"]) for e in examples)
    return SplitStats(
        records=records, examples=len(examples), dropped_too_long=dropped, history_shortened=shortened,
        ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        mean_tokens=round(sum(lengths) / len(lengths), 2), max_tokens=lengths[-1],
        p50_tokens=lengths[len(lengths) // 2], p95_tokens=lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        max_target_tokens=max(len(e["labels"]) - prompt_length(e) for e in examples),
    )
