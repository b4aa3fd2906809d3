"""Incremental detokenisation and stop strings, per sequence.

Decoding a short window of ids (prefix_offset..end) and diffing against the window without the new
ids keeps the cost per token constant and the spacing of sentencepiece/BPE tokens right; text that
ends in U+FFFD (half a UTF-8 character) waits for the next token. In streaming, characters that
could be the start of a stop string are held back until they can't be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WINDOW = 5
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


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


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """The raw bytes of one token, as OpenAI's logprobs report them: a byte-fallback token holding
    part of a UTF-8 character gives that part, not U+FFFD (which `decode([id])` would)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in str(decoder)
        self.byte_decoder = _gpt2_byte_decoder()
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        data = self.cache.get(token_id)
        if data is None:
            data = self.cache[token_id] = self._bytes(token_id)
        return data

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if self.byte_level and all(c in self.byte_decoder for c in piece):
            return bytes(self.byte_decoder[c] for c in piece)
        if not self.byte_level:
            return piece.replace("\u2581", " ").encode()  # sentencepiece's word-start mark is a space
        return self.tokenizer.decode([token_id]).encode()
