"""`needle calibrate [MODEL] --out profile.json`: split KV heads into retrieval and streaming heads.

Training-free retrieval-head scoring (DuoAttention's cheap alternative): generate passkey prompts whose
needle sits far outside any local window, let the model answer them with dense attention, and score
each (layer, KV head) by the attention mass its query heads put on the needle tokens while the answer
is produced. Heads that never look at the needle can stream; the lowest `--streaming-ratio` of them,
ranked over all layers, are marked streaming.
"""

from __future__ import annotations

import argparse
import random

import torch
from tqdm import tqdm

from needle.attention.base import AttentionMetadata
from needle.attention.dense import DenseBackend, gather_seq_kv
from needle.attention.head_profile import HeadProfile
from needle.scheduler.sampling_params import SamplingParams

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class NeedleProbe(DenseBackend):
    """Dense attention that also adds up, per layer and KV head, the attention mass the newest query puts
    on the needle positions. Calibration runs one prompt at a time, so one needle serves the batch."""

    def __init__(self, pool, needle: list[int]):
        super().__init__(pool)
        self.needle = needle
        self.mass = torch.zeros(pool.spec.num_layers, pool.spec.num_kv_heads, dtype=torch.float64)
        self.steps = 0

    def begin_step(self, meta: AttentionMetadata) -> None:
        self.steps += 1

    def forward(self, layer, q, k, v, meta, window=None):
        out = super().forward(layer, q, k, v, meta, window)
        if window is not None:  # a sliding-window layer never sees a needle outside its window
            return out
        keys, _ = gather_seq_kv(self.pool, layer, meta.page_tables[0], meta.context_lens[0])
        hkv, d = keys.shape[1], keys.shape[2]
        qg = q[int(meta.query_start_loc[1]) - 1].view(hkv, -1, d)  # [Hkv, G, D]
        probs = torch.softmax((qg @ keys.permute(1, 2, 0)) / d**0.5, dim=-1)
        self.mass[layer] += probs[..., self.needle].sum(-1).mean(-1).double()
        return out


def passkey_prompt(tokenizer, length: int, depth: float,
                   rng: random.Random) -> tuple[list[int], list[int], str]:
    """-> (prompt ids, needle positions, answer): a 7-digit pass key at `depth` of a noise haystack."""
    key = str(rng.randrange(10**6, 10**7))
    head = tokenizer.encode("There is a pass key hidden in this text. Find it and remember it.\n")
    noise = tokenizer.encode(NOISE)
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tokenizer.encode("\nWhat is the pass key? The pass key is")
    fill = max(0, length - len(head) - len(needle) - len(question))
    before = round(fill * depth)
    hay = (noise * (fill // len(noise) + 1))[:fill]
    ids = head + hay[:before] + needle + hay[before:] + question
    start = len(head) + before
    return ids, list(range(start, start + len(needle))), key


def calibrate(llm, num_prompts: int, length: int, seed: int) -> torch.Tensor:
    """Mean needle mass per (layer, KV head) over the answer steps of `num_prompts` passkey prompts."""
    engine = llm.engine
    probe = NeedleProbe(engine.pool, [])
    engine.set_backend(probe)
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    for n in tqdm(range(num_prompts), desc="calibrating"):
        ids, probe.needle, _ = passkey_prompt(llm.tokenizer, length, (n + 0.5) / num_prompts, rng)
        llm.generate([ids], params)
    return probe.mass / max(1, probe.steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="needle calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="Model (default: the bundled SmolLM2).")
    parser.add_argument("--out", required=True, help="Where to write the JSON profile.")
    parser.add_argument("--streaming-ratio", type=float, default=0.5,
                        help="Share of KV heads (over all layers) marked streaming.")
    parser.add_argument("--num-prompts", type=int, default=8, help="Passkey prompts to score heads on.")
    parser.add_argument("--length", type=int, default=2048, help="Prompt length in tokens.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from needle.engine.llm import LLM

    llm = LLM(args.model, attention="dense", device=args.device, enable_prefix_caching=False)
    scores = calibrate(llm, args.num_prompts, args.length, args.seed)
    windows = llm.engine.model_config.layer_windows
    local_layers = [layer for layer, w in enumerate(windows) if w is not None]
    profile = HeadProfile.from_scores(llm.engine.model_name, scores.tolist(), args.streaming_ratio,
                                      llm.engine.model_config.identity, local_layers)
    profile.save(args.out)
    global_heads = (profile.num_layers - len(local_layers)) * profile.num_kv_heads
    left_out = f" ({len(local_layers)} sliding-window layers left out)" if local_layers else ""
    print(f"wrote {args.out}: {sum(map(sum, profile.streaming))} of {global_heads} KV heads of the global "
          f"layers streaming{left_out}")
    return 0
