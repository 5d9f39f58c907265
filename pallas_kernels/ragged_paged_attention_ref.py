"""Ragged paged attention: the pure-jnp twin (XLA / CPU path) and the metadata the kernels share.

Layout (see `pallas_kernels.ragged_paged_attention` for the full contract):
  q [T, N, H] packed query tokens; k_pages / v_pages [P, K, page_size, H] one layer's page pool;
  page_table [S, pages_per_seq]; kv_lens [S]; query_start [S + 1]; num_seqs scalar.
Sequence s owns q rows [query_start[s], query_start[s+1]) at cache positions
kv_lens[s] - q_len ... kv_lens[s] - 1 (causal). Rows past query_start[num_seqs] are padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.attention_ref import MASK_VALUE, default_sm_scale


def effective_query_start(query_start: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """query_start [S + 1] with every entry past num_seqs set to query_start[num_seqs], so that
    unused slots are empty sequences whatever the caller left in them."""
    slots = jnp.arange(query_start.shape[0])
    end = query_start[jnp.clip(num_seqs, 0, query_start.shape[0] - 1)]
    return jnp.where(slots <= num_seqs, query_start, end).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class WorkItems:
    """(sequence, query block) pairs a kernel walks, ordered by sequence then block, so the
    items of one query block are consecutive. Arrays have the static length W = blocks + S;
    entries at w >= count repeat the last real item with n_pages 0 (nothing to do)."""

    seq: jax.Array
    """[W] int32: sequence slot of item w."""
    block: jax.Array
    """[W] int32: query block (rows block*block_q ... +block_q) of item w."""
    n_pages: jax.Array
    """[W] int32: pages of the sequence item w must read (through its last visible key)."""
    first: jax.Array
    """[W] int32: 1 when item w is the first of its query block (start the softmax)."""
    last: jax.Array
    """[W] int32: 1 when item w is the last of its query block (write the output)."""
    block_start: jax.Array
    """[blocks + 1] int32: items of query block b are [block_start[b], block_start[b+1])."""


def work_items(qs: jax.Array, kv_lens: jax.Array, *, block_q: int, n_blocks: int,
               page_size: int, t_len: int) -> WorkItems:
    """The `WorkItems` of effective starts qs [S + 1] for t_len query rows in n_blocks blocks of
    block_q rows. Every item holds at least one real row, so there are at most
    min(n_blocks + S, t_len) of them: that is the static width W."""
    n_slots = kv_lens.shape[0]
    width = max(1, min(n_blocks + n_slots, t_len))
    q_len = qs[1:] - qs[:-1]  # [S]
    first_b = qs[:-1] // block_q
    last_b = (qs[1:] - 1) // block_q
    count = jnp.where(q_len > 0, last_b - first_b + 1, 0)  # [S]
    ends = jnp.cumsum(count)  # [S]
    total = ends[-1]
    w = jnp.arange(width, dtype=jnp.int32)
    w_real = jnp.minimum(w, jnp.maximum(total - 1, 0))
    seq = jnp.clip(jnp.searchsorted(ends, w_real, side="right"), 0, n_slots - 1)
    block = jnp.where(total > 0, first_b[seq] + w_real - (ends[seq] - count[seq]), 0)
    # last visible key of the item: the position of its last row in the block
    last_row = jnp.minimum(qs[seq + 1], (block + 1) * block_q) - 1
    last_pos = kv_lens[seq] - qs[seq + 1] + last_row
    n_pages = jnp.where(w < total, last_pos // page_size + 1, 0)
    prev_block = jnp.concatenate([jnp.full((1,), -1, block.dtype), block[:-1]])
    next_block = jnp.concatenate([block[1:], jnp.full((1,), -1, block.dtype)])
    real = w < total
    first = real & (block != prev_block)
    last = real & ((block != next_block) | (w == total - 1))
    block_start = jnp.searchsorted(jnp.where(real, block, n_blocks),
                                   jnp.arange(n_blocks + 1), side="left")
    as_i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return WorkItems(as_i32(seq), as_i32(block), as_i32(n_pages), as_i32(first), as_i32(last),
                     as_i32(block_start))


ROW_COST = 0.1  # cost of one query row's FLOPs per key, relative to one gathered K/V element


def ref_block_q(t_len: int, slots: int, n: int, kv_heads: int) -> int:
    """Query rows per work item of the twin: the power of two <= 64 minimising the modelled cost
    W * (gathered K/V per key + query-row FLOPs per key), W = min(ceil(T / bq) + S, T) items.
    One-token decodes favour 1 (each row its own item), long chunks larger blocks (their
    sequence's pages gathered once per block instead of once per row)."""
    def cost(bq):
        items = min(-(-t_len // bq) + slots, t_len)
        return items * (2 * kv_heads + ROW_COST * bq * n)

    return min((1 << i for i in range(7)), key=cost)


def ragged_paged_attention_ref(q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs,
                               *, k_scale=None, v_scale=None, sm_scale=None,
                               block_q: int | None = None):
    """Twin of `ragged_paged_attention`: q [T, N, H] -> [T, N, H] in q's dtype.

    Rows are cut into blocks of block_q (default `ref_block_q`); each `WorkItems` item (a
    sequence overlapping a block) gathers its sequence's pages (page_table[seq]) and attends its
    block's rows over all pages_per_seq * page_size slots, masked to the rows of its sequence and
    to key positions <= the row's position; items of one block are summed (each row is seen by one
    item). Padding rows give zeros. int8 pages: the per-token scales multiply the scores (keys)
    and the probabilities (values). Jits with traced kv_lens / query_start / num_seqs.
    """
    t_len, n, h = q.shape
    _, kv_heads, page_size, _ = k_pages.shape
    slots, pages_per_seq = page_table.shape
    g = n // kv_heads
    sm_scale = default_sm_scale(h) if sm_scale is None else sm_scale
    bq = ref_block_q(t_len, slots, n, kv_heads) if block_q is None else block_q
    n_blocks = -(-t_len // bq)
    kv_lens = kv_lens.astype(jnp.int32)
    qs = effective_query_start(query_start, jnp.asarray(num_seqs, jnp.int32))
    items = work_items(qs, kv_lens, block_q=bq, n_blocks=n_blocks, page_size=page_size,
                       t_len=t_len)
    seq = items.seq
    qb = jnp.pad(q, ((0, n_blocks * bq - t_len), (0, 0), (0, 0)))
    qb = qb.reshape(n_blocks, bq, kv_heads, g, h)[items.block]  # [W, R, K, G, H]
    qb = jnp.transpose(qb, (0, 2, 3, 1, 4))  # [W, K, G, R, H]
    t = items.block[:, None] * bq + jnp.arange(bq)[None]  # [W, R]
    in_seq = (t >= qs[seq][:, None]) & (t < qs[seq + 1][:, None]) & (items.n_pages > 0)[:, None]
    row_pos = jnp.where(in_seq, t + (kv_lens[seq] - qs[seq + 1])[:, None], -1)
    # page-only gather, unsigned ids in bounds: XLA:CPU copies whole pages (no negative-index
    # fix-up, no per-head index), measured 2-4x faster than pool[pages, heads]
    pages = page_table[seq].astype(jnp.uint32)  # [W, J]
    gather = lambda pool: pool.at[pages].get(mode="promise_in_bounds")  # [W, J, K, ...]
    k = gather(k_pages).astype(q.dtype)  # [W, J, K, P, H]; int8 -> q dtype is exact
    v = gather(v_pages).astype(q.dtype)
    # the page-major operand first: XLA:CPU runs this contraction several times faster than
    # with the few query rows first (measured: 3x at 32 one-token rows x 640 keys); same FLOPs
    scores = jnp.einsum("wjkph,wkgrh->wkjpgr", k, qb,
                        preferred_element_type=jnp.float32) * sm_scale  # [W, K, J, P, G, R]
    if k_scale is not None:
        k_s = jnp.swapaxes(gather(k_scale), 1, 2)  # [W, K, J, P]
        scores = scores * k_s[..., None, None]
    key_pos = jnp.arange(pages_per_seq * page_size).reshape(pages_per_seq, page_size)  # [J, P]
    visible = (key_pos[None, :, :, None] <= row_pos[:, None, None, :])  # [W, J, P, R]
    visible = visible[:, None, :, :, None, :]  # [W, 1, J, P, 1, R]
    scores = jnp.where(visible, scores, MASK_VALUE)
    smax = jnp.max(scores, axis=(2, 3), keepdims=True)
    probs = jnp.where(visible, jnp.exp(scores - smax), 0.0)
    denom = jnp.sum(probs, axis=(2, 3))[..., None]  # [W, K, G, R, 1]
    if v_scale is not None:
        probs = probs * jnp.swapaxes(gather(v_scale), 1, 2)[..., None, None]
    out = jnp.einsum("wjkph,wkjpgr->wkgrh", v, probs.astype(v.dtype),
                     preferred_element_type=jnp.float32)  # [W, K, G, R, H]
    out = jnp.transpose(out / jnp.where(denom == 0.0, 1.0, denom), (0, 3, 1, 2, 4))
    blocks = jnp.zeros((n_blocks, bq, kv_heads, g, h), jnp.float32).at[items.block].add(out)
    return blocks.reshape(n_blocks * bq, n, h)[:t_len].astype(q.dtype)
