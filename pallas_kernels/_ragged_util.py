"""Input preparation shared by the ragged paged attention kernels (TPU and GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._attention_util import pad_axis
from pallas_kernels.ragged_paged_attention_ref import (WorkItems, effective_query_start,
                                                       work_items)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_queries(q: jax.Array, kv_heads: int, *, g_pad: int, t_pad: int) -> jax.Array:
    """q [T, N, H] -> [K, t_pad * g_pad, H]: for each KV head, its G query heads (padded to g_pad)
    as consecutive rows of each token, t-major (row = t * g_pad + g); padding rows are zeros."""
    t_len, n, h = q.shape
    qg = q.reshape(t_len, kv_heads, n // kv_heads, h)  # [T, K, G, H]
    qg = pad_axis(pad_axis(qg, 2, g_pad), 0, t_pad)  # [Tp, K, Gp, H]
    return jnp.transpose(qg, (1, 0, 2, 3)).reshape(kv_heads, t_pad * g_pad, h)


def unpack_outputs(out: jax.Array, n: int, t_len: int, g_pad: int,
                   valid: jax.Array) -> jax.Array:
    """Inverse of `pack_queries` for kernel outputs [K, Tp * Gp, H] -> [T, N, H]; rows that are
    not real tokens (valid [T] False) become zeros (the kernels leave them unwritten)."""
    kv_heads, _, h = out.shape
    g = n // kv_heads
    rows = out.reshape(kv_heads, -1, g_pad, h)[:, :t_len, :g]  # [K, T, G, H]
    rows = jnp.transpose(rows, (1, 0, 2, 3)).reshape(t_len, n, h)
    return jnp.where(valid[:, None, None], rows, jnp.zeros((), rows.dtype))


def prepare_metadata(query_start, kv_lens, num_seqs, *, t_len: int, block_q: int,
                     page_size: int) -> tuple[WorkItems, jax.Array, jax.Array, int]:
    """(work items, effective query starts [S + 1], valid rows [T], number of query blocks)."""
    n_blocks = -(-t_len // block_q)
    qs = effective_query_start(query_start, jnp.asarray(num_seqs, jnp.int32))
    kv_lens = kv_lens.astype(jnp.int32)
    items = work_items(qs, kv_lens, block_q=block_q, n_blocks=n_blocks, page_size=page_size,
                       t_len=t_len)
    valid = jnp.arange(t_len) < qs[-1]  # rows at or past query_start[num_seqs] are padding
    return items, qs, valid, n_blocks
