"""Speculative decoding without the model: rejection sampling preserves the target distribution,
rollback keeps pages, hashes and summaries consistent under random draft/accept/abort sequences, and
the goodput controller picks k sensibly and steadily."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from needle.attention.dense import DenseBackend
from needle.engine.runner import ModelRunner
from needle.engine.sampler import Sampler
from needle.engine.spec_decode.config import SpeculativeConfig
from needle.engine.spec_decode.controller import GoodputController, StepShape, expected_tokens
from needle.engine.spec_decode.decoder import SpecDecoder
from needle.engine.spec_decode.ngram import NgramDrafter
from needle.engine.spec_decode.verify import accept_or_resample, verify
from needle.kvcache.page_allocator import PageAllocator
from needle.kvcache.pool import KVCacheSpec, KVPool
from needle.kvcache.summaries import update_summaries
from needle.scheduler.sampling_params import SamplingParams
from needle.scheduler.sequence import Sequence, Status

# chi-square critical value, 5 degrees of freedom, p = 0.001
CHI2_CRIT = 20.52


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def emitted_first_tokens(p_logits: torch.Tensor, draft: int, q: torch.Tensor | None, draws: int,
                         temperature: float) -> torch.Tensor:
    """Run verify() on one draft `draws` times (drawn from q, or always `draft` for a deterministic
    drafter); count the first token each run emits."""
    sampler = Sampler(eos_token_ids=())
    params = SamplingParams(temperature=temperature, max_tokens=100)
    counts = torch.zeros(p_logits.shape[-1])
    gen = torch.Generator().manual_seed(0)
    rows = torch.stack([p_logits, p_logits])
    for _ in range(draws):
        seq = Sequence("r", 0, [0, 1], params, 0.0)
        seq.num_prompt_tokens, seq.generator = 1, gen
        out = []
        x = draft if q is None else int(torch.multinomial(q, 1, generator=gen))
        probs = None if q is None else q[None]
        verify(sampler, seq, rows, [x], probs, lambda t, o=out: (o.append(t), True)[1])
        counts[out[0]] += 1
    return counts


def test_rejection_sampling_preserves_the_target_distribution():
    temperature = 0.7
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    p = (logits / temperature).softmax(-1)
    poor_q = torch.tensor([0.02, 0.03, 0.05, 0.1, 0.2, 0.6])  # favours the target's least likely
    draws = 12000
    for draft, q in ((-1, poor_q), (5, None), (0, None)):  # q None: a deterministic drafter (one-hot)
        counts = emitted_first_tokens(logits, draft, q, draws, temperature)
        assert chi_square(counts, p) < CHI2_CRIT, (draft, counts / draws, p)
    # The test can fail: accepting every draft (greedy acceptance) is far from p.
    wrong = torch.zeros(6)
    wrong[5] = draws
    assert chi_square(wrong, p) > CHI2_CRIT


def test_accept_probability_is_min_one_p_over_q():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.25, 0.25, 0.5])
    gen = torch.Generator().manual_seed(1)
    kept = sum(accept_or_resample(p, 2, q, gen)[0] for _ in range(8000)) / 8000
    assert abs(kept - 0.4) < 0.03  # p(2) / q(2)
    assert all(accept_or_resample(p, 0, q, gen)[0] for _ in range(200))  # p > q: always kept


def make_decoder(num_pages: int = 24, page_size: int = 16):
    spec = KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=4, page_size=page_size)
    pool = KVPool(spec, num_pages, torch.device("cpu"), with_summaries=True)
    alloc = PageAllocator(num_pages, page_size)
    runner = ModelRunner(None, DenseBackend(pool), page_size, torch.device("cpu"), "dense", 0)  # no forward
    dec = SpecDecoder(SpeculativeConfig(num_speculative_tokens=4, dynamic=False), NgramDrafter(1, 3),
                      Sampler(()), alloc, max_model_len=10_000, runner=runner)
    return dec, pool, alloc


def write_rows(pool: KVPool, alloc: PageAllocator, seq: Sequence, start: int, n: int, rng: random.Random):
    ps = alloc.page_size
    slots = torch.tensor([seq.pages.page_table[p // ps] * ps + p % ps for p in range(start, start + n)])
    for layer in range(pool.spec.num_layers):
        k = torch.tensor([[[rng.uniform(-1, 1) for _ in range(4)]] for _ in range(n)])
        pool.write(layer, k, k, slots)
        update_summaries(pool, layer, slots)


def check_invariants(pool: KVPool, alloc: PageAllocator, seqs: list[Sequence]) -> None:
    refs = {}
    for s in seqs:
        for page in s.pages.page_table:
            refs[page] = refs.get(page, 0) + 1
        assert s.pages.num_hashed * alloc.page_size <= s.num_computed
        assert alloc.pages_needed(s.num_computed) <= len(s.pages.page_table) <= alloc.pages_needed(len(s))
    assert len(set(alloc.free)) == len(alloc.free)
    for page in alloc.pages:
        assert page.ref_count == refs.get(page.page_id, 0)
        assert (page.ref_count == 0) == (page.page_id in alloc.free)
    ps = alloc.page_size
    for s in seqs:  # every summary of committed rows equals a recomputation
        n = s.num_computed
        slots = torch.tensor([s.pages.page_table[p // ps] * ps + p % ps for p in range(n)])
        for layer in range(pool.spec.num_layers):
            keys = pool.k[layer].view(-1, 1, 4)[slots]
            for start in range(0, n, 16):
                block = keys[start:min(start + 16, n)]
                page, row = s.pages.page_table[start // ps], (start % ps) // 16
                torch.testing.assert_close(pool.kmin[layer, page, row], block.amin(0))
                torch.testing.assert_close(pool.kmean[layer, page, row], block.mean(0))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 4), st.booleans()),
                min_size=1, max_size=30), st.integers(0, 2**16))
def test_rollback_invariants(ops, seed):
    """Random steps: a sequence drafts k, keeps j of them, or is aborted; pages, refcounts, hashes
    and summaries stay consistent, and aborting everything returns every page."""
    rng = random.Random(seed)
    dec, pool, alloc = make_decoder()
    seqs: list[Sequence] = []
    for i in range(3):
        s = Sequence(f"r{i}", 0, [rng.randrange(50) for _ in range(rng.randrange(5, 40))],
                     SamplingParams(temperature=0), 0.0)
        assert alloc.allocate(s.pages, s.token_ids, 10_000) == 0
        write_rows(pool, alloc, s, 0, len(s) - 1, rng)
        s.num_computed = len(s) - 1
        s.token_ids.append(rng.randrange(50))  # its newest token, not yet computed
        s.status = Status.RUNNING
        seqs.append(s)
    for which, k, j, abort in ops:
        live = [s for s in seqs if s.status is Status.RUNNING]
        if not live:
            break
        s = live[which % len(live)]
        if abort:
            alloc.release(s.pages)
            s.status = Status.FINISHED
            continue
        if not alloc.can_grow(s.pages, len(s) + k):
            continue
        alloc.grow(s.pages, len(s) + k)  # the scheduler's share: the newest token + k draft slots
        s.draft_ids = [rng.randrange(50) for _ in range(k)]
        write_rows(pool, alloc, s, s.num_computed, 1 + k, rng)  # the verify pass writes k + 1 rows
        s.num_computed += 1
        kept = min(j, k)
        s.token_ids.extend(s.draft_ids[:kept] + [rng.randrange(50)])  # kept drafts + the bonus token
        dec.rollback(s, kept)
        check_invariants(pool, alloc, [x for x in seqs if x.status is Status.RUNNING])
    for s in seqs:
        if s.status is Status.RUNNING:
            alloc.release(s.pages)
    assert alloc.num_free == alloc.num_pages


def synthetic_time(shape: StepShape, per_token: float, per_draft: float, noise: float,
                   rng: random.Random) -> float:
    t = 0.01 + 0.001 * shape.num_seqs + per_token * shape.num_tokens + per_draft * shape.draft_tokens
    return t * (1 + rng.uniform(-noise, noise))


def drive(ctrl: GoodputController, steps: int, acceptance: float, per_token: float, per_draft: float,
          noise: float = 0.0, batch: int = 8) -> list[int]:
    rng = random.Random(0)
    ks = []
    for _ in range(steps):
        k = ctrl.choose([1000] * batch, [acceptance] * batch)
        ks.append(k)
        shape = ctrl.shape_for(k, [1000] * batch, batch)
        ctrl.observe(shape, synthetic_time(shape, per_token, per_draft, noise, rng))
    return ks


def test_controller_turns_speculation_off_when_verification_dominates():
    ctrl = GoodputController(max_k=4)
    ks = drive(ctrl, 120, acceptance=0.3, per_token=0.02, per_draft=0.0)
    assert ks[-40:].count(0) >= 36  # exploration aside, k = 0
    assert ctrl.fit_error < 0.01


def test_controller_speculates_long_when_acceptance_is_high():
    ctrl = GoodputController(max_k=4)
    ks = drive(ctrl, 120, acceptance=0.9, per_token=0.0005, per_draft=0.0)
    assert ks[-40:].count(4) >= 36


def test_controller_does_not_flap_on_noise():
    ctrl = GoodputController(max_k=6)
    ks = drive(ctrl, 300, acceptance=0.6, per_token=0.002, per_draft=0.001, noise=0.1)
    settled = ks[100:]
    every = ctrl.explore_every
    explored = {i for i in range(100, 300) if i % every == every - 1}
    changes = sum(1 for i in range(101, 300)
                  if ks[i] != ks[i - 1] and i not in explored and i - 1 not in explored)
    assert changes <= 4, settled


def test_fixed_k_and_expected_tokens():
    assert GoodputController(max_k=3, dynamic=False).choose([10], [0.1]) == 3
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9
