"""Where a decode step's time goes: a `jax.profiler` trace of one generation, summed per op kind.

    python scripts/profile_decode.py [--batch 8] [--checkpoint DIR] [--new-tokens 64] [--top 12]

Runs the benchmark's 125M Llama-shaped random checkpoint (or DIR) to compile, then traces a
generation of --new-tokens and one of a single token under `jax.profiler.trace`; their difference
is the decode loop. Prints each XLA op kind's share of the decode loop's op time (fusion names with
their numeric suffix dropped: `ynn_fusion` = XLA:CPU's YNNPACK dot fusions, `*slice*` = cache
slicing, `copy*` = copies, ...). The per-op trace events need
`--xla_cpu_enable_xprof_traceme=true`, which this script adds to XLA_FLAGS before JAX starts.
Times are summed over threads, so shares, not absolute times, are the figure to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxinfer  # noqa: E402
from jaxinfer import bench  # noqa: E402

# Host-side and runtime events that enclose the ops rather than being ops.
_ENCLOSING = re.compile(r"^\$|Thunk|np\.asarray|PjRt|PjitFunction|ThreadPool|^end: ")


def op_kind_times(trace_dir: str) -> collections.Counter:
    """Microseconds per op kind in the perfetto trace written under `trace_dir`."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not _ENCLOSING.search(e["name"]):
            kinds[re.sub(r"\.\d+$", "", e["name"])] += e.get("dur", 0)
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir (default: build one)")
    p.add_argument("--top", type=int, default=12, help="op kinds to list")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or tmp
        if args.checkpoint is None:
            bench.build_checkpoint(path)
        model = jaxinfer.load(path, dtype="float32")
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, model.config.vocab_size,
                               size=(args.batch, args.prompt_len)).tolist()
        kwargs = dict(max_new_tokens=args.new_tokens, stop_tokens=[], temperature=0.0)
        model.generate(prompts, **kwargs)  # compile outside the traces
        model.generate(prompts, **dict(kwargs, max_new_tokens=1))
        traced = []
        for i, new_tokens in enumerate((args.new_tokens, 1)):
            trace_dir = os.path.join(tmp, f"trace{i}")
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                result = model.generate(prompts, **dict(kwargs, max_new_tokens=new_tokens))
            traced.append((result, op_kind_times(trace_dir)))
    (result, kinds), (_, prefill_kinds) = traced
    kinds.subtract(prefill_kinds)
    kinds = +kinds  # op kinds the decode loop spent time in
    total = sum(kinds.values())
    t = result.timings
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens: prefill "
          f"{t['prefill_s']:.3f} s, decode {t['decode_s']:.3f} s "
          f"({t['decode_s'] / (args.new_tokens - 1) * 1e3:.1f} ms/step)")
    print(f"{'op kind':40s} {'share':>7s}")
    for name, us in kinds.most_common(args.top):
        print(f"{name:40s} {us / total:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
