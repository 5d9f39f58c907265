"""A partitioning plan: which layout, attention sharding and mesh each phase runs under.

The interface between the planner (which chooses, `planner.py`), the cost model (which prices,
`cost_model.py`) and execution (which places weights and cache and runs, `jaxinfer.load(plan=...)`).

Layout names (pope2022.md §3 feed-forward layouts, §4 attention):
  - ``1d-ws``: 1D weight-stationary, d_ff (and heads) sharded over all chips x*y*z.
  - ``2d-ws``: 2D weight-stationary, d_model over x, d_ff/heads over y*z.
  - ``wg-x`` / ``wg-xy`` / ``wg-xyz``: weight-gathered; weights stored in the 2D layout and
    all-gathered over the named axes, the batch sharded over them instead.
Attention sharding: ``heads`` (over the heads' mesh axes) or ``batch`` (multiquery/GQA: the KV cache
and attention sharded over the batch; needs batch divisible by the chips it is sharded over).

Collective byte convention (shared by the cost model and the HLO audit): the bytes one chip sends
for one collective over a group of K chips — all-gather: output bytes per chip x (K-1)/K;
reduce-scatter: input bytes per chip x (K-1)/K; all-reduce: 2 x bytes x (K-1)/K;
all-to-all: bytes per chip x (K-1)/K.
"""

from __future__ import annotations

import dataclasses

from partitioning.mesh import MeshShape

LAYOUTS = ("1d-ws", "2d-ws", "wg-x", "wg-xy", "wg-xyz")
GATHERED_AXES = {"wg-x": ("x",), "wg-xy": ("x", "y"), "wg-xyz": ("x", "y", "z")}
"""Mesh axes a weight-gathered layout all-gathers weights over (and shards the batch over), §5.3."""
ATTENTION = ("heads", "batch")
PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """How one phase (prefill or decode) is partitioned."""

    phase: str
    """'prefill' or 'decode'."""
    layout: str
    """Feed-forward layout, one of `LAYOUTS`."""
    attention: str
    """Attention sharding, one of `ATTENTION`."""
    mesh: MeshShape
    """Mesh axis sizes (x, y, z); their product is the chip count."""

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A prefill and a decode phase plan over the same chips (weights stay put between them)."""

    prefill: PhasePlan
    """Plan for processing the prompt."""
    decode: PhasePlan
    """Plan for generating one token per step."""

    def __post_init__(self):
        if self.prefill.phase != "prefill" or self.decode.phase != "decode":
            raise ValueError("Plan needs a prefill PhasePlan and a decode PhasePlan")
        if self.prefill.mesh != self.decode.mesh:
            raise ValueError(f"prefill mesh {self.prefill.mesh} and decode mesh {self.decode.mesh} "
                             "must match: weights are stored once (pope2022.md §5.3)")

    @classmethod
    def uniform(cls, layout: str, attention: str, mesh: MeshShape) -> Plan:
        """Both phases under one layout and attention on `mesh` (the engine's steps, prefill
        chunks and decodes together, run the decode plan)."""
        return cls(PhasePlan("prefill", layout, attention, mesh),
                   PhasePlan("decode", layout, attention, mesh))
