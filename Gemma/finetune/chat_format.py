"""How a tokenizer's chat template frames a prompt, learned from the template itself: a conversation with
placeholder texts is rendered and split around them. So Gemma 1-3 (<start_of_turn> ... <end_of_turn>), Gemma 4
(<|turn> ... <turn|>, a system turn of its own) and any later template give the prompt prefix, the generation prompt
and the token that closes a model turn without a line of family-specific code. A tokenizer without a template is given
Gemma's (gemma.GEMMA_CHAT_TEMPLATE): the format is then Gemma's turn format, and final/ is saved with that template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .gemma import GEMMA_CHAT_TEMPLATE

# Placeholder texts from Unicode's private use area: no template writes them, no data holds them.
USER, ANSWER, SYSTEM = "\ue000user\ue001", "\ue000answer\ue001", "\ue000system\ue001"


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt, **kwargs)


@dataclass(frozen=True)
class ChatFormat:
    """One tokenizer's turn format. Training examples are the generation prompt (the template's rendering of the
    system and user turns, ready for the model to answer) + the target + end_of_turn, exactly what greedy decoding
    starts from and stops at."""

    template: str  # the tokenizer's chat template, or Gemma's when it has none
    end_of_turn: str  # the text that closes a model turn: "<end_of_turn>" (Gemma 1-3), "<turn|>" (Gemma 4)
    end_of_turn_id: int
    system_in_template: bool  # the template places a system message (its own turn, or the first user turn)
    template_kwargs: dict = field(default_factory=dict)  # passed to the template: thinking on or off
    template_given: bool = False  # the tokenizer had no template and is given Gemma's (final/ keeps it)

    @classmethod
    def of(cls, tokenizer: Any, thinking: bool = False) -> ChatFormat:
        """The format of `tokenizer`'s chat template (giving it Gemma's if it has none). Raises UserError when the
        template cannot frame a conversation or closes a model turn with a token the tokenizer lacks."""
        given = not tokenizer.chat_template
        template = GEMMA_CHAT_TEMPLATE if given else tokenizer.chat_template
        kwargs = {"enable_thinking": thinking}  # templates without thinking ignore it
        source = "Gemma's turn format (the tokenizer has no chat template)" if given else "its chat template"
        try:
            text = _render(tokenizer, template, [{"role": "user", "content": USER},
                                                 {"role": "assistant", "content": ANSWER}], False, kwargs)
        except Exception as e:  # noqa: BLE001 - jinja raises what the template raises
            raise UserError(f"the tokenizer's chat template cannot render a user turn and a model turn ({e}).") from None
        if USER not in text or ANSWER not in text:
            raise UserError("the tokenizer's chat template does not show a user message and an answer as given; "
                            "this tool needs a template that renders conversations verbatim.")
        end = text[text.index(ANSWER) + len(ANSWER):].strip()
        ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise UserError(f"{source} closes a model turn with {end!r}, which this tokenizer does not hold as one "
                            "token: model.tokenizer_name_or_path (or model_name_or_path) must be the tokenizer of a "
                            "Gemma chat model, whose turn tokens it knows.")
        try:
            system_text = _render(tokenizer, template, [{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": USER}], True, kwargs)
            system_in_template = SYSTEM in system_text
        except Exception:  # noqa: BLE001 - e.g. Gemma 2's template raises "System role not supported"
            system_in_template = False
        return cls(template, end, ids[0], system_in_template, kwargs, given)

    def prompt_text(self, tokenizer: Any, user_message: str, system: str | None = None) -> str:
        """The generation prompt for one user message: where the template has no place for a system text, it
        leads the user message, separated by a blank line (as Gemma 3's template places it)."""
        messages = [{"role": "user", "content": user_message}]
        if system:
            if self.system_in_template:
                messages.insert(0, {"role": "system", "content": system})
            else:
                messages[0]["content"] = f"{system}\n\n{user_message}"
        return _render(tokenizer, self.template, messages, True, self.template_kwargs)
