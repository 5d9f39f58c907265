"""Quantized matmul: Pallas TPU and GPU kernels (interpret mode) vs the XLA twin vs plain numpy.

Tolerances (relative to max |reference|): f32 activations, kernels 1e-5 and XLA twin 1e-4 (its
two-limb int8 activations carry ~1.5e-5 relative error per element); bf16 activations 1e-2 (one
bf16 rounding of x and of the output).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (QuantizedWeight, dequantize_ref, quantize_weights, quantized_matmul,
                            quantized_matmul_ref)

# bits, group_size, K, N, M: per-channel int8, grouped int8, int4 with odd group counts (5, 3).
CASES = [(8, None, 256, 256, 3), (8, 32, 96, 128, 2), (4, 32, 160, 128, 5), (4, 128, 384, 256, 1)]


def numpy_dequant(data: np.ndarray, scale: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Independent dequantization following the documented layout (no jaxinfer code)."""
    data = data.astype(np.int8)
    if bits == 8:
        ints = data.astype(np.float64)
    else:
        half = group // 2
        rows = []
        for g in range(scale.shape[0]):
            block = data[g * half:(g + 1) * half].astype(np.int16)
            low = ((block & 0xF) ^ 8) - 8  # sign-extend the low nibble
            high = block >> 4
            rows += [low, high]
        ints = np.concatenate(rows).astype(np.float64)
    return ints * np.repeat(scale.astype(np.float64), group, axis=0)


def _case(bits, group, k, n, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    qw = quantize_weights(jnp.asarray(w), bits=bits, group_size=group)
    x_j = jnp.asarray(x, dtype)
    wd = numpy_dequant(np.asarray(qw.data), np.asarray(qw.scale), bits, qw.group_size)
    expected = np.asarray(x_j.astype(jnp.float32), np.float64) @ wd
    return w, x_j, qw, wd, expected


def _rel(got, expected) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("bits,group,k,n,m", CASES)
def test_quantize_layout_and_error_bound(bits, group, k, n, m):
    w, _, qw, wd, _ = _case(bits, group, k, n, m, jnp.float32)
    g = qw.group_size
    assert qw.data.dtype == jnp.int8 and qw.scale.dtype == jnp.float32
    assert qw.data.shape == (k * bits // 8, n) and qw.scale.shape == (k // g, n)
    assert qw.contract_size == k
    # Symmetric rounding: every weight within half a step of its value.
    step = np.repeat(np.asarray(qw.scale), g, axis=0)
    assert np.all(np.abs(wd - w) <= step / 2 + 1e-6)
    np.testing.assert_allclose(np.asarray(dequantize_ref(qw)), wd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,group,k,n,m", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_matches_numpy_and_ref(bits, group, k, n, m, dtype, backend):
    _, x, qw, _, expected = _case(bits, group, k, n, m, dtype)
    got = quantized_matmul(x, qw, backend=backend, interpret=True)
    ref = quantized_matmul_ref(x, qw)
    assert got.shape == (m, n) and got.dtype == dtype and ref.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(got.astype(jnp.float32), expected) < tol
    assert _rel(got.astype(jnp.float32), np.asarray(ref.astype(jnp.float32), np.float64)) < \
        max(tol, 1e-4)


@pytest.mark.parametrize("bits,group,k,n,m", CASES)
def test_xla_ref_matches_numpy(bits, group, k, n, m):
    _, x, qw, _, expected = _case(bits, group, k, n, m, jnp.float32, seed=1)
    assert _rel(quantized_matmul_ref(x, qw), expected) < 1e-4
    # "auto" on CPU is the XLA twin, bit for bit.
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x, qw)),
                                  np.asarray(quantized_matmul_ref(x, qw)))


def test_tpu_kernel_in_tpu_simulator():
    _, x, qw, _, expected = _case(4, 32, 160, 128, 5, jnp.float32)
    got = quantized_matmul(x, qw, backend="tpu", interpret=pltpu.InterpretParams())
    assert _rel(got, expected) < 1e-5


def test_quantized_weight_is_a_pytree_through_jit_and_vmap():
    w = jax.random.normal(jax.random.key(0), (3, 64, 4, 8))  # stacked [L, D, N, H]
    qw = jax.vmap(functools.partial(quantize_weights, bits=4, group_size=32))(w)
    assert qw.data.shape == (3, 32, 4, 8) and qw.scale.shape == (3, 2, 4, 8)
    layer = jax.tree.map(lambda a: a[1], qw)
    assert isinstance(layer, QuantizedWeight) and layer.bits == 4 and layer.group_size == 32
    x = jax.random.normal(jax.random.key(1), (2, 64))
    y = jax.jit(lambda x, q: quantized_matmul(x, q.matrix()))(x, layer)
    expected = np.asarray(x) @ np.asarray(dequantize_ref(layer)).reshape(64, 32)
    assert _rel(y, expected) < 1e-4


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower(bits, group, platform):
    qw = quantize_weights(jnp.ones((384, 256)), bits=bits, group_size=group)
    x = jnp.zeros((4, 384), jnp.bfloat16)
    backend = "tpu" if platform == "tpu" else "gpu"
    fn = jax.jit(functools.partial(quantized_matmul, backend=backend))
    kwargs = {} if platform == "tpu" else {"disabled_checks": [
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]}
    text = jax.export.export(fn, platforms=[platform], **kwargs)(x, qw).mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "triton") in text


def test_bad_inputs_raise_clear_errors():
    w = jnp.ones((160, 32))
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weights(w, bits=3)
    with pytest.raises(ValueError, match="group_size 64 does not divide the contraction "
                                         "dimension 160"):
        quantize_weights(w, bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize_weights(jnp.ones((15, 8)), bits=4, group_size=5)
    qw = quantize_weights(w, bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(qw, bits=8)
    with pytest.raises(ValueError, match="only float weights"):
        quantize_weights(jnp.ones((8, 8), jnp.int32))
    with pytest.raises(ValueError, match="x has 100 columns but the weight contracts over 160"):
        quantized_matmul(jnp.ones((2, 100)), qw)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        quantized_matmul(jnp.ones((2, 160), jnp.int32), qw)
    with pytest.raises(ValueError, match="backend must be one of"):
        quantized_matmul(jnp.ones((2, 160)), qw, backend="cuda")
    odd = quantize_weights(jnp.ones((160, 24)), bits=8)  # N=24: no Triton block divides it
    with pytest.raises(ValueError, match="Triton kernel needs N divisible by 16"):
        quantized_matmul(jnp.ones((2, 160)), odd, backend="gpu", interpret=True)


def test_bf16_weights_quantize_like_their_f32_values():
    w = jax.random.normal(jax.random.key(2), (64, 32)).astype(jnp.bfloat16)
    a = quantize_weights(w, bits=8)
    b = quantize_weights(w.astype(jnp.float32), bits=8)
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_default_group_sizes():
    from pallas_kernels.quantize import resolve_group_size

    assert resolve_group_size(8, None, 192) == 192  # int8: per output channel
    assert resolve_group_size(4, None, 512) == 128  # int4 default
    assert resolve_group_size(4, None, 192) == 96  # largest even divisor below 128
    assert resolve_group_size(4, None, 64) == 64  # capped at the contraction
    assert resolve_group_size(4, 256, 64) == 64
    with pytest.raises(ValueError, match="even group size dividing the contraction dimension 15"):
        resolve_group_size(4, None, 15)
