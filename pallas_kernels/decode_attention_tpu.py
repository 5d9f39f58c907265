"""Multiquery / GQA decode attention for TPU (Pallas Mosaic).

One grid step = (sequence b, KV head k, split p, KV block j). The G query heads that share KV head k
are the rows of one [Gp, H] matmul operand (G padded to a multiple of 8), so each KV tile is read
from HBM once for all of them. lengths[b] arrives by scalar prefetch: blocks past it skip their
compute (`pl.when`) and their DMA (the index map repeats the last needed block index, which
Pallas does not re-fetch). int8 caches are dequantized in VMEM: the per-token scales multiply the
scores (keys) and the probabilities (values). Splits (flash-decoding) write unnormalized partials
(o, m, l) that `combine_splits` merges; on one TensorCore a single split is best, on megacore
chips num_splits=2 lets both cores stream the cache when B*K is small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._attention_util import (MASK_VALUE, check_dtypes, check_head_dim,
                                            combine_splits, group_decode_inputs, pad_axis,
                                            reset_online_softmax, round_up)

LANES = 128  # m / l statistics are kept lane-broadcast, as Mosaic prefers [rows, 128] tiles


def _kernel(lengths_ref, q_ref, k_ref, v_ref, *refs, sm_scale: float, block: int,
            blocks_per_split: int, quantized: bool):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref, m_sc, l_sc, acc_sc = refs
    else:
        o_ref, m_ref, l_ref, m_sc, l_sc, acc_sc = refs
    b, p, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    start = (p * blocks_per_split + j) * block
    length = lengths_ref[b]

    @pl.when(j == 0)
    def _init():
        reset_online_softmax(m_sc, l_sc, acc_sc)

    @pl.when(start < length)
    def _step():
        q = q_ref[...]  # [Gp, H]
        k = k_ref[...]  # [bs, H]
        v = v_ref[...]
        if quantized:
            k = k.astype(jnp.float32).astype(q.dtype)
            v = v.astype(jnp.float32).astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [Gp, bs]
        if quantized:
            s = s * ks_ref[...]  # [1, bs]
        col = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = col < length
        s = jnp.where(visible, s, MASK_VALUE)
        m_prev = m_sc[...][:, :1]  # [Gp, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        probs = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_sc[...][:, :1] + jnp.sum(probs, axis=1, keepdims=True)
        if quantized:
            probs = probs * vs_ref[...]
        pv = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [Gp, H]
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == blocks_per_split - 1)
    def _write():
        o_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def decode_attention_tpu(q, k_cache, v_cache, lengths, *, k_scale=None, v_scale=None,
                         sm_scale: float, block_kv: int = 512, num_splits: int = 1,
                         interpret=False):
    """q [B, N, H]; caches [B, K, S, H] (float, or int8 + scales [B, K, S]) -> [B, N, H].

    block_kv: keys per grid step (a multiple of 128, or >= S). A cache whose S is not a multiple
    of the block is zero-padded here, which copies it: allocate max_len as a multiple of 128.
    interpret: False, True (HLO interpreter) or `pltpu.InterpretParams()` (TPU simulator).
    """
    kernel_name = "decode_attention (tpu)"
    check_dtypes(q, k_cache, kernel_name, int8_ok=k_scale is not None)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=False, multiple=8)
    b, n, h = q.shape
    kv_heads, s_len = k_cache.shape[1], k_cache.shape[2]
    g = n // kv_heads
    g_pad = round_up(g, 8)
    block = min(block_kv, round_up(s_len, LANES))
    if block % LANES:
        raise ValueError(f"block_kv must be a multiple of {LANES}, got {block_kv}")
    s_pad = round_up(s_len, block)
    n_blocks = s_pad // block
    num_splits = max(1, min(num_splits, n_blocks))
    per_split = -(-n_blocks // num_splits)
    quantized = k_scale is not None

    qg, k_cache, v_cache, lengths = group_decode_inputs(q, k_cache, v_cache, lengths,
                                                        g_pad=g_pad, s_pad=s_pad)

    def kv_index(bi, ki, pi, ji, lens):
        last = jnp.maximum(pl.cdiv(lens[bi], block) - 1, 0)
        return bi, ki, jnp.minimum(pi * per_split + ji, last), 0

    def scale_index(bi, ki, pi, ji, lens):  # scales [B, K, 1, S]: the block index is last
        _, _, block_index, _ = kv_index(bi, ki, pi, ji, lens)
        return bi, ki, 0, block_index

    in_specs = [pl.BlockSpec((None, None, g_pad, h), lambda bi, ki, pi, ji, lens: (bi, ki, 0, 0)),
                pl.BlockSpec((None, None, block, h), kv_index),
                pl.BlockSpec((None, None, block, h), kv_index)]
    args = [qg, k_cache, v_cache]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, 1, block), scale_index)] * 2
        args += [pad_axis(sc.astype(jnp.float32), 2, s_pad)[:, :, None, :]
                 for sc in (k_scale, v_scale)]  # [B, K, 1, S]
    part = lambda bi, ki, pi, ji, lens: (bi, ki, pi, 0, 0)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, None, g_pad, h), part),
                 pl.BlockSpec((None, None, None, g_pad, LANES), part),
                 pl.BlockSpec((None, None, None, g_pad, LANES), part)]
    stats = jax.ShapeDtypeStruct((b, kv_heads, num_splits, g_pad, LANES), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((b, kv_heads, num_splits, g_pad, h), jnp.float32),
                 stats, stats]
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block=block,
                               blocks_per_split=per_split, quantized=quantized)
    o, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kv_heads, num_splits, per_split),
            in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((g_pad, LANES), jnp.float32),
                            pltpu.VMEM((g_pad, LANES), jnp.float32),
                            pltpu.VMEM((g_pad, h), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(lengths, *args)
    out = combine_splits(o, m[..., 0], l[..., 0])  # [B, K, Gp, H]
    return out[:, :, :g].reshape(b, n, h).astype(q.dtype)
