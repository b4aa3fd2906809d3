"""Incremental detokenisation and stop strings, per sequence.

Decoding a short window of ids (prefix_offset..end) and diffing against the window without the new
ids keeps the cost per token constant and the spacing of sentencepiece/BPE tokens right; text that
ends in U+FFFD (half a UTF-8 character) waits for the next token. In streaming, characters that
could be the start of a stop string are held back until they can't be.
"""

from __future__ import annotations

from dataclasses import dataclass

_WINDOW = 5


@dataclass
class TextState:
    prefix_offset: int
    read_offset: int
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    emitted_logprobs: int = 0

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int) -> TextState:
        return cls(prefix_offset=max(num_prompt_tokens - _WINDOW, 0), read_offset=num_prompt_tokens)

    def append(self, tokenizer, all_ids: list[int], skip_special_tokens: bool) -> str:
        """Decode what the newest ids add; returns the new text (possibly empty)."""
        if tokenizer is None:
            return ""
        prefix = tokenizer.decode(all_ids[self.prefix_offset:self.read_offset],
                                  skip_special_tokens=skip_special_tokens)
        full = tokenizer.decode(all_ids[self.prefix_offset:], skip_special_tokens=skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
        self.text += new
        return new

    def find_stop(self, stops: list[str], new_len: int, include: bool) -> str | None:
        """Cut the text at the first stop string that the last new_len characters complete."""
        if not stops or not new_len:
            return None
        longest = max(len(s) for s in stops)
        search_from = max(len(self.text) - new_len - longest + 1, 0)
        best: tuple[int, str] | None = None
        for stop in stops:
            i = self.text.find(stop, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        self.text = self.text[: i + len(stop) if include else i]
        return stop

    def take_delta(self, stops: list[str], finished: bool) -> str:
        """Text not yet emitted, minus a tail that might still grow into a stop string."""
        hold = 0 if finished or not stops else max(len(s) for s in stops) - 1
        end = max(len(self.text) - hold, self.emitted_chars)
        delta = self.text[self.emitted_chars:end]
        self.emitted_chars = end
        return delta
