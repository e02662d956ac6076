"""The text of one streamed answer: stop decisions, safe deltas, the final text.

Tokens arrive one at a time. Text is decoded incrementally (each new token's text is the
difference between decoding from a fixed earlier offset with and without it, so word-piece
spacing and multi-byte characters come out as a full decode gives them); stop strings are
looked for in a window of the newest tokens decoded with special tokens, as `generate` looks
for them in the whole text. What is streamed never includes a stop string or leading /
trailing whitespace, so the concatenated deltas equal the final text, which is
`decode_new_tokens(...)` of the tokens, as the chat and the evaluation report it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llava_jax.inference.generation import decode_new_tokens


class AnswerText:
    """Tokens of one slot -> stop decision, streamed text deltas and the final text."""

    def __init__(self, request, tokenizer, eos_ids: np.ndarray, engine_stops: Sequence[str]):
        """request: an EngineRequest (max_new_tokens, stop, ignore_eos); engine_stops: the
        template's stop strings (ignored with ignore_eos, like EOS)."""
        self.request, self.tokenizer = request, tokenizer
        self.eos = set() if request.ignore_eos else {int(i) for i in eos_ids if i >= 0}
        own = [s for s in request.stop if s]
        self.stops = own if request.ignore_eos else own + [s for s in engine_stops if s]
        # A stop string of n characters spans at most 4n byte-fallback tokens; a wider window
        # keeps the occurrence away from the window's start (where decoding drops a space).
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 8
        self.ids: list[int] = []
        self.text = ""  # incremental decode, special tokens skipped
        self.prefix_offset = self.read_offset = 0
        self.shown = ""
        self.reason: str | None = None

    def add(self, token: int) -> bool:
        """Appends a token; True when the answer is finished."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if token in self.eos:
            self.reason = "stop"
        elif self.stops:
            tail = self.tokenizer.decode(self.ids[-self.window:], skip_special_tokens=False)
            if any(stop in tail for stop in self.stops):
                self.reason = "stop"
        if self.reason is None and len(self.ids) >= self.request.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def delta(self) -> str:
        """New text safe to show: before any stop string, without leading whitespace, holding
        back trailing whitespace and a possible start of a stop string."""
        visible = self.text
        for stop in self.stops:
            if stop in visible:
                visible = visible[:visible.index(stop)]
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(visible)), 0, -1):
                if visible.endswith(stop[:size]):
                    visible = visible[:-size]
                    break
        return self._advance(visible.strip())

    def final_text(self) -> str:
        if self.request.ignore_eos:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            for stop in self.stops:
                if stop in text:
                    text = text[:text.index(stop)]
            return text.strip()
        return decode_new_tokens(self.ids, self.tokenizer, eos_token_id=sorted(self.eos) or None,
                                 stop_strings=self.stops)

    def final_delta(self, final: str) -> str:
        return self._advance(final)

    def _advance(self, visible: str) -> str:
        if len(visible) > len(self.shown) and visible.startswith(self.shown):
            new, self.shown = visible[len(self.shown):], visible
            return new
        return ""
