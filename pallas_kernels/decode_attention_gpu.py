"""Multiquery / GQA decode attention for GPU (Pallas, Triton lowering), flash-decoding style.

One program = (sequence b, KV head k, split p). Its G query heads are the rows of one [Gp, H] dot
operand (Gp = G padded to a power of two >= 16, the smallest Triton dot), so each KV tile is loaded
once for the whole group. The split's KV blocks are walked by a `fori_loop` whose trip count stops
at lengths[b]: blocks past the length are neither loaded nor computed. int8 caches are converted
in registers, with the per-token scales applied to the scores (keys) and probabilities (values).
Splits write unnormalized partials (o, m, l), merged by `combine_splits`; the default split count
fills the SMs when B*K is small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._attention_util import (MASK_VALUE, check_dtypes, check_head_dim,
                                            combine_splits, group_decode_inputs, pad_axis,
                                            round_up)

DEFAULT_PROGRAMS = 132  # about one program per SM of an H100; splits = programs // (B * K)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, sm_scale: float, block: int,
            blocks_per_split: int, quantized: bool):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    p = pl.program_id(2)
    length = len_ref[...]
    first = p * blocks_per_split * block
    n_iter = jnp.clip(pl.cdiv(length - first, block), 0, blocks_per_split)
    q = q_ref[...]  # [Gp, H]
    cols = jnp.arange(block)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry):
        acc, m_prev, l_prev = carry
        start = first + i * block
        k = k_ref[pl.ds(start, block), :]  # [bs, H]
        v = v_ref[pl.ds(start, block), :]
        if quantized:
            k, v = k.astype(jnp.float32).astype(q.dtype), v.astype(jnp.float32).astype(q.dtype)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * sm_scale
        if quantized:
            s = s * ks_ref[pl.ds(start, block)][None, :]
        visible = (start + cols < length)[None, :]  # [1, bs]
        s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        probs = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + jnp.sum(probs, axis=1)
        if quantized:
            probs = probs * vs_ref[pl.ds(start, block)][None, :]
        pv = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
        return alpha[:, None] * acc + pv, m_new, l_new

    rows, h = q.shape
    init = (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_iter, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def default_splits(batch: int, kv_heads: int, n_blocks: int) -> int:
    """Splits so that B * K * splits roughly fills the GPU, never more than there are blocks."""
    return max(1, min(n_blocks, DEFAULT_PROGRAMS // max(1, batch * kv_heads)))


def decode_attention_gpu(q, k_cache, v_cache, lengths, *, k_scale=None, v_scale=None,
                         sm_scale: float, block_kv: int = 64, num_splits: int | None = None,
                         num_warps: int = 4, num_stages: int = 2, interpret=False):
    """q [B, N, H]; caches [B, K, S, H] (float, or int8 + scales [B, K, S]) -> [B, N, H].

    block_kv: keys per loop step (a power of two >= 16). A cache whose S is not a multiple of the
    block is zero-padded here, which copies it: allocate max_len as a multiple of block_kv.
    num_splits: flash-decoding splits of the sequence (None: `default_splits`).
    """
    kernel_name = "decode_attention (gpu)"
    check_dtypes(q, k_cache, kernel_name, int8_ok=k_scale is not None)
    check_head_dim(q.shape[-1], kernel_name, power_of_two=True, multiple=16)
    if block_kv < 16 or block_kv & (block_kv - 1):
        raise ValueError(f"block_kv must be a power of two >= 16, got {block_kv}")
    b, n, h = q.shape
    kv_heads, s_len = k_cache.shape[1], k_cache.shape[2]
    g = n // kv_heads
    g_pad = max(16, _next_pow2(g))
    s_pad = round_up(s_len, block_kv)
    n_blocks = s_pad // block_kv
    splits = default_splits(b, kv_heads, n_blocks) if num_splits is None else num_splits
    splits = max(1, min(splits, n_blocks))
    per_split = -(-n_blocks // splits)
    quantized = k_scale is not None

    qg, k_cache, v_cache, lengths = group_decode_inputs(q, k_cache, v_cache, lengths,
                                                        g_pad=g_pad, s_pad=s_pad)

    whole = lambda bi, ki, pi: (bi, ki, 0, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None,), lambda bi, ki, pi: (bi,)),
                pl.BlockSpec((None, None, g_pad, h), whole),
                pl.BlockSpec((None, None, s_pad, h), whole),
                pl.BlockSpec((None, None, s_pad, h), whole)]
    args = [lengths, qg, k_cache, v_cache]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, s_pad), lambda bi, ki, pi: (bi, ki, 0))] * 2
        args += [pad_axis(sc.astype(jnp.float32), 2, s_pad) for sc in (k_scale, v_scale)]
    out_specs = [pl.BlockSpec((None, None, None, g_pad, h), lambda bi, ki, pi: (bi, ki, pi, 0, 0)),
                 pl.BlockSpec((None, None, None, g_pad), lambda bi, ki, pi: (bi, ki, pi, 0)),
                 pl.BlockSpec((None, None, None, g_pad), lambda bi, ki, pi: (bi, ki, pi, 0))]
    stats = jax.ShapeDtypeStruct((b, kv_heads, splits, g_pad), jnp.float32)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, block=block_kv,
                               blocks_per_split=per_split, quantized=quantized)
    o, m, l = pl.pallas_call(
        kernel, grid=(b, kv_heads, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, g_pad, h), jnp.float32),
                   stats, stats],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*args)
    out = combine_splits(o, m, l)  # [B, K, Gp, H]
    return out[:, :, :g].reshape(b, n, h).astype(q.dtype)
