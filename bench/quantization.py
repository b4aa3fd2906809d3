"""CPU decode speed and fidelity of `--quantization int4` against the same model in fp32, side by side.

`python -m bench.quantization [--context 512] [--steps 32]`: one engine per setting over the bundled
model; decode steps of the two alternate (so a busy CPU slows both alike), then each prefills the prompt
(best of --rounds, prefix cache off); then the logprob of fp32's
top-1 token and the top-1 agreement over every position of a fixed stdlib prompt. Prints one markdown
table.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.texts import long_prompt
from needle.engine import LLM, SamplingParams


def step_seconds(llm: LLM, prompt: list[int], steps: int) -> list[float]:
    """Wall time of each decode step of one greedy sequence, after its prefill."""
    engine = llm.engine
    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()  # prefill (+ the first token)
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def prefill_seconds(llm: LLM, prompt: list[int]) -> float:
    """Wall time of one prompt's prefill and first token."""
    engine = llm.engine
    engine.add_request("prefill", prompt, SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-softmax at every position of one prefill (through the runner, batch of one)."""
    from needle.attention.base import AttentionMetadata

    engine = llm.engine
    pages = list(range(-(-len(ids) // engine.pool.spec.page_size)))
    meta = AttentionMetadata.build([0], [len(ids)], [len(ids)], [pages], engine.pool.spec.page_size, "cpu",
                                   ["dense"], [0])
    with torch.inference_mode():
        hidden = engine.runner.forward(torch.tensor(ids), meta)
        engine.backend.release(0)
        return engine.model.logits(hidden).log_softmax(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512, help="Prompt tokens before decoding.")
    parser.add_argument("--steps", type=int, default=32, help="Decode steps timed per setting.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds per setting.")
    args = parser.parse_args(argv)
    llms = {q: LLM(attention="dense", quantization=q, kv_cache_memory="256MiB",
                     enable_prefix_caching=False) for q in ("none", "int4")}
    prompt = long_prompt(llms["none"].tokenizer, args.context)
    times: dict[str, list[float]] = {q: [] for q in llms}
    for _ in range(args.rounds):
        for q, llm in llms.items():
            times[q] += step_seconds(llm, prompt, args.steps)
    prefill = {q: min(prefill_seconds(llm, prompt) for _ in range(args.rounds)) for q, llm in llms.items()}
    ref, got = (prompt_logprobs(llms[q], prompt) for q in ("none", "int4"))
    top = ref.argmax(-1, keepdim=True)
    delta = (ref.gather(1, top) - got.gather(1, top)).abs()
    agree = (got.argmax(-1, keepdim=True) == top).float().mean().item()
    ms = {q: 1e3 * sorted(t)[len(t) // 2] for q, t in times.items()}
    print(f"| weights | decode ms/token (median) | tok/s | vs fp32 | prefill s | vs fp32 |  (context "
          f"{args.context}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|---|")
    for q, label in (("none", "fp32"), ("int4", "int4 (LM head int8)")):
        print(f"| {label} | {ms[q]:.1f} | {1e3 / ms[q]:.1f} | {ms['none'] / ms[q]:.2f}x | {prefill[q]:.2f} | "
              f"{prefill['none'] / prefill[q]:.2f}x |")
    print(f"\nint4 vs fp32 over {len(prompt)} positions: top-1 agreement {agree:.3f}, |logprob of fp32's "
          f"top-1| difference mean {delta.mean():.4f}, max {delta.max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
