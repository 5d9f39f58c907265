"""Ragged paged attention: Pallas TPU and GPU kernels (interpret mode) vs the XLA twin vs a dense
float64 numpy reference that reads each sequence's positions 0..kv_len-1 out of the pages.

Tolerances (max absolute error, inputs ~N(0, 1)), as in test_kernels_attention.py: f32 2e-5
against numpy and the twin; bf16 3e-2 against numpy on the bf16-rounded inputs, 2e-2 against
the twin.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import (UnsupportedInput, ragged_paged_attention,
                            ragged_paged_attention_ref)

TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 2e-2)}  # (vs numpy, vs XLA twin)
HEADS = {"mqa": (4, 1), "gqa": (6, 2), "mha": (2, 2)}  # name: (N, K)
KERNELS = ("tpu-interpret", "gpu-interpret")
# (kv_len, q_len) per sequence: a 1-token decode, a whole prompt (kv_len not a page multiple),
# a chunk starting mid-sequence, another decode, a chunk ending exactly on a page boundary
MIXED = [(9, 1), (13, 13), (37, 11), (1, 1), (32, 5)]
REF = jax.jit(ragged_paged_attention_ref)


@dataclasses.dataclass
class Case:
    """Inputs of one call plus what the dense reference needs."""

    q: jax.Array
    """[T, N, H] packed query rows (padding rows random)."""
    k_pages: jax.Array
    """[P, K, page_size, H] key pages (float, or int8)."""
    v_pages: jax.Array
    """[P, K, page_size, H] value pages."""
    page_table: jax.Array
    """[S, pages_per_seq] int32 shuffled page ids; junk past each sequence's pages."""
    kv_lens: jax.Array
    """[S] int32 cache lengths; junk past num_seqs."""
    query_start: jax.Array
    """[S + 1] int32 row offsets; junk past num_seqs."""
    num_seqs: jax.Array
    """int32 scalar: active sequences."""
    k_scale: jax.Array | None
    """[P, K, page_size] float32 scales of int8 key pages, else None."""
    v_scale: jax.Array | None
    """[P, K, page_size] float32 scales of int8 value pages, else None."""

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.page_table, self.kv_lens,
                self.query_start, self.num_seqs)

    def scales(self):
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)


def _quantize(x):
    """Per-token-per-head symmetric int8: x [P, K, ps, H] -> (int8, f32 scales [P, K, ps])."""
    scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1), 1e-6) / 127.0
    return jnp.round(x / scale[..., None]).astype(jnp.int8), scale


def make_case(seqs, *, n, kv_heads, h=16, page_size=8, pages_per_seq=5, t_pad=None, slots=None,
              dtype=jnp.float32, int8=False, seed=0) -> Case:
    """seqs: (kv_len, q_len) of the active sequences, packed in order. Pages are handed out in a
    shuffled order, unused page-table entries, kv_lens and query starts hold junk, padded q
    rows hold random values (their output must still be zero)."""
    rng = np.random.default_rng(seed)
    slots = slots or len(seqs)
    need = [-(-kv // page_size) for kv, _ in seqs]
    n_pages = sum(need) + 3
    ids = rng.permutation(n_pages)
    page_table = rng.integers(0, n_pages, (slots, pages_per_seq))
    offset = 0
    for s, count in enumerate(need):
        page_table[s, :count] = ids[offset:offset + count]
        offset += count
    q_lens = [ql for _, ql in seqs]
    total = sum(q_lens)
    t_pad = t_pad or total
    query_start = rng.integers(0, t_pad + 1, slots + 1)  # junk past num_seqs
    query_start[:len(seqs) + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    kv_lens = rng.integers(0, pages_per_seq * page_size + 1, slots)
    kv_lens[:len(seqs)] = [kv for kv, _ in seqs]
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (t_pad, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (n_pages, kv_heads, page_size, h), jnp.float32)
    v = jax.random.normal(keys[2], (n_pages, kv_heads, page_size, h), jnp.float32)
    scales = (None, None)
    if int8:
        (k, ks), (v, vs) = _quantize(k), _quantize(v)
        scales = (ks, vs)
    else:
        k, v = k.astype(dtype), v.astype(dtype)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return Case(q, k, v, i32(page_table), i32(kv_lens), i32(query_start), i32(len(seqs)),
                *scales)


def dense_reference(case: Case) -> np.ndarray:
    """float64 numpy: per sequence, gather its keys/values 0..kv_len-1 position by position from
    the pages, causal softmax attention for its query rows; every other row is zero."""
    q = np.asarray(case.q, np.float64)
    k, v = (np.asarray(x, np.float64) for x in (case.k_pages, case.v_pages))
    if case.k_scale is not None:
        k = k * np.asarray(case.k_scale, np.float64)[..., None]
        v = v * np.asarray(case.v_scale, np.float64)[..., None]
    page_table, kv_lens = np.asarray(case.page_table), np.asarray(case.kv_lens)
    starts = np.asarray(case.query_start)
    t_len, n, h = q.shape
    kv_heads, page_size = k.shape[1], k.shape[2]
    out = np.zeros((t_len, n, h))
    for s in range(int(case.num_seqs)):
        kv_len, lo, hi = kv_lens[s], starts[s], starts[s + 1]
        pos = np.arange(kv_len)
        pages = page_table[s, pos // page_size]
        ks, vs = k[pages, :, pos % page_size], v[pages, :, pos % page_size]  # [L, K, H]
        for row in range(lo, hi):
            seen = pos <= kv_len - (hi - row)
            for head in range(n):
                kh = head // (n // kv_heads)
                scores = ks[seen, kh] @ q[row, head] / np.sqrt(h)
                p = np.exp(scores - scores.max())
                out[row, head] = (p / p.sum()) @ vs[seen, kh]
    return out


def _assert_close(out, expected, atol, what):
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), f"{what}: non-finite output"
    err = float(np.max(np.abs(out - np.asarray(expected, np.float64))))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def _check(case, backend, dtype):
    """Jitted (one program, as in use; interpreting op by op costs twice the time)."""
    out = jax.jit(lambda *a: ragged_paged_attention(*a, **case.scales(), backend=backend))(
        *case.args())
    ref = REF(*case.args(), **case.scales())
    dense = dense_reference(case)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    _assert_close(ref, dense, TOL[dtype][0], "ref vs numpy")
    _assert_close(out, ref, TOL[dtype][1], f"{backend} vs ref")
    _assert_close(out, dense, TOL[dtype][0], f"{backend} vs numpy")
    total = int(case.query_start[int(case.num_seqs)])
    assert np.all(np.asarray(out[total:]) == 0.0), f"{backend}: padded rows are not zero"
    return out


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("heads", list(HEADS))
def test_mixed_batch_matches_ref_and_dense(backend, heads):
    n, kv_heads = HEADS[heads]
    case = make_case(MIXED, n=n, kv_heads=kv_heads, t_pad=40, slots=7, seed=1)
    _check(case, backend, jnp.float32)


@pytest.mark.parametrize("block_q", [None, 1, 4, 64])
def test_ref_matches_dense_under_jit_with_traced_metadata(block_q):
    """Each query block size of the twin (one row per item ... one block for all rows)."""
    case = make_case(MIXED, n=6, kv_heads=2, t_pad=40, slots=7, seed=2)
    fn = jax.jit(lambda *a: ragged_paged_attention_ref(*a, block_q=block_q))
    _assert_close(fn(*case.args()), dense_reference(case), 2e-5, "jitted ref")
    fewer = dataclasses.replace(case, num_seqs=jnp.int32(3))  # same program, fewer sequences
    _assert_close(fn(*fewer.args()), dense_reference(fewer), 2e-5, "jitted ref, num_seqs=3")


KERNEL_FNS = {"tpu": pallas_kernels.ragged_paged_attention_tpu,
              "gpu": pallas_kernels.ragged_paged_attention_gpu}
# small blocks: several query blocks (a block shared by up to three sequences, a chunk spread
# over three blocks) and several KV steps per sequence
SMALL_BLOCKS = {"tpu": dict(block_q=8, pages_per_block=2), "gpu": dict(block_q=4,
                                                                        pages_per_block=2)}


def _kernel_call(kernel, case):
    fn = functools.partial(KERNEL_FNS[kernel], sm_scale=case.q.shape[-1] ** -0.5,
                           interpret=True, **SMALL_BLOCKS[kernel])
    return jax.jit(lambda *a: fn(*a, **case.scales()))(*case.args())


@pytest.mark.parametrize("kernel", list(KERNEL_FNS))
@pytest.mark.parametrize("dtype,int8", [(jnp.float32, False), (jnp.bfloat16, False),
                                        (jnp.float32, True), (jnp.bfloat16, True)])
def test_small_blocks_dtypes_and_int8_pages(kernel, dtype, int8):
    case = make_case(MIXED + [(20, 2)], n=6, kv_heads=2, t_pad=48, slots=8, dtype=dtype,
                     int8=int8, seed=3)
    out = _kernel_call(kernel, case)
    ref = REF(*case.args(), **case.scales())
    dense = dense_reference(case)
    assert out.dtype == dtype
    _assert_close(out, ref, TOL[dtype][1], f"{kernel} vs ref")
    _assert_close(out, dense, TOL[dtype][0], f"{kernel} vs numpy")
    _assert_close(ref, dense, TOL[dtype][0], "ref vs numpy")
    assert np.all(np.asarray(out[sum(q for _, q in MIXED) + 2:]) == 0.0)


@pytest.mark.parametrize("kernel", list(KERNEL_FNS))
def test_decode_only_and_no_sequences(kernel):
    """A pure decode step (one token per sequence, ragged lengths) and num_seqs = 0 (all zeros)."""
    case = make_case([(17, 1), (3, 1), (40, 1), (8, 1)], n=4, kv_heads=1, t_pad=8, slots=6,
                     seed=4)
    _assert_close(_kernel_call(kernel, case), dense_reference(case), 2e-5, f"{kernel} decode")
    empty = dataclasses.replace(case, num_seqs=jnp.int32(0))
    out = _kernel_call(kernel, empty)
    assert np.all(np.asarray(out) == 0.0)
    assert np.all(np.asarray(REF(*empty.args())) == 0.0)


def test_tpu_kernel_in_tpu_simulator():
    """DMA / scalar-prefetch semantics under the TPU simulator: skipped pages, int8 scales."""
    case = make_case([(12, 3), (30, 1), (9, 9)], n=2, kv_heads=1, t_pad=16, slots=4, int8=True,
                     seed=5)
    try:
        out = pallas_kernels.ragged_paged_attention_tpu(
            *case.args(), **case.scales(), sm_scale=0.25, block_q=8, pages_per_block=2,
            interpret=pltpu.InterpretParams())
        _assert_close(out, dense_reference(case), 2e-5, "simulated tpu kernel")
    finally:
        pltpu.reset_tpu_interpret_mode_state()


def _lowering_args(int8: bool):
    t_len, n, kv_heads, h, page_size, n_pages, slots, pps = 256, 8, 2, 128, 16, 512, 16, 64
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    pages = jax.ShapeDtypeStruct((n_pages, kv_heads, page_size, h),
                                 jnp.int8 if int8 else jnp.bfloat16)
    args = [jax.ShapeDtypeStruct((t_len, n, h), jnp.bfloat16), pages, pages, i32(slots, pps),
            i32(slots), i32(slots + 1), i32()]
    if int8:
        args += [jax.ShapeDtypeStruct((n_pages, kv_heads, page_size), jnp.float32)] * 2
    return args


@pytest.mark.parametrize("int8", [False, True])
def test_kernels_lower_for_tpu_and_cuda(int8):
    """Interpret success is not compilation: lower both kernels for TPU (Mosaic) and CUDA."""
    def make(backend):
        def fn(*a):
            scales = dict(k_scale=a[7], v_scale=a[8]) if int8 else {}
            return ragged_paged_attention(*a[:7], **scales, backend=backend)
        return jax.jit(fn)

    args = _lowering_args(int8)
    tpu = jax.export.export(make("tpu"), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in tpu.mlir_module()
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    gpu = jax.export.export(make("gpu"), platforms=["cuda"], disabled_checks=[triton])(*args)
    assert "__gpu$xla.gpu.triton" in gpu.mlir_module()


@pytest.mark.parametrize("kernel", list(KERNEL_FNS))
def test_output_rows_do_not_depend_on_the_padded_bucket(kernel):
    """The same sequences in a bigger T bucket give the same rows (and zeros after them)."""
    small = make_case(MIXED, n=8, kv_heads=2, t_pad=32, seed=9)
    big = dataclasses.replace(small, q=jnp.pad(small.q, ((0, 32), (0, 0), (0, 0)),
                                               constant_values=3.0))
    out_small, out_big = _kernel_call(kernel, small), _kernel_call(kernel, big)
    _assert_close(out_big[:32], out_small, 1e-6, f"{kernel} bucket 64 vs 32")
    assert np.all(np.asarray(out_big[31:]) == 0.0)


def test_auto_on_cpu_is_the_xla_twin():
    case = make_case(MIXED, n=6, kv_heads=2, t_pad=40, slots=7, seed=6)
    auto = ragged_paged_attention(*case.args())
    np.testing.assert_array_equal(np.asarray(auto),
                                  np.asarray(ragged_paged_attention_ref(*case.args())))


def test_bad_inputs_name_the_argument():
    case = make_case(MIXED, n=6, kv_heads=2, t_pad=40, slots=7, seed=7)
    q, kp, vp, pt, kv, qs, ns = case.args()
    with pytest.raises(ValueError, match=r"kv_lens must be an integer array of shape \(7,\)"):
        ragged_paged_attention(q, kp, vp, pt, kv[:5], qs, ns)
    with pytest.raises(ValueError, match=r"query_start must be an integer array of shape \(8,\)"):
        ragged_paged_attention(q, kp, vp, pt, kv, qs[:7], ns)
    with pytest.raises(ValueError, match=r"num_seqs must be an integer array of shape \(\)"):
        ragged_paged_attention(q, kp, vp, pt, kv, qs, jnp.array([5]))
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of KV heads"):
        ragged_paged_attention(q, kp[:, :1].repeat(4, 1), vp[:, :1].repeat(4, 1), pt, kv, qs, ns)
    with pytest.raises(ValueError, match="int8 pages need k_scale"):
        ragged_paged_attention(q, kp.astype(jnp.int8), vp.astype(jnp.int8), pt, kv, qs, ns)
    with pytest.raises(ValueError, match=r"k_scale must be float32 of shape"):
        scale = jnp.ones(kp.shape[:2], jnp.float32)
        ragged_paged_attention(q, kp.astype(jnp.int8), vp.astype(jnp.int8), pt, kv, qs, ns,
                               k_scale=scale, v_scale=scale)
    with pytest.raises(ValueError, match="backend must be one of"):
        ragged_paged_attention(*case.args(), backend="cuda")
    with pytest.raises(UnsupportedInput, match="page_size a power of two, got 12"):
        odd = make_case([(20, 4)], n=2, kv_heads=1, page_size=12, pages_per_seq=2, seed=8)
        ragged_paged_attention(*odd.args(), backend="gpu-interpret")
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        pallas_kernels.ragged_paged_attention_tpu(*case.args(), sm_scale=0.25, block_q=12,
                                                  interpret=True)
