"""Public attention wrappers: shape checks, then dispatch to a Pallas kernel or the XLA reference.

backend: "tpu" (Mosaic kernels), "gpu" (Triton kernels), "xla" (`attention_ref`, also the CPU
path), "auto" (the platform's kernel, else XLA), or "tpu-interpret" / "gpu-interpret" (the kernels
run by the Pallas interpreter anywhere; for tests). An input a kernel cannot take
(`UnsupportedInput`: dtype, head_dim) raises for an explicit kernel backend and falls back to the
XLA reference under "auto" -- the one documented fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import UnsupportedInput, report_fallback, resolve_attention_backend
from pallas_kernels.attention_ref import (decode_attention_ref, default_sm_scale,
                                          flash_attention_ref)
from pallas_kernels.decode_attention_gpu import decode_attention_gpu
from pallas_kernels.decode_attention_tpu import decode_attention_tpu
from pallas_kernels.flash_attention_gpu import flash_attention_gpu
from pallas_kernels.flash_attention_tpu import flash_attention_tpu

_FLASH = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}
_DECODE = {"tpu": decode_attention_tpu, "gpu": decode_attention_gpu}


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


def _run_kernel(kernels: dict, requested: str, backend: str, reference, *args, **kwargs):
    """The backend's kernel; under "auto" an UnsupportedInput falls back to the reference."""
    if backend == "xla":
        return reference()
    try:
        return kernels[backend](*args, **kwargs)
    except UnsupportedInput as err:
        if requested != "auto":
            raise
        report_fallback(kernels[backend].__name__, backend, err)
        return reference()


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    lengths: jax.Array | None = None, sm_scale: float | None = None,
                    backend: str = "auto", interpret=False) -> jax.Array:
    """Prefill attention. q [B, N, T, H]; k, v [B, K, S, H]; returns [B, N, T, H] in q's dtype.

    causal: query t sees keys s <= t + (S - T). lengths [B]: valid keys per sequence.
    interpret: run the Pallas kernel interpreted (True, or `pltpu.InterpretParams()` for TPU).
    """
    _check_qkv(q, k, v, 4)
    _check_lengths(lengths, q.shape[0])
    kernel_backend, interpret = resolve_attention_backend(backend, interpret)
    sm_scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale

    def reference():
        return flash_attention_ref(q, k, v, causal=causal, lengths=lengths, sm_scale=sm_scale)

    return _run_kernel(_FLASH, backend, kernel_backend, reference, q, k, v, causal=causal,
                       lengths=lengths, sm_scale=sm_scale, interpret=interpret)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                     sm_scale: float | None = None, backend: str = "auto",
                     interpret=False) -> jax.Array:
    """One-token attention over a KV cache. q [B, N, H]; caches [B, K, S, H] (float, or int8 with
    float32 scales [B, K, S]); attends to positions < lengths[b]. Returns [B, N, H]."""
    _check_qkv(q, k_cache, v_cache, 3)
    _check_lengths(lengths, q.shape[0])
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    quantized = k_cache.dtype == jnp.int8 or v_cache.dtype == jnp.int8
    if quantized != (k_scale is not None) or (quantized and k_cache.dtype != v_cache.dtype):
        raise ValueError("int8 caches need k_scale and v_scale (and float caches take none); got "
                         f"{k_cache.dtype}/{v_cache.dtype} caches, scales "
                         f"{'given' if k_scale is not None else 'absent'}")
    for scale in (k_scale, v_scale):
        if scale is not None and scale.shape != k_cache.shape[:3]:
            raise ValueError(f"cache scales must have shape {k_cache.shape[:3]} [B, K, S], "
                             f"got {scale.shape}")
    kernel_backend, interpret = resolve_attention_backend(backend, interpret)
    sm_scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale

    def reference():
        return decode_attention_ref(q, k_cache, v_cache, lengths, k_scale=k_scale,
                                    v_scale=v_scale, sm_scale=sm_scale)

    return _run_kernel(_DECODE, backend, kernel_backend, reference, q, k_cache, v_cache, lengths,
                       k_scale=k_scale, v_scale=v_scale, sm_scale=sm_scale, interpret=interpret)
