"""Ragged paged attention for GPU (Pallas, Triton lowering): mixed prefill chunks and decodes.

One program = (KV head k, query block b of block_q packed tokens). Its rows are the G query
heads of KV head k for each token of the block ([block_q * Gp, H], row = t * Gp + g, Gp = G
padded to a power of two), so each KV tile is loaded once for the group. The program walks the
work items of its block (`WorkItems`: one per sequence overlapping the block, usually one; two or
more where sequences meet inside the block) and, per item, the sequence's pages up to its last
visible key, pages_per_block pages per step gathered by id from the page pool. One online softmax
per row: rows outside the item's sequence see no key, so each row accumulates only its own
sequence. int8 pages are converted in registers; their per-token scales multiply the scores
(keys) and the probabilities (values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._attention_util import MASK_VALUE, check_dtypes, check_head_dim, pad_axis
from pallas_kernels._dispatch import UnsupportedInput
from pallas_kernels._ragged_util import (next_pow2, pack_queries, prepare_metadata,
                                         unpack_outputs)


def _kernel(pt_ref, seq_ref, npg_ref, bs_ref, kvl_ref, qs_ref, q_ref, k_ref, v_ref, *refs,
            sm_scale: float, block_q: int, g_shift: int, page_size: int, pages_per_block: int,
            quantized: bool):
    ks_ref, vs_ref, o_ref = refs if quantized else (None, None) + refs
    b = pl.program_id(1)
    q = q_ref[...]  # [R, H]
    rows, h = q.shape
    block_k = pages_per_block * page_size
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    t = b * block_q + lax.shift_right_logical(jnp.arange(rows, dtype=jnp.int32), g_shift)

    def item(w, carry):
        s = seq_ref[w]
        q_end = qs_ref[s + 1]
        in_seq = (t >= qs_ref[s]) & (t < q_end)
        row_pos = jnp.where(in_seq, t + (kvl_ref[s] - q_end), -1)[:, None]  # [R, 1]

        def step(j, carry):
            acc, m_prev, l_prev = carry
            ids = pt_ref[s, pl.ds(j * pages_per_block, pages_per_block)]  # [ppb]
            k = k_ref[ids].reshape(block_k, h)  # [bk, H]
            v = v_ref[ids].reshape(block_k, h)
            scores = jnp.dot(q, k.astype(q.dtype).T, preferred_element_type=jnp.float32,
                             precision=precision) * sm_scale  # [R, bk]
            if quantized:
                scores = scores * ks_ref[ids].reshape(1, block_k)
            visible = (j * block_k + jnp.arange(block_k))[None, :] <= row_pos  # [R, bk]
            scores = jnp.where(visible, scores, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1))
            probs = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_new = alpha * l_prev + jnp.sum(probs, axis=1)
            if quantized:
                probs = probs * vs_ref[ids].reshape(1, block_k)
            pv = jnp.dot(probs.astype(q.dtype), v.astype(q.dtype),
                         preferred_element_type=jnp.float32, precision=precision)
            return alpha[:, None] * acc + pv, m_new, l_new

        return lax.fori_loop(0, pl.cdiv(npg_ref[w], pages_per_block), step, carry)

    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, l = lax.fori_loop(bs_ref[b], bs_ref[b + 1], item, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def _check_blocks(block_q: int, g_pad: int, page_size: int, pages_per_block: int) -> None:
    if block_q < 1 or block_q & (block_q - 1) or block_q * g_pad < 16:
        raise ValueError(f"block_q must be a power of two with block_q * {g_pad} (padded query "
                         f"heads per KV head) >= 16, got {block_q}")
    if page_size & (page_size - 1):
        raise UnsupportedInput(f"ragged_paged_attention (gpu) needs page_size a power of two, "
                               f"got {page_size}; use backend='xla'")
    if pages_per_block < 1 or pages_per_block & (pages_per_block - 1) or \
            pages_per_block * page_size < 16:
        raise ValueError(f"pages_per_block must be a power of two with pages_per_block * "
                         f"{page_size} (page_size) >= 16, got {pages_per_block}")


def ragged_paged_attention_gpu(q, k_pages, v_pages, page_table, kv_lens, query_start, num_seqs,
                               *, k_scale=None, v_scale=None, sm_scale: float,
                               block_q: int | None = None, pages_per_block: int | None = None,
                               num_warps: int = 4, num_stages: int = 2, interpret=False):
    """q [T, N, H]; pages [P, K, page_size, H] (float, or int8 + scales [P, K, page_size]);
    page_table [S, pages_per_seq]; kv_lens [S]; query_start [S + 1]; num_seqs scalar.
    Returns [T, N, H] in q's dtype (see `ragged_paged_attention` for the contract).

    block_q: query tokens per program (power of two; default: 64 rows of block_q * Gp, >= 16).
    pages_per_block: pages gathered per loop step (power of two; default: 64 keys).
    """
    kernel_name = "ragged_paged_attention (gpu)"
    check_dtypes(q, k_pages, kernel_name, int8_ok=k_scale is not None)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=True, multiple=16)
    t_len, n, h = q.shape
    _, kv_heads, page_size, _ = k_pages.shape
    pps = page_table.shape[1]
    g_pad = next_pow2(n // kv_heads)
    if block_q is None:
        block_q = min(max(1, 64 // g_pad), next_pow2(t_len))
        block_q = max(block_q, 16 // min(g_pad, 16))
    ppb = max(1, 64 // page_size) if pages_per_block is None else pages_per_block
    _check_blocks(block_q, g_pad, page_size, ppb)
    quantized = k_scale is not None
    items, qs, valid, n_blocks = prepare_metadata(query_start, kv_lens, num_seqs, t_len=t_len,
                                                  block_q=block_q, page_size=page_size)
    rows = block_q * g_pad
    qp = pack_queries(q, kv_heads, g_pad=g_pad, t_pad=n_blocks * block_q)  # [K, Tp*Gp, H]
    n_pages = k_pages.shape[0]
    page_table = pad_axis(page_table.astype(jnp.int32), 1, -(-pps // ppb) * ppb)  # id 0: valid
    whole = lambda a: pl.BlockSpec(a.shape, lambda k, b: (0,) * a.ndim)  # noqa: E731
    meta = [page_table, items.seq, items.n_pages, items.block_start, kv_lens.astype(jnp.int32),
            qs]
    pages_spec = pl.BlockSpec((n_pages, None, page_size, h), lambda k, b: (0, k, 0, 0))
    in_specs = [whole(a) for a in meta] + [pl.BlockSpec((None, rows, h), lambda k, b: (k, b, 0)),
                                           pages_spec, pages_spec]
    args = meta + [qp, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((n_pages, None, page_size), lambda k, b: (0, k, 0))] * 2
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q,
                               g_shift=g_pad.bit_length() - 1, page_size=page_size,
                               pages_per_block=ppb, quantized=quantized)
    out = pl.pallas_call(
        kernel, grid=(kv_heads, n_blocks), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, rows, h), lambda k, b: (k, b, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*args)
    return unpack_outputs(out, n, t_len, g_pad, valid)
