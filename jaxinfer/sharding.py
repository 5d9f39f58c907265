"""How one phase (prefill or decode) of the model is partitioned: the description the model runs.

The model (`jaxinfer.model`) is written per chip and runs under `jax.shard_map`; everything it
needs to know about the partitioning is one `PhaseSharding`:

- ``mesh``: the devices, with named axes;
- ``weights`` / ``activations`` / ``cache``: `ShardingRules`, logical axis (`jaxinfer.axes`) ->
  mesh axes, for the stored weights, the residual stream and the KV cache;
- ``layer``: `LayerCollectives`, the mesh axes of each collective at its fixed point of the
  decoder layer (a collective over no axes is skipped).

`partitioning` builds one from a plan (pope2022.md §5-§6 layouts); `PhaseSharding.single_device`
is the unsharded model: a one-device mesh where every collective is a no-op, so both run the same
code. Nothing here knows about layouts, hardware or cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import axes as ax


class ShardingError(ValueError):
    """A logical-to-mesh mapping is invalid for a tensor or a model."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Immutable mapping from logical axis names to mesh axes (pope2022.md §8 'rules').

    Logical names absent from `mapping` are replicated. Conversions fail loudly: an unknown
    logical name, two dims of one tensor on one mesh axis, or (`check`) a dim not divisible by
    its shards.
    """

    mapping: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(logical axis, mesh axes major first) pairs; each logical axis at most once."""
    description: str = ""
    """Human-readable name (the layout)."""

    def __post_init__(self):
        seen = set()
        for logical, mesh_axes in self.mapping:
            _check_logical(logical)
            if logical in seen:
                raise ShardingError(f"logical axis {logical!r} is mapped twice")
            seen.add(logical)
            if len(set(mesh_axes)) != len(mesh_axes):
                raise ShardingError(f"logical axis {logical!r} repeats a mesh axis: {mesh_axes}")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Sequence[str] | str | None],
                  description: str = "") -> "ShardingRules":
        """Build from {logical: mesh axes}; a str is one axis, None or () is replicated."""
        items = tuple((k, _as_tuple(v)) for k, v in mapping.items())
        return cls(items, description)

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.mapping)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """Mesh axes of one logical axis (() = replicated)."""
        if logical is None:
            return ()
        _check_logical(logical)
        return self.as_dict().get(logical, ())

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        """`PartitionSpec` for a tensor whose dims are named `logical_axes` (None = replicated)."""
        return PartitionSpec(*(None if not m else m[0] if len(m) == 1 else m
                               for m in self._per_dim(logical_axes)))

    def named(self, mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
        """`NamedSharding(mesh, spec(logical_axes))`."""
        missing = {m for _, axes in self.mapping for m in axes} - set(mesh.axis_names)
        if missing:
            raise ShardingError(f"mesh has axes {mesh.axis_names}, rules need {sorted(missing)}")
        return NamedSharding(mesh, self.spec(logical_axes))

    def check(self, shape: Sequence[int], logical_axes: Sequence[str | None],
              sizes: Mapping[str, int], name: str = "tensor") -> None:
        """Raise `ShardingError` naming the tensor and dim if a dim is not divisible by its
        shards; `sizes` maps mesh axis names to their sizes."""
        if len(shape) != len(logical_axes):
            raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but "
                                f"{len(logical_axes)} logical axes {tuple(logical_axes)}")
        for dim, (size, logical, mesh_axes) in enumerate(
                zip(shape, logical_axes, self._per_dim(logical_axes, name))):
            shards = math.prod(sizes[m] for m in mesh_axes)
            if size % shards:
                raise ShardingError(
                    f"{name}: dim {dim} ({logical}) has size {size}, not divisible by {shards} "
                    f"shards over mesh axes {mesh_axes} of mesh {dict(sizes)}")

    def _per_dim(self, logical_axes: Sequence[str | None], name: str = "tensor"):
        if isinstance(logical_axes, str):
            raise ShardingError(f"{name}: logical axes must be a sequence of names, got the string "
                                f"{logical_axes!r}")
        per_dim = [self.mesh_axes(a) for a in logical_axes]
        owner: dict[str, str | None] = {}
        for logical, mesh_axes in zip(logical_axes, per_dim):
            for m in mesh_axes:
                if m in owner:
                    raise ShardingError(
                        f"{name} {tuple(logical_axes)}: logical axes {owner[m]!r} and {logical!r} "
                        f"both map to mesh axis {m!r}")
                owner[m] = logical
        return per_dim

    def table(self) -> list[tuple[str, str]]:
        """(logical, mesh axes) rows for display."""
        return [(k, "".join(v) or "-") for k, v in self.mapping]


@dataclasses.dataclass(frozen=True)
class LayerCollectives:
    """The mesh axes of every collective point of a decoder layer (pope2022.md §5-§6), per chip.

    Every tuple lists mesh axes of size > 1, major first; an empty tuple means that point moves
    nothing. Einsum letters of the per-chip shapes: b residual rows, e the residual's d_model
    shard, n / k the query / KV heads of a chip.
    """

    gathered: tuple[str, ...] = ()
    """Weight-gathered layouts (§5.3): every weight is all-gathered over these axes before use,
    and the residual's batch is split over them."""
    model_axes: tuple[str, ...] = ()
    """d_ff and heads are split over these inside the layer: the block input is all-gathered
    over them and the block output reduce-scattered back (§5.1 / §5.2 steps 1, 7)."""
    x_axes: tuple[str, ...] = ()
    """2D weight-stationary (§5.2): d_model of the weights stays split over these, so the input
    projections leave partial sums that are reduce-scattered into heads / d_ff and the results
    all-gathered back before the output projections; norm statistics are all-reduced here."""
    attention: str = "heads"
    """'heads' (attention sharded like the query heads) or 'batch' (§6.2b: all-to-all of the
    queries into the batch and of the attention output back)."""
    kv_heads: tuple[str, ...] = ()
    """Axes of the KV cache's heads dim (() = every chip holds all KV heads)."""
    kv_weight_axes: tuple[str, ...] = ()
    """Axes the K/V projections' heads are split over inside the layer."""
    attn_batch: tuple[str, ...] = ()
    """Axes of the batch dim inside attention and of the KV cache."""
    def __post_init__(self):
        if self.attention not in ("heads", "batch"):
            raise ShardingError(f"attention must be 'heads' or 'batch', got {self.attention!r}")

    @property
    def res_embed(self) -> tuple[str, ...]:
        """Axes of the residual stream's d_model dim."""
        return self.x_axes + self.model_axes

    @property
    def q_heads(self) -> tuple[str, ...]:
        """Axes of the query heads inside heads-sharded attention (after the x reduce-scatter)."""
        return self.model_axes + self.x_axes


@dataclasses.dataclass(frozen=True)
class PhaseSharding:
    """Everything the per-chip model needs to know about one phase's partitioning (hashable)."""

    mesh: Mesh
    """The devices, with the axis names the rules use."""
    weights: ShardingRules
    """Stored weights: logical weight axes -> mesh axes (both phases store weights alike)."""
    activations: ShardingRules
    """Residual stream and per-sequence state: ``batch`` and ``act_embed`` -> mesh axes."""
    cache: ShardingRules
    """KV cache: ``batch`` and ``act_kv_heads`` -> mesh axes."""
    layer: LayerCollectives
    """The collectives at each point of a decoder layer."""
    description: str = "single device"
    """Human-readable name (layout / attention on the mesh)."""

    @classmethod
    def single_device(cls, device=None) -> "PhaseSharding":
        """The unsharded model: a 1-device mesh, no rules, every collective a no-op. The device
        defaults to this process's first device: under jax.distributed each process runs its
        own copy of an unpartitioned model (`jax.devices()[0]` is process 0's, which no other
        process can address)."""
        device = jax.local_devices()[0] if device is None else device
        mesh = Mesh(np.array([device]).reshape(1, 1, 1), ("x", "y", "z"))
        return cls(mesh, ShardingRules(), ShardingRules(), ShardingRules(), LayerCollectives())

    @property
    def sizes(self) -> dict[str, int]:
        """Mesh axis name -> size."""
        return dict(self.mesh.shape)

    def size(self, axes: Sequence[str]) -> int:
        return math.prod(self.sizes[a] for a in axes)

    @property
    def batch_multiple(self) -> int:
        """Batch sizes must be a multiple of this (the most ways the phase splits the batch)."""
        return max(self.size(self.layer.gathered), self.size(self.layer.attn_batch))

    def row_spec(self, extra_dims: int = 0) -> PartitionSpec:
        """Per-sequence arrays [B, ...]: rows split like the residual stream's batch."""
        return self.activations.spec((ax.BATCH,) + (None,) * extra_dims)

    def cache_spec(self, extra_dims: int) -> PartitionSpec:
        """KV cache buffers [B, K, S(, H)] (`extra_dims` after the heads dim)."""
        return self.cache.spec((ax.BATCH, ax.ACT_KV_HEADS) + (None,) * extra_dims)


def _as_tuple(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _check_logical(name: str) -> None:
    if name not in ax.ALL_AXES:
        raise ShardingError(f"unknown logical axis {name!r}; known: {', '.join(ax.ALL_AXES)}")
