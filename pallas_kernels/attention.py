"""Public attention wrappers: shape checks, then dispatch to a Pallas kernel or the XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import resolve_backend
from pallas_kernels.attention_ref import decode_attention_ref, flash_attention_ref


def _check_qkv(q, k, v, q_rank: int):
    if q.ndim != q_rank or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q of rank {q_rank} and k, v of rank 4 [B, K, S, H]; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, n, h = q.shape[0], q.shape[1], q.shape[-1]
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if n % k.shape[1]:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({k.shape[1]})")


def _check_lengths(lengths, batch: int):
    if lengths is None:
        return
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({batch},), "
                         f"got {lengths.dtype}{tuple(lengths.shape)}")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    lengths: jax.Array | None = None, sm_scale: float | None = None,
                    backend: str = "auto", interpret: bool = False) -> jax.Array:
    """Prefill attention. q [B, N, T, H]; k, v [B, K, S, H]; returns [B, N, T, H] in q's dtype.

    causal: query t sees keys s <= t + (S - T). lengths [B]: valid keys per sequence.
    """
    _check_qkv(q, k, v, 4)
    _check_lengths(lengths, q.shape[0])
    backend = resolve_backend(backend)
    if backend == "xla":
        return flash_attention_ref(q, k, v, causal=causal, lengths=lengths, sm_scale=sm_scale)
    raise NotImplementedError(f"flash_attention has no {backend!r} kernel yet; use backend='xla'")


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                     sm_scale: float | None = None, backend: str = "auto",
                     interpret: bool = False) -> jax.Array:
    """One-token attention over a KV cache. q [B, N, H]; caches [B, K, S, H] (float, or int8 with
    float32 scales [B, K, S]); attends to positions < lengths[b]. Returns [B, N, H]."""
    _check_qkv(q, k_cache, v_cache, 3)
    _check_lengths(lengths, q.shape[0])
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    backend = resolve_backend(backend)
    if backend == "xla":
        return decode_attention_ref(q, k_cache, v_cache, lengths, k_scale=k_scale,
                                    v_scale=v_scale, sm_scale=sm_scale)
    raise NotImplementedError(f"decode_attention has no {backend!r} kernel yet; use backend='xla'")
