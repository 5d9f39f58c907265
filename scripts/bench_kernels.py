"""Achieved bytes/s and FLOP/s of jaxinfer's Pallas kernels vs the XLA reference and vs the
`jax.experimental.pallas.ops` counterparts, on whatever accelerator JAX sees.

    python scripts/bench_kernels.py            # full sizes on TPU/GPU, small sizes on CPU
    python scripts/bench_kernels.py --small    # small sizes everywhere (smoke run)

On CPU only the XLA paths run (the Pallas kernels need an accelerator; interpret mode is for
correctness, not speed). Counterparts: GPU `ops.gpu.decode_attention.gqa` (its cache layout
[B, S, K, H] is produced by a transpose outside the timed call) and `ops.gpu.attention.mha`
(MHA only: K/V repeated to N heads outside the timed call); TPU `ops.tpu.flash_attention`
(likewise MHA). Ragged paged attention (a mixed step of prefill chunks and decode tokens over a
shuffled page pool) is compared with TPU `ops.tpu.ragged_paged_attention` (float pages only: it
takes per-tensor scales; K/V merged into its [P, page, 2K, H] layout outside the timing) and, for
decode-only steps, GPU `ops.gpu.paged_attention` (pages transposed to [K, P, page, H] outside the
timing; int8 with the same per-token scales).
Bytes are the compulsory HBM traffic (inputs once, outputs once); FLOPs count 2 per multiply-add.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.attention_ref import decode_attention_ref, flash_attention_ref

PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "TPU v5 lite": 819e9,
            "TPU v5e": 819e9, "TPU v5p": 2765e9, "TPU v6": 1640e9, "TPU v4": 1200e9}


RESULTS: list[dict] = []
"""Every timing printed by `report` (and every failed counterpart), as dicts, in order: what
`scripts/device_check.py` writes to its JSON."""
_SECTION = {"case": ""}


def section(title: str) -> None:
    """Print a benchmark case's header; later results are recorded under it."""
    _SECTION["case"] = title
    print(title)


def peak_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in PEAK_HBM.items() if name in kind), None)


def timeit(fn, *args, iters: int = 20) -> float:
    """Median seconds of one call of jitted fn (after compile and warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, seconds: float, nbytes: float, flops: float) -> None:
    peak = peak_bandwidth()
    frac = f"  {nbytes / seconds / peak:6.1%} of HBM peak" if peak else ""
    RESULTS.append({"case": _SECTION["case"], "name": name, "us": seconds * 1e6,
                    "gb_s": nbytes / seconds / 1e9, "tflop_s": flops / seconds / 1e12,
                    "hbm_fraction": nbytes / seconds / peak if peak else None})
    print(f"  {name:34s} {seconds * 1e6:10.1f} us  {nbytes / seconds / 1e9:8.1f} GB/s  "
          f"{flops / seconds / 1e12:7.2f} TFLOP/s{frac}")


def run(name, fn, args, nbytes, flops):
    try:
        report(name, timeit(jax.jit(fn), *args), nbytes, flops)
    except Exception as err:  # a counterpart that cannot take this shape is reported, not fatal
        message = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
        RESULTS.append({"case": _SECTION["case"], "name": name, "error": message})
        print(f"  {name:34s} failed: {message}")


def bench_decode(platform, b, n, kv_heads, s, h, dtype, int8):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    k = jax.random.normal(keys[1], (b, kv_heads, s, h), dtype)
    v = jax.random.normal(keys[2], (b, kv_heads, s, h), dtype)
    lengths = jnp.full((b,), s, jnp.int32)
    scales = {}
    if int8:
        k, v = (x.astype(jnp.int8) for x in (k, v))
        scales = dict(k_scale=jnp.full((b, kv_heads, s), 0.02, jnp.float32),
                      v_scale=jnp.full((b, kv_heads, s), 0.02, jnp.float32))
    elem = k.dtype.itemsize
    nbytes = 2 * b * kv_heads * s * h * elem + 2 * b * n * h * q.dtype.itemsize
    nbytes += 2 * b * kv_heads * s * 4 if int8 else 0
    flops = 4 * b * n * s * h
    section(f"decode B={b} N={n} K={kv_heads} S={s} H={h} {jnp.dtype(dtype).name}"
          f"{' int8 cache' if int8 else ''}: {nbytes / 1e6:.1f} MB")
    run("xla reference", lambda q, k, v, l: decode_attention_ref(q, k, v, l, **scales),
        (q, k, v, lengths), nbytes, flops)
    if platform in ("tpu", "gpu"):
        run(f"jaxinfer {platform} kernel",
            lambda q, k, v, l: pallas_kernels.decode_attention(q, k, v, l, backend=platform,
                                                               **scales),
            (q, k, v, lengths), nbytes, flops)
    if platform == "gpu" and not int8:
        from jax.experimental.pallas.ops.gpu import decode_attention as ops_decode
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, H], outside the timing
        run("pallas.ops.gpu.decode_attention.gqa",
            lambda q, k, v, l: ops_decode.gqa(q, k, v, kv_seq_len=l), (q, kt, vt, lengths),
            nbytes, flops)


def bench_flash(platform, b, n, kv_heads, t, h, dtype):
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, n, t, h), dtype)
    k = jax.random.normal(keys[1], (b, kv_heads, t, h), dtype)
    v = jax.random.normal(keys[2], (b, kv_heads, t, h), dtype)
    elem = jnp.dtype(dtype).itemsize
    nbytes = (2 * b * n * t * h + 2 * b * kv_heads * t * h) * elem
    flops = 4 * b * n * t * t * h // 2  # causal: half the score matrix
    section(f"flash (causal prefill) B={b} N={n} K={kv_heads} T=S={t} H={h} "
          f"{jnp.dtype(dtype).name}")
    run("xla reference", lambda q, k, v: flash_attention_ref(q, k, v, causal=True),
        (q, k, v), nbytes, flops)
    if platform not in ("tpu", "gpu"):
        return
    run(f"jaxinfer {platform} kernel",
        lambda q, k, v: pallas_kernels.flash_attention(q, k, v, causal=True, backend=platform),
        (q, k, v), nbytes, flops)
    rep = n // kv_heads
    k_full, v_full = jnp.repeat(k, rep, axis=1), jnp.repeat(v, rep, axis=1)  # MHA counterparts
    scale = h ** -0.5
    if platform == "gpu":
        from jax.experimental.pallas.ops.gpu import attention as ops_attention
        args = tuple(jnp.swapaxes(x, 1, 2) for x in (q, k_full, v_full))  # [B, T, N, H]
        run("pallas.ops.gpu.attention.mha (K/V repeated)",
            lambda q, k, v: ops_attention.mha(q, k, v, None, sm_scale=scale, causal=True),
            args, nbytes, flops)
    else:
        from jax.experimental.pallas.ops.tpu import flash_attention as ops_flash
        run("pallas.ops.tpu.flash_attention (K/V repeated)",
            lambda q, k, v: ops_flash.flash_attention(q, k, v, causal=True, sm_scale=scale),
            (q, k_full, v_full), nbytes, flops)


def ragged_step(seqs, n, kv_heads, h, page_size, pages_per_seq, dtype, int8, seed=0):
    """Inputs of one ragged paged attention step: seqs = (kv_len, q_len) per sequence, pages
    handed out in a shuffled order. Returns (args, scales)."""
    rng = np.random.default_rng(seed)
    need = [-(-kv // page_size) for kv, _ in seqs]
    ids = rng.permutation(sum(need))
    table = np.zeros((len(seqs), pages_per_seq), np.int32)
    for s, start in enumerate(np.cumsum([0] + need[:-1])):
        table[s, :need[s]] = ids[start:start + need[s]]
    starts = np.concatenate([[0], np.cumsum([ql for _, ql in seqs])]).astype(np.int32)
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (len(ids), kv_heads, page_size, h)
    q = jax.random.normal(keys[0], (int(starts[-1]), n, h), dtype)
    k, v = (jax.random.normal(key, shape, dtype) for key in keys[1:])
    scales = {}
    if int8:
        k, v = (x.astype(jnp.int8) for x in (k, v))
        scales = dict(k_scale=jnp.full(shape[:3], 0.02, jnp.float32),
                      v_scale=jnp.full(shape[:3], 0.02, jnp.float32))
    args = (q, k, v, jnp.asarray(table), jnp.asarray([kv for kv, _ in seqs], jnp.int32),
            jnp.asarray(starts), jnp.int32(len(seqs)))
    return args, scales


def bench_ragged(platform, name, seqs, n, kv_heads, h, page_size, dtype, int8):
    pages_per_seq = -(-max(kv for kv, _ in seqs) // page_size)
    pages_per_seq = -(-pages_per_seq // 16) * 16  # ops.gpu.paged_attention: k_splits=16 | pps
    args, scales = ragged_step(seqs, n, kv_heads, h, page_size, pages_per_seq, dtype, int8)
    q, k, v, table, kv_lens, starts, num_seqs = args
    elem = k.dtype.itemsize
    kv_tokens = sum(kv for kv, _ in seqs)
    nbytes = 2 * kv_tokens * kv_heads * h * elem + 2 * q.size * q.dtype.itemsize
    nbytes += 2 * kv_tokens * kv_heads * 4 if int8 else 0
    flops = 4 * n * h * sum(sum(range(kv - ql + 1, kv + 1)) for kv, ql in seqs)
    section(f"ragged paged ({name}) seqs={len(seqs)} T={q.shape[0]} N={n} K={kv_heads} H={h} "
          f"page={page_size} {jnp.dtype(dtype).name}{' int8 pages' if int8 else ''}: "
          f"{nbytes / 1e6:.1f} MB")
    run("xla reference",
        lambda *a: pallas_kernels.ragged_paged_attention_ref(*a, **scales), args, nbytes, flops)
    if platform not in ("tpu", "gpu"):
        return
    run(f"jaxinfer {platform} kernel",
        lambda *a: pallas_kernels.ragged_paged_attention(*a, **scales, backend=platform),
        args, nbytes, flops)
    if platform == "tpu" and not int8:
        from jax.experimental.pallas.ops.tpu import ragged_paged_attention as ops_rpa
        kv = jnp.stack([jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)], axis=3)  # [P, ps, K, 2, H]
        kv = kv.reshape(k.shape[0], page_size, 2 * kv_heads, h)  # K at even, V at odd heads
        run("pallas.ops.tpu.ragged_paged_attention",
            lambda q, kv, t, lens, st, ns: ops_rpa.ragged_paged_attention(
                q, kv, lens, t, st, ns, sm_scale=h ** -0.5),
            (q, kv, table, kv_lens, starts, num_seqs.reshape(1)), nbytes, flops)
    if platform == "gpu" and all(ql == 1 for _, ql in seqs):
        from jax.experimental.pallas.ops.gpu import paged_attention as ops_paged
        kt, vt = (jnp.swapaxes(x, 0, 1) for x in (k, v))  # [K, P, ps, H]
        st = tuple(jnp.swapaxes(scales[x], 0, 1) for x in ("k_scale", "v_scale")) if int8 else ()
        run("pallas.ops.gpu.paged_attention",
            lambda q, k, v, t, lens, *sc: ops_paged.paged_attention(q * h ** -0.5, k, v, t, lens,
                                                                     *sc),
            (q, kt, vt, table, kv_lens) + st, nbytes, flops)


def bench_quantized_matmul(platform, k_dim, n_dim, ms):
    if not hasattr(pallas_kernels, "quantized_matmul"):
        print("quantized_matmul not available: skipped")
        return
    w = jax.random.normal(jax.random.key(2), (k_dim, n_dim), jnp.float32) * 0.02
    weights = {"int8": pallas_kernels.quantize_weights(w, bits=8),
               "int4 g128": pallas_kernels.quantize_weights(w, bits=4, group_size=128)}
    w16 = w.astype(jnp.bfloat16)
    backend = platform if platform in ("tpu", "gpu") else "xla"
    for m in ms:
        x = jax.random.normal(jax.random.key(3), (m, k_dim), jnp.bfloat16)
        flops = 2 * m * k_dim * n_dim
        section(f"matmul M={m} K={k_dim} N={n_dim} bf16 activations")
        base = timeit(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                              .astype(x.dtype)), x, w16)
        report("bf16 XLA dot", base, k_dim * n_dim * 2, flops)
        for name, qw in weights.items():
            nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(qw))
            fn = jax.jit(lambda x, qw: pallas_kernels.quantized_matmul(x, qw, backend=backend))
            seconds = timeit(fn, x, qw)
            report(f"{name} {backend} ({base / seconds:.2f}x bf16)", seconds, nbytes, flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (smoke run)")
    args = parser.parse_args()
    platform = jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    small = args.small or platform == "cpu"
    print(f"device: {jax.devices()[0].device_kind} ({platform}); peak HBM "
          f"{peak_bandwidth() or 'unknown'} B/s")
    if platform not in ("tpu", "gpu"):
        print("no accelerator: the Pallas kernels need a TPU or GPU; timing the XLA paths only")
    bf16 = jnp.bfloat16
    s = 1024 if small else 8192
    for n, kv_heads in ((32, 8), (32, 1)):
        bench_decode(platform, 4 if small else 8, n, kv_heads, s, 128, bf16, int8=False)
    bench_decode(platform, 4 if small else 8, 32, 8, s, 128, bf16, int8=True)
    bench_flash(platform, 1, 8 if small else 32, 2 if small else 8, 256 if small else 4096, 128,
                bf16)
    rng = np.random.default_rng(0)
    max_kv = 512 if small else 4096
    decode = [(int(kv), 1) for kv in rng.integers(max_kv // 4, max_kv + 1, 8 if small else 64)]
    chunk = 64 if small else 256
    mixed = decode[:16] + [(max_kv // 2, chunk), (chunk, chunk)]
    for name, seqs in (("decode", decode), ("mixed", mixed)):
        bench_ragged(platform, name, seqs, 8 if small else 32, 2 if small else 8, 128, 16, bf16,
                     int8=False)
    bench_ragged(platform, "decode", decode, 8 if small else 32, 2 if small else 8, 128, 16, bf16,
                 int8=True)
    bench_quantized_matmul(platform, 1024 if small else 8192, 1024 if small else 8192,
                           (1, 16) if small else (1, 8, 16))


if __name__ == "__main__":
    main()
