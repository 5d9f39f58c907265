"""Batch-mode throughput: `jaxinfer generate --input FILE --output FILE` over N requests.

    python scripts/bench_batch.py --model builtin --n 1000
    python scripts/bench_batch.py --model 125m --n 1000

Writes the request file (builtin: text prompts of 2-12 words drawn from Python keywords; 125m:
16-64 random token ids for the random 125M bench checkpoint of `jaxinfer.bench_engine`, which has
no tokenizer), runs the CLI's batch mode as a user would (a subprocess: compile included, greedy,
`--max-new-tokens` each, no stop tokens), checks that every id has one record, and prints the
CLI's summary line with wall time and the subprocess's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer import bench_engine  # noqa: E402

WORDS = ("def class return import for while if else print list dict value index count total "
         "result data self").split()


def write_requests(path: str, model: str, n: int, seed: int = 0) -> None:
    """n JSON Lines requests for `model` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    vocab = bench_engine.MODELS["125m"].vocab_size
    with open(path, "w") as fh:
        for i in range(n):
            if model == "builtin":
                line = {"id": i, "prompt": " ".join(rng.choice(WORDS, int(rng.integers(2, 13))))}
            else:
                line = {"id": i, "tokens": rng.integers(3, vocab, int(rng.integers(16, 65))).tolist()}
            fh.write(json.dumps(line) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("builtin", "125m"), default="builtin")
    p.add_argument("--n", type=int, default=1000, help="requests")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.n < 1 or args.max_new_tokens < 1:
        p.error("--n and --max-new-tokens must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        model = "builtin"
        if args.model == "125m":
            model = bench_engine.build_checkpoint(bench_engine.MODELS["125m"],
                                                  os.path.join(tmp, "ckpt"))
        requests, output = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        write_requests(requests, args.model, args.n)
        cmd = [sys.executable, "-m", "jaxinfer", "generate", "--model", model, "--input",
               requests, "--output", output, "--max-new-tokens", str(args.max_new_tokens),
               "--stop-tokens", ""]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        with open(output) as fh:
            ids = sorted(json.loads(line)["id"] for line in fh)
        if ids != list(range(args.n)):
            raise SystemExit(f"the output holds {len(ids)} records, not one per id 0..{args.n - 1}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = [line for line in proc.stderr.splitlines() if line.startswith("batch:")]
    print(f"{bench_engine.machine()}; model {args.model}")
    print(summary[-1] if summary else proc.stderr.strip().splitlines()[-1])
    print(f"wall {wall:.1f} s (process start and compile included), peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
