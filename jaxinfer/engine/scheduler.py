"""Continuous-batching scheduler: decode-maximal steps with chunked prefill over a paged KV cache.

Each request has `token_ids` (prompt + generated) and `num_computed` (tokens whose K/V are cached);
a step feeds every running sequence some of its missing tokens, and a sequence whose fed tokens
reach the end of `token_ids` samples one more token. A decode is a sequence past its prefill: its
one missing token is the one it sampled last.

Step policy (SARATHI decode-maximal batches; Sarathi-Serve order):
1. every running sequence past its prefill (a decode: one missing token, its last sampled one)
   gets it, in admission order;
2. the rest of `token_budget` goes to running prefills, oldest first, each chunk at most
   `max_prefill_chunk` tokens (and shortened to the pages available);
3. then waiting requests are admitted in FCFS order (preempted ones first) while a slot, budget
   and pages for their first chunk are there, after a prefix-cache lookup — unless this step
   preempted someone (the pool is short; admitting more would only thrash).
When a running sequence cannot get a page for even one token, the most recently admitted running
sequence is preempted by recompute: its pages are released, it goes to the front of the queue and
will re-prefill prompt + generated-so-far (often hitting its own cached pages) and continue. The
oldest running sequence always progresses (every request fits the pool alone, checked at
`add_request`), so the engine never deadlocks.

Lookahead (`schedule(lookahead=k)`, the on-device multi-step loop): when a step is decode-only
(no prefill chunk, nobody admitted or preempted), each decode also gets pages, when free or
evictable ones exist (never by preempting), for up to k - 1 more tokens (at most its remaining
max_new_tokens); `plan.step_limits` says how many tokens each slot may sample in the call, and
`update` then takes one row of sampled tokens per step run. Reserved pages stay with the request
(used by its next tokens, released when it finishes or is preempted).

`abort(request, reason)` ends a waiting or running request between steps (its pages released).

The scheduler is synchronous: `schedule()` plans a step, the caller runs it on the device and
hands the sampled tokens to `update(plan, ...)` before the next `schedule()`. Pages become
prefix-cache entries in `update`, after the step that computed them, so no sequence reads a page
in the same step that writes it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np

from jaxinfer.engine.pages import PagePool, pages_for_tokens
from jaxinfer.engine.plan import (Request, RequestState, SchedulerStats, StepPlan,
                                  build_step_plan)
from jaxinfer.engine.prefix_cache import PrefixCache, PrefixCacheStats, extend_block_hashes

_MAX_TOKEN_ID = 2**31 - 1


def check_can_schedule(pending, has_unfinished: bool) -> None:
    """The errors of scheduling again before the last plan was updated, or with nothing to do
    (`pending`: the last plan's (plan, ...) awaiting `update`, or None)."""
    if pending is not None:
        raise RuntimeError(
            f"step {pending[0].step} was planned but not updated: call "
            f"update(plan, sampled_tokens, finished_flags) before scheduling again")
    if not has_unfinished:
        raise RuntimeError("nothing to schedule: no waiting or running requests")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass
class _StepBuild:
    """A step under construction."""

    budget: int
    """Tokens still unassigned this step."""
    entries: dict[Request, int] = dataclasses.field(default_factory=dict)
    """Tokens assigned to each scheduled request, in slot order."""
    decodes: set[Request] = dataclasses.field(default_factory=set)
    """Requests scheduled in the decode pass."""
    preempted: bool = False
    """Whether a sequence was preempted while building this step."""


class Scheduler:
    """Plans engine steps and keeps the page and prefix-cache accounting (no model, no device)."""

    def __init__(self, *, max_seqs: int, page_size: int, num_pages: int, token_budget: int,
                 max_prefill_chunk: int, max_model_len: int, prefix_caching: bool = True,
                 min_token_bucket: int = 8):
        self.max_seqs = _check_int("max_seqs", max_seqs, 1)
        self.page_size = _check_int("page_size", page_size, 1)
        self.num_pages = _check_int("num_pages", num_pages, 1)
        self.token_budget = _check_int("token_budget", token_budget, 1)
        self.max_prefill_chunk = _check_int("max_prefill_chunk", max_prefill_chunk, 1)
        self.max_model_len = _check_int("max_model_len", max_model_len, 2)
        self.min_token_bucket = _check_int("min_token_bucket", min_token_bucket, 1)
        if self.token_budget < self.max_seqs:
            raise ValueError(
                f"token_budget={token_budget} must be >= max_seqs={max_seqs} so that every "
                f"running sequence can decode in one step")
        if self.max_prefill_chunk > self.token_budget:
            raise ValueError(
                f"max_prefill_chunk={max_prefill_chunk} must be <= token_budget={token_budget}")
        if not isinstance(prefix_caching, bool):
            raise ValueError(f"prefix_caching must be a bool, got {prefix_caching!r}")
        self.prefix_caching = prefix_caching
        self.pages_per_seq = pages_for_tokens(self.max_model_len, self.page_size)
        self.pool = PagePool(self.num_pages)
        self.prefix_cache = PrefixCache(self.pool, self.page_size)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._ids: set[Hashable] = set()  # ids of the waiting and running requests
        self._arrivals = 0
        self._stats = SchedulerStats()
        self._pending: tuple[StepPlan, list[Request]] | None = None
        self._num_steps = 0

    # ----------------------------------------------------------------------------- requests
    def add_request(self, request_id: Hashable, prompt: Sequence[int], max_new_tokens: int,
                    extra_key: str | bytes | None = None) -> Request:
        """Queue a request; one that cannot fit (too long, more pages than the pool) is an error,
        and so is an id of a request still waiting or running (finished ids may be reused)."""
        if request_id in self._ids:
            raise ValueError(f"request_id {request_id!r} is already waiting or running")
        req = self.make_request(request_id, prompt, max_new_tokens, extra_key, self._arrivals)
        self._arrivals += 1
        self.enqueue(req)
        self._stats.prompt_tokens += len(req.prompt)
        return req

    def make_request(self, request_id: Hashable, prompt: Sequence[int], max_new_tokens: int,
                     extra_key: str | bytes | None, arrival: int) -> Request:
        """A checked new `Request` (the errors of `add_request`, but the id's), not queued."""
        tokens = self._check_prompt(request_id, prompt)
        max_new = _check_int("max_new_tokens", max_new_tokens, 1)
        self.check_fits(request_id, len(tokens), max_new)
        if isinstance(extra_key, str):
            extra_key = extra_key.encode()
        elif extra_key is None:
            extra_key = b""
        elif not isinstance(extra_key, bytes):
            raise ValueError(f"extra_key must be str, bytes or None, got {extra_key!r}")
        return Request(request_id=request_id, prompt=tokens, max_new_tokens=max_new,
                       arrival=arrival, extra_key=extra_key)

    def enqueue(self, req: Request) -> None:
        """Queue a waiting request from `make_request` (a `GroupedScheduler` hands its requests
        to the group that will run them this way; their statistics stay the caller's)."""
        if req.request_id in self._ids or req.state is not RequestState.WAITING:
            raise ValueError(f"request {req.request_id!r} is already queued here or not waiting "
                             f"(state {req.state.value})")
        self._ids.add(req.request_id)
        self._waiting.append(req)

    def _check_prompt(self, request_id: Hashable, prompt: Sequence[int]) -> tuple[int, ...]:
        arr = np.asarray(prompt)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ValueError(
                f"request {request_id!r}: prompt must be a non-empty 1-D sequence of int token "
                f"ids, got shape {arr.shape} dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() > _MAX_TOKEN_ID:
            raise ValueError(
                f"request {request_id!r}: prompt token ids must be in [0, {_MAX_TOKEN_ID}], got "
                f"min {arr.min()} max {arr.max()}")
        return tuple(int(t) for t in arr)

    def check_fits(self, request_id: Hashable, prompt_len: int, max_new: int) -> None:
        """Raise the error `add_request` gives for a request of these sizes that cannot fit."""
        total = prompt_len + max_new
        if total > self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {prompt_len} tokens + max_new_tokens={max_new} "
                f"= {total} tokens exceeds max_model_len={self.max_model_len}")
        # The last sampled token is never fed back, so the cache holds total - 1 tokens at most.
        need = pages_for_tokens(total - 1, self.page_size)
        if need > self.num_pages:
            raise ValueError(
                f"request {request_id!r}: prompt of {prompt_len} tokens + max_new_tokens={max_new} "
                f"needs {need} pages of {self.page_size} tokens ({total - 1} cached tokens) but "
                f"the pool has num_pages={self.num_pages}")

    # ----------------------------------------------------------------------------- status
    @property
    def has_unfinished(self) -> bool:
        """Whether some request is waiting or running."""
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued (never admitted, or preempted)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted and holding pages."""
        return len(self._running)

    def running(self) -> tuple[Request, ...]:
        """Running requests in admission order."""
        return tuple(self._running)

    @property
    def stats(self) -> SchedulerStats:
        """A copy of the counters."""
        return dataclasses.replace(self._stats)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        """The prefix cache's counters."""
        return self.prefix_cache.stats()

    # ----------------------------------------------------------------------------- schedule
    def schedule(self, lookahead: int = 1) -> StepPlan:
        """Plan the next step (see the module docstring for the policy and the lookahead)."""
        lookahead = _check_int("lookahead", lookahead, 1)
        check_can_schedule(self._pending, self.has_unfinished)
        build = _StepBuild(budget=self.token_budget)
        decoding = [r for r in self._running if r.num_computed >= r.prefill_target]
        for req in decoding:
            if self._schedule_running(req, build):
                build.decodes.add(req)
        for req in [r for r in self._running if r.num_computed < r.prefill_target]:
            self._schedule_running(req, build)
        if not build.preempted:
            self._admit(build)
        entries = list(build.entries.items())
        decode_only = len(build.decodes) == len(entries) and not build.preempted
        limits = ([self._reserve(r, lookahead) for r, _ in entries]
                  if decode_only and lookahead > 1 else None)
        plan = build_step_plan(
            self._num_steps, entries, num_decode_seqs=sum(r in build.decodes for r, _ in entries),
            max_seqs=self.max_seqs, pages_per_seq=self.pages_per_seq, page_size=self.page_size,
            num_pages=self.num_pages, min_token_bucket=self.min_token_bucket,
            step_limits=limits)
        self._pending = (plan, [r for r, _ in entries])
        return plan

    def _reserve(self, req: Request, lookahead: int) -> int:
        """Pages (free or evictable, no preemption) for up to `lookahead` tokens of decode `req`
        in this call; returns how many tokens it may sample (>= 1: its first one has pages)."""
        want = min(lookahead, req.max_new_tokens - len(req.output))
        need = pages_for_tokens(req.num_computed + want, self.page_size) - len(req.pages)
        if need > 0:
            req.pages.extend(self.prefix_cache.allocate(
                min(need, self.prefix_cache.num_available)))
        return min(want, len(req.pages) * self.page_size - req.num_computed)

    def _schedule_running(self, req: Request, build: _StepBuild) -> bool:
        """Give a running request its tokens for this step; False if it got none."""
        if req.state is not RequestState.RUNNING or build.budget == 0:
            return False
        want = min(req.num_remaining, self.max_prefill_chunk, build.budget)
        n = self._grow(req, want, build)
        if n:
            build.entries[req] = n
            build.budget -= n
        return n > 0

    def _grow(self, req: Request, want: int, build: _StepBuild) -> int:
        """Pages for up to `want` more tokens of `req`, preempting the newest if none fit."""
        while True:
            room = (len(req.pages) + self.prefix_cache.num_available) * self.page_size
            n = min(want, room - req.num_computed)
            if n >= 1:
                need = pages_for_tokens(req.num_computed + n, self.page_size) - len(req.pages)
                if need > 0:  # pages reserved by an earlier lookahead may already cover it
                    req.pages.extend(self.prefix_cache.allocate(need))
                return n
            victim = self._running[-1]
            self._preempt(victim, build)
            if victim is req:
                return 0

    def _preempt(self, victim: Request, build: _StepBuild) -> None:
        self._running.remove(victim)
        build.budget += build.entries.pop(victim, 0)
        build.decodes.discard(victim)
        self.prefix_cache.release(victim.pages)
        victim.pages = []
        victim.num_computed = 0
        victim.state = RequestState.WAITING
        victim.num_preemptions += 1
        self._waiting.appendleft(victim)
        self._stats.preemptions += 1
        build.preempted = True

    def _admit(self, build: _StepBuild) -> None:
        """Admit waiting requests FCFS while a slot, budget and pages for a first chunk exist."""
        while self._waiting and len(self._running) < self.max_seqs and build.budget > 0:
            req = self._waiting[0]
            hits = self._match(req)
            hit_tokens = len(hits) * self.page_size
            want = min(len(req.token_ids) - hit_tokens, self.max_prefill_chunk, build.budget)
            need = pages_for_tokens(hit_tokens + want, self.page_size) - len(hits)
            if need > self.prefix_cache.num_available - self.prefix_cache.num_idle(hits):
                return
            self._waiting.popleft()
            if self.prefix_caching:
                self.prefix_cache.claim(hits)
                self._stats.prefix_hit_tokens += hit_tokens
            req.pages = hits + self.prefix_cache.allocate(need)
            req.num_computed = hit_tokens
            req.prefill_target = len(req.token_ids)
            req.state = RequestState.RUNNING
            self._running.append(req)
            build.entries[req] = want
            build.budget -= want

    def cached_prefix_pages(self, req: Request) -> int:
        """Pages of `req`'s prefix that admitting it now would take from the prefix cache."""
        return len(self._match(req))

    def _match(self, req: Request) -> list[int]:
        """Cached pages of the longest prefix of `req`, leaving at least one token to compute."""
        if not self.prefix_caching:
            return []
        extend_block_hashes(req.block_hashes, req.token_ids, self.page_size, req.extra_key)
        max_blocks = (len(req.token_ids) - 1) // self.page_size
        return self.prefix_cache.match(req.block_hashes[:max_blocks])

    # ----------------------------------------------------------------------------- update
    def update(self, plan: StepPlan, sampled_tokens: Sequence[int],
               finished_flags: Sequence[bool] | None = None) -> list[Request]:
        """Record the step `plan` ran: slot i's sampled token is `sampled_tokens[i]` (read only
        where `plan.samples[i]`), `finished_flags[i]` True means the caller saw a stop there.
        Both have num_seqs or max_seqs entries. A decode-only plan run for n steps on device takes
        [n, num_seqs or max_seqs] arrays, row j the j-th step's tokens (n at most
        min(plan.step_limits[:num_seqs]); only the last row may flag a stop). Returns the
        requests that finished."""
        if self._pending is None or plan is not self._pending[0]:
            expected = None if self._pending is None else self._pending[0].step
            raise ValueError(
                f"update(plan) got the plan of step {plan.step}, but the step awaiting its "
                f"update is {expected}")
        tokens, flags = self._check_rows(plan, sampled_tokens, finished_flags)
        finished = []
        for j in range(len(tokens)):
            for slot, req in enumerate(self._pending[1]):
                self._advance(req, len(plan.chunk_token_ids[slot]) if j == 0 else 1)
                if plan.samples[slot] and self._append(req, int(tokens[j][slot]),
                                                       bool(flags[j][slot])):
                    finished.append(req)
            self._num_steps += 1
            self._stats.steps += 1
        self._pending = None
        return finished

    def _check_rows(self, plan: StepPlan, sampled_tokens, finished_flags):
        """The outputs as rows (one per step run), each checked by `_check_outputs`."""
        tokens = np.asarray(sampled_tokens)
        if tokens.ndim != 2:
            one, one_flags = self._check_outputs(plan, tokens, finished_flags)
            return [one], [one_flags]
        flags = (np.zeros(tokens.shape, bool) if finished_flags is None
                 else np.asarray(finished_flags))
        limit = int(plan.step_limits[:plan.num_seqs].min()) if plan.num_seqs else 0
        if plan.num_decode_seqs != plan.num_seqs or not 1 <= len(tokens) <= limit:
            raise ValueError(
                f"sampled_tokens has {len(tokens)} rows (steps); a plan takes several only when "
                f"it is decode-only, at most min(step_limits)={limit} (this plan: "
                f"{plan.num_decode_seqs} of {plan.num_seqs} slots decode)")
        if flags.shape[:1] != tokens.shape[:1]:
            raise ValueError(f"finished_flags must have one row per row of sampled_tokens "
                             f"({len(tokens)}), got shape {flags.shape}")
        rows = [self._check_outputs(plan, t, f) for t, f in zip(tokens, flags)]
        early = np.flatnonzero(np.asarray([r[1][:plan.num_seqs].any() for r in rows[:-1]]))
        if early.size:
            raise ValueError(f"finished_flags flags a stop at step row {int(early[0])}, before "
                             f"the last row {len(rows) - 1}: the device must stop at a stop")
        return [r[0] for r in rows], [r[1] for r in rows]

    def _check_outputs(self, plan: StepPlan, sampled_tokens, finished_flags):
        tokens = np.asarray(sampled_tokens)
        flags = (np.zeros(plan.num_seqs, bool) if finished_flags is None
                 else np.asarray(finished_flags))
        for name, arr, kinds in (("sampled_tokens", tokens, "iu"), ("finished_flags", flags, "b")):
            if arr.ndim != 1 or len(arr) not in (plan.num_seqs, self.max_seqs) or (
                    arr.size and arr.dtype.kind not in kinds):
                raise ValueError(
                    f"{name} must be 1-D of length num_seqs={plan.num_seqs} or max_seqs="
                    f"{self.max_seqs} with dtype kind {kinds!r}, got shape {arr.shape} dtype "
                    f"{arr.dtype}")
        mask = np.asarray(plan.samples, bool)
        bad = np.flatnonzero(flags[:plan.num_seqs] & ~mask)
        if bad.size:
            raise ValueError(
                f"finished_flags is True at slot {int(bad[0])} (request "
                f"{plan.request_ids[bad[0]]!r}), which did not sample a token this step")
        sampled = tokens[:plan.num_seqs][mask]
        if sampled.size and (sampled.min() < 0 or sampled.max() > _MAX_TOKEN_ID):
            raise ValueError(
                f"sampled_tokens must be in [0, {_MAX_TOKEN_ID}] at sampling slots, got min "
                f"{sampled.min()} max {sampled.max()}")
        return tokens, flags

    def _advance(self, req: Request, n: int) -> None:
        """`n` more tokens of `req` were computed; cache the pages that became full."""
        start, req.num_computed = req.num_computed, req.num_computed + n
        prefill = max(0, min(req.num_computed, req.prefill_target) - start)
        self._stats.prefill_tokens += prefill
        self._stats.decode_tokens += n - prefill
        if not self.prefix_caching:
            return
        extend_block_hashes(req.block_hashes, req.token_ids, self.page_size, req.extra_key)
        for b in range(start // self.page_size, req.num_computed // self.page_size):
            self.prefix_cache.insert(req.block_hashes[b], req.pages[b])

    def abort(self, req: Request, reason: str = "abort") -> None:
        """End a waiting or running request now (between steps): finish_reason `reason`, pages
        released (a running request's computed full pages stay in the prefix cache)."""
        if self._pending is not None:
            raise RuntimeError(f"abort during step {self._pending[0].step}: call update first")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"abort reason must be a non-empty str, got {reason!r}")
        if req.state is RequestState.FINISHED or req.request_id not in self._ids:
            raise ValueError(f"request {req.request_id!r} is not waiting or running "
                             f"(state {req.state.value})")
        if req.state is RequestState.WAITING:
            self._waiting.remove(req)
        else:
            self._running.remove(req)
            self.prefix_cache.release(req.pages)
            req.pages = []
        req.finish_reason = reason
        self._finish(req)

    def _finish(self, req: Request) -> None:
        req.state = RequestState.FINISHED
        self._ids.discard(req.request_id)
        self._stats.finished_requests += 1

    def _append(self, req: Request, token: int, stop: bool) -> bool:
        """Append a sampled token; finish and release the request if done. True if finished."""
        req.token_ids.append(token)
        self._stats.generated_tokens += 1
        if stop:
            req.finish_reason = "stop"
        elif len(req.token_ids) - len(req.prompt) == req.max_new_tokens:
            req.finish_reason = "length"
        else:
            return False
        self._running.remove(req)
        self.prefix_cache.release(req.pages)
        req.pages = []
        self._finish(req)
        return True
