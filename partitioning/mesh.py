"""Mesh shapes (x, y, z) and `jax.sharding.Mesh` construction, single- or multi-process.

pope2022.md §1: the TPU v4 3D torus has X x Y x Z = n chips with physical axes x, y, z. A GPU NVLink
domain is a switch, so any factorization is logical; `gpu_mesh_shape` gives the plain 1-axis mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

AXIS_NAMES = ("x", "y", "z")

# pope2022.md §8: the official code's make_mesh table (chips -> (x, y, z)).
PAPER_MESHES = {1: (1, 1, 1), 4: (2, 1, 2), 8: (2, 2, 2), 16: (2, 4, 2), 32: (4, 2, 4),
                64: (4, 4, 4), 128: (8, 4, 4), 256: (4, 8, 8), 512: (8, 8, 8)}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the three mesh axes; an axis of size 1 is present but unused."""

    x: int = 1
    y: int = 1
    z: int = 1
    dcn: tuple[int, int, int] = (1, 1, 1)
    """Granules (hosts, or TPU slices) along x, y, z, joined by the data-center network (DCN):
    axis a spans dcn[a] granules of size[a] // dcn[a] chips on the fast interconnect (ICI or
    NVLink). (1, 1, 1): the whole mesh on the fast interconnect."""

    def __post_init__(self):
        for name in AXIS_NAMES:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"mesh axis {name} must be a positive int, got {getattr(self, name)!r}")
        dcn = tuple(self.dcn)
        if len(dcn) != 3 or any(not isinstance(d, int) or d < 1 for d in dcn):
            raise ValueError(f"dcn must be three positive ints (x, y, z), got {self.dcn!r}")
        for name, size, d in zip(AXIS_NAMES, self.sizes, dcn):
            if size % d:
                raise ValueError(f"mesh axis {name} of size {size} cannot span {d} DCN granules")
        object.__setattr__(self, "dcn", dcn)

    @property
    def n(self) -> int:
        """Number of chips."""
        return self.x * self.y * self.z

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.x, self.y, self.z)

    def size(self, axes: Sequence[str]) -> int:
        """Product of the sizes of `axes` (1 for no axes)."""
        return math.prod(self.as_dict()[a] for a in axes)

    def as_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "z": self.z}

    @property
    def granules(self) -> int:
        """Hosts or slices the mesh spans (1: one fast-interconnect domain)."""
        return math.prod(self.dcn)

    def dcn_axes(self) -> tuple[str, ...]:
        """The axes whose collectives cross the data-center network."""
        return tuple(a for a, d in zip(AXIS_NAMES, self.dcn) if d > 1)

    def ici_sizes(self) -> tuple[int, int, int]:
        """Per-granule extent of each axis (the fast-interconnect part)."""
        return tuple(s // d for s, d in zip(self.sizes, self.dcn))

    def __str__(self) -> str:
        base = f"{self.x}x{self.y}x{self.z}"
        return base if self.granules == 1 else base + " (dcn {}x{}x{})".format(*self.dcn)

    @classmethod
    def of(cls, value) -> "MeshShape":
        """Accept a MeshShape, an (x, y, z) tuple, a {name: size} dict or a `jax.sharding.Mesh`."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**{k: int(v) for k, v in value.items()})
        if hasattr(value, "shape") and hasattr(value, "axis_names"):  # jax Mesh
            return cls(**{k: int(v) for k, v in dict(value.shape).items()})
        sizes = tuple(int(v) for v in value)
        return cls(*sizes)


def factorizations(n: int, max_axes: int = 3) -> list[MeshShape]:
    """All (x, y, z) with x*y*z == n; with max_axes < 3 the trailing axes stay 1 (2D torus, 1-axis)."""
    if n < 1:
        raise ValueError(f"number of chips must be positive, got {n}")
    shapes = []
    for x in _divisors(n):
        for y in _divisors(n // x):
            z = n // (x * y)
            if max_axes < 3 and z != 1 or max_axes < 2 and y != 1:
                continue
            shapes.append(MeshShape(x, y, z))
    return shapes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def paper_mesh_shape(n: int) -> MeshShape:
    """The official code's mesh for n chips (pope2022.md §8), else the most cubic factorization."""
    if n in PAPER_MESHES:
        return MeshShape(*PAPER_MESHES[n])
    return min(factorizations(n), key=lambda s: (max(s.sizes) / min(s.sizes), -s.z))


def gpu_mesh_shape(n: int) -> MeshShape:
    """One NVLink axis: all n GPUs on x."""
    return MeshShape(n, 1, 1)


def granules_of(devices: Sequence) -> tuple[int, bool]:
    """(number of DCN granules, whether they are processes) of `devices`: TPU slices when the
    devices carry a slice index (hosts of one slice share the ICI torus), else processes."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if devices[0].platform == "tpu" and None not in slices:
        return len(slices), False
    return len({d.process_index for d in devices}), True


def dcn_placements(shape: MeshShape, granules: int) -> list[MeshShape]:
    """`shape` with its `granules` put on one axis, for every axis they divide (the planner
    prices each: the DCN axis should carry the cheapest collectives)."""
    if granules == 1:
        return [dataclasses.replace(shape, dcn=(1, 1, 1))]
    out = []
    for i, size in enumerate(shape.sizes):
        if size % granules == 0:
            dcn = [1, 1, 1]
            dcn[i] = granules
            out.append(dataclasses.replace(shape, dcn=tuple(dcn)))
    return out


def make_mesh(shape, devices: Sequence | None = None):
    """Build a `jax.sharding.Mesh` with axis names ('x', 'y', 'z') from real devices.

    One granule (a single process, or the hosts of one TPU slice): `jax.make_mesh`
    (topology-aware device order on TPU). Several granules (`jax.distributed` processes on
    GPU/CPU, TPU slices): a hybrid mesh, granules along the shape's DCN axis (`MeshShape.dcn`;
    if unset, the first axis the granule count divides), chips of one granule on the fast links.
    """
    import jax

    shape = MeshShape.of(shape)
    devices = list(devices) if devices is not None else jax.devices()
    if len(devices) != shape.n:
        raise ValueError(f"mesh {shape} needs {shape.n} devices, {len(devices)} available")
    granules, by_process = granules_of(devices)
    if granules > 1:
        return _hybrid_mesh(shape, devices, granules, by_process)
    from jax.sharding import AxisType
    return jax.make_mesh(shape.sizes, AXIS_NAMES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _hybrid_mesh(shape: MeshShape, devices: Sequence, granules: int, by_process: bool):
    """Fast-interconnect mesh inside each granule times a DCN mesh across granules."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    if shape.granules == 1:
        placements = dcn_placements(shape, granules)
        if not placements:
            raise ValueError(f"mesh {shape}: no axis is divisible by the {granules} hosts/slices; "
                             "choose a shape with one axis a multiple of them")
        shape = placements[0]
    elif shape.granules != granules:
        raise ValueError(f"mesh {shape} spans {shape.granules} DCN granules but the devices "
                         f"belong to {granules} {'processes' if by_process else 'slices'}")
    grid = mesh_utils.create_hybrid_device_mesh(shape.ici_sizes(), shape.dcn, devices,
                                                process_is_granule=by_process)
    return Mesh(grid, AXIS_NAMES)
