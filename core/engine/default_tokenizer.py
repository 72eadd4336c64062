"""The embedded default's tokenizer, generated deterministically in code (no files, no download).

512 ids, the same as the byte tokenizer it replaces: 0 `<｜begin▁of▁sentence｜>` (BOS), 1 `<｜end▁of▁sentence｜>` (EOS),
2 `<｜▁pad▁｜>`, 3 + b = byte b (a byte-level BPE with no merges, so every byte string round-trips and
`encode(text) == [0] + [3 + b for b in text.encode()]`), then DeepSeek-V3's chat and tool markers (`<｜User｜>`,
`<｜Assistant｜>`, `<｜tool▁calls▁begin｜>`, ...) and reserved tokens up to id 511, all special (skipped when decoding,
so any id the model emits decodes as the byte tokenizer decoded it). The chat template has DeepSeek-V3's structure:
BOS, the system prompts joined by blank lines, `<｜User｜>…`, `<｜Assistant｜>…<｜end▁of▁sentence｜>`, tool calls and
outputs, and `<｜Assistant｜>` for `add_generation_prompt`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 512
BYTE_OFFSET = 3
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
TOOL_MARKERS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
                "<｜tool▁sep｜>")

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', has_system=false, in_outputs=false) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if ns.has_system %}{% set ns.system = ns.system + '\n\n' + message['content'] %}"
    "{%- else %}{% set ns.system = message['content'] %}{% set ns.has_system = true %}{% endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.in_outputs = false -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.in_outputs %}{{- '<｜tool▁outputs▁end｜>' -}}{%- else %}{{- '<｜Assistant｜>' -}}{%- endif -%}"
    "{%- set ns.in_outputs = false -%}"
    "{{- message.get('content', '') -}}"
    "{%- if message.get('tool_calls') -%}"
    "{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "{%- if args is not string %}{% set args = args | tojson %}{% endif -%}"
    "{%- if not loop.first %}{{- '\n' -}}{% endif -%}"
    "{{- '<｜tool▁call▁begin｜>' + call.get('type', 'function') + '<｜tool▁sep｜>' + call['function']['name']"
    " + '\n```json\n' + args + '\n```<｜tool▁call▁end｜>' -}}"
    "{%- endfor -%}"
    "{{- '<｜tool▁calls▁end｜>' -}}"
    "{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if ns.in_outputs %}{{- '\n<｜tool▁output▁begin｜>' -}}"
    "{%- else %}{{- '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' -}}{%- endif -%}"
    "{%- set ns.in_outputs = true -%}"
    "{{- message['content'] + '<｜tool▁output▁end｜>' -}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': expected system, user, assistant or tool') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_outputs %}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}"
    "{%- if add_generation_prompt and not ns.in_outputs %}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizerFast",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
    "pad_token": {"__type": "AddedToken", "content": PAD, "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False},
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 2048,
    "chat_template": CHAT_TEMPLATE,
}


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other 68 bytes map to
    code points 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def special_tokens() -> list[str]:
    """The special tokens in id order: 0..2, then 259..511."""
    named = [USER, ASSISTANT, *TOOL_MARKERS]
    reserved = [f"<｜reserved▁{i}｜>" for i in range(VOCAB_SIZE - BYTE_OFFSET - 256 - len(named))]
    return [BOS, EOS, PAD, *named, *reserved]


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The default's tokenizer.json text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = special_tokens()
    vocab = {tok: i for i, tok in enumerate(specials[:BYTE_OFFSET])}
    vocab.update({ch: BYTE_OFFSET + b for b, ch in byte_to_unicode().items()})
    vocab.update({tok: BYTE_OFFSET + 256 + i for i, tok in enumerate(specials[BYTE_OFFSET:])})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend.to_str()


def default_tokenizer(extra_eos_ids: Iterable[int] = ()):
    """The embedded default's `core.engine.tokenizer.Tokenizer`."""
    from tokenizers import Tokenizer as Backend

    from core.engine.tokenizer import Tokenizer

    return Tokenizer(Backend.from_str(tokenizer_json()), TOKENIZER_CONFIG, "embedded default tokenizer",
                     TOKENIZER_CONFIG["chat_template"], extra_eos_ids)


def write_tokenizer_files(directory: Path) -> None:
    """Write the default's tokenizer.json and tokenizer_config.json into a checkpoint directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, ensure_ascii=False, indent=2),
                                                     encoding="utf-8")
