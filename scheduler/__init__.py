"""Continuous batching: sequences, their sampling settings, and the step planner (chunked prefill,
preemption by recompute). Imports kvcache/ only (the allocator hands out the pages it plans with)."""
