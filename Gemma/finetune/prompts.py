"""Records -> the user turn -> token ids and labels, in the tokenizer's chat format (chat_format.py).

The user turn holds the instruction (PromptConfig.instruction), the prompt's sections in order (each shown when
PromptConfig's include_<name> is true, with the attributes its <name>_fields lists), then the query. A new section is
one entry in SECTIONS, a field of that name in config.FieldNames and include_<name> and <name>_fields keys in
config.PromptConfig; rendering, record checks, token counts per section and ablation profiles follow from them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import PromptConfig
from .errors import UserError
from .chat_format import ChatFormat

IGNORE_INDEX = -100  # label value the loss skips (torch's CrossEntropyLoss default)
CONTROL_TOKEN_SHAPE = re.compile(r"<[^<>\s]{1,40}>")


def _attributes(obj: dict | str, sep: str, fields: list[str] | None) -> str:
    """An object's attributes as "key: value" (all of them in the record's order, or the listed `fields` in the
    list's order); a string as is (records.check_record refuses strings where fields are listed)."""
    if isinstance(obj, str):
        return obj.strip()
    pairs = obj.items() if fields is None else ((name, obj.get(name)) for name in fields)
    # Arrow fills keys missing from one record with null; a null attribute is not information.
    return sep.join(f"{k}: {v}" for k, v in pairs if v is not None)


def _profile_body(profile: dict | str, fields: list[str] | None) -> str:
    return profile.strip() if isinstance(profile, str) else "- " + _attributes(profile, "\n- ", fields)


def _history_body(items: list, fields: list[str] | None) -> str:
    return "\n".join(f"{i}. {_attributes(item, '; ', fields)}" for i, item in enumerate(items, 1)) or "(none)"


def _profile_problem(value: Any) -> str | None:
    if not isinstance(value, (dict, str)):
        return f"must be an object or a string, got {type(value).__name__}"
    return None


def _history_problem(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of items (oldest first), got {type(value).__name__}"
    if not all(isinstance(item, (dict, str)) for item in value):
        return "items must be objects or strings"
    return None


@dataclass(frozen=True)
class Section:
    """An optional part of the user turn, filled from the record field `name`."""

    name: str
    heading: str
    body: Callable[[Any, list[str] | None], str]  # the record's value (a list section: the items kept), fields -> text
    problem: Callable[[Any], str | None]  # what is wrong with a record's (non-null) value, or None
    is_list: bool = False  # a list of items, of which only some may fit (history: kept_items picks them)


SECTIONS = (
    Section("profile", "User profile:", _profile_body, _profile_problem),
    Section("history", "Interaction history (oldest first):", _history_body, _history_problem, is_list=True),
)


def included(prompt: PromptConfig, section: Section) -> bool:
    return getattr(prompt, f"include_{section.name}")


def shown_fields(prompt: PromptConfig, section: Section) -> list[str] | None:
    """The attributes of the section's objects that the prompt shows, in order; None: all, in the record's order."""
    return getattr(prompt, f"{section.name}_fields")


WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _item_text(item: dict | str) -> str:
    """What BM25 reads of a history item: its values (every attribute, whatever the prompt shows, so that every
    ablation keeps the same items), or the string."""
    return item if isinstance(item, str) else " ".join(str(v) for v in item.values() if v is not None)


@functools.lru_cache(maxsize=8)  # one record is rendered several times while its history is fitted, then encoded
def bm25_ranking(query: str, item_texts: tuple[str, ...]) -> tuple[int, ...]:
    """The items' indices, most relevant to the query first (BM25Okapi over lower-cased words, as LaMP ranks a user's
    profile), ties to the more recent; most recent first when the query or the items have no words."""
    from rank_bm25 import BM25Okapi

    corpus, words = [_words(text) for text in item_texts], _words(query)
    if not words or not any(corpus):
        return tuple(reversed(range(len(item_texts))))
    scores = BM25Okapi(corpus).get_scores(words)
    return tuple(sorted(range(len(item_texts)), key=lambda i: (-scores[i], -i)))


def kept_items(items: list, count: int, selection: str, query: str) -> list:
    """The `count` history items a prompt shows, oldest first: the most recent ("recent") or the most relevant to the
    query ("bm25", bm25_ranking)."""
    if count <= 0:
        return []
    if selection == "recent" or count >= len(items):
        return items[len(items) - count:]
    ranking = bm25_ranking(query, tuple(map(_item_text, items)))
    return [items[i] for i in sorted(ranking[:count])]


def render_user_message(record: dict, prompt: PromptConfig, history_items: int) -> str:
    """The user turn: the instruction, the sections the prompt includes (in SECTIONS order, with the attributes it
    lists), then the query. A list section shows `history_items` of its items (at most prompt.max_history_items),
    chosen by prompt.history_selection, oldest first. Sections the prompt leaves out are absent, not empty."""
    if prompt.max_history_items is not None:
        history_items = min(history_items, prompt.max_history_items)
    instruction = (prompt.instruction or "").strip()
    parts = [instruction] if instruction else []
    for section in SECTIONS:
        value = record[section.name]
        if not included(prompt, section) or value is None:
            continue
        if section.is_list:
            value = kept_items(value, history_items, prompt.history_selection, record["query"])
        parts.append(section.heading + "\n" + section.body(value, shown_fields(prompt, section)))
    parts.append("Query: " + record["query"].strip())
    return "\n\n".join(parts)


def load_pretrained(loader: Any, path: str, key: str) -> Any:
    """loader.from_pretrained(path), with a missing or unreachable checkpoint as a UserError naming `key`."""
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as e:  # what transformers raises for a missing repo, file or network
        reason = " ".join(str(e).split())
        raise UserError(f"{key}: cannot load {path!r}: {reason[:400]} Give a local directory written by "
                        "save_pretrained (relative paths are relative to the directory of config.json) or a hub id "
                        "that this machine can reach or has in its cache.") from None


def load_tokenizer(path: str):
    """The tokenizer, padding on the right (labels follow the tokens; left padding matters only for batched
    generation, which pads by hand)."""
    from transformers import AutoTokenizer  # not torch's training stack: data errors come back in seconds

    tokenizer = load_pretrained(AutoTokenizer, path, "model.tokenizer_name_or_path (or model_name_or_path)")
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PromptEncoder:
    """Turns records into token ids and labels in the tokenizer's chat format (chat_format.ChatFormat: its chat
    template, or Gemma's turn format when it has none). Labels cover only the target and the token that closes a
    model turn (<end_of_turn>, <turn|>).

    `prompt` is the run's (its system text and thinking frame every example); `study` is config.json's prompt
    (default: the run's), whose full prompt decides which examples fit and how many history items they keep, so that
    every ablation of a study keeps the same ones."""

    def __init__(self, tokenizer: Any, max_length: int, prompt: PromptConfig | None = None,
                 study: PromptConfig | None = None):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.prompt = prompt or PromptConfig()
        self.full_prompt = (study or self.prompt).with_every_section()
        self.chat = ChatFormat.of(tokenizer, self.prompt.enable_thinking)
        self.end_of_turn_id = self.chat.end_of_turn_id
        self.bos_id = tokenizer.bos_token_id
        self._last_ids: tuple[tuple[str, str | None], list[int]] | None = None
        self._target_ids: dict[str, list[int]] = {}

    @classmethod
    def for_prompt(cls, tokenizer: Any, max_length: int, prompt: PromptConfig,
                   study: PromptConfig | None = None) -> PromptEncoder:
        return cls(tokenizer, max_length, prompt, study)

    @functools.cached_property
    def _control_tokens(self) -> tuple[set[str], re.Pattern]:
        """The tokenizer's special tokens (turn markers, BOS, padding, reserved ones): all of them look like <...> in
        Gemma's tokenizers, so a pattern finds candidates and the set decides."""
        special = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        special |= set(self.tokenizer.all_special_tokens)
        odd = sorted((t for t in special if not CONTROL_TOKEN_SHAPE.fullmatch(t)), key=len, reverse=True)
        return special, re.compile("|".join([CONTROL_TOKEN_SHAPE.pattern, *map(re.escape, odd)]))

    def control_tokens_in(self, text: str) -> list[str]:
        """The control-token strings in a piece of user text, in order of appearance, each once."""
        special, pattern = self._control_tokens
        return list(dict.fromkeys(m for m in pattern.findall(text) if m in special))

    def check_fixed_parts(self) -> None:
        """The system text and the instruction hold no control-token text (as the data may not), and the turn markers,
        BOS, those texts and the query label alone leave room for a target, with the run's prompt and with the full
        prompt the examples are fitted on."""
        texts = dict.fromkeys((key, getattr(p, key)) for p in (self.prompt, self.full_prompt)
                              for key in ("system", "instruction"))  # the run's, and config.json's where they differ
        problems = [f"prompt.{key}: holds {', '.join(map(repr, tokens))}, the tokenizer's control token text: the "
                    "model would read it as markup, not as words. Rewrite it (e.g. 'end of turn')."
                    for key, text in texts if text and (tokens := self.control_tokens_in(text))]
        if problems:
            raise UserError(problems)
        fixed = max(self.template_length(self.prompt), self.template_length(self.full_prompt)) + 2  # + target, end
        if self.max_length < fixed:
            raise UserError(f"training.max_length={self.max_length} is smaller than the fixed prompt parts "
                            f"({fixed} tokens: BOS, turn markers, the system text, the instruction, section labels "
                            "and a one-token answer). Raise training.max_length (256 or more is typical).")

    def template_length(self, prompt: PromptConfig | None = None) -> int:
        """Tokens of a prompt with no section and an empty query: BOS, turn markers, the system text, the instruction
        and the query label (of `prompt`, default the run's)."""
        prompt = prompt or self.prompt
        empty = {section.name: None for section in SECTIONS} | {"query": ""}
        return len(self._ids(render_user_message(empty, prompt, 0), prompt.system))

    def prompt_text(self, user_message: str) -> str:
        return self.chat.prompt_text(self.tokenizer, user_message, self.prompt.system)

    def prompt_ids(self, user_message: str) -> list[int]:
        return self._ids(user_message, self.prompt.system)

    def _ids(self, user_message: str, system: str | None) -> list[int]:
        # Preparing a record renders the chat template and tokenizes for fit_full_prompt, then again for encode: the
        # same text whenever the run's prompt shows what the full prompt does. The last result serves the second.
        if self._last_ids is not None and self._last_ids[0] == (user_message, system):
            return list(self._last_ids[1])
        text = self.chat.prompt_text(self.tokenizer, user_message, system)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids  # exactly one BOS, whether or not the template wrote it
        self._last_ids = ((user_message, system), ids)
        return list(ids)

    def target_ids(self, target: str) -> list[int]:
        if (ids := self._target_ids.get(target)) is None:  # answers repeat (a genre, a rating): tokenized once each
            if len(self._target_ids) >= 4096:
                self._target_ids.clear()
            ids = self._target_ids[target] = (self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
                                              + [self.end_of_turn_id])
        return list(ids)

    def fitting_history(self, record: dict, target_len: int) -> int | None:
        """How many history items (chosen by the study prompt's history_selection) fit with the FULL prompt (every
        section, all history), whatever the ablation: so every ablation keeps the same examples. None when even no
        history does not fit."""
        fitted = self.fit_full_prompt(record, target_len)
        return None if fitted is None else fitted[0]

    def fit_full_prompt(self, record: dict, target_len: int) -> tuple[int, int] | None:
        """(history items kept, tokens of the full-prompt example): see fitting_history. The full prompt is
        config.json's (self.full_prompt): every section and attribute, its system text and instruction, whatever the
        ablation."""
        full = self.full_prompt
        n = len(record["history"] or [])
        lengths: dict[int, int] = {}

        def fits(k: int) -> bool:
            lengths[k] = len(self._ids(render_user_message(record, full, k), full.system)) + target_len
            return lengths[k] <= self.max_length

        if fits(n):
            return n, lengths[n]
        if not fits(0):
            return None
        lo, hi = 0, n  # fits(lo) and not fits(hi): binary search for the largest k that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo, lengths[lo]

    def section_lengths(self, record: dict, prompt: PromptConfig, history_items: int) -> dict[str, int]:
        """Tokens each part of encode()'s example adds; "template" is BOS, turn markers, the system text and the query
        label; "instruction" (only when the prompt has one) its paragraph."""
        shown = dataclasses.replace(prompt, instruction=None, **{f"include_{s.name}": False for s in SECTIONS})
        no_query = {**record, "query": ""}

        def n(with_sections: PromptConfig, rec: dict = record) -> int:
            return len(self.prompt_ids(render_user_message(rec, with_sections, history_items)))

        lengths = {"template": n(shown, no_query)}
        if prompt.instruction:
            shown = dataclasses.replace(shown, instruction=prompt.instruction)
            lengths["instruction"] = n(shown, no_query) - lengths["template"]
        query = n(shown) - n(shown, no_query)
        previous = n(shown)
        for section in SECTIONS:  # add the sections one at a time, as the prompt shows them
            shown = dataclasses.replace(shown, **{f"include_{section.name}": included(prompt, section)})
            length = n(shown)
            lengths[section.name], previous = length - previous, length
        return {**lengths, "query": query, "target": len(self.target_ids(record["target"]))}

    def encode(self, record: dict, prompt: PromptConfig, history_items: int) -> dict:
        prompt_ids = self.prompt_ids(render_user_message(record, prompt, history_items))
        target_ids = self.target_ids(record["target"])
        input_ids = prompt_ids + target_ids
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        }


def prompt_length(example: dict) -> int:
    """Tokens before the first supervised one: the prompt a model answers at test time."""
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
