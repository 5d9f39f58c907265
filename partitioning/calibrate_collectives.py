"""Collective latency and bandwidth across simulated host devices (for `partitioning.calibrate`).

The device count of a JAX process is fixed when JAX starts (``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` must precede the import), so `measure_collectives`
runs this module as a subprocess with the flag, whatever the parent's devices are.

In the subprocess every collective runs inside one jitted, `shard_map`'d `lax.fori_loop` on a
(2, 2, 2)-style mesh, each iteration depending on the last: the time of R2 iterations minus that of
R1, over R2 - R1, is one execution inside a program, without the dispatch of a program (as the
collectives of a decode step run). For each kind (all-gather, reduce-scatter, all-reduce,
all-to-all):

- latency over groups of 2, 4 and 8 devices at a tiny payload (every group of the mesh runs at
  once, as in a real step), fitted as ``latency + hops x hop_latency`` with hops = group - 1
  (a switch: `partitioning.efficiency.collective_term`);
- bandwidth over the whole mesh from payloads of 1 KiB, 256 KiB and 4 MiB per chip (quick: 1 KiB
  and 1 MiB): the slope of time over the bytes one chip sends (the `partitioning.plan`
  convention: all-gather output x (K-1)/K, reduce-scatter input x (K-1)/K, all-reduce 2 x
  (K-1)/K, all-to-all (K-1)/K).

The profile takes one latency, one hop latency and one bandwidth (`partitioning.hardware.
cpu_profile`): the medians over the kinds, which are all reported.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
FACTOR = {"all-reduce": 2.0}
"""Bytes per chip = FACTOR x elements x 4 x (K-1)/K (`partitioning.cost_model.Collective`)."""


def _mesh_shape(devices: int) -> tuple[int, int, int]:
    """A 3-axis mesh whose first one, two and three axes give groups of growing size."""
    sizes, rest = [], devices
    for _ in range(2):
        sizes.append(2 if rest % 2 == 0 and rest > 2 else 1)
        rest //= sizes[-1]
    return (sizes[0], sizes[1], rest)


def _loop_program(kind: str, mesh, axes: tuple[str, ...], elements: int):
    """(jitted program, input): ``program(x, reps)`` runs `reps` dependent executions of one
    collective per chip on `elements` float32 values (its per-chip volume: all-gather output,
    reduce-scatter input); `reps` is an argument, so one compilation serves every count."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    k = math.prod(mesh.shape[a] for a in axes)

    def body(_, x):
        if kind == "all-gather":  # carry one shard [e/K], gather [e], keep a shard
            return jax.lax.all_gather(x, axes, tiled=True)[:x.shape[0]] * 0.5
        if kind == "reduce-scatter":  # carry [e], scatter [e/K], tile back
            return jnp.tile(jax.lax.psum_scatter(x, axes, tiled=True), k) * (1.0 / k)
        if kind == "all-reduce":
            return jax.lax.psum(x, axes) * (1.0 / k)
        return jax.lax.all_to_all(x, axes, 0, 0, tiled=True)

    def run(x, reps):
        return jax.lax.fori_loop(0, reps, body, x)

    everything = tuple(mesh.axis_names)
    per_chip = elements // k if kind == "all-gather" else elements
    fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(everything), P()),
                               out_specs=P(everything), check_vma=False))
    return fn, jnp.ones((per_chip * mesh.size,), jnp.float32)


def _execution_seconds(kind, mesh, axes, elements, reps=(2, 10), repeats=3) -> float:
    """Seconds of one execution inside a program (difference of two loop lengths)."""
    import jax
    import numpy as np

    fn, x = _loop_program(kind, mesh, axes, elements)
    best = []
    for r in reps:
        r = np.int32(r)
        jax.block_until_ready(fn(x, r))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(x, r))
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return max(best[1] - best[0], 0.0) / (reps[1] - reps[0])


def bytes_per_chip(kind: str, elements: int, group: int) -> float:
    return FACTOR.get(kind, 1.0) * elements * 4.0 * (group - 1) / group


TINY = 2**8
"""Float32 elements per chip of the latency points (1 KiB)."""


def _kind(kind: str, mesh, groups, sizes, repeats: int) -> dict:
    """One kind's latency points over `groups`, bandwidth points over the whole mesh (its
    tiny point is the whole group's latency point) and their fits."""
    from partitioning.calibrate import fit_line

    n = mesh.size
    lat = []
    for axes in groups:
        k = math.prod(mesh.shape[a] for a in axes)
        lat.append([k, _execution_seconds(kind, mesh, axes, TINY, repeats=repeats)])
    hop, latency = fit_line([k - 1 for k, _ in lat], [t for _, t in lat])
    bw = [[bytes_per_chip(kind, TINY, n), lat[-1][1]]]
    bw += [[bytes_per_chip(kind, e, n), _execution_seconds(kind, mesh, groups[-1], e,
                                                           repeats=repeats)] for e in sizes]
    slope, _ = fit_line([b for b, _ in bw], [t for _, t in bw])
    return {"latency_points": lat, "latency_s": latency, "hop_latency_s": hop,
            "bandwidth_points": bw, "bandwidth": 1.0 / slope if slope > 0 else float("inf")}


def run_measurements(quick: bool) -> dict:
    """In this process (its devices): every kind's points and fits, and their medians."""
    import jax

    from partitioning.mesh import make_mesh

    shape = _mesh_shape(jax.device_count())
    mesh = make_mesh(shape)
    groups = {math.prod(shape[:i]): tuple("xyz"[:i]) for i in (3, 2, 1)}  # size -> axes
    groups = [axes for size, axes in sorted(groups.items()) if size > 1]
    if quick:
        groups = [groups[0], groups[-1]] if len(groups) > 1 else groups
    sizes = (2**18,) if quick else (2**16, 2**20)  # float32 per chip: 1 MiB; 256 KiB, 4 MiB
    out = {"devices": mesh.size, "mesh": list(shape),
           "kinds": {kind: _kind(kind, mesh, groups, sizes, 3) for kind in KINDS}}
    for field in ("latency_s", "hop_latency_s", "bandwidth"):
        out[field] = statistics.median(v[field] for v in out["kinds"].values())
    return out


def host_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess with `devices` simulated CPU devices (the device-count
    flag replaced, other XLA flags kept) that imports this checkout's packages."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def measure_collectives(devices: int = 8, quick: bool = False, timeout_s: float = 300) -> dict:
    """`run_measurements` with `devices` simulated host devices: in this process if it has
    exactly those (CPU) devices, else in a subprocess started with the device-count flag."""
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() == devices:
        return run_measurements(quick)
    env = host_devices_env(devices)
    cmd = [sys.executable, "-m", "partitioning.calibrate_collectives"] + (["--quick"] if quick
                                                                          else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"collective calibration failed ({' '.join(cmd)}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_measurements("--quick" in sys.argv[1:])))
