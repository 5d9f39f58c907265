"""Predict the continuous-batching engine: its own scheduler driven by a clock of priced steps.

`simulate` runs the engine's `Scheduler` over a workload's requests as `Engine.stream` does
(prompts handed over lazily while fewer than max_seqs wait; each device call plans a step with
lookahead steps_per_call; a decode-only plan whose slots may sample several tokens runs the
on-device loop for min(step_limits) steps, else one step), but instead of running a device it
advances a clock by each call's predicted time and hands back placeholder tokens. No request
stops early: every one generates its max_new_tokens (the issue-14 workload, and `jaxinfer
generate --input` without stop tokens). Every request is queued at the start, as in one
`Engine.generate` call. The figures are those `EngineStats` reports: useful tok/s, and per
request TTFT (from the start to its first token) and TPOT ((last - first) / (tokens - 1)).

`StepPricer` prices one engine step, what `jaxinfer.engine.device.engine_step` runs on a
`StepPlan`: the model over the step's packed token rows (T, the token bucket: decode tokens and
prefill chunks, padding included) as ONE sequence of T tokens under the phase plan, priced by
`partitioning.efficiency` (weights read once, T matmul rows, the collectives of T rows, the
per-step and per-block fixed costs), plus the logits of the step's S = max_seqs sampling rows, plus
its paged attention (`AttentionCost`):

- ``pages`` (the Pallas kernels, TPU / GPU): every sequence's pages read once, the KV bytes of
  `cost_model.kv_cache_bytes_per_chip` at the achievable HBM bandwidth;
- ``measured`` (the XLA twin, `pallas_kernels.ragged_paged_attention_ref`, what runs on CPU):
  every work item (`work_items`: its static count W depends on T, S and the block size) gathers
  the page table's full width (J pages, `plan.page_bucket`) and attends over all J x page_size
  keys, masked, so its time depends on the static shape (T, S, J) alone, not on the sequences'
  lengths. A step is priced at n_layers x one layer's time at that shape (under a plan: every
  chip's share, below), measured on this machine (`jaxinfer.engine_calibrate.AttentionTable`):
  the gathers run far below the streaming bandwidth and their cost grows faster than their
  bytes once they leave the caches, which no rate fit over a few shapes caught (the long-prompt
  workload was 1.8x optimistic with one).

Under a layout whose attention is split over the batch (batch-sharded attention, pope2022.md
§6.2b, or a weight-gathered layout's gathered axes, §5.3) the engine runs G slot groups
(`jaxinfer.engine.groups.GroupedScheduler`, G = the attention batch shards), and so does the
simulation. Such a step's T rows are G blocks of T/G (each group's tokens, padded to the widest
group's bucket) and its S slots G blocks of S/G: the dense part is priced as a batch of G
sequences of T/G tokens (the cost model's all-to-alls, weight gathers and split residual
follow from the layout), 'pages' attention at the chip holding the most pages (the group with
the most keys), and 'measured' attention as every chip's twin over its group's shape
(T/G, S/G, J) and its share of the heads, timed at that head count, all chips sharing this
machine's cores.

A device call adds `call_overhead_s` (host scheduling and bookkeeping, input transfer, dispatch:
measured once per machine by `jaxinfer.engine_calibrate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.plan import StepPlan
from jaxinfer.engine.groups import new_scheduler
from partitioning.cost_model import Workload, kv_cache_bytes_per_chip
from partitioning.efficiency import ExpectedStep, evaluate, step_terms
from partitioning.hardware import HardwareProfile
from partitioning.layouts import Layout, resolve
from partitioning.plan import PhasePlan

ATTENTION_KINDS = ("pages", "measured")


@dataclasses.dataclass(frozen=True)
class AttentionCost:
    """How an engine step's ragged paged attention is priced (module docstring)."""

    kind: str
    """'pages' (kernels read each sequence's pages) or 'measured' (the XLA twin, per shape)."""
    layer_seconds: Callable[[int, int, int, int, int, int], float] | None = None
    """measured: seconds of one layer's twin attention on one device at (rows T, slots S, table
    width J pages, page_size, query heads, KV heads), e.g. an `engine_calibrate.AttentionTable`."""
    source: str = ""
    """Where the figures come from."""

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"AttentionCost.kind must be one of {ATTENTION_KINDS}, "
                             f"got {self.kind!r}")
        if (self.kind == "measured") != callable(self.layer_seconds):
            raise ValueError("AttentionCost.layer_seconds is required for kind 'measured' and "
                             f"only for it, got kind {self.kind!r} with {self.layer_seconds!r}")


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload."""

    prompt: tuple[int, ...]
    """Prompt token ids."""
    max_new_tokens: int
    """Tokens it generates (no stop tokens)."""


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Predicted time of one engine step."""

    step_s: float
    """dense.step_s + attention_s."""
    dense: ExpectedStep
    """The model over the step's rows (`partitioning.efficiency`), logits of S rows included;
    with 'pages' attention its kv_load_s holds the attention's reads."""
    attention_s: float
    """'measured' attention (0 for 'pages': inside `dense`)."""


def slot_groups(layout: Layout) -> int:
    """The engine's slot groups under a resolved layout: its attention batch shards (1 with
    heads-sharded attention on a weight-stationary layout)."""
    return layout.size(layout.attn_batch)


class StepPricer:
    """Prices engine steps of one model under one phase plan on one hardware profile (module
    docstring); steps of equal shape are priced once. `groups`: the plan's `slot_groups`; a
    layout the model cannot take is the `ShardingError` naming why."""

    def __init__(self, cfg: ModelConfig, plan: PhasePlan, hw: HardwareProfile,
                 attention: AttentionCost, *, weight_bytes: float = 4.0, act_bytes: float = 4.0,
                 kv_bytes: float = 4.0):
        layout = resolve(plan, cfg)
        self.cfg, self.plan, self.hw, self.attention = cfg, plan, hw, attention
        self.groups = slot_groups(layout)
        # chips one sequence's query heads are split over inside attention
        self.heads_split = (layout.size(layout.model_axes + layout.x_axes)
                            if plan.attention == "heads" else 1)
        self.bytes = (weight_bytes, act_bytes, kv_bytes)
        self._memo: dict[tuple, StepCost] = {}
        self._terms_memo: dict[tuple[int, int], object] = {}

    def step(self, rows: int, slots: int, width: int, page_size: int, keys: int) -> StepCost:
        """One step of `rows` packed rows (the token bucket, all groups), `slots` sampling rows
        (max_seqs), a page table `width` pages wide, `keys` cached tokens read by the chip
        reading most ('pages' attention only: one group's sequences' pages)."""
        for name, value in (("rows", rows), ("slots", slots)):
            if value % self.groups:
                raise ValueError(f"a step of {name}={value} does not split into the "
                                 f"{self.groups} slot groups of {self.plan.layout}/"
                                 f"{self.plan.attention}")
        if self.attention.kind == "measured":
            keys = 0  # the twin reads the table's width whatever the sequences hold
        key = (rows, slots, width, page_size, keys)
        if key not in self._memo:
            self._memo[key] = self._price(*key)
        return self._memo[key]

    def _terms(self, rows: int, slots: int):
        """The cost model's terms of the model over `rows` rows with `slots` logits rows."""
        if (rows, slots) not in self._terms_memo:
            self._terms_memo[rows, slots] = self._dense_terms(rows, slots)
        return self._terms_memo[rows, slots]

    def _dense_terms(self, rows: int, slots: int):
        cfg, n, g = self.cfg, self.plan.mesh.n, self.groups
        wb, ab, kb = self.bytes
        wl = Workload(batch=g, tokens=rows // g, context=0, weight_bytes=wb, act_bytes=ab,
                      kv_bytes=kb, logits_tokens=slots // g)
        terms = step_terms(cfg, self.plan, wl, self.hw)
        logits = 2.0 * cfg.vocab_size * cfg.d_model * (slots - g)  # the estimate counts g rows
        return dataclasses.replace(terms, roofline=dataclasses.replace(
            terms.roofline, compute_s=terms.roofline.compute_s
            + logits / (n * self.hw.peak_flops_bf16)))

    def _price(self, rows, slots, width, page_size, keys) -> StepCost:
        cfg, kb = self.cfg, self.bytes[2]
        terms = self._terms(rows, slots)
        est = terms.roofline
        attention_s = 0.0
        if self.attention.kind == "pages":
            read = kv_cache_bytes_per_chip(cfg, self.plan, self.groups, keys, kb)
            est = dataclasses.replace(est, kv_load_s=read / self.hw.hbm_bw)
        else:
            attention_s = self._measured_seconds(rows, slots, width, page_size)
        dense = evaluate(dataclasses.replace(terms, roofline=est), self.hw.efficiency)
        return StepCost(dense.step_s + attention_s, dense, attention_s)

    def _measured_seconds(self, rows: int, slots: int, width: int, page_size: int) -> float:
        """The twin's attention over all layers. Each of the n host devices runs its group's
        shape (rows / G, slots / G, width) over its share of the heads (H / heads_split query
        heads over the KV heads they read), and all n share this machine's cores: n x one
        layer's time at that shape and head count, per layer. (Pricing a chip's share as 1 /
        heads_split of the whole was 1.7x optimistic for 1d-ws/heads on 8 devices: the twin's
        page gathers follow the KV heads a chip reads, 1 of 2 for 1 query head of 8.)"""
        g, cfg = self.groups, self.cfg
        q = cfg.n_heads // self.heads_split
        kv = max(1, cfg.n_kv_heads // self.heads_split)
        seconds = self.attention.layer_seconds(rows // g, slots // g, width, page_size, q, kv)
        return cfg.n_layers * self.plan.mesh.n * float(seconds)

    def call(self, plan: StepPlan, steps: int, page_size: int) -> float:
        """Seconds of the `steps` steps one device call runs for `plan` (the decode loop feeds
        each sequence one more token per step)."""
        if plan.num_groups != self.groups:
            raise ValueError(f"the step plan has {plan.num_groups} slot groups, the layout "
                             f"{self.plan.layout}/{self.plan.attention} {self.groups}")
        rows, width = len(plan.token_ids), plan.page_table.shape[1]
        slots = len(plan.kv_lens)
        per = slots // self.groups
        kv = [plan.kv_lens[g * per:g * per + int(n)].astype(np.int64)
              for g, n in enumerate(plan.group_seqs)]
        total = 0.0
        for j in range(steps):
            keys = max(int((-(-(k + j) // page_size)).sum()) for k in kv) * page_size
            total += self.step(rows, slots, width, page_size, keys).step_s
        return total


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The simulated engine run's figures (as `EngineStats` defines them)."""

    wall_s: float
    """Predicted duration of the run."""
    device_s: float
    """Sum of the predicted step times (wall_s less the per-call overheads)."""
    generated_tokens: int
    """Tokens generated: the sum of max_new_tokens."""
    steps: int
    """Engine steps."""
    device_calls: int
    """Device calls."""
    preemptions: int
    """Sequences preempted for lack of pages."""
    decode_batch: float
    """Mean decode sequences per step that has any."""
    ttft_s: tuple[float, ...]
    """Per request (workload order): time from the start to its first token."""
    tpot_s: tuple[float | None, ...]
    """Per request: (last token time - first) / (tokens - 1); None for one token."""

    @property
    def useful_tok_s(self) -> float:
        """Generated (= requested) tokens per second."""
        return self.generated_tokens / self.wall_s

    def ttft(self, q: float) -> float:
        """The q-th percentile of TTFT, seconds."""
        return float(np.percentile(self.ttft_s, q))

    def tpot(self, q: float) -> float:
        """The q-th percentile of TPOT over requests of two tokens or more (nan if none)."""
        values = [t for t in self.tpot_s if t is not None]
        return float(np.percentile(values, q)) if values else float("nan")


def _steps_of_call(plan: StepPlan, steps_per_call: int) -> int:
    """Steps the engine runs for `plan` in one call (no stop tokens: the loop's bound)."""
    if steps_per_call > 1 and int(plan.step_limits.max()) > 1:
        slots = list(plan.slots)
        return int(min(steps_per_call, plan.step_limits[slots][plan.sample_mask[slots]].min()))
    return 1


def simulate(requests: Sequence[WorkloadRequest], config: EngineConfig, num_pages: int,
             max_model_len: int, pricer: StepPricer, call_overhead_s: float) -> Prediction:
    """Run the engine's scheduler over `requests` on a clock of predicted call times (module
    docstring), in the pricer's slot groups; a request that cannot fit the pool (a group's
    segment) or max_model_len is the scheduler's ValueError naming it."""
    if not requests:
        raise ValueError("the workload has no requests")
    sched = new_scheduler(config, num_pages, max_model_len, pricer.groups)
    first = np.full(len(requests), np.nan)
    last = np.full(len(requests), np.nan)
    counts = np.zeros(len(requests), np.int64)
    clock = device = 0.0
    calls = decode_steps = decode_seqs = 0
    fed = 0
    while True:
        while fed < len(requests) and sched.num_waiting < config.max_seqs:
            sched.add_request(fed, requests[fed].prompt, requests[fed].max_new_tokens)
            fed += 1
        if not sched.has_unfinished:
            break
        plan = sched.schedule(lookahead=config.steps_per_call)
        n = _steps_of_call(plan, config.steps_per_call)
        seconds = pricer.call(plan, n, config.page_size)
        device += seconds
        clock += seconds + call_overhead_s
        calls += 1
        if plan.num_decode_seqs:
            decode_steps += n
            decode_seqs += n * plan.num_decode_seqs
        sampled = [rid for rid, s in zip(plan.request_ids, plan.samples) if s]
        first[sampled] = np.where(np.isnan(first[sampled]), clock, first[sampled])
        last[sampled] = clock
        counts[sampled] += n
        zeros = np.zeros((n, plan.num_seqs), np.int32)
        sched.update(plan, zeros if n > 1 else zeros[0])
    stats = sched.stats
    tpot = tuple(None if c < 2 else float((b - a) / (c - 1))
                 for a, b, c in zip(first, last, counts))
    return Prediction(
        wall_s=clock, device_s=device, generated_tokens=stats.generated_tokens,
        steps=stats.steps, device_calls=calls, preemptions=stats.preemptions,
        decode_batch=decode_seqs / decode_steps if decode_steps else 0.0,
        ttft_s=tuple(float(x) for x in first), tpot_s=tpot)
