"""A tensor-parallel rank > 0 (`python -m needle.engine.rank_worker`, started by rank 0 with its engine
arguments and address pickled on stdin, see engine/distributed.py): build this rank's shard of the model,
KV pool and attention backend as rank 0 builds its own, then run rank 0's steps until it says stop."""

from __future__ import annotations

import logging
import pickle
import sys

from needle.engine.distributed import ignore_interrupts
from needle.engine.llm_engine import LLMEngine


def main() -> None:
    args, address = pickle.load(sys.stdin.buffer)
    ignore_interrupts()
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{address.rank} %(name)s: %(message)s")
    engine = LLMEngine(args, rank=address)
    engine.runner.follow()


if __name__ == "__main__":
    main()
