#!/usr/bin/env python
"""Convert a LaMP task (https://lamp-benchmark.github.io), as you downloaded it, into this project's records.

Usage (from the repository root; download the task's files yourself, see below):

    # a folder with LaMP's names: train_questions.json, train_outputs.json, dev_questions.json, dev_outputs.json
    # (directly in it, or in its train/ and dev/ sub-folders as on LaMP's download server)
    python Gemma/convert_lamp.py --lamp_dir ~/data/LaMP_3 --output_dir Gemma/data/lamp3

    # or each file named
    python Gemma/convert_lamp.py --train_questions T_Q.json --train_outputs T_O.json \\
        --test_questions D_Q.json --test_outputs D_O.json --output_dir Gemma/data/lamp3 \\
        [--validation_questions V_Q.json --validation_outputs V_O.json]
    # options: [--history_items 20] [--validation_size 500] [--overwrite]

LaMP's files, as its code reads them (LaMP-Benchmark/LaMP: data/datasets.py, utils/merge_with_rank.py,
rank_profiles.py): ``*_questions.json`` is a JSON list of ``{"id", "input", "profile": [document, ...]}``, each
document an object with an ``id``, usually a ``date``, and the task's text fields (LaMP-1 and 5: title, abstract;
LaMP-2: description, tag; LaMP-3: text, score; LaMP-4: title, text; LaMP-7: text); ``*_outputs.json`` is
``{"task": "LaMP_3", "golds": [{"id", "output"}, ...]}``. Which document fields each task has was read from that
code, not from the data; the converter does not depend on it (every field but two is kept, below).

Split mapping. LaMP's test outputs are hidden, so its dev split is our test split:
- train  <- LaMP train, less the validation questions (below);
- validation <- --validation_questions/--validation_outputs when given, else --validation_size train questions
  (default 500), chosen by a hash of their id: the same ones on every run, whatever the file's order;
- test <- LaMP dev (or --test_questions/--test_outputs).
Not checked here (no data to look at): whether one LaMP user can have several train questions, which would then
be split between our train and validation; the held-out questions themselves are never trained on.

One record per question: ``id`` is LaMP's id (so predictions.jsonl matches LaMP's gold files), ``query`` is the
question's ``input``, ``target`` its gold ``output``, ``history`` the user's profile documents, oldest first, at
most --history_items (default 20) of them, the most recent kept. Documents are ordered by ``date`` when every one
has a date of the form YYYY, YYYY-MM or YYYY-MM-DD (as LaMP's recency ranker reads them), else kept in file order.
Each document keeps every field except ``id`` (a number that means nothing to the model) and ``date`` (its order
already says it), with every value written as text (``score: 5`` reads the same; one type per field keeps the
JSON reader happy). There is no ``profile``: LaMP has no demographics, so run the ``history_only`` and
``query_only`` ablations (the others refuse records without a profile). LaMP's licence (CC BY-NC-SA 4.0, and each
source data set's own) is why this project ships the converter and never the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError, positive_int
from finetune.outputs import SPLIT_FILES, check_split_files, write_splits

DROPPED_FIELDS = ("id", "date")
DEFAULT_VALIDATION_SIZE = 500
# LaMP's split behind each of ours (its dev is our test): its file names' prefix and its server's sub-folder.
LAMP_NAMES = {"train": "train", "test": "dev"}


@dataclass(frozen=True)
class SplitFiles:
    questions: Path
    outputs: Path


# ----------------------------------------------------------------------------------------------------------------------
# Reading LaMP's files
# ----------------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); LaMP's files are UTF-8 JSON.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None


def read_questions(path: Path) -> list[dict]:
    """The questions, checked: a list of objects, each with an id, a text `input` and a `profile` list of objects."""
    questions = read_json(path)
    if not isinstance(questions, list):
        raise UserError(f"{path}: expected a JSON list of questions ({{\"id\", \"input\", \"profile\"}}), got "
                        f"{type(questions).__name__}; is this a *_questions.json file?")
    problems = []
    for number, q in enumerate(questions, 1):
        where = f"{path}: question {number}"
        if not isinstance(q, dict):
            problems.append(f"{where}: expected an object, got {type(q).__name__}.")
            continue
        where += f" (id {q.get('id')!r})"
        if not isinstance(q.get("id"), (str, int)) or isinstance(q.get("id"), bool):
            problems.append(f"{where}: needs an id (text or number).")
        if not isinstance(q.get("input"), str) or not q["input"].strip():
            problems.append(f"{where}: needs a non-empty text input.")
        profile = q.get("profile")
        if not isinstance(profile, list) or not all(isinstance(doc, dict) for doc in profile):
            problems.append(f"{where}: profile must be a list of documents (objects).")
    if problems:
        more = len(problems) - 20
        raise UserError(problems[:20] + ([f"... and {more} more problems in {path}"] if more > 0 else []))
    return questions


def read_golds(path: Path) -> tuple[str | None, dict[str, str]]:
    """(task name, id -> gold output) from an *_outputs.json file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise UserError(f"{path}: expected {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}, ...]}}; is this an "
                        "*_outputs.json file?")
    golds: dict[str, str] = {}
    for number, gold in enumerate(data["golds"], 1):
        output = gold.get("output") if isinstance(gold, dict) else None
        if isinstance(output, int) and not isinstance(output, bool):
            output = str(output)  # a score as a number: the same text, and one type for the JSON reader
        if not isinstance(output, str) or not output.strip() or "id" not in gold:
            raise UserError(f"{path}: gold {number}: expected {{\"id\": ..., \"output\": \"non-empty text\"}}.")
        if str(gold["id"]) in golds:
            raise UserError(f"{path}: gold {number}: id {gold['id']!r} has a gold output already.")
        golds[str(gold["id"])] = output
    return data.get("task"), golds


# ----------------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------------


def date_key(date: Any) -> tuple[int, ...] | None:
    """LaMP's dates (2011, "2011-05", "2011-05-03") as a sortable tuple, or None for anything else."""
    try:
        return tuple(int(part) for part in str(date).split("-"))
    except ValueError:
        return None


def history_of(profile: list[dict], history_items: int) -> list[dict]:
    """The `history_items` most recent documents, oldest first, without id and date, values as text."""
    keys = [date_key(doc.get("date")) for doc in profile]
    if profile and all(key is not None for key in keys):
        profile = [doc for _, _, doc in sorted(zip(keys, range(len(profile)), profile, strict=True))]
    items = [{k: str(v) for k, v in doc.items() if k not in DROPPED_FIELDS and v is not None} for doc in profile]
    return [item for item in items if item][-history_items:]


def make_records(files: SplitFiles, history_items: int) -> tuple[str | None, list[dict]]:
    """(task name, records) of one split: every question with its gold output."""
    questions = read_questions(files.questions)
    task, golds = read_golds(files.outputs)
    ids = [str(q["id"]) for q in questions]
    missing = [i for i in ids if i not in golds]
    extra = sorted(set(golds) - set(ids))
    duplicated = sorted(i for i, n in Counter(ids).items() if n > 1)
    problems = []
    if duplicated:
        problems.append(f"{files.questions}: {len(duplicated)} ids are used by more than one question "
                        f"(e.g. {', '.join(duplicated[:3])}).")
    if missing or extra:
        problems.append(f"{files.questions} and {files.outputs} do not match: {len(missing)} questions have no gold "
                        f"output (e.g. {', '.join(missing[:3]) or '-'}), {len(extra)} gold outputs have no question "
                        f"(e.g. {', '.join(extra[:3]) or '-'}). Give the outputs file of the same task and split.")
    if problems:
        raise UserError(problems)
    return task, [{"id": str(q["id"]), "history": history_of(q["profile"], history_items), "query": q["input"],
                   "target": golds[str(q["id"])]} for q in questions]


def hold_out(records: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """(rest, held out): the `size` records whose ids hash lowest, both in file order."""
    if size >= len(records):
        raise UserError(f"--validation_size {size} would leave no training question (the train file has "
                        f"{len(records)}); give a smaller one.")
    held = {record_id for _, record_id in sorted((hashlib.sha256(r["id"].encode()).hexdigest(), r["id"])
                                                 for r in records)[:size]}
    return [r for r in records if r["id"] not in held], [r for r in records if r["id"] in held]


def convert(files: dict[str, SplitFiles], history_items: int, validation_size: int) -> dict[str, list[dict]]:
    """Our three splits from LaMP's files (see the module docstring for the mapping), checked: one task, and no id
    in two splits."""
    tasks, splits = {}, {}
    for split, paths in files.items():
        tasks[split], splits[split] = make_records(paths, history_items)
    if "validation" not in files:
        splits["train"], splits["validation"] = hold_out(splits["train"], validation_size)
    named = {split: task for split, task in tasks.items() if task is not None}
    if len(set(named.values())) > 1:
        raise UserError("the outputs files are of different tasks: " + ", ".join(
            f"{files[split].outputs} is {task}" for split, task in named.items()) + ". Give one task's files.")
    problems = []
    names = list(SPLIT_FILES)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted({r["id"] for r in splits[a]} & {r["id"] for r in splits[b]})
            if shared:
                problems.append(f"{len(shared)} ids are in both the {a} and the {b} questions (e.g. "
                                f"{', '.join(shared[:3])}): are two of the files the same split?")
    if problems:
        raise UserError(problems)
    return {split: splits[split] for split in SPLIT_FILES}


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_lamp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lamp_dir", type=Path, help="a LaMP task folder with its train_* and dev_* files.")
    for split in SPLIT_FILES:
        for kind in ("questions", "outputs"):
            p.add_argument(f"--{split}_{kind}", type=Path, help=f"LaMP {kind} file for our {split} split.")
    p.add_argument("--output_dir", type=Path, required=True, help="where train/validation/test.jsonl go.")
    p.add_argument("--history_items", type=positive_int, default=20,
                   help="profile documents kept per question, the most recent (default 20).")
    p.add_argument("--validation_size", type=positive_int, default=None,
                   help=f"train questions held out as validation when no validation files are given (default "
                        f"{DEFAULT_VALIDATION_SIZE}).")
    p.add_argument("--overwrite", action="store_true", help="replace train/validation/test.jsonl in --output_dir.")
    return p.parse_args(argv)


def lamp_dir_file(lamp_dir: Path, split: str, kind: str) -> Path:
    """LaMP's file of `split` in a task folder: directly in it, or in the sub-folder LaMP's server uses."""
    name = f"{LAMP_NAMES[split]}_{kind}.json"
    nested = lamp_dir / LAMP_NAMES[split] / name
    return nested if not (lamp_dir / name).exists() and nested.exists() else lamp_dir / name


def split_files(args: argparse.Namespace) -> dict[str, SplitFiles]:
    """The files of each split, from the flags and --lamp_dir; every problem with them at once."""
    problems, files = [], {}
    if args.lamp_dir is not None and not args.lamp_dir.is_dir():
        problems.append(f"--lamp_dir {args.lamp_dir}: no such directory.")
    for split in SPLIT_FILES:
        paths = {kind: getattr(args, f"{split}_{kind}") for kind in ("questions", "outputs")}
        if args.lamp_dir is not None and split in LAMP_NAMES:
            paths = {kind: path or lamp_dir_file(args.lamp_dir, split, kind) for kind, path in paths.items()}
        given = [kind for kind, path in paths.items() if path is not None]
        if split == "validation" and not given:
            continue
        if len(given) < 2:
            problems.append(f"the {split} split needs --{split}_questions and --{split}_outputs"
                            + (" (or --lamp_dir)." if split in LAMP_NAMES else " together."))
            continue
        problems += [f"{path}: no such file ({split} {kind})." for kind, path in paths.items() if not path.is_file()]
        files[split] = SplitFiles(paths["questions"], paths["outputs"])
    if "validation" in files and args.validation_size is not None:
        problems.append("--validation_size holds train questions out only when no validation files are given; "
                        "drop one of the two.")
    if problems:
        raise UserError(problems)
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_split_files(args.output_dir, args.overwrite)
        files = split_files(args)
        splits = convert(files, args.history_items, args.validation_size or DEFAULT_VALIDATION_SIZE)
        counts = write_splits(args.output_dir, splits)
    except UserError as e:
        print("\n".join(f"error: {line}" for line in e.problems), file=sys.stderr)
        return e.exit_code
    print(f"LaMP -> {args.output_dir}: " + ", ".join(f"{split} {count}" for split, count in counts.items())
          + " questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
