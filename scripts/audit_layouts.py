"""HLO audit of every layout on 8 simulated CPU devices: per-chip collective bytes of one layer in
the compiled step vs the cost model (pope2022.md §4.3, §5, §6.2), as ratios per collective kind.

    python scripts/audit_layouts.py [--mesh 2 2 2] [--batch 8] [--phase decode]
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxinfer.config import ModelConfig  # noqa: E402
from partitioning import audit  # noqa: E402
from partitioning.mesh import MeshShape  # noqa: E402
from partitioning.plan import ATTENTION, LAYOUTS, PhasePlan  # noqa: E402
from partitioning.rules import ShardingError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs=3, default=(2, 2, 2))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--phase", choices=("prefill", "decode"), default=None)
    args = parser.parse_args()
    models = {f"K={k}": ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8,
                                    n_kv_heads=k, head_dim=8, d_ff=128, max_context=64)
              for k in (8, 1)}
    print(f"{'model':<6}{'phase':<8}{'layout':<8}{'attention':<10}"
          + "".join(f"{k:>16}" for k in audit.KINDS))
    for name, cfg in models.items():
        for phase in (args.phase,) if args.phase else ("prefill", "decode"):
            for layout in LAYOUTS:
                for attention in ATTENTION:
                    plan = PhasePlan(phase, layout, attention, MeshShape(*args.mesh))
                    try:
                        r = audit.audit_step(cfg, plan, args.batch, args.context, args.prompt_len)
                    except ShardingError as e:
                        print(f"{name:<6}{phase:<8}{layout:<8}{attention:<10}  n/a: {e}"[:150])
                        continue
                    cells = "".join(f"{'-' if v is None else f'{v:.3f}':>16}"
                                    for v in r.ratios().values())
                    print(f"{name:<6}{phase:<8}{layout:<8}{attention:<10}{cells}")


if __name__ == "__main__":
    main()
