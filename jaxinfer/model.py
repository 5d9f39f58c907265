"""The generic decoder, written once, per chip, with the layout's collectives at fixed points.

Every function here runs inside `jax.shard_map` over the phase's mesh (`jaxinfer.programs`) and
sees local shards; `PhaseSharding.layer` (`jaxinfer.sharding.LayerCollectives`) names the mesh
axes of each collective, and a collective over no axes is skipped, so the unsharded model (a
1-device mesh) runs this same code with no collective at all. The points (pope2022.md §5-§6):

- embedding: each chip looks up the tokens of its vocab shard; the partial rows are
  reduce-scattered over the vocab axes into the residual's d_model shard;
- block input / output: all-gather / reduce-scatter of the residual over the model axes
  (§5.1, §5.2 steps 1, 7); 2D: partial sums over x reduce-scattered into heads / d_ff and
  all-gathered back (§5.2 steps 3, 5), norm statistics all-reduced over x;
- batch-sharded attention: all-to-all of the queries heads -> batch and of the output back
  (§6.2b); multiquery K/V reduce-scattered (2D) or sliced into the batch;
- weight-gathered layouts: every weight of a layer all-gathered over the gathered axes (§5.3);
- logits: the unembedding's partial sums reduce-scattered over x, the vocab all-gathered.

Shapes per chip: b residual rows, e the residual's d_model shard, n / k query / KV heads.
Entry points: `forward` (any attention: the `Attend` callback), and on it `forward_logits`,
`prefill`, `decode_step`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxinfer import axes as ax
from jaxinfer import layers
from jaxinfer import params as params_lib
from jaxinfer import quant
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import LayerCollectives, PhaseSharding


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How (not what) the model computes; hashable, a static argument of every program."""

    sharding: PhaseSharding
    """The phase's mesh, rules and collectives (`PhaseSharding.single_device()` unsharded)."""
    attention_backend: str = "xla"
    """'auto', 'xla', 'tpu' or 'gpu' (see `pallas_kernels`); 'tpu-interpret' / 'gpu-interpret'
    run the same Pallas kernels in the interpreter on any platform (tests, debugging)."""
    quantization: quant.QuantConfig | None = None
    """How the projection weights are quantized (None: float weights)."""

    @property
    def lc(self) -> LayerCollectives:
        return self.sharding.layer

    def weight_axes(self, cfg: ModelConfig) -> Any:
        """Mesh axes of every dim of every weight (the parameter tree's structure)."""
        logical = quant.param_logical_axes(cfg, self.quantization)
        return jax.tree.map(lambda names: tuple(self.sharding.weights.mesh_axes(n) for n in names),
                            logical, is_leaf=params_lib.is_axes)


# ---- collectives: each a no-op over no axes -------------------------------------------------
def _all_gather(x, axes, axis):
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def _reduce_scatter(x, axes, axis):
    return jax.lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True) if axes else x


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _index(axes, sizes) -> jax.Array:
    """Linear index of this chip over `axes` (major first), 0 for no axes."""
    idx = jnp.int32(0)
    for a in axes:
        idx = idx * sizes[a] + jax.lax.axis_index(a)
    return idx


def _gather_weights(p, dims, gathered):
    """Weight-gathered layouts: all-gather each stored shard over the gathered axes (§5.3)."""
    if not gathered:
        return p

    def gather(w, dims):
        for dim, axes in enumerate(dims):
            take = tuple(a for a in axes if a in gathered)
            if take:
                if axes[len(axes) - len(take):] != take:
                    raise ValueError(f"cannot gather mesh axes {take} out of a dim sharded "
                                     f"{axes}: they must be its minor axes")
                w = jax.lax.all_gather(w, take, axis=dim, tiled=True)
        return w

    return jax.tree.map(gather, p, dims, is_leaf=lambda x: isinstance(x, jax.Array))


def _project(spec: str, x, w, rt: Runtime, out_dtype=None):
    """`layers.project` with the runtime's kernel backend (quantized weights)."""
    return layers.project(spec, x, w, out_dtype, rt.attention_backend)


# ---- norms, embedding, logits -----------------------------------------------------------------
def _norm(h, p, cfg: ModelConfig, x_axes):
    """Norm over d_model; with d_model split over x (2D) the statistics are all-reduced there."""
    if not x_axes:
        return layers.norm(h, p, cfg)
    hf = h.astype(jnp.float32)
    if cfg.norm == "layer":
        hf = hf - jax.lax.psum(jnp.sum(hf, -1, keepdims=True), x_axes) / cfg.d_model
    var = jax.lax.psum(jnp.sum(jnp.square(hf), -1, keepdims=True), x_axes) / cfg.d_model
    return layers.scale_normed(hf * jax.lax.rsqrt(var + cfg.norm_eps), p, cfg).astype(h.dtype)


def _vocab_axes(rt: Runtime) -> tuple[str, ...]:
    """Axes the (gathered) embedding / unembedding vocab dim is split over on this chip."""
    return tuple(a for a in rt.sharding.weights.mesh_axes(ax.VOCAB) if a not in rt.lc.gathered)


def _global_weights(params, rt: Runtime, dims) -> dict:
    """Embedding, final norm and unembedding, gathered once per step (weight-gathered)."""
    return {name: _gather_weights(params[name], dims[name], rt.lc.gathered)
            for name in ("embed", "final_norm", "unembed") if name in params}


def _embed(weights, tokens, cfg: ModelConfig, rt: Runtime):
    """tokens [b, T] (this chip's residual rows) -> residual [b, T, e]."""
    table = weights["embed"]  # [V/Mv, D/X]
    vocab_axes = _vocab_axes(rt)
    rows = table.shape[0]
    local = tokens - _index(vocab_axes, rt.sharding.sizes) * rows
    x = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0)  # [b, T, D/X]
    if vocab_axes:
        x = jnp.where(((local >= 0) & (local < rows))[..., None], x, 0)
    x = layers.scale_embedding(x, cfg)
    return _reduce_scatter(x, vocab_axes, 2)  # [b, T, e]


def _logits(x, weights, cfg: ModelConfig, rt: Runtime):
    """Residual [b, T, e] -> float32 logits [b, T, V], the full vocabulary on every chip."""
    lc = rt.lc
    h = _norm(_all_gather(x, lc.model_axes, 2), weights["final_norm"], cfg, lc.x_axes)
    if cfg.tie_embeddings:  # table [V/Mv, D/X]
        part = jnp.einsum("btd,vd->btv", h, weights["embed"], preferred_element_type=jnp.float32)
    else:
        part = _project("btd,dv->btv", h, weights["unembed"], rt, jnp.float32)
    # part [b, T, V/Mv] is partial over x
    part = _reduce_scatter(part, lc.x_axes, 2)  # [b, T, V/(Mv X)]
    return _all_gather(part, _vocab_axes(rt) + lc.x_axes, 2)


# ---- one decoder layer ------------------------------------------------------------------------
def _layer(p, x, rope, attend, carry, layer, cfg: ModelConfig, rt: Runtime):
    """One block, serial or parallel: residual x [b, T, e] -> same."""
    lc = rt.lc
    h = _norm(_all_gather(x, lc.model_axes, 2), p["attn_norm"], cfg, lc.x_axes)  # [b, T, E/X]
    attn, carry = _attention(h, p, rope, attend, carry, layer, cfg, rt)
    if cfg.parallel_block:
        return x + _reduce_scatter(attn + _feed_forward(h, p, cfg, rt), lc.model_axes, 2), carry
    x = x + _reduce_scatter(attn, lc.model_axes, 2)
    h = _norm(_all_gather(x, lc.model_axes, 2), p["ffn_norm"], cfg, lc.x_axes)
    return x + _reduce_scatter(_feed_forward(h, p, cfg, rt), lc.model_axes, 2), carry


def _feed_forward(h, p, cfg: ModelConfig, rt: Runtime):
    """h [b, T, E/X] -> [b, T, E/X], partial over the model axes (§5.2 steps 2-6)."""
    xs = rt.lc.x_axes
    up = _project("btd,df->btf", h, p["w_up"], rt)  # [b, T, F/M] partial over x
    gate = _project("btd,df->btf", h, p["w_gate"], rt) if cfg.gated_ffn else None
    if xs:
        pre = up if gate is None else jnp.stack([gate, up])
        pre = jax.lax.psum_scatter(pre, xs, scatter_dimension=pre.ndim - 1, tiled=True)
        gate, up = (None, pre) if gate is None else (pre[0], pre[1])
    act = layers.activation(up if gate is None else gate, cfg.activation)
    hidden = act if gate is None else act * up
    hidden = _all_gather(hidden, xs, 2)  # [b, T, F/M]
    return _project("btf,fd->btd", hidden, p["w_down"], rt)


def _first_x(dtype, rt: Runtime):
    """1 on the chips of x index 0, else 0: a bias is added once before an x reduction."""
    xs = rt.lc.x_axes
    return jnp.asarray(1, dtype) if not xs else \
        (_index(xs, rt.sharding.sizes) == 0).astype(dtype)


def _attention(h, p, rope, attend, carry, layer, cfg: ModelConfig, rt: Runtime):
    """h [b, T, E/X] -> attention output projected, [b, T, E/X] partial over the model axes."""
    lc = rt.lc
    xs = lc.x_axes
    q = _project("btd,dnh->btnh", h, p["wq"], rt)  # [b, T, N/M, H] partial over x
    k = _project("btd,dkh->btkh", h, p["wk"], rt)  # [b, T, K/Mk, H] partial over x
    v = _project("btd,dkh->btkh", h, p["wv"], rt)
    if cfg.qkv_bias:
        one = _first_x(h.dtype, rt)
        q, k, v = q + one * p["bq"], k + one * p["bk"], v + one * p["bv"]
    q, k = layers.apply_rope(q, rope), layers.apply_rope(k, rope)  # linear: fine on partials
    q = _reduce_scatter(q, xs, 2)  # [b, T, n, H]
    if lc.attention == "batch":
        k, v = _kv_to_batch(k, rt), _kv_to_batch(v, rt)
        q = jax.lax.all_to_all(q, lc.q_heads, 0, 2, tiled=True) if lc.q_heads else q
    elif xs and lc.kv_heads == lc.q_heads:
        k, v = _reduce_scatter(k, xs, 2), _reduce_scatter(v, xs, 2)
    else:
        k, v = _psum(k, xs), _psum(v, xs)
    out, carry = attend(q, k, v, layer, carry)  # [b_attn, T, n_attn, H]
    if lc.attention == "batch" and lc.q_heads:
        out = jax.lax.all_to_all(out, lc.q_heads, 2, 0, tiled=True)  # batch -> heads
    out = _all_gather(out, xs, 2)  # [b, T, N/M, H]
    return _project("btnh,nhd->btd", out, p["wo"], rt), carry


def _kv_to_batch(k, rt: Runtime):
    """K/V [b, T, K, H] (partial over x) -> this chip's attention rows (§6.2b, §6.5)."""
    lc, sizes = rt.lc, rt.sharding.sizes
    m, xs = rt.sharding.size(lc.model_axes), lc.x_axes
    if xs:  # rows ordered (model axes, x): reduce-scatter over x, then keep our model block
        b = k.shape[0]
        k = k.reshape((m, rt.sharding.size(xs), b // (m * rt.sharding.size(xs))) + k.shape[1:])
        k = jax.lax.psum_scatter(k, xs, scatter_dimension=1, tiled=True)[:, 0]
        return jnp.take(k, _index(lc.model_axes, sizes), axis=0)
    rows = k.shape[0] // m
    return jax.lax.dynamic_slice_in_dim(k, _index(lc.model_axes, sizes) * rows, rows, axis=0)


def row_ids(b: int, rt: Runtime) -> jax.Array:
    """Global batch index of each of this chip's b residual rows."""
    return _index(rt.lc.gathered, rt.sharding.sizes) * b + jnp.arange(b)


def attention_rows(per_row: jax.Array, rt: Runtime) -> jax.Array:
    """Values of this chip's residual rows [b, ...] -> those of its attention rows."""
    lc = rt.lc
    if lc.attention != "batch" or not lc.q_heads:
        return per_row
    rows = per_row.shape[0] // rt.sharding.size(lc.q_heads)
    return jax.lax.dynamic_slice_in_dim(per_row, _index(lc.q_heads, rt.sharding.sizes) * rows,
                                        rows, axis=0)


def kv_heads_for_queries(k_local: int, n_local: int, cfg: ModelConfig, rt: Runtime):
    """Selector of the KV heads (axis 1 of [b, k_local, ...]) this chip's query heads read."""
    lc, sizes = rt.lc, rt.sharding.sizes
    if lc.attention == "batch":
        return lambda t: t
    group = cfg.n_heads // cfg.n_kv_heads
    need = max(n_local // group, 1)
    if need == k_local:
        return lambda t: t
    offset = (_index(lc.q_heads, sizes) * n_local) // group - _index(lc.kv_heads, sizes) * k_local
    return lambda t: jax.lax.dynamic_slice_in_dim(t, offset, need, axis=1)


def _heads_major(x):  # [b, T, heads, H] <-> [b, heads, T, H]
    return jnp.swapaxes(x, 1, 2)


def _run_layers(params, x, rope, attend, carry, cfg: ModelConfig, rt: Runtime, dims):
    for i, p in enumerate(params["layers"]):
        p = _gather_weights(p, dims["layers"][i], rt.lc.gathered)
        x, carry = _layer(p, x, rope, attend, carry, i, cfg, rt)
    return x, carry


def _self_attention(lengths, cfg: ModelConfig, rt: Runtime):
    """Attention of a prompt to itself; collects each layer's keys/values [b, k, T, H]."""

    def attend(q, k, v, layer, kv):
        kh, vh = _heads_major(k), _heads_major(v)
        sel = kv_heads_for_queries(kh.shape[1], q.shape[2], cfg, rt)
        out = pallas_kernels.flash_attention(_heads_major(q), sel(kh), sel(vh), causal=True,
                                             lengths=lengths, backend=rt.attention_backend)
        return _heads_major(out), kv + ((kh, vh),)

    return attend


# ---- entry points (per chip) -------------------------------------------------------------------
Attend = Callable[..., tuple[jax.Array, Any]]
"""attend(q [b_a, T, n, H], k, v [b_a, T, k, H], layer, carry) -> (out [b_a, T, n, H], carry):
the attention of one layer on this chip's attention rows (b_a; RoPE applied), threading a carry
(a KV cache, collected keys/values, ...) through the layers."""


def forward(params, tokens, positions, attend: Attend, carry, cfg: ModelConfig, rt: Runtime,
            select: jax.Array | None = None):
    """tokens [b, T] at positions [b, T] through the decoder -> (float32 logits, carry): logits
    [b, T, V] of every position, or [b, R, V] of the R positions `select` [b, R] (indices along
    T) of each row only."""
    dims = rt.weight_axes(cfg)
    weights = _global_weights(params, rt, dims)
    x = _embed(weights, tokens, cfg, rt)
    x, carry = _run_layers(params, x, layers.rope_tables(positions, cfg), attend, carry, cfg,
                           rt, dims)
    if select is not None:
        x = jnp.take_along_axis(x, select[:, :, None], axis=1)  # [b, R, e]
    return _logits(x, weights, cfg, rt), carry


def _prompt_positions(tokens):
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t), (b, t))


def forward_logits(params, tokens, cfg: ModelConfig, rt: Runtime):
    """tokens [b, T] -> float32 logits [b, T, V] (causal, no cache)."""
    attend = _self_attention(None, cfg, rt)
    return forward(params, tokens, _prompt_positions(tokens), attend, (), cfg, rt)[0]


def prefill(params, tokens, lengths, cfg: ModelConfig, rt: Runtime, cache_dtype):
    """Right-padded prompts tokens [b, T], valid lengths [b] -> (last-token logits [b, V],
    a `KVCache` of exactly the prompt bucket, T positions, in its attention rows)."""
    attend = _self_attention(attention_rows(lengths, rt), cfg, rt)
    logits, kv = forward(params, tokens, _prompt_positions(tokens), attend, (), cfg, rt,
                         select=(lengths - 1)[:, None])
    cache = KVCache.from_prompt(tuple(k for k, _ in kv), tuple(v for _, v in kv), lengths,
                                quantized=jnp.dtype(cache_dtype) == jnp.int8, dtype=cache_dtype)
    return logits[:, 0], cache


def decode_step(params, tokens, cache: KVCache, cfg: ModelConfig, rt: Runtime):
    """One token per sequence, tokens [b], at positions cache.lengths -> (logits [b, V], cache
    holding the new token's K/V, lengths unchanged: the caller advances them)."""
    positions = attention_rows(cache.lengths, rt)  # [b_attn]

    def attend(q, k, v, layer, cache):
        cache = cache.write_token(layer, k[:, 0], v[:, 0], positions)
        sel = kv_heads_for_queries(cache.k[layer].shape[1], q.shape[2], cfg, rt)
        scales = {} if not cache.quantized else {"k_scale": sel(cache.k_scale[layer]),
                                                 "v_scale": sel(cache.v_scale[layer])}
        out = pallas_kernels.decode_attention(q[:, 0], sel(cache.k[layer]), sel(cache.v[layer]),
                                              positions + 1, backend=rt.attention_backend,
                                              **scales)  # [b_attn, n, H]
        return out[:, None], cache

    logits, cache = forward(params, tokens[:, None], cache.lengths[:, None], attend, cache, cfg,
                            rt)
    return logits[:, 0], cache
