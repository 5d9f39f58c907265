"""Choose a partitioning for a phase: enumerate meshes x layouts x attention shardings, drop what is
invalid or does not fit, and rank the rest by expected time (pope2022.md §4.1, §5.5, §6.4).

The expected time is the roofline of `partitioning.cost_model` corrected by the hardware's fitted
efficiencies and overlap model (`partitioning.efficiency`); each candidate carries both.
`plan_phase` returns the best candidate (minimum expected step time, or minimum expected cost per
token among those meeting a latency target) with the runners-up and why each lost.
`pareto_frontier` sweeps chip counts and batch sizes for the latency/cost frontier of the paper's
Figure 1.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.config import ModelConfig
from partitioning.cost_model import StepEstimate, Workload
from partitioning.efficiency import ExpectedStep, expected_time
from partitioning.hardware import HardwareProfile
from partitioning.layouts import ShardingError, resolve
from partitioning.mesh import dcn_placements, factorizations
from partitioning.plan import ATTENTION, GATHERED_AXES, LAYOUTS, PhasePlan, Plan


class PlanningError(ValueError):
    """No partitioning can serve the request (nothing fits, nothing is valid)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated (mesh, layout, attention) choice."""

    plan: PhasePlan
    estimate: StepEstimate | None
    """The roofline estimate; None when the candidate is invalid."""
    rejected: str | None = None
    """Why the candidate cannot run, or why it lost to the winner."""
    expected: ExpectedStep | None = None
    """The expected time (what candidates are ranked by); None when invalid or not fitting."""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """The planner's answer for one phase."""

    best: Candidate
    """The winner (minimum expected step time, or cost under a latency target)."""
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
    try:  # what execution itself checks (KV-head placement, query-head groups)
        resolve(plan, cfg)
    except ShardingError as err:
        return str(err)
    return None


def default_granules(chips: int, hw: HardwareProfile) -> int:
    """Hosts / slices a plan for `chips` spans when not told: GPU nodes beyond one NVLink domain
    (`HardwareProfile.domain_size`), else one."""
    if hw.domain_size is None or chips <= hw.domain_size:
        return 1
    return -(-chips // hw.domain_size)


def candidates(cfg: ModelConfig, phase: str, chips: int, hw: HardwareProfile,
               layouts=LAYOUTS, attentions=ATTENTION, meshes=None,
               granules: int = 1) -> list[PhasePlan]:
    """Every (mesh, DCN placement, layout, attention) to price: with several granules, each mesh
    once per axis the granules can lie along (`partitioning.mesh.dcn_placements`)."""
    if granules < 1 or chips % granules:
        raise PlanningError(f"{chips} chips cannot be split evenly over {granules} hosts/slices")
    shapes = [placed for shape in (meshes or factorizations(chips, hw.max_mesh_axes))
              for placed in (dcn_placements(shape, granules) if shape.granules == 1 else [shape])]
    return [PhasePlan(phase, layout, attention, shape)
            for shape in shapes for layout in layouts for attention in attentions]


def _score(c: Candidate, latency_target_s: float | None):
    """Sort key: expected time (or target met, then cost). On an exact tie batch-sharded
    attention goes first: heads sharded over no chips (weight-gathered over all of them) is the
    same computation, which the paper names 'Batch' (Table 2)."""
    e, heads = c.expected, c.plan.attention == "heads"
    if latency_target_s is None:
        return (e.step_s, e.cost_chip_s_per_token, heads)
    return (e.step_s > latency_target_s, e.cost_chip_s_per_token, e.step_s, heads)


def _parts(e: ExpectedStep) -> tuple[tuple[str, float], ...]:
    """The expected time's terms a runner-up is compared on."""
    return (("compute", e.matmul_s), ("memory", e.weight_load_s + e.kv_load_s),
            ("communication", e.weight_gather_s + e.comm_hidden_s + e.comm_exposed_s
             + e.latency_s), ("overhead", e.overhead_s))


def _why_lost(c: Candidate, best: Candidate, latency_target_s: float | None) -> str:
    e, b = c.expected, best.expected
    if latency_target_s is not None and e.step_s > latency_target_s:
        return f"misses the latency target (expected {e.step_s * 1e3:.3g} ms)"
    if latency_target_s is not None:
        return (f"costs {e.cost_chip_s_per_token / b.cost_chip_s_per_token:.2f}x more per token")
    parts = [f"{name} {mine * 1e3:.3g} vs {theirs * 1e3:.3g} ms"
             for (name, mine), (_, theirs) in zip(_parts(e), _parts(b)) if mine > theirs * 1.001]
    slower = e.step_s / b.step_s
    return f"{slower:.2f}x slower" + (f" ({'; '.join(parts)})" if parts else "")


def plan_phase(cfg: ModelConfig, phase: str, chips: int, wl: Workload, hw: HardwareProfile,
               layouts=LAYOUTS, attentions=ATTENTION, meshes=None,
               latency_target_s: float | None = None, nominal_params: float | None = None,
               keep: int = 5, granules: int | None = None) -> PlanResult:
    """The best plan for one phase, with runners-up and rejected candidates.

    granules: hosts or TPU slices the chips are spread over, joined by the data-center network
    (default: `default_granules`); collectives crossing them are priced at ``hw.dcn_bw``."""
    granules = default_granules(chips, hw) if granules is None else granules
    if granules > 1 and hw.dcn_bw is None:
        raise PlanningError(f"hardware {hw.name} has no DCN bandwidth: cannot plan across "
                            f"{granules} hosts/slices (for 'cpu', re-run `jaxinfer calibrate`)")
    valid, rejected = [], []
    for plan in candidates(cfg, phase, chips, hw, layouts, attentions, meshes, granules):
        reason = invalid_reason(cfg, plan, wl.batch)
        if reason:
            rejected.append(Candidate(plan, None, reason))
            continue
        exp = expected_time(cfg, plan, wl, hw, nominal_params)
        est = exp.roofline
        if not est.fits:
            rejected.append(Candidate(plan, est, f"does not fit: needs "
                                      f"{est.memory_per_chip_bytes / 2**30:.1f} GiB per chip, "
                                      f"{hw.name} has {hw.hbm_bytes / 2**30:.1f} GiB"))
            continue
        valid.append(Candidate(plan, est, expected=exp))
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
    """The best plan for one (chips, batch)."""

    chips: int
    """Chips of the mesh."""
    batch: int
    """Sequences per step."""
    plan: PhasePlan
    """The planner's choice."""
    latency_s: float
    """Expected step time (decode: per token)."""
    cost_chip_s_per_token: float
    """Chips x expected step time / tokens."""
    mfu: float
    """MFU at the expected time."""
    roofline_latency_s: float = 0.0
    """The roofline's step time of the same plan."""


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
            e = best.expected
            points.append(ParetoPoint(chips, batch, best.plan, e.step_s,
                                      e.cost_chip_s_per_token, e.mfu, e.roofline_s))
    frontier = [p for p in points
                if not any(q.latency_s <= p.latency_s and q.cost_chip_s_per_token
                           <= p.cost_chip_s_per_token and q is not p
                           and (q.latency_s, q.cost_chip_s_per_token)
                           != (p.latency_s, p.cost_chip_s_per_token) for q in points)]
    frontier.sort(key=lambda p: p.latency_s)
    return points, frontier


def plan_generation(cfg: ModelConfig, chips: int, batch: int, prompt_len: int, new_tokens: int,
                    hw: HardwareProfile, weight_bytes: float = 2.0, act_bytes: float = 2.0,
                    granules: int | None = None) -> Plan:
    """The executable `Plan` minimising expected prefill time + new_tokens x decode step time.

    Both phases share one mesh and one weight storage (pope2022.md §5.3: 1d-ws pairs only with
    itself), so each mesh (with each DCN placement of the granules) is priced with its best
    compatible prefill and decode; plans whose dims do not divide over the mesh (vocabulary,
    heads, batch: `partitioning.layouts`) are skipped. When none remains, the batch is priced
    padded to a multiple of the chips (as `jaxinfer.generate` pads it).
    """
    granules = default_granules(chips, hw) if granules is None else granules
    context = prompt_len + new_tokens
    work = {"prefill": Workload(batch, prompt_len, prompt_len, weight_bytes, act_bytes),
            "decode": Workload(batch, 1, context, weight_bytes, act_bytes)}
    best: dict[tuple, dict[str, tuple[float, PhasePlan]]] = {}
    for phase in ("prefill", "decode"):
        for plan in candidates(cfg, phase, chips, hw, granules=granules):
            if invalid_reason(cfg, plan, batch):
                continue
            try:
                resolve(plan, cfg).check(cfg, batch)
            except ShardingError:
                continue
            exp = expected_time(cfg, plan, work[phase], hw)
            if not exp.roofline.fits:
                continue
            key = (plan.mesh, plan.layout == "1d-ws")
            seconds = exp.step_s * (new_tokens if phase == "decode" else 1)
            if phase not in best.setdefault(key, {}) or seconds < best[key][phase][0]:
                best[key][phase] = (seconds, plan)
    pairs = [(p["prefill"][0] + p["decode"][0], p["prefill"][1], p["decode"][1])
             for p in best.values() if len(p) == 2]
    padded = -(-batch // chips) * chips
    if not pairs and padded != batch:  # generation pads the batch to split it: price that
        return plan_generation(cfg, chips, padded, prompt_len, new_tokens, hw, weight_bytes,
                               act_bytes, granules)
    if not pairs:
        raise PlanningError(f"no executable partitioning of {cfg.name} on {chips} x {hw.name} "
                            f"({granules} hosts/slices) for batch {batch}")
    _, prefill, decode = min(pairs, key=lambda t: t[0])
    return Plan(prefill, decode)
