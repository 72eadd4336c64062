"""Tokenizer files for tests: a byte-level BPE trained on the spot with `tokenizers` (Chinese and emoji in the corpus,
so merges produce tokens that hold parts of multi-byte characters), laid out as DeepSeek-V3's checkpoint lays its
tokenizer out: `tokenizer.json` with DeepSeek-V3's pre-tokenizer shape (a digit/punctuation Split, then ByteLevel
without its own regex), the special tokens as added tokens and a BOS-prepending `TemplateProcessing`;
`tokenizer_config.json` with `LlamaTokenizerFast`, `add_bos_token`, AddedToken dicts and a chat template written
here in DeepSeek-V3's format."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
MARKERS = ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
           "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
           "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"]

CORPUS = [
    "DeepSeek-V3 runs on every accelerator. The quick brown fox jumps over the lazy dog 12345 times!",
    "你好，世界！深度求索的模型支持中文和多种语言。今天天气很好，我们一起去公园散步吧。",
    "Emoji: 😀😃😄 🎉🎊 👍🏽 ❤️ 🇨🇳 — mixed with text, 数字 2024 and punctuation… «quotes» “curly”",
    "def main():\n    print('hello world')\n    return 0\n\n# 注释 comment",
    "Ünïcödé àccents: café, naïve, über, señor, Ελληνικά, русский язык, العربية, हिन्दी",
]

# DeepSeek-V3's chat format, written for these tests: system prompts joined by a blank line after the BOS; user turns
# after <｜User｜>; assistant turns after <｜Assistant｜> closed by <｜end▁of▁sentence｜>; tool calls and tool outputs
# in their markers; <｜Assistant｜> at the end for add_generation_prompt.
DEEPSEEK_STYLE_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set st = namespace(sys='', seen_sys=false, tool=false, first_out=true) %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- if st.seen_sys %}{% set st.sys = st.sys + '\\n\\n' + m['content'] %}"
    "{%- else %}{% set st.sys = st.sys + m['content'] %}{% set st.seen_sys = true %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ st.sys }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{%- set st.tool = false -%}{{ '<｜User｜>' + m['content'] }}{%- endif %}"
    "{%- if m['role'] == 'assistant' and 'tool_calls' in m %}{%- set st.tool = false -%}"
    "{{ '<｜Assistant｜>' + m.get('content', '') + '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' }}"
    "{{ call['function']['arguments'] | tojson if call['function']['arguments'] is mapping"
    " else call['function']['arguments'] }}{{ '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- if st.tool %}{{ '<｜tool▁outputs▁end｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{%- set st.tool = false -%}"
    "{%- else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endif %}"
    "{%- if m['role'] == 'tool' %}{%- set st.tool = true -%}"
    "{%- if st.first_out %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set st.first_out = false %}"
    "{%- else %}{{ '\\n<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor -%}"
    "{% if st.tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt and not st.tool %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


@lru_cache(maxsize=4)
def trained_tokenizer_json(vocab_size: int = 700, bos_post_processor: bool = True) -> str:
    """A byte-level BPE trained on CORPUS (deterministic), as tokenizer.json text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[\s\p{P}]+|[^\s\p{P}]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, *MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok.to_str()


def write_deepseek_tokenizer(directory: Path, template=DEEPSEEK_STYLE_TEMPLATE, bos_post_processor: bool = True,
                             **config) -> Path:
    """A DeepSeek-V3-shaped tokenizer directory; `config` entries override tokenizer_config.json (None deletes)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(trained_tokenizer_json(bos_post_processor=bos_post_processor),
                                              encoding="utf-8")
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": added_token(BOS), "eos_token": added_token(EOS),
           "pad_token": added_token(EOS), "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True,
           "model_max_length": 131072, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast",
           "chat_template": template}
    cfg.update(config)
    cfg = {k: v for k, v in cfg.items() if v is not None or k == "unk_token"}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    (directory / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "bos_token_id": 0,
                                                       "eos_token_id": 1}))
    return directory


def hf_tokenizer(directory: Path):
    """transformers' tokenizer for `directory` (the oracle)."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoTokenizer.from_pretrained(str(directory))
