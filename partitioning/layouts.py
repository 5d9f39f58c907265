"""The Pope et al. layouts as data: for one phase, where every weight, activation and KV-cache dim
lives on the (x, y, z) mesh, and which mesh axes each collective of a decoder layer runs over.

Weights are stored once, in the 2D layout `E_x F_yz` (pope2022.md §5.2), for 2d-ws and every
weight-gathered layout, so prefill (weight-gathered) and decode (weight-stationary) switch without
moving weights (§5.3). 1d-ws stores `E F_xyz` (§5.1) and pairs only with itself.

Mesh-axis order inside a tuple is the order of the shards (major first). The paper's "yz" is stored
z-major, ``("z", "y")``, so that gathering over y (wg-xy) leaves each chip a contiguous z shard;
after the x reduce-scatter the query heads are sharded ``("z", "y", "x")``, which fixes the order of
the batch-sharded attention's all-to-all and therefore of the batch-sharded KV cache (§6.2b).
"""

from __future__ import annotations

import dataclasses

from jaxinfer import axes as ax
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import LayerCollectives, ShardingError, ShardingRules
from partitioning.mesh import MeshShape
from partitioning.plan import ATTENTION, GATHERED_AXES, LAYOUTS, PhasePlan

HEADS_2D = ("z", "y")
"""Mesh axes of d_ff / heads in the stored 2D layout (the paper's yz)."""
ALL_1D = ("z", "y", "x")
"""Mesh axes of d_ff / heads in the stored 1D layout (the paper's xyz)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """One phase's partitioning of the decoder, resolved for a model and a mesh."""

    name: str
    """Layout name, one of `LAYOUTS`."""
    attention: str
    """'heads' or 'batch' (§6)."""
    mesh: MeshShape
    """Mesh axis sizes."""
    storage: str
    """'1d' or '2d': how the weights are stored (shared by the phases of a plan)."""
    gathered: tuple[str, ...]
    """Axes the layer's weights are all-gathered over (weight-gathered layouts), else ()."""
    model_axes: tuple[str, ...]
    """Axes d_ff and heads are sharded over inside the layer (after any weight gather)."""
    x_axes: tuple[str, ...]
    """Axes d_model stays sharded over inside the layer: ('x',) in 2d-ws (partial sums), else ()."""
    kv_stored: tuple[str, ...]
    """Axes the stored K/V projections' heads are sharded over (() = replicated)."""
    kv_weight_axes: tuple[str, ...]
    """Axes the K/V projections' heads are sharded over inside the layer (() = replicated)."""
    kv_heads: tuple[str, ...]
    """Axes of the KV cache's heads dim (() = replicated)."""
    attn_batch: tuple[str, ...]
    """Axes of the batch dim inside attention and in the KV cache."""

    def live(self, axes: tuple[str, ...]) -> tuple[str, ...]:
        """`axes` without those of size 1 (a collective over them moves nothing)."""
        return tuple(a for a in axes if self.mesh.as_dict()[a] > 1)

    def size(self, axes: tuple[str, ...]) -> int:
        return self.mesh.size(axes)

    def weight_rules(self) -> ShardingRules:
        """Stored weights (pope2022.md §5.1 `F_xyz`, §5.2 `E_x F_yz`; vocab like d_ff); mesh
        axes of size 1 are left out."""
        model = ALL_1D if self.storage == "1d" else HEADS_2D
        embed = () if self.storage == "1d" else ("x",)
        live = self.live
        return ShardingRules.from_dict({
            ax.EMBED: live(embed), ax.MLP: live(model), ax.Q_HEADS: live(model),
            ax.VOCAB: live(model), ax.KV_HEADS: live(self.kv_stored)},
            description=f"{self.storage} weight storage")

    def activation_rules(self) -> ShardingRules:
        """The residual stream and per-sequence state (batch, d_model)."""
        return ShardingRules.from_dict(
            {ax.BATCH: self.live(self.gathered), ax.ACT_EMBED: self.collectives().res_embed},
            description=f"{self.name} / {self.attention} residual")

    def cache_rules(self) -> ShardingRules:
        """The KV cache (batch inside attention, KV heads)."""
        return ShardingRules.from_dict(
            {ax.BATCH: self.live(self.attn_batch), ax.ACT_KV_HEADS: self.live(self.kv_heads)},
            description=f"{self.name} / {self.attention} KV cache")

    def collectives(self) -> LayerCollectives:
        """The mesh axes of each collective point of the decoder layer (size-1 axes dropped)."""
        live = self.live
        return LayerCollectives(
            gathered=live(self.gathered), model_axes=live(self.model_axes),
            x_axes=live(self.x_axes), attention=self.attention, kv_heads=live(self.kv_heads),
            kv_weight_axes=live(self.kv_weight_axes), attn_batch=live(self.attn_batch))

    def program_key(self) -> tuple:
        """What tells two layouts' programs apart: the mesh, the stored weights' mesh axes and
        every collective point, size-1 axes dropped (wg-xyz on a mesh whose z is 1 is wg-xy)."""
        return (self.mesh, self.weight_rules().mapping, self.collectives())

    def check(self, cfg: ModelConfig, batch: int | None = None) -> None:
        """Raise `ShardingError` naming the dim that the mesh does not divide."""
        layer = self.collectives()  # residual d_model: `BLE_xyz` in WS, `B_G L E_rest` in WG
        n_inner = self.size(layer.q_heads)
        stored = ALL_1D if self.storage == "1d" else HEADS_2D
        dims = [("d_model", cfg.d_model, layer.res_embed), ("d_ff", cfg.d_ff, layer.q_heads),
                ("n_heads", cfg.n_heads, layer.q_heads),
                ("d_model of stored weights", cfg.d_model, () if self.storage == "1d" else ("x",)),
                ("d_ff of stored weights", cfg.d_ff, stored),
                ("n_heads of stored weights", cfg.n_heads, stored),
                ("vocab of stored weights", cfg.vocab_size, stored)]
        if batch is not None:
            dims += [("batch", batch, self.gathered), ("batch", batch, self.attn_batch)]
        for what, size, axes in dims:
            if size % self.size(axes):
                raise ShardingError(f"layout {self.name}/{self.attention} on mesh {self.mesh}: "
                                    f"{what} = {size} is not divisible by the {self.size(axes)} "
                                    f"shards of mesh axes {axes}")
        group = cfg.n_heads // cfg.n_kv_heads
        per_chip = cfg.n_heads // n_inner
        if self.attention == "heads" and per_chip % group and group % per_chip:
            raise ShardingError(f"{per_chip} query heads per chip do not align with groups of "
                                f"{group} query heads per KV head")


def resolve(plan: PhasePlan, cfg: ModelConfig, storage: str | None = None) -> Layout:
    """The `Layout` of one phase plan for `cfg` (the KV-head choices depend on n_kv_heads).

    K/V heads are sharded like the query heads when n_kv_heads divides over them, else replicated
    (the baseline multiquery layout, §6.1); batch-sharded attention needs them replicated.
    """
    if plan.layout not in LAYOUTS or plan.attention not in ATTENTION:
        raise ShardingError(f"unknown layout {plan.layout!r} / attention {plan.attention!r}")
    mesh = plan.mesh
    own = "1d" if plan.layout == "1d-ws" else "2d"
    if storage is not None and storage != own:
        raise ShardingError(f"layout {plan.layout} needs {own} weight storage but the plan stores "
                            f"weights {storage}: 1d-ws pairs only with 1d-ws (weights never move "
                            "between phases, pope2022.md §5.3)")
    gathered = GATHERED_AXES.get(plan.layout, ())
    if plan.layout == "1d-ws":
        model_axes, x_axes = ALL_1D, ()
    elif plan.layout == "2d-ws":
        model_axes, x_axes = HEADS_2D, ("x",)
    else:
        model_axes, x_axes = tuple(a for a in HEADS_2D if a not in gathered), ()
    stored_model = ALL_1D if own == "1d" else HEADS_2D
    k = cfg.n_kv_heads
    kv_stored = stored_model if k % mesh.size(stored_model) == 0 else ()
    kv_weight_axes = tuple(a for a in kv_stored if a in model_axes)
    q_heads = model_axes + x_axes
    if plan.attention == "batch":
        if mesh.size(kv_weight_axes) > 1:
            raise ShardingError(
                f"batch-sharded attention needs the K/V heads replicated, but {k} KV heads are "
                f"sharded over {kv_weight_axes} on mesh {mesh}; use attention='heads' "
                "(batch sharding is for multiquery / grouped-query models, pope2022.md §6.1)")
        kv_heads, attn_batch = (), gathered + q_heads
    elif kv_weight_axes == model_axes:  # K/V sharded like the queries' heads
        kv_heads = q_heads if k % mesh.size(q_heads) == 0 else model_axes
        attn_batch = gathered
    else:  # replicated K/V heads: every chip keeps all of them
        kv_heads, attn_batch = (), gathered
    return Layout(name=plan.layout, attention=plan.attention, mesh=mesh, storage=own,
                  gathered=gathered, model_axes=model_axes, x_axes=x_axes,
                  kv_stored=kv_stored, kv_weight_axes=kv_weight_axes, kv_heads=kv_heads,
                  attn_batch=attn_batch)


def storage_of(plan_layouts: tuple[str, ...]) -> str:
    """The weight storage of a plan's phases; raise when they disagree."""
    kinds = {"1d" if name == "1d-ws" else "2d" for name in plan_layouts}
    if len(kinds) > 1:
        raise ShardingError(f"layouts {plan_layouts} store weights differently (1d-ws stores "
                            "E F_xyz, the others E_x F_yz); weights are stored once per plan "
                            "(pope2022.md §5.3), so pair 1d-ws only with 1d-ws")
    return kinds.pop()


def describe(layout: Layout) -> str:
    """One line: the per-chip layouts in the paper's notation."""
    def sub(axes):
        return "".join(axes) if axes else ""
    return (f"{layout.name}/{layout.attention} on {layout.mesh}: weights "
            f"{'E_x F_' + sub(HEADS_2D) if layout.storage == '2d' else 'E F_' + sub(ALL_1D)}, "
            f"residual B_{sub(layout.gathered)} L E_{sub(layout.x_axes + layout.model_axes)}, "
            f"KV cache B_{sub(layout.attn_batch)} K_{sub(layout.kv_heads)}")

