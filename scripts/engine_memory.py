"""Peak memory of the engine does not grow with the number of prompts (issue 14, item 7).

Each count runs in a fresh process: the built-in model (`jaxinfer.load("builtin")`), N random
printable prompts of 4-16 bytes, max_new_tokens 4, greedy, through `Engine.generate` (results
kept: tokens, logprobs, per-request timings) after a warm-up call that compiles. Reported per N:
RSS before the call, peak RSS during it (VmHWM reset after the warm-up), wall time, generated
tokens. Linux only (/proc/self).

    python scripts/engine_memory.py --n 2000 20000 [--stream]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def prompts(n: int, seed: int) -> list[str]:
    """n printable ASCII prompts of 4-16 bytes."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 17, n)
    return ["".join(chr(c) for c in rng.integers(32, 127, k)) for k in lengths]


def run_one(n: int, max_seqs: int, seed: int, stream: bool) -> dict:
    """The measurement for n prompts, in this process; `stream`: consume `Engine.stream`
    counting tokens (no results kept) instead of `generate`."""
    import jaxinfer
    from jaxinfer import EngineConfig, SamplingParams

    model = jaxinfer.load("builtin")
    engine = model.engine(EngineConfig(max_seqs=max_seqs, max_model_len=64))
    params = SamplingParams(max_new_tokens=4, stop_tokens=())
    engine.generate(prompts(64, seed + 1), params)  # compile outside the measurement
    texts = prompts(n, seed)
    rss_before = _rss_mb("VmRSS")
    _reset_peak()  # the peak of the call alone, not of the warm-up's compilation
    start = time.perf_counter()
    if stream:
        generated = sum(len(e.token_ids) for e in engine.stream(texts, params))
        calls = None
    else:
        res = engine.generate(texts, params)
        assert len(res.tokens) == n and all(len(t) == 4 for t in res.tokens)
        generated, calls = res.stats.generated_tokens, res.stats.device_calls
    wall = time.perf_counter() - start
    assert generated == 4 * n
    return {"n": n, "mode": "stream" if stream else "generate", "wall_s": round(wall, 2),
            "generated_tokens": generated, "tok_s": round(generated / wall, 1),
            "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
            "peak_growth_mb": round(_rss_mb("VmHWM") - rss_before, 1), "num_pages": engine.num_pages,
            "max_seqs": max_seqs, "device_calls": calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[2000, 20000], help="prompt counts")
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true",
                   help="consume Engine.stream without keeping results (else generate)")
    p.add_argument("--one", action="store_true", help="measure --n (one count) in this process")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.n[0], args.max_seqs, args.seed, args.stream)))
        return 0
    rows = []
    for n in args.n:
        out = subprocess.run([sys.executable, __file__, "--one", "--n", str(n), "--max-seqs",
                              str(args.max_seqs), "--seed", str(args.seed)]
                             + (["--stream"] if args.stream else []),
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
