"""The generic decoder as pure functions over a parameter pytree.

Three entry points, all jit-friendly with `cfg` and `runtime` static:

- `forward_logits(params, tokens)`: full-sequence logits, no cache (scoring, parity tests).
- `prefill(params, tokens, lengths, cache)`: run right-padded prompts, fill the cache, return the
  logits of each prompt's last token.
- `decode_step(params, tokens, cache)`: one new token per sequence at position ``cache.lengths``.

The layers run as one `lax.scan` over the stacked layer weights; attention goes through the
`pallas_kernels` dispatch point, so the same model runs the Pallas kernels or the XLA reference.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxinfer import axes as ax
from jaxinfer import layers
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig

Constrain = Callable[[jax.Array, tuple[str, ...]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How (not what) the model computes; hashable, passed as a static argument."""

    attention_backend: str = "xla"
    """'auto', 'xla', 'tpu' or 'gpu' (see `pallas_kernels`); 'tpu-interpret' / 'gpu-interpret'
    run the same Pallas kernels in the interpreter on any platform (tests, debugging)."""
    constrain: Constrain | None = None
    """Optional sharding constraint applied to activations, given their logical axes."""
    constrain_attention: Constrain | None = None
    """Optional constraint inside attention (Q/K/V, attention output, KV cache); it differs from
    `constrain` when attention is sharded over batch (`partitioning.layouts`)."""
    layers: object | None = None
    """Optional explicit partitioned layer stack (`partitioning.collective_layer.ShardedLayers`):
    runs every decoder layer per chip with a layout's collectives instead of `_run_layers`."""

    def shard(self, x: jax.Array, names: tuple[str, ...]) -> jax.Array:
        return x if self.constrain is None else self.constrain(x, names)

    def shard_attention(self, x: jax.Array, names: tuple[str, ...]) -> jax.Array:
        fn = self.constrain_attention or self.constrain
        return x if fn is None else fn(x, names)

    def shard_cache(self, cache: KVCache) -> KVCache:
        """The KV cache constrained by the attention rules (keeps decode's layout in the loop)."""
        if (self.constrain_attention or self.constrain) is None:
            return cache
        names = ax.KV_CACHE[1:] if cache.per_layer else ax.KV_CACHE  # per layer: no layer axis

        def shard(buffers, names):
            if cache.per_layer:
                return tuple(self.shard_attention(b, names) for b in buffers)
            return self.shard_attention(buffers, names)

        scales = {} if cache.k_scale is None else {
            "k_scale": shard(cache.k_scale, names[:-1]), "v_scale": shard(cache.v_scale, names[:-1])}
        return cache.replace(k=shard(cache.k, names), v=shard(cache.v, names), **scales)


# attend(q [B, T, N, H], k [B, T, K, H], v [B, T, K, H], layer) -> (attn [B, T, N, H], carry)
Attend = Callable[..., tuple[jax.Array, object]]


def _decoder_layer(x, p, positions, cfg: ModelConfig, rt: Runtime, attend, attend_carry, layer):
    """One block, serial or parallel. x [B, T, D] -> [B, T, D]."""
    h = layers.norm(x, p["attn_norm"], cfg)
    q, k, v = layers.project_qkv(h, p, positions, cfg)
    q, k, v = (rt.shard_attention(q, ax.QUERIES), rt.shard_attention(k, ax.KEYS),
               rt.shard_attention(v, ax.KEYS))
    attn, attend_carry = attend(q, k, v, layer, attend_carry)
    attn = rt.shard_attention(attn, ax.QUERIES)
    attn_out = layers.project_out(attn, p)
    if cfg.parallel_block:
        x = x + attn_out + layers.feed_forward(h, p, cfg)
    else:
        x = x + attn_out
        x = x + layers.feed_forward(layers.norm(x, p["ffn_norm"], cfg), p, cfg)
    return rt.shard(x, ax.RESIDUAL), attend_carry


def _run_layers(params, x, positions, cfg, rt, attend, attend_carry):
    """Run every layer: a Python loop over per-layer weights (`params.unstack_layers`) or a
    `lax.scan` over stacked weights [L, ...]; returns (x, final attend carry)."""
    if isinstance(params["layers"], list):
        for layer, p in enumerate(params["layers"]):
            x, attend_carry = _decoder_layer(x, p, positions, cfg, rt, attend, attend_carry, layer)
        return x, attend_carry

    def body(carry, xs):
        x, attend_carry = carry
        p, layer = xs
        x, attend_carry = _decoder_layer(x, p, positions, cfg, rt, attend, attend_carry, layer)
        return (x, attend_carry), None

    layer_ids = jnp.arange(cfg.n_layers)
    (x, attend_carry), _ = jax.lax.scan(body, (x, attend_carry), (params["layers"], layer_ids))
    return x, attend_carry


def _to_heads_major(x):  # [B, T, heads, H] -> [B, heads, T, H]
    return jnp.swapaxes(x, 1, 2)


def _self_attention(rt: Runtime, lengths):
    """Attention of a prompt chunk to itself; collects each layer's K/V into [L, B, K, T, H]."""

    def attend(q, k, v, layer, kv):
        out = pallas_kernels.flash_attention(
            _to_heads_major(q), _to_heads_major(k), _to_heads_major(v), causal=True,
            lengths=lengths, backend=rt.attention_backend)
        if kv is not None:
            kv = (kv[0].at[layer].set(_to_heads_major(k)), kv[1].at[layer].set(_to_heads_major(v)))
        return _to_heads_major(out), kv

    return attend


def _embed(params, tokens, cfg, rt):
    return rt.shard(layers.embed(tokens, params, cfg), ax.RESIDUAL)


def forward_logits(params, tokens: jax.Array, cfg: ModelConfig, rt: Runtime = Runtime()):
    """tokens [B, T] -> float32 logits [B, T, V] (causal, no cache)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = _embed(params, tokens, cfg, rt)
    if rt.layers is not None:
        x, _ = rt.layers.prefill(params["layers"], x, positions, None, None)
    else:
        x, _ = _run_layers(params, x, positions, cfg, rt, _self_attention(rt, None), None)
    return rt.shard(layers.unembed(x, params, cfg), ax.LOGITS)


def prefill(params, tokens: jax.Array, lengths: jax.Array, cache: KVCache, cfg: ModelConfig,
            rt: Runtime = Runtime()):
    """Right-padded prompts tokens [B, T] with valid lengths [B] -> (last-token logits [B, V], cache).

    Writes positions [0, T) of the cache; entries at or past lengths[b] are padding and stay
    invisible because every later read is masked by ``cache.lengths``.
    """
    b, t = tokens.shape
    if t > cache.max_len:
        raise ValueError(f"prompt bucket of {t} tokens does not fit a cache of {cache.max_len}")
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = _embed(params, tokens, cfg, rt)
    kv_shape = (cfg.n_layers, b, cfg.n_kv_heads, t, cfg.head_dim)
    kv_dtype = x.dtype if cache.quantized else cache.k.dtype  # an int8 cache quantizes on write
    kv = (jnp.zeros(kv_shape, kv_dtype), jnp.zeros(kv_shape, kv_dtype))
    if rt.layers is not None:
        x, (ks, vs) = rt.layers.prefill(params["layers"], x, positions, lengths, kv)
    else:
        x, (ks, vs) = _run_layers(params, x, positions, cfg, rt, _self_attention(rt, lengths), kv)
    cache = cache.write_prefill(ks, vs, lengths)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return layers.unembed(last, params, cfg)[:, 0], cache


def decode_step(params, tokens: jax.Array, cache: KVCache, cfg: ModelConfig,
                rt: Runtime = Runtime()):
    """One token per sequence, tokens [B], at positions cache.lengths -> (logits [B, V], cache).

    The returned cache holds the new token's K/V and lengths + 1.
    """
    positions = cache.lengths[:, None]  # [B, 1]
    x = _embed(params, tokens[:, None], cfg, rt)

    def attend(q, k, v, layer, cache):
        cache = rt.shard_cache(cache.write_token(layer, k[:, 0], v[:, 0]))
        out = pallas_kernels.decode_attention(
            q[:, 0], cache.k[layer], cache.v[layer], cache.lengths + 1,
            k_scale=None if cache.k_scale is None else cache.k_scale[layer],
            v_scale=None if cache.v_scale is None else cache.v_scale[layer],
            backend=rt.attention_backend)  # [B, N, H]
        return out[:, None], cache

    if rt.layers is not None:
        x, cache = rt.layers.decode(params["layers"], x, positions, cache)
    else:
        x, cache = _run_layers(params, x, positions, cfg, rt, attend, cache)
    logits = layers.unembed(x, params, cfg)[:, 0]
    return logits, cache.replace(lengths=cache.lengths + 1)
