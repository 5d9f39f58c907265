"""Planning the continuous-batching engine: `jaxinfer plan --workload SPEC` (issue 16 item 5).

For a workload (a length distribution or a JSONL request file, `parse_workload`), the planner
simulates the engine (`jaxinfer.engine_sim`: the real scheduler on a clock of priced steps) for
every candidate (a layout and attention sharding on the mesh, as the engine runs under a plan:
batch-sharded attention and weight-gathered layouts in slot groups, one per attention batch
shard; max_seqs, divisible by the groups; token budget, which bounds the prefill chunk) and
picks the one with the highest predicted useful tok/s among those meeting the optional TPOT / TTFT
targets (on the p99 over requests, `TARGET_PERCENTILE`). Every request is queued at the start
(an offline batch, one `Engine.generate` call); TTFT counts from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from jaxinfer import validation
from jaxinfer.config import ModelConfig
from jaxinfer.engine.config import CPU_KV_CACHE_BYTES, KV_MEMORY_FRACTION, EngineConfig
from jaxinfer.engine.pages import pages_for_tokens
from jaxinfer.engine_sim import (AttentionCost, Prediction, StepPricer, WorkloadRequest,
                                 simulate, slot_groups)
from partitioning.hardware import HardwareProfile
from partitioning.layouts import ShardingError, resolve
from partitioning.plan import PhasePlan
from partitioning.planner import PlanningError, candidates, invalid_reason

TARGET_PERCENTILE = 99
"""TPOT / TTFT targets bound this percentile over the workload's requests."""
MAX_SEQS = (8, 16, 32, 64)
"""max_seqs searched by default."""
TOKEN_BUDGETS = (64, 128, 256, 512)
"""Token budgets (tokens per step; the prefill chunk limit) searched by default."""
LOGNORMAL_KEYS = {"prompt": float, "output": float, "n": int, "sigma": float, "seed": int,
                  "min_prompt": int, "max_prompt": int, "min_output": int, "max_output": int}
LOGNORMAL_DEFAULTS = {"sigma": 0.9, "seed": 0, "min_prompt": 4, "max_prompt": 400,
                      "min_output": 2, "max_output": 200}
WORKLOAD_HELP = (
    "the requests to plan for: lognormal:prompt=MEAN,output=MEAN,n=N[,sigma=0.9,seed=0,"
    "min_prompt=4,max_prompt=400,min_output=2,max_output=200] (random prompt tokens, issue 14's "
    "distribution by default; sigma=0: every request the same), or a JSONL request file in the "
    "batch-mode format (lines with 'prompt' or 'tokens', and 'max_new_tokens')")


# ---- workloads ----------------------------------------------------------------------------------
def parse_workload(spec: str, vocab: int, tokenizer=None) -> list[WorkloadRequest]:
    """The requests of a --workload SPEC (`WORKLOAD_HELP`); a bad spec is an `InvalidArgument`
    naming what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise validation.fail("--workload", spec, "a distribution spec or a JSONL file")
    if spec.startswith("lognormal:"):
        return _lognormal(spec, vocab)
    if os.path.isfile(spec):
        return _jsonl(spec, tokenizer)
    raise validation.InvalidArgument(
        f"--workload {spec!r} is neither lognormal:... nor an existing JSONL file")


def _lognormal(spec: str, vocab: int) -> list[WorkloadRequest]:
    from jaxinfer.bench_engine import workload

    values = dict(LOGNORMAL_DEFAULTS)
    for item in spec.split(":", 1)[1].split(","):
        key, sep, text = item.partition("=")
        if not sep or key.strip() not in LOGNORMAL_KEYS:
            raise validation.InvalidArgument(
                f"--workload: {item!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(LOGNORMAL_KEYS)}")
        try:
            values[key.strip()] = LOGNORMAL_KEYS[key.strip()](text)
        except ValueError:
            raise validation.InvalidArgument(
                f"--workload: {key} must be {LOGNORMAL_KEYS[key.strip()].__name__}, "
                f"got {text!r}") from None
    missing = [k for k in ("prompt", "output", "n") if k not in values]
    if missing:
        raise validation.InvalidArgument(f"--workload lognormal needs {', '.join(missing)}")
    validation.integer("--workload n", values["n"], 1)
    validation.real("--workload sigma", values["sigma"], 0.0)
    for kind in ("prompt", "output"):
        low = validation.integer(f"--workload min_{kind}", values[f"min_{kind}"], 1)
        validation.integer(f"--workload max_{kind}", values[f"max_{kind}"], low)
        validation.real(f"--workload {kind}", values[kind], 1.0)
    prompts, outs = workload(
        values["n"], values["seed"], vocab, values["prompt"], values["output"],
        values["sigma"], (values["min_prompt"], values["max_prompt"]),
        (values["min_output"], values["max_output"]))
    return [WorkloadRequest(tuple(p), int(k)) for p, k in zip(prompts, outs)]


def _jsonl(path: str, tokenizer) -> list[WorkloadRequest]:
    from jaxinfer.batch import BadLine, read_input

    with open(path) as fh:
        items = read_input(fh, {}, tokenizer)
    bad = [i for i in items if isinstance(i, BadLine)]
    if bad:
        raise validation.InvalidArgument(f"--workload {path}: {bad[0].error}")
    if not items:
        raise validation.InvalidArgument(f"--workload {path} holds no request")
    return [WorkloadRequest(tuple(r.tokens), r.params.max_new_tokens)
            for r in items for _ in range(r.options.n)]


def describe_workload(requests: list[WorkloadRequest]) -> dict:
    prompts = [len(r.prompt) for r in requests]
    outs = [r.max_new_tokens for r in requests]
    return {"requests": len(requests), "mean_prompt": sum(prompts) / len(prompts),
            "mean_output": sum(outs) / len(outs), "max_prompt": max(prompts),
            "max_output": max(outs), "useful_tokens": sum(outs)}


# ---- candidates ---------------------------------------------------------------------------------
def engine_plans(cfg: ModelConfig, chips: int, hw: HardwareProfile, meshes=None) -> list[PhasePlan]:
    """The decode phase plans the engine can run on `chips`: every layout and attention
    sharding whose dims divide for a step of one sequence per slot group, each program once
    (the first plan of a `Layout.program_key`). One chip: the single 1x1x1 plan."""
    out, programs = [], set()
    for plan in candidates(cfg, "decode", chips, hw, meshes=meshes):
        if chips == 1 and (plan.layout, plan.attention) != ("1d-ws", "heads"):
            continue  # one chip: every layout is the same program
        try:
            layout = resolve(plan, cfg)
            if invalid_reason(cfg, plan, slot_groups(layout)):
                continue
            layout.check(cfg)
        except ShardingError:
            continue
        if layout.program_key() not in programs:
            programs.add(layout.program_key())
            out.append(plan)
    if not out:
        raise PlanningError(f"no layout of {cfg.name} on {chips} x {hw.name} divides its "
                            f"dims: the engine cannot run it")
    return out


def pool_pages(cfg: ModelConfig, config: EngineConfig, hw: HardwareProfile, max_model_len: int,
               kv_dtype: str, weight_bytes: float, chips: int, groups: int = 1) -> int:
    """Pages of the engine's KV pool (`EngineConfig.kv_pool_bytes`'s rule: `kv_cache_bytes`, or
    room for max_seqs full sequences capped at CPU_KV_CACHE_BYTES on CPU, at KV_MEMORY_FRACTION
    of a chip's memory left by its weights elsewhere), a multiple of the slot groups."""
    from jaxinfer.engine.device import PagedKV

    page = PagedKV.bytes_per_page(cfg, config.page_size, kv_dtype)
    full = config.max_seqs * pages_for_tokens(max_model_len, config.page_size) * page
    if config.kv_cache_bytes is not None:
        pool = config.kv_cache_bytes
    elif hw.name == "cpu":
        pool = min(full, CPU_KV_CACHE_BYTES)
    else:
        free = hw.hbm_bytes - cfg.param_count() * weight_bytes / chips
        pool = min(full, int(max(free, 0) * KV_MEMORY_FRACTION))
    pages = int(pool // page) // groups * groups
    if pages < 1:
        raise PlanningError(f"{cfg.name} leaves no room for one KV page"
                            f"{'' if groups == 1 else f' per slot group ({groups})'} on "
                            f"{hw.name}")
    return pages


@dataclasses.dataclass(frozen=True)
class EngineCandidate:
    """One simulated (layout, EngineConfig)."""

    plan: PhasePlan
    config: EngineConfig
    num_pages: int
    prediction: Prediction
    misses: str | None = None
    """Which target it misses (None: meets every target given)."""

    def to_json(self) -> dict:
        p = self.prediction
        return {"layout": self.plan.layout, "attention": self.plan.attention,
                "mesh": self.plan.mesh.as_dict(), "engine_config": dataclasses.asdict(self.config),
                "num_pages": self.num_pages, "useful_tok_s": p.useful_tok_s, "wall_s": p.wall_s,
                "ttft_p50_s": p.ttft(50), "ttft_p99_s": p.ttft(99), "tpot_p50_s": p.tpot(50),
                "tpot_p99_s": p.tpot(99), "steps": p.steps, "device_calls": p.device_calls,
                "preemptions": p.preemptions, "decode_batch": p.decode_batch,
                "misses": self.misses}


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """The planner's choice and every candidate, best first."""

    best: EngineCandidate
    candidates: tuple[EngineCandidate, ...]
    tpot_target_s: float | None
    ttft_target_s: float | None


def _misses(p: Prediction, tpot_target_s, ttft_target_s) -> str | None:
    q = TARGET_PERCENTILE
    if tpot_target_s is not None and not p.tpot(q) <= tpot_target_s:
        return f"TPOT p{q} {p.tpot(q) * 1e3:.3g} ms > {tpot_target_s * 1e3:.3g} ms"
    if ttft_target_s is not None and not p.ttft(q) <= ttft_target_s:
        return f"TTFT p{q} {p.ttft(q):.3g} s > {ttft_target_s:.3g} s"
    return None


def plan_engine(cfg: ModelConfig, requests: list[WorkloadRequest], hw: HardwareProfile,
                plans: list[PhasePlan], attention: AttentionCost, call_overhead_s: float, *,
                max_seqs=MAX_SEQS, token_budgets=TOKEN_BUDGETS, page_size: int = 16,
                steps_per_call: int = 8, tpot_target_s: float | None = None,
                ttft_target_s: float | None = None, weight_bytes: float = 4.0,
                act_bytes: float = 4.0) -> EnginePlan:
    """Simulate every (plan, max_seqs divisible by the plan's slot groups, token budget >=
    max_seqs) and pick (module docstring). No candidate meeting the targets is a
    `PlanningError` naming the closest one."""
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    if longest > cfg.max_context:
        raise PlanningError(f"the workload's longest request ({longest} tokens) exceeds "
                            f"{cfg.name}'s max_context={cfg.max_context}")
    kv_dtype = "float32" if act_bytes == 4.0 else "bfloat16"
    pricers = [StepPricer(cfg, plan, hw, attention, weight_bytes=weight_bytes,
                          act_bytes=act_bytes, kv_bytes=act_bytes) for plan in plans]
    out = []
    for pricer in _fastest_mesh_each(pricers, requests, max(max_seqs), page_size):
        plan = pricer.plan
        for seqs in [s for s in max_seqs if s % pricer.groups == 0]:
            for budget in [b for b in token_budgets if b >= seqs]:
                config = EngineConfig(max_seqs=seqs, page_size=page_size, token_budget=budget,
                                      max_model_len=longest, steps_per_call=steps_per_call)
                pages = pool_pages(cfg, config, hw, longest, kv_dtype, weight_bytes,
                                   plan.mesh.n, pricer.groups)
                p = simulate(requests, config, pages, longest, pricer, call_overhead_s)
                out.append(EngineCandidate(plan, config, pages, p,
                                           _misses(p, tpot_target_s, ttft_target_s)))
    if not out:
        raise PlanningError(f"no candidate: every token budget {tuple(token_budgets)} is below "
                            f"every max_seqs {tuple(max_seqs)}, or no max_seqs divides into "
                            f"the slot groups of any layout")
    out.sort(key=lambda c: (c.misses is not None, -c.prediction.useful_tok_s))
    if out[0].misses is not None:
        raise PlanningError(_no_candidate(out, tpot_target_s, ttft_target_s))
    return EnginePlan(out[0], tuple(out), tpot_target_s, ttft_target_s)


def _fastest_mesh_each(pricers: list[StepPricer], requests: list[WorkloadRequest], seqs: int,
                       page_size: int) -> list[StepPricer]:
    """Per (layout, attention), the pricer of the mesh whose decode step of `seqs` sequences
    (rounded up to its slot groups) at the workload's mean length is the quickest: the meshes
    of one layout differ in how its collectives are priced, and simulating each of them (90
    plans on 8 chips) would cost minutes for nothing."""
    mean = sum(len(r.prompt) + r.max_new_tokens / 2 for r in requests) / len(requests)
    width = pages_for_tokens(math.ceil(mean), page_size)
    best: dict[tuple[str, str], tuple[float, StepPricer]] = {}
    for pricer in pricers:
        g = pricer.groups
        rows = -(-seqs // g) * g
        seconds = pricer.step(rows, rows, width, page_size, rows // g * width * page_size).step_s
        key = (pricer.plan.layout, pricer.plan.attention)
        if key not in best or seconds < best[key][0]:
            best[key] = (seconds, pricer)
    return [pricer for _, pricer in best.values()]


def _no_candidate(out: list[EngineCandidate], tpot_target_s, ttft_target_s) -> str:
    q = TARGET_PERCENTILE
    parts = []
    if tpot_target_s is not None:
        c = min(out, key=lambda c: c.prediction.tpot(q))
        parts.append(f"the lowest predicted TPOT p{q} is {c.prediction.tpot(q) * 1e3:.3g} ms "
                     f"(max_seqs {c.config.max_seqs}, token_budget {c.config.token_budget}) "
                     f"against the target {tpot_target_s * 1e3:.3g} ms")
    if ttft_target_s is not None:
        c = min(out, key=lambda c: c.prediction.ttft(q))
        parts.append(f"the lowest predicted TTFT p{q} is {c.prediction.ttft(q):.3g} s "
                     f"(max_seqs {c.config.max_seqs}, token_budget {c.config.token_budget}) "
                     f"against the target {ttft_target_s:.3g} s")
    return (f"no engine configuration of the {len(out)} simulated meets the targets: "
            + "; ".join(parts))


# ---- command line -------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The engine-planning flags of `jaxinfer plan`."""
    p.add_argument("--workload", default=None, metavar="SPEC",
                   help="plan the continuous-batching engine instead of one phase: "
                   + WORKLOAD_HELP)
    p.add_argument("--tpot-target-ms", type=float, default=None,
                   help=f"--workload: highest TPOT p{TARGET_PERCENTILE} allowed")
    p.add_argument("--ttft-target-ms", type=float, default=None,
                   help=f"--workload: highest TTFT p{TARGET_PERCENTILE} allowed (from the start "
                   "of the batch: every request is queued at once)")
    p.add_argument("--max-seqs", default=",".join(map(str, MAX_SEQS)), metavar="LIST",
                   help="--workload: max_seqs values to search (comma-separated)")
    p.add_argument("--token-budget", default=",".join(map(str, TOKEN_BUDGETS)), metavar="LIST",
                   help="--workload: token budgets (tokens per step, the prefill chunk limit) "
                   "to search")
    p.add_argument("--page-size", type=int, default=16, help="--workload: KV page size")
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="--workload: EngineConfig.steps_per_call")


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise validation.InvalidArgument(f"{flag} must be comma-separated integers, "
                                         f"got {text!r}") from None
    for v in values:
        validation.integer(flag, v, 1)
    return values


def _target(flag: str, value) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise validation.InvalidArgument(f"{flag} must be a positive number, got {value}")
    return value / 1e3


def run(args, cfg: ModelConfig, tokenizer, hw: HardwareProfile, chips: int, meshes,
        weight_bytes: float) -> int:
    """`jaxinfer plan --workload ...`: print the chosen engine configuration and predictions."""
    from jaxinfer import engine_calibrate

    requests = parse_workload(args.workload, cfg.vocab_size, tokenizer)
    act = 4.0 if weight_bytes == 4.0 else 2.0
    figures = engine_calibrate.load_or_measure(cfg, args.page_size,
                                               "float32" if act == 4.0 else "bfloat16",
                                               attention=hw.name == "cpu")
    if figures["attention"] is not None and not figures["attention"].seconds:
        print(f"timing the XLA attention twin at each step shape the search prices (about a "
              f"second each, the first time; cached in {engine_calibrate.cache_path()})",
              file=sys.stderr, flush=True)
    result = plan_engine(
        cfg, requests, hw, engine_plans(cfg, chips, hw, meshes),
        engine_calibrate.attention_cost(figures), figures["call_overhead_s"],
        max_seqs=_int_list("--max-seqs", args.max_seqs),
        token_budgets=_int_list("--token-budget", args.token_budget),
        page_size=validation.integer("--page-size", args.page_size, 1),
        steps_per_call=validation.integer("--steps-per-call", args.steps_per_call, 1, 1024),
        tpot_target_s=_target("--tpot-target-ms", args.tpot_target_ms),
        ttft_target_s=_target("--ttft-target-ms", args.ttft_target_ms),
        weight_bytes=weight_bytes, act_bytes=act)
    report = {"model": cfg.name, "hardware": hw.name, "chips": chips,
              "workload": describe_workload(requests), "best": result.best.to_json(),
              "tpot_target_s": result.tpot_target_s, "ttft_target_s": result.ttft_target_s,
              "target_percentile": TARGET_PERCENTILE,
              "call_overhead_s": figures["call_overhead_s"], "calibration": figures["source"],
              "candidates": [c.to_json() for c in result.candidates]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    w = report["workload"]
    table = Table(title=f"engine plan: {report['model']} on {report['chips']} x "
                        f"{report['hardware']}, {w['requests']} requests (mean prompt "
                        f"{w['mean_prompt']:.0f}, mean output {w['mean_output']:.0f})")
    for col in ("", "layout", "mesh", "max_seqs", "token_budget", "pages", "useful tok/s",
                "TTFT p50/p99 s", "TPOT p50/p99 ms", "decode batch", "preempt", "misses"):
        table.add_column(col)
    for i, c in enumerate(report["candidates"]):
        e = c["engine_config"]
        table.add_row("best" if i == 0 else "", f"{c['layout']}/{c['attention']}",
                      "x".join(str(v) for v in c["mesh"].values()), str(e["max_seqs"]),
                      str(e["token_budget"]), str(c["num_pages"]), f"{c['useful_tok_s']:.1f}",
                      f"{c['ttft_p50_s']:.2f} / {c['ttft_p99_s']:.2f}",
                      f"{c['tpot_p50_s'] * 1e3:.0f} / {c['tpot_p99_s'] * 1e3:.0f}",
                      f"{c['decode_batch']:.1f}", str(c["preemptions"]), c["misses"] or "")
    console = Console(width=170)
    console.print(table)
    best = report["best"]["engine_config"]
    console.print(f"chosen: EngineConfig(max_seqs={best['max_seqs']}, page_size="
                  f"{best['page_size']}, token_budget={best['token_budget']}, max_model_len="
                  f"{best['max_model_len']}, steps_per_call={best['steps_per_call']}) under "
                  f"{report['best']['layout']}/{report['best']['attention']}; per-call overhead "
                  f"{report['call_overhead_s'] * 1e3:.2f} ms, {report['calibration']}")
