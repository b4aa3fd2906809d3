"""Page allocator with reference counts and a prefix cache (hash chain of full pages).

A page whose reference count drops to zero goes back to the free list but keeps its hash, so a
later prompt with the same prefix can revive it until the page is handed out again.

With value offload (`tiers`, value_tiers.py) a page also needs a place for its values: a fresh page
takes a device value slot, a page nobody holds keeps its values on the host while the prefix cache may
revive it, and admission counts the device value slots as well as the key pages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from needle.kvcache.prefix_hash import chain_hash
from needle.kvcache.value_tiers import ValueTiers


@dataclass
class Page:
    page_id: int
    ref_count: int = 0
    hash: int | None = None


@dataclass
class SeqPages:
    """What the allocator knows of one sequence: its pages and how many of them are hashed."""

    page_table: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None
    # Roots the hash chain: KV computed under different attention settings must not be shared.
    salt: int | None = None


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 tiers: ValueTiers | None = None, uncached_tail: int = 1):
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.uncached_tail = uncached_tail  # a prompt's last tokens always run (sparse observation window)
        self.pages = [Page(i) for i in range(num_pages)]
        self.free: deque[int] = deque(range(num_pages))
        self.hash_to_page: dict[int, int] = {}
        self.tiers = tiers
        if tiers is not None:
            tiers.on_evict = self._forget

    @property
    def num_pages(self) -> int:
        return len(self.pages)

    @property
    def num_free(self) -> int:
        """Fresh pages that can be handed out: free key pages, and device value slots with offload."""
        return len(self.free) if self.tiers is None else min(len(self.free), self.tiers.num_free_slots)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, token_ids: list[int], salt: int | None = None) -> tuple[list[int], int | None]:
        """Cached pages covering a prefix of token_ids, never its last `uncached_tail` tokens (the last
        token must run; sparse prompt-aware selection needs the queries of a few more)."""
        if not self.enable_prefix_caching:
            return [], None
        hits, last, h = [], None, salt
        for start in range(0, len(token_ids) - self.uncached_tail - self.page_size + 1, self.page_size):
            h = chain_hash(h, token_ids[start:start + self.page_size])
            page_id = self.hash_to_page.get(h)
            if page_id is None:
                break
            hits.append(page_id)
            last = h
        return hits, last

    def allocate(self, seq: SeqPages, token_ids: list[int], token_budget: int) -> int | None:
        """Give a new sequence its cached prefix pages plus fresh pages for up to token_budget more tokens.

        Returns the number of tokens served from the cache, or None (nothing changed) when the pool
        is short of pages.
        """
        assert not seq.page_table
        hits, last_hash = self.match_prefix(token_ids, seq.salt)
        cached = len(hits) * self.page_size
        covered = min(len(token_ids), cached + token_budget)
        fresh = max(self.pages_needed(covered) - len(hits), 0)
        revived = sum(1 for p in hits if self.pages[p].ref_count == 0)
        if fresh + revived > len(self.free):
            return None
        tiers = self.tiers
        on_host = [p for p in hits if p in tiers.host_of] if tiers is not None else []
        if tiers is not None and fresh + len(on_host) > tiers.num_free_slots:
            return None
        for page_id in hits:
            page = self.pages[page_id]
            if page.ref_count == 0:
                self.free.remove(page_id)
                if tiers is not None:
                    tiers.revive(page_id)
            page.ref_count += 1
        if on_host:  # the prompt's prefill attends to its whole prefix: its values come back now
            tiers.make_resident(on_host)
        seq.page_table = hits + [self._take_fresh() for _ in range(fresh)]
        seq.num_hashed, seq.last_hash = len(hits), last_hash
        return cached

    def can_grow(self, seq: SeqPages, num_tokens: int) -> bool:
        return self.pages_needed(num_tokens) - len(seq.page_table) <= self.num_free

    def grow(self, seq: SeqPages, num_tokens: int) -> None:
        """Make room for num_tokens tokens in total (call can_grow first)."""
        while len(seq.page_table) < self.pages_needed(num_tokens):
            seq.page_table.append(self._take_fresh())

    def truncate(self, seq: SeqPages, num_tokens: int) -> None:
        """Give back the pages past the first num_tokens tokens (rejected speculative rows). Those pages
        were never hashed: only pages of committed tokens are (commit_full_pages)."""
        keep = self.pages_needed(num_tokens)
        assert keep >= seq.num_hashed, "truncating into hashed pages"
        while len(seq.page_table) > keep:
            page = self.pages[seq.page_table.pop()]
            page.ref_count -= 1
            assert page.ref_count == 0 and page.hash is None, f"page {page.page_id} is shared"
            self.free.append(page.page_id)
            if self.tiers is not None:
                self.tiers.on_free(page.page_id, cached=False)

    def commit_full_pages(self, seq: SeqPages, token_ids: list[int], num_computed: int) -> None:
        """Publish the hashes of pages whose KV is now fully written, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        while (seq.num_hashed + 1) * self.page_size <= num_computed:
            start = seq.num_hashed * self.page_size
            parent = seq.last_hash if seq.num_hashed else seq.salt
            h = chain_hash(parent, token_ids[start:start + self.page_size])
            page = self.pages[seq.page_table[seq.num_hashed]]
            if page.hash is None and h not in self.hash_to_page:
                page.hash = h
                self.hash_to_page[h] = page.page_id
            seq.num_hashed += 1
            seq.last_hash = h

    def release(self, seq: SeqPages) -> None:
        """Drop the sequence's references; pages at zero return to the free list (newest last)."""
        for page_id in reversed(seq.page_table):
            page = self.pages[page_id]
            page.ref_count -= 1
            assert page.ref_count >= 0, f"page {page_id} freed twice"
            if page.ref_count == 0:
                self.free.append(page_id)
                cached = page.hash is not None and self.hash_to_page.get(page.hash) == page_id
                if self.tiers is not None and not self.tiers.on_free(page_id, cached):
                    self._forget(page_id)
        seq.page_table, seq.num_hashed, seq.last_hash = [], 0, None

    def _take_fresh(self) -> int:
        page_id = self.free.popleft()
        page = self.pages[page_id]
        assert page.ref_count == 0
        self._forget(page_id)
        if self.tiers is not None:
            self.tiers.on_fresh(page_id)
        page.ref_count = 1
        return page_id

    def _forget(self, page_id: int) -> None:
        """The page's KV is no longer reusable: drop it from the prefix cache."""
        page = self.pages[page_id]
        if page.hash is not None:
            if self.hash_to_page.get(page.hash) == page_id:
                del self.hash_to_page[page.hash]
            page.hash = None
