"""Where arrays live under a `PhaseSharding`: parameters, KV cache and per-sequence arrays.

Weights are placed once, in the stored layout both phases share (`PhaseSharding.weights`);
`read_params` builds them shard by shard (each process reads only its devices' shards, once per
distinct shard). The KV cache and per-sequence arrays of a phase follow its ``cache`` and
``activations`` rules; `to_phase` moves them between phases (pope2022.md §6.4).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer import params as params_lib
from jaxinfer import quant
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import PhaseSharding, ShardingError


def param_specs(cfg: ModelConfig, qc: quant.QuantConfig | None,
                sh: PhaseSharding) -> params_lib.Params:
    """A `PartitionSpec` per parameter array (the parameter tree's structure); raises
    `ShardingError` naming the weight when a dim does not divide into its shards."""
    logical = quant.param_logical_axes(cfg, qc)
    shapes = (params_lib.abstract_params(cfg) if qc is None
              else quant.abstract_quantized_params(cfg, qc))
    flat_axes = jax.tree_util.tree_flatten_with_path(logical, is_leaf=params_lib.is_axes)[0]
    for (path, names), shape in zip(flat_axes, jax.tree.leaves(shapes)):
        sh.weights.check(shape.shape, names, sh.sizes, name=f"weight {jax.tree_util.keystr(path)}")
    _check_quantized_groups(cfg, qc, sh, logical, shapes)
    return jax.tree.map(sh.weights.spec, logical, is_leaf=params_lib.is_axes)


def _check_quantized_groups(cfg, qc, sh: PhaseSharding, logical, shapes) -> None:
    """A chip's rows of a grouped quantized weight must hold whole groups (its scales)."""
    if qc is None:
        return
    is_weight = lambda x: isinstance(x, quant.QuantizedWeight)
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_weight)[0]
    axes = jax.tree.leaves(logical, is_leaf=lambda x: is_weight(x) or params_lib.is_axes(x))
    for (path, w), names in zip(flat, axes):
        if not isinstance(w, quant.QuantizedWeight) or w.scale.shape[0] == 1:
            continue
        shards = sh.size(sh.weights.mesh_axes(names.data[0]))
        rows = w.contract_size // shards
        if rows % w.group_size:
            raise ShardingError(
                f"weight {jax.tree_util.keystr(path)}: int{w.bits} groups of {w.group_size} "
                f"rows do not split over {shards} shards of its {w.contract_size} contraction "
                f"rows ({rows} per chip); choose a group_size dividing {rows}")


def param_shardings(cfg: ModelConfig, qc: quant.QuantConfig | None, sh: PhaseSharding):
    """A `NamedSharding` per parameter array, in the stored layout."""
    return jax.tree.map(lambda spec: NamedSharding(sh.mesh, spec), param_specs(cfg, qc, sh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def place_params(params, cfg: ModelConfig, qc: quant.QuantConfig | None, sh: PhaseSharding):
    """Put every weight on the mesh in its stored sharding."""
    return jax.device_put(params, param_shardings(cfg, qc, sh))


def read_params(cfg: ModelConfig, dtype, sh: PhaseSharding, read_shard):
    """The float parameter tree built shard by shard: ``read_shard(path, index)`` returns the
    host array ``stacked_param[path][index]``, where layer weights are indexed as one stacked
    [layers, ...] array (path like ``("layers", "wq")``, as `jaxinfer.hf_weights` reads them);
    it is called only for the shards this process's devices hold, once per distinct shard."""
    abstract = params_lib.abstract_params(cfg, dtype)
    shardings = param_shardings(cfg, None, sh)

    def leaf(key_path, x, sharding):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
        if keys[0] == "layers":  # one layer: row `layer` of the stacked source
            path, layer = ("layers",) + keys[2:], keys[1]
            read = lambda index: read_shard(path, (slice(layer, layer + 1),) + index)[0]
        else:
            read = lambda index: read_shard(keys, index)
        done: dict[tuple, np.ndarray] = {}

        def callback(index):
            key = tuple(s.indices(n) for s, n in zip(index, x.shape))
            if key not in done:
                done[key] = read(tuple(slice(*k) for k in key))
            return done[key]

        return jax.make_array_from_callback(x.shape, sharding, callback)

    return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def cache_specs(cache: KVCache, sh: PhaseSharding) -> KVCache:
    """A KVCache of PartitionSpecs: buffers by the cache rules, lengths by the residual rows."""
    buffers = sh.cache_spec(2)
    scales = None if not cache.quantized else tuple(sh.cache_spec(1) for _ in cache.k)
    return KVCache(k=tuple(buffers for _ in cache.k), v=tuple(buffers for _ in cache.v),
                   lengths=sh.row_spec(), k_scale=scales, v_scale=scales)


def named(specs, sh: PhaseSharding):
    """PartitionSpecs -> NamedShardings on the phase's mesh (any tree)."""
    return jax.tree.map(lambda s: NamedSharding(sh.mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def host_array(value: np.ndarray, spec: PartitionSpec, sh: PhaseSharding) -> jax.Array:
    """A host array (the same on every process) placed on the mesh with `spec`."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, NamedSharding(sh.mesh, spec),
                                        lambda index: value[index])


def to_phase(tree, specs, sh: PhaseSharding):
    """Move arrays to the phase's shardings (a no-op for those already there)."""
    return jax.device_put(tree, named(specs, sh))
