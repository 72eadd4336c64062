"""Incremental detokenisation for streaming: token ids in one at a time, text deltas out.

The prefix-offset/read-offset method of vLLM and HF TGI: each step decodes two short windows of the ids,
`ids[prefix:read]` (text already emitted) and `ids[prefix:]` (the same plus the new tokens), and emits the difference.
Decoding a window that starts a few tokens back, rather than the new token alone, keeps what a decoder does at the
start of a text (SentencePiece's leading-space strip) and byte-level merges out of the delta. While the new text ends
in U+FFFD the last character's bytes are incomplete (a multi-byte UTF-8 character split across tokens), so nothing is
emitted until they complete; `finish()` emits whatever is still held when the sequence ends (an incomplete
character at the very end then comes out as U+FFFD, as `decode` gives it). The deltas concatenated equal
`tok.decode(output_ids)` for byte-level tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first window (vLLM uses 5)


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per sequence. `tok` has `decode(ids, skip_special_tokens)`; `prompt_ids` give the first window its context
    (their own text is never emitted)."""

    def __init__(self, tok: Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok = tok
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - PROMPT_CONTEXT, 0)
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT) and not final):
            return ""  # nothing new yet, or the last character's bytes are still incomplete
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def step(self, token_id: int) -> str:
        """Append one generated token; the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def finish(self) -> str:
        """At the end of the sequence: the text still held back (an incomplete character becomes U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        return self._advance(final=True)
