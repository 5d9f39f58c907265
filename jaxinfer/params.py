"""Each weight declared once: shape, logical axes and initializer. Everything else derives from it.

`param_specs(config)` is the single declaration. From it come abstract shapes (`abstract_params`),
random initialisation (`init_params`), the logical axes that partitioning maps onto a mesh
(`param_axes`) and the checks that loaded checkpoints have the right shapes (`check_params`).

Layers are a list of per-layer weight dicts: every layer's weights are their own buffers, read in
place by the (unrolled) layer loop; the KV cache is split per layer the same way
(`jaxinfer.cache`).
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
    """Leading axes a projection contracts over; 0: not a projection
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


def _norm_specs(cfg: ModelConfig):
    # With Gemma's (1 + w) convention the neutral scale is 0, so initialise at zero.
    scale_init = "zeros" if cfg.norm_scale_offset else "ones"
    specs = {"scale": ParamSpec((cfg.d_model,), (ax.EMBED,), scale_init)}
    if cfg.norm == "layer":
        specs["bias"] = ParamSpec((cfg.d_model,), (ax.EMBED,), "zeros")
    return specs


def _attention_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    specs = {
        "wq": ParamSpec((D, N, H), (ax.EMBED, ax.Q_HEADS, ax.HEAD_DIM), fan_in=D, contract=1),
        "wk": ParamSpec((D, K, H), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), fan_in=D, contract=1),
        "wv": ParamSpec((D, K, H), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), fan_in=D, contract=1),
        "wo": ParamSpec((N, H, D), (ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED), fan_in=N * H, contract=2),
    }
    if cfg.qkv_bias:
        specs["bq"] = ParamSpec((N, H), (ax.Q_HEADS, ax.HEAD_DIM), "zeros")
        specs["bk"] = ParamSpec((K, H), (ax.KV_HEADS, ax.HEAD_DIM), "zeros")
        specs["bv"] = ParamSpec((K, H), (ax.KV_HEADS, ax.HEAD_DIM), "zeros")
    return specs


def _ffn_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    D, F = cfg.d_model, cfg.d_ff
    specs = {
        "w_up": ParamSpec((D, F), (ax.EMBED, ax.MLP), fan_in=D, contract=1),
        "w_down": ParamSpec((F, D), (ax.MLP, ax.EMBED), fan_in=F, contract=1),
    }
    if cfg.gated_ffn:
        specs["w_gate"] = ParamSpec((D, F), (ax.EMBED, ax.MLP), fan_in=D, contract=1)
    return specs


def layer_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The declaration of one decoder layer's weights."""
    layer = {"attn_norm": _norm_specs(cfg), **_attention_specs(cfg), **_ffn_specs(cfg)}
    if not cfg.parallel_block:
        layer["ffn_norm"] = _norm_specs(cfg)
    return layer


def param_specs(cfg: ModelConfig) -> Params:
    """The declaration of every weight of `cfg`, as a nested dict of `ParamSpec`; ``layers`` is
    a list of `n_layers` per-layer dicts (each layer's weights are separate buffers)."""
    specs = {
        "embed": ParamSpec((cfg.vocab_size, cfg.d_model), (ax.VOCAB, ax.EMBED), fan_in=1),
        "layers": [layer_specs(cfg) for _ in range(cfg.n_layers)],
        "final_norm": _norm_specs(cfg),
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((cfg.d_model, cfg.vocab_size), (ax.EMBED, ax.VOCAB),
                                     fan_in=cfg.d_model, contract=1)
    return specs


def quantized_axes(spec: ParamSpec, grouped: bool
                   ) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of a quantized projection's (data, scale), so it shards like its float twin.

    The contraction axes are flattened into one, named after the first of them (its row blocks are
    the float twin's shards along that axis); the output axes keep their names. The scales' group
    axis shards like the contraction when there are several groups (`grouped`: each chip keeps
    the scales of its rows), and is replicated for a single (per-channel) group.
    """
    if not spec.contract:
        raise ValueError(f"a weight with axes {spec.axes} is not a projection; it is not quantized")
    contract, out = spec.axes[:spec.contract], spec.axes[spec.contract:]
    return (contract[0],) + out, ((contract[0] if grouped else None),) + out


def is_axes(x) -> bool:
    """Whether x is one leaf of a logical-axes tree: a tuple of axis names (None = unnamed)."""
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


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
