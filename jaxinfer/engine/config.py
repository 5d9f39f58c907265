"""The engine's configuration, per-call statistics and result."""

from __future__ import annotations

import dataclasses

import jax

from jaxinfer import distributed, validation
from jaxinfer.generate import GenerationResult

CPU_KV_CACHE_BYTES = 1 << 30
"""Default KV pool budget where the device reports no memory statistics (CPU): 1 GiB."""
KV_MEMORY_FRACTION = 0.5
"""Default KV pool budget on accelerators: this fraction of the device's free memory."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the continuous-batching engine is sized (validated on construction)."""

    max_seqs: int = 32
    """Sequences running at once (slots of the page table and of the sampling state)."""
    page_size: int = 16
    """Tokens per KV page."""
    kv_cache_bytes: int | None = None
    """Bytes of the KV page pool (all layers, keys, values and int8 scales). None: enough for
    max_seqs sequences of max_model_len tokens, capped at KV_MEMORY_FRACTION of the device's free
    memory (CPU_KV_CACHE_BYTES where the device reports none)."""
    token_budget: int = 256
    """Tokens fed per step (decodes first, then prefill chunks); >= max_seqs."""
    max_prefill_chunk: int | None = None
    """Most prompt tokens of one sequence per step (chunked prefill). None: token_budget."""
    max_model_len: int | None = None
    """Longest prompt + output of a request. None: the model's max_context."""
    prefix_caching: bool = True
    """Share full KV pages of identical prompt prefixes across requests."""
    min_token_bucket: int = 8
    """Smallest padded token count of a step (steps are padded to powers of two >= this)."""
    steps_per_call: int = 8
    """Most engine steps of one device call: a decode-only stretch runs up to this many steps in
    an on-device loop (pages reserved ahead by the scheduler), returning early when a sequence
    finishes or runs out of reserved pages. 1: one step per call."""

    def __post_init__(self):
        validation.integer("EngineConfig.max_seqs", self.max_seqs, 1)
        validation.integer("EngineConfig.page_size", self.page_size, 1)
        validation.optional_integer("EngineConfig.kv_cache_bytes", self.kv_cache_bytes, 1)
        validation.integer("EngineConfig.token_budget", self.token_budget, self.max_seqs)
        validation.optional_integer("EngineConfig.max_prefill_chunk", self.max_prefill_chunk, 1,
                                    self.token_budget)
        validation.optional_integer("EngineConfig.max_model_len", self.max_model_len, 2)
        validation.boolean("EngineConfig.prefix_caching", self.prefix_caching)
        validation.integer("EngineConfig.min_token_bucket", self.min_token_bucket, 1)
        validation.integer("EngineConfig.steps_per_call", self.steps_per_call, 1, 1024)

    def kv_pool_bytes(self, full_bytes: int) -> int:
        """The pool's bytes: `kv_cache_bytes`, or the default for a model whose max_seqs
        full-length sequences take `full_bytes`, from this process's devices' free memory. Under
        jax.distributed the default is the least over all processes (a collective every process
        enters as it builds its engine), so every process sizes the same pool and its scheduler
        plans the same steps."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        stats = [d.memory_stats() or {} for d in jax.local_devices()]
        free = [s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats if "bytes_limit" in s]
        budget = int(min(free) * KV_MEMORY_FRACTION) if free else CPU_KV_CACHE_BYTES
        return distributed.min_over_processes(min(full_bytes, budget))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one `Engine.generate` call did and how long it took (times in seconds, wall clock)."""

    requests: int
    """Requests in the call."""
    prompt_tokens: int
    """Prompt tokens of all requests."""
    prefill_tokens: int
    """Prompt (and recomputed, after preemption) tokens fed to the model: excludes prefix hits."""
    prefix_hit_tokens: int
    """Prompt tokens whose K/V came from the prefix cache."""
    generated_tokens: int
    """Tokens generated (returned) over all requests."""
    preemptions: int
    """Sequences preempted for lack of pages (freed, recomputed later)."""
    steps: int
    """Engine steps (model passes; a device call runs one, or several in a decode-only loop)."""
    device_calls: int
    """Device calls (host round trips)."""
    wall_s: float
    """Duration of the call."""
    device_s: float
    """Time from dispatching each step to holding its sampled tokens on the host."""
    tokens_per_s: float
    """generated_tokens / wall_s."""
    host_s_per_token: float
    """(wall_s - device_s) / generated_tokens: scheduling and bookkeeping per generated token."""
    ttft_s: tuple[float | None, ...]
    """Per request (prompt order): time from the call's start to its first generated token;
    None for a request aborted before its first token."""
    tpot_s: tuple[float | None, ...]
    """Per request: (time of its last token - time of its first) / (tokens - 1); None for a
    single-token output."""


@dataclasses.dataclass(frozen=True)
class EngineResult(GenerationResult):
    """A `GenerationResult` with the engine's per-call statistics."""

    stats: EngineStats | None = None
    """Counters and timings of the call."""
    top_logprobs: list[list[tuple[tuple[int, float], ...]] | None] | None = None
    """Per prompt: None where its params.logprobs is None, else per generated token the
    params.logprobs most likely (token id, raw logprob) pairs, most likely first."""
