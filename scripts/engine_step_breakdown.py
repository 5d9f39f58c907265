"""The engine's decode step on host devices: measured TPOT beside the simulator's priced step.

For each plan and prompt length, 8 requests of that prompt and 64 new tokens run through the
engine (max_seqs 8, one warm-up run, then the quickest of 3); the median TPOT is printed beside
`jaxinfer.engine_sim.StepPricer`'s price of a decode step of 8 sequences at that table width,
split into its dense part (the cost model) and its attention (the twin's measured table), plus
the per-call overhead spread over the steps of a call. Where the engine planner misses, this
says whether the dense part or the attention does, and how the miss grows with the context.

    flock /tmp/jaxinfer_timing.lock python scripts/engine_step_breakdown.py \
        [--plans 1d-ws/heads/1x1x8,1d-ws/batch/1x1x8] [--prompts 64,400] [--kv-pages N]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

NEW_TOKENS = 64
SEQS = 8
PAGE = 16
STEPS_PER_CALL = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default="1d-ws/heads/1x1x8,1d-ws/batch/1x1x8",
                   help="comma-separated LAYOUT/ATTENTION/XxYxZ (one mesh for all)")
    p.add_argument("--prompts", default="64,400", help="comma-separated prompt lengths")
    p.add_argument("--kv-pages", type=int, default=None,
                   help="KV pool pages (default: room for the 8 sequences)")
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
    if any(n < 1 or n + NEW_TOKENS > 1024 for n in args.prompts):
        p.error("--prompts must lie in 1..960 (the 30m model's context is 1024)")
    args.devices = int(np.prod(meshes.pop()))
    return args


def main() -> int:
    args = parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={args.devices}").strip()
    from jaxinfer import bench_engine, engine_calibrate
    from jaxinfer.api import Model
    from jaxinfer.engine import EngineConfig
    from jaxinfer.engine.device import PagedKV
    from jaxinfer.engine.pages import pages_for_tokens
    from jaxinfer.engine_sim import StepPricer
    from jaxinfer.sampling import SamplingParams
    from partitioning import calibrate
    from partitioning.hardware import cpu_profile
    from partitioning.mesh import MeshShape
    from partitioning.plan import Plan

    cfg = bench_engine.MODELS["30m"]
    hw = cpu_profile(calibrate.load_or_calibrate(), args.devices)
    figures = engine_calibrate.load_or_measure(cfg, PAGE, "float32", attention=True)
    attention = engine_calibrate.attention_cost(figures)
    overhead = figures["call_overhead_s"] / STEPS_PER_CALL
    page_bytes = PagedKV.bytes_per_page(cfg, PAGE, "float32")
    print(f"{cfg.name} on {calibrate.cpu_name()}, {os.cpu_count()} cores, {args.devices} host "
          f"device(s); {SEQS} sequences x {NEW_TOKENS} new tokens; call overhead / "
          f"{STEPS_PER_CALL} steps = {overhead * 1e3:.2f} ms")
    print("| plan | prompt | table width J | KV pages | measured TPOT ms | priced step ms | "
          "dense ms | attention ms | measured / priced |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, attn, mesh in args.plans:
        plan = Plan.uniform(layout, attn, MeshShape(*mesh))
        model = Model.random(cfg, plan=plan)
        pricer = StepPricer(cfg, plan.decode, hw, attention)
        for prompt in args.prompts:
            rng = np.random.default_rng(0)
            prompts = [rng.integers(3, cfg.vocab_size, prompt).tolist() for _ in range(SEQS)]
            params = [SamplingParams(max_new_tokens=NEW_TOKENS, stop_tokens=())] * SEQS
            engine = model.engine(EngineConfig(
                max_seqs=SEQS, page_size=PAGE, token_budget=512,
                max_model_len=prompt + NEW_TOKENS, steps_per_call=STEPS_PER_CALL,
                kv_cache_bytes=None if args.kv_pages is None else args.kv_pages * page_bytes))
            engine.generate(prompts, params)  # compiles every shape the runs take
            best = min((engine.generate(prompts, params).stats for _ in range(3)),
                       key=lambda s: s.wall_s)
            tpot = float(np.median([t for t in best.tpot_s if t is not None]))
            width = pages_for_tokens(prompt + NEW_TOKENS, PAGE)
            step = pricer.step(SEQS, SEQS, width, PAGE, SEQS * (prompt + NEW_TOKENS // 2))
            priced = step.step_s + overhead
            print(f"| {layout}/{attn} {'x'.join(map(str, mesh))} | {prompt} | {width} | "
                  f"{engine.num_pages} | {tpot * 1e3:.1f} | {priced * 1e3:.1f} | "
                  f"{step.dense.step_s * 1e3:.1f} | {step.attention_s * 1e3:.1f} | "
                  f"{tpot / priced:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
