"""Weight-only quantization: the `QuantizedWeight` pytree, `quantize_weights` and the jnp twins.

Layout. A float weight W [*C, *O] that a projection contracts over its leading axes C (e.g. the
model's ``wq`` [D, N, H] contracts D; ``wo`` [N, H, D] contracts N, H) is stored with its
contraction axes flattened into one axis of Kc = prod(C) rows and its output axes O kept as they
are, so the output axes keep their logical names and shard like the float twin:

- int8: ``data`` int8 [Kc, *O], symmetric, one scale per output channel (or per group of rows when
  ``group_size`` is given); ``scale`` float32 [Kc // G, *O].
- int4: ``data`` int8 [Kc // 2, *O], two values per byte, group-wise scales ``scale`` [Kc // G, *O].
  Inside group g (rows [gG, gG + G)), packed row g·G/2 + r holds row gG + r in its low nibble and
  row gG + G/2 + r in its high nibble, so a group is two contiguous half-groups of rows and a kernel
  unpacks one group with two shifts, whatever the number of groups (odd counts included).

`quantized_matmul_ref` is the XLA path (the CPU backend). Weight-only dequantize-then-dot is three
times slower than a float dot on XLA:CPU (the dequantized weight is materialized), while its int8 x
int8 -> int32 dot is faster than the float one. So the reference splits the activations into two
int8 limbs per row (x = s·(hi + lo/254), error <= max|x| / 64516, i.e. finer than bfloat16) and runs
one integer dot over both limbs: the result equals "dequantize, then dot" to ~1e-5 relative.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

BITS = (8, 4)
DEFAULT_INT4_GROUP = 128
_QMAX = {8: 127, 4: 7}
_LIMB = 254  # second activation limb: residual in [-0.5, 0.5] scaled into [-127, 127]
_MAX_INT_DOT_ROWS = (2**31 - 1) // (127 * 127)  # int32 accumulation never overflows below this


@flax.struct.dataclass
class QuantizedWeight:
    """A weight W [Kc, *O] (contraction rows first) stored as integers plus float32 scales."""

    data: jax.Array
    """int8 [Kc, *O] (bits=8) or int8 [Kc // 2, *O] holding two int4 values per byte (bits=4)."""
    scale: jax.Array
    """float32 [Kc // group_size, *O]: W[row] = data[row] * scale[row // group_size]."""
    bits: int = flax.struct.field(pytree_node=False)
    """8 or 4."""
    group_size: int = flax.struct.field(pytree_node=False)
    """Contraction rows sharing one scale (Kc for per-output-channel int8)."""

    @property
    def contract_size(self) -> int:
        """Kc, the number of contraction rows of the float weight."""
        return self.data.shape[0] * (8 // self.bits)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def matrix(self) -> "QuantizedWeight":
        """The same weight as a matrix: data [Kc(/2), prod(O)], scale [groups, prod(O)]."""
        n = math.prod(self.out_shape)
        return self.replace(data=self.data.reshape(self.data.shape[0], n),
                            scale=self.scale.reshape(self.scale.shape[0], n))


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def resolve_group_size(bits: int, group_size: int | None, contract: int) -> int:
    """Rows per scale. None: per output channel for int8; for int4 DEFAULT_INT4_GROUP, or when that
    does not divide Kc the largest even divisor of Kc below it (e.g. 96 for Kc = 192).

    A group never exceeds the contraction (a larger request is capped at Kc); a requested group
    must divide Kc (and be even for int4).
    """
    check_bits(bits)
    if group_size is None and bits == 4:
        group_size = next((g for g in range(min(DEFAULT_INT4_GROUP, contract), 1, -1)
                           if contract % g == 0 and g % 2 == 0), None)
        if group_size is None:
            raise ValueError(f"int4 needs an even group size dividing the contraction dimension "
                             f"{contract}; there is none")
    if group_size is None:
        group_size = contract
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    group_size = min(group_size, contract)
    if contract % group_size:
        raise ValueError(f"group_size {group_size} does not divide the contraction dimension "
                         f"{contract}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"int4 packs two rows per byte: group_size must be even, got {group_size}")
    return group_size


def quantize_weights(w: jax.Array, *, bits: int = 8, group_size: int | None = None,
                     contract_ndim: int = 1) -> QuantizedWeight:
    """Symmetric quantization of W [*C, *O] over its first `contract_ndim` (contraction) axes."""
    if isinstance(w, QuantizedWeight):
        raise ValueError("weight is already quantized")
    check_bits(bits)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"only float weights can be quantized, got {w.dtype}")
    if not 1 <= contract_ndim < w.ndim:
        raise ValueError(f"contract_ndim must be in [1, {w.ndim - 1}] for a weight of shape "
                         f"{w.shape}, got {contract_ndim}")
    out_shape = w.shape[contract_ndim:]
    contract = math.prod(w.shape[:contract_ndim])
    group = resolve_group_size(bits, group_size, contract)
    groups = contract // group
    wg = w.astype(jnp.float32).reshape((groups, group) + out_shape)
    scale = jnp.max(jnp.abs(wg), axis=1) / _QMAX[bits]  # [groups, *O]
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(wg / safe[:, None]), -_QMAX[bits], _QMAX[bits]).astype(jnp.int32)
    if bits == 8:
        data = q.reshape((contract,) + out_shape).astype(jnp.int8)
    else:
        lo, hi = q[:, :group // 2], q[:, group // 2:]  # [groups, G/2, *O] each
        packed = ((lo & 0xF) | ((hi & 0xF) << 4)).astype(jnp.uint8)
        data = jax.lax.bitcast_convert_type(packed, jnp.int8).reshape(
            (contract // 2,) + out_shape)
    return QuantizedWeight(data=data, scale=scale, bits=bits, group_size=group)


def unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 bytes -> (low nibble, high nibble) as sign-extended int32."""
    p = packed.astype(jnp.int32)
    return jnp.right_shift(jnp.left_shift(p, 28), 28), jnp.right_shift(p, 4)


def int_values(qw: QuantizedWeight) -> jax.Array:
    """The integer weight values, int8 [groups, G, *O] (int4 unpacked)."""
    groups, group, out = qw.scale.shape[0], qw.group_size, qw.out_shape
    if qw.bits == 8:
        return qw.data.reshape((groups, group) + out)
    lo, hi = unpack_int4(qw.data.reshape((groups, group // 2) + out))
    return jnp.concatenate([lo, hi], axis=1).astype(jnp.int8)


def dequantize_ref(qw: QuantizedWeight) -> jax.Array:
    """The float32 weight [Kc, *O] that `qw` represents."""
    w = int_values(qw).astype(jnp.float32) * qw.scale[:, None]
    return w.reshape((qw.contract_size,) + qw.out_shape)


def check_matmul_args(x: jax.Array, qw: QuantizedWeight) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"expected a QuantizedWeight, got {type(qw).__name__}")
    if x.ndim != 2 or qw.data.ndim != 2:
        raise ValueError(f"quantized_matmul takes x [M, K] and a 2-D weight [K, N]; got x "
                         f"{x.shape} and weight data {qw.data.shape} "
                         "(use QuantizedWeight.matrix())")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"activations must be float32 or bfloat16, got {x.dtype}")
    if x.shape[1] != qw.contract_size:
        raise ValueError(f"x has {x.shape[1]} columns but the weight contracts over "
                         f"{qw.contract_size} rows")


def _int8_limbs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (limbs int8 [2, M, K], row scale [M, 1]) with x ~= s·(hi + lo/254)."""
    xf = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(xf), axis=1, keepdims=True) / 127
    u = xf / jnp.where(s == 0, 1.0, s)
    hi = jnp.round(u)
    lo = jnp.round((u - hi) * _LIMB)
    return jnp.stack([hi, lo]).astype(jnp.int8), s


def quantized_matmul_ref(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype (the XLA path; see the module docstring)."""
    check_matmul_args(x, qw)
    m, n = x.shape[0], qw.data.shape[1]
    groups, group = qw.scale.shape[0], qw.group_size
    if group > _MAX_INT_DOT_ROWS:
        raise ValueError(f"groups of {group} rows overflow int32 accumulation; use group_size <= "
                         f"{_MAX_INT_DOT_ROWS}")
    limbs, s = _int8_limbs(x)
    xg = limbs.reshape(2 * m, groups, group)
    parts = jnp.einsum("mgk,gkn->gmn", xg, int_values(qw),
                       preferred_element_type=jnp.int32)  # [groups, 2M, N]
    y = jnp.sum(parts.astype(jnp.float32) * qw.scale[:, None, :], axis=0).reshape(2, m, n)
    return (s * (y[0] + y[1] / _LIMB)).astype(x.dtype)
