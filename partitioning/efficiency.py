"""Expected step time: the roofline of `partitioning.cost_model` corrected by measured efficiencies.

The roofline (pope2022.md §4.1) prices a step at peak FLOP/s, full HBM and link bandwidth, and
adds communication to ``max(compute, memory)``. Real steps run slower at small batch and hide some
communication at large batch (§4.1: "Use the formulas for layout choice and scaling trends, not as
absolute latency predictions"). This module keeps the roofline's counts (FLOPs, bytes, every
collective of the step) and changes only how fast each runs and what overlaps, with the
parameters of `partitioning.hardware.EfficiencyParams` (fitted per profile by
``scripts/fit_cost_model.py`` on the paper's measurements):

- matmuls at ``peak x matmul_peak_fraction x M / (M + matmul_half_tokens)`` (or, where it was
  measured, the interpolated ``matmul_curve``), M the tokens per chip
  of the step's matmuls (B*L in weight-stationary layouts, B*L/G when the batch is split over the
  G chips weights are gathered over, §5.3); at M = 1 ``peak x matvec_fraction`` where the
  backend has a separate matrix-vector kernel (XLA:CPU);
- weight reads at ``hbm_bw x hbm_fraction``, KV-cache reads at ``hbm_bw x kv_fraction`` where
  measured (XLA:CPU's decode attention), else at ``hbm_bw x hbm_fraction``;
- each collective as ``collective_latency_s + hops x hop_latency_s + bytes / (link_fraction x
  link bandwidth)``, hops the ring steps over its mesh axes; on a torus the link bandwidth is the
  chip's interconnect, halved when an axis of the collective has no wrap-around (§2.2,
  `link_bandwidth`); the cross-host/slice leg of a collective runs over DCN at ``dcn_bw`` (§2.2);
- attention's QK^T, softmax and AV at ``peak x attention_fraction`` where the backend runs them
  unfused (XLA:CPU), else on the matmul curve;
- per residual sub-block and per step fixed costs.

Overlap model (which terms run concurrently, which add):

  concurrent = max(matmul, weight load, weight gathers + comm_overlap x activation payload)
  step       = concurrent + (1 - comm_overlap) x activation payload + resharding payload
               + every collective's latency + KV-cache load + fixed costs

- Matmuls consume weights as HBM streams them (§4.1), so the two overlap.
- Weight all-gathers of weight-gathered layouts depend on no activation: they are prefetched a
  layer ahead and run under the matmuls (§5.3, §7.2).
- Activation all-gathers / reduce-scatters sit next to a matmul; Looped CollectiveEinsum hides
  "partially or fully" a fraction of their payload time (§7.2).
- The all-to-alls of batch-sharded attention (§6.2) surround the attention, which has no matmul
  to loop with: they add, as do the KV-cache reads of attention and every collective's latency.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.config import ModelConfig
from partitioning.cost_model import (Collective, StepEstimate, Workload,
                                     attention_flops_per_chip, estimate)
from partitioning.hardware import EfficiencyParams, HardwareProfile
from partitioning.plan import GATHERED_AXES, PhasePlan

ROLES = ("weights", "activations", "resharding")


@dataclasses.dataclass(frozen=True)
class CollectiveTerm:
    """One collective of the step with its payload time at the full link bandwidth."""

    collective: Collective
    """The collective as the cost model lists it (with `Collective.count` executions per step)."""
    role: str
    """'weights' (a weight all-gather), 'activations' (all-gather / reduce-scatter / all-reduce
    of activations next to a matmul) or 'resharding' (all-to-all around attention)."""
    link_s: float
    """Payload seconds of all executions over the fast links (ICI / NVLink) at full bandwidth."""
    dcn_s: float
    """Payload seconds of all executions' cross-granule leg at ``dcn_bw`` (0 within one)."""
    hops: int
    """Ring steps of one execution (torus: the sum over its axes of size - 1; switch: K - 1)."""


@dataclasses.dataclass(frozen=True)
class StepTerms:
    """What a step does, independent of the efficiency parameters (the fit reuses it)."""

    roofline: StepEstimate
    """The cost model's estimate of the step."""
    matmul_tokens: float
    """M: rows per chip of the step's matmuls."""
    blocks: int
    """Residual sub-blocks per layer (1 parallel, 2 serial, §7.1)."""
    n_layers: int
    """Decoder layers."""
    collectives: tuple[CollectiveTerm, ...]
    """Every collective of the step."""
    flops_per_token: float
    """2 x nominal parameters (the MFU numerator per token, §4.2)."""
    tokens: int
    """Tokens processed by the step (B x L)."""
    chips: int
    """Chips of the mesh."""
    peak_flops: float
    """Peak FLOP/s per chip (the MFU denominator)."""
    attention_s: float = 0.0
    """The part of the roofline's compute that is attention's QK^T and AV, seconds at peak."""


@dataclasses.dataclass(frozen=True)
class ExpectedStep:
    """Expected time of one step (prefill: the whole prompt; decode: one token), with its parts."""

    step_s: float
    """Expected step time."""
    roofline_s: float
    """The roofline's step time (`StepEstimate.step_time_s`) for comparison."""
    matmul_s: float
    """Compute at the achievable matmul throughput."""
    matmul_efficiency: float
    """Fraction of peak FLOP/s the step's matmuls reach."""
    weight_load_s: float
    """Weight reads at the achievable HBM bandwidth."""
    kv_load_s: float
    """KV-cache reads at the achievable HBM bandwidth (added)."""
    weight_gather_s: float
    """Payload of weight all-gathers (concurrent with the matmuls)."""
    comm_hidden_s: float
    """Activation-collective payload that runs under the matmuls."""
    comm_exposed_s: float
    """Collective payload that adds: the rest of the activation payload and the all-to-alls."""
    latency_s: float
    """Latency of every collective execution (launch + hops), added."""
    overhead_s: float
    """Fixed per-block and per-step costs, added."""
    concurrent_s: float
    """max(matmul, weight load, weight gathers + hidden payload)."""
    bound: str
    """The largest term: 'compute', 'memory', 'communication' or 'overhead'."""
    mfu: float
    """Model FLOPs utilisation at the expected time (§4.2)."""
    cost_chip_s_per_token: float
    """Chips x expected step time / tokens of the step."""
    roofline: StepEstimate
    """The cost model's estimate the expectation builds on."""

    def breakdown(self) -> dict[str, float]:
        """The additive and concurrent parts, seconds."""
        return {"matmul_s": self.matmul_s, "weight_load_s": self.weight_load_s,
                "weight_gather_s": self.weight_gather_s, "comm_hidden_s": self.comm_hidden_s,
                "concurrent_s": self.concurrent_s, "kv_load_s": self.kv_load_s,
                "comm_exposed_s": self.comm_exposed_s, "latency_s": self.latency_s,
                "overhead_s": self.overhead_s}


def matmul_efficiency(tokens_per_chip: float, params: EfficiencyParams) -> float:
    """Fraction of peak a matmul with `tokens_per_chip` rows reaches: a saturating curve,
    increasing in M and never above ``matmul_peak_fraction`` <= 1; at M = 1 the backend's
    matrix-vector kernel's ``matvec_fraction`` instead, where it has one (> 0)."""
    if not tokens_per_chip > 0:
        raise ValueError(f"tokens_per_chip must be positive, got {tokens_per_chip!r}")
    M = tokens_per_chip
    if M <= 1 and params.matvec_fraction > 0:  # a matrix-vector kernel (XLA:CPU)
        return params.matvec_fraction
    if params.matmul_curve:
        return _interpolate_log(params.matmul_curve, M)
    return params.matmul_peak_fraction * M / (M + params.matmul_half_tokens)


def _interpolate_log(points, m: float) -> float:
    """Linear in log M and log value between the measured points, the end values beyond."""
    if m <= points[0][0]:
        return points[0][1]
    for (m0, f0), (m1, f1) in zip(points, points[1:]):
        if m <= m1:
            t = math.log(m / m0) / math.log(m1 / m0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return points[-1][1]


def matmul_tokens_per_chip(plan: PhasePlan, wl: Workload) -> float:
    """M: weight-stationary layouts multiply every token of the batch on each chip (§5.1-§5.2);
    weight-gathered ones split the batch over the G gathered chips (§5.3)."""
    tokens = wl.batch * wl.tokens
    if plan.layout in GATHERED_AXES:
        return tokens / plan.mesh.size(GATHERED_AXES[plan.layout])
    return tokens


def link_bandwidth(c: Collective, plan: PhasePlan, hw: HardwareProfile) -> float:
    """Full bandwidth of the fast links a collective runs over, bytes/s per chip.

    Torus: the chip's whole interconnect, ``axis_bw x max_mesh_axes`` (the paper's "270 GB/s of
    interconnect bandwidth", pope2022.md §2.1, the one "network bandwidth" of every §5 formula,
    as `cost_model.collective_time`), halved when one of the collective's axes has no wrap-around
    link at its per-granule length (§2.2: "roughly doubles collective time"). Crediting only the
    links of the collective's own axes (the scaling book's rule, §2.2 [D]) fits the paper's
    measurements as well (RMS log error 2.6% vs 2.5%) but makes 1D WS beat 2D WS for every
    weight-stationary configuration of Table 2, against the paper's choices (§5.5).
    Switch (NVLink, host memory): one port, ``axis_bw``.
    """
    if hw.topology != "torus":
        return hw.axis_bw
    ici = dict(zip(("x", "y", "z"), plan.mesh.ici_sizes()))
    wraps = all(hw.wrap_multiple is None or ici[a] % hw.wrap_multiple == 0
                for a in c.axes if ici[a] > 1)
    return hw.axis_bw * hw.max_mesh_axes * (1.0 if wraps else 0.5)


def _role(c: Collective) -> str:
    if c.kind == "all-to-all":
        return "resharding"
    return c.moves


def collective_term(c: Collective, plan: PhasePlan, hw: HardwareProfile) -> CollectiveTerm:
    """Price one collective's payload at full link bandwidth, its cross-granule leg over DCN."""
    D = c.dcn_group
    if D > 1 and hw.dcn_bw is None:
        raise ValueError(f"hardware {hw.name} has no DCN bandwidth (dcn_bw): cannot price a "
                         "collective across hosts/slices")
    inner = dataclasses.replace(c, group=c.group // D, elements=c.elements / D)
    link_s = 0.0
    if inner.group > 1:
        link_s = inner.bytes_per_chip / link_bandwidth(c, plan, hw)
    if c.kind == "all-to-all" and hw.topology == "torus":
        link_s /= 4  # scaling book: ~1/4 of an all-gather on a torus (pope2022.md §4.3)
    dcn_s = dataclasses.replace(c, group=D).bytes_per_chip / hw.dcn_bw if D > 1 else 0.0
    hops = c.torus_steps if hw.topology == "torus" else c.group - 1
    return CollectiveTerm(c, _role(c), c.count * link_s, c.count * dcn_s, hops)


def collective_seconds(term: CollectiveTerm, params: EfficiencyParams) -> tuple[float, float]:
    """(payload seconds at the achievable link bandwidth, latency seconds), all executions."""
    payload = term.link_s / params.link_fraction + term.dcn_s
    latency = term.collective.count * (params.collective_latency_s
                                       + term.hops * params.hop_latency_s)
    return payload, latency


def step_terms(cfg: ModelConfig, plan: PhasePlan, wl: Workload, hw: HardwareProfile,
               nominal_params: float | None = None, parts=None) -> StepTerms:
    """The roofline estimate and the step's collectives priced at full bandwidth; `parts`
    keeps only the collectives of those parts of the step (`Collective.part`; None: all)."""
    est = estimate(cfg, plan, wl, hw, nominal_params)
    terms = tuple(collective_term(c, plan, hw) for c in est.collectives
                  if parts is None or c.part in parts)
    return StepTerms(est, matmul_tokens_per_chip(plan, wl), 1 if cfg.parallel_block else 2,
                     cfg.n_layers, terms, 2.0 * (nominal_params or cfg.param_count()),
                     wl.batch * wl.tokens, plan.mesh.n, hw.peak_flops_bf16,
                     attention_s=attention_flops_per_chip(cfg, wl, plan.mesh.n)
                     / hw.peak_flops_bf16)


def evaluate(terms: StepTerms, params: EfficiencyParams) -> ExpectedStep:
    """Apply the efficiencies and the overlap model (module docstring) to a step's terms."""
    est = terms.roofline
    eff = matmul_efficiency(terms.matmul_tokens, params)
    attention_eff = params.attention_fraction or eff
    matmul = (est.compute_s - terms.attention_s) / eff + terms.attention_s / attention_eff
    weights = est.weight_load_s / params.hbm_fraction
    kv = est.kv_load_s / (params.kv_fraction or params.hbm_fraction)
    payload = dict.fromkeys(ROLES, 0.0)
    latency = 0.0
    for term in terms.collectives:
        seconds, lat = collective_seconds(term, params)
        payload[term.role] += seconds
        latency += lat
    hidden = params.comm_overlap * payload["activations"]
    exposed = payload["activations"] - hidden + payload["resharding"]
    concurrent = max(matmul, weights, payload["weights"] + hidden)
    overhead = terms.n_layers * terms.blocks * params.block_overhead_s + params.step_overhead_s
    step = concurrent + exposed + latency + kv + overhead
    bound = max((("compute", matmul), ("memory", weights + kv),
                 ("communication", payload["weights"] + hidden + exposed + latency),
                 ("overhead", overhead)), key=lambda kv_: kv_[1])[0]
    return ExpectedStep(
        step_s=step, roofline_s=est.step_time_s, matmul_s=matmul, matmul_efficiency=eff,
        weight_load_s=weights, kv_load_s=kv, weight_gather_s=payload["weights"],
        comm_hidden_s=hidden, comm_exposed_s=exposed, latency_s=latency, overhead_s=overhead,
        concurrent_s=concurrent, bound=bound,
        mfu=terms.flops_per_token * terms.tokens / (terms.chips * terms.peak_flops * step),
        cost_chip_s_per_token=terms.chips * step / terms.tokens, roofline=est)


def expected_time(cfg: ModelConfig, plan: PhasePlan, wl: Workload, hw: HardwareProfile,
                  nominal_params: float | None = None,
                  params: EfficiencyParams | None = None) -> ExpectedStep:
    """Expected time of one step under `plan` on `hw` (its fitted `hw.efficiency` unless
    `params` is given); MFU counts `nominal_params` (default: the config's count), §4.2."""
    if wl.batch < 1 or wl.tokens < 1:
        raise ValueError(f"workload batch and tokens must be positive, got batch {wl.batch}, "
                         f"tokens {wl.tokens}")
    return evaluate(step_terms(cfg, plan, wl, hw, nominal_params), params or hw.efficiency)
