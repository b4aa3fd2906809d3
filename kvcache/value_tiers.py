"""Value offload (ShadowKV-style): the values of offloaded layers live in a host tier, and decode copies
back only the pages its selection reads that a device value cache does not hold.

Layers from `first_layer` on (the sparse layers) keep a small number of device value slots each
(KVPool(value_slots=...)): slots [0, resident) hold the values of *resident* pages, the same slot in
every offloaded layer; slots [resident, resident + cache[layer]) are each layer's own value cache of
host pages, least recently used first (sized by the layer's retrieval heads: none for a layer of
streaming heads only). Keys, key summaries and the first layers' values never move.

Every page that holds values is in exactly one place: resident (a device slot), on the host (a host
slot), or both for a moment while its device slot is *in flight* (being copied out; the slot is reused
once the copy has finished). A page's cached copies exist only while it is on the host.

On CUDA the host tier is pinned and every copy runs on one copy stream, so a page copied out and then
back in is ordered by the stream; the compute stream waits for a fetch before it reads the values,
while copies out run beside the following steps. On the CPU the same code makes plain copies.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from needle.kvcache.pool import KVCacheSpec, KVPool

STAGING_PAGES = 1024  # pages of one layer per pinned staging copy


@dataclass
class TierStats:
    """Counters since the last drain: value-cache lookups of host pages and bytes moved each way."""

    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0  # misses fetched + pages made resident again
    bytes_to_host: int = 0
    copy_seconds: float = 0.0  # host time spent issuing copies and waiting for fetches


@dataclass(frozen=True)
class TierSizes:
    num_pages: int  # key pages (the allocator's pages)
    resident_slots: int
    cache_slots: tuple[int, ...]  # per offloaded layer
    host_pages: int


def plan_sizes(spec: KVCacheSpec, first_layer: int, device_bytes: int, host_bytes: int, min_resident: int,
               cache_slots: tuple[int, ...]) -> TierSizes:
    """Split the device budget between key pages and value slots. Key pages beyond what the value
    slots and the host tier can hold are useless, so while the budget allows, the device gets exactly
    resident + host key pages and the rest goes to resident slots; otherwise min_resident slots."""
    value = spec.value_bytes_per_page(spec.num_layers - first_layer)
    key = spec.bytes_per_page(with_summaries=True) - value
    host = host_bytes // value
    cache = sum(cache_slots) * spec.value_bytes_per_page(1)
    resident = (device_bytes - host * key - cache) // (key + value)
    if resident >= min_resident:
        return TierSizes(int(resident + host), int(resident), cache_slots, int(host))
    pages = (device_bytes - min_resident * value - cache) // key
    if pages < min_resident:
        raise ValueError(f"a device KV budget of {device_bytes} bytes cannot hold {min_resident} resident "
                         f"value pages and value caches of {max(cache_slots)} pages per layer: raise "
                         "--kv-cache-memory or lower --max-model-len / --max-num-seqs")
    return TierSizes(int(pages), min_resident, cache_slots, int(host))


class ValueTiers:
    def __init__(self, pool: KVPool, first_layer: int, sizes: TierSizes):
        spec = pool.spec
        self.pool, self.first_layer, self.sizes = pool, first_layer, sizes
        self.layers = range(first_layer, spec.num_layers)
        self.cuda = pool.device.type == "cuda"
        start = time.perf_counter()
        row = (spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.host = torch.empty((sizes.host_pages, len(self.layers), *row), dtype=spec.dtype,
                                pin_memory=self.cuda)
        self.staging = torch.empty((min(STAGING_PAGES, max(sizes.host_pages, 1)), *row), dtype=spec.dtype,
                                   pin_memory=self.cuda)
        self.pin_seconds = time.perf_counter() - start  # pinned allocation (the start-up cost on CUDA)
        self.stream = torch.cuda.Stream(pool.device) if self.cuda else None
        self._staging_done: torch.cuda.Event | None = None
        self.page_bytes = spec.value_bytes_per_page(1)  # one page, one layer
        self.free_slots: deque[int] = deque(range(sizes.resident_slots))
        self.free_host: deque[int] = deque(range(sizes.host_pages))
        self.slot_of: dict[int, int] = {}  # resident page -> device slot
        self.host_of: dict[int, int] = {}  # page on the host -> host slot
        self.in_flight: list[tuple[torch.cuda.Event | None, list[int]]] = []  # slots being copied out
        self.idle: OrderedDict[int, None] = OrderedDict()  # host pages no sequence holds (prefix cache)
        first_cache = sizes.resident_slots
        self.cache: list[OrderedDict[int, int]] = [OrderedDict() for _ in self.layers]  # page -> slot
        self.cache_free = [list(range(first_cache, first_cache + n)) for n in sizes.cache_slots]
        # The caches mirrored on the device, so a decode step resolves its hits there (resolve): per
        # layer, each page's cache slot or -1, and the last resolve call that read each slot.
        self.cached_slot = [torch.full((pool.num_pages,), -1, dtype=torch.int32, device=pool.device)
                            for _ in self.layers]
        self.last_read = [torch.zeros(first_cache + n, dtype=torch.long, device=pool.device)
                          for n in sizes.cache_slots]
        self._uncached: list[list[int]] = [[] for _ in self.layers]  # mirror entries still to clear
        self._calls = 0
        self.on_evict: Callable[[int], None] = lambda page: None  # the allocator forgets the page's hash
        self.stats = TierStats()

    # ---- capacity --------------------------------------------------------------------------------

    @property
    def num_free_slots(self) -> int:
        """Device slots a new page can take now (in-flight ones are waited for when needed)."""
        return len(self.free_slots) + sum(len(slots) for _, slots in self.in_flight)

    @property
    def host_usage(self) -> float:
        return 1.0 - len(self.free_host) / max(self.sizes.host_pages, 1)

    def value_table(self, page_table: list[int]) -> list[int]:
        """The device slot of each page's values, -1 where they are on the host."""
        return [self.slot_of.get(p, -1) for p in page_table]

    # ---- page lifecycle (the allocator's hooks) --------------------------------------------------

    def on_fresh(self, page: int) -> None:
        """A page handed out anew (its old contents are void): its values start on the device."""
        self._drop(page)
        self.slot_of[page] = self._take_slot()

    def on_free(self, page: int, cached: bool) -> bool:
        """No sequence holds the page any more. One the prefix cache may revive keeps its values, on the
        host; -> whether it kept them (if not, the allocator forgets the page's hash)."""
        if cached and (page in self.host_of or self.offload([page])):
            self.idle[page] = None
            return True
        self._drop(page)
        return False

    def revive(self, page: int) -> None:
        """A prefix-cache hit took a page no sequence held."""
        self.idle.pop(page, None)

    def _drop(self, page: int) -> None:
        slot = self.slot_of.pop(page, None)
        if slot is not None:
            self.free_slots.append(slot)
        host = self.host_of.pop(page, None)
        if host is not None:
            self.free_host.append(host)
            self.idle.pop(page, None)
            self._uncache(page)

    def _uncache(self, page: int) -> None:
        for cache, free, stale in zip(self.cache, self.cache_free, self._uncached, strict=True):
            slot = cache.pop(page, None)
            if slot is not None:
                free.append(slot)
                stale.append(page)  # cleared on the device at the next resolve (one write, not one a page)

    def _sync_mirror(self, i: int) -> None:
        if self._uncached[i]:
            pages = torch.tensor(self._uncached[i], dtype=torch.long, device=self.pool.device)
            self.cached_slot[i][pages] = -1
            self._uncached[i] = []

    def _take_slot(self) -> int:
        if not self.free_slots:
            self.poll(wait=True)
        return self.free_slots.popleft()

    def _take_host(self) -> int | None:
        if not self.free_host and self.idle:  # evict the oldest page only the prefix cache holds
            page, _ = self.idle.popitem(last=False)
            self._drop(page)
            self.on_evict(page)
        return self.free_host.popleft() if self.free_host else None

    def poll(self, wait: bool = False) -> None:
        """Return the device slots whose copies out have finished (wait: at least the oldest)."""
        keep = []
        for i, (event, slots) in enumerate(self.in_flight):
            if event is not None and not event.query():
                if not (wait and i == 0):
                    keep.append((event, slots))
                    continue
                event.synchronize()
            self.free_slots.extend(slots)
        self.in_flight = keep

    # ---- placement -------------------------------------------------------------------------------

    def place(self, resident: set[int], offload: Iterable[int]) -> None:
        """Once per step: pages that must be resident come back, the others of `offload` go out."""
        self.poll()
        back = [p for p in resident if p in self.host_of]
        if back:
            self.make_resident(back)
        self.offload(p for p in offload if p not in resident)

    def offload(self, pages: Iterable[int]) -> int:
        """Copy resident pages to the host and free their device slots (once the copy is done);
        -> how many moved (fewer when the host tier is full)."""
        moving: list[tuple[int, int, int]] = []
        for page in pages:
            if page not in self.slot_of:
                continue
            host = self._take_host()
            if host is None:
                break
            moving.append((page, self.slot_of.pop(page), host))
            self.host_of[page] = host
        if not moving:
            return 0
        start = time.perf_counter()
        moving.sort(key=lambda m: m[2])  # consecutive host slots go in one copy
        with self._copy_stream():
            for lo in range(0, len(moving), STAGING_PAGES):
                chunk = moving[lo:lo + STAGING_PAGES]
                src = torch.tensor([slot for _, slot, _ in chunk], device=self.pool.device)
                rows = torch.stack([self.pool.v[layer].index_select(0, src) for layer in self.layers], dim=1)
                i = 0
                for first, n in _runs([host for _, _, host in chunk]):
                    self.host[first:first + n].copy_(rows[i:i + n], non_blocking=self.cuda)
                    i += n
            event = self._record()
        self.in_flight.append((event, [slot for _, slot, _ in moving]))
        self.stats.bytes_to_host += len(moving) * len(self.layers) * self.page_bytes
        self.stats.copy_seconds += time.perf_counter() - start
        return len(moving)

    def make_resident(self, pages: list[int]) -> None:
        """Bring host pages back to device slots (a prefill or a dense read needs all of them)."""
        slots = [self._take_slot() for _ in pages]
        hosts = [self.host_of.pop(p) for p in pages]
        start = time.perf_counter()
        for i, layer in enumerate(self.layers):
            self._to_device(i, layer, hosts, slots)
        for page, slot, host in zip(pages, slots, hosts, strict=True):
            self.slot_of[page] = slot
            self.free_host.append(host)  # already read: the staging copy is synchronous
            self.idle.pop(page, None)
            self._uncache(page)
        self.stats.bytes_to_device += len(pages) * len(self.layers) * self.page_bytes
        self.stats.copy_seconds += time.perf_counter() - start

    # ---- decode: the value cache -----------------------------------------------------------------

    def fetch(self, layer: int, pages: list[int], keep: frozenset[int] = frozenset()) -> list[int]:
        """Device slots holding `layer`'s values of host pages (distinct), copying only the misses into
        the layer's value cache; the least recently used entries not asked for (nor in `keep`, slots
        the step reads already) make room."""
        i = layer - self.first_layer
        cache, free = self.cache[i], self.cache_free[i]
        if len(pages) + len(keep) > self.sizes.cache_slots[i]:
            raise RuntimeError(f"{len(pages) + len(keep)} pages exceed layer {layer}'s value cache of "
                               f"{self.sizes.cache_slots[i]}")
        slots, misses = [], []
        for page in pages:
            slot = cache.get(page)
            if slot is None:
                misses.append(len(slots))
            else:
                cache.move_to_end(page)
            slots.append(slot)
        evicted_pages = []
        for j in misses:
            while not free:
                page, slot = cache.popitem(last=False)  # hits were moved to the end: never one of them
                if slot in keep:
                    cache[page] = slot
                    continue
                free.append(slot)
                evicted_pages.append(page)
            slots[j] = cache[pages[j]] = free.pop()
        if misses or evicted_pages:
            changed = evicted_pages + [pages[j] for j in misses]
            values = [-1] * len(evicted_pages) + [slots[j] for j in misses]
            self.cached_slot[i][torch.tensor(changed, device=self.pool.device)] = torch.tensor(
                values, dtype=torch.int32, device=self.pool.device)
        self.stats.hits += len(pages) - len(misses)
        self.stats.misses += len(misses)
        if misses:
            start = time.perf_counter()
            self._to_device(i, layer, [self.host_of[pages[j]] for j in misses], [slots[j] for j in misses])
            self.stats.bytes_to_device += len(misses) * self.page_bytes
            self.stats.copy_seconds += time.perf_counter() - start
        return slots

    def resolve(self, layer: int, tables: torch.Tensor, page_tables: torch.Tensor, logical: torch.Tensor,
                needed: torch.Tensor) -> torch.Tensor:
        """Value tables [B, P] (-1: on the host) in which the host pages a step reads in `layer` (logical
        page indices [B, N], where `needed`) point at their value-cache slots. Hits resolve on the device
        through the mirror, without a Python step per page (thousands a layer at batch 8 x 128K); only the
        misses go through fetch, which keeps every slot this step reads."""
        i = layer - self.first_layer
        self._sync_mirror(i)
        self._calls += 1
        patched = self._through_cache(i, tables, page_tables)
        read = patched.gather(1, logical)
        on_host = needed & (tables.gather(1, logical) < 0)
        self.last_read[i][read[on_host & (read >= 0)].long()] = self._calls
        missing = on_host & (read < 0)
        hits, misses = (int(n) for n in torch.stack([
            (self.last_read[i] == self._calls).sum(), missing.sum()]).tolist())
        self.stats.hits += hits
        if not misses:
            return patched
        b, width = tables.shape
        rows = torch.arange(b, device=tables.device)[:, None].expand_as(logical)
        pages = page_tables.reshape(-1)[torch.unique((rows * width + logical)[missing])].tolist()
        keep = frozenset(torch.nonzero(self.last_read[i] == self._calls).flatten().tolist())
        self.fetch(layer, list(dict.fromkeys(pages)), keep)
        return self._through_cache(i, tables, page_tables)

    def _through_cache(self, i: int, tables: torch.Tensor, page_tables: torch.Tensor) -> torch.Tensor:
        """tables with each host page (-1) replaced by its cache slot in layer column i, where cached."""
        return torch.where(tables < 0, self.cached_slot[i][page_tables.long()], tables)

    def drain_stats(self) -> TierStats:
        stats, self.stats = self.stats, TierStats()
        return stats

    # ---- copies ----------------------------------------------------------------------------------

    def _to_device(self, i: int, layer: int, hosts: list[int], slots: list[int]) -> None:
        """Layer `layer`'s values (host column i) of host slots -> device slots, through the pinned
        staging buffer; the compute stream waits for them."""
        for lo in range(0, len(hosts), self.staging.shape[0]):
            idx = torch.tensor(hosts[lo:lo + self.staging.shape[0]])
            if self._staging_done is not None:
                self._staging_done.synchronize()  # the previous copy has left the staging buffer
            buf = self.staging[:idx.numel()]
            torch.index_select(self.host[:, i], 0, idx, out=buf)
            with self._copy_stream():
                dst = torch.tensor(slots[lo:lo + idx.numel()], device=self.pool.device)
                self.pool.v[layer].index_copy_(0, dst, buf.to(self.pool.device, non_blocking=self.cuda))
                self._staging_done = self._record()
        if self.stream is not None:
            torch.cuda.current_stream(self.pool.device).wait_stream(self.stream)

    @contextlib.contextmanager
    def _copy_stream(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.pool.device))  # the values are written
        with torch.cuda.stream(self.stream):
            yield

    def _record(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    # ---- checks ----------------------------------------------------------------------------------

    def check(self, live_pages: set[int]) -> None:
        """The invariants the tests assert: every live page's values in exactly one tier, no slot lost
        or shared, cache entries only for host pages."""
        assert set(self.slot_of).isdisjoint(self.host_of), "a page in both tiers"
        assert live_pages <= set(self.slot_of) | set(self.host_of), "a live page without values"
        assert set(self.slot_of) | set(self.host_of) <= live_pages | set(self.idle), "a leaked page"
        in_flight = [s for _, slots in self.in_flight for s in slots]
        slots = list(self.slot_of.values()) + list(self.free_slots) + in_flight
        assert sorted(slots) == list(range(self.sizes.resident_slots)), "device slots lost or shared"
        hosts = list(self.host_of.values()) + list(self.free_host)
        assert sorted(hosts) == list(range(self.sizes.host_pages)), "host slots lost or shared"
        for i, (cache, free, n) in enumerate(zip(self.cache, self.cache_free, self.sizes.cache_slots,
                                                 strict=True)):
            assert set(cache) <= set(self.host_of), "a cached copy of a page not on the host"
            assert len(cache) + len(free) == n and len(set(cache.values()) | set(free)) == n, "cache slots"
            self._sync_mirror(i)
            mirrored = {p: s for p, s in enumerate(self.cached_slot[i].tolist()) if s >= 0}
            assert mirrored == dict(cache), "the device mirror differs from the cache"


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> (first, length) of each run of consecutive values."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs
