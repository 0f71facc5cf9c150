"""Build a tiny, random-weight Gemma (any family) and a matching tokenizer, fully offline.

Tests (and CPU smoke runs of ``Gemma/train_deepspeed.py``) need a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load exactly like a
real Gemma checkpoint, but without the network and in a couple of seconds. This module writes one,
for every Gemma family (``arch``, see :data:`ARCHS`):

=================  ===============================================  ==============================
``arch``           what ``AutoModelForCausalLM`` loads              turn format / chat template
=================  ===============================================  ==============================
``gemma3``         ``Gemma3ForCausalLM`` (``gemma3_text``)          Gemma 3 (system joins user turn)
``gemma2``         ``Gemma2ForCausalLM``                            Gemma 1/2 (no system role)
``gemma``          ``GemmaForCausalLM``                             Gemma 1/2 (no system role)
``gemma3_mm``      ``Gemma3ForConditionalGeneration`` + SigLIP      Gemma 3, + image tokens
``gemma3n_text``   ``Gemma3nForCausalLM`` (``gemma3n_text``)        Gemma 3n, + image/audio tokens
``gemma4``         ``Gemma4ForCausalLM`` (``gemma4_text``), dense   Gemma 4 (E2B/E4B template)
``gemma4_moe``     ``Gemma4ForCausalLM``, MoE (4 experts, top 2)    Gemma 4 (26B-A4B/31B template)
``gemma4_mm``      ``Gemma4ForConditionalGeneration``, vision+audio Gemma 4 (E2B/E4B template)
=================  ===============================================  ==============================

The multimodal Gemma 3n (``Gemma3nForConditionalGeneration``) cannot be built here: its vision tower
is a timm MobileNetV5 (see :data:`UNBUILDABLE_ARCHS`), so ``gemma3n_text`` stands in for it.

* **Tokenizer**: a ``tokenizers`` BPE with byte fallback (any text encodes, unicode included),
  trained in well under a second on a small corpus, wrapped in transformers' ``GemmaTokenizer``.
  Special tokens have Gemma's ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4,
  then the family's turn (and media) tokens, each one token even inside running text (Gemma 1-3:
  ``<start_of_turn>`` 5 and ``<end_of_turn>`` 6, which the real Gemma 3 has at 105/106; Gemma 4:
  ``<|turn>`` 5, ``<turn|>`` 6, the thinking, tool and media tokens after them, see
  :data:`GEMMA4_SPECIAL_TOKENS`). Gemma 1-3 tokenizers prepend ``<bos>`` (``tok(text)``) and
  append nothing, as Gemma does; Gemma 4's do not prepend it (``add_bos_token=False``, as Google's
  conversion writes it: the chat template emits ``<bos>``). With ``chat_template=True`` the family's
  published chat template is set, byte for byte (:data:`CHAT_TEMPLATES`, SHA-256 in
  :data:`CHAT_TEMPLATE_SHA256`); otherwise there is none (like the Gemma 3 270M GGUF tokenizer).
  :data:`FAMILY_TURNS` holds each family's published turn format as plain data, to compare
  renderings against.
* **Model**: hidden size 64, 2 layers (one sliding-window, one global where the family has both),
  2 query heads / 1 KV head of size 32, tied embeddings, float32 safetensors, deterministic for a
  given ``seed``. Gemma 4's global layers use ``global_head_dim`` 64 (real: 512) and its per-layer
  input embeddings 16 per layer (real: 256); the MoE has 2 KV heads on its sliding layer and 1 on its
  global one (26B-A4B: 8 and 2); vision and audio towers are one layer of width 32.
  config.json carries ``"attn_implementation": "eager"``, so ``from_pretrained`` defaults to eager
  attention (an explicit ``attn_implementation=`` argument overrides it).

Usage::

    from tests.tiny_gemma import build_tiny_gemma
    path = build_tiny_gemma(tmp_path / "tiny", chat_template=True)
    path = build_tiny_gemma(tmp_path / "g4", chat_template=True, arch="gemma4")

    python tests/tiny_gemma.py OUT_DIR [--chat_template] [--arch {gemma3,gemma2,gemma,...}] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path

# Nothing here may reach the Hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, normalizers, pre_tokenizers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    Gemma3TextConfig,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GemmaConfig,
    GemmaForCausalLM,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer  # noqa: E402

__all__ = [
    "ARCHS",
    "CHAT_TEMPLATES",
    "CHAT_TEMPLATE_SHA256",
    "EXAMPLE_MESSAGES",
    "FAMILY_TURNS",
    "GEMMA3N_CHAT_TEMPLATE",
    "GEMMA3N_MEDIA_TOKENS",
    "GEMMA3_CHAT_TEMPLATE",
    "GEMMA3_IMAGE_TOKENS",
    "GEMMA4_CHAT_TEMPLATE",
    "GEMMA4_LARGE_CHAT_TEMPLATE",
    "GEMMA4_NAMED_TOKENS",
    "GEMMA4_SPECIAL_TOKENS",
    "GEMMA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "UNBUILDABLE_ARCHS",
    "VOCAB_SIZE",
    "build_tiny_gemma",
    "build_tiny_tokenizer",
    "default_corpus",
    "main",
    "special_tokens_for",
]

# Gemma's special tokens, in id order: pad 0, eos 1, bos 2, unk 3, mask 4 as in every Gemma; the two
# turn markers follow directly (ids 5 and 6 here). The Gemma 1/2/3 text families use exactly these.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
)
# Gemma 3's image tokens (real ids 255999, 256000 and 262144; the Gemma3Processor expands each
# "<start_of_image>" in a prompt to "\n\n<start_of_image>" + mm_tokens_per_image x "<image_soft_token>"
# + "<end_of_image>\n\n"). Ids 7..9 here, in the gemma3_mm tokenizer.
GEMMA3_IMAGE_TOKENS: tuple[str, ...] = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
# Gemma 3n's image and audio tokens (real ids 255999, 262144, 262145, 256000, 262272, 262273; its chat
# template writes "<image_soft_token>" / "<audio_soft_token>" for image / audio content). Ids 7..12 here.
GEMMA3N_MEDIA_TOKENS: tuple[str, ...] = (
    *GEMMA3_IMAGE_TOKENS,
    "<start_of_audio>",
    "<end_of_audio>",
    "<audio_soft_token>",
)
# Gemma 4's control tokens (https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4): turns,
# thinking (<|think|> in the system turn switches it on; the model thinks in <|channel>thought ...
# <channel|>), tools, the string delimiter <|"|>, and the media tokens (<|image> <image|> / <|audio>
# <audio|> around embeddings, <|image|> <|audio|> <|video|> placeholders). Every Gemma 4 checkpoint
# ships the same tokenizer, so all gemma4* archs get all of them. Ids 5..23 here (real: <turn|> 106,
# <|image> 255999, <|audio> 256000, <|image|> 258880, <|audio|> 258881, <image|> 258882,
# <audio|> 258883, <|video|> 258884).
GEMMA4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image>",
    "<image|>",
    "<|audio>",
    "<audio|>",
    "<|image|>",
    "<|audio|>",
    "<|video|>",
)
# The names Gemma 4's tokenizer_config.json gives its control tokens (as written by transformers'
# models/gemma4/convert_gemma4_weights.py); the tokenizer exposes them as tok.<name> / tok.<name>_id
# and Gemma4Processor reads image_token, boi_token, eoi_token, audio_token, boa_token, eoa_token.
# "<|video|>" has no name: it is the one entry of the config's "extra_special_tokens" list.
GEMMA4_NAMED_TOKENS: dict[str, str] = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
# Byte-fallback pieces, named as SentencePiece/Gemma names them.
_BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))

# Target vocabulary size (specials + 256 bytes + learned pieces); the corpus may yield slightly fewer.
VOCAB_SIZE = 1000

# The first three are the original families (and their order); the others were added after them.
ARCHS: tuple[str, ...] = (
    "gemma3",
    "gemma2",
    "gemma",
    "gemma3_mm",
    "gemma3n_text",
    "gemma4",
    "gemma4_moe",
    "gemma4_mm",
)
# Families that cannot be built with this environment's packages, and why.
UNBUILDABLE_ARCHS: dict[str, str] = {
    "gemma3n": (
        "the multimodal Gemma 3n (Gemma3nForConditionalGeneration) builds its vision tower with "
        "AutoModel.from_config(Gemma3nVisionConfig), i.e. transformers' TimmWrapperModel around timm's "
        "MobileNetV5 ('mobilenetv5_300m_enc'), which needs the PyPI packages timm (transformers 5.24 "
        "pins timm>=1.0.23) and torchvision (0.28.0 is the release for torch 2.13.0), neither of which "
        "is installed; arch 'gemma3n_text' (Gemma3nForCausalLM) builds its language model"
    ),
}

# ---------------------------------------------------------------------------------------------------
# Published chat templates
# ---------------------------------------------------------------------------------------------------
# Each is the chat_template.jinja of the named Hugging Face checkpoints, byte for byte: the SHA-256 in
# CHAT_TEMPLATE_SHA256 is the one recorded for those files (test_tiny_gemma.py checks it). They render
# the turn formats of Google's prompt-formatting pages: https://ai.google.dev/gemma/docs/formatting
# (Gemma 1-3) and https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4 (Gemma 4).

# Gemma 1 and Gemma 2 (google/gemma-7b-it, google/gemma-2-2b-it@299a8560, gemma-2-9b-it, gemma-2-27b-it;
# 591 bytes): a system message raises "System role not supported". Identical to TRL's
# trl/chat_templates/gemma.jinja ("used by both Gemma (v1) and Gemma2, which ship identical templates").
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '
' + message['content'] | trim + '<end_of_turn>
' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model
'}}{% endif %}"""

# Gemma 3 (google/gemma-3-*-it: gemma-3-1b-it, gemma-3-4b-it@093f9f38, ...; 1532 bytes): a system message
# is put at the head of the first user turn, followed by a blank line; image content renders
# "<start_of_image>". (Identical to TRL's trl/chat_templates/gemma3.jinja.)
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Gemma 3n (google/gemma-3n-E2B-it / -E4B-it, e.g. as copied into mlx-community/gemma-3n-E4B-it-lm-4bit@00b5ecdc;
# 1626 bytes; the _CHAT_TEMPLATE of transformers' models/gemma3n/convert_gemma3n_weights.py): Gemma 3's
# template with "<audio_soft_token>" / "<image_soft_token>" for audio / image content.
GEMMA3N_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Gemma 4, large models (google/gemma-4-31B-it@842da379, gemma-4-26B-A4B-it@4d7ae498, gemma-4-12b-it: Google's
# template of 2026-07-15, 18683 bytes; also ollama's model/renderers/testdata/gemma4_31b_chat_template.jinja2,
# which spells its one em dash "-"). Turns are "<|turn>ROLE\n ... <turn|>\n" with a system turn of its own;
# enable_thinking=True writes "<|think|>" at the head of the system turn; with thinking off (the default) the
# generation prompt closes an empty thought channel: "<|turn>model\n<|channel>thought\n<channel|>".
GEMMA4_LARGE_CHAT_TEMPLATE = r"""{#
  Template: Google Gemma 4 Canonical Chat Template
  Author: Google Gemma Engineering Team
  Published: 2026-07-09
  Context: Fixed tool-calling loops, turn closures, and thinking content-ordering.
#}
{%- macro format_parameters(properties, required, filter_keys=false) -%}
    {%- set standard_keys = ['description', 'type', 'properties', 'required', 'nullable'] -%}
    {%- set ns = namespace(found_first=false) -%}
    {%- for key, value in properties | dictsort -%}
        {%- set add_comma = false -%}
        {%- if not filter_keys or key not in standard_keys -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {{ key }}:{
            {%- if value['description'] -%}
                description:<|"|>{{ value['description'] }}<|"|>
                {%- set add_comma = true -%}
            {%- endif -%}
            {%- if value['type'] | upper == 'STRING' -%}
                {%- if value['enum'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    enum:{{ format_argument(value['enum']) }}
                {%- endif -%}
            {%- elif value['type'] | upper == 'ARRAY' -%}
                {%- if value['items'] is mapping and value['items'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    items:{
                    {%- set ns_items = namespace(found_first=false) -%}
                    {%- for item_key, item_value in value['items'] | dictsort -%}
                        {%- if item_value is not none -%}
                            {%- if ns_items.found_first %},{% endif -%}
                            {%- set ns_items.found_first = true -%}
                            {%- if item_key == 'properties' -%}
                                properties:{
                                {%- if item_value is mapping -%}
                                    {{- format_parameters(item_value, value['items']['required'] | default([])) -}}
                                {%- endif -%}
                                }
                            {%- elif item_key == 'required' -%}
                                required:[
                                {%- for req_item in item_value -%}
                                    <|"|>{{- req_item -}}<|"|>
                                    {%- if not loop.last %},{% endif -%}
                                {%- endfor -%}
                                ]
                            {%- elif item_key == 'type' -%}
                                {%- if item_value is string -%}
                                    type:{{ format_argument(item_value | upper) }}
                                {%- else -%}
                                    type:{{ format_argument(item_value | map('upper') | list) }}
                                {%- endif -%}
                            {%- else -%}
                                {{ item_key }}:{{ format_argument(item_value) }}
                            {%- endif -%}
                        {%- endif -%}
                    {%- endfor -%}
                    }
                {%- endif -%}
            {%- endif -%}
            {%- if value['nullable'] %}
                {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                nullable:true
            {%- endif -%}
            {%- if value['type'] | upper == 'OBJECT' -%}
                {%- if value['properties'] is defined and value['properties'] is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value['properties'], value['required'] | default([])) -}}
                    }
                {%- elif value is mapping -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    properties:{
                    {{- format_parameters(value, value['required'] | default([]), filter_keys=true) -}}
                    }
                {%- endif -%}
                {%- if value['required'] -%}
                    {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
                    required:[
                    {%- for item in value['required'] | default([]) -%}
                        <|"|>{{- item -}}<|"|>
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                    ]
                {%- endif -%}
            {%- endif -%}
            {%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}
            type:<|"|>{{ value['type'] | upper }}<|"|>}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool_data) -%}
    declaration:{{- tool_data['function']['name'] -}}{description:<|"|>{{- tool_data['function']['description'] -}}<|"|>
    {%- set params = tool_data['function']['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}
            properties:{ {{- format_parameters(params['properties'], params['required']) -}} },
        {%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}
                <|"|>{{- item -}}<|"|>
                {{- ',' if not loop.last -}}
            {%- endfor -%}
            ],
        {%- endif -%}
        {%- if params['type'] -%}
            type:<|"|>{{- params['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    {%- if 'response' in tool_data['function'] -%}
        {%- set response_declaration = tool_data['function']['response'] -%}
        ,response:{
        {%- if response_declaration['description'] -%}
            description:<|"|>{{- response_declaration['description'] -}}<|"|>,
        {%- endif -%}
        {%- if response_declaration['type'] | upper == 'OBJECT' -%}
            type:<|"|>{{- response_declaration['type'] | upper -}}<|"|>}
        {%- endif -%}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is none -%}
        {{- 'null' -}}
    {%- elif argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- set ns = namespace(found_first=false) -%}
        {%- for key, value in argument | dictsort -%}
            {%- if ns.found_first %},{% endif -%}
            {%- set ns.found_first = true -%}
            {%- if escape_keys -%}
                {{- '<|"|>' + key + '<|"|>' -}}
            {%- else -%}
                {{- key -}}
            {%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- macro format_tool_response_block(tool_name, response) -%}
    {{- '<|tool_response>' -}}
    {%- if response is mapping -%}
        {{- 'response:' + tool_name + '{' -}}
        {%- for key, value in response | dictsort -%}
            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- else -%}
        {{- 'response:' + tool_name + '{value:' + format_argument(response, escape_keys=False) + '}' -}}
    {%- endif -%}
    {{- '<tool_response|>' -}}
{%- endmacro -%}

{#- ===== SETUP ===== -#}
{%- set ns = namespace(prev_message_type=None, prev_non_tool_role=None) -%}
{%- set loop_messages = messages -%}
{%- set enable_thinking = enable_thinking | default(false) -%}
{%- set preserve_thinking = preserve_thinking | default(false) -%}
{{- bos_token -}}
{#- Handle System/Tool Definitions Block -#}
{%- if enable_thinking or tools or (messages and messages[0]['role'] in ['system', 'developer']) -%}
    {{- '<|turn>system\n' -}}
    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking -%}
        {{- '<|think|>\n' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}
    {%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
        {%- if messages[0]['content'] is string -%}
            {{- messages[0]['content'] | trim -}}
        {%- elif messages[0]['content'] is sequence -%}
            {%- for item in messages[0]['content'] -%}
                {{- item['text'] | trim + ' '-}}
            {%- endfor -%}
        {%- endif -%}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {%- if tools -%}
        {%- for tool in tools %}
            {{- '<|tool>' -}}
            {{- format_function_declaration(tool) | trim -}}
            {{- '<tool|>' -}}
        {%- endfor %}
        {%- set ns.prev_message_type = 'tool' -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif %}

{#- Pre-scan: find last user message index for reasoning guard -#}
{%- set ns_turn = namespace(last_user_idx=-1) -%}
{%- for i in range(loop_messages | length) -%}
    {%- if loop_messages[i]['role'] == 'user' -%}
        {%- set ns_turn.last_user_idx = i -%}
    {%- endif -%}
{%- endfor -%}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- if message['role'] != 'tool' -%}
    {%- set ns.prev_message_type = None -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {#- Detect continuation using tracked state — O(1) instead of O(n) backward scan -#}
    {%- set continue_same_model_turn = (role == 'model' and ns.prev_non_tool_role == 'assistant') -%}
    {%- if not continue_same_model_turn -%}
        {{- '<|turn>' + role + '\n' }}

    {%- endif -%}

    {#- Render reasoning/reasoning_content as thinking channel -#}
    {%- set thinking_text = message.get('reasoning') or message.get('reasoning_content') -%}
    {%- set thinking_gate = (loop.index0 > ns_turn.last_user_idx) or (preserve_thinking and message.get('tool_calls')) -%}
    {%- if thinking_text and thinking_gate -%}
        {{- '<|channel>thought\n' + thinking_text + '\n<channel|>' -}}
    {%- endif -%}

            {%- if message.get('tool_calls') -%}
                {%- for tool_call in message.get('tool_calls') -%}
                    {%- set function = tool_call['function'] -%}
                    {{- '<|tool_call>call:' + function['name'] + '{' -}}
                    {%- if function['arguments'] is mapping -%}
                        {%- set ns_args = namespace(found_first=false) -%}
                        {%- for key, value in function['arguments'] | dictsort -%}
                            {%- if ns_args.found_first %},{% endif -%}
                            {%- set ns_args.found_first = true -%}
                            {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- endfor -%}
                    {%- elif function['arguments'] is none -%}
                    {%- else -%}
                        {{- raise_exception(
                            "chat_template: tool_calls[].function.arguments must be a "
                            "JSON object (mapping), not a string. Deserialize arguments "
                            "before passing to the template."
                        ) -}}
                    {%- endif -%}
                    {{- '}<tool_call|>' -}}
                {%- endfor -%}
                {%- set ns.prev_message_type = 'tool_call' -%}
            {%- endif -%}

            {%- set ns_tr_out = namespace(flag=false) -%}
            {%- if message.get('tool_responses') -%}
                {#- Legacy: tool_responses embedded on the assistant message (Google/Gemma native) -#}
                {%- for tool_response in message.get('tool_responses') -%}
                    {{- format_tool_response_block(tool_response['name'] | default('unknown', true), tool_response['response']) -}}
                    {%- set ns_tr_out.flag = true -%}
                    {%- set ns.prev_message_type = 'tool_response' -%}
                {%- endfor -%}
            {%- elif message.get('tool_calls') -%}
                {#- OpenAI Chat Completions: forward-scan consecutive role:tool messages -#}
                {%- set ns_tool_scan = namespace(stopped=false) -%}
                {%- for k in range(loop.index0 + 1, loop_messages | length) -%}
                    {%- if ns_tool_scan.stopped -%}
                    {%- elif loop_messages[k]['role'] != 'tool' -%}
                        {%- set ns_tool_scan.stopped = true -%}
                    {%- else -%}
                        {%- set follow = loop_messages[k] -%}
                        {#- Resolve tool_call_id to function name -#}
                        {%- set ns_tname = namespace(name=follow.get('name') or 'unknown') -%}
                        {%- for tc in message.get('tool_calls') -%}
                            {%- if tc.get('id') == follow.get('tool_call_id') -%}
                                {%- set ns_tname.name = tc['function']['name'] -%}
                            {%- endif -%}
                        {%- endfor -%}
                        {#- Handle content as string or content-parts array -#}
                        {%- set tool_body = follow.get('content') -%}
                        {%- if tool_body is string -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- elif tool_body is sequence and tool_body is not string -%}
                            {%- set ns_txt = namespace(s='') -%}
                            {%- for part in tool_body -%}
                                {%- if part.get('type') == 'text' -%}
                                    {%- set ns_txt.s = ns_txt.s + (part.get('text') | default('')) -%}
                                {%- endif -%}
                            {%- endfor -%}
                            {{- format_tool_response_block(ns_tname.name, ns_txt.s) -}}
                            {%- for part in tool_body -%}
                                {%- if part.get('type') in ['image', 'image_url'] -%}
                                    {{- '<|image|>' -}}
                                {%- elif part.get('type') in ['audio', 'input_audio'] -%}
                                    {{- '<|audio|>' -}}
                                {%- elif part.get('type') == 'video' -%}
                                    {{- '<|video|>' -}}
                                {%- endif -%}
                            {%- endfor -%}
                        {%- else -%}
                            {{- format_tool_response_block(ns_tname.name, tool_body) -}}
                        {%- endif -%}
                        {%- set ns_tr_out.flag = true -%}
                        {%- set ns.prev_message_type = 'tool_response' -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

            {%- set captured_content -%}
            {%- if message.get('content') is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message.get('content') is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item.get('type') == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- elif item.get('type') in ['image', 'image_url'] -%}
                        {{- '<|image|>' -}}
                    {%- elif item.get('type') in ['audio', 'input_audio'] -%}
                        {{- '<|audio|>' -}}
                    {%- elif item.get('type') == 'video' -%}
                        {{- '<|video|>' -}}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}
            {%- endset -%}

            {{- captured_content -}}
            {%- set has_content = captured_content | trim | length > 0 -%}

        {#- Forward-scan: find next non-tool message role for continuation detection -#}
        {%- set next_nt = namespace(role=None, found=false) -%}
        {%- for j in range(loop.index0 + 1, loop_messages | length) -%}
            {%- if not next_nt.found -%}
                {%- if loop_messages[j]['role'] != 'tool' -%}
                    {%- set next_nt.role = loop_messages[j]['role'] -%}
                    {%- set next_nt.found = true -%}
                {%- endif -%}
            {%- endif -%}
        {%- endfor -%}

        {%- set continues_into_next = (
            role == 'model'
            and next_nt.role == 'assistant'
            and (not message.get('tool_calls') or ns_tr_out.flag)
        ) -%}

        {%- if ns.prev_message_type == 'tool_call' and not ns_tr_out.flag -%}
            {{- '<|tool_response>' -}}
        {%- elif continues_into_next -%}
        {%- elif not (ns_tr_out.flag and not has_content and not next_nt.found) -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}

    {#- Track previous non-tool role for next iteration (avoids O(n) backward scan) -#}
    {%- set ns.prev_non_tool_role = message['role'] -%}
    {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' and ns.prev_message_type != 'tool_call' -%}
        {{- '<|turn>model\n' -}}
        {%- if not enable_thinking -%}
            {{- '<|channel>thought\n<channel|>' -}}
        {%- endif -%}
    {%- elif ns.prev_message_type == 'tool_response' and enable_thinking -%}
        {{- '<|channel>thought\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def _gemma4_e_series_template(large: str) -> str:
    """Gemma 4 E2B/E4B's chat template, from the large models' one (they differ in exactly these bytes).

    google/gemma-4-E2B-it@3e22461f / @8995379 and gemma-4-E4B-it@ee0ef602 ship it (18569 bytes; TRL keeps the
    same file as trl/chat_templates/gemma4_v5.jinja, "the current revision" of gemma-4-E2B-it). Its generation
    prompt is a bare "<|turn>model\\n": it leaves out the large models' empty thought channel.
    """
    no_thinking_block = (
        "        {%- if not enable_thinking -%}\n"
        "            {{- '<|channel>thought\\n<channel|>' -}}\n"
        "        {%- endif -%}\n"
    )
    blank_line = "{{- '<|turn>' + role + '\\n' }}\n\n    {%- endif -%}"
    for part in (no_thinking_block, blank_line):
        if large.count(part) != 1:
            raise RuntimeError("GEMMA4_LARGE_CHAT_TEMPLATE is not the published template")
    return large.replace(no_thinking_block, "").replace(blank_line, blank_line.replace("\n\n", "\n"))


# Gemma 4 E2B and E4B (the on-device models, with vision and audio), see _gemma4_e_series_template.
GEMMA4_CHAT_TEMPLATE = _gemma4_e_series_template(GEMMA4_LARGE_CHAT_TEMPLATE)

# SHA-256 of each published chat_template.jinja (UTF-8), as recorded for the checkpoints named above.
CHAT_TEMPLATE_SHA256: dict[str, str] = {
    "GEMMA_CHAT_TEMPLATE": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
    "GEMMA3_CHAT_TEMPLATE": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
    "GEMMA3N_CHAT_TEMPLATE": "ac03dcb3b09726f1e50ac55ae58fc8d5930eadc3b3a12cb04286dc1d82ac8001",
    "GEMMA4_CHAT_TEMPLATE": "0a2c8073c878ab1da004bee933a998606537bbb62016310352c7285c3f01c5b5",
    "GEMMA4_LARGE_CHAT_TEMPLATE": "ae53464bf3be25802b3a5b37def7fd89667067d7577049b3b2d74c4d8de4c6d4",
}

# The template each arch's tokenizer gets with chat_template=True: that of the real checkpoints it mirrors.
# gemma4 (dense, per-layer input embeddings) and gemma4_mm (vision + audio) mirror E2B/E4B; gemma4_moe mirrors
# 26B-A4B (MoE, keys shared as values, no per-layer inputs), whose template is the large models' one.
CHAT_TEMPLATES: dict[str, str] = {
    "gemma3": GEMMA3_CHAT_TEMPLATE,
    "gemma2": GEMMA_CHAT_TEMPLATE,
    "gemma": GEMMA_CHAT_TEMPLATE,
    "gemma3_mm": GEMMA3_CHAT_TEMPLATE,
    "gemma3n_text": GEMMA3N_CHAT_TEMPLATE,
    "gemma4": GEMMA4_CHAT_TEMPLATE,
    "gemma4_moe": GEMMA4_LARGE_CHAT_TEMPLATE,
    "gemma4_mm": GEMMA4_CHAT_TEMPLATE,
}

# ---------------------------------------------------------------------------------------------------
# Published turn formats, as data
# ---------------------------------------------------------------------------------------------------
# The conversation every FAMILY_TURNS[arch]["example"] renders (families without a system role drop the
# system message: their templates raise on it).
EXAMPLE_MESSAGES: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
)

# Gemma 1/2/3 (https://ai.google.dev/gemma/docs/formatting): "<start_of_turn>user\n...<end_of_turn>\n",
# "<start_of_turn>model\n...<end_of_turn>\n"; roles user and model only. Gemma 1 and 2 have no system role
# (their template raises); Gemma 3's template puts the system text, then a blank line, at the head of the first
# user turn (the page's advice: "provide system-level instructions directly within the initial user prompt").
_GEMMA_TURNS = {
    "bos": "<bos>",
    "start_of_turn_token": "<start_of_turn>",
    "end_of_turn_token": "<end_of_turn>",
    "user_prefix": "<start_of_turn>user\n",
    "model_prefix": "<start_of_turn>model\n",
    "end_of_turn": "<end_of_turn>\n",
    "system_prefix": None,
    "generation_prompt": "<start_of_turn>model\n",
    "thinking": None,
}
# Gemma 4 (https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4): "<|turn>system\n...<turn|>\n",
# "<|turn>user\n...<turn|>\n", "<|turn>model\n...<turn|>\n"; thinking is switched on by "<|think|>" at the head
# of the system turn and the model then thinks in "<|channel>thought\n...<channel|>" before its answer. The
# generation prompt (thinking off, the default) differs by checkpoint: E2B/E4B end it at "<|turn>model\n", the
# large models (12B, 26B-A4B, 31B) add an empty, closed thought channel.
_GEMMA4_TURNS = {
    "bos": "<bos>",
    "start_of_turn_token": "<|turn>",
    "end_of_turn_token": "<turn|>",
    "user_prefix": "<|turn>user\n",
    "model_prefix": "<|turn>model\n",
    "end_of_turn": "<turn|>\n",
    "system": "own_turn",
    "system_prefix": "<|turn>system\n",
    "thinking": {
        "system_prefix": "<|turn>system\n<|think|>\n",  # enable_thinking=True
        "channel_open": "<|channel>thought\n",
        "channel_close": "<channel|>",
    },
}
_GEMMA12_EXAMPLE = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
_GEMMA3_EXAMPLE = (
    "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
)
_GEMMA4_EXAMPLE = "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nYo<turn|>\n"

# FAMILY_TURNS[arch]: the family's published turn format. "system" is "unsupported" (the template raises),
# "first_user_turn" (system text + "\n\n" lead the first user message) or "own_turn" (system_prefix ...
# end_of_turn); "generation_prompt" is what add_generation_prompt=True appends (thinking off); "example" is
# EXAMPLE_MESSAGES rendered (without the system message where it is unsupported); "media" are the placeholder
# tokens the template writes for image / audio / video content items (single tokens in every tokenizer here
# except gemma3's, which keeps the original 7 specials and so lacks Gemma 3's image tokens).
FAMILY_TURNS: dict[str, dict] = {
    "gemma": {**_GEMMA_TURNS, "system": "unsupported", "example": _GEMMA12_EXAMPLE, "media": {}},
    "gemma2": {**_GEMMA_TURNS, "system": "unsupported", "example": _GEMMA12_EXAMPLE, "media": {}},
    "gemma3": {**_GEMMA_TURNS, "system": "first_user_turn", "example": _GEMMA3_EXAMPLE,
               "media": {"image": "<start_of_image>"}},
    "gemma3_mm": {**_GEMMA_TURNS, "system": "first_user_turn", "example": _GEMMA3_EXAMPLE,
                  "media": {"image": "<start_of_image>"}},
    "gemma3n_text": {**_GEMMA_TURNS, "system": "first_user_turn", "example": _GEMMA3_EXAMPLE,
                     "media": {"image": "<image_soft_token>", "audio": "<audio_soft_token>"}},
    "gemma4": {**_GEMMA4_TURNS, "generation_prompt": "<|turn>model\n", "example": _GEMMA4_EXAMPLE,
               "media": {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}},
    "gemma4_moe": {**_GEMMA4_TURNS, "generation_prompt": "<|turn>model\n<|channel>thought\n<channel|>",
                   "example": _GEMMA4_EXAMPLE,
                   "media": {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}},
    "gemma4_mm": {**_GEMMA4_TURNS, "generation_prompt": "<|turn>model\n", "example": _GEMMA4_EXAMPLE,
                  "media": {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}},
}

# ---------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------

_GENRES = ("comedy", "drama", "horror", "romance", "scifi", "action", "thriller", "documentary")
_OCCUPATIONS = (
    "engineer", "teacher", "student", "doctor", "artist", "writer", "lawyer", "nurse", "programmer",
    "scientist", "librarian", "farmer", "retired", "salesman", "technician", "executive", "homemaker",
    "administrator", "educator", "entertainment", "healthcare", "marketing", "none",
)  # fmt: skip
_GENDERS = ("female", "male", "other")
_ADJECTIVES = (
    "great", "boring", "funny", "scary", "beautiful", "slow", "exciting", "classic", "original", "dark",
    "charming", "clever", "predictable", "wonderful", "terrible", "brilliant", "strange", "moving",
    "violent", "gentle", "popular", "underrated", "famous", "recent", "short", "long",
)  # fmt: skip
_NOUNS = (
    "movie", "film", "story", "ending", "actor", "actress", "director", "plot", "soundtrack", "scene",
    "character", "series", "season", "episode", "book", "song", "album", "game", "product", "review",
    "friend", "family", "weekend", "evening", "cinema", "screen", "sequel", "trailer",
)  # fmt: skip
_VERBS = (
    "liked", "loved", "watched", "enjoyed", "hated", "recommended", "rated", "skipped", "bought",
    "finished", "started", "remembered", "preferred", "avoided", "shared", "reviewed",
)  # fmt: skip
_QUESTIONS = (
    "Which genre does this user prefer?",
    "Will the user like item {item} ({genre})?",
    "Recommend a genre for this user.",
    "What rating would the user give item {item}?",
    "Predict the next item the user will watch.",
)


def default_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Return ``n_lines`` deterministic lines of synthetic user-modelling text.

    Profiles, interaction histories with ratings, free-text reviews, queries and answers, as a
    training script would see them, so the learned merges cover the words it will tokenize.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n_lines:
        genre = rng.choice(_GENRES)
        lines.append(
            f"User profile: age {rng.randint(18, 79)}, gender: {rng.choice(_GENDERS)}, "
            f"occupation: {rng.choice(_OCCUPATIONS)}, zip {rng.randint(10000, 99999)}."
        )
        history = "; ".join(
            f"item {rng.randint(0, 999)} ({rng.choice(_GENRES)}) rating {rng.randint(1, 5)}/5"
            for _ in range(rng.randint(2, 5))
        )
        lines.append(f"Interaction history: {history}.")
        lines.append(
            f"The user {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_GENRES)} "
            f"{rng.choice(_NOUNS)} with a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} and "
            f"{rng.choice(_VERBS)} the {rng.choice(_NOUNS)}, saying it was \"{rng.choice(_ADJECTIVES)}\"."
        )
        question = rng.choice(_QUESTIONS).format(item=rng.randint(0, 999), genre=genre)
        lines.append(f"Query: {question}\nAnswer: {genre}")
        lines.append(f"user\n{question}\nmodel\nThe user prefers {genre}! Score = {rng.random():.2f} (0-9).")
    return lines[:n_lines]


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def special_tokens_for(arch: str) -> tuple[str, ...]:
    """The special tokens of ``arch``'s tiny tokenizer, in id order (ids 0, 1, 2, ...)."""
    _check_arch(arch)
    if arch.startswith("gemma4"):
        return GEMMA4_SPECIAL_TOKENS
    if arch == "gemma3_mm":
        return (*SPECIAL_TOKENS, *GEMMA3_IMAGE_TOKENS)
    if arch == "gemma3n_text":
        return (*SPECIAL_TOKENS, *GEMMA3N_MEDIA_TOKENS)
    return SPECIAL_TOKENS


def _train_bpe(
    corpus: Iterable[str], vocab_size: int, specials: tuple[str, ...] = SPECIAL_TOKENS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Gemma-style BPE and return its ``(vocab, merges)``.

    Gemma normalises spaces to "▁" and splits digits into single tokens; training mirrors that (words
    split before each "▁", newlines and digits isolated) so no learned piece crosses a word or line
    boundary or joins digits. (GemmaTokenizer itself applies the merges to the whole text, unsplit.)
    The specials and the 256 byte pieces are passed as the trainer's special tokens, which puts them
    first, in order: ids 0..6 for SPECIAL_TOKENS, 7..262 for the bytes (later for longer ``specials``).
    """
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*specials, *_BYTE_TOKENS],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None,
    *,
    chat_template: bool = False,
    vocab_size: int = VOCAB_SIZE,
    arch: str = "gemma3",
) -> GemmaTokenizer:
    """Train and return a tiny ``GemmaTokenizer`` of ``arch``'s family (BPE, byte fallback, its specials).

    ``chat_template=True`` sets the family's published template (:data:`CHAT_TEMPLATES`).
    """
    specials = special_tokens_for(arch)
    lines: Iterable[str] = default_corpus() if corpus is None else corpus
    vocab, merges = _train_bpe(lines, vocab_size, specials)
    for i, token in enumerate(specials):
        if vocab.get(token) != i:  # the trainer places special tokens first; guard that assumption
            raise RuntimeError(f"tokenizer training put {token!r} at id {vocab.get(token)}, expected {i}")
    template = CHAT_TEMPLATES[arch] if chat_template else None
    common = dict(
        vocab=vocab,
        merges=merges,
        add_eos_token=False,
        # Right padding for training; transformers' GemmaTokenizer class default (and Gemma 4's config) is "left".
        padding_side="right",
        chat_template=template,
    )
    if arch in ("gemma3", "gemma2", "gemma"):
        return GemmaTokenizer(
            **common,
            # add_bos_token must be passed: the backend's own default is False, whatever the docstring says.
            add_bos_token=True,
            extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
    if arch.startswith("gemma4"):
        # Gemma 4's tokenizer does not add <bos> itself: Google's conversion (transformers'
        # convert_gemma4_weights.py) builds it with add_bos_token=False and its chat template writes <bos>.
        tokenizer = GemmaTokenizer(**common, add_bos_token=False, extra_special_tokens=dict(GEMMA4_NAMED_TOKENS))
        unnamed = ["<|video|>"]
    else:  # gemma3_mm, gemma3n_text: Gemma 3's tokenizer plus the media tokens, named as their processors read them
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        if arch == "gemma3n_text":
            named |= {"boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
        tokenizer = GemmaTokenizer(**common, add_bos_token=True, extra_special_tokens=named)
        unnamed = ["<start_of_turn>", "<end_of_turn>"]
    tokenizer.add_special_tokens({"additional_special_tokens": unnamed})  # already in the vocab: ids unchanged
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"special tokens changed the vocabulary size: {len(vocab)} -> {len(tokenizer)}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def _check_arch(arch: str) -> None:
    if arch in UNBUILDABLE_ARCHS:
        raise ValueError(f"arch {arch!r} cannot be built here: {UNBUILDABLE_ARCHS[arch]}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def _gemma4_text_config(common: dict, local_global: dict, *, moe: bool) -> Gemma4TextConfig:
    """A tiny Gemma 4 language model: E2B/E4B-like (dense, per-layer inputs) or 26B-A4B-like (MoE)."""
    shape = dict(
        global_head_dim=64,  # full-attention layers' head size (real: 512), partial rotary over a quarter of it
        final_logit_softcapping=30.0,  # as every released Gemma 4
        num_kv_shared_layers=0,  # E2B/E4B share KV across their last layers; 2 layers leave none to share
    )
    if moe:  # 26B-A4B: a dense MLP plus a routed MoE in every layer, values = keys on global layers
        shape |= dict(
            hidden_size_per_layer_input=0,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            attention_k_eq_v=True,
            num_key_value_heads=2,  # 2 KV heads on sliding layers, 1 on global ones (26B-A4B: 8 and 2)
            num_global_key_value_heads=1,
            use_bidirectional_attention="vision",  # as 26B-A4B: image tokens see each other (no effect on text)
        )
    else:  # E2B/E4B: per-layer input embeddings (PLE), 16 wide per layer (real: 256)
        shape |= dict(hidden_size_per_layer_input=16, vocab_size_per_layer_input=common["vocab_size"])
    # Per-layer values land in config.per_layer_config (layer 1, the global one: head_dim 64, and for the MoE
    # num_key_value_heads 1); reading config.head_dim then raises AmbiguousGlobalPerLayerAttributeError, as it
    # does for the real checkpoints.
    return Gemma4TextConfig(**{**common, **local_global, **shape})


def _build_model(arch: str, tokenizer: GemmaTokenizer) -> PreTrainedModel:
    """Return a randomly initialised tiny model of the given Gemma family (float32)."""
    _check_arch(arch)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        attn_implementation="eager",  # Gemma 2/3 recommend eager (soft-capping); deterministic on CPU
    )
    # Gemma 2/3/3n/4: one local (sliding-window) and one global layer, so both attention paths run; the
    # window is shorter than typical test sequences so it actually masks something.
    local_global = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    gemma23 = dict(query_pre_attn_scalar=32)  # = head_dim, as in the real models
    if arch == "gemma3":
        model: PreTrainedModel = Gemma3ForCausalLM(Gemma3TextConfig(**common, **local_global, **gemma23))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, **local_global, **gemma23))
    elif arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common))
    elif arch == "gemma3_mm":
        # SigLIP as in gemma-3-4b-it (no pooling head, tanh GELU), at 28x28 pixels in 14x14 patches: 4 patches,
        # one soft token each (mm_tokens_per_image=4; real: 896 px, 4096 patches pooled to 256 tokens).
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_use_head=False,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            attn_implementation="eager",
        )
        config = Gemma3Config(
            text_config=Gemma3TextConfig(**common, **local_global, **gemma23),
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
        model = Gemma3ForConditionalGeneration(config)
    elif arch == "gemma3n_text":
        text = Gemma3nTextConfig(
            **common,
            **local_global,
            vocab_size_per_layer_input=len(tokenizer),
            hidden_size_per_layer_input=16,  # per-layer input embeddings (real: 256)
            laurel_rank=8,  # real: 64
            altup_num_inputs=4,  # as the real model
            num_kv_shared_layers=0,  # real: the last 15 (E4B) / 10 (E2B) layers reuse earlier KV
            activation_sparsity_pattern=[0.95, 0.0],  # real: 0.95 on the first 10 layers
        )
        model = Gemma3nForCausalLM(text)
    elif arch in ("gemma4", "gemma4_moe"):
        model = Gemma4ForCausalLM(_gemma4_text_config(common, local_global, moe=arch == "gemma4_moe"))
    elif arch == "gemma4_mm":
        # E2B/E4B: the vision encoder (clipped linears, 3x3 pooling of 16x16 patches) and the USM conformer
        # audio encoder, each one layer of width 32. The audio subsampler's first conv must keep 128 channels:
        # transformers sizes its input projection as channels[0] // 4 * channels[1], which is only right when
        # channels[0] equals the 128 mel bins of Gemma4AudioFeatureExtractor.
        vision = Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=16,
            pooling_kernel_size=3,
            position_embedding_size=64,  # real: 10240
            use_clipped_linears=True,
            attn_implementation="eager",
        )
        audio = Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[128, 4],  # real: [128, 32]
            output_proj_dims=32,  # real: 1536
            attn_implementation="eager",  # the only attention its chunked local attention implements
        )
        config = Gemma4Config(
            text_config=_gemma4_text_config(common, local_global, moe=False),
            vision_config=vision,
            audio_config=audio,
            boi_token_id=tokenizer.boi_token_id,
            eoi_token_id=tokenizer.eoi_token_id,
            image_token_id=tokenizer.image_token_id,
            video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
            boa_token_id=tokenizer.boa_token_id,
            eoa_token_index=tokenizer.eoa_token_id,
            audio_token_id=tokenizer.audio_token_id,
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
        model = Gemma4ForConditionalGeneration(config)
    else:  # pragma: no cover - _check_arch already refused it
        raise ValueError(arch)
    return model.to(torch.float32)


def build_tiny_gemma(
    out_dir: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    chat_template: bool = False,
    seed: int = 0,
    arch: str = "gemma3",
) -> Path:
    """Write a tiny random-weight Gemma and its tokenizer into ``out_dir``; return the path.

    Args:
        out_dir: directory to create (or overwrite files in).
        corpus: lines to train the BPE on; default: :func:`default_corpus` (user-modelling text).
        chat_template: set the family's published chat template (:data:`CHAT_TEMPLATES`: Gemma 3's for
            ``"gemma3"``); otherwise the tokenizer has none.
        seed: seeds the weight initialisation (``torch.manual_seed``); same seed, same weights.
        arch: one of :data:`ARCHS`: ``"gemma3"`` (Gemma3ForCausalLM), ``"gemma2"``, ``"gemma"``,
            ``"gemma3_mm"``, ``"gemma3n_text"``, ``"gemma4"``, ``"gemma4_moe"`` or ``"gemma4_mm"``.

    The directory then loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` without any network access.
    """
    _check_arch(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(corpus, chat_template=chat_template, arch=arch)
    tokenizer.save_pretrained(out)

    # Seed only around model construction, restoring the caller's RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(arch, tokenizer)
    model.save_pretrained(out)  # float32 safetensors
    _persist_eager_attention(out / "config.json")
    return out


def _persist_eager_attention(config_path: Path) -> None:
    """Make ``from_pretrained`` default to eager attention for this checkpoint.

    transformers 5 never serialises the attention implementation (``_attn_implementation_internal``
    is dropped on save), so a reload would pick sdpa. A top-level ``"attn_implementation"`` key in
    config.json is honoured on load, and an explicit ``attn_implementation=`` argument still wins.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["attn_implementation"] = "eager"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python tests/tiny_gemma.py OUT_DIR [--chat_template] [--arch gemma3] [--seed 0]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model and tokenizer into")
    parser.add_argument("--chat_template", action="store_true", help="set the family's published chat template")
    parser.add_argument("--arch", choices=ARCHS, default="gemma3", help="Gemma family (default gemma3)")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    args = parser.parse_args(argv)
    path = build_tiny_gemma(args.out_dir, chat_template=args.chat_template, seed=args.seed, arch=args.arch)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
