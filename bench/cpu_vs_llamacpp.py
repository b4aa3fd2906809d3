"""needle vs llama.cpp on the CPU, side by side in one run, on the bundled SmolLM2 GGUF (greedy).

    .venv/bin/python bench/cpu_vs_llamacpp.py --setup      # once: llama-cpp-python into its own venv
    .venv/bin/python bench/cpu_vs_llamacpp.py [--threads 2] [--context 7000] [--new-tokens 64]

llama.cpp runs through `llama-cpp-python` (built from source by --setup into ~/.cache/needle/llamacpp-venv,
never a dependency of needle) in a child process reading the same GGUF, fed the same token ids. Rows:
prefill of `--context` tokens (s), decode tok/s at a short context (best of 3) and after the long
prefill, and, for needle, 8 concurrent sequences' aggregate decode tok/s at short context (best of 3;
llama.cpp serves one stream).
needle runs CONFIGS: dense fp32 (the parity path), and dense and sparse `--quantization int4` with fp32
and float16 K/V pages (`--kv-cache-dtype`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(os.environ.get("NEEDLE_CACHE", Path.home() / ".cache" / "needle")) / "llamacpp-venv"
LLAMA_CPP = "llama-cpp-python==0.3.36"
SHORT = 32  # tokens of the short-context prompt
CONFIGS = [("dense", "none", "auto"), ("dense", "int4", "auto"), ("dense", "int4", "float16"),
           ("sparse", "int4", "auto"), ("sparse", "int4", "float16")]  # attention, quantization, KV dtype

CHILD = r"""
import json, sys, time
from llama_cpp import Llama

gguf, threads, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
long_ids, short_ids = json.loads(sys.stdin.read())
llm = Llama(model_path=gguf, n_ctx=len(long_ids) + new + 16, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False)

def decode(n):
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([llm.sample(temp=0.0, top_k=1)])
    return n / (time.perf_counter() - t)

short = 0.0
for _ in range(3):  # best of 3: a shared VM's speed drifts from second to second
    llm.reset()
    llm.eval(short_ids)
    short = max(short, decode(new))
llm.reset()
t = time.perf_counter()
llm.eval(long_ids)
prefill = time.perf_counter() - t
print(json.dumps({"prefill_s": prefill, "decode_short": short, "decode_long": decode(new)}))
"""


# -march=native builds AVX-512 code on this VM, whose CPU then traps it (Illegal instruction): name the
# instruction sets instead (CMAKE_ARGS in the environment overrides). The multimodal library is not needed.
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"


def setup() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count()), **os.environ,
           "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS)}
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--no-cache-dir", "--force-reinstall",
                    LLAMA_CPP], check=True, env=env)


def token_ids(context: int) -> tuple[list[int], list[int]]:
    from texts import stdlib_text

    from needle.engine.llm_engine import load_tokenizer
    from needle.engine.loader import resolve_model

    tok = load_tokenizer(resolve_model(None, "auto")[0])
    ids = tok.encode(stdlib_text(context * 6))[:context]
    return ids, ids[:SHORT]


def llamacpp(gguf: Path, threads: int, long_ids: list[int], short_ids: list[int], new: int) -> dict:
    python = VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"no llama.cpp venv at {VENV}: run with --setup first")
    out = subprocess.run([str(python), "-c", CHILD, str(gguf), str(threads), str(new)],
                         input=json.dumps([long_ids, short_ids]), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"llama.cpp failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def needle(attention: str, quantization: str, kv_dtype: str, long_ids: list[int], short_ids: list[int],
           new: int) -> dict:
    from needle import LLM, SamplingParams

    llm = LLM(attention=attention, quantization=quantization, kv_cache_dtype=kv_dtype,
              max_model_len=len(long_ids) + new + 16, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

    def run(prompts: list[list[int]]) -> tuple[float, float]:
        """-> (seconds until every sequence has its first token, decode tok/s after that)."""
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, greedy)
        t0 = time.perf_counter()
        started: set[str] = set()
        first, tokens = 0.0, 0
        while engine.has_unfinished():
            outputs, _ = engine.step()
            if len(started) == len(prompts):
                tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
                continue
            started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
            if len(started) == len(prompts):
                first = time.perf_counter()
        return first - t0, tokens / (time.perf_counter() - first)

    run([short_ids])  # warm-up
    short = max(run([short_ids])[1] for _ in range(3))  # best of 3, as for llama.cpp
    prefill, long = run([long_ids])
    concurrent = max(run([[*short_ids[:-1], 1000 + i] for i in range(8)])[1] for _ in range(3))
    return {"prefill_s": prefill, "decode_short": short, "decode_long": long, "decode_8": concurrent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help=f"build {LLAMA_CPP} into {VENV} and exit")
    ap.add_argument("--threads", type=int, default=2, help="threads for both (OMP_NUM_THREADS for needle)")
    ap.add_argument("--context", type=int, default=7000, help="tokens of the long prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement")
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    import torch

    from needle.engine.loader import bundled_gguf

    torch.set_num_threads(args.threads)
    long_ids, short_ids = token_ids(args.context)
    rows = {"llama.cpp": llamacpp(bundled_gguf(), args.threads, long_ids, short_ids, args.new_tokens)}
    print(json.dumps(rows["llama.cpp"]), flush=True)
    for attention, quant, kv_dtype in CONFIGS:
        name = f"needle {attention}, {quant}, KV {kv_dtype}"
        rows[name] = needle(attention, quant, kv_dtype, long_ids, short_ids, args.new_tokens)
        print(json.dumps(rows[name]), flush=True)
    ref = rows["llama.cpp"]
    print(f"\n{args.threads} threads, {args.context}-token prefill, {args.new_tokens} new tokens, greedy, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| engine | prefill s | decode tok/s, short | decode tok/s at the long context | 8 concurrent, "
          "aggregate tok/s |\n|---|---|---|---|---|")
    for name, r in rows.items():
        cells = [cell(r, ref, "prefill_s", True), cell(r, ref, "decode_short"), cell(r, ref, "decode_long"),
                 cell(r, ref, "decode_8")]
        print(f"| {name} | " + " | ".join(cells) + " |")


def cell(row: dict, ref: dict, key: str, lower_is_better: bool = False) -> str:
    """The figure and its ratio to llama.cpp (the 8-sequence aggregate against its single stream)."""
    if key not in row:
        return "-"
    ratio = ref[key] / row[key] if lower_is_better else row[key] / ref.get(key, ref["decode_short"])
    return f"{row[key]:.1f} ({ratio:.2f}x)"


if __name__ == "__main__":
    main()
