"""Measure this machine for the ``cpu`` hardware profile: memory bandwidth and matmul FLOP/s.

`jaxinfer calibrate` runs it (a few seconds) and caches the result in
``~/.cache/jaxinfer/calibration.json`` (or ``$XDG_CACHE_HOME``), which ``--hardware cpu`` reads.
"""

from __future__ import annotations

import json
import os
import platform
import time

CACHE_FILE = "calibration.json"


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxinfer", CACHE_FILE)


def _best_time(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def measure(bandwidth_mb: int = 256, matmul_size: int = 2048) -> dict:
    """Memory read bandwidth (a matrix-vector product over a large matrix: every byte read once,
    the decode access pattern) and float32 matmul FLOP/s on the default JAX device."""
    import jax
    import jax.numpy as jnp

    cols = 4096
    w = jnp.ones((bandwidth_mb * 2**20 // 4 // cols, cols), jnp.float32)
    v = jnp.ones((1, w.shape[0]), jnp.float32)
    bw = w.nbytes / _best_time(jax.jit(lambda v, w: v @ w), v, w)
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    flops = 2 * matmul_size**3 / _best_time(jax.jit(lambda a, b: a @ b), a, a)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * 2**30
    return {"memory_bw": bw, "matmul_flops": flops, "memory_bytes": float(memory),
            "interprocess_bw": measure_interprocess_bw(),
            "device": str(jax.devices()[0]), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores", "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}


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


def save(result: dict) -> str:
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    return path


def load_or_calibrate() -> dict:
    """The cached calibration, measuring (and caching) it first if there is none."""
    path = cache_path()
    if os.path.exists(path):
        try:
            with open(path) as fh:
                cached = json.load(fh)
            if "interprocess_bw" not in cached:  # written before it was measured
                cached["interprocess_bw"] = measure_interprocess_bw()
                save(cached)
            return cached
        except (OSError, json.JSONDecodeError):
            pass  # a corrupt cache is re-measured below
    result = measure()
    save(result)
    return result
