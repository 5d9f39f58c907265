"""Predicted vs published: Pope et al. 2022 Tables 1, 2 and 3 (see ../shared/reference/pope2022.md).

    python scripts/reproduce_pope.py
"""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from partitioning.cost_model import Workload, estimate, kv_cache_bytes_per_chip
from partitioning.hardware import get_hardware
from partitioning.mesh import MeshShape, paper_mesh_shape
from partitioning.plan import PhasePlan
from partitioning.presets import NOMINAL_PARAMS, PRESETS

V4 = get_hardware("tpu-v4")
LAYOUT = {"WS 2D": "2d-ws", "WG XYZ": "wg-xyz"}

# (column, chips, batch, FFN layout, attention, weights, published MFU, published latency s)
TABLE2 = [("low-latency prefill", 64, 1, "WS 2D", "heads", "int8", 0.43, 0.29),
          ("low-latency decode", 64, 64, "WS 2D", "batch", "int8", 0.14, 1.82),
          ("high-throughput prefill", 64, 512, "WG XYZ", "batch", "bf16", 0.76, 85.2),
          ("high-throughput decode", 64, 512, "WS 2D", "batch", "bf16", 0.33, 6.0)]
TABLE3 = [("low-latency prefill", 16, 1, "WS 2D", "heads", "int8", 0.36, 0.16),
          ("low-latency decode", 16, 32, "WS 2D", "batch", "int8", 0.08, 0.73),
          ("high-throughput prefill", 32, 512, "WG XYZ", "batch", "bf16", 0.73, 20.2),
          ("high-throughput decode", 8, 512, "WS 2D", "batch", "bf16", 0.37, 5.1)]
TABLE1 = {"multihead": (1320, 330), "baseline multiquery": (660, 165),
          "optimized multiquery": (43000, 10700)}


def table1() -> Table:
    """§6.6: max context, PaLM 540B on 64 chips, 30% of 32 GiB per chip for the KV cache."""
    t = Table(title="Table 1: max context, PaLM 540B, 64 TPU v4 (§6.6)")
    for col in ("variant", "batch 128 predicted", "published", "batch 512 predicted", "published"):
        t.add_column(col, justify="right")
    for variant, published in TABLE1.items():
        cfg = PRESETS["palm-540b"]
        if variant == "multihead":
            cfg = dataclasses.replace(cfg, n_kv_heads=64, head_dim=128)
        attention = "batch" if variant.startswith("optimized") else "heads"
        plan = PhasePlan("decode", "2d-ws", attention, MeshShape(4, 4, 4))
        row = [variant]
        for batch, pub in zip((128, 512), published):
            ctx = 0.3 * 32 * 2**30 / kv_cache_bytes_per_chip(cfg, plan, batch, 1, 2)
            row += [f"{ctx:,.0f} ({ctx / pub - 1:+.1%})", f"{pub:,}"]
        t.add_row(*row)
    return t


def examples(title: str, model: str, rows) -> Table:
    """§10.1/§10.2: the paper's example configurations, context 2048, 64 generated tokens."""
    cfg = PRESETS[model]
    t = Table(title=title)
    for col in ("configuration", "chips", "batch", "layout", "MFU pred", "MFU pub", "latency pred",
                "latency pub", "bound"):
        t.add_column(col, justify="right")
    for name, chips, batch, ffn, attention, weights, mfu_pub, lat_pub in rows:
        phase = "prefill" if "prefill" in name else "decode"
        wl = Workload(batch, 2048 if phase == "prefill" else 1, 2048,
                      1.0 if weights == "int8" else 2.0)
        plan = PhasePlan(phase, LAYOUT[ffn], attention, paper_mesh_shape(chips))
        e = estimate(cfg, plan, wl, V4, NOMINAL_PARAMS[model])
        latency = e.step_time_s * (1 if phase == "prefill" else 64)
        t.add_row(name, str(chips), str(batch), f"{ffn} / {attention} / {weights}",
                  f"{e.mfu:.0%}", f"{mfu_pub:.0%}", f"{latency:.3g} s", f"{lat_pub} s", e.bound)
    return t


def main() -> None:
    console = Console(width=150)
    console.print(table1())
    console.print(examples("Table 2: PaLM 540B (§10.1)", "palm-540b", TABLE2))
    console.print(examples("Table 3: PaLM 62B (§10.2)", "palm-62b", TABLE3))
    console.print("Latency: prefill of 2048 tokens; decode of 64 tokens. The model assumes no "
                  "overlap of communication with compute and no fixed per-step overheads (§4.1).")


if __name__ == "__main__":
    main()
