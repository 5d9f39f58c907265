"""Generation benchmark: jaxinfer vs Hugging Face transformers on one random Llama-shaped checkpoint.

Both frameworks run the same checkpoint in one process: greedy decoding, fixed prompt length, a fixed
number of new tokens (no early stop), warm-up and compilation excluded from the timed runs and
reported separately. The memory-bandwidth roofline is the bytes one decode step must move (all
weights + the filled KV cache) divided by the measured read bandwidth of a large matrix-vector product.

`jaxinfer bench` and `scripts/bench_generate.py` both run `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time

import jax
import numpy as np

from jaxinfer import distributed

# About 125M parameters (issue: d_model 768, 12 layers, 12 heads, 4 KV heads, d_ff 2048, vocab 32000).
BENCH_SHAPE = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=2048)


@dataclasses.dataclass
class Row:
    """One batch size's figures."""

    batch: int
    """Number of prompts decoded together."""
    jax_tok_s: float = float("nan")
    """jaxinfer decode throughput (generated tokens / decode seconds, all rows)."""
    hf_tok_s: float = float("nan")
    """Hugging Face `generate` decode throughput (same definition)."""
    jax_prefill_tok_s: float = float("nan")
    """jaxinfer prompt tokens processed per second."""
    hf_prefill_tok_s: float = float("nan")
    """Hugging Face prompt tokens per second (one forward over the prompts)."""
    compile_s: float = float("nan")
    """jaxinfer first-call time minus a warm call (tracing + XLA compilation)."""
    jax_peak_mb: float = float("nan")
    """Peak resident memory during the jaxinfer run (MiB, whole process)."""
    hf_peak_mb: float = float("nan")
    """Peak resident memory during the Hugging Face run (MiB, whole process)."""
    roofline: float = float("nan")
    """jaxinfer decode step time at the bandwidth bound / measured step time."""


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def measure_bandwidth(size_mb: int = 512, repeats: int = 20) -> float:
    """Best read bytes/s over a `size_mb` float32 array, far larger than the caches: the faster of
    a matrix-vector product (the decode step's access pattern) and a plain sum."""
    import jax.numpy as jnp

    cols = 4096
    w = jnp.ones((size_mb * 2**20 // 4 // cols, cols), jnp.float32)
    x = jnp.ones((1, w.shape[0]), jnp.float32)
    best = float("inf")
    for fn, args in ((jax.jit(lambda x, w: x @ w), (x, w)), (jax.jit(jnp.sum), (w,))):
        fn(*args).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


def build_checkpoint(path: str, seed: int = 0) -> None:
    """Write a random Llama checkpoint of `BENCH_SHAPE` (float32 safetensors) to `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**BENCH_SHAPE, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _vocab_size(path: str) -> int:
    with open(os.path.join(path, "config.json")) as fh:
        return int(json.load(fh)["vocab_size"])


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, prompt_len), dtype=np.int64)


def run_jaxinfer(path: str, row: Row, prompts: np.ndarray, new_tokens: int,
                 bandwidth: float, quantize: str | None) -> None:
    previous = jax.config.jax_enable_compilation_cache
    # The first call compiles from scratch: programs in the persistent cache (an earlier run's)
    # would turn "compile s" into a cache read. Warm start-up is measured by `measure_ttft`.
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        _run_jaxinfer(path, row, prompts, new_tokens, bandwidth, quantize)
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def _run_jaxinfer(path: str, row: Row, prompts: np.ndarray, new_tokens: int,
                  bandwidth: float, quantize: str | None) -> None:
    import jaxinfer

    model = jaxinfer.load(path, dtype="float32", quantize=quantize)
    token_lists = prompts.tolist()
    kwargs = dict(max_new_tokens=new_tokens, stop_tokens=[], temperature=0.0)
    _reset_peak_rss()
    t0 = time.perf_counter()
    model.generate(token_lists, **kwargs)
    first = time.perf_counter() - t0
    res = model.generate(token_lists, **kwargs)
    t0 = time.perf_counter()
    res = model.generate(token_lists, **kwargs)
    warm = time.perf_counter() - t0
    row.jax_peak_mb = _peak_rss_mb()
    row.compile_s = first - warm
    b, t = prompts.shape
    row.jax_prefill_tok_s = b * t / res.timings["prefill_s"]
    row.jax_tok_s = b * (new_tokens - 1) / res.timings["decode_s"]
    kv_bytes = model.memory_report(b, t + new_tokens // 2)["cache_bytes"]
    step_bytes = model.param_bytes + kv_bytes
    row.roofline = (step_bytes / bandwidth) / (res.timings["decode_s"] / (new_tokens - 1))


def run_hf(path: str, row: Row, prompts: np.ndarray, new_tokens: int) -> None:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.as_tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=0)
    _reset_peak_rss()
    with torch.inference_mode():
        model.generate(ids, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        model(ids, attention_mask=mask)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new_tokens
    row.hf_peak_mb = _peak_rss_mb()
    b, t = prompts.shape
    row.hf_prefill_tok_s = b * t / prefill
    row.hf_tok_s = b * (new_tokens - 1) / max(total - prefill, 1e-9)


_TTFT_PROGRAM = """
import sys, time
import jaxinfer
model = jaxinfer.load(sys.argv[1])
t0 = time.perf_counter()
model.generate([list(range(3, 35))], max_new_tokens=1, stop_tokens=[])
print(time.perf_counter() - t0)
"""


def measure_ttft(path: str) -> tuple[float, float]:
    """Time-to-first-token of a 32-token prompt in a fresh process: (cold, warm persistent cache)."""
    import subprocess
    import sys

    times = []
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, JAXINFER_COMPILATION_CACHE=cache_dir)
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _TTFT_PROGRAM, path], env=env,
                                 capture_output=True, text=True, check=True)
            times.append(float(out.stdout.strip().splitlines()[-1]))
    return times[0], times[1]


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    """A figure for the table; "n/a" for one not measured (e.g. the HF columns with --no-hf)."""
    return "n/a" if math.isnan(value) else f"{value:{spec}}{suffix}"


def print_table(rows: list[Row], args, bandwidth: float, ttft) -> None:
    from rich.console import Console
    from rich.table import Table

    weights = f"jaxinfer {args.quantize} weights" if args.quantize else "float32 weights"
    table = Table(title=f"greedy generation, {weights}, prompt {args.prompt_len}, "
                        f"{args.new_tokens} new tokens"
                        f" — {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
                        f" jax {jax.__version__} ({jax.default_backend()}),"
                        f" bandwidth {bandwidth / 1e9:.1f} GB/s")
    for col in ("batch", "jaxinfer tok/s", "HF tok/s", "ratio", "jax prefill tok/s",
                "HF prefill tok/s", "compile s", "jax peak MiB", "HF peak MiB", "roofline"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.batch), _fmt(r.jax_tok_s, ".1f"), _fmt(r.hf_tok_s, ".1f"),
                      _fmt(r.jax_tok_s / r.hf_tok_s, ".2f", "x"), _fmt(r.jax_prefill_tok_s, ".0f"),
                      _fmt(r.hf_prefill_tok_s, ".0f"), _fmt(r.compile_s, ".1f"),
                      _fmt(r.jax_peak_mb, ".0f"), _fmt(r.hf_peak_mb, ".0f"),
                      _fmt(r.roofline, ".0%"))
    console = Console(width=180)
    console.print(table)
    if ttft is not None:
        console.print(f"time to first token, 32-token prompt, fresh process: cold compile "
                      f"{ttft[0]:.2f} s, warm persistent cache {ttft[1]:.2f} s")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark generation against Hugging Face transformers")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32],
                   help="batch sizes to measure (one table row each)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens generated per sequence (greedy)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="jaxinfer weight quantization (Hugging Face stays float32)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--checkpoint", default=None,
                   help="reuse a checkpoint dir (default: build a random one in a temp dir)")
    g = p.add_argument_group("engine benchmark (--engine)")
    g.add_argument("--engine", action="store_true",
                   help="benchmark the continuous-batching engine on issue 14's skewed workload "
                        "against jaxinfer and Hugging Face static batches and the roofline "
                        "(jaxinfer.bench_engine); ignores --batch/--prompt-len/--new-tokens")
    g.add_argument("--model", default="30m", choices=("30m", "125m"),
                   help="engine benchmark model shape (random weights) (default: %(default)s)")
    g.add_argument("--requests", type=int, default=512,
                   help="engine benchmark requests (default: %(default)s)")
    g.add_argument("--json", default=None, metavar="FILE",
                   help="also write the engine benchmark's report as JSON to FILE")
    distributed.add_distributed_args(p)
    p.set_defaults(handler=run_bench)


def run_bench(args) -> int:
    if args.engine:
        return run_engine_bench(args)
    distributed.initialize_from_args(args)
    with distributed.native_stdout_to_stderr():
        return _bench_and_print(args)


def _bench_and_print(args) -> int:
    from rich.progress import Progress

    bandwidth = measure_bandwidth()
    rows = []
    leader = distributed.is_leader()  # every process runs the benchmark; one reports it
    with tempfile.TemporaryDirectory() as tmp, Progress(disable=not leader) as progress:
        path = args.checkpoint or tmp
        task = progress.add_task("benchmark", total=2 + 2 * len(args.batch))
        if args.checkpoint is None:
            progress.update(task, description="building random 125M Llama checkpoint")
            build_checkpoint(path)
        progress.advance(task)
        vocab = _vocab_size(path)
        for b in args.batch:
            row = Row(batch=b)
            prompts = _prompts(b, args.prompt_len, vocab, seed=b)
            progress.update(task, description=f"jaxinfer batch {b}")
            run_jaxinfer(path, row, prompts, args.new_tokens, bandwidth, args.quantize)
            progress.advance(task)
            if not args.no_hf:
                progress.update(task, description=f"transformers batch {b}")
                run_hf(path, row, prompts, args.new_tokens)
            progress.advance(task)
            rows.append(row)
        progress.update(task, description="time to first token (2 fresh processes)")
        ttft = measure_ttft(path)
        progress.advance(task)
    if leader:
        print_table(rows, args, bandwidth, ttft)
    return 0


def run_engine_bench(args) -> int:
    """`jaxinfer bench --engine`: one process (the engine's multi-process runs are not
    benchmarked)."""
    from jaxinfer import bench_engine, validation

    if args.num_processes not in (None, 1):
        raise validation.InvalidArgument("bench --engine runs in one process: drop "
                                         "--num-processes")
    validation.integer("--requests", args.requests, 1)
    report = bench_engine.run(args.model, args.requests, hf=not args.no_hf)
    bench_engine.print_report(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    return run_bench(parser.parse_args(["bench", *(argv or [])]))
