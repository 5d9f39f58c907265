"""Slot groups for batch-sharded attention: one `Scheduler` per attention batch shard.

Under a decode layout that shards attention over the batch (pope2022.md §6.2b: the queries
all-to-all'd from heads to batch rows; §6.5: the KV cache split over the batch), chip j attends
the queries of batch row j against the KV cache it holds. The engine's step then has G rows, G
the attention batch shards: `GroupedScheduler` splits the max_seqs slots into G groups of
max_seqs/G, the page pool into G segments of num_pages/G pages and the token budget into G
shares of token_budget // G, and runs each group as an ordinary `Scheduler` over its segment
(page ids local to it). So a sequence's pages all lie in its group's segment, prefix-cache hits
are within a group, a preemption's victim is in the preempting sequence's group, and the step's
`StepPlan` is the groups' plans in the grouped layout (`plan.stack_plans`): row block g holds
group g's tokens, which the chip holding segment g attends.

Requests wait in one FCFS queue. Before each step the head is handed to a group with a free slot
(running + waiting there < max_seqs/G): the one whose prefix cache holds most of its prefix,
then the one with the fewest requests, then the lowest index; this repeats until no group has a
free slot. A request stays in its group until it finishes (a preempted one waits at the front of
its group's queue and is recomputed there).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.plan import (Request, RequestState, SchedulerStats, StepPlan,
                                  build_step_plan, stack_plans)
from jaxinfer.engine.prefix_cache import PrefixCacheStats
from jaxinfer.engine.scheduler import Scheduler, _check_int, check_can_schedule


class GroupedScheduler:
    """`Scheduler`'s interface over G slot groups (module docstring); no model, no device."""

    def __init__(self, *, groups: int, max_seqs: int, page_size: int, num_pages: int,
                 token_budget: int, max_prefill_chunk: int, max_model_len: int,
                 prefix_caching: bool = True, min_token_bucket: int = 8):
        self.num_groups = _check_int("groups", groups, 1)
        self.max_seqs = _check_int("max_seqs", max_seqs, 1)
        self.num_pages = _check_int("num_pages", num_pages, 1)
        self.token_budget = _check_int("token_budget", token_budget, self.max_seqs)
        self.max_prefill_chunk = _check_int("max_prefill_chunk", max_prefill_chunk, 1)
        for name, value in (("max_seqs", max_seqs), ("num_pages", num_pages)):
            if value % groups:
                raise ValueError(f"{name}={value} must be divisible by the {groups} slot groups "
                                 f"(one per attention batch shard)")
        share = token_budget // groups
        self.groups = tuple(Scheduler(
            max_seqs=max_seqs // groups, page_size=page_size, num_pages=num_pages // groups,
            token_budget=share, max_prefill_chunk=min(max_prefill_chunk, share),
            max_model_len=max_model_len, prefix_caching=prefix_caching,
            min_token_bucket=-(-min_token_bucket // groups)) for _ in range(groups))
        first = self.groups[0]
        self.page_size, self.max_model_len = first.page_size, first.max_model_len
        self.pages_per_seq, self.prefix_caching = first.pages_per_seq, prefix_caching
        self.min_token_bucket = min_token_bucket
        self._waiting: collections.deque[Request] = collections.deque()
        self._ids: set[Hashable] = set()
        self._group_of: dict[Request, int] = {}
        self._arrivals = self._prompt_tokens = self._aborted_waiting = self._num_steps = 0
        self._pending: tuple[StepPlan, list[StepPlan | None]] | None = None

    # ----------------------------------------------------------------------------- requests
    def add_request(self, request_id: Hashable, prompt: Sequence[int], max_new_tokens: int,
                    extra_key: str | bytes | None = None) -> Request:
        """Queue a request (the errors of `Scheduler.add_request`, a group's pool segment being
        the pool it must fit)."""
        if request_id in self._ids:
            raise ValueError(f"request_id {request_id!r} is already waiting or running")
        req = self._in_a_group(lambda: self.groups[0].make_request(
            request_id, prompt, max_new_tokens, extra_key, self._arrivals))
        self._arrivals += 1
        self._ids.add(request_id)
        self._waiting.append(req)
        self._prompt_tokens += len(req.prompt)
        return req

    def check_fits(self, request_id: Hashable, prompt_len: int, max_new: int) -> None:
        """Raise the error `add_request` gives for a request of these sizes that cannot fit."""
        self._in_a_group(lambda: self.groups[0].check_fits(request_id, prompt_len, max_new))

    def _in_a_group(self, fn):
        try:
            return fn()
        except ValueError as err:
            raise ValueError(f"{err} (one of the {self.num_groups} slot groups' segments: a "
                             f"sequence's pages all lie in its group's)") from None

    def abort(self, req: Request, reason: str = "abort") -> None:
        """End a waiting or running request now (between steps), as `Scheduler.abort`."""
        if self._pending is not None:
            raise RuntimeError(f"abort during step {self._pending[0].step}: call update first")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"abort reason must be a non-empty str, got {reason!r}")
        group = self._group_of.get(req)
        if group is not None:
            self.groups[group].abort(req, reason)
            del self._group_of[req]
        elif req.state is RequestState.WAITING and req in self._waiting:
            self._waiting.remove(req)
            req.finish_reason, req.state = reason, RequestState.FINISHED
            self._aborted_waiting += 1
        else:
            raise ValueError(f"request {req.request_id!r} is not waiting or running "
                             f"(state {req.state.value})")
        self._ids.discard(req.request_id)

    # ----------------------------------------------------------------------------- status
    @property
    def has_unfinished(self) -> bool:
        """Whether some request is waiting or running."""
        return bool(self._waiting) or any(g.has_unfinished for g in self.groups)

    @property
    def num_waiting(self) -> int:
        """Requests queued (not handed to a group yet, or waiting in one)."""
        return len(self._waiting) + sum(g.num_waiting for g in self.groups)

    @property
    def num_running(self) -> int:
        """Requests admitted and holding pages."""
        return sum(g.num_running for g in self.groups)

    def running(self) -> tuple[Request, ...]:
        """Running requests, group by group, each group's in admission order."""
        return tuple(r for g in self.groups for r in g.running())

    def group_of(self, req: Request) -> int | None:
        """The group an unfinished request was handed to (None: still in the shared queue)."""
        return self._group_of.get(req)

    @property
    def stats(self) -> SchedulerStats:
        """The groups' counters summed (steps: steps of this scheduler)."""
        total = _summed(SchedulerStats, [g.stats for g in self.groups])
        return dataclasses.replace(
            total, prompt_tokens=self._prompt_tokens, steps=self._num_steps,
            finished_requests=total.finished_requests + self._aborted_waiting)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The groups' prefix-cache counters summed."""
        return _summed(PrefixCacheStats, [g.prefix_cache_stats() for g in self.groups])

    # ----------------------------------------------------------------------------- steps
    def schedule(self, lookahead: int = 1) -> StepPlan:
        """Plan the next step: hand waiting requests to groups, plan every group with work,
        stack the plans (a group without work contributes empty padding)."""
        lookahead = _check_int("lookahead", lookahead, 1)
        check_can_schedule(self._pending, self.has_unfinished)
        self._dispatch()
        plans = [g.schedule(lookahead) if g.has_unfinished else None for g in self.groups]
        first = self.groups[0]
        empty = build_step_plan(
            0, [], num_decode_seqs=0, max_seqs=first.max_seqs, pages_per_seq=self.pages_per_seq,
            page_size=self.page_size, num_pages=first.num_pages,
            min_token_bucket=first.min_token_bucket)
        plan = stack_plans(self._num_steps, [empty if p is None else p for p in plans],
                           pad_slot=first.num_pages * self.page_size)
        self._pending = (plan, plans)
        return plan

    def _dispatch(self) -> None:
        """Hand queued requests, FCFS, to groups with a free slot (module docstring)."""
        while self._waiting:
            req = self._waiting[0]
            load = [g.num_running + g.num_waiting for g in self.groups]
            free = [i for i, g in enumerate(self.groups) if load[i] < g.max_seqs]
            if not free:
                return
            best = min(free, key=lambda i: (-self.groups[i].cached_prefix_pages(req), load[i], i))
            self._waiting.popleft()
            self.groups[best].enqueue(req)
            self._group_of[req] = best

    def update(self, plan: StepPlan, sampled_tokens, finished_flags=None) -> list[Request]:
        """Record the step `plan` ran, as `Scheduler.update`: per row one entry per sequence
        (num_seqs, in `plan.request_ids` order) or per device slot (max_seqs)."""
        if self._pending is None or plan is not self._pending[0]:
            expected = None if self._pending is None else self._pending[0].step
            raise ValueError(
                f"update(plan) got the plan of step {plan.step}, but the step awaiting its "
                f"update is {expected}")
        tokens = self._dense(plan, "sampled_tokens", sampled_tokens)
        flags = (np.zeros(tokens.shape, bool) if finished_flags is None
                 else self._dense(plan, "finished_flags", finished_flags))
        bounds = np.concatenate([[0], np.cumsum(plan.group_seqs)])
        parts = []
        for g, (sub, sub_plan) in enumerate(zip(self.groups, self._pending[1])):
            if sub_plan is None:
                continue
            cols = slice(int(bounds[g]), int(bounds[g + 1]))
            t, f = ((tokens[..., cols], flags[..., cols]) if sub_plan.num_seqs
                    else (np.zeros(0, np.int32), None))
            sub._check_rows(sub_plan, t, f)  # every group checked before any is updated
            parts.append((sub, sub_plan, t, f))
        finished = [req for sub, sub_plan, t, f in parts for req in sub.update(sub_plan, t, f)]
        for req in finished:
            del self._group_of[req]
            self._ids.discard(req.request_id)
        self._num_steps += len(tokens) if tokens.ndim == 2 else 1
        self._pending = None
        return finished

    def _dense(self, plan: StepPlan, name: str, values) -> np.ndarray:
        """`values` with one entry per sequence per row (max_seqs device slots gathered)."""
        arr = np.asarray(values)
        if arr.ndim in (1, 2) and arr.shape[-1] == self.max_seqs:
            arr = arr[..., list(plan.slots)]
        if arr.ndim not in (1, 2) or arr.shape[-1] != plan.num_seqs:
            raise ValueError(
                f"{name} must be 1-D (or [steps, ...] after a decode loop) with num_seqs="
                f"{plan.num_seqs} or max_seqs={self.max_seqs} entries per row, got shape "
                f"{arr.shape}")
        return arr


def _summed(cls, items):
    """A `cls` dataclass whose every field is the sum of that field over `items`."""
    return cls(**{f.name: sum(getattr(i, f.name) for i in items)
                  for f in dataclasses.fields(cls)})


def new_scheduler(config: EngineConfig, num_pages: int, max_model_len: int,
                  groups: int) -> Scheduler | GroupedScheduler:
    """The scheduler the engine runs for `config` over an empty pool of `num_pages` pages in
    `groups` slot groups (1: one `Scheduler`)."""
    kwargs = dict(
        max_seqs=config.max_seqs, page_size=config.page_size, num_pages=num_pages,
        token_budget=config.token_budget,
        max_prefill_chunk=config.max_prefill_chunk or config.token_budget,
        max_model_len=max_model_len, prefix_caching=config.prefix_caching,
        min_token_bucket=config.min_token_bucket)
    return Scheduler(**kwargs) if groups == 1 else GroupedScheduler(groups=groups, **kwargs)
