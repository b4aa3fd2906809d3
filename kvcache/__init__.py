"""The paged KV cache: the page pool with its per-page key summaries, the page allocator with reference
counts and the prefix cache (hash chain of full pages). The lowest layer: imports nothing of needle."""
