"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, repetition penalty.

`SamplingConfig` is what users write (validated on the host). `SamplingParams` is its device form:
the numbers are traced arrays (changing them does not recompile), only which filters are active is
static. Filters apply in this order, each on the distribution left by the previous one:
repetition penalty -> temperature -> top-k -> top-p -> min-p. The returned logprob of a chosen token is
under the model's raw distribution (log-softmax of the unprocessed logits), as vLLM reports it.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """A sampling strategy. temperature 0 means greedy (argmax after the repetition penalty)."""

    temperature: float = 0.0
    """Softmax temperature; 0 selects greedy decoding."""
    top_k: int | None = None
    """Keep only the k most likely tokens."""
    top_p: float | None = None
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    min_p: float | None = None
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    repetition_penalty: float | None = None
    """HF/CTRL penalty on tokens already in the prompt or output: logit/p if > 0, else logit*p."""

    def validate(self, vocab_size: int) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
            if self.top_k > vocab_size:
                raise ValueError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and not (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")

    def device_params(self) -> "SamplingParams":
        return SamplingParams(
            temperature=jnp.float32(self.temperature if self.temperature > 0 else 1.0),
            top_k=jnp.int32(self.top_k or 0), top_p=jnp.float32(self.top_p or 1.0),
            min_p=jnp.float32(self.min_p or 0.0),
            repetition_penalty=jnp.float32(self.repetition_penalty or 1.0),
            greedy=self.temperature == 0, use_top_k=self.top_k is not None,
            use_top_p=self.top_p is not None, use_min_p=self.min_p is not None,
            use_penalty=self.repetition_penalty is not None)


@flax.struct.dataclass
class SamplingParams:
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    greedy: bool = flax.struct.field(pytree_node=False)
    use_top_k: bool = flax.struct.field(pytree_node=False)
    use_top_p: bool = flax.struct.field(pytree_node=False)
    use_min_p: bool = flax.struct.field(pytree_node=False)
    use_penalty: bool = flax.struct.field(pytree_node=False)

    @property
    def uses_filters(self) -> bool:
        return self.use_top_k or self.use_top_p or self.use_min_p


def apply_repetition_penalty(logits, seen, penalty):
    """logits [B, V], seen [B, V] bool: tokens already present are made less likely."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_sorted(sorted_logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """Boolean keep-mask [B, V] over logits sorted in descending order (top-k, top-p, min-p)."""
    vocab = sorted_logits.shape[-1]
    rank = jnp.arange(vocab)
    keep = jnp.ones(sorted_logits.shape, bool)
    if sp.use_top_k:
        keep &= rank < sp.top_k
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    if sp.use_top_p:
        probs = jax.nn.softmax(masked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep &= mass_before < sp.top_p
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
    if sp.use_min_p:
        probs = jax.nn.softmax(masked, axis=-1)
        keep &= probs >= sp.min_p * probs[:, :1]
    return keep | (rank == 0)  # the most likely token always survives


def _categorical_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.categorical)(keys, logits)


def sample(logits: jax.Array, seen: jax.Array, keys: jax.Array, sp: SamplingParams):
    """logits [B, V] float32 -> (tokens [B] int32, raw logprobs [B] float32).

    keys: one PRNG key per row, so a row's draw does not depend on the other rows.
    """
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if sp.use_penalty:
        logits = apply_repetition_penalty(logits, seen, sp.repetition_penalty)
    if sp.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    elif sp.uses_filters:
        order = jnp.argsort(-logits, axis=-1)  # [B, V] token ids, most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1) / sp.temperature
        keep = filter_sorted(sorted_logits, sp)
        choice = _categorical_rows(keys, jnp.where(keep, sorted_logits, -jnp.inf))
        tokens = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    else:
        tokens = _categorical_rows(keys, logits / sp.temperature)
    tokens = tokens.astype(jnp.int32)
    logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
