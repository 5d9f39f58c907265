"""Choose a partitioning for a phase: enumerate meshes x layouts x attention shardings, drop what is
invalid or does not fit, and rank the rest by the cost model (pope2022.md §4.1, §5.5, §6.4).

`plan_phase` returns the best candidate (minimum step time, or minimum cost per token among those
meeting a latency target) with the runners-up and why each lost. `pareto_frontier` sweeps chip
counts and batch sizes for the latency/cost frontier of the paper's Figure 1.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.config import ModelConfig
from partitioning.cost_model import GATHERED_AXES, StepEstimate, Workload, estimate
from partitioning.hardware import HardwareProfile
from partitioning.mesh import MeshShape, factorizations
from partitioning.plan import ATTENTION, LAYOUTS, PhasePlan


class PlanningError(ValueError):
    """No partitioning can serve the request (nothing fits, nothing is valid)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated (mesh, layout, attention) choice."""

    plan: PhasePlan
    estimate: StepEstimate | None
    """None when the candidate is invalid."""
    rejected: str | None = None
    """Why the candidate cannot run, or why it lost to the winner."""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    best: Candidate
    runners_up: tuple[Candidate, ...]
    """Next-best valid candidates, each with why it lost."""
    rejected: tuple[Candidate, ...]
    """Invalid or non-fitting candidates with the reason."""


def invalid_reason(cfg: ModelConfig, plan: PhasePlan, batch: int) -> str | None:
    """Why `plan` cannot partition this model and batch (divisibility, §5-§6), or None."""
    s, n = plan.mesh.as_dict(), plan.mesh.n
    if plan.layout == "1d-ws":
        if cfg.d_ff % n:
            return f"d_ff {cfg.d_ff} is not divisible by the {n} chips"
    else:
        yz, x = s["y"] * s["z"], s["x"]
        if cfg.d_model % x:
            return f"d_model {cfg.d_model} is not divisible by x={x}"
        if cfg.d_ff % yz:
            return f"d_ff {cfg.d_ff} is not divisible by y*z={yz}"
        if cfg.n_heads % yz:
            return f"{cfg.n_heads} heads are not divisible by y*z={yz}"
    if plan.layout in GATHERED_AXES:
        g = math.prod(s[a] for a in GATHERED_AXES[plan.layout])
        if batch % g:
            return f"batch {batch} is not divisible by the {g} chips the weights are gathered over"
    if plan.attention == "batch":
        if cfg.n_kv_heads == cfg.n_heads:
            return "batch-sharded attention is for multiquery/grouped-query models (§6.1)"
        if batch % n:
            return f"batch-sharded attention needs batch ({batch}) divisible by the {n} chips"
    elif plan.layout == "1d-ws" and cfg.n_heads % n:
        return f"{cfg.n_heads} heads are not divisible by the {n} chips"
    return None


def candidates(cfg: ModelConfig, phase: str, chips: int, hw: HardwareProfile,
               layouts=LAYOUTS, attentions=ATTENTION, meshes=None) -> list[PhasePlan]:
    shapes = meshes or factorizations(chips, hw.max_mesh_axes)
    return [PhasePlan(phase, layout, attention, shape)
            for shape in shapes for layout in layouts for attention in attentions]


def _score(c: Candidate, latency_target_s: float | None):
    e = c.estimate
    if latency_target_s is None:
        return (e.step_time_s, e.cost_chip_s_per_token)
    return (e.step_time_s > latency_target_s, e.cost_chip_s_per_token, e.step_time_s)


def _why_lost(c: Candidate, best: Candidate, latency_target_s: float | None) -> str:
    e, b = c.estimate, best.estimate
    if latency_target_s is not None and e.step_time_s > latency_target_s:
        return f"misses the latency target ({e.step_time_s * 1e3:.3g} ms)"
    if latency_target_s is not None:
        return (f"costs {e.cost_chip_s_per_token / b.cost_chip_s_per_token:.2f}x more per token")
    parts = []
    for name, mine, theirs in (("compute", e.compute_s, b.compute_s),
                               ("memory", e.weight_load_s + e.kv_load_s,
                                b.weight_load_s + b.kv_load_s),
                               ("communication", e.comm_s, b.comm_s)):
        if mine > theirs * 1.001:
            parts.append(f"{name} {mine * 1e3:.3g} vs {theirs * 1e3:.3g} ms")
    slower = e.step_time_s / b.step_time_s
    return f"{slower:.2f}x slower" + (f" ({'; '.join(parts)})" if parts else "")


def plan_phase(cfg: ModelConfig, phase: str, chips: int, wl: Workload, hw: HardwareProfile,
               layouts=LAYOUTS, attentions=ATTENTION, meshes=None,
               latency_target_s: float | None = None, nominal_params: float | None = None,
               keep: int = 5) -> PlanResult:
    """The best plan for one phase, with runners-up and rejected candidates."""
    valid, rejected = [], []
    for plan in candidates(cfg, phase, chips, hw, layouts, attentions, meshes):
        reason = invalid_reason(cfg, plan, wl.batch)
        if reason:
            rejected.append(Candidate(plan, None, reason))
            continue
        est = estimate(cfg, plan, wl, hw, nominal_params)
        if not est.fits:
            rejected.append(Candidate(plan, est, f"does not fit: needs "
                                      f"{est.memory_per_chip_bytes / 2**30:.1f} GiB per chip, "
                                      f"{hw.name} has {hw.hbm_bytes / 2**30:.1f} GiB"))
            continue
        valid.append(Candidate(plan, est))
    if not valid:
        reasons = sorted({c.rejected for c in rejected})
        raise PlanningError(f"no partitioning of {cfg.name} on {chips} x {hw.name} can run "
                            f"batch {wl.batch}: " + "; ".join(reasons[:4]))
    valid.sort(key=lambda c: _score(c, latency_target_s))
    best = valid[0]
    runners = tuple(dataclasses.replace(c, rejected=_why_lost(c, best, latency_target_s))
                    for c in valid[1:keep + 1])
    return PlanResult(best, runners, tuple(rejected))


@dataclasses.dataclass(frozen=True)
class ParetoPoint:
    chips: int
    batch: int
    plan: PhasePlan
    latency_s: float
    """Step time (decode: per token)."""
    cost_chip_s_per_token: float
    mfu: float


def pareto_frontier(cfg: ModelConfig, phase: str, chip_counts, batches, hw: HardwareProfile,
                    tokens: int, context: int, weight_bytes: float = 2.0,
                    nominal_params: float | None = None) -> tuple[list[ParetoPoint],
                                                                  list[ParetoPoint]]:
    """(all best-per-(chips, batch) points, the non-dominated ones) — paper Figure 1."""
    points = []
    for chips in chip_counts:
        for batch in batches:
            wl = Workload(batch=batch, tokens=tokens, context=context, weight_bytes=weight_bytes)
            try:
                best = plan_phase(cfg, phase, chips, wl, hw, nominal_params=nominal_params).best
            except PlanningError:
                continue
            e = best.estimate
            points.append(ParetoPoint(chips, batch, best.plan, e.step_time_s,
                                      e.cost_chip_s_per_token, e.mfu))
    frontier = [p for p in points
                if not any(q.latency_s <= p.latency_s and q.cost_chip_s_per_token
                           <= p.cost_chip_s_per_token and q is not p
                           and (q.latency_s, q.cost_chip_s_per_token)
                           != (p.latency_s, p.cost_chip_s_per_token) for q in points)]
    frontier.sort(key=lambda p: p.latency_s)
    return points, frontier
