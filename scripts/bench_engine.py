"""Continuous-batching engine vs static batches on the skewed workload of issue 14.

Prompt lengths lognormal in [4, 400] (mean ~91), output lengths lognormal in [2, 200] (mean ~53),
on a random ~30M Llama-shaped model (d_model 512, 8 layers, 8 heads / 2 KV heads, vocab 8192).
Every request wants exactly its output length (no stop tokens): the engine gives each request its
own max_new_tokens; a static batch of 32 (`Model.generate`) runs to the longest request of the
batch, and only the requested tokens count as useful. Each side runs `--repeats` times (the first
includes compilation) and the last run is reported.

    python scripts/bench_engine.py --n 64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from jaxinfer import EngineConfig, Model, ModelConfig, SamplingParams
from jaxinfer.bench import _peak_rss_mb, _reset_peak_rss

MODEL = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                    head_dim=64, d_ff=1408, max_context=1024, name="bench-30m")


def workload(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n prompts (token ids) and their output lengths, lognormal as in issue 14."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(91) - 0.405, 0.9, n), 4, 400).astype(int)
    out_lens = np.clip(rng.lognormal(np.log(53) - 0.405, 0.9, n), 2, 200).astype(int)
    prompts = [rng.integers(0, MODEL.vocab_size, k).tolist() for k in prompt_lens]
    return prompts, out_lens.tolist()


def _percentiles(values) -> dict[str, float]:
    vals = np.asarray([v for v in values if v is not None], np.float64)
    return {"p50": float(np.percentile(vals, 50)), "p99": float(np.percentile(vals, 99))}


def run_engine(model: Model, prompts, out_lens, args) -> dict:
    engine = model.engine(EngineConfig(max_seqs=args.max_seqs, page_size=args.page_size,
                                       token_budget=args.token_budget,
                                       max_model_len=args.max_model_len,
                                       prefix_caching=False,
                                       steps_per_call=args.steps_per_call))
    params = [SamplingParams(max_new_tokens=k, stop_tokens=()) for k in out_lens]
    for _ in range(args.repeats):
        _reset_peak_rss()
        res = engine.generate(prompts, params)
    s = res.stats
    assert [len(t) for t in res.tokens] == out_lens
    return {"useful_tok_s": sum(out_lens) / s.wall_s, "wall_s": s.wall_s,
            "ttft_s": _percentiles(s.ttft_s), "tpot_s": _percentiles(s.tpot_s),
            "host_ms_per_token": 1e3 * s.host_s_per_token, "steps": s.steps,
            "device_calls": s.device_calls, "steps_per_call": args.steps_per_call,
            "preemptions": s.preemptions, "num_pages": engine.num_pages,
            "peak_rss_mb": _peak_rss_mb()}


def _static_once(model: Model, prompts, out_lens, batch: int):
    start = time.perf_counter()
    ttft, tpot = [], []
    for b in range(0, len(prompts), batch):
        lens = out_lens[b:b + batch]
        t0 = time.perf_counter() - start
        res = model.generate(prompts[b:b + batch], max_new_tokens=max(lens), stop_tokens=[])
        ttft += [t0 + res.timings["prefill_s"]] * len(lens)
        tpot += [res.timings["decode_s"] / max(max(lens) - 1, 1)] * len(lens)
    return time.perf_counter() - start, ttft, tpot


def run_static(model: Model, prompts, out_lens, args) -> dict:
    for _ in range(args.repeats):
        _reset_peak_rss()
        wall, ttft, tpot = _static_once(model, prompts, out_lens, args.static_batch)
    return {"useful_tok_s": sum(out_lens) / wall, "wall_s": wall,
            "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot),
            "peak_rss_mb": _peak_rss_mb()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="requests (issue 14: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the last is reported")
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=640,
                   help="engine page-table width (longest prompt 400 + output 200 fits)")
    p.add_argument("--steps-per-call", type=int, default=8,
                   help="engine steps per device call in decode-only stretches (1: no loop)")
    p.add_argument("--static-batch", type=int, default=32)
    p.add_argument("--skip-static", action="store_true")
    args = p.parse_args()
    prompts, out_lens = workload(args.n, args.seed)
    model = Model.random(MODEL, seed=args.seed)
    report = {"model": f"{MODEL.param_count() / 1e6:.1f}M params", "requests": args.n,
              "mean_prompt": float(np.mean([len(q) for q in prompts])),
              "mean_output": float(np.mean(out_lens)), "useful_tokens": int(sum(out_lens)),
              "engine": run_engine(model, prompts, out_lens, args)}
    if not args.skip_static:
        report["static"] = run_static(model, prompts, out_lens, args)
        report["speedup"] = report["engine"]["useful_tok_s"] / report["static"]["useful_tok_s"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
