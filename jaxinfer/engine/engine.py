"""The continuous-batching engine: `Engine(model, EngineConfig).generate(prompts, params)`.

The host loop is schedule -> device step -> update until every request is done: the `Scheduler`
plans a decode-maximal step over the paged pool (chunked prefill, prefix hits, preemption by
recompute), `StepProgram` runs it on device (one model pass over the packed tokens, sampling per
request), and the sampled tokens go back to the scheduler. Stop tokens and non-finite logits are
decided on the host from the step's tokens (flags to `Scheduler.update`); max_new_tokens is the
scheduler's. One step per device call (the scheduler is synchronous; no multi-step lookahead).

The scheduler, its prefix cache and the device pool persist across calls of one engine (a later
call can hit an earlier call's prefixes); any error inside a call resets all three, so no request
of a failed call survives into the next.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import validation
from jaxinfer.engine.config import EngineConfig, EngineResult, EngineStats
from jaxinfer.engine.device import PagedKV, StepProgram, step_inputs
from jaxinfer.engine.pages import pages_for_tokens
from jaxinfer.engine.plan import Request, RequestState, StepPlan, token_bucket
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.generate import NonFiniteLogitsError, seed_halves
from jaxinfer.model import Runtime
from jaxinfer.sampling import SamplingParams, stack_configs
from jaxinfer.sharding import PhaseSharding


@dataclasses.dataclass(eq=False)
class _Track:
    """The engine's per-request state beside the scheduler's `Request`."""

    index: int
    """Position of the prompt in the call."""
    request: Request
    """The scheduler's request."""
    stops: frozenset[int]
    """Stop token ids."""
    seed: np.ndarray
    """uint32 [2]: the request's seed halves."""
    penalty: bool
    """Whether the request uses the repetition penalty (needs a seen-table row)."""
    logprobs: list[float] = dataclasses.field(default_factory=list)
    """Raw logprob of each generated token."""
    first_s: float | None = None
    """Time (from the call's start) of the first generated token."""
    last_s: float | None = None
    """Time of the latest generated token."""
    error: bool = False
    """Its logits were not finite (finished with reason 'error')."""


def _check_params(params, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt from None, one SamplingParams, or a sequence of n."""
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise validation.fail("params", params,
                              "None, a SamplingParams or a list of one SamplingParams per prompt")
    if len(params) != n:
        raise validation.InvalidArgument(
            f"params must hold one SamplingParams per prompt: got {len(params)} for {n} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise validation.fail(f"params[{i}]", p, "a SamplingParams")
    return list(params)


class Engine:
    """Continuous batching over a paged KV cache for one `jaxinfer.Model` on one device."""

    def __init__(self, model, config: EngineConfig | None = None):
        """model: a `jaxinfer.Model` without a partitioning plan; config: default EngineConfig()."""
        if config is None:
            config = EngineConfig()
        if not isinstance(config, EngineConfig):
            raise validation.fail("config", config, "an EngineConfig or None")
        if model.plan is not None:
            raise validation.InvalidArgument(
                "the engine runs on one device: a model loaded with plan= is not supported yet")
        self.model, self.config, self.cfg = model, config, model.config
        self.max_model_len = config.max_model_len or self.cfg.max_context
        if self.max_model_len > self.cfg.max_context:
            raise validation.InvalidArgument(
                f"EngineConfig.max_model_len={self.max_model_len} exceeds the model's "
                f"max_context={self.cfg.max_context}")
        page_bytes = PagedKV.bytes_per_page(self.cfg, config.page_size, model.cache_dtype)
        full = config.max_seqs * pages_for_tokens(self.max_model_len, config.page_size)
        self.num_pages = config.kv_pool_bytes(full * page_bytes) // page_bytes
        if self.num_pages < 1:
            raise validation.InvalidArgument(
                f"EngineConfig.kv_cache_bytes={config.kv_cache_bytes} holds no page: one page of "
                f"{config.page_size} tokens takes {page_bytes} bytes")
        rt = Runtime(PhaseSharding.single_device(), model.attention_backend, model.quantization)
        self.program = StepProgram(self.cfg, rt)
        self._calls = 0
        self._reset()

    def _reset(self) -> None:
        """A fresh scheduler (empty prefix cache), pool and seen table."""
        c = self.config
        self.scheduler = Scheduler(
            max_seqs=c.max_seqs, page_size=c.page_size, num_pages=self.num_pages,
            token_budget=c.token_budget, max_prefill_chunk=c.max_prefill_chunk or c.token_budget,
            max_model_len=self.max_model_len, prefix_caching=c.prefix_caching,
            min_token_bucket=c.min_token_bucket)
        self.kv = PagedKV.init(self.cfg, self.num_pages, c.page_size, self.model.cache_dtype)
        self.seen = jnp.zeros((c.max_seqs, self.cfg.vocab_size), bool)
        self._seen_rows: dict[Request, int] = {}

    # ----------------------------------------------------------------------------- requests
    def _encode(self, prompts) -> list[list[int]]:
        prompts = validation.prompts(prompts)
        if isinstance(prompts[0], str):
            if self.model.tokenizer is None:
                raise validation.InvalidArgument(
                    "text prompts need a tokenizer, and this model has none: pass token ids")
            prompts = [self.model.tokenizer.encode(p) for p in prompts]
        vocab = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise validation.InvalidArgument(
                    f"prompts[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab})")
        return prompts

    def _track(self, i: int, prompt: list[int], p: SamplingParams, seed: int) -> _Track:
        vocab = self.cfg.vocab_size
        p.config().validate(vocab)
        stops = self.cfg.eos_token_ids if p.stop_tokens is None else p.stop_tokens
        bad = [t for t in stops if not 0 <= t < vocab]
        if bad:
            raise validation.InvalidArgument(
                f"params[{i}].stop_tokens has {bad[0]}, outside the vocabulary [0, {vocab})")
        req = self.scheduler.add_request((self._calls, i), prompt, p.max_new_tokens)
        return _Track(index=i, request=req, stops=frozenset(stops),
                      seed=seed_halves(seed if p.seed is None else p.seed),
                      penalty=p.repetition_penalty is not None)

    # ----------------------------------------------------------------------------- generate
    def generate(self, prompts, params=None, *, seed: int = 0) -> EngineResult:
        """Generate for every prompt (token-id lists, or text with a tokenizer); params: None
        (defaults), one `SamplingParams` for all, or one per prompt; `seed` is the seed of the
        requests whose params.seed is None. Results in prompt order, with `EngineStats`."""
        prompts = self._encode(prompts)
        plist = _check_params(params, len(prompts))
        seed = validation.seed(seed)
        self._calls += 1
        try:
            return self._run(prompts, plist, seed)
        except BaseException:
            self._reset()
            raise

    def _run(self, prompts, plist, seed) -> EngineResult:
        before = self.scheduler.stats
        tracks = [self._track(i, p, sp, seed) for i, (p, sp) in enumerate(zip(prompts, plist))]
        by_request = {t.request: t for t in tracks}
        sp_all = stack_configs([p.config() for p in plist], self.cfg.vocab_size)
        start = time.perf_counter()
        device_s = 0.0
        while self.scheduler.has_unfinished:
            plan = self.scheduler.schedule()
            slots = [by_request[r] for r in self._slot_requests(plan)]
            inputs, sp = self._inputs(plan, slots, sp_all)
            t0 = time.perf_counter()
            tokens, logprobs, finite, self.kv, self.seen = self.program.step(
                self.model.params, self.kv, self.seen, inputs, sp)
            tokens, logprobs, finite = jax.device_get((tokens, logprobs, finite))
            now = time.perf_counter()
            device_s += now - t0
            flags = self._record(plan, slots, tokens, logprobs, finite, now - start)
            self.scheduler.update(plan, tokens, flags)
        wall = time.perf_counter() - start
        return self._result(tracks, before, wall, device_s)

    def _slot_requests(self, plan: StepPlan) -> list[Request]:
        """The requests of the plan's slots (the scheduler's running set, matched by id)."""
        by_id = {r.request_id: r for r in self.scheduler.running()}
        return [by_id[rid] for rid in plan.request_ids]

    def _inputs(self, plan: StepPlan, slots: list[_Track], sp_all):
        s = self.config.max_seqs
        seeds = np.zeros((s, 2), np.uint32)
        token_index = np.zeros(s, np.int32)
        index = np.zeros(s, np.int64)
        for slot, t in enumerate(slots):
            seeds[slot], index[slot] = t.seed, t.index
            token_index[slot] = len(t.request.output)
        rows = self._seen_rows_for(slots)
        sp = jax.tree.map(lambda a: a[index], sp_all)
        return step_inputs(plan, rows, seeds, token_index), sp

    def _seen_rows_for(self, slots: list[_Track]) -> np.ndarray:
        """Seen-table rows of the slots: penalty requests keep a row while running (a row is
        filled with the request's tokens when it is (re)admitted); others get max_seqs."""
        s = self.config.max_seqs
        for req in [r for r in self._seen_rows if r.state is not RequestState.RUNNING]:
            del self._seen_rows[req]
        rows = np.full(s, s, np.int32)
        for slot, t in enumerate(slots):
            if not t.penalty:
                continue
            if t.request not in self._seen_rows:
                self._seen_rows[t.request] = self._fill_row(t.request)
            rows[slot] = self._seen_rows[t.request]
        return rows

    def _fill_row(self, req: Request) -> int:
        row = min(set(range(self.config.max_seqs)) - set(self._seen_rows.values()))
        ids = req.token_ids
        padded = np.zeros(token_bucket(len(ids), 16), np.int32)
        padded[:len(ids)] = ids
        self.seen = self.program.fill_seen(self.seen, np.int32(row), padded, np.int32(len(ids)))
        return row

    def _record(self, plan: StepPlan, slots, tokens, logprobs, finite, now: float) -> np.ndarray:
        """Note each sampled token's logprob and time; the finished flags (stop or error)."""
        flags = np.zeros(self.config.max_seqs, bool)
        for slot, t in enumerate(slots):
            if not plan.samples[slot]:
                continue
            t.logprobs.append(float(logprobs[slot]))
            t.first_s = now if t.first_s is None else t.first_s
            t.last_s = now
            t.error = not finite[slot]
            flags[slot] = t.error or int(tokens[slot]) in t.stops
        return flags

    def _result(self, tracks: list[_Track], before, wall: float, device_s: float) -> EngineResult:
        after = self.scheduler.stats
        diff = lambda name: getattr(after, name) - getattr(before, name)
        generated = diff("generated_tokens")
        tpot = tuple(None if len(t.logprobs) < 2 else
                     (t.last_s - t.first_s) / (len(t.logprobs) - 1) for t in tracks)
        stats = EngineStats(
            requests=len(tracks), prompt_tokens=diff("prompt_tokens"),
            prefill_tokens=diff("prefill_tokens"), prefix_hit_tokens=diff("prefix_hit_tokens"),
            generated_tokens=generated, preemptions=diff("preemptions"), steps=diff("steps"),
            wall_s=wall, device_s=device_s, tokens_per_s=generated / wall,
            host_s_per_token=(wall - device_s) / generated,
            ttft_s=tuple(t.first_s for t in tracks), tpot_s=tpot)
        tokenizer = self.model.tokenizer
        result = EngineResult(
            tokens=[t.request.output for t in tracks], logprobs=[t.logprobs for t in tracks],
            finish_reasons=["error" if t.error else t.request.finish_reason for t in tracks],
            text=None if tokenizer is None else [tokenizer.decode(t.request.output)
                                                 for t in tracks],
            timings={"wall_s": wall, "device_s": device_s}, stats=stats)
        bad = [t.index for t in tracks if t.error]
        if bad:
            raise NonFiniteLogitsError(f"the model produced non-finite logits (prompts {bad}); "
                                       "those requests stopped (finish_reason 'error')", result)
        return result
