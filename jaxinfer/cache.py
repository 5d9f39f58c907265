"""The KV cache: one buffer per layer for keys and values, plus per-sequence lengths.

Layer l's keys and values are ``k[l]``, ``v[l]`` of shape ``[batch, kv_heads, max_len, head_dim]``
(axes `jaxinfer.axes.KV_CACHE`): a multiquery or grouped-query model stores only its KV heads, and
a buffer is exactly the layout the decode-attention kernel reads. Every layer's buffer is its own
array, written in place by the decode step (the buffers are donated), never sliced out of a stack.
Sequences are right-padded: sequence b holds valid entries at positions ``[0, lengths[b])``.

Under a plan the buffers are split like `PhaseSharding.cache` (batch and/or KV heads) and
``lengths`` like the residual rows (`PhaseSharding.activations`); the model's per-chip code reads
its attention rows' lengths out of its residual rows' (`jaxinfer.model`).

An int8 cache (``KVCache.init(..., dtype=jnp.int8)``) stores K and V as symmetric int8 with one
float32 scale per token and KV head, ``k_scale[l]`` / ``v_scale[l]`` [B, K, S]: each [H] vector is
quantized on write (prefill and decode) and dequantized by the attention kernels or their XLA
references. Cache bytes per element drop from 2 (bfloat16) to 1 + 4/H.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig

Buffers = tuple[jax.Array, ...]


@flax.struct.dataclass
class KVCache:
    k: Buffers
    """Keys, one [B, K, S, H] array per layer."""
    v: Buffers
    """Values, one [B, K, S, H] array per layer."""
    lengths: jax.Array
    """Valid positions per sequence [B] (int32); the next token is written at lengths[b]."""
    k_scale: Buffers | None = None
    """int8 caches only: float32 key scales, one [B, K, S] array per layer."""
    v_scale: Buffers | None = None
    """int8 caches only: float32 value scales, one [B, K, S] array per layer."""

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        lengths = jnp.zeros((batch,), jnp.int32)
        layers = range(cfg.n_layers)
        if jnp.dtype(dtype) == jnp.int8:
            zeros = lambda s, d: tuple(jnp.zeros(s, d) for _ in layers)
            return cls(k=zeros(shape, jnp.int8), v=zeros(shape, jnp.int8), lengths=lengths,
                       k_scale=zeros(shape[:-1], jnp.float32),
                       v_scale=zeros(shape[:-1], jnp.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"KV cache dtype must be a float type or int8, got {dtype}")
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers), lengths=lengths)

    @classmethod
    def abstract(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        return jax.eval_shape(lambda: cls.init(cfg, batch, max_len, dtype))

    @classmethod
    def from_prompt(cls, keys: Buffers, values: Buffers, lengths: jax.Array,
                    quantized: bool, dtype) -> "KVCache":
        """A cache holding exactly a prompt's keys/values (one [B, K, T, H] array per layer),
        quantized to int8 when `quantized`, else stored in `dtype`."""
        if not quantized:
            return cls(k=tuple(k.astype(dtype) for k in keys),
                       v=tuple(v.astype(dtype) for v in values), lengths=lengths)
        kq, vq = [quantize_kv(k) for k in keys], [quantize_kv(v) for v in values]
        return cls(k=tuple(q for q, _ in kq), v=tuple(q for q, _ in vq), lengths=lengths,
                   k_scale=tuple(s for _, s in kq), v_scale=tuple(s for _, s in vq))

    @property
    def quantized(self) -> bool:
        """Whether K/V are int8 with per-token-per-head scales."""
        return self.k_scale is not None

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def _map_buffers(self, fn) -> "KVCache":
        """fn(buffer, is_scale) applied to every layer's k, v and (int8) scales."""
        out = {"k": tuple(fn(b, False) for b in self.k), "v": tuple(fn(b, False) for b in self.v)}
        if self.quantized:
            out.update(k_scale=tuple(fn(b, True) for b in self.k_scale),
                       v_scale=tuple(fn(b, True) for b in self.v_scale))
        return self.replace(**out)

    def extend(self, max_len: int) -> "KVCache":
        """The same entries in buffers of `max_len` positions (zero-padded at the end)."""
        if max_len < self.max_len:
            raise ValueError(f"cannot shrink a cache of {self.max_len} positions to {max_len}")

        def pad(b, is_scale):
            widths = [(0, 0)] * b.ndim
            widths[2] = (0, max_len - self.max_len)
            return jnp.pad(b, widths)

        return self._map_buffers(pad)

    def write_token(self, layer: int, k: jax.Array, v: jax.Array,
                    positions: jax.Array) -> "KVCache":
        """Store one new token per sequence, k, v [B, K, H], at `positions` [B] of `layer`.

        A batch of one row is written as two identical updates of that row: XLA rewrites a
        one-row scatter into a dynamic-update-slice, which XLA:CPU's fusion duplicates for its
        two users (the loop carry and attention), and copy insertion then copies every layer's
        K and V buffer four times per step (16 cache-sized copies in a 2-layer step; the 125M
        bench model's b=1 decode step at 1088 positions took 1.5x as long, Intel Xeon). Two
        equal updates keep it a scatter, written in place; the stored values are the same."""
        rows = jnp.arange(k.shape[0])
        if k.shape[0] == 1:
            rows, positions = jnp.zeros((2,), rows.dtype), jnp.concatenate([positions] * 2)

        def put(buffers: Buffers, new: jax.Array) -> Buffers:  # new [B, K(, H)] at [b, :, pos]
            new = jnp.concatenate([new] * (rows.shape[0] // new.shape[0]))
            one = buffers[layer].at[rows, :, positions].set(new.astype(buffers[layer].dtype))
            return buffers[:layer] + (one,) + buffers[layer + 1:]

        if self.quantized:
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            return self.replace(k=put(self.k, k), v=put(self.v, v),
                                k_scale=put(self.k_scale, k_scale),
                                v_scale=put(self.v_scale, v_scale))
        return self.replace(k=put(self.k, k), v=put(self.v, v))


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values [..., H] -> (int8 [..., H], float32 scales [...]), symmetric per vector."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127
    q = jnp.round(xf / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale
