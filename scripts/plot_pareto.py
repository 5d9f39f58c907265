"""Latency vs cost Pareto frontier over chip counts and batch sizes (Pope et al. Fig. 1).

    python scripts/plot_pareto.py [--model palm-540b] [--hardware tpu-v4] [--phase decode]
        [--weights bf16] [--out pareto.png]

Prints the frontier as a table and writes the plot (every evaluated point, frontier highlighted).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from partitioning.cost_model import WEIGHT_BYTES
from partitioning.hardware import get_hardware
from partitioning.planner import pareto_frontier
from partitioning.presets import NOMINAL_PARAMS, PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="palm-540b", choices=sorted(PRESETS))
    parser.add_argument("--hardware", default="tpu-v4")
    parser.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    parser.add_argument("--weights", default="bf16", choices=list(WEIGHT_BYTES))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--chips", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+",
                        default=[1, 4, 16, 64, 128, 256, 512, 1024])
    parser.add_argument("--out", default="pareto.png")
    args = parser.parse_args()

    cfg, hw = PRESETS[args.model], get_hardware(args.hardware)
    tokens = args.context if args.phase == "prefill" else 1
    points, frontier = pareto_frontier(cfg, args.phase, args.chips, args.batches, hw, tokens,
                                       args.context, WEIGHT_BYTES[args.weights],
                                       NOMINAL_PARAMS.get(args.model))
    table = Table(title=f"{args.model} {args.phase} Pareto frontier on {hw.name} "
                        f"({args.weights} weights, context {args.context})")
    for col in ("chips", "batch", "layout", "attention", "mesh", "latency ms", "chip-ms/token",
                "MFU"):
        table.add_column(col, justify="right")
    for p in frontier:
        table.add_row(str(p.chips), str(p.batch), p.plan.layout, p.plan.attention,
                      str(p.plan.mesh), f"{p.latency_s * 1e3:.3g}",
                      f"{p.cost_chip_s_per_token * 1e3:.3g}", f"{p.mfu:.0%}")
    Console(width=140).print(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p.latency_s * 1e3 for p in points],
               [p.cost_chip_s_per_token * 1e3 for p in points], s=10, c="0.7", label="best plan")
    ax.plot([p.latency_s * 1e3 for p in frontier],
            [p.cost_chip_s_per_token * 1e3 for p in frontier], "o-", label="Pareto frontier")
    for p in frontier:
        ax.annotate(f"{p.chips}c b{p.batch}", (p.latency_s * 1e3, p.cost_chip_s_per_token * 1e3),
                    fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{args.phase} latency per {'step' if args.phase == 'decode' else 'prompt'} (ms)")
    ax.set_ylabel("cost (chip-ms per token)")
    ax.set_title(f"{args.model} on {hw.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
