"""Pure-jnp reference attention: the XLA path and the twin every attention kernel is tested against.

Layouts (see `pallas_kernels.flash_attention` / `decode_attention`):
  q [B, N, T, H]; k, v [B, K, S, H]; N = K * G (G query heads share one KV head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite mask value: exp(MASK - max) underflows to 0 without producing NaN on fully-masked rows.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_sm_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def attention_mask(t_len: int, s_len: int, *, causal: bool, lengths: jax.Array | None,
                   batch: int) -> jax.Array:
    """Boolean [B, T, S] mask: True where query t may attend key s.

    causal: key s is visible to query t when s <= t + (S - T) (queries are the last T positions).
    lengths: key s is visible only when s < lengths[b].
    """
    t = jnp.arange(t_len)[:, None]
    s = jnp.arange(s_len)[None, :]
    mask = jnp.ones((t_len, s_len), bool)
    if causal:
        mask = s <= t + (s_len - t_len)
    mask = jnp.broadcast_to(mask, (batch, t_len, s_len))
    if lengths is not None:
        mask = mask & (s[None] < lengths[:, None, None])
    return mask


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      sm_scale: float) -> jax.Array:
    """Softmax attention with query heads grouped by KV head; f32 accumulation.

    q [B, N, T, H], k/v [B, K, S, H] (any float dtype), mask [B, T, S] -> [B, N, T, H] float32.
    Rows with no visible key return zeros.
    """
    b, n, t, h = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(b, kv_heads, n // kv_heads, t, h)  # [B, K, G, T, H]
    scores = jnp.einsum("bkgth,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * sm_scale
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)  # [B, K, G, T, S]
    scores_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - scores_max)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, n, t, h)


def flash_attention_ref(q, k, v, *, causal=True, lengths=None, sm_scale=None):
    """Reference for `flash_attention`: q [B, N, T, H], k/v [B, K, S, H] -> [B, N, T, H] (q.dtype)."""
    sm_scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, lengths=lengths, batch=q.shape[0])
    return grouped_attention(q, k, v, mask, sm_scale).astype(q.dtype)


def _check_cache_scale(cache: jax.Array, scale: jax.Array | None) -> None:
    if jnp.issubdtype(cache.dtype, jnp.integer) and scale is None:
        raise ValueError("an int8 KV cache needs its scales (k_scale / v_scale)")
    if scale is not None and scale.shape != cache.shape[:3]:
        raise ValueError(f"cache scales must have shape {cache.shape[:3]} [B, K, S], "
                         f"got {scale.shape}")


CACHE_MAJOR_MIN_LEN = 256
"""Cache length from which `decode_attention_ref` computes scores cache-major ([B, K, S, G])."""


def _scale_cache_major(scale):
    """int8 cache scales [B, K, S] -> [B, K, S, 1] (None stays None)."""
    return None if scale is None else scale[..., None]


def decode_attention_ref(q, k_cache, v_cache, lengths, *, k_scale=None, v_scale=None,
                         sm_scale=None):
    """Reference for `decode_attention`: q [B, N, H] attends to cache positions < lengths[b].

    Semantics: softmax(sm_scale * q . (k_int8 * k_scale)) . (v_int8 * v_scale), f32 accumulation,
    zeros where lengths[b] == 0. Written to stay cheap as the CPU decode path: the dots contract the
    caches in their stored [B, K, S, H] layout (no transposed or f32 copy of a float cache), int8
    scales are folded into the scores / probabilities instead of into a dequantized cache, and the
    probabilities enter the value dot in the cache's compute dtype with f32 accumulation.
    """
    _check_cache_scale(k_cache, k_scale)
    _check_cache_scale(v_cache, v_scale)
    b, n, h = q.shape
    kv_heads, s_len = k_cache.shape[1], k_cache.shape[2]
    sm_scale = default_sm_scale(h) if sm_scale is None else sm_scale
    compute = q.dtype if jnp.issubdtype(q.dtype, jnp.floating) else jnp.float32
    k = k_cache.astype(compute) if k_scale is not None else k_cache  # int8 -> q dtype is exact
    v = v_cache.astype(compute) if v_scale is not None else v_cache
    qg = q.reshape(b, kv_heads, n // kv_heads, h)  # [B, K, G, H]
    # cache-major score layout [B, K, S, G]: XLA:CPU contracts the few query heads against a long
    # cache several times faster this way (measured 4x at B 32 x S 640); short caches are faster
    # with the query rows first
    if s_len >= CACHE_MAJOR_MIN_LEN:
        scores = jnp.einsum("bksh,bkgh->bksg", k, qg, preferred_element_type=jnp.float32)
        axis, k_scale_b, v_scale_b = 2, _scale_cache_major(k_scale), _scale_cache_major(v_scale)
        visible = (jnp.arange(s_len)[None, :] < lengths[:, None])[:, None, :, None]  # [B,1,S,1]
    else:
        scores = jnp.einsum("bkgh,bksh->bkgs", qg, k, preferred_element_type=jnp.float32)
        axis = 3
        k_scale_b, v_scale_b = (None if s is None else s[:, :, None, :] for s in (k_scale, v_scale))
        visible = (jnp.arange(s_len)[None, :] < lengths[:, None])[:, None, None, :]  # [B,1,1,S]
    scale = sm_scale if k_scale_b is None else sm_scale * k_scale_b
    scores = jnp.where(visible, scores * scale, MASK_VALUE)
    probs = jnp.where(visible, jnp.exp(scores - jnp.max(scores, axis, keepdims=True)), 0.0)
    denom = jnp.sum(probs, axis=axis)[..., None]  # [B, K, G, 1]
    if v_scale_b is not None:
        probs = probs * v_scale_b
    contract = "bksg,bksh->bkgh" if axis == 2 else "bkgs,bksh->bkgh"
    out = jnp.einsum(contract, probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # [B, K, G, H]
    out = out / jnp.where(denom == 0.0, 1.0, denom)
    return out.reshape(b, n, h).astype(q.dtype)
