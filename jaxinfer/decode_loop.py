"""The decode loop, per chip: sample the first token from the prefill logits, then one
`lax.while_loop` of decode steps until every sequence is done (all inside one `shard_map`).

Each chip holds the sampling state of its residual rows (`PhaseSharding.activations`); the only
collective the loop adds to the model's is the all-reduce of the running-rows count that decides
whether to continue (priced by `partitioning.cost_model` as the loop condition). The body,
`decode_body`, is also compiled alone by `Model.compiled_hlo("decode")`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer import model as model_lib
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.sampling import DeviceSampling, sample, seed_key

MAX_STOP_TOKENS = 32
"""Stop-token ids are passed as a fixed-size array padded with -1 (one program for any count)."""


@flax.struct.dataclass
class SamplingState:
    """Everything the decode loop carries from one step to the next (this chip's rows)."""

    step: jax.Array          # scalar int32: tokens generated so far (all rows)
    tokens: jax.Array        # [b, O] int32 generated tokens
    logprobs: jax.Array      # [b, O] float32
    done: jax.Array          # [b] bool: row finished (or is batch padding)
    stopped: jax.Array       # [b] bool: row finished on a stop token
    num_generated: jax.Array  # [b] int32
    nonfinite_step: jax.Array  # [b] int32: step whose logits were not finite (-1: none)
    seen: jax.Array          # [b, V] bool: tokens in prompt or output (repetition penalty)
    last: jax.Array          # [b] int32: the token fed to the next step
    cache: KVCache
    row_keys: jax.Array      # [b, 2] uint32 PRNG key data, one key per row
    running: jax.Array       # scalar bool: some row of the whole batch is not done


def _record(state: SamplingState, logits, sp: DeviceSampling, stop_ids, max_new,
            rt: model_lib.Runtime) -> SamplingState:
    """Sample from logits [b, V] at state.step, store the tokens, update the stop conditions."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
        jax.random.wrap_key_data(state.row_keys), state.step)
    tokens, logprobs = sample(logits, state.seen, keys, sp)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    bad = ~state.done & ~finite
    active = ~state.done & finite
    col = state.step
    tokens = jnp.where(active, tokens, 0)
    num = state.num_generated + active.astype(jnp.int32)
    hit_stop = active & jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    rows = jnp.arange(tokens.shape[0])
    done = state.done | bad | hit_stop | (num >= max_new)
    running = jax.lax.psum(jnp.sum(~done, dtype=jnp.int32), rt.lc.gathered) \
        if rt.lc.gathered else jnp.sum(~done, dtype=jnp.int32)
    return state.replace(
        step=col + 1, tokens=state.tokens.at[:, col].set(tokens),
        logprobs=state.logprobs.at[:, col].set(jnp.where(active, logprobs, 0.0)), done=done,
        stopped=state.stopped | hit_stop, num_generated=num,
        nonfinite_step=jnp.where(bad, col, state.nonfinite_step),
        seen=state.seen.at[rows, tokens].set(state.seen[rows, tokens] | active), last=tokens,
        running=running > 0)


def decode_body(params, state: SamplingState, sp: DeviceSampling, stop_ids, max_new,
                cfg: ModelConfig, rt: model_lib.Runtime) -> SamplingState:
    """One step of the loop: decode the last tokens, advance the running rows, sample."""
    logits, cache = model_lib.decode_step(params, state.last, state.cache, cfg, rt)
    # Finished rows keep their length: they stop growing the cache.
    cache = cache.replace(lengths=cache.lengths + (~state.done).astype(jnp.int32))
    return _record(state.replace(cache=cache), logits, sp, stop_ids, max_new, rt)


def _seen_from_prompts(tokens: jax.Array, lengths: jax.Array, vocab: int) -> jax.Array:
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, tokens].max(valid)


def initial_state(first_logits, prompts, cache: KVCache, n, seed, sp: DeviceSampling, stop_ids,
                  max_new, out_len: int, cfg: ModelConfig, rt: model_lib.Runtime):
    """The state after sampling the first token; the cache grows to prompt + `out_len` slots."""
    b = prompts.shape[0]
    rows = model_lib.row_ids(b, rt)  # global row index of each of this chip's rows
    state = SamplingState(
        step=jnp.int32(0), tokens=jnp.zeros((b, out_len), jnp.int32),
        logprobs=jnp.zeros((b, out_len), jnp.float32), done=rows >= n,
        stopped=jnp.zeros((b,), bool), num_generated=jnp.zeros((b,), jnp.int32),
        nonfinite_step=jnp.full((b,), -1, jnp.int32),
        seen=_seen_from_prompts(prompts, cache.lengths, cfg.vocab_size),
        last=jnp.zeros((b,), jnp.int32), cache=cache.extend(cache.max_len + out_len),
        row_keys=jax.random.key_data(
            jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key(seed), rows)),
        running=jnp.bool_(True))
    return _record(state, first_logits, sp, stop_ids, max_new, rt)


def decode_loop(params, first_logits, prompts, cache: KVCache, n, seed, sp: DeviceSampling,
                stop_ids, max_new, out_len: int, cfg: ModelConfig, rt: model_lib.Runtime):
    """The whole generation after prefill -> (tokens [b, O], logprobs [b, O], num_generated [b],
    stopped [b], nonfinite_step [b]): only what `generate` reads leaves the program."""
    state = initial_state(first_logits, prompts, cache, n, seed, sp, stop_ids, max_new, out_len,
                          cfg, rt)
    state = jax.lax.while_loop(
        lambda s: (s.step < max_new) & s.running,
        lambda s: decode_body(params, s, sp, stop_ids, max_new, cfg, rt), state)
    return state.tokens, state.logprobs, state.num_generated, state.stopped, state.nonfinite_step
