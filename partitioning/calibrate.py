"""Measure this machine for the ``cpu`` hardware profile (issue 16 item 3).

`jaxinfer calibrate` runs `measure` (about half a minute on 2 cores) and caches the result in
``~/.cache/jaxinfer/calibration.json`` (or ``$XDG_CACHE_HOME``), which ``--hardware cpu`` reads
(`partitioning.hardware.cpu_profile` turns it into a profile and its `EfficiencyParams`).

What is measured, and which profile / efficiency term it becomes:

- ``matmul_curve``: float32 FLOP/s of a chain of distinct ``[M, D] x [D, F]`` / ``[M, F] x [F, D]``
  matmuls (the model's shapes; their weights, several times the last-level cache, are streamed
  from memory as in a decode step) for M = 1 ... 512 rows. ``matmul_flops`` (the peak) is the
  best rate measured, this curve or one large square matmul. ``matmul_peak_fraction`` and
  ``matmul_half_tokens`` are fitted to the curve's M >= 2 points (`fit_matmul_curve`), for
  comparison: the profile interpolates the measured points themselves (its ``matmul_curve``);
  ``matvec_fraction`` is the M = 1 point: XLA:CPU runs a one-row product as a matrix-vector
  kernel, which streams the weights at memory speed, while M >= 2 runs through a GEMM that
  packs them (much slower per byte at small M: no single saturating curve fits both).
- ``attention_fraction``: FLOP/s of jaxinfer's XLA prefill attention (the layout changes around
  it, QK^T, causal mask, softmax, AV) at the bench model's heads (12 query / 4 KV heads of 64)
  over 256 tokens, a chain of layers, as a fraction of the peak (FLOPs counted as
  `cost_model.attention_flops_per_chip`: the unfused softmax and copies are in the fraction).
- ``kv_fraction``: bytes/s of jaxinfer's XLA decode attention (the one-token cache write, then
  `decode_attention` over the whole cache) for 16 sequences of 256 cached positions at the bench
  model's heads, a chain of layers, over ``memory_bw``.
- ``memory_bw``: bytes/s of that chain at M = 1 (weight streaming, the decode pattern); it is the
  profile's ``hbm_bw`` (``hbm_fraction`` 1: the bandwidth is the achieved one).
  ``sum_bw`` (a plain reduction over the same bytes) is recorded for comparison.
- ``layer_overhead_s`` / ``step_overhead_s``: the decode step of jaxinfer's own program for a
  tiny model (every op's launch cost, no data to speak of) at two layer counts; the slope per
  layer and the intercept (`fit_line`) become ``block_overhead_s`` (slope / sub-blocks per
  layer) and ``step_overhead_s``.
- ``collectives``: all-gather, reduce-scatter, all-reduce and all-to-all across 8 simulated host
  devices (`partitioning.calibrate_collectives`, in a subprocess with
  ``--xla_force_host_platform_device_count``): per-execution latency over groups of 2, 4 and 8
  devices (``collective_latency_s`` + hops x ``hop_latency_s``) and the per-chip bandwidth of
  the payload (the profile's ``axis_bw``).
- ``interprocess_bw``: a local socket pair (the ``dcn_bw`` between `jax.distributed` processes).

The cache carries ``version``. `load` refuses a file of another version (the first, unversioned
format held only ``memory_bw`` and ``matmul_flops``) with `CalibrationVersionError`;
`load_or_calibrate` (``--hardware cpu``) warns, measures again and overwrites it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

CACHE_FILE = "calibration.json"
VERSION = 3
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Rows M of the matmul curve."""
SHAPES = (768, 2048)
"""(D, F) of the matmul curve: the 125M bench model's d_model and d_ff (`jaxinfer.bench`)."""


class CalibrationVersionError(ValueError):
    """The calibration file was written in another format: re-run `jaxinfer calibrate`."""


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxinfer", CACHE_FILE)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, *args, repeats: int = 5) -> tuple[float, float]:
    """(best, median) seconds of `fn(*args)` after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


# ---- fits ---------------------------------------------------------------------------------------
def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs, both clipped at >= 0 (a cost never
    falls with size, and a fixed cost is never negative)."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError("fit_line needs at least two distinct x values")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx, 0.0)
    return slope, max(my - slope * mx, 0.0)


def fit_matmul_curve(points, peak: float) -> tuple[float, float]:
    """(matmul_peak_fraction, matmul_half_tokens) of ``efficiency = f * M / (M + h)`` fitted to
    `points` [(M, FLOP/s)] in log space (each point's relative error counts alike): a grid over
    h with f in closed form, then f clipped to <= 1 (rates above `peak` count as the peak)."""
    import math

    if not points or peak <= 0:
        raise ValueError("fit_matmul_curve needs measured points and a positive peak")
    logs = [(m, math.log(min(rate / peak, 1.0))) for m, rate in points]
    best = None
    for i in range(0, 601):
        h = 0.0 if i == 0 else 10 ** (-2 + 6 * i / 600)  # 0, then 0.01 ... 1e4 rows
        shape = [math.log(m / (m + h)) for m, _ in logs]
        log_f = min(sum(e - s for (_, e), s in zip(logs, shape)) / len(logs), 0.0)
        err = sum((log_f + s - e) ** 2 for (_, e), s in zip(logs, shape))
        if best is None or err < best[0]:
            best = (err, math.exp(log_f), h)
    return best[1], best[2]


# ---- host measurements --------------------------------------------------------------------------
def _stream_weights(d: int, f: int, megabytes: int):
    """Distinct float32 [D, F] and [F, D] matrices, alternating, of about `megabytes` in all."""
    import jax.numpy as jnp

    count = max(2, round(megabytes * 2**20 / (4 * d * f) / 2) * 2)
    return [jnp.full((d, f) if i % 2 == 0 else (f, d), 1e-4 * (i + 1), jnp.float32)
            for i in range(count)]


def _chain(h, weights):
    for w in weights:
        h = h @ w
    return h


def measure_matmul_curve(d: int = SHAPES[0], f: int = SHAPES[1], tokens=TOKENS,
                         megabytes: int = 128, repeats: int = 3,
                         passes: int = 2) -> tuple[list, float]:
    """([(M, FLOP/s)], bytes/s at M = 1): the chain of streamed weights at each M (module
    docstring), the best of `repeats` x `passes` sweeps over M."""
    import jax
    import jax.numpy as jnp

    weights = _stream_weights(d, f, megabytes)
    nbytes = sum(w.nbytes for w in weights)
    chain = jax.jit(_chain)
    best = dict.fromkeys(tokens, math.inf)
    for _ in range(passes):  # sweeps apart in time: a slow spell of a shared machine hits one
        for m in tokens:
            seconds, _ = timed(chain, jnp.ones((m, d), jnp.float32), weights, repeats=repeats)
            best[m] = min(best[m], seconds)
    curve = [(m, 2 * m * nbytes / 4 / best[m]) for m in tokens]
    return curve, nbytes / best[1] if 1 in best else 0.0


def measure_peak(size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of one large float32 square matmul (operands resident in cache)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    best, _ = timed(jax.jit(lambda a, b: a @ b), a, a, repeats=repeats)
    return 2 * size**3 / best


def measure_sum_bandwidth(megabytes: int = 128, repeats: int = 3) -> float:
    """Bytes/s of a plain float32 reduction over `megabytes` (for comparison with memory_bw)."""
    import jax
    import jax.numpy as jnp

    w = jnp.ones((megabytes * 2**20 // 4 // 4096, 4096), jnp.float32)
    best, _ = timed(jax.jit(jnp.sum), w, repeats=repeats)
    return w.nbytes / best


def bench_layer_config():
    """A bench-model-shaped decoder (`SHAPES`, 12 query / 4 KV heads of 64) for the attention
    measurement."""
    from jaxinfer.config import ModelConfig

    d, f = SHAPES
    return ModelConfig(name="bench-layer", vocab_size=256, d_model=d, n_layers=1, n_heads=12,
                       n_kv_heads=4, head_dim=d // 12, d_ff=f, max_context=2048)


def measure_attention_fraction(peak: float, tokens: int = 256, layers: int = 4,
                               repeats: int = 3) -> float:
    """Fraction of `peak` jaxinfer's XLA prefill attention reaches (module docstring): as
    `jaxinfer.model` runs it, queries, keys and values [B, T, heads, H] made heads-major, the
    attention, its output made token-major again."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels

    cfg = bench_layer_config()
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = jnp.full((1, tokens, n, h), 0.01, jnp.float32)
    kv = jnp.full((1, tokens, k, h), 0.02, jnp.float32)
    lengths = jnp.full((1,), tokens, jnp.int32)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)

    def chain(q, k, v):
        for _ in range(layers):
            out = pallas_kernels.flash_attention(heads_major(q), heads_major(k), heads_major(v),
                                                 causal=True, lengths=lengths, backend="xla")
            q = heads_major(out)
        return q

    best, _ = timed(jax.jit(chain), q, kv, kv, repeats=repeats)
    flops = 4 * layers * tokens * tokens * n * h
    return min(flops / best / peak, 1.0)


def measure_kv_bandwidth(batch: int = 16, positions: int = 256, layers: int = 4,
                         repeats: int = 3) -> float:
    """Bytes/s of the KV-cache reads of jaxinfer's XLA decode attention (module docstring): each
    layer writes one token per sequence into its (donated) caches [B, K, S, H] as
    `KVCache.write_token` does, then attends over them."""
    import functools

    import jax
    import jax.numpy as jnp

    import pallas_kernels

    cfg = bench_layer_config()
    n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shape = (batch, k, positions, h)
    caches = [jnp.zeros(shape, jnp.float32) for _ in range(2 * layers)]
    q, new = jnp.full((batch, n, h), 0.1), jnp.full((batch, k, h), 0.2)
    rows, pos = jnp.arange(batch), jnp.full((batch,), positions - 1, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=1)
    def chain(q, caches):
        caches = [c.at[rows, :, pos].set(new) for c in caches]
        for i in range(layers):
            q = pallas_kernels.decode_attention(q, caches[2 * i], caches[2 * i + 1], pos + 1,
                                                backend="xla")
        return q, caches

    best = math.inf
    for i in range(repeats + 1):  # the first call compiles
        start = time.perf_counter()
        out, caches = chain(q, caches)
        out.block_until_ready()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * layers * batch * k * positions * h * 4 / best


def tiny_config(n_layers: int, vocab: int = 256):
    """A model with every op of a real decoder and almost no data (overhead calibration)."""
    from jaxinfer.config import ModelConfig

    return ModelConfig(name=f"tiny-{n_layers}", vocab_size=vocab, d_model=32,
                       n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                       max_context=512)


def decode_step_seconds(model, batch: int, prompt_len: int, steps=(33, 64),
                        repeats: int = 3) -> tuple[float, float]:
    """(seconds per decode step, cache positions): `generate` (the real decode loop) run for
    two numbers of new tokens in one output bucket, alternately; the difference of the best
    times over the difference of steps cancels prefill, first-token sampling and host
    transfers."""
    import numpy as np

    from jaxinfer.generate import MIN_OUTPUT_BUCKET, bucket

    prompts = np.random.default_rng(batch).integers(
        3, model.config.vocab_size, size=(batch, prompt_len)).tolist()
    if bucket(steps[0], MIN_OUTPUT_BUCKET) != bucket(steps[1], MIN_OUTPUT_BUCKET):
        raise ValueError(f"steps {steps} must share one output bucket (one decode program)")

    def run(new: int) -> float:
        return model.generate(prompts, max_new_tokens=new, stop_tokens=[],
                              temperature=0.0).timings["decode_s"]

    run(steps[0]), run(steps[1])  # warm-up (compiles)
    times = [(run(steps[0]), run(steps[1])) for _ in range(repeats)]  # interleaved: a slow
    short, long_ = (min(t) for t in zip(*times))  # spell of a shared machine hits both
    context = (model._generator.prompt_bucket(prompt_len)
               + bucket(steps[1], MIN_OUTPUT_BUCKET))
    return max(long_ - short, 0.0) / (steps[1] - steps[0]), context


def measure_overheads(layers=(1, 6), repeats: int = 3) -> dict:
    """Per-layer and per-step fixed cost of jaxinfer's decode step (a tiny model at each layer
    count, batch 1): slope and intercept of step time over layers."""
    from jaxinfer.api import Model

    times = []
    for n in layers:
        model = Model.random(tiny_config(n))
        times.append(decode_step_seconds(model, 1, 16, (129, 256), repeats=repeats)[0])
    slope, intercept = fit_line(list(layers), times)
    return {"layer_overhead_s": slope, "step_overhead_s": intercept,
            "overhead_points": [[n, t] for n, t in zip(layers, times)]}


def measure_interprocess_bw(megabytes: int = 64) -> float:
    """Bytes/s through a local socket pair (a sender thread, this thread receiving): the kernel
    path gloo's cross-process collectives take between `jax.distributed` processes on one
    machine (the 'cpu' profile's DCN bandwidth)."""
    import socket
    import threading

    total, chunk = megabytes * 2**20, b"\0" * 2**20
    ours, theirs = socket.socketpair()
    child = threading.Thread(target=lambda: [theirs.sendall(chunk) for _ in range(megabytes)])
    start = time.perf_counter()
    child.start()
    received = 0
    while received < total:
        received += len(ours.recv(4 * 2**20))
    seconds = time.perf_counter() - start
    child.join()
    ours.close()
    theirs.close()
    return total / seconds


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16.0 * 2**30


def measure_local(quick: bool = False) -> dict:
    """The terms of the module docstring that one device measures (all but the collectives and
    the interprocess bandwidth). `quick`: smaller sizes and fewer repeats (tests); the fitted
    form is the same."""
    import jax

    started = time.perf_counter()
    repeats = 2 if quick else 5  # the best of several: shared machines slow down in bursts
    curve, memory_bw = measure_matmul_curve(
        *SHAPES, tokens=(1, 2, 8, 32, 128) if quick else TOKENS,
        megabytes=64 if quick else 128, repeats=repeats, passes=1 if quick else 2)
    peak = max([measure_peak(512 if quick else 1024, repeats)] + [r for _, r in curve])
    fraction, half = fit_matmul_curve([p for p in curve if p[0] >= 2], peak)
    return {
        "version": VERSION, "cpu": cpu_name(), "cores": os.cpu_count(),
        "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores",
        "device": str(jax.devices()[0]), "jax": jax.__version__,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "memory_bytes": _memory_bytes(),
        "matmul_shapes": list(SHAPES), "matmul_curve": [[m, r] for m, r in curve],
        "matmul_flops": peak, "matmul_peak_fraction": fraction, "matmul_half_tokens": half,
        "matvec_fraction": min(dict(curve)[1] / peak, 1.0),
        "attention_fraction": measure_attention_fraction(peak, 128 if quick else 256,
                                                         repeats=repeats),
        "kv_fraction": min(measure_kv_bandwidth(8 if quick else 16, repeats=repeats)
                           / memory_bw, 1.0),
        "memory_bw": memory_bw, "sum_bw": measure_sum_bandwidth(32 if quick else 128, repeats),
        **measure_overheads((1, 2) if quick else (1, 6), repeats=repeats),
        "calibration_s": time.perf_counter() - started,
    }


def measure(quick: bool = False, collective_devices: int = 8) -> dict:
    """Every term of the module docstring: `measure_local` on the default JAX device, and the
    collectives over `collective_devices` simulated host devices in a subprocess."""
    from partitioning import calibrate_collectives

    started = time.perf_counter()
    result = measure_local(quick)
    result["collectives"] = calibrate_collectives.measure_collectives(collective_devices, quick)
    result["interprocess_bw"] = measure_interprocess_bw(16 if quick else 64)
    result["calibration_s"] = time.perf_counter() - started
    return result


MEDIAN_FIELDS = ("matmul_flops", "matmul_peak_fraction", "matmul_half_tokens", "matvec_fraction",
                 "attention_fraction", "kv_fraction", "memory_bw", "sum_bw", "layer_overhead_s",
                 "step_overhead_s")
"""The one-device terms `median_of` takes the median of."""


def median_of(results: list[dict]) -> dict:
    """One calibration from several of this machine: the last one's fields, each of
    `MEDIAN_FIELDS` the median over all of them, the matmul curve the median per M (over the Ms
    every curve has). One calibration on a shared machine can catch a slow (or fast) spell; the
    median of several does not follow it."""
    if not results:
        raise ValueError("median_of needs at least one calibration")
    out = dict(results[-1])
    for key in MEDIAN_FIELDS:
        if all(key in r for r in results):
            out[key] = statistics.median(r[key] for r in results)
    curves = [{m: rate for m, rate in r["matmul_curve"]} for r in results if r.get("matmul_curve")]
    if len(curves) == len(results):
        ms = sorted(set.intersection(*(set(c) for c in curves)))
        out["matmul_curve"] = [[m, statistics.median(c[m] for c in curves)] for m in ms]
    out["calibrations"] = len(results)
    return out


# ---- cache --------------------------------------------------------------------------------------
def save(result: dict, path: str | None = None) -> str:
    """Write `result` as JSON to `path` (default `cache_path`) atomically: a reader never sees
    a half-written file (several processes may calibrate at once)."""
    path = path or cache_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, path)
    return path


def load(path: str | None = None) -> dict:
    """A saved calibration; `CalibrationVersionError` if it is of another format version."""
    path = path or cache_path()
    with open(path) as fh:
        result = json.load(fh)
    version = result.get("version", 1) if isinstance(result, dict) else None
    if version != VERSION:
        raise CalibrationVersionError(
            f"calibration file {path} has format version {version}, this jaxinfer reads "
            f"version {VERSION} (matmul curve, overheads, collectives): re-run "
            "`jaxinfer calibrate` to measure this machine again")
    return result


def measure_in_subprocess(timeout_s: float = 900) -> dict:
    """`measure` in a fresh single-device JAX process: the caller's devices (a test's 8
    simulated ones, a `jax.distributed` process's) change neither the one-device figures nor
    the collective subprocess."""
    import subprocess

    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "partitioning.calibrate"], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed (python -m partitioning.calibrate):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_or_calibrate() -> dict:
    """The cached calibration, measuring (`measure_in_subprocess`) and caching it first if
    there is none, it is unreadable, or it is of another format version (a warning names the
    file). Processes calibrating at once take turns on a lock file: the first measures, the
    others read its result."""
    import fcntl
    import warnings

    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            try:
                return load(path)
            except CalibrationVersionError as err:
                warnings.warn(f"{err}; measuring now (about a minute) and overwriting it",
                              stacklevel=2)
            except (OSError, json.JSONDecodeError):
                warnings.warn(f"calibration file {path} is unreadable; measuring again",
                              stacklevel=2)
        else:
            print(f"no calibration of this machine at {path}: measuring it (about a minute, "
                  "once; `jaxinfer calibrate` does it explicitly)", file=sys.stderr, flush=True)
        result = measure_in_subprocess()
        save(result, path)
        return result


if __name__ == "__main__":
    print(json.dumps(measure()))
