"""Predicted vs measured continuous-batching engine runs on this machine (issue 16 item 5).

For three workloads on the "30m" bench model (random weights, float32), the engine planner
(`jaxinfer.engine_planner.plan_engine`, the calibrated ``cpu`` profile and the engine terms of
`jaxinfer.engine_calibrate`) picks an `EngineConfig`; the engine then runs the workload with it
(after a warm-up run of requests of the same lengths with other tokens, which compiles every step
shape the run takes: the planner predicts steady state, not compilation) and
the predicted useful tok/s, TTFT and TPOT are printed beside the measured ones. A row passes when
the predicted throughput is within +-30% of the measured one.

With ``--devices 8`` the engine runs on 8 simulated host devices under each of ``--layouts``
(e.g. ``1d-ws/heads,1d-ws/batch``: per layout the mesh the planner prices fastest; batch-sharded
attention runs the engine's slot groups), priced with the calibration's 8-device profile.

    flock /tmp/jaxinfer_timing.lock python scripts/validate_engine_plan.py [--n 96] [--json F]
        [--devices 8 --layouts 1d-ws/heads,1d-ws/batch] [--workloads 0,2]
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
            "device_s": s.device_s, "ttft_p50_s": float(np.percentile(s.ttft_s, 50)),
            "tpot_p50_s": float(np.percentile(tpot, 50)), "steps": s.steps,
            "device_calls": s.device_calls, "preemptions": s.preemptions}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96, help="requests per workload")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--devices", type=int, default=1,
                   help="simulated host devices the engine runs on (default 1)")
    p.add_argument("--layouts", default=None, metavar="LIST",
                   help="--devices > 1: comma-separated LAYOUT/ATTENTION to validate each of "
                   "(default: the planner's choice among all)")
    p.add_argument("--workloads", default=None, metavar="LIST",
                   help=f"indices of the workloads to run (default all {len(WORKLOADS)})")
    args = p.parse_args()
    if args.devices < 1:
        p.error(f"--devices must be >= 1, got {args.devices}")
    if args.layouts and args.devices == 1:
        p.error("--layouts needs --devices > 1 (one device runs one program)")
    try:
        picked = (range(len(WORKLOADS)) if args.workloads is None
                  else [int(i) for i in args.workloads.split(",")])
    except ValueError:
        p.error(f"--workloads must be comma-separated indices, got {args.workloads!r}")
    if any(not 0 <= i < len(WORKLOADS) for i in picked):
        p.error(f"--workloads indices must lie in 0..{len(WORKLOADS) - 1}, got {args.workloads}")
    args.workloads = list(picked)
    return args


def plans_per_row(cfg, plans, layouts: str | None) -> list[list]:
    """The plans the planner picks among, per validated row: every plan, or each
    LAYOUT/ATTENTION's plans."""
    if layouts is None:
        return [plans]
    out = []
    for item in layouts.split(","):
        layout, _, attention = item.partition("/")
        chosen = [p for p in plans if (p.layout, p.attention) == (layout, attention)]
        if not chosen:
            raise SystemExit(f"--layouts: {item!r} is not a layout/attention the engine can run "
                             f"for {cfg.name} here")
        out.append(chosen)
    return out


def main() -> int:
    args = parse_args()
    if args.devices > 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={args.devices}").strip()
    from jaxinfer import bench_engine, engine_calibrate, engine_planner
    from jaxinfer.api import Model
    from partitioning import calibrate
    from partitioning.hardware import cpu_profile
    from partitioning.plan import Plan

    cfg = bench_engine.MODELS["30m"]
    hw = cpu_profile(calibrate.load_or_calibrate(), args.devices)
    figures = engine_calibrate.load_or_measure(cfg, 16, "float32", attention=True)
    attention = engine_calibrate.attention_cost(figures)
    plans = engine_planner.engine_plans(cfg, args.devices, hw)
    base = Model.random(cfg)
    rows = []
    for index in args.workloads:
        name, spec = WORKLOADS[index]
        requests = engine_planner.parse_workload(spec.format(n=args.n, seed=0), cfg.vocab_size)
        for chosen in plans_per_row(cfg, plans, args.layouts):
            t0 = time.perf_counter()
            best = engine_planner.plan_engine(cfg, requests, hw, chosen, attention,
                                              figures["call_overhead_s"]).best
            planning_s = time.perf_counter() - t0
            model = base
            if args.devices > 1:
                d = best.plan
                model = Model(cfg, base.params, plan=Plan.uniform(d.layout, d.attention, d.mesh))
            rows.append(_row(name, spec.format(n=args.n, seed=0), best, planning_s,
                             measure(model, requests, best.config, cfg.vocab_size)))
            print_row(rows[-1], flush=True)
    report = {"machine": f"{calibrate.cpu_name()}, {os.cpu_count()} cores",
              "devices": args.devices,
              "load_average": os.getloadavg(), "model": f"{cfg.name} "
              f"({cfg.param_count() / 1e6:.1f}M)", "calibration": figures["source"],
              "call_overhead_s": figures["call_overhead_s"], "rows": rows}
    print_table(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


def _row(name: str, spec: str, best, planning_s: float, got: dict) -> dict:
    pred = best.prediction
    return {"workload": name, "spec": spec,
            "layout": f"{best.plan.layout}/{best.plan.attention} "
                      f"{'x'.join(map(str, best.plan.mesh.as_dict().values()))}",
            "max_seqs": best.config.max_seqs, "token_budget": best.config.token_budget,
            "planning_s": planning_s,
            "predicted": {"useful_tok_s": pred.useful_tok_s, "wall_s": pred.wall_s,
                          "device_s": pred.device_s, "ttft_p50_s": pred.ttft(50),
                          "tpot_p50_s": pred.tpot(50),
                          "steps": pred.steps, "device_calls": pred.device_calls,
                          "preemptions": pred.preemptions},
            "measured": got, "ratio": pred.useful_tok_s / got["useful_tok_s"]}


def print_row(r: dict, flush: bool = False) -> None:
    print(f"{r['workload']}, {r['layout']}: predicted {r['predicted']['useful_tok_s']:.1f} "
          f"tok/s, measured {r['measured']['useful_tok_s']:.1f} ({r['ratio']:.2f}x)",
          flush=flush)


def print_table(report: dict) -> None:
    print(f"\n{report['model']} on {report['machine']} ({report['devices']} host device(s)), "
          f"load average "
          f"{', '.join(f'{x:.2f}' for x in report['load_average'])}; per-call overhead "
          f"{report['call_overhead_s'] * 1e3:.2f} ms; {report['calibration']}")
    print("| workload | layout | max_seqs / token_budget | useful tok/s predicted / measured | "
          "ratio | within ±30% | wall s (device s) pred / meas | TTFT p50 s pred / meas | "
          "TPOT p50 ms pred / meas | steps pred / meas |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|")
    for r in report["rows"]:
        p, m = r["predicted"], r["measured"]
        print(f"| {r['workload']} | {r['layout']} | {r['max_seqs']} / {r['token_budget']} | "
              f"{p['useful_tok_s']:.1f} / {m['useful_tok_s']:.1f} | {r['ratio']:.2f} | "
              f"{'yes' if abs(r['ratio'] - 1) <= TOLERANCE else 'NO'} | "
              f"{p['wall_s']:.1f} ({p['device_s']:.1f}) / {m['wall_s']:.1f} "
              f"({m['device_s']:.1f}) | {p['ttft_p50_s']:.2f} / {m['ttft_p50_s']:.2f} | "
              f"{p['tpot_p50_s'] * 1e3:.0f} / {m['tpot_p50_s'] * 1e3:.0f} | "
              f"{p['steps']} / {m['steps']} |")


if __name__ == "__main__":
    raise SystemExit(main())
