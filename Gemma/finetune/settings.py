"""config.json, the ablation profile and --set overrides -> a validated Config, with every problem collected and
reported together, each naming the file and key path. Standard library only: this runs before torch is imported.

Precedence: defaults < config.json < ablation profile < --set.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .config import Ablation, Config, LoraConfig, PromptConfig
from .errors import UserError
from .gemma import check_model_directory

ABLATION_DIR = Path(__file__).resolve().parents[2] / "ablation_configs"
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; errors name the file, line and column."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found. Check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}). Save the file as UTF-8.") from None


# ----------------------------------------------------------------------------------------------------------------------
# JSON -> dataclasses
# ----------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "an object"
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
            list: "a list"}.get(typing.get_origin(tp) or tp, str(tp))


_BAD = object()  # marks a value that failed its check (None is a valid JSON null)


def _did_you_mean(value: Any, choices: list[str]) -> str:
    """" Did you mean "x"?" for the choice closest to a wrong value, in any case ("BM25" -> "bm25"); "" if none is."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    return f" Did you mean {json.dumps(by_lower[close[0]])}?" if close else ""


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check one JSON value against a type hint; returns the converted value, or _BAD after recording a problem."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # e.g. "all-linear" or a list of names: the first that takes the value
            for option in options:
                inner = []
                checked = _check_value(value, option, where, inner)
                if not inner:
                    return checked
            choices = [str(c) for o in options if typing.get_origin(o) is Literal for c in typing.get_args(o)]
            hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
            problems.append(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)}.{hint}")
            return _BAD
        inner: list[str] = []
        checked = _check_value(value, options[0], where, inner)
        # "expected an integer, got ..." -> "expected an integer or null, got ..."
        problems += [p.replace(", got ", " or null, got ", 1) if "expected" in p else p for p in inner]
        return checked
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {json.dumps(value)}.")
            return _BAD
        return build_dataclass(tp, value, where, problems)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):  # 1 is not true, nor 0 false
            return value
        hint = _did_you_mean(value, [str(a) for a in typing.get_args(tp)])
        problems.append(f"{where}: {json.dumps(value)} is not {_type_name(tp)}.{hint}")
        return _BAD
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {json.dumps(value)}.")
            return _BAD
        items = [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if _BAD in items else items
    # bool is a subclass of int in Python: true must not pass as 1, nor 1 as true.
    ok = (
        isinstance(value, bool) if tp is bool
        else isinstance(value, int) and not isinstance(value, bool) if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
        else isinstance(value, tp)
    )
    if not ok:
        problems.append(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)}.")
        return _BAD
    return float(value) if tp is float else value


def _key_path(where: str, key: str) -> str:
    """'config.json:' + 'training' -> 'config.json: training'; 'config.json: training' + 'lr' -> '...training.lr'."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _unknown_keys(data: dict, known: list[str], where: str) -> list[str]:
    problems = []
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(known)}."
            problems.append(f"{_key_path(where, key)}: unknown key{hint}")
    return problems


def build_dataclass(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    """Build `cls` from a JSON object. Unknown keys (with the closest valid one), missing keys and wrong types are
    appended to `problems` as "<file>: <key path>: ..." messages. A bad value falls back to its default so that the
    range checks can still run and report everything at once; returns _BAD only when a required key is unusable."""
    hints = typing.get_type_hints(cls)
    problems += _unknown_keys(data, [f.name for f in dataclasses.fields(cls)], where)
    kwargs, complete = {}, True
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            if required:
                problems.append(f"{_key_path(where, f.name)}: required key is missing.")
                complete = False
            continue
        value = _check_value(data[f.name], hints[f.name], _key_path(where, f.name), problems)
        if value is not _BAD:
            kwargs[f.name] = value
        elif required:
            complete = False
    return cls(**kwargs) if complete else _BAD


def _field_type(cls: type, parts: list[str]) -> tuple[Any, str | None]:
    """The type hint of the key path `parts` below dataclass `cls`, or (None, problem) for a path the schema lacks."""
    tp: Any = cls
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            return None, f"{'.'.join(parts[:depth])} is not a section"
        known = [f.name for f in dataclasses.fields(tp)]
        if part not in known:
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(parts[:depth + 1])
            return None, f"unknown key {where}" + (f"; did you mean {close[0]}?" if close else
                                                   f"; valid keys: {', '.join(known)}")
        tp = typing.get_type_hints(tp)[part]
    return tp, None


def apply_overrides(raw: dict, overrides: list[str], sources: dict[str, str]) -> list[str]:
    """Apply --set SECTION.KEY=VALUE (value parsed as JSON, else taken as a string) to the raw config dict. Each value
    is checked against the schema first, and a problem names the --set that caused it; `sources` records which key
    each --set decided, for the range checks."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            problems.append(f"--set {item}: expected SECTION.KEY=VALUE, e.g. --set training.max_steps=20.")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        tp, problem = _field_type(Config, parts)
        if problem is not None:
            problems.append(f"--set {item}: {problem}.")
            continue
        if _check_value(value, tp, f"--set {item}", problems) is _BAD:
            continue
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                node[part] = {}  # config.json's own value for this section is reported, and replaced here
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        sources[key] = f"--set {item}"
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Range and consistency checks
# ----------------------------------------------------------------------------------------------------------------------


def resolve_path(value: str, base: Path) -> Path:
    """Relative paths in config.json are relative to the directory holding config.json, so runs work from any cwd."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def local_or_hub(name: str, base: Path) -> str:
    """A model or tokenizer location as from_pretrained takes it: the resolved local directory, or the hub id."""
    path = resolve_path(name, base)
    return str(path) if path.is_dir() else name


MAX_SEED = 2**32 - 1  # numpy's random seed range, which the Trainer seeds too


class Checks:
    """Collects range problems, each naming where its value came from: config.json and the key path, the ablation
    file and its key, or the --set that set it."""

    def __init__(self, config_path: Path, sources: dict[str, str]):
        self.config_path, self.sources, self.problems = config_path, sources, []

    def where(self, key: str) -> str:
        return self.sources.get(key, f"{self.config_path}: {key}")

    def need(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            self.problems.append(f"{self.where(key)}: {message}")


def validate_config(cfg: Config, config_path: Path, sources: dict[str, str] | None = None) -> list[str]:
    """Range and consistency checks that the type system cannot express. Each message says where the value came from
    and how to fix it."""
    check = Checks(config_path, sources or {})
    need, t = check.need, cfg.training
    for key in ("max_length", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                "save_steps"):
        need(getattr(t, key) >= 1, f"training.{key}", f"must be at least 1, got {getattr(t, key)}.")
    need(t.learning_rate > 0, "training.learning_rate", f"must be positive, got {t.learning_rate}.")
    need(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be at least 1, or null to use epochs.")
    need(t.max_steps is not None or 0 < t.num_train_epochs < math.inf, "training.num_train_epochs",
         f"must be a positive, finite number, got {t.num_train_epochs} (or set training.max_steps).")
    need(0 <= t.warmup_ratio < 1, "training.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}.")
    need(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, got {t.weight_decay}.")
    need(t.max_grad_norm >= 0, "training.max_grad_norm", f"must be >= 0 (0 disables clipping), got {t.max_grad_norm}.")
    need(t.save_total_limit is None or t.save_total_limit >= 1, "training.save_total_limit",
         "must be at least 1, or null to keep every checkpoint.")
    need(t.eval_steps is None or t.eval_steps >= 1, "training.eval_steps", "must be at least 1, or null.")
    need(t.eval_steps is None or cfg.data.validation_file is not None, "training.eval_steps",
         f"is {t.eval_steps} but data.validation_file is null; set a validation file or set eval_steps to null.")
    need(0 <= t.seed <= MAX_SEED, "training.seed", f"must be in [0, {MAX_SEED}], got {t.seed}.")
    need(all(math.isfinite(getattr(t, k)) for k in ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm")),
         "training", "learning_rate, warmup_ratio, weight_decay and max_grad_norm must be finite numbers.")
    need(cfg.data.preprocessing_num_workers is None or cfg.data.preprocessing_num_workers >= 1,
         "data.preprocessing_num_workers", "must be at least 1, or null for one per CPU on large files.")
    need(cfg.prompt.max_history_items is None or cfg.prompt.max_history_items >= 0, "prompt.max_history_items",
         "must be >= 0, or null for all.")
    prompt_problems(cfg.prompt, check)
    e = cfg.evaluation
    need(e.max_test_examples is None or e.max_test_examples >= 1, "evaluation.max_test_examples",
         "must be at least 1, or null for the whole test file.")
    need(e.max_new_tokens >= 1, "evaluation.max_new_tokens", f"must be at least 1, got {e.max_new_tokens}.")
    if isinstance(e.answer_choices, list):
        choices = e.answer_choices
        need(len(choices) >= 2, "evaluation.answer_choices", f"holds {len(choices)} choice(s); list at least two "
                                                              "answers, \"auto\", or null to generate answers.")
        need(all(c.strip() and c == c.strip() for c in choices), "evaluation.answer_choices",
             "holds an empty choice or one with spaces around it; write each answer as the targets do (stripped).")
        twice = sorted({c for c in choices if choices.count(c) > 1})
        need(not twice, "evaluation.answer_choices", f"lists {', '.join(map(repr, twice))} more than once.")
    columns = [getattr(cfg.data.fields, f.name) for f in dataclasses.fields(cfg.data.fields)]
    for column in sorted({c for c in columns if columns.count(c) > 1}):
        fields = [f.name for f in dataclasses.fields(cfg.data.fields) if getattr(cfg.data.fields, f.name) == column]
        need(False, "data.fields", f"{' and '.join(fields)} are all read from the column {column!r}; give each record "
                                   "field a column of its own.")
    lora_problems(cfg.lora, check)
    data_file_problems(cfg, config_path, check)
    model_problems(cfg, config_path, check)
    return check.problems


def prompt_problems(prompt: PromptConfig, check: Checks) -> None:
    """The prompt texts and attribute lists, as far as the config alone can tell; whether the listed attributes
    exist is checked against the training file (data.field_list_problems), before the model loads."""
    need = check.need
    need(prompt.instruction is None or bool(prompt.instruction.strip()), "prompt.instruction",
         "is empty; give the task text, or null for no instruction.")
    for f in dataclasses.fields(PromptConfig):
        names = getattr(prompt, f.name)
        if not f.name.endswith("_fields") or names is None:
            continue
        section = f.name.removesuffix("_fields")
        # An empty list would show a heading over nothing: leaving the section out is what include_<section> is for.
        need(bool(names), f"prompt.{f.name}", f"is empty; list the attributes to show, null to show all, or set "
                                              f"prompt.include_{section} to false to leave the {section} out.")
        need(all(name.strip() for name in names), f"prompt.{f.name}", "holds an empty name.")
        twice = sorted({name for name in names if names.count(name) > 1})
        need(not twice, f"prompt.{f.name}", f"names {', '.join(map(repr, twice))} more than once; list each "
                                            "attribute once.")


def lora_problems(lora: LoraConfig, check: Checks) -> None:
    """The lora section's ranges (checked whether or not it is enabled, so that turning it on cannot fail late).
    Whether target_modules name modules of this model is checked against the model built on the meta device
    (preflight), before the weights load."""
    need = check.need
    need(lora.r >= 1, "lora.r", f"must be at least 1, got {lora.r}.")
    need(0 < lora.alpha < math.inf, "lora.alpha", f"must be a positive, finite number, got {lora.alpha}.")
    need(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}.")
    if isinstance(lora.target_modules, list):
        need(bool(lora.target_modules), "lora.target_modules", "is empty; name modules, or use \"all-linear\".")
        need(all(name.strip() for name in lora.target_modules), "lora.target_modules", "holds an empty name.")
    need(all(name.strip() for name in lora.modules_to_save), "lora.modules_to_save", "holds an empty name.")


def data_file_problems(cfg: Config, config_path: Path, check: Checks) -> None:
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        path = resolve_path(value, config_path.parent)
        check.need(path.suffix.lower() in DATA_EXTENSIONS, f"data.{key}", f"unsupported file type {path.suffix!r} "
                   f"({value}); use one of {', '.join(DATA_EXTENSIONS)}.")
        check.need(path.suffix.lower() not in DATA_EXTENSIONS or path.is_file(), f"data.{key}",
                   f"file not found: {path}. Fix the path (relative paths are relative to the directory of "
                   f"{config_path.name}).")


def model_problems(cfg: Config, config_path: Path, check: Checks) -> None:
    """A local model directory is checked now (a Gemma config.json). A name that is no local directory must look like
    a hub id ("google/gemma-3-1b-it"), and its first part must not be a local directory: "models/gemma-3-1b" with a
    models/ directory beside config.json is a mistyped path, not a hub id."""
    base = config_path.parent
    for key, value in (("model_name_or_path", cfg.model.model_name_or_path),
                       ("tokenizer_name_or_path", cfg.model.tokenizer_name_or_path)):
        if value is None:
            continue
        path = resolve_path(value, base)
        if path.is_dir():
            if key == "model_name_or_path":
                for problem in check_model_directory(path):
                    check.need(False, f"model.{key}", problem)
            continue
        first_part = resolve_path(value.split("/")[0], base)
        if looks_like_hub_id(value) and not first_part.is_dir():
            continue
        hint = (" For the demo model run `python Gemma/prepare_gemma.py`; otherwise give a local directory or a hub id "
                "like google/gemma-3-270m." if key == "model_name_or_path" else
                " Give a directory holding tokenizer files, a hub id, or null to use the model's.")
        check.need(False, f"model.{key}", f"directory not found: {path}" + (
            f" ({first_part} exists, so this is a local path, not a hub id)." if first_part.is_dir() else ".") + hint)


# ----------------------------------------------------------------------------------------------------------------------
# Ablation profiles and the whole precedence chain
# ----------------------------------------------------------------------------------------------------------------------


def resolve_ablation(name_or_path: str) -> tuple[str, Path]:
    """A name in ablation_configs/ or a path to a JSON file -> (name, path)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"--ablation_config: file not found: {path}.")
        return path.stem, path
    candidate = ABLATION_DIR / f"{name_or_path}.json"
    if not candidate.is_file():
        available = sorted(p.stem for p in ABLATION_DIR.glob("*.json"))
        raise UserError(f"--ablation_config: unknown ablation {name_or_path!r}. Available in {ABLATION_DIR}: "
                        f"{', '.join(available)} (or pass the path to a JSON file).")
    return name_or_path, candidate


def load_ablation(path: Path, problems: list[str], name: str | None = None) -> Ablation | None:
    """An ablation profile: a description plus the PromptConfig keys it sets, checked against PromptConfig's own
    types. Only the keys that pass are kept, so a bad key is reported once, against this file."""
    raw = read_json_file(path, "ablation profile")
    where = f"{path}:"
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a JSON object with a description and prompt keys such as include_profile.")
        return None
    prompt_fields = [f.name for f in dataclasses.fields(PromptConfig)]
    found = len(problems)
    problems += _unknown_keys(raw, ["description", *prompt_fields], where)
    description = raw.get("description")
    if not isinstance(description, str):
        problems.append(f"{where} description: " + ("required key is missing." if description is None
                                                    else f"expected a string, got {json.dumps(description)}."))
    hints = typing.get_type_hints(PromptConfig)
    prompt = {}
    for key in (k for k in raw if k in prompt_fields):
        value = _check_value(raw[key], hints[key], _key_path(where, key), problems)
        if value is not _BAD:
            prompt[key] = value
    if len(problems) > found:
        return None
    return Ablation(name or path.stem, description, prompt)


def load_settings(config_path: Path, ablation: str, overrides: list[str]) -> tuple[Config, Ablation]:
    """defaults < config.json < ablation profile < --set, validated; every problem is reported together, each naming
    the file (config.json or the ablation profile) or the --set it came from."""
    raw = read_json_file(config_path, "config file")
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object with sections model, data, training, ...")
    problems: list[str] = []
    sources: dict[str, str] = {}  # key path -> where its value was set, when not in config.json
    ablation_name, ablation_path = resolve_ablation(ablation)
    profile = load_ablation(ablation_path, problems, ablation_name)
    # Its problems are reported below, as the config's; a value the profile replaces falls back to its default here.
    study_prompt = build_dataclass(PromptConfig, copy.deepcopy(raw.get("prompt")), "", []) \
        if isinstance(raw.get("prompt"), dict) else PromptConfig()
    if profile is not None and isinstance(raw.setdefault("prompt", {}), dict):
        raw["prompt"].update(profile.prompt)
        sources.update({f"prompt.{key}": f"{ablation_path}: {key}" for key in profile.prompt})
    problems += apply_overrides(raw, overrides, sources)
    cfg = build_dataclass(Config, raw, f"{config_path}:", problems)
    if cfg is not _BAD:
        problems += validate_config(cfg, config_path, sources)
    if problems:
        raise UserError(problems)
    return cfg, dataclasses.replace(profile, study_prompt=study_prompt)
