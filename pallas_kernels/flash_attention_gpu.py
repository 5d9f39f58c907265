"""Flash (prefill) attention for GPU (Pallas, Triton lowering): online softmax over KV blocks.

Query heads are packed by KV head (`pack_rows`): the rows of one [bm, H] query block are (t, g)
pairs, t-major, so one K/V tile serves all G heads that share it (GQA / MQA). One program =
(b, KV head, row block); it walks the KV blocks with a `fori_loop` whose trip count stops at the
causal frontier of its last row and at lengths[b], so blocks past either are never loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._attention_util import (MASK_VALUE, check_dtypes, check_head_dim,
                                            pack_rows, pad_axis, round_up, unpack_rows)


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale: float, block_q: int, block_k: int,
            groups: int, offset: int, causal: bool):
    i = pl.program_id(2)
    length = len_ref[...]
    n_blocks = pl.cdiv(length, block_k)
    row = i * block_q + jnp.arange(block_q)
    t = row // groups  # query position of each packed row
    if causal:
        t_last = (i * block_q + block_q - 1) // groups
        n_blocks = jnp.minimum(n_blocks, pl.cdiv(t_last + offset + 1, block_k))
    n_blocks = jnp.maximum(n_blocks, 0)
    q = q_ref[...]  # [bm, H]
    cols = jnp.arange(block_k)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * sm_scale
        col = start + cols
        visible = (col < length)[None, :]
        if causal:
            visible = visible & (col[None, :] <= t[:, None] + offset)
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        probs = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        pv = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
        return alpha[:, None] * acc + pv, m_new, alpha * l_prev + jnp.sum(probs, axis=1)

    rows, h = q.shape
    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, l = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def flash_attention_gpu(q, k, v, *, causal: bool, lengths, sm_scale: float, block_q: int = 64,
                        block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                        interpret=False):
    """q [B, N, T, H]; k, v [B, K, S, H] -> [B, N, T, H] in q's dtype.

    block_q: packed query rows (t, g) per program; block_k: keys per loop step; both powers of two
    >= 16. Inputs are zero-padded to whole blocks (padding is masked).
    """
    kernel_name = "flash_attention (gpu)"
    check_dtypes(q, k, kernel_name)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=True, multiple=16)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    b, n, t_len, h = q.shape
    kv_heads, s_len = k.shape[1], k.shape[2]
    groups = n // kv_heads
    rows = pack_rows(q, kv_heads)  # [B, K, T*G, H]
    rows = pad_axis(rows, 2, round_up(rows.shape[2], block_q))
    k, v = (pad_axis(x, 2, round_up(s_len, block_k)) for x in (k, v))
    full = jnp.full((b,), s_len, jnp.int32)
    lengths = full if lengths is None else jnp.minimum(lengths.astype(jnp.int32), s_len)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                               groups=groups, offset=s_len - t_len, causal=causal)
    q_spec = pl.BlockSpec((None, None, block_q, h), lambda bi, ki, i: (bi, ki, i, 0))
    kv_spec = pl.BlockSpec((None, None, k.shape[2], h), lambda bi, ki, i: (bi, ki, 0, 0))
    out = pl.pallas_call(
        kernel, grid=(b, kv_heads, rows.shape[2] // block_q),
        in_specs=[pl.BlockSpec((None,), lambda bi, ki, i: (bi,)), q_spec, kv_spec, kv_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(lengths, rows, k, v)
    return unpack_rows(out, n, t_len)
