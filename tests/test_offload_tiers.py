"""Value-tier invariants under random admit / grow / commit / place / fetch / abort sequences.

The allocator drives the tiers as the engine does. After every operation: every live page's values are
in exactly one tier (or leaving the device, in flight), no slot is lost or shared, nothing is leaked,
each copy of a page's values (resident slot, host slot, cached copy) holds what was written to it, and
the value cache's hit/miss counts equal those of a plain LRU recomputed beside it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from needle.kvcache.page_allocator import PageAllocator, SeqPages
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.value_tiers import TierSizes, ValueTiers

PAGE, LAYERS, FIRST = 4, 3, 1  # layer 0 stays dense (its values never move)
SIZES = TierSizes(num_pages=20, resident_slots=12, cache_slots=(5, 3), host_pages=10)

ops = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "commit", "place", "fetch", "abort"]), st.integers(0, 5),
              st.integers(1, 24), st.integers(0, 2**16)),
    max_size=60,
)


class Model:
    """The allocator and tiers under test, with what each page's values must read as."""

    def __init__(self, prefix_caching: bool):
        spec = KVCacheSpec(LAYERS, num_kv_heads=1, head_dim=2, page_size=PAGE, summary_tokens=PAGE)
        self.pool = KVPool(spec, SIZES.num_pages, torch.device("cpu"), with_summaries=True,
                           value_slots=[SIZES.resident_slots + n for n in SIZES.cache_slots],
                           offloaded_from=FIRST)
        self.tiers = ValueTiers(self.pool, FIRST, SIZES)
        self.bm = PageAllocator(SIZES.num_pages, PAGE, prefix_caching, self.tiers)
        self.live: dict[int, tuple[SeqPages, list[int]]] = {}
        self.content: dict[int, float] = {}  # page -> the value written into it when it was handed out
        self.stamp = 0.0
        self.lru = [OrderedDict() for _ in range(LAYERS - FIRST)]  # the reference value caches
        self.hits = self.misses = 0

    def write_fresh(self, seq: SeqPages, first: int) -> None:
        """The model writes the values of the pages handed out anew, seq.page_table[first:]."""
        for page in seq.page_table[first:]:
            self.stamp += 1
            self.content[page] = self.stamp
            for layer in range(FIRST, LAYERS):
                self.pool.v[layer][self.tiers.slot_of[page]] = self.stamp

    def fetch(self, layer: int, pages: list[int]) -> None:
        slots = self.tiers.fetch(layer, pages)
        lru = self.lru[layer - FIRST]
        misses = [page for page in pages if page not in lru]
        for page in pages:  # the call's hits first: a miss never evicts a page the same call asks for
            if page in lru:
                self.hits += 1
                lru.move_to_end(page)
        for page in misses:
            self.misses += 1
            if len(lru) >= SIZES.cache_slots[layer - FIRST]:
                lru.popitem(last=False)
            lru[page] = None
        for page, slot in zip(pages, slots, strict=True):
            assert torch.all(self.pool.v[layer][slot] == self.content[page]), "a cached copy is stale"

    def check(self) -> None:
        live = {p for seq, _ in self.live.values() for p in seq.page_table}
        self.tiers.check(live)
        for page, slot in self.tiers.slot_of.items():
            for layer in range(FIRST, LAYERS):
                assert torch.all(self.pool.v[layer][slot] == self.content[page]), "resident values changed"
        for page, host in self.tiers.host_of.items():
            assert torch.all(self.tiers.host[host] == self.content[page]), "host values changed"
        for lru in self.lru:  # a page that left the host has no cached copy any more
            for page in [p for p in lru if p not in self.tiers.host_of]:
                del lru[page]
        stats = self.tiers.stats
        assert (stats.hits, stats.misses) == (self.hits, self.misses)


def run(model: Model, program) -> None:
    for op, key, n, seed in program:
        entry = model.live.get(key)
        if op == "admit" and entry is None:
            tokens = [seed % 3] * (PAGE * 2) + [seed % 7 + t for t in range(n)]  # shared prefixes
            seq = SeqPages()
            cached = model.bm.allocate(seq, tokens, token_budget=len(tokens))
            if cached is not None:
                model.live[key] = (seq, tokens)
                model.write_fresh(seq, cached // PAGE)
        elif op == "grow" and entry is not None:
            seq, tokens = entry
            total = len(tokens) + n
            if model.bm.can_grow(seq, total):
                first = len(seq.page_table)
                model.bm.grow(seq, total)
                tokens.extend(range(100 + len(tokens), 100 + total))
                model.write_fresh(seq, first)
        elif op == "commit" and entry is not None:
            model.bm.commit_full_pages(entry[0], entry[1], len(entry[1]))
        elif op == "place":
            pages = sorted({p for seq, _ in model.live.values() for p in seq.page_table})
            chosen = [p for p in pages if (p * 7 + seed) % 3 == 0]
            back = [p for p in chosen if p in model.tiers.host_of][: model.tiers.num_free_slots]
            model.tiers.place({p for p in chosen if p in model.tiers.slot_of} | set(back), pages)
        elif op == "fetch":
            host = sorted(model.tiers.host_of)
            layer = FIRST + seed % (LAYERS - FIRST)
            wanted = [p for p in host if (p + seed) % 2][: SIZES.cache_slots[layer - FIRST]]
            model.fetch(layer, wanted)
        elif op == "abort" and entry is not None:
            model.bm.release(entry[0])
            del model.live[key]
        model.check()
    for seq, _ in model.live.values():  # everything ends: nothing may stay behind but the prefix cache
        model.bm.release(seq)
    model.live.clear()
    model.tiers.poll()
    model.check()
    assert not model.tiers.slot_of, "a page nobody holds kept a device slot"
    assert set(model.tiers.host_of) == set(model.tiers.idle), "a host page nobody holds is not evictable"
    assert len(model.tiers.free_slots) == SIZES.resident_slots


@settings(max_examples=200, deadline=None)
@given(ops, st.booleans())
def test_tier_invariants(program, prefix_caching):
    run(Model(prefix_caching), program)


def test_a_program_that_fetches_counts_hits_and_misses():
    """A fixed program through the cache (the property test's programs may not reach it): the first
    fetch of offloaded pages misses, the same fetch again hits."""
    model = Model(prefix_caching=False)
    program = [("admit", 0, 20, 1), ("place", 0, 0, 1), ("fetch", 0, 0, 1), ("fetch", 0, 0, 1),
               ("abort", 0, 0, 0)]
    run(model, program)
    assert model.misses > 0 and model.hits == model.misses


def test_prefix_cached_pages_come_back_from_the_host():
    """A prompt hitting pages whose values are on the host gets them back resident, with their values."""
    model = Model(prefix_caching=True)
    run(model, [("admit", 0, 8, 0), ("commit", 0, 0, 0), ("place", 0, 0, 2), ("abort", 0, 0, 0)])
    cached = set(model.tiers.host_of)
    assert cached, "released hashed pages must keep their values on the host"
    seq = SeqPages()
    tokens = [0] * (PAGE * 2) + list(range(8))
    assert model.bm.allocate(seq, tokens, len(tokens)) == PAGE * 3
    model.live[0] = (seq, tokens)
    model.write_fresh(seq, 3)
    assert cached & set(seq.page_table) <= set(model.tiers.slot_of)
    model.check()
