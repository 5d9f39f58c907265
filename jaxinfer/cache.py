"""The KV cache: one pytree holding keys, values and per-sequence lengths.

K and V are stored ``[layers, batch, kv_heads, max_len, head_dim]`` (axes `jaxinfer.axes.KV_CACHE`),
so a multiquery or grouped-query model stores only its KV heads, and one layer's slice
``[batch, kv_heads, max_len, head_dim]`` is exactly the layout the decode-attention kernel reads.
Sequences are right-padded: sequence b holds valid entries at positions ``[0, lengths[b])``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    """Keys [L, B, K, S, H]."""
    v: jax.Array
    """Values [L, B, K, S, H]."""
    lengths: jax.Array
    """Valid positions per sequence [B] (int32); the next token is written at lengths[b]."""

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        return jax.eval_shape(lambda: cls.init(cfg, batch, max_len, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def write_prefill(self, k: jax.Array, v: jax.Array, lengths: jax.Array) -> "KVCache":
        """Store a prompt's keys/values k, v [L, B, K, T, H] at positions [0, T)."""
        start = (0, 0, 0, 0, 0)
        return self.replace(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start),
                            lengths=lengths.astype(jnp.int32))

    def write_token(self, layer: jax.Array, k: jax.Array, v: jax.Array) -> "KVCache":
        """Store one new token per sequence, k, v [B, K, H], at position lengths[b] of `layer`."""
        rows = jnp.arange(self.batch)
        pos = self.lengths
        return self.replace(k=self.k.at[layer, rows, :, pos].set(k.astype(self.k.dtype)),
                            v=self.v.at[layer, rows, :, pos].set(v.astype(self.v.dtype)))
