"""The KV cache: one pytree holding keys, values and per-sequence lengths.

K and V are stored ``[layers, batch, kv_heads, max_len, head_dim]`` (axes `jaxinfer.axes.KV_CACHE`),
so a multiquery or grouped-query model stores only its KV heads, and one layer's slice
``[batch, kv_heads, max_len, head_dim]`` is exactly the layout the decode-attention kernel reads.
Sequences are right-padded: sequence b holds valid entries at positions ``[0, lengths[b])``.

The unrolled decode loop carries the cache split into one buffer per layer (`unstack_layers`:
k, v and scales become tuples of [B, K, S, H] / [B, K, S] arrays, indexed by the same
``cache.k[layer]``), so each layer's attention reads its buffer in place instead of a copied
slice of the stacked array; `stack_layers` joins them back.

An int8 cache (``KVCache.init(..., dtype=jnp.int8)``) stores K and V as symmetric int8 with one
float32 scale per token and KV head, ``k_scale`` / ``v_scale`` [L, B, K, S]: each [H] vector is
quantized on write (prefill and decode) and dequantized by the decode-attention kernel or its XLA
reference. Cache bytes per element drop from 2 (bfloat16) to 1 + 4/H.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    """Keys [L, B, K, S, H] (or, split per layer, a tuple of L arrays [B, K, S, H])."""
    v: jax.Array
    """Values [L, B, K, S, H] (or a tuple of L arrays [B, K, S, H])."""
    lengths: jax.Array
    """Valid positions per sequence [B] (int32); the next token is written at lengths[b]."""
    k_scale: jax.Array | None = None
    """int8 caches only: float32 key scales [L, B, K, S], one per token and KV head."""
    v_scale: jax.Array | None = None
    """int8 caches only: float32 value scales [L, B, K, S]."""

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        lengths = jnp.zeros((batch,), jnp.int32)
        if jnp.dtype(dtype) == jnp.int8:
            return cls(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8), lengths=lengths,
                       k_scale=jnp.zeros(shape[:-1], jnp.float32),
                       v_scale=jnp.zeros(shape[:-1], jnp.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"KV cache dtype must be a float type or int8, got {dtype}")
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=lengths)

    @classmethod
    def abstract(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        return jax.eval_shape(lambda: cls.init(cfg, batch, max_len, dtype))

    @property
    def quantized(self) -> bool:
        """Whether K/V are int8 with per-token-per-head scales."""
        return self.k_scale is not None

    @property
    def per_layer(self) -> bool:
        """Whether K/V (and scales) are tuples of per-layer buffers (`unstack_layers`)."""
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.per_layer else self.k.shape[1]

    def _map_buffers(self, fn) -> "KVCache":
        """fn applied to k, v and (int8 caches) their scales; lengths unchanged."""
        names = ("k", "v") + (("k_scale", "v_scale") if self.quantized else ())
        return self.replace(**{name: fn(getattr(self, name)) for name in names})

    def unstack_layers(self) -> "KVCache":
        """The same cache as one buffer per layer (tuples); a no-op when already split."""
        if self.per_layer:
            return self
        return self._map_buffers(lambda x: tuple(x[i] for i in range(x.shape[0])))

    def stack_layers(self) -> "KVCache":
        """Inverse of `unstack_layers`: [L, ...] arrays again."""
        return self._map_buffers(jnp.stack) if self.per_layer else self

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def write_prefill(self, k: jax.Array, v: jax.Array, lengths: jax.Array) -> "KVCache":
        """Store a prompt's keys/values k, v [L, B, K, T, H] at positions [0, T)."""
        start = (0, 0, 0, 0, 0)
        lengths = lengths.astype(jnp.int32)
        if self.quantized:
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            return self.replace(k=jax.lax.dynamic_update_slice(self.k, k, start),
                                v=jax.lax.dynamic_update_slice(self.v, v, start),
                                k_scale=jax.lax.dynamic_update_slice(self.k_scale, k_scale,
                                                                     start[:-1]),
                                v_scale=jax.lax.dynamic_update_slice(self.v_scale, v_scale,
                                                                     start[:-1]),
                                lengths=lengths)
        return self.replace(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start),
                            lengths=lengths)

    def write_token(self, layer: jax.Array, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store one new token per sequence, k, v [B, K, H], at position lengths[b] of `layer`."""
        rows = jnp.arange(self.batch)
        pos = self.lengths

        def put(buffers, new):  # new [B, K(, H)] at [layer, b, :, lengths[b]]
            if not self.per_layer:
                return buffers.at[layer, rows, :, pos].set(new.astype(buffers.dtype))
            one = buffers[layer].at[rows, :, pos].set(new.astype(buffers[layer].dtype))
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
