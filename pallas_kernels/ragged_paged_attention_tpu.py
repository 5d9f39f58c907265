"""Ragged paged attention for TPU (Pallas Mosaic): mixed prefill chunks and decode tokens.

The packed query rows are cut into fixed blocks of block_q tokens. A work item is one
(sequence, query block) pair that overlap (`WorkItems`, built by plain XLA before the call): a
block holding the end of one sequence and the start of the next has two consecutive items, so the
output block stays in VMEM across them and one online softmax per row accumulates only its own
sequence's keys. Grid = (KV head k, item w, KV step j). The G query heads of KV head k are rows of
the [block_q * Gp, H] operand (row = t * Gp + g), so each KV page is read once for the group.

Pages arrive by scalar-prefetched index maps: step j of item w reads pages_per_block logical pages
of its sequence, each a [page_size, H] block of k_pages[page_table[seq, page], k]. Pages past the
item's last visible key (kv length and causality) repeat the previous block index, so Pallas
issues no DMA for them, and `pl.when` skips their compute. int8 pages are converted in VMEM and
their per-token scales multiply the scores (keys) and the probabilities (values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._attention_util import (MASK_VALUE, check_dtypes, check_head_dim,
                                            reset_online_softmax)
from pallas_kernels._dispatch import UnsupportedInput
from pallas_kernels._ragged_util import (next_pow2, pack_queries, prepare_metadata,
                                         unpack_outputs)

LANES = 128  # m / l statistics are kept lane-broadcast, as Mosaic prefers [rows, 128] tiles
N_PREFETCH = 8  # page_table, item seq / block / n_pages / first / last, kv_lens, query starts


def _online_softmax_page(q, k, v, ks, vs, row_pos, key0, m_sc, l_sc, acc_sc, sm_scale):
    """Fold one page (k, v [page_size, H]; ks, vs [1, page_size] or None) into the running
    (m, l, acc) of the rows q [R, H]; key position key0 + c is visible to a row at row_pos."""
    s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * sm_scale  # [R, ps]
    if ks is not None:
        s = s * ks
    visible = key0 + lax.broadcasted_iota(jnp.int32, s.shape, 1) <= row_pos
    s = jnp.where(visible, s, MASK_VALUE)
    m_prev = m_sc[...][:, :1]  # [R, 1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_sc[...][:, :1] + jnp.sum(probs, axis=1, keepdims=True)
    if vs is not None:
        probs = probs * vs
    pv = jnp.dot(probs.astype(q.dtype), v.astype(q.dtype),
                 preferred_element_type=jnp.float32)  # [R, H]
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)


def _kernel(pt_ref, seq_ref, blk_ref, npg_ref, first_ref, last_ref, kvl_ref, qs_ref, q_ref,
            *refs, sm_scale: float, block_q: int, g_shift: int, page_size: int,
            pages_per_block: int, n_steps: int, quantized: bool):
    del pt_ref  # used by the index maps only
    ppb = pages_per_block
    k_refs, v_refs = refs[:ppb], refs[ppb:2 * ppb]
    scale_refs = refs[2 * ppb:4 * ppb] if quantized else (None,) * (2 * ppb)
    o_ref, m_sc, l_sc, acc_sc = refs[4 * ppb if quantized else 2 * ppb:]
    w, j = pl.program_id(1), pl.program_id(2)
    s = seq_ref[w]

    @pl.when((j == 0) & (first_ref[w] == 1))
    def _init():
        reset_online_softmax(m_sc, l_sc, acc_sc)

    q = q_ref[...]  # [R, H]
    rows = lax.broadcasted_iota(jnp.int32, (q.shape[0], page_size), 0)
    t = blk_ref[w] * block_q + lax.shift_right_logical(rows, g_shift)  # token of each row
    q_end = qs_ref[s + 1]
    in_seq = (t >= qs_ref[s]) & (t < q_end)
    row_pos = jnp.where(in_seq, t + (kvl_ref[s] - q_end), -1)  # [R, ps]; -1 sees nothing
    for i in range(ppb):
        page = j * ppb + i

        @pl.when(page < npg_ref[w])
        def _page(i=i, page=page):
            ks = scale_refs[i][...] if quantized else None
            vs = scale_refs[ppb + i][...] if quantized else None
            _online_softmax_page(q, k_refs[i][...], v_refs[i][...], ks, vs, row_pos,
                                 page * page_size, m_sc, l_sc, acc_sc, sm_scale)

    @pl.when((j == n_steps - 1) & (last_ref[w] == 1))
    def _write():
        l = l_sc[...][:, :1]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _page_index_map(i: int, ppb: int, pps: int):
    """Block index of page slot i of step j: logical page j * ppb + i of the item's sequence,
    clamped to its last needed page (a repeated index is not fetched again)."""
    def index(k, w, j, pt, seq, blk, npg, *_):
        page = jnp.minimum(j * ppb + i, jnp.clip(npg[w] - 1, 0, pps - 1))
        return pt[seq[w], page], k, 0, 0

    return index


def _check_blocks(block_q: int, g_pad: int, page_size: int, pages_per_block: int,
                  pages_per_seq: int, dtype) -> None:
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    rows = block_q * g_pad
    if block_q < 1 or block_q & (block_q - 1) or rows % sublanes:
        raise ValueError(f"block_q must be a power of two with block_q * {g_pad} (padded query "
                         f"heads per KV head) a multiple of {sublanes}, got {block_q}")
    if not 1 <= pages_per_block <= pages_per_seq:
        raise ValueError(f"pages_per_block must be in [1, {pages_per_seq}], got "
                         f"{pages_per_block}")
    if page_size % 8:
        raise UnsupportedInput(f"ragged_paged_attention (tpu) needs page_size a multiple of 8, "
                               f"got {page_size}; use backend='xla'")


def ragged_paged_attention_tpu(q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs,
                               *, k_scale=None, v_scale=None, sm_scale: float,
                               block_q: int | None = None, pages_per_block: int | None = None,
                               interpret=False):
    """q [T, N, H]; pages [P, K, page_size, H] (float, or int8 + scales [P, K, page_size]);
    page_table [S, pages_per_seq]; kv_lens [S]; query_start [S + 1]; num_seqs scalar.
    Returns [T, N, H] in q's dtype (see `ragged_paged_attention` for the contract).

    block_q: query tokens per block (power of two; default: 256 rows of block_q * Gp).
    pages_per_block: pages per grid step (default: about 256 keys, at most 8 pages).
    interpret: False, True (HLO interpreter) or `pltpu.InterpretParams()` (TPU simulator).
    """
    kernel_name = "ragged_paged_attention (tpu)"
    check_dtypes(q, k_pages, kernel_name, int8_ok=k_scale is not None)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=False, multiple=8)
    t_len, n, h = q.shape
    _, kv_heads, page_size, _ = k_pages.shape
    pps = page_table.shape[1]
    g_pad = next_pow2(n // kv_heads)
    if block_q is None:
        block_q = min(max(16, 256 // g_pad), max(16, next_pow2(t_len)))
    ppb = max(1, min(pps, 8, 256 // page_size)) if pages_per_block is None else pages_per_block
    _check_blocks(block_q, g_pad, page_size, ppb, pps, q.dtype)
    quantized = k_scale is not None
    items, qs, valid, n_blocks = prepare_metadata(query_start, kv_lens, num_seqs, t_len=t_len,
                                                  block_q=block_q, page_size=page_size)
    rows = block_q * g_pad
    n_steps = -(-pps // ppb)
    width = items.seq.shape[0]
    qp = pack_queries(q, kv_heads, g_pad=g_pad, t_pad=n_blocks * block_q)  # [K, Tp*Gp, H]

    q_map = lambda k, w, j, pt, seq, blk, *_: (k, blk[w], 0)  # noqa: E731
    page_specs = [pl.BlockSpec((None, None, page_size, h), _page_index_map(i, ppb, pps))
                  for i in range(ppb)]
    in_specs = [pl.BlockSpec((None, rows, h), q_map)] + page_specs * 2
    args = [qp] + [k_pages] * ppb + [v_pages] * ppb
    if quantized:
        scale_specs = [pl.BlockSpec((None, None, 1, page_size), _page_index_map(i, ppb, pps))
                       for i in range(ppb)]
        in_specs += scale_specs * 2
        args += [k_scale.astype(jnp.float32)[:, :, None, :]] * ppb  # [P, K, 1, ps]
        args += [v_scale.astype(jnp.float32)[:, :, None, :]] * ppb
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q,
                               g_shift=g_pad.bit_length() - 1, page_size=page_size,
                               pages_per_block=ppb, n_steps=n_steps, quantized=quantized)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=N_PREFETCH, grid=(kv_heads, width, n_steps),
            in_specs=in_specs, out_specs=pl.BlockSpec((None, rows, h), q_map),
            scratch_shapes=[pltpu.VMEM((rows, LANES), jnp.float32),
                            pltpu.VMEM((rows, LANES), jnp.float32),
                            pltpu.VMEM((rows, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(page_table.astype(jnp.int32), items.seq, items.block, items.n_pages, items.first,
      items.last, kv_lens.astype(jnp.int32), qs, *args)
    return unpack_outputs(out, n, t_len, g_pad, valid)
