"""Predicted vs measured continuous-batching engine runs on this machine (issue 16 item 5).

For three workloads on the "30m" bench model (random weights, float32), the engine planner
(`jaxinfer.engine_planner.plan_engine`, the calibrated ``cpu`` profile and the engine terms of
`jaxinfer.engine_calibrate`) picks an `EngineConfig`; the engine then runs the workload with it
(after a warm-up run of requests of the same lengths with other tokens, which compiles every step
shape the run takes: the planner predicts steady state, not compilation) and
the predicted useful tok/s, TTFT and TPOT are printed beside the measured ones. A row passes when
the predicted throughput is within +-30% of the measured one.

    flock /tmp/jaxinfer_timing.lock python scripts/validate_engine_plan.py [--n 96] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TOLERANCE = 0.30
WORKLOADS = (
    ("issue-14 lognormal", "lognormal:prompt=91,output=53,n={n},seed={seed}"),
    ("short prompt, long output",
     "lognormal:prompt=16,output=120,n={n},seed={seed},min_prompt=4,max_prompt=64,"
     "min_output=32,max_output=320"),
    ("long prompt, short output",
     "lognormal:prompt=360,output=8,n={n},seed={seed},min_prompt=64,max_prompt=900,"
     "min_output=2,max_output=32"),
)


def measure(model, requests, config, vocab_size: int) -> dict:
    """Run `requests` through a fresh engine of `config`, after a warm-up run of requests of the
    same lengths with other random tokens: the scheduler plans from lengths alone, so the
    warm-up compiles every step shape the measured run takes (compilation is not what the
    planner predicts) and shares no prefix with it."""
    from jaxinfer.engine_sim import WorkloadRequest
    from jaxinfer.sampling import SamplingParams

    engine = model.engine(config)
    rng = np.random.default_rng(12345)
    warmup = [WorkloadRequest(tuple(rng.integers(0, vocab_size, len(r.prompt)).tolist()),
                              r.max_new_tokens) for r in requests]

    def run(reqs):
        params = [SamplingParams(max_new_tokens=r.max_new_tokens, stop_tokens=()) for r in reqs]
        return engine.generate([list(r.prompt) for r in reqs], params).stats

    run(warmup)
    s = run(requests)
    tpot = [t for t in s.tpot_s if t is not None]
    return {"useful_tok_s": s.generated_tokens / s.wall_s, "wall_s": s.wall_s,
            "ttft_p50_s": float(np.percentile(s.ttft_s, 50)),
            "tpot_p50_s": float(np.percentile(tpot, 50)), "steps": s.steps,
            "device_calls": s.device_calls, "preemptions": s.preemptions}


def main() -> int:
    from jaxinfer import bench_engine, engine_calibrate, engine_planner
    from jaxinfer.api import Model
    from partitioning import calibrate
    from partitioning.hardware import cpu_profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="requests per workload")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args()
    cfg = bench_engine.MODELS["30m"]
    hw = cpu_profile(calibrate.load_or_calibrate(), 1)
    figures = engine_calibrate.load_or_measure(cfg, 16, "float32", attention=True)
    attention = engine_calibrate.attention_cost(figures)
    plans = engine_planner.engine_plans(cfg, 1, hw)
    model = Model.random(cfg)
    rows = []
    for name, spec in WORKLOADS:
        requests = engine_planner.parse_workload(spec.format(n=args.n, seed=0), cfg.vocab_size)
        t0 = time.perf_counter()
        best = engine_planner.plan_engine(cfg, requests, hw, plans, attention,
                                          figures["call_overhead_s"]).best
        planning_s = time.perf_counter() - t0
        got = measure(model, requests, best.config, cfg.vocab_size)
        pred = best.prediction
        rows.append({"workload": name, "spec": spec.format(n=args.n, seed=0),
                     "max_seqs": best.config.max_seqs, "token_budget": best.config.token_budget,
                     "planning_s": planning_s,
                     "predicted": {"useful_tok_s": pred.useful_tok_s, "wall_s": pred.wall_s,
                                   "ttft_p50_s": pred.ttft(50), "tpot_p50_s": pred.tpot(50),
                                   "steps": pred.steps, "device_calls": pred.device_calls,
                                   "preemptions": pred.preemptions},
                     "measured": got, "ratio": pred.useful_tok_s / got["useful_tok_s"]})
        print_row(rows[-1], flush=True)
    report = {"machine": f"{calibrate.cpu_name()}, {os.cpu_count()} cores",
              "load_average": os.getloadavg(), "model": f"{cfg.name} "
              f"({cfg.param_count() / 1e6:.1f}M)", "calibration": figures["source"],
              "call_overhead_s": figures["call_overhead_s"], "rows": rows}
    print_table(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


def print_row(r: dict, flush: bool = False) -> None:
    print(f"{r['workload']}: predicted {r['predicted']['useful_tok_s']:.1f} tok/s, measured "
          f"{r['measured']['useful_tok_s']:.1f} ({r['ratio']:.2f}x)", flush=flush)


def print_table(report: dict) -> None:
    print(f"\n{report['model']} on {report['machine']}, load average "
          f"{', '.join(f'{x:.2f}' for x in report['load_average'])}; per-call overhead "
          f"{report['call_overhead_s'] * 1e3:.2f} ms; {report['calibration']}")
    print("| workload | max_seqs / token_budget | useful tok/s predicted / measured | ratio | "
          "within ±30% | TTFT p50 s pred / meas | TPOT p50 ms pred / meas | steps pred / meas |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for r in report["rows"]:
        p, m = r["predicted"], r["measured"]
        print(f"| {r['workload']} | {r['max_seqs']} / {r['token_budget']} | "
              f"{p['useful_tok_s']:.1f} / {m['useful_tok_s']:.1f} | {r['ratio']:.2f} | "
              f"{'yes' if abs(r['ratio'] - 1) <= TOLERANCE else 'NO'} | "
              f"{p['ttft_p50_s']:.2f} / {m['ttft_p50_s']:.2f} | "
              f"{p['tpot_p50_s'] * 1e3:.0f} / {m['tpot_p50_s'] * 1e3:.0f} | "
              f"{p['steps']} / {m['steps']} |")


if __name__ == "__main__":
    raise SystemExit(main())
