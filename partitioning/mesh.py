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

    def __post_init__(self):
        for name in AXIS_NAMES:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"mesh axis {name} must be a positive int, got {getattr(self, name)!r}")

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

    def __str__(self) -> str:
        return f"{self.x}x{self.y}x{self.z}"

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


def make_mesh(shape, devices: Sequence | None = None):
    """Build a `jax.sharding.Mesh` with axis names ('x', 'y', 'z') from real devices.

    Single process: `jax.make_mesh` (topology-aware device order on TPU). Multi-process
    (`jax.distributed`, `jax.process_count() > 1`): a hybrid mesh whose process (DCN) dimension is
    put on the first axis that the process count divides, chips within a process on ICI.
    """
    import jax

    shape = MeshShape.of(shape)
    devices = list(devices) if devices is not None else jax.devices()
    if len(devices) != shape.n:
        raise ValueError(f"mesh {shape} needs {shape.n} devices, {len(devices)} available")
    processes = len({d.process_index for d in devices})
    if processes > 1:
        return _hybrid_mesh(shape, devices, processes)
    from jax.sharding import AxisType
    return jax.make_mesh(shape.sizes, AXIS_NAMES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _hybrid_mesh(shape: MeshShape, devices: Sequence, processes: int):
    """ICI mesh inside each process times a DCN mesh across processes."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    sizes = list(shape.sizes)
    for axis, size in enumerate(sizes):
        if size % processes == 0:
            dcn = [1, 1, 1]
            dcn[axis] = processes
            ici = list(sizes)
            ici[axis] = size // processes
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
            return Mesh(grid, AXIS_NAMES)
    raise ValueError(f"mesh {shape}: no axis is divisible by the {processes} processes; "
                     "choose a shape with one axis a multiple of jax.process_count()")
