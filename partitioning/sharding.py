"""Placing a model on a mesh under a `Plan`: parameters, KV cache and activation constraints.

`Placement` is what execution needs from a plan (pope2022.md §5.3, §6.4):
  - weights are placed once, in the plan's storage layout (`layouts.storage_of`): ``2d-ws`` and
    every ``wg-*`` layout store the same ``E_x F_yz`` shards, so a weight-gathered prefill followed
    by a 2D weight-stationary decode moves no weights (``1d-ws`` stores ``E F_xyz``, pairs only
    with itself);
  - each phase runs with its own activation constraints (`Runtime.constrain` /
    `Runtime.constrain_attention`) and its own KV-cache sharding;
  - `reshard_cache` moves the cache from the prefill attention sharding to the decode one when
    they differ (e.g. heads-sharded prefill, batch-sharded multiquery decode, §6.4).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer import axes as ax
from jaxinfer import model as model_lib
from jaxinfer import params as params_lib
from jaxinfer import quant
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from partitioning.layouts import Layout, resolve, storage_of
from partitioning.plan import PHASES, Plan
from partitioning.rules import ShardingRules


@dataclasses.dataclass(frozen=True)
class Constraint:
    """`Runtime.constrain` hook: `with_sharding_constraint` by logical axes (hashable, static)."""

    rules: ShardingRules
    """Logical -> mesh axes."""
    mesh: jax.sharding.Mesh
    """The mesh the constraints refer to."""

    def __call__(self, x: jax.Array, names: tuple[str, ...]) -> jax.Array:
        if x.ndim != len(names):
            raise ValueError(f"constraint {names} given a tensor of rank {x.ndim}")
        return jax.lax.with_sharding_constraint(x, self.rules.named(self.mesh, names))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A plan bound to a model and a device mesh."""

    plan: Plan
    """Layouts per phase."""
    cfg: ModelConfig
    """The model (its dims are checked against every rule)."""
    mesh: jax.sharding.Mesh
    """Devices with axes ('x', 'y', 'z') sized as the plan's mesh."""
    explicit: bool = False
    """True: run the layers per chip with the paper's collectives written out
    (`partitioning.collective_layer`, float weights only); False: sharding constraints only, XLA's
    SPMD partitioner picks the collectives."""

    def __post_init__(self):
        got = tuple(int(self.mesh.shape[a]) for a in ("x", "y", "z")) \
            if set(self.mesh.axis_names) == {"x", "y", "z"} else None
        if got != self.plan.decode.mesh.sizes:
            raise ValueError(f"mesh {dict(self.mesh.shape)} does not match the plan's mesh "
                             f"{self.plan.decode.mesh} (axes x, y, z)")
        for phase in PHASES:
            self.layout(phase).check(self.cfg)  # fail now on non-divisible dims

    def layout(self, phase: str) -> Layout:
        """The resolved layout of `phase` (both phases share the weight storage, §5.3)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        storage = storage_of((self.plan.prefill.layout, self.plan.decode.layout))
        return resolve(getattr(self.plan, phase), self.cfg, storage)

    def rules(self, phase: str) -> ShardingRules:
        """Activation rules of `phase` (its `.attention` holds the attention / KV-cache side)."""
        return self.layout(phase).activation_rules()

    @property
    def batch_multiple(self) -> int:
        """Batch sizes must be multiples of this (the most ways either phase splits the batch)."""
        return max(self.layout(p).size(axes) for p in PHASES
                   for axes in (self.layout(p).res_batch, self.layout(p).attn_batch))

    def runtime(self, phase: str, base: model_lib.Runtime) -> model_lib.Runtime:
        """`base` with this phase's activation and attention constraints."""
        rules = self.rules(phase)
        layers = None
        if self.explicit:
            from partitioning.collective_layer import ShardedLayers
            layers = ShardedLayers(self.layout(phase), self.mesh, self.cfg,
                                   base.attention_backend)
        return dataclasses.replace(base, constrain=Constraint(rules, self.mesh),
                                   constrain_attention=Constraint(rules.attention, self.mesh),
                                   layers=layers)

    def param_shardings(self, params, quantization: quant.QuantConfig | None = None):
        """NamedSharding per parameter leaf (same tree as `params`), in the stored layout: the
        weights stay put between phases (§5.3). Raises if a weight does not divide by its shards."""
        rules = self.layout("decode").weight_rules()
        flat, treedef = jax.tree.flatten(params)
        flat_axes = _param_axes(self.cfg, params, quantization)
        if len(flat) != len(flat_axes):
            raise ValueError(f"parameter tree has {len(flat)} arrays, its logical axes "
                             f"{len(flat_axes)}")
        for x, names in zip(flat, flat_axes):
            rules.check(x.shape, names, self.mesh, name=f"weight {names}")
        return jax.tree.unflatten(treedef, [rules.named(self.mesh, n) for n in flat_axes])

    def place_params(self, params, quantization: quant.QuantConfig | None = None):
        """Put every weight on the mesh in its stored (decode-rules) sharding, with the layers
        stacked or unrolled as `params` has them."""
        return jax.device_put(params, self.param_shardings(params, quantization))

    def restructure_params(self, params, fn, quantization: quant.QuantConfig | None = None):
        """`fn(params)` (e.g. `params.unstack_layers`) computed on the mesh, the result in its
        stored sharding: arrays that span several processes are never gathered to a host."""
        target = jax.eval_shape(fn, params)
        if jax.tree.structure(target) == jax.tree.structure(params):  # nothing to restructure
            return self.place_params(params, quantization)
        return jax.jit(fn, out_shardings=self.param_shardings(target, quantization))(params)

    def read_params(self, abstract, read_shard):
        """Build the float parameter tree `abstract` (stacked or unrolled layers) shard by shard:
        ``read_shard(path, index)`` returns the host array ``stacked_param[path][index]`` (path
        like ``("layers", "wq")``; layer weights index the stacked [layers, ...] array), called
        only for the shards this process's devices hold, once per distinct shard."""
        shardings = self.param_shardings(abstract)

        def leaf(key_path, x, sharding):
            keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
            if keys[0] == "layers" and isinstance(keys[1], int):  # unrolled: one layer
                path, layer = ("layers",) + keys[2:], keys[1]
                read = lambda index: read_shard(path, (slice(layer, layer + 1),) + index)[0]
            else:
                read = lambda index: read_shard(keys, index)
            cache: dict[tuple, object] = {}

            def callback(index):
                key = tuple(s.indices(n) for s, n in zip(index, x.shape))
                if key not in cache:
                    cache[key] = read(tuple(slice(*k) for k in key))
                return cache[key]

            return jax.make_array_from_callback(x.shape, sharding, callback)

        return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)

    def cache_shardings(self, phase: str, cache: KVCache) -> KVCache:
        """A KVCache of NamedShardings for `phase` (attention rules: heads or batch)."""
        rules = self.rules(phase).attention

        def named(x, names):
            return None if x is None else rules.named(self.mesh, names)

        return KVCache(k=named(cache.k, ax.KV_CACHE), v=named(cache.v, ax.KV_CACHE),
                       lengths=named(cache.lengths, (ax.BATCH,)),
                       k_scale=named(cache.k_scale, ax.KV_CACHE[:-1]),
                       v_scale=named(cache.v_scale, ax.KV_CACHE[:-1]))

    def prefill_out_shardings(self, cache: KVCache) -> tuple:
        """Out shardings of `model.prefill`: (replicated last-token logits, prefill's cache)."""
        return (NamedSharding(self.mesh, PartitionSpec()), self.cache_shardings("prefill", cache))

    def reshard_cache(self, cache: KVCache, phase: str) -> KVCache:
        """Move the cache to `phase`'s sharding (a no-op when it already has it)."""
        return jax.device_put(cache, self.cache_shardings(phase, cache))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def _param_axes(cfg: ModelConfig, params, quantization) -> list[tuple[str | None, ...]]:
    """Logical axes of every leaf of `params` (float or quantized, stacked or unrolled layers),
    in `jax.tree.leaves(params)` order."""
    axes = (params_lib.param_axes(cfg) if quantization is None
            else quant.quantized_param_axes(cfg, quantization))
    if isinstance(params["layers"], list):
        per_layer = jax.tree.map(lambda names: names[1:], axes["layers"], is_leaf=_is_axes)
        axes = {**axes, "layers": [per_layer] * len(params["layers"])}
    return jax.tree.leaves(axes, is_leaf=_is_axes)
