"""One-command accelerator check (issue 14, item 10): kernel timings and end-to-end decode, as JSON.

    python scripts/device_check.py out.json            # on a CUDA (or TPU) host: < 8 minutes
    python scripts/device_check.py out.json --smoke    # tiny shapes and model, any host: < 60 s

Kernels (the functions of `scripts/bench_kernels.py`, their `RESULTS` written as is): flash
prefill, decode attention (float and int8 cache), ragged paged attention (decode-only and mixed
steps, float and int8 pages), int8 / int4 quantized matmul at M <= 16 — each jaxinfer Pallas
kernel beside the XLA reference and, where JAX has one, the `jax.experimental.pallas.ops`
counterpart. On a host without an accelerator only the XLA paths run.

End to end: greedy decode tok/s of the 125M bench checkpoint (`jaxinfer.bench.build_checkpoint`,
float32) through `Model.generate` at batch 1 and 8 (`jaxinfer.bench.run_jaxinfer`: prompt 128,
128 new tokens, compile excluded) against the roofline (weights + filled KV cache bytes per step at
the device's peak HBM bandwidth, or the measured copy bandwidth where the peak is unknown), and the
continuous-batching engine's decode tok/s on the same prompts. `--smoke` uses a 2-layer random
model saved as a jaxinfer checkpoint, prompt 8 and 8 new tokens instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402  (a sibling script, not a package module)

import jaxinfer  # noqa: E402
from jaxinfer import EngineConfig, Model, ModelConfig, SamplingParams  # noqa: E402
from jaxinfer import bench  # noqa: E402

SMOKE_MODEL = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, d_ff=128, max_context=64, name="smoke")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one run (full on an accelerator, tiny with --smoke)."""

    decode_seq: int
    """Cached tokens per sequence of the decode attention case."""
    decode_batch: int
    """Sequences of the decode attention case."""
    heads: int
    """Query heads of the attention cases."""
    kv_heads: int
    """KV heads of the attention cases (GQA)."""
    head_dim: int
    """Head size of the attention cases."""
    flash_len: int
    """Prompt length of the flash prefill case."""
    ragged_max_kv: int
    """Longest cached length of the ragged paged cases."""
    ragged_seqs: int
    """Decode sequences of the ragged paged cases."""
    matmul_dim: int
    """K = N of the quantized matmul cases."""
    matmul_ms: tuple[int, ...]
    """Activation rows M of the quantized matmul cases (all <= 16)."""
    prompt_len: int
    """Prompt tokens of the end-to-end runs."""
    new_tokens: int
    """Generated tokens of the end-to-end runs."""
    batches: tuple[int, ...]
    """Batch sizes of the end-to-end runs."""


FULL = Sizes(decode_seq=8192, decode_batch=8, heads=32, kv_heads=8, head_dim=128, flash_len=4096,
             ragged_max_kv=4096, ragged_seqs=64, matmul_dim=8192, matmul_ms=(1, 8, 16),
             prompt_len=128, new_tokens=128, batches=(1, 8))
SMOKE = Sizes(decode_seq=128, decode_batch=2, heads=4, kv_heads=2, head_dim=64, flash_len=64,
              ragged_max_kv=64, ragged_seqs=3, matmul_dim=256, matmul_ms=(1, 16),
              prompt_len=8, new_tokens=8, batches=(1, 2))


def kernel_timings(platform: str, z: Sizes) -> list[dict]:
    """Every kernel case of bench_kernels at sizes `z`; returns its RESULTS."""
    bf16 = jnp.bfloat16
    for kv_heads in (z.kv_heads, 1):
        bench_kernels.bench_decode(platform, z.decode_batch, z.heads, kv_heads, z.decode_seq,
                                   z.head_dim, bf16, int8=False)
    bench_kernels.bench_decode(platform, z.decode_batch, z.heads, z.kv_heads, z.decode_seq,
                               z.head_dim, bf16, int8=True)
    bench_kernels.bench_flash(platform, 1, z.heads, z.kv_heads, z.flash_len, z.head_dim, bf16)
    rng = np.random.default_rng(0)
    decode = [(int(kv), 1) for kv in rng.integers(z.ragged_max_kv // 4, z.ragged_max_kv + 1,
                                                  z.ragged_seqs)]
    chunk = z.ragged_max_kv // 8
    mixed = decode[:16] + [(z.ragged_max_kv // 2, chunk), (chunk, chunk)]
    for name, seqs, int8 in (("decode", decode, False), ("mixed", mixed, False),
                             ("decode", decode, True)):
        bench_kernels.bench_ragged(platform, name, seqs, z.heads, z.kv_heads, z.head_dim, 16,
                                   bf16, int8=int8)
    bench_kernels.bench_quantized_matmul(platform, z.matmul_dim, z.matmul_dim, z.matmul_ms)
    return list(bench_kernels.RESULTS)


def engine_decode(path: str, prompts: np.ndarray, new_tokens: int) -> dict:
    """The engine's generated tok/s on `prompts` (second call: the first compiles)."""
    model = jaxinfer.load(path, dtype="float32")
    batch, prompt_len = prompts.shape
    engine = model.engine(EngineConfig(max_seqs=batch, max_model_len=prompt_len + new_tokens,
                                       token_budget=max(256, batch), prefix_caching=False))
    params = SamplingParams(max_new_tokens=new_tokens, stop_tokens=())
    engine.generate(prompts.tolist(), params)
    stats = engine.generate(prompts.tolist(), params).stats
    return {"tok_s": stats.tokens_per_s, "host_ms_per_token": 1e3 * stats.host_s_per_token,
            "steps": stats.steps, "device_calls": stats.device_calls}


def end_to_end(path: str, vocab: int, z: Sizes, bandwidth: float) -> list[dict]:
    """Static-path decode tok/s and roofline fraction, and engine tok/s, per batch size."""
    rows = []
    for batch in z.batches:
        prompts = np.random.default_rng(batch).integers(3, vocab, (batch, z.prompt_len))
        row = bench.Row(batch=batch)
        bench.run_jaxinfer(path, row, prompts, z.new_tokens, bandwidth, None)
        rows.append({**dataclasses.asdict(row), "engine": engine_decode(path, prompts,
                                                                        z.new_tokens)})
        print(f"e2e batch {batch}: {row.jax_tok_s:.1f} tok/s, roofline {row.roofline:.1%}, "
              f"engine {rows[-1]['engine']['tok_s']:.1f} tok/s", flush=True)
    return rows


def checkpoint(tmp: str, smoke: bool) -> str:
    """The end-to-end checkpoint: the 125M bench model, or (smoke) a tiny random one."""
    path = os.path.join(tmp, "model")
    if smoke:
        Model.random(SMOKE_MODEL, seed=0).save(path)
    else:
        bench.build_checkpoint(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="path of the JSON report to write")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and model (CPU check)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    platform = jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    z = SMOKE if args.smoke else FULL
    peak = bench_kernels.peak_bandwidth()
    bandwidth = peak or bench.measure_bandwidth(64 if args.smoke else 512,
                                                3 if args.smoke else 20)
    report = {"device": jax.devices()[0].device_kind, "platform": platform,
              "jax": jax.__version__, "smoke": args.smoke, "peak_hbm_bytes_s": peak,
              "roofline_bandwidth_bytes_s": bandwidth, "sizes": dataclasses.asdict(z)}
    report["kernels"] = kernel_timings(platform, z)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = SMOKE_MODEL.vocab_size if args.smoke else bench.BENCH_SHAPE["vocab_size"]
        report["end_to_end"] = end_to_end(checkpoint(tmp, args.smoke), vocab, z, bandwidth)
    report["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as fh:
        json.dump(_plain(report), fh, indent=1, allow_nan=False)
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


def _plain(value):
    """`value` with numpy scalars as Python numbers and non-finite floats (figures a run does not
    measure, e.g. the Hugging Face columns of `bench.Row`) as None: strict JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    raise SystemExit(main())
