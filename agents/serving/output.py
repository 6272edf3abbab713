"""From the engine's tokens to the text a client sees: incremental decoding and stop strings.

The engine stops on token ids; OpenAI's `stop` is strings, which can span tokens. Text is
checked here after each batch of tokens; on a match the text is cut before the stop string and
the caller aborts the request. While streaming with stop strings, the last `len(longest) - 1`
characters are held back, since they may be the start of a stop string still to come.

Decoding is incremental, as vLLM's detokenizer does it: each batch decodes only a window of
the last few committed tokens (context for the tokenizer's spacing rules) and the new ones, and
keeps what the new ones add, so a token costs the same at position 1000 as at position 1 (a
whole-output decode per token made a 64-stream batch cost milliseconds of the event loop).
"""

from __future__ import annotations

from tessera.agents.serving.tokenizer import ServingTokenizer

WINDOW_CONTEXT_TOKENS = 5
"""Committed tokens decoded again before the new ones (vLLM uses 5): the tokenizer sees the
previous words, so a leading space or a merge comes out as in a whole decode."""
WINDOW_MAX_TOKENS = 24
"""The window's start stays put while it spans at most this many committed tokens: the text
of its committed part is then the last batch's window, kept, so a batch costs one decode, not
two (a token per live stream per step, on the event loop). Past it the window moves up to
WINDOW_CONTEXT_TOKENS before the uncommitted ones."""


class OutputText:
    """The output of one request as text, handed out as deltas."""

    def __init__(self, tokenizer: ServingTokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        """All text decoded so far (cut at a stop string once one is seen)."""
        self.emitted = 0
        self.stopped = False
        self._decoded = ""
        """The text of token_ids[:_read], a whole decode's prefix."""
        self._read = 0
        self._start = 0
        self._before = ""
        """The text of token_ids[_start:_read], the window's committed part."""
        self._synced: list[int] | None = self.token_ids
        """The token list the window describes (a new list, e.g. a resumed output: re-read)."""

    def resume(self, token_ids: list[int], emitted: int) -> None:
        """Continue another server's output (a migrated request): its tokens so far, of whose
        text it showed the first `emitted` characters; the next delta starts there."""
        self.token_ids = list(token_ids)
        self.text = self.tokenizer.decode(self.token_ids).rstrip("\ufffd")
        if not 0 <= emitted <= len(self.text):
            raise ValueError(f"emitted_chars {emitted} is outside the text's 0..{len(self.text)}")
        self.emitted = emitted

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the text that may be shown now. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        decoded = self._decode(final)
        checked_from = max(0, len(self.text) - self.hold)
        self.text = decoded
        if self.stop:
            hits = [i for s in self.stop if (i := decoded.find(s, checked_from)) >= 0]
            if hits:
                self.text = decoded[: min(hits)]
                self.stopped = True
                final = True
        visible = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : visible]
        self.emitted = visible
        return delta

    def _decode(self, final: bool) -> str:
        """All text so far, from the window's decode; without `final` a character whose other
        bytes are still to come is left out (and its tokens stay uncommitted)."""
        ids = self.token_ids
        if self._synced is not ids:  # replaced from outside: start over from a whole decode
            self._synced, self._read = ids, 0
            self._decoded = ""
            self._start, self._before = 0, ""
        start, before = self._start, self._before
        if self._read - start > WINDOW_MAX_TOKENS:
            start = self._read - WINDOW_CONTEXT_TOKENS
            before = self.tokenizer.decode(ids[start : self._read])
            self._start, self._before = start, before
        window = self.tokenizer.decode(ids[start:])
        if not window.startswith(before):  # the new tokens changed earlier text: decode it all
            window, before, start = self.tokenizer.decode(ids), self._decoded, 0
            if not window.startswith(before):
                return window if final else window.rstrip("\ufffd")
        decoded = self._decoded + window[len(before) :]
        if final or not window.endswith("\ufffd"):
            if len(window) > len(before):
                self._decoded, self._read = decoded, len(ids)
                self._start, self._before = start, window
            return decoded
        return decoded.rstrip("\ufffd")  # a character whose other bytes are to come
