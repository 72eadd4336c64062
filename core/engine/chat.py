"""Chat templates: a checkpoint's Jinja `chat_template`, rendered in a sandbox exactly as transformers'
`apply_chat_template` renders it (transformers 5: `utils/chat_template_utils.py`).

Same environment (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, the loop-controls extension and a
`{% generation %}` tag), same globals (`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`), the
`tojson` filter as transformers defines it (no HTML escaping, `ensure_ascii=False`), and the same variables:
`messages` (None-valued keys dropped, reasoning aliased to `reasoning_content`/`thinking`), `tools`, `documents`,
`add_generation_prompt`, the tokenizer's named special tokens (`bos_token`, `eos_token`, `pad_token`, ...) and any
extra keyword variables, which override them. The template writes the BOS itself; the rendered text is encoded
without adding special tokens, as transformers does with `tokenize=True`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from core.errors import CheckpointError, UserError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _environment():
    """The Jinja environment transformers compiles chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` without the type's attributes."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes (no reaching CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def plain_data(value: Any) -> Any:
    """A copy made only of JSON types (str, int, float, bool, None, dict, list, tuple), as transformers gives the
    template: nothing with methods the sandbox does not know. Anything else becomes the string `<TypeName>`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    return f"<{type(value).__name__}>"


def check_messages(messages: Any) -> list[dict]:
    """Messages as the template sees them: a non-empty list of {role, content} dicts (None-valued keys dropped,
    reasoning aliased as transformers does). Anything else is one UserError line naming the message."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise UserError(f"chat messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise UserError("chat messages: the conversation is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise UserError(f"chat message {i}: expected an object with 'role' and 'content', "
                            f"got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise UserError(f"chat message {i}: 'role' must be a non-empty string, got {role!r:.80}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise UserError(f"chat message {i} ({role!r}): 'content' is missing")
        if content is not None and not isinstance(content, str):
            raise UserError(f"chat message {i} ({role!r}): 'content' must be a string, got {type(content).__name__}")
        m = {k: v for k, v in plain_data(dict(message)).items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class ChatTemplate:
    """One compiled chat template. `source` is the template text, or the named-templates form
    ({name: text}, from tokenizer_config.json's list `[{"name": ..., "template": ...}]`), from which `default`
    is used (`tool_use` when tools are given and it exists). `special_tokens` are the tokenizer's named special
    tokens as strings (`bos_token`, `eos_token`, ...); `origin` names the file for error messages."""

    def __init__(self, source: str | Mapping[str, str], special_tokens: Mapping[str, str] | None = None,
                 origin: str = "chat template"):
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        if isinstance(source, str):
            self.templates = {"default": source}
        elif isinstance(source, Mapping) and source and all(isinstance(k, str) and isinstance(v, str)
                                                            for k, v in source.items()):
            self.templates = dict(source)
        else:
            raise CheckpointError(f"{origin}: chat_template must be a string or a list of named templates")
        self._compiled: dict[str, Any] = {}
        self._env = _environment()

    @classmethod
    def from_config_value(cls, value: Any, special_tokens: Mapping[str, str] | None,
                          origin: str) -> "ChatTemplate":
        """From tokenizer_config.json's `chat_template`: a string or a list of {"name", "template"} objects."""
        if isinstance(value, list):
            named = {}
            for i, entry in enumerate(value):
                if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise CheckpointError(f"{origin}: chat_template[{i}] must be an object with string 'name' and "
                                          "'template'")
                named[entry["name"]] = entry["template"]
            value = named
        return cls(value, special_tokens, origin)

    def select(self, name: str | None = None, tools: Any = None) -> str:
        """The name of the template used: `name` if given, else `tool_use` with tools (when present), else
        `default`."""
        if name is not None:
            if name not in self.templates:
                raise UserError(f"{self.origin}: no chat template named {name!r} (have {sorted(self.templates)})")
            return name
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise UserError(f"{self.origin}: several chat templates {sorted(self.templates)} and none named 'default'")

    def _compile(self, name: str):
        if name not in self._compiled:
            try:
                self._compiled[name] = self._env.from_string(self.templates[name])
            except Exception as e:  # a template is untrusted input: any failure to compile is its error
                raise CheckpointError(f"{self.origin}: chat template {name!r} does not compile "
                                      f"({_first_line(e)})") from None
        return self._compiled[name]

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: Any = None, documents: Any = None,
               template_name: str | None = None, **variables: Any) -> str:
        """The conversation rendered as text (with the template's BOS). `variables` become template variables and
        override the special tokens of the same name."""
        chat = check_messages(messages)
        name = self.select(template_name, tools)
        template = self._compile(name)
        context = {**self.special_tokens, **plain_data(variables)}
        try:
            return template.render(messages=chat, tools=plain_data(tools), documents=plain_data(documents),
                                   add_generation_prompt=add_generation_prompt, **context)
        except Exception as e:  # raise_exception, undefined values, type errors: all the template's verdict
            raise UserError(f"{self.origin}: chat template failed: {_first_line(e)}") from None
