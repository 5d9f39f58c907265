"""The two engine costs the cost model leaves out, measured once on this machine.

`jaxinfer.engine_sim` prices an engine step with `partitioning.efficiency` (the ``cpu`` profile
measured by `jaxinfer calibrate`) plus two terms measured here and cached beside that
calibration (``engine_calibration.json`` in the same directory):

- ``attention``: the XLA twin of ragged paged attention (`pallas_kernels.ragged_paged_attention`
  with backend 'xla', what the engine runs on CPU) timed alone for one layer at the model's head
  shape and page size, at three step shapes (32 one-token decodes over tables of 8 and 32 pages,
  a 256-token prefill chunk beside 31 decodes over 16 pages). Its cost is the gathered K/V bytes
  (every work item copies the table's pages) and the FLOPs over the gathered keys; the two rates
  (seconds per byte, per FLOP) are the non-negative least-squares fit of the three times. Keyed
  by head shape, page size and dtype, measured the first time a model needs it (seconds).
- ``call_overhead_s``: what a device call costs beyond its steps: host scheduling and
  bookkeeping, input transfer, dispatch. A tiny model (`calibrate.tiny_config`, whose steps are
  almost only fixed costs) runs a small workload through the real engine; the overhead is
  (wall - steps x its decode step time) / device calls, the decode step time being the
  calibration's own fit for that model (step_overhead_s + layers x layer_overhead_s).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.engine_sim import AttentionCost, gather_items
from partitioning import calibrate

CACHE_FILE = "engine_calibration.json"
VERSION = 1
ATTENTION_SHAPES = ((32, 32, 8, False), (32, 32, 32, False), (256, 32, 16, True))
"""(rows T, slots S, table width J pages, prefill chunk?) of the attention measurements."""


def cache_path() -> str:
    """``engine_calibration.json`` beside the ``cpu`` calibration."""
    return os.path.join(os.path.dirname(calibrate.cache_path()), CACHE_FILE)


def attention_key(cfg: ModelConfig, page_size: int, dtype: str) -> str:
    return f"{cfg.n_heads}x{cfg.head_dim}/kv{cfg.n_kv_heads}/page{page_size}/{dtype}"


def _step_arrays(rows: int, slots: int, width: int, page_size: int, prefill: bool):
    """query_start, kv_lens and page_table of a step: one token per slot, or (prefill) a chunk
    of rows - slots + 1 tokens in slot 0 and one token in each other slot; every table full."""
    lens = np.ones(slots, np.int32)
    if prefill:
        lens[0] = rows - slots + 1
    query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    kv_lens = np.full(slots, width * page_size, np.int32)
    table = np.arange(slots * width, dtype=np.int32).reshape(slots, width)
    return query_start, kv_lens, table


def measure_attention_point(cfg: ModelConfig, page_size: int, dtype: str, rows: int,
                            slots: int, width: int, prefill: bool) -> dict:
    """One layer's twin attention at one step shape: best seconds, gathered bytes, FLOPs."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels

    dt = jnp.dtype(dtype)
    query_start, kv_lens, table = _step_arrays(rows, slots, width, page_size, prefill)
    pages = (slots * width, cfg.n_kv_heads, page_size, cfg.head_dim)
    k = jnp.full(pages, 0.01, dt)
    v = jnp.full(pages, 0.02, dt)
    q = jnp.full((rows, cfg.n_heads, cfg.head_dim), 0.03, dt)
    fn = jax.jit(lambda q, k, v, t, kl, qs: pallas_kernels.ragged_paged_attention(
        q, k, v, t, kl, qs, jnp.int32(slots), backend="xla"))
    best, _ = calibrate.timed(fn, q, k, v, table, kv_lens, query_start, repeats=5)
    items, block_q = gather_items(rows, slots, cfg.n_heads, cfg.n_kv_heads)
    keys = width * page_size
    return {"rows": rows, "slots": slots, "width": width, "seconds": best,
            "bytes": 2.0 * items * keys * cfg.n_kv_heads * cfg.head_dim * dt.itemsize,
            "flops": 4.0 * items * block_q * keys * cfg.n_heads * cfg.head_dim}


def fit_rates(points: list[dict]) -> tuple[float, float]:
    """(seconds per byte, seconds per FLOP) >= 0 minimising the squared relative error of
    bytes * a + flops * b against the measured seconds (the better of the two-rate fit and
    each one-rate fit that stays non-negative)."""
    a = np.array([[p["bytes"], p["flops"]] for p in points]) / np.array(
        [[p["seconds"]] for p in points])
    ones = np.ones(len(points))
    fits = []
    sol = np.linalg.lstsq(a, ones, rcond=None)[0]
    if (sol >= 0).all():
        fits.append(sol)
    for col in (0, 1):
        rate = max(float(a[:, col] @ ones / (a[:, col] @ a[:, col])), 0.0)
        fits.append(np.array([rate, 0.0] if col == 0 else [0.0, rate]))
    best = min(fits, key=lambda s: float(((a @ s - ones) ** 2).sum()))
    return float(best[0]), float(best[1])


def measure_attention(cfg: ModelConfig, page_size: int, dtype: str) -> dict:
    points = [measure_attention_point(cfg, page_size, dtype, *shape)
              for shape in ATTENTION_SHAPES]
    s_per_byte, s_per_flop = fit_rates(points)
    return {"s_per_byte": s_per_byte, "s_per_flop": s_per_flop, "points": points}


def _overhead_workload(n: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, int(k)).tolist() for k in rng.integers(8, 40, n)]
    return prompts, [int(k) for k in rng.integers(4, 24, n)]


def measure_call_overhead(measurement: dict, n_layers: int = 2, requests: int = 24) -> dict:
    """Per-call engine overhead (module docstring) from a `calibrate.measure` result."""
    from jaxinfer.api import Model
    from jaxinfer.engine import EngineConfig
    from jaxinfer.sampling import SamplingParams

    model = Model.random(calibrate.tiny_config(n_layers))
    engine = model.engine(EngineConfig(max_seqs=8, token_budget=64, max_model_len=128))
    prompts, outs = _overhead_workload(requests, model.config.vocab_size)
    params = [SamplingParams(max_new_tokens=k, stop_tokens=()) for k in outs]
    engine.generate(prompts, params)  # compile every shape the run takes
    stats = min((engine.generate(prompts, params).stats for _ in range(2)),
                key=lambda s: s.wall_s)
    step_s = measurement["step_overhead_s"] + n_layers * measurement["layer_overhead_s"]
    overhead = max(0.0, (stats.wall_s - stats.steps * step_s) / stats.device_calls)
    return {"call_overhead_s": overhead, "wall_s": stats.wall_s, "steps": stats.steps,
            "device_calls": stats.device_calls, "tiny_step_s": step_s}


def _load() -> dict:
    path = cache_path()
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}  # corrupt: measured again
    return data if isinstance(data, dict) and data.get("version") == VERSION else {}


def _save(data: dict) -> None:
    calibrate.save(data, cache_path())


def load_or_measure(cfg: ModelConfig, page_size: int, dtype: str, attention: bool) -> dict:
    """{"call_overhead_s", "attention": {...} or None, "source"}: cached figures, measuring
    (and caching) what is missing. `attention`: whether the twin's rates are needed (CPU)."""
    data = _load()
    if "call_overhead_s" not in data:
        measurement = calibrate.load_or_calibrate()
        data = {"version": VERSION, "machine": calibrate.cpu_name(),
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "attention": {},
                **measure_call_overhead(measurement)}
        _save(data)
    key = attention_key(cfg, page_size, dtype)
    if attention and key not in data["attention"]:
        data["attention"][key] = measure_attention(cfg, page_size, dtype)
        _save(data)
    return {"call_overhead_s": data["call_overhead_s"],
            "attention": data["attention"][key] if attention else None,
            "source": f"measured on {data.get('machine', '?')} at {data.get('timestamp', '?')} "
                      f"({cache_path()})"}


def attention_cost(figures: dict) -> AttentionCost:
    """The `AttentionCost` of `load_or_measure`'s figures: 'gather' with the measured rates, or
    'pages' (kernels: the KV bytes read at HBM speed) when none were measured."""
    att = figures["attention"]
    if att is None:
        return AttentionCost("pages", source="Pallas kernel: each sequence's pages read once")
    return AttentionCost("gather", att["s_per_byte"], att["s_per_flop"],
                         source="XLA twin, " + figures["source"])
