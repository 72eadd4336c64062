"""Tokenizer and chat template against transformers (the oracle) on DeepSeek-V3-shaped tokenizer files written here;
the embedded default's tokenizer; bad tokenizer files, bad messages and bad text as one-line errors."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine import tokenizer_files
from core.engine.default_tokenizer import write_tokenizer_files
from core.engine.tokenizer import clean_text, decode_input_bytes, load_tokenizer
from core.errors import CheckpointError, UserError
from core.tokenizer import ByteTokenizer, for_checkpoint
from tests.tokenizer_fixtures import BOS, CORPUS, EOS, hf_tokenizer, write_deepseek_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "你好，请介绍一下你自己。"},
     {"role": "assistant", "content": "我是 DeepSeek-V3 🎉"},
     {"role": "user", "content": "What is 17 × 24?"}],
    [{"role": "system", "content": "First system prompt."},
     {"role": "user", "content": "one"},
     {"role": "system", "content": "Second system prompt."},
     {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\n\nwith blank lines  and  spaces "}],
    [{"role": "user", "content": "What's the weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "Europe/Paris", "é": 1}}}]},
     {"role": "tool", "content": "18°C, cloudy"},
     {"role": "tool", "content": "14:05"},
     {"role": "assistant", "content": "It is 18°C and cloudy at 14:05."},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "Tool round without an answer yet"},
     {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "content": "result"}],
]


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    return write_deepseek_tokenizer(tmp_path_factory.mktemp("deepseek_tok"))


@pytest.fixture(scope="module")
def ours_and_hf(ds_dir):
    return load_tokenizer(ds_dir), hf_tokenizer(ds_dir)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_what_transformers_renders(ours_and_hf, conversation, add_generation_prompt):
    ours, hf = ours_and_hf
    messages = CONVERSATIONS[conversation]
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == want
    assert text.startswith(BOS) and text.count(BOS) == 1
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                      return_dict=False)
    assert ids == want_ids
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id, "one BOS, written by the template"
    assert text.endswith("<｜Assistant｜>") == (add_generation_prompt and messages[-1]["role"] != "tool")


def test_encode_and_decode_match_transformers(ours_and_hf):
    ours, hf = ours_and_hf
    rng = random.Random(os.urandom(8))
    pieces = [*CORPUS, BOS, EOS, "<｜User｜>", " ", "\n", "𝔘𝔫𝔦", "\u0301", "\ufffd", "ﬁ", "\t\t"]
    for _ in range(60):
        text = "".join(rng.choice(pieces)[: rng.randrange(1, 40)] for _ in range(rng.randrange(1, 6)))
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert ids[0] == ours.bos_token_id, "tokenizer.json's post-processor prepends the BOS"
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_ids == {hf.eos_token_id} and ours.bos_token_id == hf.bos_token_id


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("add_bos", [True, False, None])
@pytest.mark.parametrize("token_form", ["dict", "string"])
def test_bos_rules_match_transformers(tmp_path, post_processor, add_bos, token_form):
    """transformers 5 takes BOS from tokenizer.json's post-processor and drops add_bos_token when a tokenizer.json
    exists; BOS/EOS given as plain strings or AddedToken dicts mean the same."""
    extra = {"add_bos_token": add_bos}
    if token_form == "string":
        extra.update(bos_token=BOS, eos_token=EOS, pad_token=EOS)
    d = write_deepseek_tokenizer(tmp_path, bos_post_processor=post_processor, **extra)
    ours, hf = load_tokenizer(d), hf_tokenizer(d)
    for text in ("plain prompt", "你好🎉", ""):
        assert ours.encode(text) == hf.encode(text)
    assert ours.adds_bos == post_processor
    assert ours.render_chat(CONVERSATIONS[1]) == hf.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                                                        add_generation_prompt=True)


def test_special_token_missing_from_tokenizer_json_is_added_as_transformers_adds_it(tmp_path):
    d = write_deepseek_tokenizer(tmp_path, pad_token="<｜▁pad▁｜>")
    ours, hf = load_tokenizer(d), hf_tokenizer(d)
    assert ours.pad_token_id == hf.pad_token_id is not None
    text = "a<｜▁pad▁｜>b"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_named_templates_and_chat_template_file(tmp_path):
    named = [{"name": "default", "template": "{{ bos_token }}D:{% for m in messages %}{{ m['content'] }}{% endfor %}"},
             {"name": "tool_use", "template": "{{ bos_token }}T:{{ tools | length }}:{{ tools[0] | tojson }}"}]
    d = write_deepseek_tokenizer(tmp_path / "named", template=named)
    ours, hf = load_tokenizer(d), hf_tokenizer(d)
    msgs = CONVERSATIONS[0]
    tools = [{"type": "function", "function": {"name": "héllo", "description": "<b>&</b>", "parameters": {}}}]
    assert ours.render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(msgs, tools=tools) == hf.apply_chat_template(msgs, tools=tools, tokenize=False,
                                                                         add_generation_prompt=True)
    assert "T:1:" in ours.render_chat(msgs, tools=tools) and "<b>&</b>" in ours.render_chat(msgs, tools=tools)

    f = write_deepseek_tokenizer(tmp_path / "file")
    (f / "chat_template.jinja").write_text("{{ bos_token }}FILE{{ messages[0]['content'] }}\n", encoding="utf-8")
    ours, hf = load_tokenizer(f), hf_tokenizer(f)
    assert ours.render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "FILE" in ours.render_chat(msgs)


def test_template_environment_matches_transformers(tmp_path):
    """Globals, filters, trim/lstrip of blocks, loop controls, the generation tag, extra variables."""
    template = (
        "{{ bos_token }}\n"
        "  {% for m in messages %}\n"
        "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "    {% generation %}[{{ m['role'] | upper }}]{{ m | tojson }}{% endgeneration %}\n"
        "  {% endfor %}\n"
        "{{ strftime_now('%Y') }}|{{ custom_var }}|{{ eos_token }}|{{ pad_token }}|"
        "{{ dict(a=1) | tojson }}|{{ namespace(x=2).x }}|{{ 'reasoning_content' in messages[0] }}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
    )
    d = write_deepseek_tokenizer(tmp_path, template=template)
    ours, hf = load_tokenizer(d), hf_tokenizer(d)
    msgs = [{"role": "user", "content": "<script>&'\"你好", "reasoning": "hmm"}, *CONVERSATIONS[1]]
    for gen in (True, False):
        got = ours.render_chat(msgs, add_generation_prompt=gen, custom_var="ünï")
        assert got == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, custom_var="ünï")
    assert "ünï" in got and "True" in got and '"<script>&' in got


def test_default_tokenizer_matches_transformers_on_its_own_files(tmp_path):
    write_tokenizer_files(tmp_path)
    ours, hf = load_tokenizer(None), hf_tokenizer(tmp_path)
    assert ours.vocab_size == 512 and len(hf) == 512
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            text = ours.render_chat(conversation, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conversation, add_generation_prompt=gen) == hf.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=gen, return_dict=False)
    system = ours.render_chat(CONVERSATIONS[2])
    assert system.startswith(BOS + "First system prompt.\n\nSecond system prompt.<｜User｜>one")
    assert ours.encode("hi 你好") == hf.encode("hi 你好")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_default_tokenizer_round_trips_bytes(data):
    tok = load_tokenizer(None)
    ids = [3 + b for b in data]
    assert tok.decode(ids) == data.decode("utf-8", "replace") == ByteTokenizer().decode(ids)
    text = data.decode("utf-8", "replace")
    assert tok.encode(text) == ByteTokenizer().encode(text), "the same ids as the byte tokenizer it replaces"


def special_token_texts() -> list[str]:
    from core.engine.default_tokenizer import special_tokens

    return special_tokens()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=48))
def test_default_tokenizer_round_trips_unicode(text):
    tok = load_tokenizer(None)
    clean = clean_text(text)
    ids = tok.encode(text)
    assert ids[0] == 0 and all(0 <= i < 512 for i in ids)
    assert tok.decode(ids[1:], skip_special_tokens=False) == clean
    if not any(special in clean for special in special_token_texts()):
        assert tok.decode(ids) == clean
        assert ids == ByteTokenizer().encode(clean)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a", "你", "🎉", "<｜User｜>", "<｜tool▁sep｜>", "<｜end▁of▁sentence｜>", "<｜"]),
                max_size=8))
def test_default_tokenizer_matches_special_token_text_as_tokens(pieces):
    tok, text = load_tokenizer(None), "".join(pieces)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "".join(p for p in pieces if p not in special_token_texts())


def test_default_tokenizer_decodes_every_id_as_the_byte_tokenizer_did():
    tok, old = load_tokenizer(None), ByteTokenizer()
    rng = random.Random(os.urandom(8))
    for _ in range(200):
        ids = [rng.randrange(512) for _ in range(rng.randrange(1, 40))]
        assert tok.decode(ids) == old.decode(ids)
    assert tok.decode([600, -1, 3 + ord("a")]) == "a", "ids outside the vocabulary decode to nothing"
    assert tok.special_token_ids == {0, 1, 2, *range(259, 512)} and tok.eos_token_ids == {1}
    assert for_checkpoint(None).encode("DeepSeek") == old.encode("DeepSeek")


def test_invalid_utf8_input_becomes_replacement_characters():
    tok = load_tokenizer(None)
    raw = b"ok \xff\xfe half \xe4\xbd end"
    argv_text = raw.decode("utf-8", "surrogateescape")  # what Python makes of such bytes in sys.argv
    want = raw.decode("utf-8", "replace")
    assert clean_text(argv_text) == want == decode_input_bytes(raw)
    assert tok.encode(argv_text) == tok.encode(want)
    assert tok.decode(tok.encode(argv_text)) == want
    assert tok.encode("lone \ud800 surrogate") == tok.encode("lone \ufffd surrogate")


def test_cli_prompt_with_invalid_utf8_runs():
    from tests.helpers import run_main

    r = run_main("core.run", "--prompt", b"a\xffb".decode("utf-8", "surrogateescape"), "--max-new-tokens", "1",
                 "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["prompt_ids"] == [0, 3 + ord("a"), 3 + 0xEF, 3 + 0xBF, 3 + 0xBD, 3 + ord("b")]


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_text_the_tokenizer_cannot_map_is_one_line(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}))  # no unk token, no byte fallback
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert t.encode("a b a") == [0, 1, 0]
    with pytest.raises(UserError) as e:
        t.encode("a ☃")
    one_line(e, str(tmp_path), "cannot encode")


def test_bad_messages_and_templates_are_one_line(ds_dir, tmp_path):
    tok = load_tokenizer(ds_dir)
    bad = [([], "empty"), ("hello", "list"), ([["user", "hi"]], "message 0"),
           ([{"content": "hi"}], "'role'"), ([{"role": "user"}], "'content'"),
           ([{"role": "user", "content": ["part"]}], "'content' must be a string")]
    for messages, needle in bad:
        with pytest.raises(UserError) as e:
            tok.render_chat(messages)
        one_line(e, needle)
    templates = [("{% for %}", "does not compile"), ("{{ raise_exception('no system role\\nsecond line') }}",
                                                     "no system role"),
                 ("{{ ''.__class__.__mro__ }}", "unsafe"), ("{{ messages[0]['content'] + 1 }}", "failed"),
                 ("{% set ns = namespace(_x=1) %}", "underscore")]
    for i, (template, needle) in enumerate(templates):
        d = write_deepseek_tokenizer(tmp_path / str(i), template=template)
        with pytest.raises(UserError) as e:
            load_tokenizer(d).render_chat(CONVERSATIONS[0])
        one_line(e, needle, "tokenizer_config.json")
    d = write_deepseek_tokenizer(tmp_path / "none", template=None)
    with pytest.raises(UserError) as e:
        load_tokenizer(d).render_chat(CONVERSATIONS[0])
    one_line(e, "no chat template")
    with pytest.raises(UserError) as e:
        load_tokenizer(None).render_chat([{"role": "robot", "content": "x"}])
    one_line(e, "unknown role robot")


def test_bad_tokenizer_files_are_one_line(tmp_path, monkeypatch):
    d = write_deepseek_tokenizer(tmp_path / "ok")
    cases = {
        "tokenizer_config.json": [(b"[1]", "JSON object"), (b"{", "invalid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                                  (b"[" * 100000 + b"]" * 100000, "tokenizer_config.json"),
                                  (json.dumps({"bos_token": 5}).encode(), "bos_token"),
                                  (json.dumps({"chat_template": [{"name": 1}]}).encode(), "chat_template")],
        "tokenizer.json": [(b"{}", "cannot load"), (b"\x00\x01", "tokenizer.json")],
    }
    for name, contents in cases.items():
        for content, needle in contents:
            original = (d / name).read_bytes()
            (d / name).write_bytes(content)
            with pytest.raises(CheckpointError) as e:
                load_tokenizer(d)
            one_line(e, name, needle)
            (d / name).write_bytes(original)
    monkeypatch.setitem(tokenizer_files.SIZE_LIMITS, "tokenizer.json", 1000)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    one_line(e, "tokenizer.json", "limit")
    monkeypatch.undo()
    if hasattr(os, "mkfifo"):
        (d / "tokenizer_config.json").unlink()
        os.mkfifo(d / "tokenizer_config.json")
        with pytest.raises(CheckpointError) as e:
            load_tokenizer(d)  # must not block on the FIFO
        one_line(e, "not a regular file")
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path / "empty")
    one_line(e, "no tokenizer.json")
