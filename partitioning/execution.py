"""From a `Plan` to what the model runs: one `jaxinfer.sharding.PhaseSharding` per phase.

The layouts (`partitioning.layouts`) say where every dim lives and which axes each collective
of a layer runs over; this module binds them to a device mesh. Weights are stored once for both
phases (pope2022.md §5.3), so the two phases' weight rules are the same; the KV cache and the
residual rows may differ between them and are moved between the phases (§6.4).
"""

from __future__ import annotations

import jax

from jaxinfer.config import ModelConfig
from jaxinfer.sharding import PhaseSharding
from partitioning.layouts import Layout, resolve, storage_of
from partitioning.mesh import make_mesh
from partitioning.plan import PHASES, Plan


def layouts(plan: Plan, cfg: ModelConfig) -> dict[str, Layout]:
    """The resolved layout of each phase (both share the weight storage); raises
    `ShardingError` naming the dim a mesh does not divide."""
    storage = storage_of((plan.prefill.layout, plan.decode.layout))
    out = {phase: resolve(getattr(plan, phase), cfg, storage) for phase in PHASES}
    for layout in out.values():
        layout.check(cfg)
    return out


def phase_sharding(layout: Layout, mesh: jax.sharding.Mesh) -> PhaseSharding:
    """The description the per-chip model runs for one phase's layout on `mesh`."""
    return PhaseSharding(mesh=mesh, weights=layout.weight_rules(),
                         activations=layout.activation_rules(), cache=layout.cache_rules(),
                         layer=layout.collectives(),
                         description=f"{layout.name}/{layout.attention} on {layout.mesh}")


def plan_shardings(plan: Plan, cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[PhaseSharding, PhaseSharding]:
    """(prefill, decode) `PhaseSharding`s of `plan` for `cfg` on `mesh` (default: all devices as
    the plan's x, y, z mesh)."""
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a partitioning.plan.Plan, got {type(plan).__name__}")
    mesh = make_mesh(plan.decode.mesh) if mesh is None else mesh
    got = tuple(int(mesh.shape[a]) for a in ("x", "y", "z")) \
        if set(mesh.axis_names) == {"x", "y", "z"} else None
    if got != plan.decode.mesh.sizes:
        raise ValueError(f"mesh {dict(mesh.shape)} does not match the plan's mesh "
                         f"{plan.decode.mesh} (axes x, y, z)")
    resolved = layouts(plan, cfg)
    return phase_sharding(resolved["prefill"], mesh), phase_sharding(resolved["decode"], mesh)
