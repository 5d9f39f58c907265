"""The decoder layers written per chip with the paper's collectives (`shard_map`), one per layout.

XLA's SPMD partitioner, given only sharding constraints, picks its own collectives (all-to-alls in
heads-sharded attention, weight all-gathers in weight-stationary layouts); the layouts of
pope2022.md §5-§6 are dataflows with named collectives, so each layer here is written explicitly:

- block input: all-gather(model axes) of the residual `B L E_xyz` (§5.1/§5.2 step 1);
- 2D: projections against `E_x` shards leave partial sums over x: reduce-scatter(x) into d_ff / the
  heads, all-gather(x) back before the output projections (§5.2 steps 3, 5; §6.2);
- block output: reduce-scatter(model axes) back into `E` (§5.2 step 7);
- batch-sharded attention: all-to-all(heads -> batch) of the queries and back (§6.2b); K/V of a
  multiquery/GQA model reduce-scattered over x into the batch;
- weight-gathered: every weight of the layer all-gathered over the gathered axes (§5.3).
Norm statistics of the 2D layout (d_model over x) are all-reduced over x; everything else is local.

`ShardedLayers` replaces the layer loop of `jaxinfer.model` through `Runtime.layers`; its shapes
are per chip: b (batch shard), e (d_model shard), n / k (query / KV heads per chip).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

import pallas_kernels
from jaxinfer import layers as layer_fns
from jaxinfer import params as params_lib
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from partitioning.layouts import Layout


def _pspec(*dims: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


def _index(axes: tuple[str, ...], sizes: dict[str, int]) -> jax.Array:
    """Linear index of this chip over `axes` (major first), 0 for no axes."""
    idx = jnp.int32(0)
    for a in axes:
        idx = idx * sizes[a] + jax.lax.axis_index(a)
    return idx


@dataclasses.dataclass(frozen=True)
class ShardedLayers:
    """A layout's decoder layer stack on a mesh (static: hashable, used inside jit)."""

    layout: Layout
    """The phase's resolved layout."""
    mesh: Mesh
    """Devices with axes x, y, z."""
    cfg: ModelConfig
    """The model."""
    attention_backend: str = "xla"
    """Attention kernels used per chip (`pallas_kernels`)."""

    # ---- specs -----------------------------------------------------------------------------
    def _weight_dims(self, stacked: bool) -> dict:
        """Mesh axes per dim of every layer weight (without the layers dim when not stacked)."""
        rules = self.layout.weight_rules()
        axes = params_lib.param_axes(self.cfg)["layers"]
        dims = jax.tree.map(lambda names: tuple(rules.mesh_axes(n) for n in names), axes,
                            is_leaf=_is_names)
        return dims if stacked else jax.tree.map(lambda d: d[1:], dims, is_leaf=_is_dims)

    def _layer_specs(self, layer_params):
        if isinstance(layer_params, list):
            one = jax.tree.map(lambda d: _pspec(*d), self._weight_dims(False), is_leaf=_is_dims)
            return [one] * len(layer_params)
        return jax.tree.map(lambda d: _pspec(*d), self._weight_dims(True), is_leaf=_is_dims)

    def _residual_spec(self) -> PartitionSpec:
        return _pspec(self.layout.res_batch, (), self.layout.res_embed)

    def _cache_specs(self, cache: KVCache) -> KVCache:
        lay = self.layout
        kv = _pspec((), lay.attn_batch, lay.kv_heads, (), ())
        scale = None if cache.k_scale is None else _pspec((), lay.attn_batch, lay.kv_heads, ())
        return KVCache(k=kv, v=kv, lengths=_pspec(lay.attn_batch), k_scale=scale, v_scale=scale)

    # ---- entry points (called by jaxinfer.model) -------------------------------------------
    def prefill(self, layer_params, x, positions, lengths, kv):
        """x [B, T, D], positions [B, T], lengths [B] or None, kv (k, v) [L, B, K, T, H] or None
        -> (x, kv) with each layer's keys/values stored."""
        _check_float(layer_params)
        lay = self.layout
        kv_spec = _pspec((), lay.attn_batch, lay.kv_heads, (), ())
        args = (layer_params, x, positions, lengths, kv)
        in_specs = (self._layer_specs(layer_params), self._residual_spec(),
                    _pspec(lay.res_batch, ()), None if lengths is None else _pspec(lay.attn_batch),
                    None if kv is None else (kv_spec, kv_spec))
        out_specs = (self._residual_spec(), None if kv is None else (kv_spec, kv_spec))

        def body(layer_params, x, positions, lengths, kv):
            def attend(q, k, v, layer, kv):
                return self._self_attention(q, k, v, lengths, layer, kv)
            return self._layers(layer_params, x, positions, attend, kv)

        return self._shard_map(body, in_specs, out_specs)(*args)

    def decode(self, layer_params, x, positions, cache: KVCache):
        """x [B, 1, D], positions [B, 1], cache -> (x, cache with the new token's K/V)."""
        _check_float(layer_params)
        lay = self.layout
        cache_specs = self._cache_specs(cache)
        in_specs = (self._layer_specs(layer_params), self._residual_spec(),
                    _pspec(lay.res_batch, ()), cache_specs)
        body = lambda p, x, pos, cache: self._layers(p, x, pos, self._cache_attention, cache)
        return self._shard_map(body, in_specs, (self._residual_spec(), cache_specs))(
            layer_params, x, positions, cache)

    def _shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    # ---- per-chip layer stack ----------------------------------------------------------------
    def _layers(self, layer_params, x, positions, attend, carry):
        if isinstance(layer_params, list):
            for i, p in enumerate(layer_params):
                x, carry = self._layer(self._gather_weights(p), x, positions, attend, carry, i)
            return x, carry

        def step(state, xs):
            x, carry = state
            p, i = xs
            return self._layer(self._gather_weights(p), x, positions, attend, carry, i), None

        (x, carry), _ = jax.lax.scan(step, (x, carry),
                                     (layer_params, jnp.arange(self.cfg.n_layers)))
        return x, carry

    def _gather_weights(self, p):
        """Weight-gathered layouts: all-gather each stored shard over the gathered axes (§5.3)."""
        lay = self.layout
        gathered = set(lay.live(lay.gathered))
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

        dims = self._weight_dims(False)
        return jax.tree.map(gather, p, dims)

    def _layer(self, p, x, positions, attend, carry, layer):
        """One block per chip: x [b, T, e] (residual shard) -> same."""
        cfg = self.cfg
        h = self._norm(self._gather_model(x), p["attn_norm"])  # [b, T, E/X]
        attn, carry = self._attention(h, p, positions, attend, carry, layer)
        if cfg.parallel_block:
            return x + self._scatter_model(attn + self._feed_forward(h, p)), carry
        x = x + self._scatter_model(attn)
        h = self._norm(self._gather_model(x), p["ffn_norm"])
        return x + self._scatter_model(self._feed_forward(h, p)), carry

    def _live(self, axes):
        return self.layout.live(axes)

    def _gather_model(self, x):  # [b, T, e] -> [b, T, E/X]: all-gather(model axes)
        axes = self._live(self.layout.model_axes)
        return jax.lax.all_gather(x, axes, axis=2, tiled=True) if axes else x

    def _scatter_model(self, y):  # [b, T, E/X] partial over model axes -> [b, T, e]
        axes = self._live(self.layout.model_axes)
        return jax.lax.psum_scatter(y, axes, scatter_dimension=2, tiled=True) if axes else y

    def _x_axes(self):
        return self._live(self.layout.x_axes)

    def _norm(self, h, p):
        """Norm over d_model; in 2D the statistics are all-reduced over x (d_model is split)."""
        cfg, xs = self.cfg, self._x_axes()
        if not xs:
            return layer_fns.norm(h, p, cfg)
        hf = h.astype(jnp.float32)
        if cfg.norm == "layer":
            hf = hf - jax.lax.psum(jnp.sum(hf, -1, keepdims=True), xs) / cfg.d_model
        var = jax.lax.psum(jnp.sum(jnp.square(hf), -1, keepdims=True), xs) / cfg.d_model
        y = hf * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * (p["scale"].astype(jnp.float32) + cfg.norm_scale_offset)
        if "bias" in p:
            y = y + p["bias"].astype(jnp.float32)
        return y.astype(h.dtype)

    def _first_x(self, dtype):
        """1 on the chips of x index 0, else 0: a bias is added once before an x reduction."""
        xs = self._x_axes()
        return jnp.asarray(1, dtype) if not xs else \
            (_index(xs, self.layout.mesh.as_dict()) == 0).astype(dtype)

    def _feed_forward(self, h, p):
        """h [b, T, E/X] -> [b, T, E/X] partial over the model axes (§5.2 steps 2-6)."""
        xs = self._x_axes()
        up = layer_fns.project("btd,df->btf", h, p["w_up"])  # [b, T, F/M] partial over x
        gate = layer_fns.project("btd,df->btf", h, p["w_gate"]) if self.cfg.gated_ffn else None
        if xs:
            pre = up if gate is None else jnp.stack([gate, up])
            pre = jax.lax.psum_scatter(pre, xs, scatter_dimension=pre.ndim - 1, tiled=True)
            gate, up = (None, pre) if gate is None else (pre[0], pre[1])
        act = layer_fns.activation(up if gate is None else gate, self.cfg.activation)
        hidden = act if gate is None else act * up
        if xs:
            hidden = jax.lax.all_gather(hidden, xs, axis=2, tiled=True)  # [b, T, F/M]
        return layer_fns.project("btf,fd->btd", hidden, p["w_down"])

    # ---- attention (§6.2) ----------------------------------------------------------------------
    def _attention(self, h, p, positions, attend, carry, layer):
        cfg, lay, xs = self.cfg, self.layout, self._x_axes()
        one = self._first_x(h.dtype)
        q = layer_fns.project("btd,dnh->btnh", h, p["wq"])  # [b, T, N/M, H] partial over x
        k = layer_fns.project("btd,dkh->btkh", h, p["wk"])  # [b, T, K/Mk, H] partial over x
        v = layer_fns.project("btd,dkh->btkh", h, p["wv"])
        if cfg.qkv_bias:
            q, k, v = q + one * p["bq"], k + one * p["bk"], v + one * p["bv"]
        q = layer_fns.apply_rope(q, positions, cfg)  # linear: fine on partial sums
        k = layer_fns.apply_rope(k, positions, cfg)
        if xs:
            q = jax.lax.psum_scatter(q, xs, scatter_dimension=2, tiled=True)  # [b, T, n, H]
        qa = self._live(lay.q_heads)
        if lay.attention == "batch":
            k, v = self._kv_to_batch(k, xs), self._kv_to_batch(v, xs)
            if qa:
                q = jax.lax.all_to_all(q, qa, 0, 2, tiled=True)  # heads -> batch
        elif xs and self._live(lay.kv_heads) == self._live(lay.q_heads):
            k = jax.lax.psum_scatter(k, xs, scatter_dimension=2, tiled=True)
            v = jax.lax.psum_scatter(v, xs, scatter_dimension=2, tiled=True)
        elif xs:
            k, v = jax.lax.psum(k, xs), jax.lax.psum(v, xs)
        out, carry = attend(q, k, v, layer, carry)  # [b_attn, T, n_attn, H]
        if lay.attention == "batch" and qa:
            out = jax.lax.all_to_all(out, qa, 2, 0, tiled=True)  # batch -> heads
        if xs:
            out = jax.lax.all_gather(out, xs, axis=2, tiled=True)  # [b, T, N/M, H]
        return layer_fns.project("btnh,nhd->btd", out, p["wo"]), carry

    def _kv_to_batch(self, k, xs):
        """K/V [b, T, K, H] (partial over x) -> this chip's attention batch rows (§6.2b, §6.5)."""
        lay = self.layout
        sizes = lay.mesh.as_dict()
        inner = self._live(lay.model_axes)
        m = lay.size(inner)
        if xs:  # rows ordered (model axes, x): reduce-scatter over x, then keep our model block
            b = k.shape[0]
            k = k.reshape((m, lay.size(xs), b // (m * lay.size(xs))) + k.shape[1:])
            k = jax.lax.psum_scatter(k, xs, scatter_dimension=1, tiled=True)[:, 0]
            return jnp.take(k, _index(inner, sizes), axis=0)
        rows = k.shape[0] // m
        return jax.lax.dynamic_slice_in_dim(k, _index(inner, sizes) * rows, rows, axis=0)

    def _kv_for_queries(self, k_local: int, n_local: int):
        """Selector of the KV heads (axis 1 of [b, k_local, ...]) the n_local query heads read."""
        lay = self.layout
        if lay.attention == "batch":
            return lambda t: t
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        sizes = lay.mesh.as_dict()
        need = max(n_local // group, 1)
        if need == k_local:
            return lambda t: t
        offset = ((_index(lay.q_heads, sizes) * n_local) // group
                  - _index(lay.kv_heads, sizes) * k_local)
        return lambda t: jax.lax.dynamic_slice_in_dim(t, offset, need, axis=1)

    def _self_attention(self, q, k, v, lengths, layer, kv):
        """Prefill: q [b, T, n, H], k, v [b, T, k, H] -> out [b, T, n, H]; stores k, v."""
        heads_major = lambda t: jnp.swapaxes(t, 1, 2)
        kh, vh = heads_major(k), heads_major(v)  # [b, k, T, H]
        sel = self._kv_for_queries(kh.shape[1], q.shape[2])
        out = pallas_kernels.flash_attention(heads_major(q), sel(kh), sel(vh), causal=True,
                                             lengths=lengths, backend=self.attention_backend)
        if kv is not None:
            kv = (kv[0].at[layer].set(kh.astype(kv[0].dtype)),
                  kv[1].at[layer].set(vh.astype(kv[1].dtype)))
        return heads_major(out), kv

    def _cache_attention(self, q, k, v, layer, cache: KVCache):
        """Decode: q [b, 1, n, H], k, v [b, 1, k, H]; writes the token, attends over the cache."""
        cache = cache.write_token(layer, k[:, 0], v[:, 0])
        sel = self._kv_for_queries(cache.k.shape[2], q.shape[2])
        scales = {} if cache.k_scale is None else {"k_scale": sel(cache.k_scale[layer]),
                                                   "v_scale": sel(cache.v_scale[layer])}
        out = pallas_kernels.decode_attention(q[:, 0], sel(cache.k[layer]), sel(cache.v[layer]),
                                              cache.lengths + 1, backend=self.attention_backend,
                                              **scales)
        return out[:, None], cache


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _is_dims(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, tuple) for a in x)


def _check_float(layer_params: Any) -> None:
    def quantized(t) -> bool:
        return isinstance(t, pallas_kernels.QuantizedWeight)

    if any(quantized(leaf) for leaf in jax.tree.leaves(layer_params, is_leaf=quantized)):
        raise ValueError("the explicit partitioned layers need float weights; quantized weights "
                         "run sharded only without a plan's layer (use plan=None)")
