"""Allocator invariants under random admit / grow / commit / release sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from needle.kvcache.page_allocator import PageAllocator, SeqPages

PAGE = 4
NUM_PAGES = 24

ops = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "commit", "release"]), st.integers(0, 7),
              st.integers(1, 30), st.integers(0, 2)),
    max_size=80,
)


def check(bm: PageAllocator, live: dict[int, SeqPages]) -> None:
    refs = [0] * bm.num_pages
    for seq in live.values():
        for p in seq.page_table:
            refs[p] += 1
    assert [p.ref_count for p in bm.pages] == refs, "refcounts must equal live references"
    assert len(set(bm.free)) == len(bm.free), "a page is free twice"
    free = set(bm.free)
    assert all((refs[p] == 0) == (p in free) for p in range(bm.num_pages)), "free list and refcounts disagree"
    assert len(free) + sum(1 for r in refs if r) == bm.num_pages, "free + used must equal total"
    for h, p in bm.hash_to_page.items():
        assert bm.pages[p].hash == h


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocator_invariants(operations):
    bm = PageAllocator(NUM_PAGES, PAGE, enable_prefix_caching=True)
    live: dict[int, SeqPages] = {}
    tokens: dict[int, list[int]] = {}
    computed: dict[int, int] = {}
    for op, sid, n, family in operations:
        if op == "admit" and sid not in live:
            # Sequences of one family share a prompt prefix, so the prefix cache gets hits.
            ids = [family] * 12 + list(range(sid, sid + n))
            seq = SeqPages()
            cached = bm.allocate(seq, ids, token_budget=n)
            if cached is not None:
                assert cached % PAGE == 0 and cached < len(ids)
                live[sid], tokens[sid], computed[sid] = seq, ids, min(len(ids), cached + n)
        elif op == "grow" and sid in live:
            tokens[sid].extend(range(n))
            if bm.can_grow(live[sid], len(tokens[sid])):
                bm.grow(live[sid], len(tokens[sid]))
                computed[sid] = len(tokens[sid])
            else:
                del tokens[sid][-n:]
        elif op == "commit" and sid in live:
            bm.commit_full_pages(live[sid], tokens[sid], computed[sid])
        elif op == "release" and sid in live:
            bm.release(live.pop(sid))
        check(bm, live)
    for seq in live.values():
        bm.release(seq)
    check(bm, {})
    assert bm.num_free == NUM_PAGES


def test_prefix_pages_are_shared_and_revived():
    bm = PageAllocator(8, PAGE)
    ids = list(range(10))
    a = SeqPages()
    assert bm.allocate(a, ids, 100) == 0
    bm.commit_full_pages(a, ids, len(ids))
    b = SeqPages()
    assert bm.allocate(b, ids, 100) == 8  # two full pages shared; the last token always recomputes
    assert b.page_table[:2] == a.page_table[:2]
    assert bm.pages[a.page_table[0]].ref_count == 2
    bm.release(a)
    bm.release(b)
    c = SeqPages()
    assert bm.allocate(c, ids + [99], 100) == 8  # freed pages keep their hash until reused


def test_a_partial_hit_extends_the_cache_with_the_rest_of_the_prompt():
    """Two prompts share their first page only: the second one's own pages must be published under the
    right chain, so a third copy of it hits all of them (a regression: they were chained to the hash
    of the first missed page, so every prompt after a partial hit re-prefilled)."""
    bm = PageAllocator(16, PAGE)
    first, second = list(range(12)), [0, 1, 2, 3] + list(range(50, 58))
    for ids in (first, second):
        seq = SeqPages()
        bm.allocate(seq, ids, 100)
        bm.commit_full_pages(seq, ids, len(ids))
        bm.release(seq)
    again = SeqPages()
    assert bm.allocate(again, second + [99], 100) == 12
