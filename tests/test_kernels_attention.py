"""Attention kernels (Pallas TPU and GPU, interpret mode) vs their XLA twins vs naive numpy.

Tolerances (max absolute error; inputs ~N(0, 1), outputs are convex combinations of values):
f32: 2e-5 for every path against float64 numpy; bf16: 3e-2 against numpy on the bf16-rounded
inputs (bf16 probabilities in the value matmul plus one bf16 rounding of the output) and 2e-2
between a kernel and its XLA twin (same rounding points, different accumulation order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import UnsupportedInput, decode_attention, flash_attention
from pallas_kernels._dispatch import resolve_attention_backend
from pallas_kernels.attention_ref import decode_attention_ref, flash_attention_ref

TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 2e-2)}  # (vs numpy, vs XLA twin)
HEADS = {"mqa": (4, 1), "gqa": (6, 2), "mha": (2, 2)}  # name: (N, K)
KERNELS = ("tpu", "gpu")
DECODE_KERNELS = {"tpu": pallas_kernels.decode_attention_tpu, "gpu": pallas_kernels.decode_attention_gpu}
FLASH_KERNELS = {"tpu": pallas_kernels.flash_attention_tpu, "gpu": pallas_kernels.flash_attention_gpu}


def naive_attention(q, k, v, lengths, causal):
    """float64 numpy softmax attention; q [B, N, T, H], k/v [B, K, S, H]; no-key rows -> 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    out = np.zeros((b, n, t, h))
    for bi in range(b):
        for ni in range(n):
            ki = ni // (n // kv_heads)
            for ti in range(t):
                visible = np.arange(s) < (s if lengths is None else lengths[bi])
                if causal:
                    visible &= np.arange(s) <= ti + s - t
                if not visible.any():
                    continue
                scores = k[bi, ki, visible] @ q[bi, ni, ti] / np.sqrt(h)
                p = np.exp(scores - scores.max())
                out[bi, ni, ti] = (p / p.sum()) @ v[bi, ki, visible]
    return out


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(n, kv_heads, t, s, h, dtype, seed=0, batch=2):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (_normal(kq, (batch, n, t, h), dtype), _normal(kk, (batch, kv_heads, s, h), dtype),
            _normal(kv, (batch, kv_heads, s, h), dtype))


def _quantize(x):
    """Per-token-per-head symmetric int8: x [B, K, S, H] -> (int8, f32 scales [B, K, S])."""
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


def _assert_close(out, expected, atol, what):
    err = float(np.max(np.abs(np.asarray(out, np.float64) - np.asarray(expected, np.float64))))
    assert np.all(np.isfinite(np.asarray(out, np.float32))), f"{what}: non-finite output"
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_matches_ref_and_numpy(kernel, heads, dtype):
    n, kv_heads = HEADS[heads]
    q, k, v = _qkv(n, kv_heads, 1, 200, 16, dtype)  # S = 200: not a multiple of any block
    lengths = jnp.array([1, 187])
    out = decode_attention(q[:, :, 0], k, v, lengths, backend=kernel, interpret=True)
    ref = decode_attention_ref(q[:, :, 0], k, v, lengths)
    naive = naive_attention(q, k, v, np.asarray(lengths), causal=False)[:, :, 0]
    assert out.dtype == dtype and out.shape == q[:, :, 0].shape
    _assert_close(out, ref, TOL[dtype][1], f"{kernel} vs ref")
    _assert_close(out, naive, TOL[dtype][0], f"{kernel} vs numpy")
    _assert_close(ref, naive, TOL[dtype][0], "ref vs numpy")


@pytest.mark.parametrize("kernel,extra", [("tpu", dict(block_kv=128, num_splits=2)),
                                          ("gpu", dict(block_kv=32, num_splits=3))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_int8_cache_split(kernel, extra, dtype):
    q, k, v = _qkv(6, 2, 1, 300, 32, dtype, seed=1)
    (k8, ks), (v8, vs) = _quantize(k.astype(jnp.float32)), _quantize(v.astype(jnp.float32))
    lengths = jnp.array([300, 129])
    fn = DECODE_KERNELS[kernel]
    out = fn(q[:, :, 0], k8, v8, lengths, k_scale=ks, v_scale=vs, sm_scale=32 ** -0.5,
             interpret=True, **extra)
    ref = decode_attention_ref(q[:, :, 0], k8, v8, lengths, k_scale=ks, v_scale=vs)
    deq = [np.asarray(c, np.float64) * np.asarray(s, np.float64)[..., None]
           for c, s in ((k8, ks), (v8, vs))]
    naive = naive_attention(q, deq[0], deq[1], np.asarray(lengths), causal=False)[:, :, 0]
    _assert_close(out, ref, TOL[dtype][1], f"{kernel} int8 vs ref")
    _assert_close(out, naive, TOL[dtype][0], f"{kernel} int8 vs numpy")
    _assert_close(ref, naive, TOL[dtype][0], "ref int8 vs numpy")


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_attention_empty_sequence_is_zero(kernel):
    q, k, v = _qkv(4, 2, 1, 64, 16, jnp.float32)
    out = decode_attention(q[:, :, 0], k, v, jnp.array([0, 3]), backend=kernel, interpret=True)
    assert np.all(np.asarray(out[0]) == 0.0)
    _assert_close(out, decode_attention_ref(q[:, :, 0], k, v, jnp.array([0, 3])), 2e-5, kernel)


FLASH_CASES = [(heads, True, True) for heads in HEADS] + [("gqa", True, False),
                                                          ("gqa", False, True)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("heads,causal,ragged", FLASH_CASES)
def test_flash_attention_matches_ref_and_numpy(kernel, heads, causal, ragged):
    n, kv_heads = HEADS[heads]
    q, k, v = _qkv(n, kv_heads, 37, 45, 16, jnp.float32, seed=2)  # T != S, neither a block multiple
    lengths = jnp.array([1, 41]) if ragged else None
    out = flash_attention(q, k, v, causal=causal, lengths=lengths, backend=kernel, interpret=True)
    ref = flash_attention_ref(q, k, v, causal=causal, lengths=lengths)
    naive = naive_attention(q, k, v, None if lengths is None else np.asarray(lengths), causal)
    _assert_close(out, ref, TOL[jnp.float32][1], f"{kernel} vs ref")
    _assert_close(out, naive, TOL[jnp.float32][0], f"{kernel} vs numpy")
    _assert_close(ref, naive, TOL[jnp.float32][0], "ref vs numpy")


@pytest.mark.parametrize("kernel,blocks", [("tpu", dict(block_q=16, block_k=128)),
                                           ("gpu", dict(block_q=16, block_k=16))])
def test_flash_attention_bf16_multiblock(kernel, blocks):
    """Several row and key blocks: causal block skipping and ragged lengths across blocks."""
    q, k, v = _qkv(6, 2, 70, 150, 32, jnp.bfloat16, seed=3)
    lengths = jnp.array([150, 97])
    fn = FLASH_KERNELS[kernel]
    out = fn(q, k, v, causal=True, lengths=lengths, sm_scale=32 ** -0.5, interpret=True, **blocks)
    ref = flash_attention_ref(q, k, v, causal=True, lengths=lengths)
    naive = naive_attention(q, k, v, np.asarray(lengths), causal=True)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, ref, TOL[jnp.bfloat16][1], f"{kernel} bf16 vs ref")
    _assert_close(out, naive, TOL[jnp.bfloat16][0], f"{kernel} bf16 vs numpy")


def test_tpu_kernels_in_tpu_simulator():
    """DMA / scalar-prefetch semantics under the TPU simulator (skipped blocks, splits, int8)."""
    q, k, v = _qkv(4, 2, 1, 256, 16, jnp.float32, seed=4)
    (k8, ks), (v8, vs) = _quantize(k), _quantize(v)
    lengths = jnp.array([5, 200])
    params = pltpu.InterpretParams()
    try:
        out = pallas_kernels.decode_attention_tpu(q[:, :, 0], k8, v8, lengths, k_scale=ks,
                                                  v_scale=vs, sm_scale=0.25, block_kv=128,
                                                  num_splits=2, interpret=params)
        ref = decode_attention_ref(q[:, :, 0], k8, v8, lengths, k_scale=ks, v_scale=vs)
        _assert_close(out, ref, 2e-5, "simulated decode")
        qf, kf, vf = _qkv(2, 1, 20, 200, 16, jnp.float32, seed=5)
        out = pallas_kernels.flash_attention_tpu(qf, kf, vf, causal=True,
                                                 lengths=jnp.array([3, 150]), sm_scale=0.25,
                                                 block_q=8, block_k=128, interpret=params)
        ref = flash_attention_ref(qf, kf, vf, causal=True, lengths=jnp.array([3, 150]))
        _assert_close(out, ref, 2e-5, "simulated flash")
    finally:
        pltpu.reset_tpu_interpret_mode_state()


LOWER_CASES = ["flash", "decode", "decode_int8"]


def _lowering_args(case):
    b, n, kv_heads, s, h = 2, 8, 2, 1024, 128
    bf16 = jnp.bfloat16
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    if case == "flash":
        q = jax.ShapeDtypeStruct((b, n, 256, h), bf16)
        kv = jax.ShapeDtypeStruct((b, kv_heads, 300, h), bf16)
        return (lambda be: lambda q, k, v, l: flash_attention(q, k, v, lengths=l, backend=be)), \
            (q, kv, kv, lengths)
    q = jax.ShapeDtypeStruct((b, n, h), bf16)
    if case == "decode":
        kv = jax.ShapeDtypeStruct((b, kv_heads, s, h), bf16)
        return (lambda be: lambda q, k, v, l: decode_attention(q, k, v, l, backend=be)), \
            (q, kv, kv, lengths)
    kv = jax.ShapeDtypeStruct((b, kv_heads, s, h), jnp.int8)
    sc = jax.ShapeDtypeStruct((b, kv_heads, s), jnp.float32)
    return (lambda be: lambda q, k, v, l, a, c: decode_attention(q, k, v, l, k_scale=a, v_scale=c,
                                                                backend=be)), \
        (q, kv, kv, lengths, sc, sc)


@pytest.mark.parametrize("case", LOWER_CASES)
def test_kernels_lower_for_tpu_and_cuda(case):
    """Interpret success is not compilation: lower each kernel for TPU (Mosaic) and CUDA."""
    make, args = _lowering_args(case)
    tpu = jax.export.export(jax.jit(make("tpu")), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in tpu.mlir_module()
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    gpu = jax.export.export(jax.jit(make("gpu")), platforms=["cuda"],
                            disabled_checks=[triton])(*args)
    assert "__gpu$xla.gpu.triton" in gpu.mlir_module()


def test_unsupported_inputs_and_backend_names():
    q, k, v = _qkv(4, 2, 3, 8, 24, jnp.float32)  # head_dim 24: not a power of two
    with pytest.raises(UnsupportedInput, match="head_dim a power of two"):
        flash_attention(q, k, v, backend="gpu", interpret=True)
    with pytest.raises(UnsupportedInput, match="keys/values in the query dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), backend="tpu",
                        interpret=True)
    with pytest.raises(ValueError, match="int8 caches need k_scale"):
        decode_attention(q[:, :, 0], k.astype(jnp.int8), v.astype(jnp.int8), jnp.array([1, 2]),
                         backend="xla")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, k, v, backend="cuda")
    assert resolve_attention_backend("gpu-interpret", False) == ("gpu", True)
    params = pltpu.InterpretParams()
    assert resolve_attention_backend("tpu-interpret", params) == ("tpu", params)
    assert resolve_attention_backend("auto", False) == ("xla", False)  # this CPU host


@pytest.mark.parametrize("family,backend", [("llama", "tpu-interpret"),
                                            ("mistral", "gpu-interpret")])
def test_model_agrees_across_attention_backends(family_checkpoints, family, backend):
    """Whole model (GQA llama, MQA mistral) with the Pallas kernels interpreted vs the XLA path."""
    import jaxinfer

    ckpt = family_checkpoints(family)
    xla = jaxinfer.load(ckpt.path, attention_backend="xla")
    kern = jaxinfer.load(ckpt.path, attention_backend=backend)
    tokens = np.random.default_rng(0).integers(3, xla.config.vocab_size, (2, 11))
    np.testing.assert_allclose(kern.logits(tokens), xla.logits(tokens), atol=1e-4, rtol=1e-4)
    prompts = [[5, 9, 13, 7], [11, 3]]
    want = xla.generate(prompts, max_new_tokens=6, stop_tokens=[]).tokens
    got = kern.generate(prompts, max_new_tokens=6, stop_tokens=[]).tokens
    assert [list(t) for t in got] == [list(t) for t in want]
