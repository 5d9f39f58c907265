"""Building blocks of the decoder as pure functions: norms, RoPE, activations, projections."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig, RopeScaling
from pallas_kernels import QuantizedWeight, quantized_matmul


def project(spec: str, x: jax.Array, w, out_dtype=None) -> jax.Array:
    """The einsum `spec` of activations x and a weight w, a float array or a `QuantizedWeight`.

    Every projection goes through here, so a quantized model runs the same model code. For a
    `QuantizedWeight` the spec must contract x's trailing axes with w's leading axes and output x's
    other axes then w's other axes (e.g. "btnh,nhd->btd"); x is flattened to [M, Kc] and multiplied
    by `pallas_kernels.quantized_matmul` (platform kernel, XLA on CPU).
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
    if out_dtype is not None:
        x = x.astype(out_dtype)
    y = quantized_matmul(x.reshape(-1, w.contract_size), w.matrix(), backend="auto")
    return y.reshape(x.shape[:len(batch_axes)] + w.out_shape)


def norm(x: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + cfg.norm_eps)
    y = y * (p["scale"].astype(jnp.float32) + cfg.norm_scale_offset)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def activation(x: jax.Array, kind: str) -> jax.Array:
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {kind!r}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [H/2] of rotary embeddings, with Llama-3 scaling when given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_context / scaling.low_freq_factor
    high_wavelen = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotate x [B, T, heads, H] by positions [B, T] (half-split 'rotate_half' convention)."""
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def project_qkv(h: jax.Array, p: dict, positions: jax.Array, cfg: ModelConfig):
    """h [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H], RoPE applied to q and k."""
    q = project("btd,dnh->btnh", h, p["wq"])
    k = project("btd,dkh->btkh", h, p["wk"])
    v = project("btd,dkh->btkh", h, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    return apply_rope(q, positions, cfg), apply_rope(k, positions, cfg), v


def project_out(attn: jax.Array, p: dict) -> jax.Array:
    """attn [B, T, N, H] -> [B, T, D]."""
    return project("btnh,nhd->btd", attn, p["wo"])


def feed_forward(h: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """h [B, T, D] -> [B, T, D] through a gated (GLU) or plain two-layer FFN."""
    up = project("btd,df->btf", h, p["w_up"])  # [B, T, F]
    if cfg.gated_ffn:
        gate = project("btd,df->btf", h, p["w_gate"])
        hidden = activation(gate, cfg.activation) * up
    else:
        hidden = activation(up, cfg.activation)
    return project("btf,fd->btd", hidden, p["w_down"])


def embed(tokens: jax.Array, params: dict, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> [B, T, D]."""
    x = jnp.take(params["embed"], tokens, axis=0)
    if cfg.embed_scale:
        # Gemma multiplies by sqrt(d_model) rounded to the activation dtype.
        x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
    return x


def unembed(x: jax.Array, params: dict, cfg: ModelConfig) -> jax.Array:
    """x [B, T, D] -> float32 logits [B, T, V]."""
    x = norm(x, params["final_norm"], cfg)
    if cfg.tie_embeddings:
        return jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    return project("btd,dv->btv", x, params["unembed"], jnp.float32)
