"""HLO audit: the collectives a compiled step sends vs what the cost model priced.

`parse_collectives` reads `compiled.as_text()` and returns every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute (sync or async ``-start`` form) with its per-chip
bytes under the convention of `partitioning.plan` (pope2022.md App. A.1, exact (K-1)/K):
all-gather output bytes, reduce-scatter input bytes, all-reduce 2x bytes, all-to-all bytes, each
times (K-1)/K for a group of K chips; a collective-permute its bytes. A collective inside a
`while` body is counted once per iteration (XLA's ``known_trip_count``, else the bound of the
loop condition).

`audit_hlo` compares the whole step's bytes per kind with `cost_model.step_collectives`: the
HLO comes from `jaxinfer.Model.compiled_hlo` (or `jaxinfer.api.compiled_hlo` for a model that is
never materialized) — exactly the program `generate` runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

from jaxinfer.config import ModelConfig
from partitioning.cost_model import Workload, step_collectives
from partitioning.plan import PhasePlan

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


class AuditError(ValueError):
    """The HLO could not be read as expected (unknown replica groups, loop without trip count)."""


@dataclasses.dataclass(frozen=True)
class HloCollective:
    """One collective instruction of the compiled program."""

    kind: str
    """One of `KINDS`."""
    group: int
    """K: chips per replica group."""
    payload_bytes: float
    """Per-chip bytes the convention is based on (AG: output; RS: input; AR, A2A: operand)."""
    executions: int
    """Times it runs per program execution (product of enclosing while-loop trip counts)."""
    computation: str
    """Name of the HLO computation holding it."""
    in_loop: bool = False
    """Inside a while-loop body (the layer scan), at any depth."""

    @property
    def bytes_per_chip(self) -> float:
        """Bytes one chip sends per execution (pope2022.md §4.3, exact (K-1)/K; a
        collective-permute sends its whole operand)."""
        if self.kind == "collective-permute":
            return self.payload_bytes
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * self.payload_bytes * (self.group - 1) / self.group


def _array_bytes(text: str) -> float:
    """Bytes of all arrays in an HLO shape string (a tuple sums its elements)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _payload(kind: str, out_bytes: float, group: int, is_start: bool) -> float:
    if kind == "collective-permute":  # an async -start returns (operand, output, ...)
        return out_bytes / 2 if is_start else out_bytes
    """Per-chip convention bytes from the result shape (compiled HLO names operands without
    shapes): all-gather output; reduce-scatter input = K x output; all-reduce and all-to-all
    operand = output. An async all-gather-start returns (operand, output): output = K/(K+1)."""
    if kind == "all-gather":
        return out_bytes * group / (group + 1) if is_start else out_bytes
    if kind == "reduce-scatter":
        return out_bytes * group
    return out_bytes


def _group_size(attrs: str, n_devices: int | None) -> int:
    if "source_target_pairs=" in attrs:  # collective-permute: bytes are counted as they are
        return 2
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if mesh:  # mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if explicit:
        return len([t for t in explicit.group(1).strip("{}").split(",") if t.strip()])
    if re.search(r"replica_groups=\{\}", attrs) and n_devices:
        return n_devices
    raise AuditError(f"cannot read the replica groups of: {attrs[:200]}")


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = _COMP_HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise AuditError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    known = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    body = "\n".join(comps.get(cond.group(1), [])) if cond else ""
    bound = re.findall(r"constant\((\d+)\)", body)
    if "direction=LT" in body and len(bound) == 1:
        return int(bound[0])
    return None  # unknown: an error only if a collective runs inside (`parse_collectives`)


def _executions(comps: dict[str, list[str]], entry: str) -> dict[str, tuple[int, bool]]:
    """(runs per execution of the entry computation, inside a while body) per computation."""
    counts = {entry: (1, False)}
    stack = [entry]
    while stack:
        name = stack.pop()
        runs, in_loop = counts[name]
        for line in comps[name]:
            for callee, times, is_body in _callees(line, comps):
                if callee in comps and callee not in counts:
                    total = None if runs is None or times is None else runs * times
                    counts[callee] = (total, in_loop or is_body)
                    stack.append(callee)
    return counts


def _callees(line: str, comps) -> Iterable[tuple[str, int, bool]]:
    if re.search(r"\swhile\(", line):
        body = re.search(r"body=%?([\w.\-]+)", line)
        if body:
            yield body.group(1), _trip_count(line, comps), True
        return
    for key in ("calls", "true_computation", "false_computation"):
        for m in re.finditer(key + r"=%?([\w.\-]+)", line):
            yield m.group(1), 1, False
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
        for name in branches.group(1).split(","):
            yield name.strip().lstrip("%"), 1, False


def parse_collectives(hlo: str, n_devices: int | None = None) -> list[HloCollective]:
    """Every collective of a compiled HLO module (`compiled.as_text()`), with execution counts."""
    comps, entry = _split_computations(hlo)
    runs = _executions(comps, entry)
    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            shape, op, rest = m.groups()
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in KINDS:
                continue
            group = _group_size(rest, n_devices)
            payload = _payload(kind, _array_bytes(shape), group, op.endswith("-start"))
            times, in_loop = runs.get(name, (1, False))
            if times is None:
                raise AuditError(f"cannot find the trip count of the while loop around "
                                 f"{kind} in computation {name}")
            found.append(HloCollective(kind, group, payload, times, name, in_loop))
    return found


def bytes_by_kind(collectives: Iterable[HloCollective]) -> dict[str, float]:
    """Per-chip bytes per collective kind, summed over executions."""
    out = {k: 0.0 for k in KINDS}
    for c in collectives:
        out[c.kind] += c.bytes_per_chip * c.executions
    return out


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Measured (HLO) vs priced per-chip bytes of one whole step, per collective kind."""

    plan: PhasePlan
    """The audited phase plan."""
    measured: dict[str, float]
    """Bytes per chip per step in the compiled HLO."""
    predicted: dict[str, float]
    """Bytes per chip per step priced by `cost_model.step_collectives`."""

    def ratios(self) -> dict[str, float | None]:
        """measured / predicted per kind; 1.0 when both are zero, None when only one is."""
        return {k: 1.0 if self.measured[k] == self.predicted[k] == 0
                else (self.measured[k] / self.predicted[k] if self.predicted[k] else None)
                for k in KINDS}

    def rows(self) -> list[dict[str, Any]]:
        """One row per kind: measured and predicted bytes and their ratio."""
        return [{"kind": k, "measured_bytes": self.measured[k],
                 "predicted_bytes": self.predicted[k], "ratio": r}
                for k, r in self.ratios().items()]


def priced_bytes(cfg: ModelConfig, plan: PhasePlan, wl: Workload,
                 exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Per-chip bytes of the whole step per kind, as the cost model prices them, leaving out
    the collectives of the `exclude`d parts (`cost_model.Collective.part`)."""
    out = {k: 0.0 for k in KINDS}
    for c in step_collectives(cfg, plan, wl):
        if c.part not in exclude:
            out[c.kind] += c.count * c.bytes_per_chip
    return out


def audit_hlo(hlo: str, cfg: ModelConfig, plan: PhasePlan, wl: Workload,
              exclude: tuple[str, ...] = ()) -> AuditResult:
    """Compare the collectives of a compiled step (`compiled.as_text()`) with the price of the
    same step: `wl` must describe the compiled shapes (batch, tokens, dtypes). `exclude`: priced
    parts the compiled program does not hold (the engine's single step has no decode-loop
    condition: exclude=("loop",))."""
    return AuditResult(plan=plan, measured=bytes_by_kind(parse_collectives(hlo, plan.mesh.n)),
                       predicted=priced_bytes(cfg, plan, wl, exclude))


def format_audit(result: AuditResult) -> str:
    """A readable table: per kind, bytes per chip per step measured vs priced and the ratio."""
    p = result.plan
    lines = [f"HLO audit, {p.phase} {p.layout}/{p.attention} on {p.mesh} (bytes per chip per "
             "step)", f"{'collective':<20}{'measured':>12}{'priced':>12}{'ratio':>8}"]
    for row in result.rows():
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"{row['kind']:<20}{row['measured_bytes']:>12.0f}"
                     f"{row['predicted_bytes']:>12.0f}{ratio:>8}")
    return "\n".join(lines)
