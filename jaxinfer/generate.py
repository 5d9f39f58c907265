"""Generation: bucketed prefill, then the whole decode loop as one jitted `lax.while_loop`.

Prompts of a batch are right-padded to a prompt-length bucket and the batch to a batch bucket, so
varied requests reuse a few compiled programs. Each sequence keeps its own length and stop state,
and positions are per sequence, so a sequence decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model as model_lib
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.sampling import SamplingConfig, SamplingParams, sample

MIN_PROMPT_BUCKET = 16
MIN_OUTPUT_BUCKET = 8


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Smallest power of two >= n (and >= minimum), capped at maximum when given (maximum >= n)."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return size if maximum is None else min(size, maximum)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]
    """Generated token ids per prompt (a stop token that ended generation is included)."""
    logprobs: list[list[float]]
    """Log-probability of each generated token under the model's raw distribution."""
    finish_reasons: list[str]
    """'stop' (a stop token was generated) or 'length' (max_new_tokens reached), per prompt."""
    text: list[str] | None = None
    """Decoded generated text per prompt, when the model has a tokenizer."""
    timings: dict[str, float] | None = None
    """Wall-clock seconds of this call: 'prefill_s' (prompt + first logits) and 'decode_s'."""


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries from one step to the next."""

    step: jax.Array          # scalar int32: tokens generated so far (all rows)
    tokens: jax.Array        # [B, O] int32 generated tokens
    logprobs: jax.Array      # [B, O] float32
    done: jax.Array          # [B] bool: row finished (or is batch padding)
    stopped: jax.Array       # [B] bool: row finished on a stop token
    num_generated: jax.Array  # [B] int32
    seen: jax.Array          # [B, V] bool: tokens in prompt or output (repetition penalty)
    cache: KVCache
    row_keys: jax.Array      # [B] PRNG keys, one per row


def _record(state: SamplingState, tokens, logprobs, stop_ids, max_new) -> SamplingState:
    """Store the tokens sampled at state.step and update per-row stop conditions."""
    active = ~state.done
    col = state.step
    tokens = jnp.where(active, tokens, 0)
    new_tokens = state.tokens.at[:, col].set(tokens)
    new_logprobs = state.logprobs.at[:, col].set(jnp.where(active, logprobs, 0.0))
    num = state.num_generated + active.astype(jnp.int32)
    hit_stop = active & jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    rows = jnp.arange(tokens.shape[0])
    seen = state.seen.at[rows, tokens].set(state.seen[rows, tokens] | active)
    done = state.done | hit_stop | (num >= max_new)
    return state.replace(step=col + 1, tokens=new_tokens, logprobs=new_logprobs, done=done,
                         stopped=state.stopped | hit_stop, num_generated=num, seen=seen)


def _step_keys(state: SamplingState):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, state.step)


def decode_loop(params, first_logits, state: SamplingState, sp: SamplingParams, stop_ids,
                max_new, cfg: ModelConfig, rt: model_lib.Runtime) -> SamplingState:
    """Sample the first token from the prefill logits, then decode until every row is done."""
    tokens, logprobs = sample(first_logits, state.seen, _step_keys(state), sp)
    state = _record(state, tokens, logprobs, stop_ids, max_new)
    # Unrolled layers (a list of per-layer weights, the CPU default): carry one cache buffer per
    # layer, so no layer's slice of the stacked cache is copied each step
    # (`KVCache.unstack_layers`); splitting and joining cost one cache copy per call. Not at
    # batch 1: there XLA:CPU duplicates each buffer's in-place write for the attention dot's
    # squeezed operand and copies every buffer per step (`scripts/profile_decode.py`: copies 9%
    # of the step, against 3% for slicing the stacked cache).
    per_layer = (isinstance(params["layers"], list) and rt.layers is None
                 and state.cache.batch > 1)
    if per_layer:
        state = state.replace(cache=rt.shard_cache(state.cache.unstack_layers()))

    def cond(carry):
        state, _ = carry
        return (state.step < max_new) & ~jnp.all(state.done)

    def body(carry):
        state, last = carry
        logits, cache = model_lib.decode_step(params, last, state.cache, cfg, rt)
        # Finished rows keep their length: they stop growing the cache.
        cache = cache.replace(lengths=jnp.where(state.done, state.cache.lengths, cache.lengths))
        state = state.replace(cache=cache)
        tokens, logprobs = sample(logits, state.seen, _step_keys(state), sp)
        return _record(state, tokens, logprobs, stop_ids, max_new), tokens

    state, _ = jax.lax.while_loop(cond, body, (state, tokens))
    return state.replace(cache=rt.shard_cache(state.cache.stack_layers())) if per_layer else state


def _seen_from_prompts(tokens: jax.Array, lengths: jax.Array, vocab: int) -> jax.Array:
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, tokens].max(valid)


def _fetch(arrays):
    """Host copies of (possibly multi-process) arrays: arrays split over several processes'
    devices are all-gathered, so every process returns every sequence's result."""
    if all(x.is_fully_addressable or x.is_fully_replicated for x in arrays):
        return jax.device_get(arrays)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(arrays, tiled=True)


class Generator:
    """Compiled prefill + decode programs for one model, cached per shape bucket."""

    def __init__(self, cfg: ModelConfig, runtime: model_lib.Runtime, cache_dtype,
                 placement=None):
        """placement: an optional `partitioning.sharding.Placement`; prefill and decode then run
        under its phases' layouts, with the KV cache resharded between them."""
        self.cfg = cfg
        self.runtime = runtime
        self.cache_dtype = cache_dtype
        self.placement = placement
        prefill_rt = runtime if placement is None else placement.runtime("prefill", runtime)
        decode_rt = runtime if placement is None else placement.runtime("decode", runtime)
        # Under a plan the prefilled cache leaves in prefill's attention sharding (then resharded).
        out_shardings = None if placement is None else placement.prefill_out_shardings(
            KVCache.abstract(cfg, 1, 1, cache_dtype))
        self._prefill = jax.jit(functools.partial(model_lib.prefill, cfg=cfg, rt=prefill_rt),
                                donate_argnames=("cache",), out_shardings=out_shardings)
        self._decode = jax.jit(functools.partial(decode_loop, cfg=cfg, rt=decode_rt),
                               donate_argnames=("state",))

    @functools.partial(jax.jit, static_argnames=("self", "out_len"))
    def _initial_state(self, tokens, lengths, cache, n, seed, out_len: int) -> SamplingState:
        """The loop's starting state, built in one compiled program (no eager set-up ops)."""
        batch = tokens.shape[0]
        base_key = jax.random.key(seed)
        return SamplingState(
            step=jnp.int32(0), tokens=jnp.zeros((batch, out_len), jnp.int32),
            logprobs=jnp.zeros((batch, out_len), jnp.float32),
            done=jnp.arange(batch) >= n, stopped=jnp.zeros((batch,), bool),
            num_generated=jnp.zeros((batch,), jnp.int32),
            seen=_seen_from_prompts(tokens, lengths, self.cfg.vocab_size), cache=cache,
            row_keys=jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, jnp.arange(batch)))

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        cache = KVCache.init(self.cfg, batch, max_len, self.cache_dtype)
        return cache if self.placement is None else self.placement.reshard_cache(cache, "prefill")

    def _to_decode(self, cache: KVCache) -> KVCache:
        """Reshard the cache from prefill's attention sharding to decode's (pope2022.md §6.4)."""
        return cache if self.placement is None else self.placement.reshard_cache(cache, "decode")

    def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        cfg = self.cfg
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
            bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                 f"[0, {cfg.vocab_size})")
            if len(prompt) + max_new_tokens > cfg.max_context:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the model's context of {cfg.max_context} tokens")

    def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 max_new_tokens: int, stop_tokens: Sequence[int], seed: int) -> GenerationResult:
        cfg = self.cfg
        self.validate(prompts, max_new_tokens)
        sampling.validate(cfg.vocab_size)
        n = len(prompts)
        batch = bucket(n, 1)
        if self.placement is not None:
            multiple = self.placement.batch_multiple
            batch = -(-batch // multiple) * multiple  # pad the batch to split evenly
        longest = max(len(p) for p in prompts)
        t_len = bucket(longest, MIN_PROMPT_BUCKET, cfg.max_context)
        out_len = bucket(max_new_tokens, MIN_OUTPUT_BUCKET)
        tokens = np.zeros((batch, t_len), np.int32)
        lengths = np.ones((batch,), np.int32)  # padding rows: one dummy token
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
        cache = self._new_cache(batch, t_len + out_len)
        t_start = time.perf_counter()
        first_logits, cache = self._prefill(params, tokens, lengths, cache)
        cache = self._to_decode(cache)
        first_logits.block_until_ready()
        t_prefill = time.perf_counter()
        state = self._initial_state(tokens, lengths, cache, np.int32(n), np.uint32(seed),
                                    out_len=out_len)
        stop_ids = np.asarray(list(stop_tokens) or [-1], np.int32)
        state = self._decode(params, first_logits, state, sampling.device_params(), stop_ids,
                             np.int32(max_new_tokens))
        tokens, logprobs, num, stopped = _fetch(
            (state.tokens, state.logprobs, state.num_generated, state.stopped))
        timings = {"prefill_s": t_prefill - t_start, "decode_s": time.perf_counter() - t_prefill}
        return GenerationResult(
            tokens=[tokens[i, :num[i]].tolist() for i in range(n)],
            logprobs=[logprobs[i, :num[i]].tolist() for i in range(n)],
            finish_reasons=["stop" if stopped[i] else "length" for i in range(n)],
            timings=timings)
