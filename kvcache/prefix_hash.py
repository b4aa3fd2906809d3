"""Chained page hashes: a page's hash covers its tokens and every page before it."""

from __future__ import annotations

import hashlib
import struct


def chain_hash(parent: int | None, token_ids: list[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", -1 if parent is None else parent))
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return int.from_bytes(h.digest(), "little", signed=True)
