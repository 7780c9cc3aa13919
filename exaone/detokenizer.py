"""Incremental detokenization for byte-level BPE, one token at a time.

A Korean syllable or an emoji is several bytes and often several tokens; decoding a token alone
gives U+FFFD. `StreamingDetokenizer` keeps two offsets into the ids, as vLLM and mlx-lm do:
`prefix_offset` .. `read_offset` is the already-emitted context window, `read_offset` .. end the
pending tokens. Each step decodes only that small window, and text is emitted only once it does
not end in U+FFFD, so a delta never splits a character and the work per token is O(1) amortised.
The deltas plus `flush()` concatenate exactly to `decode(output_ids)` for byte-level decoders.

This module must not import the tokenizer, model or server: it is handed a `decode` callable.
"""
from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_tail: Sequence[int] = ()):
        """`prompt_tail`: the last few prompt ids, decoding context only (never emitted)."""
        self._decode = decode
        self._ids: list[int] = [int(t) for t in prompt_tail]
        self._start = len(self._ids)       # first output id
        self.prefix_offset = 0
        self.read_offset = len(self._ids)
        self._prefix_text = decode(self._ids) if self._ids else ""  # decode(ids[prefix_offset:read_offset])

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._start:]

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids[self.prefix_offset:])
        if new_text.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the bytes that finish it
        delta = new_text[len(self._prefix_text):]
        # The emitted window becomes the context for the next step; it stays a few tokens long.
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        return delta

    def flush(self) -> str:
        """Text still pending at the end (it may end in U+FFFD if the output was cut mid-character)."""
        if self.read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self.prefix_offset:])
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        delta = new_text[len(self._prefix_text):]
        self._prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        return delta
