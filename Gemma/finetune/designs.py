"""Study designs: a design turns config.json's prompt, the training records and its own arguments into the list of
ablations a study trains, so that a question like "which profile attribute matters" or "how much history is enough"
needs no hand-written profile files.

    sections                   the four shipped profiles of ablation_configs/ (profile_and_history, profile_only,
                               history_only, query_only); reference profile_and_history. What run_study.py trains
                               without --design.
    leave_one_out              all_attributes (every profile attribute: the reference), then one run per attribute,
                               without_<attribute>, showing every other one: what each attribute is worth.
    history_lengths N1 N2 ...  one run per N, history_<N>: N history items (0: the history heading over no item), the
                               most recent, or the most relevant to the query with prompt.history_selection "bm25";
                               every other prompt key as config.json says. Reference: the largest N.
                               The comparison also plots the main metric against N.

Usage (from the repository root; Gemma/run_study.py builds the design, trains and compares):

    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study_loo --design leave_one_out
    python Gemma/run_study.py --config config.json --output_dir Gemma/outputs/study_history \\
        --design history_lengths 0 1 2 4 8

The generated profiles (every design but sections, whose profiles ship in ablation_configs/) are written into
<output_dir>/designs/<name>.json and passed to the training script as paths, so that each run's ablation name in
results.json is the design's. They are the study's record: a rerun that would write a different file (the training
data or config.json's prompt changed) is refused. Every run keeps the same examples: which examples fit in
max_length, and how many history items they keep, is decided on config.json's full prompt whatever the ablation
(data.py), and a history length only shows fewer of the items kept.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PromptConfig
from .errors import UserError
from .outputs import write_atomic
from .settings import ABLATION_DIR, load_ablation, load_settings, resolve_path

SECTIONS_ABLATIONS = ("profile_and_history", "profile_only", "history_only", "query_only")
DESIGN_USAGE = {
    "sections": "sections",
    "leave_one_out": "leave_one_out",
    "history_lengths": "history_lengths N1 N2 ... (two or more whole numbers >= 0)",
}
DESIGNS_DIRNAME = "designs"  # <output_dir>/designs/<name>.json: the generated profiles of a study
LEAVE_ONE_OUT_REFERENCE = "all_attributes"
HISTORY_LENGTH_KEY = "prompt.max_history_items"  # the history_lengths comparison plots its metric against this


@dataclass(frozen=True)
class DesignRun:
    """One ablation of a design: its name (the run directory's, and results.json's ablation) and the PromptConfig
    keys it sets; every key it leaves out keeps config.json's value."""

    name: str
    description: str
    prompt: dict[str, Any]
    shipped: bool = False  # a profile of ablation_configs/, passed by name: no file is written

    def profile(self) -> dict[str, Any]:
        """The ablation profile file's content."""
        return {"description": self.description, **self.prompt}


@dataclass(frozen=True)
class Design:
    name: str
    runs: tuple[DesignRun, ...]
    reference: str  # the run the others are compared with
    x_axis: str | None = None  # a resolved-config key the comparison plots the main metric against

    def keys(self) -> list[str]:
        """The prompt keys the design sets in its runs, as --set would name them."""
        return sorted({f"prompt.{key}" for run in self.runs for key in run.prompt})


# ----------------------------------------------------------------------------------------------------------------------
# The designs: pure functions of their inputs
# ----------------------------------------------------------------------------------------------------------------------


def sections_design() -> Design:
    """The four shipped profiles, read from ablation_configs/, in the order run_study.py has always trained them."""
    problems: list[str] = []
    runs = []
    for name in SECTIONS_ABLATIONS:
        profile = load_ablation(ABLATION_DIR / f"{name}.json", problems, name)
        if profile is None:
            raise UserError(problems)
        runs.append(DesignRun(name, profile.description, profile.prompt, shipped=True))
    return Design("sections", tuple(runs), "profile_and_history")


def profile_attributes(records: list[dict], path: Path) -> list[str]:
    """The attributes of the records' profiles (those with a value), in first-seen order. A string profile has no
    attribute to leave out: refused, naming the record."""
    from .records import present_attributes  # records imports `datasets`: only a design that reads records pays for it

    strings = [i for i, rec in enumerate(records) if isinstance(rec.get("profile"), str)]
    if strings:
        first = records[strings[0]]
        raise UserError(f"{path}: record {strings[0] + 1} (id {first.get('id')!r}) has a string profile, as "
                        f"{len(strings)} of its {len(records)} records do; --design leave_one_out leaves out one "
                        "profile attribute at a time, so it needs object profiles ({\"age\": 34, \"occupation\": "
                        "...}). Give the profiles as objects, or compare whole sections with --design sections.")
    return present_attributes(records)["profile"] or []


def _file_name(text: str) -> str:
    """An attribute name as a run-directory-safe word: letters, digits, _ . - kept, anything else one _."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")


def leave_one_out_design(prompt: PromptConfig, records: list[dict], path: Path) -> Design:
    """all_attributes, then without_<a> for each attribute a: every run shows the profile (include_profile true) with
    its attributes in the same order, config.json's profile_fields when it lists them, else every attribute of the
    training file's profiles. The history and every other key stay as config.json says."""
    attributes = profile_attributes(records, path)  # also refuses string profiles when config.json lists fields
    where = f"{path}: the profiles have"
    if prompt.profile_fields is not None:
        attributes, where = list(prompt.profile_fields), "config.json's prompt.profile_fields lists"
    if len(attributes) < 2:
        raise UserError(f"{where} {len(attributes)} attribute(s) ({', '.join(attributes) or 'none'}); "
                        "--design leave_one_out needs at least two (leaving out the only one leaves no profile: "
                        "compare profile_and_history with history_only, --design sections).")
    names = {a: "without_" + _file_name(a) for a in attributes}
    clashes = sorted({n for n in names.values() if list(names.values()).count(n) > 1 or n == "without_"})
    if clashes:
        raise UserError(f"{where} attributes whose run names clash or are empty ({', '.join(clashes)}: "
                        f"{', '.join(repr(a) for a in attributes if names[a] in clashes)}); a run name keeps "
                        "letters, digits, _ . - of the attribute. Rename the attributes in the data, or list the "
                        "ones to study in config.json's prompt.profile_fields.")
    runs = [DesignRun(LEAVE_ONE_OUT_REFERENCE, f"Every profile attribute ({', '.join(attributes)}): the reference "
                      "of leave_one_out.", {"include_profile": True, "profile_fields": attributes})]
    runs += [DesignRun(names[a], f"Every profile attribute but {a!r}: what {a!r} is worth.",
                       {"include_profile": True, "profile_fields": [b for b in attributes if b != a]})
             for a in attributes]
    return Design("leave_one_out", tuple(runs), LEAVE_ONE_OUT_REFERENCE)


def history_length_problems(lengths: list[int]) -> list[str]:
    """What is wrong with history_lengths' arguments ([] when nothing)."""
    problems = []
    if len(lengths) < 2:
        problems.append("--design history_lengths needs at least two lengths to draw a curve, e.g. "
                        "--design history_lengths 1 2 4 8 (for one length, write a profile with max_history_items: "
                        "README, Ablation profiles).")
    if any(n < 0 for n in lengths):
        problems.append(f"--design history_lengths: lengths must be >= 0, got {', '.join(map(str, lengths))}.")
    repeated = sorted({n for n in lengths if lengths.count(n) > 1})
    if repeated:
        problems.append(f"--design history_lengths: {', '.join(map(str, repeated))} given more than once; list each "
                        "length once.")
    return problems


def history_lengths_design(lengths: list[int], selection: str = "recent") -> Design:
    """history_<N> for each N, in the order given: the history section with N items (0: the heading over no item),
    the most recent or, with config.json's prompt.history_selection "bm25", the most relevant to the query; every
    other key as config.json says; the reference is the largest N."""
    problems = history_length_problems(lengths)
    if problems:
        raise UserError(problems)
    which = "most recent history items" if selection == "recent" else "history items most relevant to the query (BM25)"
    runs = tuple(DesignRun(f"history_{n}", f"The {n} {which}: what history of length {n} is worth.",
                           {"include_history": True, "max_history_items": n}) for n in lengths)
    return Design("history_lengths", runs, f"history_{max(lengths)}", x_axis=HISTORY_LENGTH_KEY)


def parse_design(words: list[str]) -> tuple[str, list[int]]:
    """--design's words -> (design, its arguments); a usage problem raises UserError with the design's usage."""
    name, *rest = words
    if name not in DESIGN_USAGE:
        close = difflib.get_close_matches(name, DESIGN_USAGE, n=1)
        raise UserError(f"--design {name}: unknown design.{f' Did you mean {close[0]}?' if close else ''} Designs: "
                        f"{'; '.join(DESIGN_USAGE.values())}.")
    if name != "history_lengths":
        if rest:
            raise UserError(f"--design {name} takes no arguments, got {' '.join(rest)}.")
        return name, []
    bad = [w for w in rest if not re.fullmatch(r"-?[0-9]+", w)]
    if bad:
        raise UserError(f"--design history_lengths: expected whole numbers, got {', '.join(map(repr, bad))}; usage: "
                        f"{DESIGN_USAGE[name]}.")
    lengths = [int(w) for w in rest]
    problems = history_length_problems(lengths)
    if problems:
        raise UserError(problems)
    return name, lengths


def override_conflicts(design: Design, overrides: list[str]) -> list[str]:
    """--set entries that would replace a key the design sets in its runs (--set wins over a profile, so every run
    would have the same value and the design would measure nothing)."""
    keys = design.keys()
    return [f"--set {item}: the {design.name} design sets {item.partition('=')[0]} in each of its runs; drop the "
            f"--set (the design's keys: {', '.join(keys)})." for item in overrides if item.partition("=")[0] in keys]


# ----------------------------------------------------------------------------------------------------------------------
# Reading what a design needs, and writing its profiles
# ----------------------------------------------------------------------------------------------------------------------


def load_design(name: str, lengths: list[int], config_path: Path, overrides: list[str]) -> Design:
    """The design, with what it reads: leave_one_out reads config.json's prompt (without profile or --set) and the
    training file's profiles; history_lengths config.json's history_selection. The --set entries that would undo the
    design are refused."""
    if name == "sections":
        design = sections_design()
    elif name == "history_lengths":
        cfg, _ = load_settings(config_path, SECTIONS_ABLATIONS[0], overrides)
        design = history_lengths_design(lengths, cfg.prompt.history_selection)
    else:
        from .records import read_records

        cfg, ablation = load_settings(config_path, SECTIONS_ABLATIONS[0], overrides)
        train = resolve_path(cfg.data.train_file, config_path.parent)
        design = leave_one_out_design(ablation.study_prompt, read_records(train, cfg.data.fields), train)
    problems = override_conflicts(design, overrides)
    if problems:
        raise UserError(problems)
    return design


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def write_profiles(design: Design, directory: Path) -> list[str]:
    """The --ablation_config of each run, in order: a shipped profile's name, or the path of its generated profile,
    directory/<name>.json, written when absent. A file that exists with other content is refused, every one listed,
    before anything is written: its finished run was trained on the old profile."""
    generated = [run for run in design.runs if not run.shipped]
    changed = []
    for run in generated:
        path = directory / f"{run.name}.json"
        if not path.exists():
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = "(unreadable)"
        if old != run.profile():
            changed.append(f"  - {path}: holds {_short(old)}; the design now gives {_short(run.profile())}")
    if changed:
        raise UserError([f"{directory}: the {design.name} design now gives other profiles than this study's files "
                         "(has the training file or config.json's prompt changed?), so the runs would not be what "
                         "their names say. Start the study in a new --output_dir, or delete each file below and its "
                         "run directory to train it again:", *changed])
    for run in generated:
        path = directory / f"{run.name}.json"
        if not path.exists():
            write_atomic(path, json.dumps(run.profile(), indent=2) + "\n")
    return [run.name if run.shipped else str(directory / f"{run.name}.json") for run in design.runs]
