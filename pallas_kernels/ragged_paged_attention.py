"""Public ragged paged attention wrapper: shape checks, then a Pallas kernel or the XLA twin.

backend: "tpu" (Mosaic kernel), "gpu" (Triton kernel), "xla" (`ragged_paged_attention_ref`,
also the CPU path), "auto" (the platform's kernel, else XLA; an `UnsupportedInput` of the kernel
falls back to XLA), or "tpu-interpret" / "gpu-interpret" (the kernels run by the Pallas HLO
interpreter on any platform; for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import UnsupportedInput, resolve_attention_backend
from pallas_kernels.attention_ref import default_sm_scale
from pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention_ref import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu

_KERNELS = {"tpu": ragged_paged_attention_tpu, "gpu": ragged_paged_attention_gpu}


def _check_int_array(name: str, x, shape: tuple) -> None:
    if not hasattr(x, "dtype") or x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
        got = f"{x.dtype}{tuple(x.shape)}" if hasattr(x, "dtype") else repr(x)
        raise ValueError(f"{name} must be an integer array of shape {shape}, got {got}")


def _check_scales(k_pages, v_pages, k_scale, v_scale) -> None:
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    quantized = k_pages.dtype == jnp.int8 or v_pages.dtype == jnp.int8
    if quantized != (k_scale is not None) or (quantized and k_pages.dtype != v_pages.dtype):
        raise ValueError("int8 pages need k_scale and v_scale (and float pages take none); got "
                         f"{k_pages.dtype}/{v_pages.dtype} pages, scales "
                         f"{'given' if k_scale is not None else 'absent'}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is not None and (scale.shape != k_pages.shape[:3] or scale.dtype != jnp.float32):
            raise ValueError(f"{name} must be float32 of shape {k_pages.shape[:3]} "
                             f"[P, K, page_size], got {scale.dtype}{tuple(scale.shape)}")


def check_inputs(q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs,
                 k_scale=None, v_scale=None) -> None:
    """Raise ValueError naming the argument, its shape and what is allowed."""
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"expected q [T, N, H] and k_pages [P, K, page_size, H]; got q "
                         f"{q.shape}, k_pages {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages shapes differ: {k_pages.shape} vs {v_pages.shape}")
    n, h = q.shape[1], q.shape[2]
    kv_heads = k_pages.shape[1]
    if k_pages.shape[3] != h:
        raise ValueError(f"q head_dim {h} != k_pages head_dim {k_pages.shape[3]}")
    if n % kv_heads:
        raise ValueError(f"query heads ({n}) must be a multiple of KV heads ({kv_heads})")
    if page_table.ndim != 2 or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError("page_table must be an integer array [S, pages_per_seq], got "
                         f"{page_table.dtype}{tuple(page_table.shape)}")
    slots = page_table.shape[0]
    _check_int_array("kv_lens", kv_lens, (slots,))
    _check_int_array("query_start", query_start, (slots + 1,))
    _check_int_array("num_seqs", num_seqs, ())
    _check_scales(k_pages, v_pages, k_scale, v_scale)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, kv_lens: jax.Array, query_start: jax.Array,
                           num_seqs: jax.Array, *, k_scale: jax.Array | None = None,
                           v_scale: jax.Array | None = None, backend: str = "auto",
                           sm_scale: float | None = None) -> jax.Array:
    """Causal attention of a mixed step (prefill chunks and decode tokens) over a paged KV cache.

    q: [T, N, H] the step's query tokens of all sequences packed back to back; T is a padded
      bucket: rows at or past query_start[num_seqs] are padding and come back as zeros.
    k_pages, v_pages: [P, K, page_size, H] one layer's page pool (K KV heads, heads-major inside a
      page). Float in q's dtype, or int8 with k_scale / v_scale.
    page_table: [S, pages_per_seq] int32 page ids of each sequence slot, in order; entries past
      a sequence's last page are never read (they must still be valid ids in [0, P)).
    kv_lens: [S] int32 tokens of each sequence in the cache, including this step's new tokens
      (whose K/V the caller has already written into the pages); kv_lens[s] <= pages_per_seq *
      page_size.
    query_start: [S + 1] int32 cumulative offsets into q: sequence s owns rows
      [query_start[s], query_start[s+1]), at positions kv_lens[s] - q_len .. kv_lens[s] - 1
      (q_len <= kv_lens[s]); a row at position p sees key positions <= p.
    num_seqs: int32 scalar array; slots >= num_seqs are unused (their kv_lens and query_start
      entries are ignored).
    k_scale, v_scale: [P, K, page_size] float32 per-token-per-KV-head scales of int8 pages
      (value = int8 * scale).
    backend: "auto" | "tpu" | "gpu" | "xla" | "tpu-interpret" | "gpu-interpret".
    sm_scale: softmax scale, default 1 / sqrt(H).

    GQA / MQA: query head n attends KV head n // (N // K). Softmax in float32; returns [T, N, H]
    in q's dtype.
    """
    check_inputs(q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs,
                 k_scale, v_scale)
    kernel_backend, interpret = resolve_attention_backend(backend, False)
    sm_scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    args = (q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs)
    scales = dict(k_scale=k_scale, v_scale=v_scale, sm_scale=sm_scale)
    if kernel_backend == "xla":
        return ragged_paged_attention_ref(*args, **scales)
    try:
        return _KERNELS[kernel_backend](*args, **scales, interpret=interpret)
    except UnsupportedInput:
        if backend != "auto":
            raise
        return ragged_paged_attention_ref(*args, **scales)
