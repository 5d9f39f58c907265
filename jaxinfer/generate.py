"""Generation on the host side: buckets, the two programs (prefill, decode loop), results.

Prompts of a batch are right-padded to a prompt-length bucket and the batch to a batch bucket, so
varied requests reuse a few compiled programs: prefill depends only on (batch, prompt bucket),
the decode loop on (batch, prompt bucket, output bucket) and the active sampling filters; stop
tokens travel as a fixed-size array. Each sequence keeps its own length and stop state, and
positions are per sequence, so a sequence decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import decode_loop as loop_lib
from jaxinfer import validation
from jaxinfer import placement
from jaxinfer.cache import KVCache
from jaxinfer.programs import Programs, state_specs
from jaxinfer.sampling import SamplingConfig

MIN_PROMPT_BUCKET = 16
MIN_OUTPUT_BUCKET = 8
def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Smallest power of two >= n (and >= minimum), capped at maximum when given (maximum >= n)."""
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return size if maximum is None else min(size, maximum)


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or infinite logits; `result` holds what was generated."""

    def __init__(self, message: str, result: "GenerationResult"):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: list[list[int]]
    """Generated token ids per prompt (a stop token that ended generation is included)."""
    logprobs: list[list[float]]
    """Log-probability of each generated token under the model's raw distribution."""
    finish_reasons: list[str]
    """'stop' (a stop token was generated), 'length' (max_new_tokens reached) or 'error'
    (non-finite logits: see `NonFiniteLogitsError`), per prompt."""
    text: list[str] | None = None
    """Decoded generated text per prompt, when the model has a tokenizer."""
    timings: dict[str, float] | None = None
    """Wall-clock seconds of this call: 'prefill_s' (prompt + first logits) and 'decode_s' for
    the static batch; 'wall_s' and 'device_s' for the engine."""

    def __repr__(self) -> str:
        """A summary: counts, finish reasons, timings and the start of each text."""
        reasons: dict[str, int] = {}
        for r in self.finish_reasons:
            reasons[str(r)] = reasons.get(str(r), 0) + 1
        parts = [f"{len(self.tokens)} results", f"{sum(map(len, self.tokens))} tokens",
                 "finish " + " ".join(f"{k}={v}" for k, v in sorted(reasons.items()))]
        if self.timings:
            parts.append(" ".join(f"{k}={v:.3f}" for k, v in self.timings.items()))
        if self.text is not None:
            shown = [repr(t if len(t) <= 24 else t[:21] + "...") for t in self.text[:3]]
            more = f", ... {len(self.text) - 3} more" if len(self.text) > 3 else ""
            parts.append(f"text=[{', '.join(shown)}{more}]")
        return f"{type(self).__name__}({', '.join(parts)})"


def _fetch(arrays):
    """Host copies of (possibly multi-process) arrays: arrays split over several processes'
    devices are all-gathered, so every process returns every sequence's result."""
    if all(x.is_fully_addressable or x.is_fully_replicated for x in arrays):
        return jax.device_get(arrays)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(arrays, tiled=True)


def seed_halves(seed: int) -> np.ndarray:
    """A seed in [0, 2**63) as uint32 (low, high) halves (`decode_loop` builds its key)."""
    return np.asarray([seed & 0xFFFFFFFF, seed >> 32], np.uint32)


def stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to `decode_loop.MAX_STOP_TOKENS`."""
    stops = list(stop_tokens)
    if len(stops) > loop_lib.MAX_STOP_TOKENS:
        raise ValueError(f"stop_tokens has {len(stops)} ids; at most "
                         f"{loop_lib.MAX_STOP_TOKENS} are supported")
    return np.asarray(stops + [-1] * (loop_lib.MAX_STOP_TOKENS - len(stops)), np.int32)


class Generator:
    """Runs `Programs` for batches of prompts: bucketing, placement, resharding, results."""

    def __init__(self, programs: Programs):
        self.programs = programs
        self.cfg = programs.cfg
        self.prefill_sh = programs.prefill_rt.sharding
        self.decode_sh = programs.decode_rt.sharding

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this (every phase splits them evenly)."""
        return math.lcm(self.prefill_sh.batch_multiple, self.decode_sh.batch_multiple)

    def batch_bucket(self, n: int) -> int:
        multiple = self.batch_multiple
        return -(-bucket(n, 1) // multiple) * multiple

    def prompt_bucket(self, longest: int) -> int:
        return bucket(longest, MIN_PROMPT_BUCKET, self.cfg.max_context)

    def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        cfg = self.cfg
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        validation.max_new_tokens(max_new_tokens)
        validation.ids_in_vocab(prompts, cfg.vocab_size)
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
            if len(prompt) + max_new_tokens > cfg.max_context:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                    f"that exceeds the model's context of {cfg.max_context} tokens")

    def prefill(self, params, tokens: np.ndarray, lengths: np.ndarray):
        """Run prefill on host arrays; returns (first logits, prompt cache) in decode's
        shardings (moved there when the phases differ, pope2022.md §6.4)."""
        sh = self.prefill_sh
        logits, cache = self.programs.prefill(
            params, placement.host_array(tokens, sh.row_spec(1), sh),
            placement.host_array(lengths, sh.row_spec(), sh))
        dsh = self.decode_sh
        logits = placement.to_phase(logits, dsh.row_spec(1), dsh)
        cache = placement.to_phase(cache, placement.cache_specs(cache, dsh), dsh)
        return logits, cache

    def generate(self, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 max_new_tokens: int, stop_tokens: Sequence[int], seed: int) -> GenerationResult:
        cfg = self.cfg
        self.validate(prompts, max_new_tokens)
        sampling.validate(cfg.vocab_size)
        stops = stop_array(stop_tokens)
        n = len(prompts)
        batch = self.batch_bucket(n)
        t_len = self.prompt_bucket(max(len(p) for p in prompts))
        out_len = bucket(max_new_tokens, MIN_OUTPUT_BUCKET)
        tokens = np.zeros((batch, t_len), np.int32)
        lengths = np.ones((batch,), np.int32)  # padding rows: one dummy token
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
        t_start = time.perf_counter()
        first_logits, cache = self.prefill(params, tokens, lengths)
        first_logits.block_until_ready()
        t_prefill = time.perf_counter()
        sp = sampling.device_params()
        dsh = self.decode_sh
        decode = self.programs.decode(out_len, jax.tree.structure(sp))
        out = decode(params, first_logits, placement.host_array(tokens, dsh.row_spec(1), dsh),
                     cache, np.int32(n), seed_halves(seed), sp, stops, np.int32(max_new_tokens))
        tokens, logprobs, num, stopped, nonfinite = _fetch(out)
        timings = {"prefill_s": t_prefill - t_start, "decode_s": time.perf_counter() - t_prefill}
        result = GenerationResult(
            tokens=[tokens[i, :num[i]].tolist() for i in range(n)],
            logprobs=[logprobs[i, :num[i]].tolist() for i in range(n)],
            finish_reasons=["error" if nonfinite[i] >= 0 else "stop" if stopped[i] else "length"
                            for i in range(n)],
            timings=timings)
        bad = [(i, int(nonfinite[i])) for i in range(n) if nonfinite[i] >= 0]
        if bad:
            where = ", ".join(f"prompt {i} at step {s}" for i, s in bad)
            raise NonFiniteLogitsError(f"the model produced non-finite logits ({where}); those "
                                       "requests stopped (finish_reason 'error')", result)
        return result

    # ---- introspection -------------------------------------------------------------------------
    def lowered(self, params, phase: str, batch: int, context: int, prompt_len: int | None):
        """The lowered program `generate` runs for this shape bucket (decode: one loop step)."""
        program, args = self.step_program(params, phase, batch, context, prompt_len)
        return program.lower(*args)

    def step_program(self, params, phase: str, batch: int, context: int,
                     prompt_len: int | None):
        """(jitted program, abstract arguments) of the step `generate` runs for this bucket."""
        batch = self.batch_bucket(batch)
        if phase == "prefill":
            t_len = self.prompt_bucket(prompt_len or context)
            sh = self.prefill_sh
            args = (params, _abstract((batch, t_len), jnp.int32, sh.row_spec(1), sh),
                    _abstract((batch,), jnp.int32, sh.row_spec(), sh))
            return self.programs.prefill, args
        if phase != "decode":
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        sp = SamplingConfig().device_params()
        state = jax.eval_shape(lambda: loop_lib.SamplingState(
            step=jnp.int32(0), tokens=jnp.zeros((batch, MIN_OUTPUT_BUCKET), jnp.int32),
            logprobs=jnp.zeros((batch, MIN_OUTPUT_BUCKET)), done=jnp.zeros((batch,), bool),
            stopped=jnp.zeros((batch,), bool), num_generated=jnp.zeros((batch,), jnp.int32),
            nonfinite_step=jnp.zeros((batch,), jnp.int32),
            seen=jnp.zeros((batch, self.cfg.vocab_size), bool),
            last=jnp.zeros((batch,), jnp.int32),
            cache=KVCache.init(self.cfg, batch, context, self.programs.cache_dtype),
            row_keys=jnp.zeros((batch, 2), jnp.uint32), running=jnp.bool_(True)))
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             state, placement.named(state_specs(state, self.decode_sh),
                                                    self.decode_sh))
        return self.programs.decode_step(state, sp), (params, state, sp, stop_array([]),
                                                      jnp.int32(1))


def _abstract(shape, dtype, spec, sh):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placement.named(spec, sh))
