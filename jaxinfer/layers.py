"""Building blocks of the decoder as pure functions: projections, norms, RoPE, activations.

They are shape-agnostic: `jaxinfer.model` calls them on each chip's local shards."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinfer import rope
from jaxinfer.config import ModelConfig
from pallas_kernels import QuantizedWeight, quantized_matmul
from pallas_kernels._dispatch import resolve_attention_backend


def project(spec: str, x: jax.Array, w, out_dtype=None, backend: str = "auto") -> jax.Array:
    """The einsum `spec` of activations x and a weight w, a float array or a `QuantizedWeight`.

    Every projection goes through here, so a quantized model runs the same model code. For a
    `QuantizedWeight` the spec must contract x's trailing axes with w's leading axes and output x's
    other axes then w's other axes (e.g. "btnh,nhd->btd"); x is flattened to [M, Kc] and multiplied
    by `pallas_kernels.quantized_matmul` with `backend` (as the attention backends: "auto",
    "xla", "tpu", "gpu", or "tpu-interpret" / "gpu-interpret").
    """
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n_contract = sum(a in x_axes for a in w_axes)
    batch_axes = x_axes[:len(x_axes) - n_contract]
    is_projection = (x_axes[len(batch_axes):] == w_axes[:n_contract]
                     and out == batch_axes + w_axes[n_contract:])
    if not isinstance(w, QuantizedWeight):
        if not is_projection:
            return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
        # One [M, Kc] x [Kc, Nout] matmul over flattened (bitcast) operands: multi-axis einsums
        # such as "btnh,nhd->btd" otherwise make XLA:CPU copy a transposed weight every call.
        contract = math.prod(w.shape[:n_contract])
        y = jnp.dot(x.reshape(-1, contract), w.reshape(contract, -1),
                    preferred_element_type=out_dtype)
        return y.reshape(x.shape[:len(batch_axes)] + w.shape[n_contract:])
    if not is_projection:
        raise ValueError(f"einsum {spec!r} is not a projection a quantized weight supports")
    if w.scale.shape[0] == 1:  # one (per-channel) group: spans this chip's rows, however many
        w = w.replace(group_size=w.contract_size)
    if out_dtype is not None:
        x = x.astype(out_dtype)
    kernel, interpret = resolve_attention_backend(backend, False)
    y = quantized_matmul(x.reshape(-1, w.contract_size), w.matrix(),
                         backend="auto" if backend == "auto" else kernel, interpret=interpret)
    return y.reshape(x.shape[:len(batch_axes)] + w.out_shape)


def scale_normed(y: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """The normalized float32 activations y times the norm's scale (plus its bias)."""
    y = y * (p["scale"].astype(jnp.float32) + cfg.norm_scale_offset)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y


def norm(x: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    return scale_normed(xf * jax.lax.rsqrt(var + cfg.norm_eps), p, cfg).astype(x.dtype)


def activation(x: jax.Array, kind: str) -> jax.Array:
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {kind!r}")


Rope = tuple[jax.Array, jax.Array]


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> Rope:
    """cos and sin [B, T, 1, H/2] of positions [B, T]: computed once per step, used by every
    layer's queries and keys (`jaxinfer.rope` gives the frequencies and HF's attention factor)."""
    inv_freq = jnp.asarray(rope.inv_freq(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    factor = rope.attention_factor(cfg)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, tables: Rope) -> jax.Array:
    """Rotate x [B, T, heads, H] by `rope_tables` (half-split 'rotate_half' convention)."""
    cos, sin = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def scale_embedding(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Gemma multiplies embeddings by sqrt(d_model) rounded to the activation dtype."""
    return x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype) if cfg.embed_scale else x
