"""Helpers shared by the Pallas attention kernels: padding, GQA row packing, split-KV combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import UnsupportedInput
from pallas_kernels.attention_ref import MASK_VALUE

__all__ = ["MASK_VALUE", "round_up", "pad_axis", "pack_rows", "unpack_rows", "combine_splits",
           "reset_online_softmax", "group_decode_inputs", "check_head_dim", "check_dtypes"]


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad ``axis`` of x at the end up to ``size`` (no-op when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def pack_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, N, T, H] -> [B, K, T*G, H]: the G query heads of one KV head as rows, t-major."""
    b, n, t, h = q.shape
    qg = q.reshape(b, kv_heads, n // kv_heads, t, h)  # [B, K, G, T, H]
    return jnp.swapaxes(qg, 2, 3).reshape(b, kv_heads, t * (n // kv_heads), h)


def unpack_rows(rows: jax.Array, n_heads: int, t_len: int) -> jax.Array:
    """Inverse of `pack_rows`: [B, K, >=T*G, H] -> [B, N, T, H]."""
    b, kv_heads, _, h = rows.shape
    g = n_heads // kv_heads
    rows = rows[:, :, :t_len * g].reshape(b, kv_heads, t_len, g, h)  # [B, K, T, G, H]
    return jnp.swapaxes(rows, 2, 3).reshape(b, n_heads, t_len, h)


def reset_online_softmax(m_sc, l_sc, acc_sc) -> None:
    """Kernel body: start an online softmax (running max -inf, sum 0, accumulator 0)."""
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def group_decode_inputs(q, k_cache, v_cache, lengths, *, g_pad: int, s_pad: int):
    """Decode-kernel inputs: q [B, N, H] -> [B, K, Gp, H] (the query heads of one KV head as padded
    rows), caches [B, K, S, H] padded to s_pad keys, lengths int32 clipped to S."""
    b, n, h = q.shape
    kv_heads, s_len = k_cache.shape[1], k_cache.shape[2]
    qg = pad_axis(q.reshape(b, kv_heads, n // kv_heads, h), 2, g_pad)  # [B, K, Gp, H]
    k_cache, v_cache = pad_axis(k_cache, 2, s_pad), pad_axis(v_cache, 2, s_pad)
    return qg, k_cache, v_cache, jnp.minimum(lengths.astype(jnp.int32), s_len)


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merge flash-decoding partials over the split axis 2.

    o [B, K, P, R, H] (unnormalized), m, l [B, K, P, R] -> [B, K, R, H] float32; rows whose
    splits saw no visible key (l == 0 everywhere) become zeros.
    """
    m_all = jnp.max(m, axis=2, keepdims=True)  # [B, K, 1, R]
    w = jnp.where(l > 0.0, jnp.exp(m - m_all), 0.0)  # [B, K, P, R]
    denom = jnp.sum(l * w, axis=2)  # [B, K, R]
    out = jnp.sum(o * w[..., None], axis=2)  # [B, K, R, H]
    return out / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def check_head_dim(head_dim: int, kernel: str, *, power_of_two: bool, multiple: int = 1) -> None:
    pow2 = head_dim & (head_dim - 1) == 0
    ok = head_dim % multiple == 0 and head_dim >= multiple and (pow2 or not power_of_two)
    if not ok:
        need = f"a power of two >= {multiple}" if power_of_two else f"a multiple of {multiple}"
        raise UnsupportedInput(f"{kernel} needs head_dim {need}, got {head_dim}; use backend='xla'")


def check_dtypes(q: jax.Array, cache: jax.Array, kernel: str, *, int8_ok: bool = False) -> None:
    """Queries in float32/bfloat16/float16; keys/values in the query dtype (or int8 if int8_ok)."""
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise UnsupportedInput(f"{kernel} takes float32/bfloat16/float16 queries, got {q.dtype}; "
                               "use backend='xla'")
    if cache.dtype != q.dtype and not (int8_ok and cache.dtype == jnp.int8):
        raise UnsupportedInput(f"{kernel} needs keys/values in the query dtype {q.dtype}"
                               f"{' (or int8 with scales)' if int8_ok else ''}, got {cache.dtype}; "
                               "use backend='xla'")
