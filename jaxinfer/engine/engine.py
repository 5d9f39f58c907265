"""The continuous-batching engine: `Engine(model, EngineConfig)`, `.stream`, `.generate`, `.abort`.

One host loop (`Engine.stream`, a generator; `generate` consumes it): feed prompts to the
`Scheduler` (lazily: its queue holds at most max_seqs waiting requests, so memory does not grow
with the number of prompts), plan a step, run it on device (`StepProgram`: one model pass over
the packed tokens with per-request sampling, or, for a decode-only stretch, the on-device
`decode_loop` of up to `EngineConfig.steps_per_call` steps over pages the scheduler reserved
ahead), hand the sampled tokens back, and yield one `TokenEvent` per request that produced tokens.
Stop tokens and non-finite logits are decided from the step's tokens (on device inside the loop,
on the host for `Scheduler.update`); max_new_tokens is the scheduler's.

`abort(index, reason)` may be called by a consumer while it iterates a stream (between events):
the request's pages and slot are freed and its final event (finish_reason = reason) is the next
one yielded. Closing a stream early (`close()`, `break` out of a `with closing(...)`) aborts every
unfinished request of it. One stream runs per engine at a time.

The scheduler, its prefix cache and the device pool persist across calls of one engine (a later
call can hit an earlier call's prefixes); any error inside a call resets all three, so no request
of a failed call survives into the next.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer import validation
from jaxinfer.engine.config import EngineConfig, EngineResult
from jaxinfer.engine.device import PagedKV, StepOutput, step_inputs
from jaxinfer.engine.groups import new_scheduler
from jaxinfer.engine.loop import StepProgram, num_groups
from jaxinfer.engine.pages import pages_for_tokens
from jaxinfer.engine.plan import Request, RequestState, StepPlan, token_bucket
from jaxinfer.engine.run import Collector, Run, TokenEvent, Track, check_params
from jaxinfer.generate import seed_halves
from jaxinfer.model import Runtime
from jaxinfer.sampling import SamplingParams, stack_configs
from jaxinfer.sharding import PhaseSharding


class Engine:
    """Continuous batching over a paged KV cache for one `jaxinfer.Model`: on one device, or,
    for a model loaded with a plan, under the plan's decode layout (every step, prefill chunks
    included: `loop.StepProgram`). Attention sharded over heads splits the pool over KV heads;
    sharded over the batch (pope2022.md §6.2b) it splits the slots, the token budget and the
    pool into one group per attention batch shard (`groups.GroupedScheduler`), each chip
    holding its group's pool segment and attending its group's tokens. Weight-gathered layouts
    (§5.3) split the residual's batch over the gathered axes too: each chip runs its groups'
    tokens through every layer (weights all-gathered per step) and samples its own slots."""

    def __init__(self, model, config: EngineConfig | None = None):
        """model: a `jaxinfer.Model` (with a plan: max_seqs must divide into the slot groups of
        its decode layout, else an InvalidArgument); config: default EngineConfig()."""
        if config is None:
            config = EngineConfig()
        if not isinstance(config, EngineConfig):
            raise validation.fail("config", config, "an EngineConfig or None")
        self.model, self.config, self.cfg = model, config, model.config
        self.max_model_len = config.max_model_len or self.cfg.max_context
        if self.max_model_len > self.cfg.max_context:
            raise validation.InvalidArgument(
                f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's "
                f"max_context={self.cfg.max_context}")
        sharding = model.shardings[1] if model.plan is not None else PhaseSharding.single_device()
        rt = Runtime(sharding, model.attention_backend, model.quantization)
        self.groups = num_groups(rt)
        if config.max_seqs % self.groups:
            raise validation.InvalidArgument(
                f"EngineConfig.max_seqs={config.max_seqs} must be divisible by the "
                f"{self.groups} slot groups of this plan's decode layout "
                f"({sharding.description}: one group per attention batch shard)")
        self.num_pages = self._pool_pages()
        abstract_pool = jax.eval_shape(lambda: PagedKV.init(self.cfg, self.num_pages,
                                                            config.page_size, model.cache_dtype))
        try:
            self.program = StepProgram(self.cfg, rt, abstract_pool)
        except ValueError as err:
            raise validation.InvalidArgument(str(err)) from None
        self._calls = 0
        self._active: Run | None = None
        self._reset()

    def _pool_pages(self) -> int:
        """Pages of the pool: as many as its bytes hold, a multiple of the slot groups."""
        c = self.config
        page_bytes = PagedKV.bytes_per_page(self.cfg, c.page_size, self.model.cache_dtype)
        full = c.max_seqs * pages_for_tokens(self.max_model_len, c.page_size)
        pages = c.kv_pool_bytes(full * page_bytes) // page_bytes // self.groups * self.groups
        if pages < 1:
            raise validation.InvalidArgument(
                f"EngineConfig.kv_cache_bytes={c.kv_cache_bytes} holds no page"
                f"{'' if self.groups == 1 else f' for each of the {self.groups} slot groups'}: "
                f"one page of {c.page_size} tokens takes {page_bytes} bytes")
        return pages

    def _reset(self) -> None:
        """A fresh scheduler (empty prefix cache), pool and seen table."""
        c = self.config
        self.scheduler = new_scheduler(self.config, self.num_pages, self.max_model_len,
                                       self.groups)
        # placed on the parameters' mesh as the programs return them, so the step's outputs,
        # which the next step takes, have the same input types as these (no second compile)
        mesh = self.program.rt.sharding.mesh
        self.kv = jax.device_put(
            PagedKV.init(self.cfg, self.num_pages, c.page_size, self.model.cache_dtype),
            jax.tree.map(lambda spec: NamedSharding(mesh, spec), self.program.kv_specs,
                         is_leaf=lambda x: isinstance(x, PartitionSpec)))
        self.seen = jax.device_put(jnp.zeros((c.max_seqs, self.cfg.vocab_size), bool),
                                   NamedSharding(mesh, self.program.seen_spec))
        self._seen_rows: dict[Request, int] = {}

    def compiled_hlo(self, num_seqs: int | None = None, context: int = 32) -> str:
        """The optimized HLO (`compiled.as_text()`) of the program one engine step runs (one
        device call of one step: greedy, no top logprobs) when `num_seqs` sequences (default
        max_seqs) decode with `context` tokens cached each: the step a fresh scheduler of this
        config plans for them, compiled with the engine's shardings (what `partitioning.audit`
        compares with the plan's priced decode step of that many tokens)."""
        num_seqs = self.config.max_seqs if num_seqs is None else num_seqs
        if not 1 <= num_seqs <= self.config.max_seqs or not 1 <= context < self.max_model_len:
            raise validation.InvalidArgument(
                f"compiled_hlo needs 1 <= num_seqs <= max_seqs={self.config.max_seqs} and "
                f"1 <= context < max_model_len={self.max_model_len}, got {num_seqs}, {context}")
        sched = new_scheduler(self.config, self.num_pages, self.max_model_len, self.groups)
        for i in range(num_seqs):
            sched.add_request(i, [0] * context, 2)
        plan = sched.schedule()
        while plan.num_decode_seqs < plan.num_seqs:  # prefill the prompts (no device)
            sched.update(plan, np.zeros(plan.num_seqs, np.int64), np.zeros(plan.num_seqs, bool))
            plan = sched.schedule()
        s = self.config.max_seqs
        sp = stack_configs([SamplingParams().config()] * s, self.cfg.vocab_size)
        inputs = step_inputs(plan, np.full(s, s, np.int32), np.zeros((s, 2), np.uint32),
                             np.zeros(s, np.int32))
        return self.program.step.lower(self.model.params, self.kv, self.seen, inputs, sp,
                                       num_top=0).compile().as_text()

    # ----------------------------------------------------------------------------- requests
    def _encode(self, prompts) -> list[list[int]]:
        prompts = validation.prompts(prompts)
        if isinstance(prompts[0], str):
            if self.model.tokenizer is None:
                raise validation.InvalidArgument(
                    "text prompts need a tokenizer, and this model has none: pass token ids")
            prompts = [self.model.tokenizer.encode(p) for p in prompts]
        validation.ids_in_vocab(prompts, self.cfg.vocab_size, item="prompts[{i}]")
        return prompts

    def _validate(self, plist: list[SamplingParams], prompts: list[list[int]]) -> None:
        """Every request's parameters against the vocabulary and the pool (before any runs)."""
        vocab = self.cfg.vocab_size
        for i, (p, prompt) in enumerate(zip(plist, prompts)):
            p.config().validate(vocab)
            bad = [t for t in self._stops(p) if not 0 <= t < vocab]
            if bad:
                raise validation.InvalidArgument(
                    f"params[{i}].stop_tokens has {bad[0]}, outside the vocabulary [0, {vocab})")
            self.scheduler.check_fits((self._calls + 1, i), len(prompt), p.max_new_tokens)

    def _stops(self, p: SamplingParams) -> tuple[int, ...]:
        return self.cfg.eos_token_ids if p.stop_tokens is None else p.stop_tokens

    def _feed(self, run: Run) -> None:
        """Hand prompts to the scheduler while fewer than max_seqs requests wait."""
        while run.unfed and self.scheduler.num_waiting < self.config.max_seqs:
            i, run.next_prompt = run.next_prompt, run.next_prompt + 1
            if i in run.skip:
                continue
            p = run.plist[i]
            req = self.scheduler.add_request((run.call, i), run.prompts[i], p.max_new_tokens)
            run.live[i] = Track(index=i, request=req, stops=frozenset(self._stops(p)),
                                seed=seed_halves(run.seed if p.seed is None else p.seed),
                                penalty=p.repetition_penalty is not None, num_top=p.logprobs)

    # ----------------------------------------------------------------------------- the loop
    def stream(self, prompts, params=None, *, seed: int = 0) -> Iterator[TokenEvent]:
        """An iterator of `TokenEvent`s, in the order tokens are produced, for every prompt
        (token-id lists, or text with a tokenizer); params: None (defaults), one `SamplingParams`
        for all, or one per prompt; `seed` is the seed of the requests whose params.seed is
        None. Arguments are checked here; the work runs as the iterator is consumed."""
        return self._events(self._begin(prompts, params, seed))

    def generate(self, prompts, params=None, *, seed: int = 0) -> EngineResult:
        """Generate for every prompt (arguments as `stream`, which this consumes). Results in
        prompt order, with `EngineStats`; non-finite logits raise `NonFiniteLogitsError`."""
        run = self._begin(prompts, params, seed)
        collector = Collector(run.plist)
        with contextlib.closing(self._events(run)) as events:
            for event in events:
                collector.add(event)
        stats = run.stats(self.scheduler.stats, time.perf_counter() - run.start)
        return collector.result(stats, self.model.tokenizer)

    def abort(self, index: int, reason: str = "abort") -> None:
        """End request `index` of the stream being iterated: its pages and slot are freed, and
        its final event (with the tokens produced and not yet yielded, finish_reason `reason`,
        e.g. 'stop' for a stop string) is the next event the stream yields (after those of
        earlier aborts)."""
        run = self._active
        if run is None:
            raise validation.InvalidArgument("abort(index) needs a stream being iterated on "
                                             "this engine, and none is")
        index = validation.integer("index", index, 0, len(run.prompts) - 1)
        if not isinstance(reason, str) or not reason:
            raise validation.fail("reason", reason, "a non-empty str")
        if index in run.delivered:
            raise validation.InvalidArgument(
                f"abort: request {index} already finished (its final event was yielded)")
        track = run.live.pop(index, None)
        if track is not None and track.request.state is not RequestState.FINISHED:
            self.scheduler.abort(track.request, reason)
        if index >= run.next_prompt:
            run.skip.add(index)
        run.abort_event(index, reason)

    def _begin(self, prompts, params, seed) -> Run:
        prompts = self._encode(prompts)
        plist = check_params(params, len(prompts))
        seed = validation.seed(seed)
        self._validate(plist, prompts)
        self._calls += 1
        return Run(prompts, plist, seed, self._calls, self.scheduler.stats)

    def _events(self, run: Run) -> Iterator[TokenEvent]:
        if self._active is not None:
            raise RuntimeError("another stream of this engine is still open: exhaust or close() "
                               "it before starting the next")
        self._active = run
        run.start = time.perf_counter()
        sp_all = stack_configs([p.config() for p in run.plist], self.cfg.vocab_size)
        try:
            while True:
                event = run.next_event()
                while event is not None:
                    yield event
                    event = run.next_event()
                self._feed(run)
                if not self.scheduler.has_unfinished:
                    break
                run.queue.extend(self._call(run, sp_all))
        except GeneratorExit:
            for track in run.live.values():
                if track.request.state is not RequestState.FINISHED:
                    self.scheduler.abort(track.request)
            raise
        except BaseException:
            self._reset()
            raise
        finally:
            self._active = None

    def _call(self, run: Run, sp_all) -> list[TokenEvent]:
        """One device call: plan, run (one step or the decode loop), update; its events."""
        plan = self.scheduler.schedule(lookahead=self.config.steps_per_call)
        slots = [run.live[rid[1]] for rid in plan.request_ids]
        inputs, sp = self._inputs(plan, slots, sp_all)
        t0 = time.perf_counter()
        if self.config.steps_per_call > 1 and int(plan.step_limits.max()) > 1:
            stops = self._stop_table(plan, slots)
            n, out, self.kv, self.seen = self.program.loop(
                self.model.params, self.kv, self.seen, inputs, sp, plan.step_limits, stops,
                num_top=run.num_top, max_steps=self.config.steps_per_call)
            n, out = _fetch((n, out))
        else:
            out, self.kv, self.seen = self.program.step(
                self.model.params, self.kv, self.seen, inputs, sp, num_top=run.num_top)
            n, out = 1, jax.tree.map(lambda a: a[None], _fetch(out))
        cols = np.asarray(plan.slots, np.int64)  # device slots -> the plan's sequence order
        out = jax.tree.map(lambda a: a[:int(n), cols], out)
        now = time.perf_counter()
        run.device_s += now - t0
        run.device_calls += 1
        flags = self._flags(plan, slots, out)
        multi = len(out.tokens) > 1
        self.scheduler.update(plan, out.tokens if multi else out.tokens[0],
                              flags if multi else flags[0])
        return self._step_events(run, plan, slots, out, now - run.start)

    def _flags(self, plan: StepPlan, slots: list[Track], out: StepOutput) -> np.ndarray:
        """bool [n, num_seqs]: the sequence finished at that row (stop token or non-finite
        logits)."""
        flags = np.zeros(out.tokens.shape, bool)
        for slot, t in enumerate(slots):
            if plan.samples[slot]:
                stop = np.isin(out.tokens[:, slot], list(t.stops)) if t.stops else False
                flags[:, slot] = stop | ~out.finite[:, slot]
                t.error = t.error or not out.finite[:, slot].all()
        return flags

    def _step_events(self, run: Run, plan: StepPlan, slots: list[Track], out: StepOutput,
                     now: float) -> list[TokenEvent]:
        events = []
        for slot, t in enumerate(slots):
            if not plan.samples[slot]:
                continue
            req, n = t.request, len(out.tokens)
            reason = None
            if req.state is RequestState.FINISHED:
                reason = "error" if t.error else req.finish_reason
                del run.live[t.index]
            top = None if t.num_top is None else tuple(
                tuple(zip(out.top_ids[j, slot, :t.num_top].tolist(),
                          out.top_logprobs[j, slot, :t.num_top].tolist())) for j in range(n))
            events.append(TokenEvent(
                index=t.index, token_ids=tuple(out.tokens[:, slot].tolist()),
                logprobs=tuple(out.logprobs[:, slot].tolist()), finish_reason=reason,
                top_logprobs=top))
            run.note_tokens(t.index, n, now)
        return events

    def _stop_table(self, plan: StepPlan, slots: list[Track]) -> np.ndarray:
        """int32 [S, W]: each device slot's stop ids, padded with -1 (W a power of two >= 1)."""
        width = token_bucket(max((len(t.stops) for t in slots), default=1), 1)
        table = np.full((self.config.max_seqs, width), -1, np.int32)
        for slot, t in zip(plan.slots, slots):
            table[slot, :len(t.stops)] = sorted(t.stops)
        return table

    def _inputs(self, plan: StepPlan, slots: list[Track], sp_all):
        s = self.config.max_seqs
        seeds = np.zeros((s, 2), np.uint32)
        token_index = np.zeros(s, np.int32)
        index = np.zeros(s, np.int64)
        for slot, t in zip(plan.slots, slots):
            seeds[slot], index[slot] = t.seed, t.index
            token_index[slot] = len(t.request.output)
        rows = self._seen_rows_for(plan, slots)
        sp = jax.tree.map(lambda a: a[index], sp_all)
        return step_inputs(plan, rows, seeds, token_index), sp

    def _seen_rows_for(self, plan: StepPlan, slots: list[Track]) -> np.ndarray:
        """Seen-table rows of the device slots: penalty requests keep a row while running (a row is
        filled with the request's tokens when it is (re)admitted); others get max_seqs."""
        s = self.config.max_seqs
        for req in [r for r in self._seen_rows if r.state is not RequestState.RUNNING]:
            del self._seen_rows[req]
        rows = np.full(s, s, np.int32)
        for slot, t in zip(plan.slots, slots):
            if not t.penalty:
                continue
            block = self._group_rows(slot)
            if self._seen_rows.get(t.request) not in block:  # new, or moved to another group
                self._seen_rows.pop(t.request, None)
                self._seen_rows[t.request] = self._fill_row(t.request, block)
            rows[slot] = self._seen_rows[t.request]
        return rows

    def _group_rows(self, slot: int) -> range:
        """The seen-table rows of a device slot's group (its block of max_seqs / G rows: the
        table is split like the slots, `StepProgram.seen_spec`)."""
        per_group = self.config.max_seqs // self.groups
        first = slot // per_group * per_group
        return range(first, first + per_group)

    def _fill_row(self, req: Request, block: range) -> int:
        row = min(set(block) - set(self._seen_rows.values()))
        ids = req.token_ids
        padded = np.zeros(token_bucket(len(ids), 16), np.int32)
        padded[:len(ids)] = ids
        self.seen = self.program.fill_seen(self.seen, np.int32(row), padded, np.int32(len(ids)))
        return row


def _fetch(tree):
    """Device outputs as numpy. Split over processes (a weight-gathered layout across hosts),
    an array is gathered from every process (each process calls this at the same point)."""
    def one(a):
        if getattr(a, "is_fully_addressable", True) or a.is_fully_replicated:
            return np.asarray(jax.device_get(a))
        return multihost_utils.process_allgather(a, tiled=True)
    return jax.tree.map(one, tree)
