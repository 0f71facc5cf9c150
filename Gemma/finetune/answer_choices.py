"""The closed answer set of the test evaluation: evaluation.answer_choices resolved against the data ("auto": the
training file's distinct targets) and checked against every test target before the model loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_AUTO_CHOICES, Config, FieldNames
from .data import Split
from .errors import UserError
from .records import load_table, normalize_record
from .settings import DATA_EXTENSIONS

logger = logging.getLogger(__name__)


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


def training_targets(path: Path, fields: FieldNames) -> list[str]:
    """The distinct non-empty targets of a training file, as prepared examples hold them (stripped; numbers as text),
    read from its target column alone."""
    table = load_table(path, fields)
    if "target" not in table.column_names:
        return []
    csv_cells = DATA_EXTENSIONS[path.suffix.lower()] == "csv"
    targets = (normalize_record({"target": t}, csv_cells)["target"] for t in table.data.column("target").unique()
               .to_pylist())
    return sorted({t.strip() for t in targets if isinstance(t, str) and t.strip()})


def answer_choices_for(cfg: Config, train_file: Path, test: Split | None) -> AnswerChoices | None:
    """evaluation.answer_choices resolved against the data ("auto": the training file's distinct targets) and checked
    against the test targets (resolve_answer_choices), logged; None without a test file."""
    setting, train_targets = cfg.evaluation.answer_choices, None
    if setting == "auto" and test is not None:
        train_targets = training_targets(train_file, cfg.data.fields)
    answers = resolve_answer_choices(setting, train_targets, test)
    if setting is not None and answers is not None:
        logger.info("Answer choices (%s): %s", answers.source,
                    "free generation" if answers.choices is None else ", ".join(map(repr, answers.choices)))
    return answers
