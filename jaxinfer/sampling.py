"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, repetition penalty.

`SamplingParams` is one request's parameters as users write them (validated on construction),
`SamplingConfig` the sampling strategy alone (validated on the host), `DeviceSampling` its device
form: the numbers are traced arrays (changing them does not recompile), only which filters are
active is static. Each number may be a scalar (one strategy for every row: the static decode loop)
or a per-row [B] array (the engine: one strategy per request, `stack_configs`). A row whose own
strategy leaves a filter off computes exactly what it would with the filter inactive for the whole
batch (neutral values: top_k = V, top_p = 1, min_p = 0, penalty = 1, and the draw is over the
vocabulary in token-id order either way), so a row's token never depends on its companions.
Filters apply in this order, each on the distribution left by the previous one:
repetition penalty -> temperature -> top-k -> top-p -> min-p. The returned logprob of a chosen
token is under the model's raw distribution (log-softmax of the unprocessed logits), as vLLM
reports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import validation

MAX_TOP_LOGPROBS = 20
"""Most top-logprob alternatives a request may ask for (`SamplingParams.logprobs`)."""


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

    def device_params(self) -> "DeviceSampling":
        """This strategy for every row (scalar arrays)."""
        return stack_configs([self], 0, scalar=True)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation parameters (public: `jaxinfer.SamplingParams`), validated on
    construction with `jaxinfer.validation` (an `InvalidArgument` names the field and value)."""

    max_new_tokens: int = 32
    """Tokens to generate at most (>= 1); reaching it finishes the request with 'length'."""
    temperature: float = 0.0
    """Softmax temperature (>= 0); 0 is greedy decoding."""
    top_k: int | None = None
    """Keep only the k most likely tokens (k >= 1, at most the vocabulary); None: no top-k."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest most-likely set whose mass reaches top_p, in (0, 1];
    None: no top-p."""
    min_p: float | None = None
    """Keep tokens at least min_p times as likely as the most likely one, in [0, 1]; None: off."""
    repetition_penalty: float | None = None
    """HF/CTRL penalty (> 0) on tokens already in the prompt or output; None: off."""
    stop_tokens: tuple[int, ...] | None = None
    """Token ids that end the request (the stop token is returned); None: the model's EOS ids;
    (): never stop early."""
    seed: int | None = None
    """Seed of this request's randomness, an int in [0, 2**63); None: the call's seed. The i-th
    generated token is drawn with fold_in(key(seed), i), never from a batch row."""
    logprobs: int | None = None
    """Engine only: return, per generated token, this many most likely (token id, raw logprob)
    alternatives, an int in [1, MAX_TOP_LOGPROBS]; None: none."""

    def __post_init__(self):
        values = validation.sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                                     self.repetition_penalty)
        values["max_new_tokens"] = validation.max_new_tokens(self.max_new_tokens)
        values["stop_tokens"] = validation.stop_tokens(self.stop_tokens)
        values["seed"] = None if self.seed is None else validation.seed(self.seed)
        values["logprobs"] = validation.optional_integer("logprobs", self.logprobs, 1,
                                                         MAX_TOP_LOGPROBS)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def config(self) -> SamplingConfig:
        """The sampling strategy of these parameters."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty)


@flax.struct.dataclass
class DeviceSampling:
    """The device form of one strategy (scalar fields) or of one strategy per row ([B] fields)."""

    temperature: jax.Array
    """float32: softmax temperature (1 on greedy rows, where it is unused)."""
    top_k: jax.Array
    """int32: tokens kept by top-k (V where a row has no top-k)."""
    top_p: jax.Array
    """float32: nucleus mass (1: keep everything)."""
    min_p: jax.Array
    """float32: min-p ratio (0: keep everything)."""
    repetition_penalty: jax.Array
    """float32: repetition penalty (1: none)."""
    greedy_rows: jax.Array
    """bool: rows decoded greedily (argmax after the penalty)."""
    greedy: bool = flax.struct.field(pytree_node=False)
    """Static: every row is greedy (no random draw is compiled)."""
    use_top_k: bool = flax.struct.field(pytree_node=False)
    """Static: some row uses top-k."""
    use_top_p: bool = flax.struct.field(pytree_node=False)
    """Static: some row uses top-p."""
    use_min_p: bool = flax.struct.field(pytree_node=False)
    """Static: some row uses min-p."""
    use_penalty: bool = flax.struct.field(pytree_node=False)
    """Static: some row uses the repetition penalty."""

    @property
    def uses_filters(self) -> bool:
        return self.use_top_k or self.use_top_p or self.use_min_p




def stack_configs(configs: Sequence[SamplingConfig], vocab_size: int,
                  scalar: bool = False) -> DeviceSampling:
    """Device parameters with one row per config ([B] numpy arrays: index them per step), or
    the one config's scalars (`scalar`, JAX arrays). Rows without a filter get its neutral value
    (see the module docstring)."""
    if scalar and len(configs) != 1:
        raise ValueError(f"scalar=True needs exactly one config, got {len(configs)}")
    col = lambda values, dtype: (jnp.asarray(values[0], dtype) if scalar
                                 else np.asarray(values, dtype))
    return DeviceSampling(
        temperature=col([c.temperature if c.temperature > 0 else 1.0 for c in configs],
                        np.float32),
        top_k=col([c.top_k or vocab_size for c in configs], np.int32),
        top_p=col([1.0 if c.top_p is None else c.top_p for c in configs], np.float32),
        min_p=col([c.min_p or 0.0 for c in configs], np.float32),
        repetition_penalty=col([c.repetition_penalty or 1.0 for c in configs], np.float32),
        greedy_rows=col([c.temperature == 0 for c in configs], np.bool_),
        greedy=all(c.temperature == 0 for c in configs),
        use_top_k=any(c.top_k is not None for c in configs),
        use_top_p=any(c.top_p is not None for c in configs),
        use_min_p=any(c.min_p is not None for c in configs),
        use_penalty=any(c.repetition_penalty is not None for c in configs))


def _per_row(x: jax.Array) -> jax.Array:
    """A scalar or per-row [B] parameter, broadcastable against [B, V]."""
    return x[:, None] if x.ndim == 1 else x


def apply_repetition_penalty(logits, seen, penalty):
    """logits [B, V], seen [B, V] bool: tokens already present are made less likely."""
    penalty = _per_row(jnp.asarray(penalty))
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_sorted(sorted_logits: jax.Array, sp: DeviceSampling) -> jax.Array:
    """Boolean keep-mask [B, V] over logits sorted in descending order (top-k, top-p, min-p)."""
    vocab = sorted_logits.shape[-1]
    rank = jnp.arange(vocab)
    keep = jnp.ones(sorted_logits.shape, bool)
    if sp.use_top_k:
        keep &= rank < _per_row(sp.top_k)
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    if sp.use_top_p:
        probs = jax.nn.softmax(masked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        top_p = _per_row(sp.top_p)
        keep &= (mass_before < top_p) | (top_p >= 1.0)
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
    if sp.use_min_p:
        probs = jax.nn.softmax(masked, axis=-1)
        keep &= probs >= _per_row(sp.min_p) * probs[:, :1]
    return keep | (rank == 0)  # the most likely token always survives


def _categorical_rows(keys: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.categorical)(keys, logits)


def _draw(logits: jax.Array, keys: jax.Array, sp: DeviceSampling) -> jax.Array:
    """Random draw [B] from penalized logits [B, V]: tempered, filtered, over token-id order."""
    scaled = logits / _per_row(sp.temperature)
    if sp.uses_filters:
        order = jnp.argsort(-scaled, axis=-1)  # [B, V] token ids, most likely first
        keep_sorted = filter_sorted(jnp.take_along_axis(scaled, order, axis=-1), sp)
        rows = jnp.arange(scaled.shape[0])[:, None]
        keep = jnp.zeros(scaled.shape, bool).at[rows, order].set(keep_sorted)  # [B, V]
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return _categorical_rows(keys, scaled)


def sample(logits: jax.Array, seen: jax.Array, keys: jax.Array, sp: DeviceSampling):
    """logits [B, V] float32 -> (tokens [B] int32, raw logprobs [B] float32).

    keys: one PRNG key per row, so a row's draw does not depend on the other rows.
    """
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if sp.use_penalty:
        logits = apply_repetition_penalty(logits, seen, sp.repetition_penalty)
    greedy_tokens = jnp.argmax(logits, axis=-1)
    if sp.greedy:
        tokens = greedy_tokens
    else:
        tokens = jnp.where(sp.greedy_rows, greedy_tokens, _draw(logits, keys, sp))
    tokens = tokens.astype(jnp.int32)
    logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def seed_key(seed) -> jax.Array:
    """The PRNG key of a 64-bit seed given as uint32 [2] (low, high) halves: `key(low)` when the
    high half is 0, else that key folded with the high half."""
    low = jax.random.key(seed[0])
    return jax.random.wrap_key_data(jnp.where(
        seed[1] == 0, jax.random.key_data(low),
        jax.random.key_data(jax.random.fold_in(low, seed[1]))))
