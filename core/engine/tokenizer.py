"""A checkpoint's tokenizer through the `tokenizers` library, with special tokens, BOS and the chat template from
`tokenizer_config.json` handled as transformers 5 (`TokenizersBackend`, which DeepSeek-V3's `LlamaTokenizerFast`
with a byte-level `tokenizer.json` loads as) handles them:

- BOS/EOS on plain `encode` come from `tokenizer.json`'s post-processor (DeepSeek-V3's is a `TemplateProcessing`
  that prepends `<｜begin▁of▁sentence｜>`). transformers >= 5 drops `add_bos_token`/`add_eos_token` from
  tokenizer_config.json whenever a tokenizer.json exists, so they change nothing here either; a tokenizer.json
  without a post-processor adds nothing.
- `bos_token`, `eos_token`, `pad_token`, ... are strings or AddedToken objects (`{"__type": "AddedToken",
  "content": ...}`); one the tokenizer.json lacks is added as a special token, as transformers does.
- `chat_template` is a string or a list of named templates; a `chat_template.jinja` file takes priority.

Text input: a str with lone surrogates (what Python makes of invalid UTF-8 in argv, or `errors="surrogateescape"`)
is cleaned first: the bytes are decoded with errors="replace", so each invalid sequence becomes U+FFFD, which a
byte-level tokenizer encodes like any character. Text the tokenizer cannot map (no byte fallback, no unk token) is
refused in one line. Decoding skips ids the vocabulary does not have.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.engine.chat import ChatTemplate
from core.engine.tokenizer_files import read_tokenizer_json, read_tokenizer_text, tokenizer_file_path
from core.errors import CheckpointError, UserError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with invalid UTF-8 made valid: lone surrogates from `surrogateescape` (invalid bytes in argv, stdin or a
    file read that way) go back to their bytes and are decoded with errors="replace"; any other lone surrogate becomes
    U+FFFD. Valid text is returned unchanged."""
    if not _SURROGATE.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def decode_input_bytes(data: bytes) -> str:
    """Prompt bytes from a file or stdin as text; invalid UTF-8 becomes U+FFFD (errors="replace")."""
    return data.decode("utf-8", "replace")


def token_content(value: Any, field: str, origin: str) -> str | None:
    """A special token given as a string, an AddedToken object ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{origin}: tokenizer_config.json {field} must be a string or an object with a string "
                          f"'content', got {str(value)[:80]!r}")


def _added_token(value: Any, content: str):
    from tokenizers import AddedToken

    flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized")
             if isinstance(value, Mapping) and k in value}
    flags.setdefault("normalized", False)
    return AddedToken(content, special=True, **flags)


class Tokenizer:
    """`backend` is a `tokenizers.Tokenizer`; `config` the parsed tokenizer_config.json (may be empty); `origin`
    names the checkpoint directory in messages; `chat_template` is tokenizer_config.json's `chat_template` value."""

    def __init__(self, backend, config: Mapping[str, Any], origin: str, chat_template: Any = None,
                 extra_eos_ids: Iterable[int] = ()):
        self.backend = backend
        self.origin = origin
        self.special_tokens: dict[str, str] = {}
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for field in NAMED_SPECIAL_TOKENS:
            content = token_content(config.get(field), field, origin)
            if content is None:
                continue
            self.special_tokens[field] = content
            if content not in present:
                backend.add_tokens([_added_token(config.get(field), content)])
                present.add(content)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        eos = {int(i) for i in extra_eos_ids}
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template: ChatTemplate | None = None
        if chat_template is not None:
            self.chat_template = ChatTemplate.from_config_value(chat_template, self.special_tokens, origin)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id) if 0 <= token_id < 2 ** 32 else None

    @property
    def adds_bos(self) -> bool:
        """Whether plain `encode` puts the BOS first (tokenizer.json's post-processor says)."""
        return self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` the post-processor's BOS/EOS are added (transformers'
        `encode`). Invalid UTF-8 is cleaned (see `clean_text`); unmappable text is one UserError line."""
        if not isinstance(text, str):
            raise UserError(f"tokenizer ({self.origin}): expected text, got {type(text).__name__}")
        text = clean_text(text)
        try:
            return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)
        except Exception as e:  # the tokenizers library raises its own exception type
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"tokenizer ({self.origin}) cannot encode the text {text[:40]!r}: {msg}") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens skipped by default, as DeepSeek's demo decodes); ids outside the vocabulary
        decode to nothing; invalid UTF-8 in byte-level tokens becomes U+FFFD."""
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.backend.decode(known, skip_special_tokens=skip_special_tokens)

    def require_chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise UserError(f"{self.origin} has no chat template (no 'chat_template' in tokenizer_config.json and no "
                            "chat_template.jinja)")
        return self.chat_template

    def render_chat(self, messages: Any, add_generation_prompt: bool = True, **variables: Any) -> str:
        """The conversation as text, through the chat template (transformers' `apply_chat_template(tokenize=False)`)."""
        return self.require_chat_template().render(messages, add_generation_prompt=add_generation_prompt, **variables)

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **variables: Any) -> list[int]:
        """Prompt ids of a conversation: the rendered text encoded without adding special tokens (the template
        writes the one BOS), as transformers' `apply_chat_template(tokenize=True)`."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **variables), add_special_tokens=False)


def has_tokenizer(directory: Path) -> bool:
    return tokenizer_file_path(directory, "tokenizer.json") is not None


def load_tokenizer(directory: Path | None, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
    """The tokenizer of checkpoint `directory` (tokenizer.json, tokenizer_config.json, chat_template.jinja), or of
    the embedded default when `directory` is None. `extra_eos_ids` (e.g. config.json's or generation_config.json's
    `eos_token_id`) join `eos_token_ids`."""
    if directory is None:
        from core.engine.default_tokenizer import default_tokenizer

        return default_tokenizer(extra_eos_ids)
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:
        raise UserError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers); "
                        "or pass --prompt-ids") from None
    text = read_tokenizer_text(directory, "tokenizer.json")
    if text is None:
        raise UserError(f"{directory} has no tokenizer.json")
    try:
        backend = Backend.from_str(text)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise CheckpointError(f"{directory / 'tokenizer.json'}: cannot load ({str(e).splitlines()[0]})") from None
    config = read_tokenizer_json(directory, "tokenizer_config.json") or {}
    template: Any = read_tokenizer_text(directory, "chat_template.jinja")
    origin = str(directory / ("chat_template.jinja" if template is not None else "tokenizer_config.json"))
    if template is None:
        template = config.get("chat_template")
    tok = Tokenizer(backend, config, str(directory), None, extra_eos_ids)
    if template is not None:
        tok.chat_template = ChatTemplate.from_config_value(template, tok.special_tokens, origin)
    return tok
