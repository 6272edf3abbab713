"""From the engine's tokens to the text a client sees: incremental decoding and stop strings.

The engine stops on token ids; OpenAI's `stop` is strings, which can span tokens. Text is
checked here after each batch of tokens; on a match the text is cut before the stop string and
the caller aborts the request. While streaming with stop strings, the last `len(longest) - 1`
characters are held back, since they may be the start of a stop string still to come.
"""

from __future__ import annotations

from tessera.agents.serving.tokenizer import ServingTokenizer


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

    def push(self, token_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the text that may be shown now. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        decoded = self.tokenizer.decode(self.token_ids)
        if not final:
            decoded = decoded.rstrip("\ufffd")  # a character whose other bytes are to come
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
