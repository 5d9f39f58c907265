"""The two engine costs the cost model leaves out, measured once on this machine.

`jaxinfer.engine_sim` prices an engine step with `partitioning.efficiency` (the ``cpu`` profile
measured by `jaxinfer calibrate`) plus two terms measured here and cached beside that
calibration (``engine_calibration.json`` in the same directory):

- ``attention``: one layer's time of the XLA twin of ragged paged attention
  (`pallas_kernels.ragged_paged_attention` with backend 'xla', what the engine runs on CPU) at
  the model's head shape, page size and dtype, per static step shape (rows T, slots S, table
  width J pages). The twin's work depends on that shape alone (each work item gathers the
  table's full width and attends every key, masked), so an `AttentionTable` entry is exact up to
  timing noise: it is the median of 5 timed calls, measured the first time the planner prices a
  shape (about a second each) and cached. A two-rate fit (gathered bytes, FLOPs) over three
  shapes stood in before; over 36 shapes (2-core Intel Xeon) it left a 29% RMS error
  (0.39x-1.68x: the gathers slow down faster than their bytes grow once they leave the caches)
  and priced the long-prompt workload's 256-row chunks over 64-page tables at half their time.
- ``call_overhead_s``: what a device call costs beyond its steps: host scheduling and
  bookkeeping, input transfer, dispatch. A tiny model (`calibrate.tiny_config`, whose steps are
  almost only fixed costs) runs a small workload through the real engine; the overhead is
  (wall - steps x its decode step time) / device calls, the decode step time being the
  calibration's own fit for that model (step_overhead_s + layers x layer_overhead_s).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.engine_sim import AttentionCost
from partitioning import calibrate

CACHE_FILE = "engine_calibration.json"
VERSION = 2
"""2: attention as a table of measured step shapes (1 held two fitted rates)."""


def cache_path() -> str:
    """``engine_calibration.json`` beside the ``cpu`` calibration."""
    return os.path.join(os.path.dirname(calibrate.cache_path()), CACHE_FILE)


def attention_key(cfg: ModelConfig, page_size: int, dtype: str) -> str:
    return f"{cfg.n_heads}x{cfg.head_dim}/kv{cfg.n_kv_heads}/page{page_size}/{dtype}"


def _step_arrays(rows: int, slots: int, width: int, page_size: int):
    """query_start, kv_lens and page_table of a step of static shape (rows, slots, width): one
    token in each of the first min(rows, slots) slots, the remaining rows a chunk in slot 0,
    every table full (the values do not change the twin's work)."""
    lens = np.zeros(slots, np.int32)
    lens[:min(rows, slots)] = 1
    lens[0] += rows - lens.sum()
    query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    kv_lens = np.full(slots, width * page_size, np.int32)
    table = np.arange(slots * width, dtype=np.int32).reshape(slots, width)
    return query_start, kv_lens, table


def measure_attention_point(cfg: ModelConfig, page_size: int, dtype: str, rows: int,
                            slots: int, width: int) -> float:
    """Median seconds of one layer's twin attention at static shape (rows, slots, width)."""
    import jax
    import jax.numpy as jnp

    import pallas_kernels

    dt = jnp.dtype(dtype)
    query_start, kv_lens, table = _step_arrays(rows, slots, width, page_size)
    pages = (slots * width, cfg.n_kv_heads, page_size, cfg.head_dim)
    k = jnp.full(pages, 0.01, dt)
    v = jnp.full(pages, 0.02, dt)
    q = jnp.full((rows, cfg.n_heads, cfg.head_dim), 0.03, dt)
    fn = jax.jit(lambda q, k, v, t, kl, qs: pallas_kernels.ragged_paged_attention(
        q, k, v, t, kl, qs, jnp.int32(slots), backend="xla"))
    _, median = calibrate.timed(fn, q, k, v, table, kv_lens, query_start, repeats=5)
    return median


class AttentionTable:
    """One layer's twin attention seconds per static step shape, for one model head shape,
    page size and dtype, keyed ``"T/S/J"`` (rows, slots, table width), or ``"T/S/J/hQ/kvK"`` for
    one chip's share of the heads (Q query heads over K KV heads, when a plan splits them): a
    shape not yet in `seconds` is measured (by `measure`, default `measure_attention_point`)
    when first asked for, and `save` (if given) is called with the whole table after each new
    entry. Callable as an `AttentionCost.layer_seconds`."""

    def __init__(self, cfg: ModelConfig, page_size: int, dtype: str,
                 seconds: dict[str, float] | None = None,
                 save: Callable[[dict[str, float]], None] | None = None,
                 measure: Callable[..., float] = measure_attention_point):
        self.cfg, self.page_size, self.dtype = cfg, page_size, dtype
        self.seconds = dict(seconds or {})
        self.measured = 0
        """Shapes this object measured (not found in `seconds`)."""
        self._save, self._measure = save, measure

    def __call__(self, rows: int, slots: int, width: int, page_size: int,
                 q_heads: int | None = None, kv_heads: int | None = None) -> float:
        """Seconds at (rows, slots, width) with `q_heads` over `kv_heads` (default: the
        model's)."""
        if page_size != self.page_size:
            raise ValueError(f"this attention table was measured with page_size "
                             f"{self.page_size}, asked for {page_size}")
        q = self.cfg.n_heads if q_heads is None else q_heads
        k = self.cfg.n_kv_heads if kv_heads is None else kv_heads
        for name, value in (("rows", rows), ("slots", slots), ("width", width),
                            ("q_heads", q), ("kv_heads", k)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"attention table: {name} must be an integer >= 1, "
                                 f"got {value!r}")
        if q % k:
            raise ValueError(f"attention table: {q} query heads do not group over {k} KV heads")
        own = (q, k) == (self.cfg.n_heads, self.cfg.n_kv_heads)
        key = f"{rows}/{slots}/{width}" + ("" if own else f"/h{q}/kv{k}")
        if key not in self.seconds:
            cfg = self.cfg if own else dataclasses.replace(self.cfg, n_heads=int(q),
                                                           n_kv_heads=int(k))
            seconds = float(self._measure(cfg, self.page_size, self.dtype, int(rows),
                                          int(slots), int(width)))
            if not (np.isfinite(seconds) and seconds > 0):
                raise ValueError(f"attention table: measuring {key} gave {seconds!r} seconds")
            self.seconds[key] = seconds
            self.measured += 1
            if self._save is not None:
                self._save(dict(self.seconds))
        return self.seconds[key]


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
    """{"call_overhead_s", "attention": an `AttentionTable` or None, "source"}: the cached
    figures, measuring (and caching) the call overhead if missing. `attention`: whether the twin
    is priced (CPU); its table measures new shapes when asked and caches each."""
    data = _load()
    if "call_overhead_s" not in data:
        measurement = calibrate.load_or_calibrate()
        data = {"version": VERSION, "machine": calibrate.cpu_name(),
                "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "attention": {},
                **measure_call_overhead(measurement)}
        _save(data)
    table = None
    if attention:
        key = attention_key(cfg, page_size, dtype)

        def save(seconds: dict[str, float]) -> None:
            data["attention"][key] = seconds
            _save(data)

        table = AttentionTable(cfg, page_size, dtype, data["attention"].get(key), save)
    return {"call_overhead_s": data["call_overhead_s"], "attention": table,
            "source": f"measured on {data.get('machine', '?')} at {data.get('timestamp', '?')} "
                      f"({cache_path()})"}


def attention_cost(figures: dict) -> AttentionCost:
    """The `AttentionCost` of `load_or_measure`'s figures: 'measured' with the twin's table, or
    'pages' (kernels: the KV bytes read at HBM speed) when there is none."""
    table = figures["attention"]
    if table is None:
        return AttentionCost("pages", source="Pallas kernel: each sequence's pages read once")
    return AttentionCost("measured", table, source="XLA twin per step shape, "
                                                   + figures["source"])
