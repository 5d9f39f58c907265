"""`ShardingRules`: logical axis name -> tuple of mesh axes, and conversion to PartitionSpec.

The logical vocabulary is `jaxinfer.axes` (weights: layers, vocab, embed, ...; activations: batch,
seq, act_embed, ...). A layout (pope2022.md §5, §6, §8) is one such mapping. Conversions fail
loudly:
an unknown logical or mesh axis name, two dims of one tensor on the same mesh axis, or (in `check`)
a dimension not divisible by the product of its mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from jaxinfer import axes as ax
from partitioning.mesh import AXIS_NAMES, MeshShape


class ShardingError(ValueError):
    """A logical-to-mesh mapping is invalid for a tensor."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Immutable mapping from logical axis names to mesh axes (pope2022.md §8 'rules').

    Logical names absent from `mapping` are replicated. `attention_rules` optionally holds the
    rules used inside attention (Q/K/V after the projections, the attention output, the KV cache),
    which differ from the projection side when attention is sharded over batch (§6.2b).
    """

    mapping: tuple[tuple[str, tuple[str, ...]], ...]
    """(logical axis, mesh axes major first) pairs; each logical axis at most once."""
    mesh_axis_names: tuple[str, ...] = AXIS_NAMES
    """The mesh axes the rules may name."""
    attention_rules: "ShardingRules | None" = None
    """Rules inside attention and for the KV cache, when they differ from these."""
    description: str = ""
    """Human-readable name (the layout)."""

    def __post_init__(self):
        seen = set()
        for logical, mesh_axes in self.mapping:
            _check_logical(logical)
            if logical in seen:
                raise ShardingError(f"logical axis {logical!r} is mapped twice")
            seen.add(logical)
            for m in mesh_axes:
                if m not in self.mesh_axis_names:
                    raise ShardingError(f"logical axis {logical!r} maps to unknown mesh axis "
                                        f"{m!r}; mesh axes are {self.mesh_axis_names}")
            if len(set(mesh_axes)) != len(mesh_axes):
                raise ShardingError(f"logical axis {logical!r} repeats a mesh axis: {mesh_axes}")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Sequence[str] | str | None],
                  **kwargs) -> "ShardingRules":
        """Build from {logical: mesh axes}; a str is one axis, None or () is replicated."""
        items = tuple((k, _as_tuple(v)) for k, v in mapping.items())
        return cls(items, **kwargs)

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.mapping)

    @property
    def attention(self) -> "ShardingRules":
        """Rules inside attention and for the KV cache (self when they coincide)."""
        return self.attention_rules or self

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """Mesh axes of one logical axis (() = replicated)."""
        if logical is None:
            return ()
        _check_logical(logical)
        return self.as_dict().get(logical, ())

    def spec(self, logical_axes: Sequence[str | None]):
        """`PartitionSpec` for a tensor whose dims are named `logical_axes` (None = replicated)."""
        from jax.sharding import PartitionSpec

        per_dim = self._per_dim(logical_axes)
        return PartitionSpec(*(None if not m else m[0] if len(m) == 1 else m for m in per_dim))

    def named(self, mesh, logical_axes: Sequence[str | None]):
        """`NamedSharding(mesh, spec(logical_axes))`."""
        from jax.sharding import NamedSharding

        missing = set(self.mesh_axis_names) - set(mesh.axis_names)
        if missing:
            raise ShardingError(f"mesh has axes {mesh.axis_names}, rules need {sorted(missing)}")
        return NamedSharding(mesh, self.spec(logical_axes))

    def check(self, shape: Sequence[int], logical_axes: Sequence[str | None], mesh,
              name: str = "tensor") -> None:
        """Raise `ShardingError` naming the tensor and dim if a dim is not divisible by its shards.

        `mesh` is a `jax.sharding.Mesh`, a `MeshShape`, an (x, y, z) tuple or a {axis: size} dict.
        """
        if len(shape) != len(logical_axes):
            raise ShardingError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but "
                                f"{len(logical_axes)} logical axes {tuple(logical_axes)}")
        sizes = MeshShape.of(mesh).as_dict()
        for dim, (size, logical, mesh_axes) in enumerate(
                zip(shape, logical_axes, self._per_dim(logical_axes, name))):
            shards = math.prod(sizes[m] for m in mesh_axes)
            if size % shards:
                raise ShardingError(
                    f"{name}: dim {dim} ({logical}) has size {size}, not divisible by {shards} "
                    f"shards over mesh axes {mesh_axes} of mesh {MeshShape.of(mesh)}")

    def shards(self, logical_axes: Sequence[str | None], mesh) -> tuple[int, ...]:
        """Number of shards of each dim on `mesh`."""
        sizes = MeshShape.of(mesh).as_dict()
        return tuple(math.prod(sizes[m] for m in d) for d in self._per_dim(logical_axes))

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


def _as_tuple(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _check_logical(name: str) -> None:
    if name not in ax.ALL_AXES:
        raise ShardingError(f"unknown logical axis {name!r}; known: {', '.join(ax.ALL_AXES)}")
