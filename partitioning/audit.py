"""HLO audit: the collectives XLA actually compiled for a step vs the cost model's prediction.

`parse_collectives` reads `compiled.as_text()` and returns every all-gather, reduce-scatter,
all-reduce and all-to-all (sync or async ``-start`` form) with its per-chip bytes under the
convention of `partitioning.plan` (pope2022.md §4.3, exact (K-1)/K): all-gather output bytes,
reduce-scatter input bytes, all-reduce 2x bytes, all-to-all bytes, each times (K-1)/K for a group
of K chips. A collective inside a `while` body is counted once per iteration: the layer scan's loop
carries its trip count (XLA's ``known_trip_count``, else the bound of the loop condition).

`audit_step` compiles one prefill or decode step of a model under a phase plan (layers as one
`lax.scan`), takes the collectives inside the layer loop, divides by the number of layers and
compares them per kind with `cost_model.layer_collectives` (§13.2 of the reference: HLO = formula).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from jaxinfer import model as model_lib
from jaxinfer import params as params_lib
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from partitioning.cost_model import Collective, Workload, layer_collectives
from partitioning.plan import PhasePlan

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
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
    """'all-gather', 'reduce-scatter', 'all-reduce' or 'all-to-all'."""
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
        """Bytes one chip sends per execution (pope2022.md §4.3, exact (K-1)/K)."""
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * self.payload_bytes * (self.group - 1) / self.group


def _array_bytes(text: str) -> float:
    """Bytes of all arrays in an HLO shape string (a tuple sums its elements)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _payload(kind: str, out_bytes: float, group: int, is_start: bool) -> float:
    """Per-chip convention bytes from the result shape (compiled HLO names operands without
    shapes): all-gather output; reduce-scatter input = K x output; all-reduce and all-to-all
    operand = output. An async all-gather-start returns (operand, output): output = K/(K+1)."""
    if kind == "all-gather":
        return out_bytes * group / (group + 1) if is_start else out_bytes
    if kind == "reduce-scatter":
        return out_bytes * group
    return out_bytes


def _group_size(attrs: str, n_devices: int | None) -> int:
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


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    known = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    body = "\n".join(comps.get(cond.group(1), [])) if cond else ""
    bound = re.findall(r"constant\((\d+)\)", body)
    if "direction=LT" in body and len(bound) == 1:
        return int(bound[0])
    raise AuditError(f"cannot find the trip count of while loop: {line.strip()[:200]}")


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
                    counts[callee] = (runs * times, in_loop or is_body)
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
            found.append(HloCollective(kind, group, payload, times, name, in_loop))
    return found


def bytes_by_kind(collectives: Iterable, loop_only: bool = False) -> dict[str, float]:
    """Per-chip bytes per collective kind, summed over executions (HloCollective) or once each
    (`cost_model.Collective`)."""
    out = {k: 0.0 for k in KINDS}
    for c in collectives:
        if loop_only and not c.in_loop:
            continue
        out[c.kind] += c.bytes_per_chip * getattr(c, "executions", 1)
    return out


def unmodelled_collectives(cfg: ModelConfig, plan: PhasePlan, wl: Workload) -> list[Collective]:
    """Per-layer collectives of `partitioning.collective_layer` that the cost model leaves out:
    the norm statistics all-reduced over x when d_model is split there (2d-ws: the paper's `E_x`
    activations, §5.2; §7.2 on Korthikanti et al.'s choice), and in weight-gathered layouts the
    all-gather of the layer's vector weights (norm scales, biases; §5.3 gathers every weight)."""
    from partitioning.layouts import resolve

    lay = resolve(plan, cfg)
    out: list[Collective] = []
    x = lay.live(lay.x_axes)
    if x:
        norms = 1 if cfg.parallel_block else 2
        stats = 2 if cfg.norm == "layer" else 1
        for _ in range(norms * stats):
            out.append(Collective("all-reduce", x, lay.size(x), wl.batch * wl.tokens, 4.0,
                                  "norm statistics"))
    gathered = set(lay.live(lay.gathered))
    if gathered:
        rules = lay.weight_rules()
        specs = params_lib.param_specs(cfg)["layers"]
        for name, spec in _vector_specs(specs):
            dims = [rules.mesh_axes(a) for a in spec.axes[1:]]
            take = [a for d in dims for a in d if a in gathered]
            if take:
                kept = lay.size(tuple(a for d in dims for a in d if a not in gathered))
                out.append(Collective("all-gather", tuple(take), lay.size(tuple(take)),
                                      math.prod(spec.shape[1:]) / kept, wl.weight_bytes, name))
    return out


def _vector_specs(specs) -> list[tuple[str, Any]]:
    """Layer weights that are not projections (norm scales and biases), with dotted names."""
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda s: isinstance(s, params_lib.ParamSpec))[0]
    return [(jax.tree_util.keystr(path), spec) for path, spec in flat if not spec.contract]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Measured (HLO) vs predicted per-chip bytes of one decoder layer, per collective kind."""

    plan: PhasePlan
    """The audited phase plan."""
    dtype: str
    """Weight and activation dtype of the compiled step."""
    measured: dict[str, float]
    """Bytes per chip per layer in the compiled HLO (collectives inside the layer loop / L)."""
    predicted: dict[str, float]
    """Bytes per chip per layer: `cost_model.layer_collectives` plus `unmodelled`."""
    unmodelled: dict[str, float]
    """Part of `predicted` that the cost model leaves out (`unmodelled_collectives`)."""
    outside_loop: dict[str, float]
    """Bytes per chip outside the layer loop (embedding, logits): reported, not audited."""

    def ratios(self) -> dict[str, float | None]:
        """measured / predicted per kind; 1.0 when both are zero, None when only one is."""
        return {k: 1.0 if self.measured[k] == self.predicted[k] == 0
                else (self.measured[k] / self.predicted[k] if self.predicted[k] else None)
                for k in KINDS}

    def rows(self) -> list[dict[str, Any]]:
        """One row per kind: measured, predicted, unmodelled bytes and the ratio."""
        return [{"kind": k, "measured_bytes": self.measured[k],
                 "predicted_bytes": self.predicted[k], "unmodelled_bytes": self.unmodelled[k],
                 "ratio": r} for k, r in self.ratios().items()]


def audit_step(cfg: ModelConfig, plan: PhasePlan, batch: int, context: int,
               prompt_len: int | None = None, dtype=jnp.float32) -> AuditResult:
    """Compile one step of `plan.phase` for `cfg` (random weights are never materialised: the
    step is lowered from shapes) on `plan.mesh` devices and audit its layer collectives.

    prefill processes `prompt_len` tokens (default `context`); decode one token per sequence with
    a cache of `context` positions. Needs plan.mesh.n devices (CPU: the XLA flag
    --xla_force_host_platform_device_count).
    """
    from partitioning.mesh import make_mesh
    from partitioning.plan import Plan
    from partitioning.sharding import Placement

    if jax.device_count() < plan.mesh.n:
        raise AuditError(f"mesh {plan.mesh} needs {plan.mesh.n} devices, {jax.device_count()} "
                         "available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_"
                         f"count={plan.mesh.n})")
    tokens = (prompt_len or context) if plan.phase == "prefill" else 1
    if tokens > context:
        raise AuditError(f"prompt of {tokens} tokens does not fit a context of {context}")
    twin = {"prefill": "decode", "decode": "prefill"}[plan.phase]
    phases = {plan.phase: plan, twin: dataclasses.replace(plan, phase=twin)}
    placement = Placement(Plan(phases["prefill"], phases["decode"]), cfg,
                          make_mesh(plan.mesh, jax.devices()[:plan.mesh.n]), explicit=True)
    placement.layout(plan.phase).check(cfg, batch)
    rt = placement.runtime(plan.phase, model_lib.Runtime(attention_backend="xla"))
    params = params_lib.abstract_params(cfg, dtype)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, placement.param_shardings(params))
    cache = KVCache.abstract(cfg, batch, context, dtype)
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         cache, placement.cache_shardings(plan.phase, cache))
    if plan.phase == "decode":
        step = functools.partial(model_lib.decode_step, cfg=cfg, rt=rt)
        args = (params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache)
    else:
        step = functools.partial(model_lib.prefill, cfg=cfg, rt=rt)
        args = (params, jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
                jax.ShapeDtypeStruct((batch,), jnp.int32), cache)
    hlo = jax.jit(step).lower(*args).compile().as_text()
    found = parse_collectives(hlo, plan.mesh.n)
    inside = bytes_by_kind(found, loop_only=True)
    everything = bytes_by_kind(found)
    size = jnp.dtype(dtype).itemsize
    wl = Workload(batch=batch, tokens=tokens, context=context, weight_bytes=size,
                  act_bytes=size, kv_bytes=size)
    modelled = bytes_by_kind(layer_collectives(cfg, plan, wl))
    extra = bytes_by_kind(unmodelled_collectives(cfg, plan, wl))
    L = cfg.n_layers
    return AuditResult(plan=plan, dtype=jnp.dtype(dtype).name,
                       measured={k: inside[k] / L for k in KINDS},
                       predicted={k: modelled[k] + extra[k] for k in KINDS}, unmodelled=extra,
                       outside_loop={k: everything[k] - inside[k] for k in KINDS})


def format_audit(result: AuditResult) -> str:
    """A readable table: per kind, bytes per chip per layer measured vs predicted and the ratio."""
    p = result.plan
    lines = [f"HLO audit, {p.phase} {p.layout}/{p.attention} on {p.mesh}, {result.dtype} (bytes "
             "per chip per layer; predicted = cost model + unmodelled)",
             f"{'collective':<15}{'measured':>12}{'predicted':>12}{'unmodelled':>12}{'ratio':>8}"]
    for row in result.rows():
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"{row['kind']:<15}{row['measured_bytes']:>12.0f}"
                     f"{row['predicted_bytes']:>12.0f}{row['unmodelled_bytes']:>12.0f}{ratio:>8}")
    return "\n".join(lines)
