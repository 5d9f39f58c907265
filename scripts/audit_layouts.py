"""HLO audit of the full matrix on 8 simulated CPU devices: every layout x attention sharding x
{f32, int8, int4} x {MHA, GQA, MQA} the planner accepts, both phases. For each, the whole step's
per-chip collective bytes in the compiled program `generate` runs (`jaxinfer.api.compiled_hlo`)
over the bytes the cost model prices, per collective kind (pope2022.md App. A.1).

    python scripts/audit_layouts.py [--mesh 2x2x2] [--batch 8] [--phase decode] [--out FILE]
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxinfer import api, quant  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.sharding import ShardingError  # noqa: E402
from partitioning import audit  # noqa: E402
from partitioning.cost_model import Workload  # noqa: E402
from partitioning.mesh import MeshShape  # noqa: E402
from partitioning.plan import ATTENTION, LAYOUTS, Plan, PhasePlan  # noqa: E402

MODELS = {f"{name} (K={k})": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8,
                                         n_kv_heads=k, head_dim=16, d_ff=128, max_context=64)
          for name, k in (("MHA", 8), ("GQA", 2), ("MQA", 1))}
WEIGHTS = {"f32": (None, None, 4.0), "int8": ("int8", None, 1.0), "int4": ("int4", 16, 0.5)}


def audit_one(cfg, phase, layout, attention, mesh, weights, batch, context, prompt):
    own = PhasePlan(phase, layout, attention, mesh)
    twin = PhasePlan("decode" if phase == "prefill" else "prefill", layout, attention, mesh)
    plan = Plan(own, twin) if phase == "prefill" else Plan(twin, own)
    quantize, group, size = WEIGHTS[weights]
    hlo = api.compiled_hlo(cfg, phase, batch, context, prompt, plan=plan, quantize=quantize,
                           group_size=group)
    qc = None if quantize is None else quant.QuantConfig.from_mode(quantize, group)
    wl = Workload(batch, prompt if phase == "prefill" else 1, context, size, 4.0, 4.0,
                  quantization=qc)
    return audit.audit_hlo(hlo, cfg, own, wl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2x2x2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--phase", choices=("prefill", "decode"), default=None)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    mesh = MeshShape(*(int(v) for v in args.mesh.split("x")))
    lines = [f"mesh {mesh}, batch {args.batch}, context {args.context}, prompt "
             f"{args.prompt_len}: measured / priced bytes per chip per step",
             f"{'model':<10}{'weights':<8}{'phase':<8}{'layout':<8}{'attention':<10}"
             + "".join(f"{k:>19}" for k in audit.KINDS)]
    print("\n".join(lines), flush=True)
    worst, count = 0.0, 0
    for name, cfg in MODELS.items():
        for weights in WEIGHTS:
            for phase in (args.phase,) if args.phase else ("prefill", "decode"):
                for layout in LAYOUTS:
                    for attention in ATTENTION:
                        head = f"{name:<10}{weights:<8}{phase:<8}{layout:<8}{attention:<10}"
                        try:
                            r = audit_one(cfg, phase, layout, attention, mesh, weights,
                                          args.batch, args.context, args.prompt_len)
                        except ShardingError as e:
                            line = f"{head}  not accepted: {e}"[:170]
                        else:
                            count += 1
                            ratios = r.ratios()
                            worst = max([worst] + [abs(v - 1) for v in ratios.values()
                                                   if v is not None])
                            line = head + "".join(
                                f"{'-' if v is None else f'{v:.4f}':>19}"
                                for v in ratios.values())
                        lines.append(line)
                        print(line, flush=True)
    summary = f"{count} audited steps; worst |measured/priced - 1| = {worst:.2e}"
    lines.append(summary)
    print(summary)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
