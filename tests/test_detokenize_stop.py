"""Incremental detokenisation and stop conditions across token boundaries, on a byte-level BPE trained here (its
merges hold parts of Chinese characters and emoji, so characters really split across tokens)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend

from core.engine.detokenize import IncrementalDetokenizer
from core.engine.stop import StopMatcher, stop_conditions
from core.engine.text_stream import TextStream
from core.engine.tokenizer import Tokenizer
from core.errors import UserError
from tests.tokenizer_fixtures import BOS, CORPUS, EOS, added_token, trained_tokenizer_json

REPLACEMENT = "\ufffd"


def trained() -> Tokenizer:
    return Tokenizer(Backend.from_str(trained_tokenizer_json(400)), {"bos_token": added_token(BOS), "eos_token": EOS},
                     "trained test tokenizer")


TOK = trained()
VOCAB = TOK.vocab_size
# tokens whose bytes are not whole UTF-8 characters: they make characters split across tokens
PARTIAL = [i for i in range(VOCAB) if REPLACEMENT in TOK.decode([i]) and i not in TOK.special_token_ids]


def split_character() -> list[int]:
    """The ids of a character that the tokenizer splits over several tokens."""
    return next(ids for ch in "🎉你界好" if len(ids := TOK.encode(ch, add_special_tokens=False)) > 1)


def stream(ids, prompt_ids=()):
    detok = IncrementalDetokenizer(TOK, prompt_ids)
    deltas = [detok.step(i) for i in ids]
    return deltas, detok.finish()


def test_the_trained_tokenizer_splits_characters_across_tokens():
    assert len(PARTIAL) > 20, "the test needs tokens that hold parts of multi-byte characters"
    split = [t for t in CORPUS if any(i in PARTIAL for i in TOK.encode(t, add_special_tokens=False))]
    assert split, "some corpus text encodes through partial-character tokens"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), max_size=40))
def test_deltas_concatenate_to_decode_of_random_tokens(ids):
    deltas, tail = stream(ids)
    assert "".join(deltas) + tail == TOK.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CORPUS + ["🎉", "你好", "👍🏽", "é", " ", "\n", "𝔘"]), min_size=1, max_size=6),
       st.sampled_from(["", "Prompt: 中文 ", "😀"]))
def test_characters_split_across_tokens_come_out_whole(pieces, prompt):
    text = "".join(pieces)
    ids = TOK.encode(text, add_special_tokens=False)
    prompt_ids = TOK.encode(prompt)
    deltas, tail = stream(ids, prompt_ids)
    assert "".join(deltas) + tail == text == TOK.decode(ids)
    assert not any(REPLACEMENT in d for d in deltas), "never a replacement character mid-stream"
    assert tail == "", "valid text leaves nothing held at the end"


def test_a_character_in_pieces_is_held_then_emitted_whole():
    for ch in ("你", "🎉", "👍", "界"):
        ids = TOK.encode(ch, add_special_tokens=False)
        if len(ids) < 2:
            continue
        deltas, tail = stream(ids)
        assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == ch and tail == ""
        break
    else:
        pytest.fail("no character of the list is split over tokens")


def test_an_incomplete_character_at_the_end_comes_out_on_finish():
    ids = split_character()
    deltas, tail = stream([TOK.encode("ok", add_special_tokens=False)[0], *ids[:-1]])
    assert REPLACEMENT not in "".join(deltas) and tail.endswith(REPLACEMENT)


def reference_release(text: str, stops: list[str]) -> tuple[str, bool]:
    """What may have been streamed after seeing `text`: up to the stop string that completes first if one occurs,
    else all but the longest tail that is a proper prefix of a stop string."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if hits:
        return text[:min(hits)[1]], True
    keep = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
    return text[:len(text) - keep], False


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet="abc", max_size=4), max_size=12),
       st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_matcher_against_a_direct_computation(deltas, stops):
    m = StopMatcher(stops)
    released, seen = "", ""
    for d in deltas:
        emit, stopped = m.feed(d)
        released += emit
        seen += d
        want, want_stop = reference_release(seen, stops)
        assert (released, stopped) == (want, want_stop), (seen, stops)
        if stopped:
            assert m.matched in stops and seen[len(released):].startswith(m.matched)
            break
    else:
        assert released + m.flush() == seen


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1,
                                                       max_size=3), st.randoms())
def test_stop_matcher_result_does_not_depend_on_the_cutting(text, stops, rng):
    def run(chunks):
        m, out = StopMatcher(stops), ""
        for c in chunks:
            emit, stopped = m.feed(c)
            out += emit
            if stopped:
                return out, m.matched
        return out + m.flush(), None

    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert run(chunks) == run(list(text))


def test_stop_matcher_include_stop_and_bad_stops():
    m = StopMatcher(["STOP", "ST"], include_stop=True)
    assert m.feed("abcS") == ("abc", False)
    assert m.feed("TOPx") == ("abcST"[3:], True) and m.matched == "ST"
    assert m.feed("more") == ("", True)
    with pytest.raises(UserError):
        StopMatcher([""])


def feed_all(stream_, ids):
    out = ""
    for i in ids:
        emit, done = stream_.step(i)
        out += emit
        if done:
            return out, True
    return out, False


@pytest.mark.parametrize("stop", ["世界", "fox jumps", "😄 🎉", "12345 times"])
def test_stop_string_spanning_tokens(stop):
    text = next(t for t in CORPUS if stop in t)
    ids = TOK.encode(text, add_special_tokens=False)
    s = TextStream(TOK, TOK.encode("prompt"), stop_conditions(stop=[stop]))
    pieces = []
    for i in ids:
        emit, done = s.step(i)
        pieces.append(emit)
        assert text[:text.index(stop)].startswith("".join(pieces)), "no part of the stop string is ever streamed"
        if done:
            break
    assert s.finished and s.reason == "stop_string" and s.matched == stop
    assert "".join(pieces) == s.text == text[:text.index(stop)]
    covering = [j for j in range(len(ids)) if stop in TOK.decode(ids[:j + 1])][0]
    assert TOK.decode(ids[:covering]).find(stop) < 0, "the stop string completes on a later token than it starts"


def test_streamed_text_never_shows_part_of_a_stop_string():
    text = CORPUS[1]
    stop = text[10:14]
    ids = TOK.encode(text, add_special_tokens=False)
    s = TextStream(TOK, [], stop_conditions(stop=[stop]))
    shown = ""
    for i in ids:
        emit, done = s.step(i)
        shown += emit
        assert text[:10].startswith(shown), (shown, stop)
        if done:
            break
    assert shown == text[:10]


def test_eos_stop_token_ids_and_ignore_eos():
    body = TOK.encode("你好，世界", add_special_tokens=False)
    eos = TOK.token_to_id(EOS)
    s = TextStream(TOK, [], stop_conditions(eos_token_ids=[eos]))
    out, done = feed_all(s, [*body, eos, *body])
    assert done and s.reason == "eos" and out == s.text == "你好，世界"
    s = TextStream(TOK, [], stop_conditions(eos_token_ids=[eos], ignore_eos=True))
    out, done = feed_all(s, [*body, eos, *body])
    assert not done and out + s.finish() == "你好，世界你好，世界" and s.reason == "length"
    s = TextStream(TOK, [], stop_conditions(stop_token_ids=[body[2]], eos_token_ids=[eos], ignore_eos=True))
    out, done = feed_all(s, body)
    assert done and s.reason == "stop_token" and out == TOK.decode(body[:2])
    # a held stop-string prefix and an incomplete character both come out when a token ends the sequence
    partial = split_character()
    s = TextStream(TOK, [], stop_conditions(stop=["ok!"], eos_token_ids=[eos]))
    out, done = feed_all(s, [*TOK.encode("ok", add_special_tokens=False), *partial[:-1], eos])
    assert done and s.reason == "eos" and out.startswith("ok") and out.endswith(REPLACEMENT)
