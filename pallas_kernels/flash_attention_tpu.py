"""Flash (prefill) attention for TPU (Pallas Mosaic): online softmax over KV blocks.

Query heads are packed by KV head (`pack_rows`): the rows of one [bm, H] query block are (t, g)
pairs, t-major, so one K/V tile serves all G heads that share it (GQA / MQA). Grid = (b, KV head,
row block i, KV block j), j innermost and sequential. lengths[b] arrives by scalar prefetch; a KV
block that is entirely in the causal future of the row block, or past lengths[b], skips its compute
(`pl.when`) and its DMA (the index map repeats the last needed block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._attention_util import (MASK_VALUE, check_dtypes, check_head_dim,
                                            pack_rows, pad_axis, reset_online_softmax,
                                            round_up, unpack_rows)

LANES = 128


def _last_block(i, length, *, block_q: int, block_k: int, groups: int, offset: int, causal: bool):
    """Index of the last KV block row block i needs (>= 0)."""
    last = pl.cdiv(length, block_k) - 1
    if causal:
        t_last = lax.div(i * block_q + block_q - 1, groups)  # lax.div: Mosaic has no floor-div
        last = jnp.minimum(last, lax.div(t_last + offset, block_k))
    return jnp.maximum(last, 0)


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, sm_scale: float,
            block_q: int, block_k: int, groups: int, offset: int, causal: bool):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]

    @pl.when(j == 0)
    def _init():
        reset_online_softmax(m_sc, l_sc, acc_sc)

    last = _last_block(i, length, block_q=block_q, block_k=block_k, groups=groups, offset=offset,
                       causal=causal)

    @pl.when((j <= last) & (j * block_k < length))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [bm, H], [bk, H], [bk, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [bm, bk]
        col = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = col < length
        if causal:
            row = i * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            t = row if groups == 1 else lax.div(row, jnp.int32(groups))
            visible &= col <= t + offset
        s = jnp.where(visible, s, MASK_VALUE)
        m_prev = m_sc[...][:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = jnp.broadcast_to(alpha * l_sc[...][:, :1] + jnp.sum(probs, 1, keepdims=True),
                                     l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(probs.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        l = l_sc[...][:, :1]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def flash_attention_tpu(q, k, v, *, causal: bool, lengths, sm_scale: float, block_q: int = 256,
                        block_k: int = 512, interpret=False):
    """q [B, N, T, H]; k, v [B, K, S, H] -> [B, N, T, H] in q's dtype.

    block_q: packed query rows (t, g) per block, a multiple of 8; block_k: keys per block, a
    multiple of 128. Inputs are zero-padded to whole blocks (padding is masked).
    interpret: False, True (HLO interpreter) or `pltpu.InterpretParams()` (TPU simulator).
    """
    kernel_name = "flash_attention (tpu)"
    check_dtypes(q, k, kernel_name)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=False, multiple=8)
    if block_q % 8 or block_k % LANES:
        raise ValueError(f"block_q must be a multiple of 8 and block_k of {LANES}, "
                         f"got {block_q}, {block_k}")
    b, n, t_len, h = q.shape
    kv_heads, s_len = k.shape[1], k.shape[2]
    groups = n // kv_heads
    rows = pack_rows(q, kv_heads)  # [B, K, T*G, H]
    bm = min(block_q, round_up(rows.shape[2], 8))
    bk = min(block_k, round_up(s_len, LANES))
    rows = pad_axis(rows, 2, round_up(rows.shape[2], bm))
    k, v = (pad_axis(x, 2, round_up(s_len, bk)) for x in (k, v))
    full = jnp.full((b,), s_len, jnp.int32)
    lengths = full if lengths is None else jnp.minimum(lengths.astype(jnp.int32), s_len)
    statics = dict(block_q=bm, block_k=bk, groups=groups, offset=s_len - t_len, causal=causal)

    def kv_index(bi, ki, i, j, lens):
        return bi, ki, jnp.minimum(j, _last_block(i, lens[bi], **statics)), 0

    q_spec = pl.BlockSpec((None, None, bm, h), lambda bi, ki, i, j, lens: (bi, ki, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, h), kv_index)
    out = pl.pallas_call(
        functools.partial(_kernel, sm_scale=sm_scale, **statics),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kv_heads, rows.shape[2] // bm, k.shape[2] // bk),
            in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bm, LANES), jnp.float32),
                            pltpu.VMEM((bm, LANES), jnp.float32),
                            pltpu.VMEM((bm, h), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(lengths, rows, k, v)
    return unpack_rows(out, n, t_len)
