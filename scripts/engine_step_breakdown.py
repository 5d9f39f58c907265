"""The engine on host devices, plan beside plan: measured wall and TPOT beside the simulator's.

For each plan and prompt length an engine runs 8 requests of that prompt and --new-tokens new
tokens (max_seqs 8, token budget 512, no prefix caching, fresh random prompts every run). All
engines are built and warmed up first, then run in turn for --rounds rounds, so a slow spell of
this shared machine falls on every plan alike; the quickest round of each is printed beside
`jaxinfer.engine_sim.simulate`'s prediction for the same requests, with the priced decode step of
8 sequences at the final table width split into its dense part (the cost model) and its
attention (the twin's measured table). Where the engine planner misses, this says on which
steps (decode: --new-tokens 64; prefill chunks: --new-tokens 1) and in which part.

    flock /tmp/jaxinfer_timing.lock python scripts/engine_step_breakdown.py \
        [--plans 1d-ws/heads/1x1x8,1d-ws/batch/1x1x8] [--prompts 64,400] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

SEQS = 8
PAGE = 16
STEPS_PER_CALL = 8
TOKEN_BUDGET = 512


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default="1d-ws/heads/1x1x8,1d-ws/batch/1x1x8",
                   help="comma-separated LAYOUT/ATTENTION/XxYxZ (one mesh for all)")
    p.add_argument("--prompts", default="64,400", help="comma-separated prompt lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each engine")
    args = p.parse_args()
    try:
        args.plans = [(lay, att, tuple(int(v) for v in m.split("x")))
                      for lay, att, m in (s.split("/") for s in args.plans.split(","))]
        args.prompts = [int(v) for v in args.prompts.split(",")]
    except ValueError:
        p.error("--plans takes LAYOUT/ATTENTION/XxYxZ items, --prompts integers")
    meshes = {m for _, _, m in args.plans}
    if len(meshes) != 1 or any(len(m) != 3 for m in meshes):
        p.error(f"--plans must share one XxYxZ mesh, got {sorted(meshes)}")
    if args.new_tokens < 1 or args.rounds < 1:
        p.error("--new-tokens and --rounds must be >= 1")
    if any(n < 1 or n + args.new_tokens > 1024 for n in args.prompts):
        p.error("every prompt plus --new-tokens must lie in 2..1024 (the 30m model's context)")
    args.devices = int(np.prod(meshes.pop()))
    return args


def main() -> int:
    args = parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={args.devices}").strip()
    from jaxinfer import bench_engine, engine_calibrate
    from jaxinfer.api import Model
    from jaxinfer.engine import EngineConfig
    from jaxinfer.engine.pages import pages_for_tokens
    from jaxinfer.engine_sim import StepPricer, WorkloadRequest, simulate
    from jaxinfer.sampling import SamplingParams
    from partitioning import calibrate
    from partitioning.hardware import cpu_profile
    from partitioning.mesh import MeshShape
    from partitioning.plan import Plan

    cfg = bench_engine.MODELS["30m"]
    hw = cpu_profile(calibrate.load_or_calibrate(), args.devices)
    figures = engine_calibrate.load_or_measure(cfg, PAGE, "float32", attention=True)
    attention = engine_calibrate.attention_cost(figures)
    rng = np.random.default_rng(0)
    params = [SamplingParams(max_new_tokens=args.new_tokens, stop_tokens=())] * SEQS
    fresh = lambda n: [rng.integers(3, cfg.vocab_size, n).tolist() for _ in range(SEQS)]
    rows = []
    for layout, attn, mesh in args.plans:
        plan = Plan.uniform(layout, attn, MeshShape(*mesh))
        model = Model.random(cfg, plan=plan)
        pricer = StepPricer(cfg, plan.decode, hw, attention)
        for prompt in args.prompts:
            length = prompt + args.new_tokens
            config = EngineConfig(max_seqs=SEQS, page_size=PAGE, token_budget=TOKEN_BUDGET,
                                  max_model_len=length, steps_per_call=STEPS_PER_CALL,
                                  prefix_caching=False)
            engine = model.engine(config)
            for _ in range(2):  # compiles every shape the timed runs take
                engine.generate(fresh(prompt), params)
            requests = [WorkloadRequest(tuple(p), args.new_tokens) for p in fresh(prompt)]
            predicted = simulate(requests, config, engine.num_pages, length, pricer,
                                 figures["call_overhead_s"])
            width = pages_for_tokens(length, PAGE)
            step = pricer.step(SEQS, SEQS, width, PAGE, SEQS * (length - args.new_tokens // 2))
            rows.append({"plan": f"{layout}/{attn} {'x'.join(map(str, mesh))}",
                         "prompt": prompt, "engine": engine, "predicted": predicted,
                         "step": step, "width": width, "runs": []})
    for _ in range(args.rounds):
        for row in rows:
            row["runs"].append(row["engine"].generate(fresh(row["prompt"]), params).stats)
    print(f"{cfg.name} on {calibrate.cpu_name()}, {os.cpu_count()} cores, {args.devices} host "
          f"device(s); {SEQS} requests x {args.new_tokens} new tokens, quickest of "
          f"{args.rounds} interleaved rounds")
    print("| plan | prompt | wall s measured / predicted | ratio | TPOT ms measured / predicted "
          "| priced decode step ms at J pages (dense + attention) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        best = min(row["runs"], key=lambda s: s.wall_s)
        pred, step = row["predicted"], row["step"]
        tpot = [t for t in best.tpot_s if t is not None]
        tpot_ms = (f"{np.median(tpot) * 1e3:.1f} / {pred.tpot(50) * 1e3:.1f}" if tpot
                   else "- / -")
        print(f"| {row['plan']} | {row['prompt']} | {best.wall_s:.2f} / {pred.wall_s:.2f} | "
              f"{best.wall_s / pred.wall_s:.2f} | {tpot_ms} | {step.step_s * 1e3:.1f} at "
              f"{row['width']} ({step.dense.step_s * 1e3:.1f} + {step.attention_s * 1e3:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
