"""Weight-only quantized matmul x [M, K] @ W [K, N]: Pallas TPU (Mosaic) and GPU (Triton) kernels.

Both kernels read int8 / packed-int4 weight tiles and dequantize them in-kernel, right before the
dot, so HBM traffic is the integer bytes (the decode regime, small M, is bandwidth-bound). The
contraction runs in units of U rows: one group for grouped weights (int4, or int8 with group_size),
a block dividing K for per-channel int8 (scale applied once at the end). Activations are passed as
x3 [units, M, U] (int4: half-groups, so one group = units 2g and 2g + 1), which makes every block's
last two dims either full array dims or (8, 128)-aligned, with no in-kernel reshape.

- TPU: grid (M blocks, N blocks, units), the unit axis last and "arbitrary", f32 VMEM accumulator.
- GPU: grid (M blocks, N blocks); each program loops over units with `fori_loop` (Triton programs
  cannot carry state across grid steps).

``backend="auto"`` picks the platform kernel and, when it cannot tile the shapes (e.g. a Triton
block that is not a power of two), the XLA reference — an explicit, documented fallback; naming a
kernel backend raises instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._dispatch import report_fallback, resolve_backend
from pallas_kernels.quantize import (QuantizedWeight, check_matmul_args, quantized_matmul_ref,
                                     unpack_int4)


class UnsupportedShape(ValueError):
    """The kernel of a backend cannot tile these shapes."""


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """How one call is cut into blocks."""

    bm: int
    """Rows of x per block (M is padded to a multiple)."""
    m_pad: int
    """Padded M."""
    bn: int
    """Output columns per block."""
    unit: int
    """Contraction rows per step (a group, a half-group for int4, or a per-channel block)."""
    steps: int
    """Contraction steps (groups, or K // unit for per-channel int8)."""
    grouped: bool
    """Scales change along the contraction (applied per step, else once at the end)."""


def _tiling(m: int, k: int, n: int, qw: QuantizedWeight, backend: str) -> _Tiling:
    grouped = qw.bits == 4 or qw.scale.shape[0] > 1
    gpu = backend == "gpu"
    if qw.bits == 4:
        unit = qw.group_size // 2
    elif grouped:
        unit = qw.group_size
    else:
        unit = _largest_divisor(k, (256, 128, 64, 32, 16) if gpu else (512, 256, 128)) or k
    steps = k // qw.group_size if grouped else k // unit
    if gpu:
        bn = _largest_divisor(n, (128, 64, 32, 16))
        bm = max(16, 1 << (m - 1).bit_length()) if m <= 64 else 64
        if bn is None or not _is_pow2(unit) or unit < 16:
            raise UnsupportedShape(
                f"the Triton kernel needs N divisible by 16 and a power-of-two contraction unit "
                f">= 16; got N={n}, unit={unit} (bits={qw.bits}, group_size={qw.group_size})")
    else:
        bn = _largest_divisor(n, (512, 256, 128)) or n
        bm = _round_up(m, 16) if m <= 256 else 256
    return _Tiling(bm=bm, m_pad=_round_up(m, bm), bn=bn, unit=unit, steps=steps,
                   grouped=grouped)


def _dequant_dot(xs, q, bits: int, dtype) -> jax.Array:
    """Dequantize one weight tile (int8, or packed int4 as two half-groups) and multiply: f32."""
    if bits == 8:
        return jnp.dot(xs[0], q.astype(jnp.float32).astype(dtype),
                       preferred_element_type=jnp.float32)
    lo, hi = unpack_int4(q)
    return (jnp.dot(xs[0], lo.astype(jnp.float32).astype(dtype),
                    preferred_element_type=jnp.float32)
            + jnp.dot(xs[1], hi.astype(jnp.float32).astype(dtype),
                      preferred_element_type=jnp.float32))


def _tpu_kernel(*refs, bits: int, grouped: bool):
    n_x = 2 if bits == 4 else 1
    x_refs, (q_ref, s_ref, o_ref, acc_ref) = refs[:n_x], refs[n_x:]
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    part = _dequant_dot([r[...] for r in x_refs], q_ref[...], bits, x_refs[0].dtype)
    acc_ref[...] += part * s_ref[...] if grouped else part

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        acc = acc_ref[...]
        o_ref[...] = (acc if grouped else acc * s_ref[...]).astype(o_ref.dtype)


def _tpu_call(x3, qw: QuantizedWeight, scale3, t: _Tiling, out_dtype, interpret):
    n = qw.data.shape[1]
    if qw.bits == 4:
        x_specs = [pl.BlockSpec((None, t.bm, t.unit), lambda i, j, s: (2 * s, i, 0)),
                   pl.BlockSpec((None, t.bm, t.unit), lambda i, j, s: (2 * s + 1, i, 0))]
    else:
        x_specs = [pl.BlockSpec((None, t.bm, t.unit), lambda i, j, s: (s, i, 0))]
    grouped = t.grouped
    in_specs = x_specs + [
        pl.BlockSpec((t.unit, t.bn), lambda i, j, s: (s, j)),
        pl.BlockSpec((None, 1, t.bn), lambda i, j, s: (s if grouped else 0, 0, j)),
    ]
    return pl.pallas_call(
        functools.partial(_tpu_kernel, bits=qw.bits, grouped=grouped),
        grid=(t.m_pad // t.bm, n // t.bn, t.steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t.m_pad, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((t.bm, t.bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*([x3] * len(x_specs)), qw.data, scale3)


def _gpu_kernel(x_ref, q_ref, s_ref, o_ref, *, bits: int, grouped: bool, steps: int, unit: int):
    # x_ref [units, bm, U]; q_ref [K(/2), bn]; s_ref [groups, 1, bn]; o_ref [bm, bn]
    def body(step, acc):
        q = q_ref[pl.ds(step * unit, unit), :]
        xs = (x_ref[step],) if bits == 8 else (x_ref[2 * step], x_ref[2 * step + 1])
        part = _dequant_dot(xs, q, bits, x_ref.dtype)
        return acc + (part * s_ref[step] if grouped else part)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc if grouped else acc * s_ref[0]).astype(o_ref.dtype)


def _gpu_call(x3, qw: QuantizedWeight, scale3, t: _Tiling, out_dtype, interpret):
    n = qw.data.shape[1]
    units = x3.shape[0]
    kernel = functools.partial(_gpu_kernel, bits=qw.bits, grouped=t.grouped, steps=t.steps,
                               unit=t.unit)
    return pl.pallas_call(
        kernel,
        grid=(t.m_pad // t.bm, n // t.bn),
        in_specs=[pl.BlockSpec((units, t.bm, t.unit), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((qw.data.shape[0], t.bn), lambda i, j: (0, j)),
                  pl.BlockSpec((scale3.shape[0], 1, t.bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t.m_pad, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(x3, qw.data, scale3)


def _kernel_matmul(x, qw: QuantizedWeight, backend: str, interpret) -> jax.Array:
    m, k = x.shape
    n = qw.data.shape[1]
    t = _tiling(m, k, n, qw, backend)
    xp = jnp.pad(x, ((0, t.m_pad - m), (0, 0)))
    units = k // t.unit
    x3 = jnp.transpose(xp.reshape(t.m_pad, units, t.unit), (1, 0, 2))  # [units, M, U]
    scale3 = qw.scale.astype(jnp.float32)[:, None, :]  # [groups, 1, N]
    call = _gpu_call if backend == "gpu" else _tpu_call
    return call(x3, qw, scale3, t, x.dtype, interpret)[:m]


def quantized_matmul(x: jax.Array, qw: QuantizedWeight, *, backend: str = "auto",
                     interpret=False) -> jax.Array:
    """x [M, K] (float32 or bfloat16) @ W [K, N] held by `qw` -> [M, N] in x's dtype.

    backend: "tpu" | "gpu" (Pallas kernels), "xla" (`quantized_matmul_ref`) or "auto" (the
    platform's kernel; the XLA reference on CPU or when the kernel cannot tile the shapes).
    interpret: run the Pallas kernel in interpret mode (True, or `pltpu.InterpretParams()` for TPU).
    """
    check_matmul_args(x, qw)
    requested = backend
    backend = resolve_backend(backend)
    if backend == "xla":
        return quantized_matmul_ref(x, qw)
    try:
        return _kernel_matmul(x, qw, backend, interpret)
    except UnsupportedShape as err:
        if requested != "auto":
            raise
        report_fallback("quantized_matmul", backend, err)
        return quantized_matmul_ref(x, qw)
