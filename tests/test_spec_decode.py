"""Speculative decoding on the real bundled model: greedy output token-identical to decoding without
speculation for each drafter (staggered arrivals, long prompts, prefix-cache hits, preemption, abort),
SamplingParams on every verified position, and the step's bookkeeping (pages, hashes, summaries)."""

from __future__ import annotations

import json

import pytest
import torch
from support import run_engine

from needle import LLM, SamplingParams
from needle.engine.loader import CONFIGS_DIR, ModelLoadError
from needle.engine.spec_decode.ngram import lookup

SHORT = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\nRepeat the code above:\n",
    "The capital of France is",
    "List the numbers: 1, 2, 3, 4, 5, 6, 7, 8,",
    "Roses are red, violets are blue. Roses are red,",
    "Hello, my name is",
    "Once upon a time, in a land far away,",
]
LONG_TEXT = " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7} coins."
                     for i in range(155))
LONG = [LONG_TEXT + "\nQuestion: what does the red box hold? Answer:",
        LONG_TEXT + "\nRepeat the last item exactly:"]
ENGINE = dict(attention="dense", kv_cache_memory="512MiB", max_num_batched_tokens=512)


def spec_llm(method: str, engine: dict | None = None, **extra) -> LLM:
    config = {"method": method, "num_speculative_tokens": 4, "dynamic": False, **extra}
    return LLM(**{**ENGINE, **(engine or {})}, speculative_config=config)


def staggered(engine, prompts: list[str], params: SamplingParams, every: int = 2) -> dict[str, list[int]]:
    """Add one prompt every `every` steps (so drafts, prefills and decodes mix), then run to the end."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        outputs, _ = engine.step()
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        step += 1
    return tokens


def assert_no_leak(engine) -> None:
    al = engine.allocator
    assert al.num_free == al.num_pages and len(set(al.free)) == al.num_pages
    assert all(p.ref_count == 0 for p in al.pages)


@pytest.fixture(scope="module")
def baseline(dense_llm):
    greedy = SamplingParams(temperature=0, max_tokens=24)
    prompts = SHORT + LONG
    return prompts, staggered(dense_llm.engine, prompts, greedy)


@pytest.fixture(scope="module")
def ngram_llm():
    return spec_llm("ngram")


def test_ngram_lookup():
    assert lookup([1, 2, 3, 9, 1, 2, 3], 3, 1, 3) == [9, 1, 2]
    assert lookup([5, 6, 7], 2, 1, 3) == []
    assert lookup([1, 2, 1, 3, 1], 2, 1, 2) == [3, 1]  # the most recent match of the longest suffix
    assert lookup([4, 4, 4], 4, 2, 2) == [4]


@pytest.mark.parametrize("method", ["ngram", "self_sparse", "draft_model"])
def test_greedy_identical_to_plain_decoding(method, baseline, ngram_llm):
    prompts, expected = baseline
    extra = {"model": "bundled"} if method == "draft_model" else {}
    llm = ngram_llm if method == "ngram" else spec_llm(method, num_speculative_tokens=3, **extra)
    accepted = []
    got = staggered(llm.engine, prompts, SamplingParams(temperature=0, max_tokens=24))
    assert got == expected
    assert_no_leak(llm.engine)
    # Again: the long prompt's pages now come from the prefix cache; count what was accepted.
    llm.engine.add_request("again", prompts[-1], SamplingParams(temperature=0, max_tokens=24))
    again = run_engine(llm.engine, on_step=lambda s: accepted.append(s.spec.num_accepted_tokens))
    assert again["again"] == expected[f"r{len(prompts) - 1}"]
    assert sum(accepted) > 0
    assert_no_leak(llm.engine)


def test_draft_model_from_a_dummy_config_is_lossless_and_needs_the_same_vocabulary(baseline, tmp_path):
    """A draft model of the configs/ shape with random weights (it proposes nonsense): the output is still
    exactly plain decoding's; a draft config with another vocabulary is refused at start-up."""
    prompts, expected = baseline
    llm = spec_llm("draft_model", num_speculative_tokens=3, model="smollm2-135m", load_format="dummy")
    drafted = []
    got = staggered(llm.engine, prompts, SamplingParams(temperature=0, max_tokens=12))  # greedy: a prefix
    assert got == {r: tokens[:12] for r, tokens in expected.items()}
    llm.engine.add_request("again", prompts[0], SamplingParams(temperature=0, max_tokens=8))
    run_engine(llm.engine, on_step=lambda s: drafted.append(s.spec.num_draft_tokens))
    assert sum(drafted) > 0
    assert_no_leak(llm.engine)
    config = json.loads((CONFIGS_DIR / "smollm2-135m.json").read_text())
    other = tmp_path / "other-vocab.json"
    other.write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(ModelLoadError, match="same tokenizer"):
        spec_llm("draft_model", model=str(other), load_format="dummy")


def test_preemption_and_abort_mid_speculation():
    """A pool too small for every sequence at once: preemption happens while sequences speculate."""
    prompts = SHORT[:4]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    small = dict(kv_cache_memory="6MiB", enable_prefix_caching=False)  # 8 pages
    plain = LLM(attention="dense", **small)
    expected = run_engine(plain.engine, {f"p{i}": (p, greedy) for i, p in enumerate(prompts)})
    spec = LLM(attention="dense", **small,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "dynamic": False})
    preemptions = []
    got = run_engine(spec.engine, {f"p{i}": (p, greedy) for i, p in enumerate(prompts)},
                     on_step=lambda s: preemptions.append(s.num_preemptions))
    assert sum(preemptions) > 0
    assert got == expected
    assert_no_leak(spec.engine)
    # Abort in the middle of a run: nothing leaks.
    spec.engine.add_request("a", prompts[0], SamplingParams(temperature=0, max_tokens=80))
    for _ in range(6):
        spec.engine.step()
    spec.engine.abort("a")
    run_engine(spec.engine)
    assert_no_leak(spec.engine)


def test_sampling_params_on_every_verified_position(dense_llm, ngram_llm):
    """Penalties, logit_bias, min_tokens, stop strings, stop ids and max_tokens act per position."""
    cases = [
        SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, logit_bias={29: 2.0}),
        SamplingParams(temperature=0, max_tokens=30, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=7),  # max_tokens lands inside an accepted run
        SamplingParams(temperature=0, max_tokens=40, stop=["b):"]),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=10, logprobs=2),
    ]
    prompt = SHORT[0]
    for params in cases:
        want = dense_llm.generate(prompt, params)[0].outputs[0]
        got = ngram_llm.generate(prompt, params)[0].outputs[0]
        assert got.token_ids == want.token_ids, params
        assert (got.text, got.finish_reason, got.stop_reason) == (want.text, want.finish_reason,
                                                                   want.stop_reason)
        if params.logprobs is not None:
            assert len(got.logprobs) == len(got.token_ids)
            for a, b in zip(got.logprobs, want.logprobs, strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[t] - b[t]) < 1e-3 for t in a)


def test_seeded_sampling_is_batch_invariant(ngram_llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=32)
    alone = ngram_llm.generate(SHORT[0], params)[0].outputs[0].token_ids
    crowd = ngram_llm.generate([SHORT[1], SHORT[0], SHORT[3]],
                               [SamplingParams(temperature=1.0, max_tokens=20), params,
                                SamplingParams(temperature=0, max_tokens=12)])
    assert crowd[1].outputs[0].token_ids == alone


def test_per_request_opt_out_and_sparse_verify(sparse_llm):
    """`speculative=False` requests never draft; a sparse request's verify step runs as decode."""
    engine = LLM(attention="sparse", max_num_batched_tokens=4096,
                 speculative_config={"method": "ngram", "num_speculative_tokens": 3, "dynamic": False}).engine
    drafts = []
    off = SamplingParams(temperature=0, max_tokens=24, speculative=False)
    run_engine(engine, {"off": (LONG[1], off)}, on_step=lambda s: drafts.append(s.spec.num_draft_tokens))
    assert sum(drafts) == 0
    reads = []
    on = SamplingParams(temperature=0, max_tokens=24)
    run_engine(engine, {"on": (LONG[1], on)},
               on_step=lambda s: reads.append((s.spec.num_draft_tokens, len(s.attention.tokens_read))))
    # Sparse decode rows were planned for verify steps (a prefill chunk reports no tokens_read).
    assert any(d > 0 and n > 1 for d, n in reads)
    assert_no_leak(engine)


def test_sparse_mode_speculation_is_plain_sparse_decoding(sparse_llm):
    """In sparse mode (selector interval 4) drafts never span a reselection or the dense/sparse boundary,
    so speculating gives plain sparse decoding's tokens: long prompts, and one whose decode crosses the
    budget."""
    tok = sparse_llm.engine.tokenizer
    items = LONG_TEXT.split(". ")
    n = next(i for i in range(len(items)) if len(tok.encode(". ".join(items[:i]))) > 1010)
    prompts = [*LONG, ". ".join(items[:n]), SHORT[0]]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    expected = run_engine(sparse_llm.engine, {f"r{i}": (p, greedy) for i, p in enumerate(prompts)})
    spec = LLM(attention="sparse", sparse_recall_sample=1.0, max_num_batched_tokens=4096,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "dynamic": False})
    accepted = []
    got = run_engine(spec.engine, {f"r{i}": (p, greedy) for i, p in enumerate(prompts)},
                     on_step=lambda s: accepted.append(s.spec.num_accepted_tokens))
    assert got == expected
    assert sum(accepted) > 0
    assert_no_leak(spec.engine)


def test_rollback_keeps_summaries_exact(ngram_llm):
    """After a step with rejected drafts, every key summary of the sequence equals a recomputation
    from its committed keys (self_sparse pools keep summaries even on a dense server)."""
    llm = spec_llm("self_sparse")
    engine = llm.engine
    pool = engine.pool
    engine.add_request("s", LONG[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    checked = rejected = 0
    while engine.has_unfinished():
        _, stats = engine.step()
        rejected += stats.spec.num_draft_tokens - stats.spec.num_accepted_tokens
        seq = engine.requests["s"].seqs[0] if "s" in engine.requests else None
        if seq is None or seq.is_finished or not seq.num_output:
            continue
        ps, n = engine.allocator.page_size, seq.num_computed
        assert len(seq.pages.page_table) == engine.allocator.pages_needed(len(seq))
        assert seq.pages.num_hashed * ps <= n
        slots = torch.tensor([seq.pages.page_table[p // ps] * ps + p % ps for p in range(n)])
        for layer in (0, pool.spec.num_layers - 1):
            keys = pool.k[layer].view(-1, pool.spec.num_kv_heads, pool.spec.head_dim)[slots]
            last = (n - 1) // 16 * 16
            block = keys[last:n]
            page, row = seq.pages.page_table[last // ps], (last % ps) // 16
            torch.testing.assert_close(pool.kmin[layer, page, row], block.amin(0))
            torch.testing.assert_close(pool.kmax[layer, page, row], block.amax(0))
            torch.testing.assert_close(pool.kmean[layer, page, row], block.mean(0))
        checked += 1
    assert checked > 3 and rejected > 0
    assert_no_leak(engine)


def test_server_end_to_end_with_the_openai_client(serve):
    """`--speculative-config` through the CLI; a request opting out gets the same greedy text; the
    spec_decode counters count."""
    from openai import OpenAI
    from support import SMALL

    server = serve(*SMALL, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}')
    client = OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    model = client.models.list().data[0].id
    text = "Repeat exactly: alpha beta gamma delta, alpha beta gamma delta."
    messages = [{"role": "user", "content": text}]
    on = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0)
    off = client.chat.completions.create(model=model, messages=messages, max_tokens=32, temperature=0,
                                         extra_body={"speculative": False})
    assert on.choices[0].message.content == off.choices[0].message.content
    stream = client.completions.create(model=model, prompt=SHORT[0], max_tokens=24, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)
    metrics = server.metrics()
    assert metrics[("needle:spec_decode_num_draft_tokens_total", ())] > 0
    assert metrics[("needle:spec_decode_num_accepted_tokens_total", ())] > 0
    assert metrics[("needle:spec_decode_num_accepted_tokens_per_pos_total", (("position", "0"),))] > 0
