"""Continuous-batching engine vs static batches on the skewed workload of issue 14.

`jaxinfer.bench_engine` describes the workload and the four sides (engine, jaxinfer static
batches, Hugging Face static batches, roofline); this script exposes the engine's knobs:

    python scripts/bench_engine.py --model 30m --n 512
    python scripts/bench_engine.py --model 125m --n 512 --json out.json
"""

from __future__ import annotations

import argparse
import json

from jaxinfer import EngineConfig, bench_engine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(bench_engine.MODELS), default="30m")
    p.add_argument("--n", type=int, default=512, help="requests (issue 14: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=64, help="requests of the compile run per side")
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=640,
                   help="longest request the engine admits (prompt 400 + output 200 fits)")
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="engine steps per device call in decode-only stretches (1: no loop)")
    p.add_argument("--static-batch", type=int, default=32)
    p.add_argument("--skip-static", action="store_true", help="no jaxinfer static side")
    p.add_argument("--no-hf", action="store_true", help="no Hugging Face side")
    p.add_argument("--no-profile", action="store_true", help="no decode-step profile")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report here")
    args = p.parse_args()
    config = EngineConfig(max_seqs=args.max_seqs, page_size=args.page_size,
                          token_budget=args.token_budget, max_model_len=args.max_model_len,
                          prefix_caching=False, steps_per_call=args.steps_per_call)
    report = bench_engine.run(args.model, args.n, seed=args.seed, engine_config=config,
                              static_batch=args.static_batch, hf=not args.no_hf,
                              static=not args.skip_static, warmup=args.warmup,
                              profile=not args.no_profile)
    bench_engine.print_report(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
