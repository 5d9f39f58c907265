"""Each weight declared once: shape, logical axes and initializer. Everything else derives from it.

`param_specs(config)` is the single declaration. From it come abstract shapes (`abstract_params`),
random initialisation (`init_params`), the logical axes that partitioning maps onto a mesh
(`param_axes`) and the checks that loaded checkpoints have the right shapes (`check_params`).

Layer weights are stacked along a leading ``layers`` axis so the decoder runs as one `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import axes as ax
from jaxinfer.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Declaration of one weight."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"
    """'normal' (std 1/sqrt(fan_in)), 'ones' or 'zeros'."""
    fan_in: int = 1
    """Input width used to scale 'normal' initialisation."""
    contract: int = 0
    """Axes (after a leading ``layers`` axis) a projection contracts over; 0: not a projection
    (never quantized). See `jaxinfer.quant`."""

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")

    def initialize(self, key: jax.Array, dtype) -> jax.Array:
        if self.init == "ones":
            return jnp.ones(self.shape, dtype)
        if self.init == "zeros":
            return jnp.zeros(self.shape, dtype)
        std = 1.0 / math.sqrt(self.fan_in)
        return (std * jax.random.normal(key, self.shape, jnp.float32)).astype(dtype)


def _norm_specs(cfg: ModelConfig, leading: tuple[int, ...], leading_axes: tuple[str, ...]):
    # With Gemma's (1 + w) convention the neutral scale is 0, so initialise at zero.
    scale_init = "zeros" if cfg.norm_scale_offset else "ones"
    specs = {"scale": ParamSpec(leading + (cfg.d_model,), leading_axes + (ax.EMBED,), scale_init)}
    if cfg.norm == "layer":
        specs["bias"] = ParamSpec(leading + (cfg.d_model,), leading_axes + (ax.EMBED,), "zeros")
    return specs


def _attention_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    L, D, N, K, H = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    specs = {
        "wq": ParamSpec((L, D, N, H), (ax.LAYERS, ax.EMBED, ax.Q_HEADS, ax.HEAD_DIM), fan_in=D,
                        contract=1),
        "wk": ParamSpec((L, D, K, H), (ax.LAYERS, ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), fan_in=D,
                        contract=1),
        "wv": ParamSpec((L, D, K, H), (ax.LAYERS, ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), fan_in=D,
                        contract=1),
        "wo": ParamSpec((L, N, H, D), (ax.LAYERS, ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED), fan_in=N * H,
                        contract=2),
    }
    if cfg.qkv_bias:
        specs["bq"] = ParamSpec((L, N, H), (ax.LAYERS, ax.Q_HEADS, ax.HEAD_DIM), "zeros")
        specs["bk"] = ParamSpec((L, K, H), (ax.LAYERS, ax.KV_HEADS, ax.HEAD_DIM), "zeros")
        specs["bv"] = ParamSpec((L, K, H), (ax.LAYERS, ax.KV_HEADS, ax.HEAD_DIM), "zeros")
    return specs


def _ffn_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    specs = {
        "w_up": ParamSpec((L, D, F), (ax.LAYERS, ax.EMBED, ax.MLP), fan_in=D, contract=1),
        "w_down": ParamSpec((L, F, D), (ax.LAYERS, ax.MLP, ax.EMBED), fan_in=F, contract=1),
    }
    if cfg.gated_ffn:
        specs["w_gate"] = ParamSpec((L, D, F), (ax.LAYERS, ax.EMBED, ax.MLP), fan_in=D,
                                     contract=1)
    return specs


def param_specs(cfg: ModelConfig) -> Params:
    """The declaration of every weight of `cfg`, as a nested dict of `ParamSpec`."""
    layer_lead, layer_axes = (cfg.n_layers,), (ax.LAYERS,)
    layers = {"attn_norm": _norm_specs(cfg, layer_lead, layer_axes),
              **_attention_specs(cfg), **_ffn_specs(cfg)}
    if not cfg.parallel_block:
        layers["ffn_norm"] = _norm_specs(cfg, layer_lead, layer_axes)
    specs = {
        "embed": ParamSpec((cfg.vocab_size, cfg.d_model), (ax.VOCAB, ax.EMBED), fan_in=1),
        "layers": layers,
        "final_norm": _norm_specs(cfg, (), ()),
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((cfg.d_model, cfg.vocab_size), (ax.EMBED, ax.VOCAB),
                                     fan_in=cfg.d_model, contract=1)
    return specs


def quantized_axes(spec: ParamSpec) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of a quantized projection's (data, scale), so it shards like its float twin.

    The contraction axes are flattened into one, named after the first of them (its row blocks are
    the float twin's shards along that axis); the scales' group axis is never sharded (None); any
    ``layers`` axis and the output axes keep their names.
    """
    if not spec.contract:
        raise ValueError(f"a weight with axes {spec.axes} is not a projection; it is not quantized")
    lead = 1 if spec.axes[0] == ax.LAYERS else 0
    head, contract, out = spec.axes[:lead], spec.axes[lead:lead + spec.contract], \
        spec.axes[lead + spec.contract:]
    return head + (contract[0],) + out, head + (None,) + out


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], cfg: ModelConfig) -> Params:
    return jax.tree.map(fn, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> Params:
    """`jax.ShapeDtypeStruct` for every weight."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), cfg)


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every weight (same tree structure as the parameters)."""
    return map_specs(lambda s: s.axes, cfg)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights following each declaration's initializer."""
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    return jax.tree.unflatten(treedef, [s.initialize(k, dtype) for s, k in zip(specs, keys)])


def check_params(cfg: ModelConfig, params: Params) -> None:
    """Raise if `params` does not have exactly the declared tree and shapes."""
    expected = abstract_params(cfg)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    missing = set(flat_expected) - set(flat_got)
    extra = set(flat_got) - set(flat_expected)
    if missing or extra:
        def names(paths):
            return ", ".join(sorted(jax.tree_util.keystr(p) for p in paths))
        raise ValueError(f"parameter tree mismatch: missing [{names(missing)}], "
                         f"unexpected [{names(extra)}]")
    for path, want in flat_expected.items():
        got_shape = tuple(np.shape(flat_got[path]))
        if got_shape != want.shape:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {got_shape}, "
                             f"expected {want.shape}")


def param_bytes(params: Params) -> int:
    """Bytes held by all parameter arrays (quantized leaves count their own storage)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def unstack_layers(params: Params) -> Params:
    """Stacked layer weights [L, ...] -> ``params["layers"]`` as a list of L per-layer trees.

    The unrolled layout gives every layer its own buffers, so a decode step reads each weight once
    in place; slicing a stacked weight inside a layer scan copies it first on XLA:CPU.
    """
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    leaves, treedef = jax.tree.flatten(layers)
    per_leaf = []
    for i in range(len(leaves)):
        per_leaf.append(list(leaves[i]))  # L arrays of the leaf's per-layer shape
        leaves[i] = None  # drop the stacked copy as soon as it is split
    n_layers = len(per_leaf[0])
    per_layer = [jax.tree.unflatten(treedef, [leaf[l] for leaf in per_leaf]) for l in range(n_layers)]
    return {**params, "layers": per_layer}


def stack_layers(params: Params) -> Params:
    """Inverse of `unstack_layers`: the canonical stacked layout (checkpoints, `param_specs`)."""
    layers = params["layers"]
    if not isinstance(layers, list):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
