"""Decode step time per layout on 8 simulated CPU devices (and on one device, for reference).

A random Llama-shaped model (d_model 512, 4 layers, 8 query heads, 2 KV heads, d_ff 1536, vocab
8192, float32), batch 8, 32-token prompts, greedy: each plan's decode seconds per step, from
`GenerationResult.timings["decode_s"]` over the generated tokens (compile excluded: the same call
runs twice and the second is timed; the best of --repeats). Uses only the public API, so it can
time an older checkout too: ``PYTHONPATH=/path/to/old python scripts/bench_layouts.py``.

    python scripts/bench_layouts.py [--new-tokens 32] [--repeats 3]
"""

import argparse
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "0")

import numpy as np  # noqa: E402

import jaxinfer  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from partitioning.mesh import MeshShape  # noqa: E402
from partitioning.plan import PhasePlan, Plan  # noqa: E402

CFG = ModelConfig(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2,
                  head_dim=64, d_ff=1536, max_context=256)
PLANS = [  # (prefill, decode, mesh)
    (("2d-ws", "heads"), ("2d-ws", "heads"), (2, 2, 2)),
    (("2d-ws", "heads"), ("2d-ws", "batch"), (2, 2, 2)),
    (("1d-ws", "heads"), ("1d-ws", "batch"), (8, 1, 1)),
    (("1d-ws", "heads"), ("1d-ws", "heads"), (1, 2, 4)),
    (("wg-xy", "heads"), ("wg-xyz", "batch"), (2, 2, 2)),
]


def step_seconds(model, prompts, new_tokens: int, repeats: int) -> float:
    kw = dict(max_new_tokens=new_tokens, stop_tokens=[])
    model.generate(prompts, **kw)  # compile
    best = float("inf")
    for _ in range(repeats):
        res = model.generate(prompts, **kw)
        best = min(best, res.timings["decode_s"] / new_tokens)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, 32).tolist() for _ in range(args.batch)]
    base = jaxinfer.Model.random(CFG, seed=0)
    t0 = time.perf_counter()
    print(f"jaxinfer {jaxinfer.__file__}; batch {args.batch}, {args.new_tokens} new tokens")
    print(f"{'prefill':<14}{'decode':<14}{'mesh':<8}{'ms/step':>9}")
    one = step_seconds(base, prompts, args.new_tokens, args.repeats) * 1e3
    print(f"{'one device':<36}{one:>9.2f}", flush=True)
    for prefill, decode, mesh in PLANS:
        shape = MeshShape(*mesh)
        plan = Plan(PhasePlan("prefill", *prefill, shape), PhasePlan("decode", *decode, shape))
        model = jaxinfer.Model(CFG, base.params, plan=plan)
        ms = step_seconds(model, prompts, args.new_tokens, args.repeats) * 1e3
        print(f"{'/'.join(prefill):<14}{'/'.join(decode):<14}{'x'.join(map(str, mesh)):<8}"
              f"{ms:>9.2f}", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
