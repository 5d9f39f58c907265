"""One engine call's bookkeeping: the stream's events, per-request tracks, the result.

`Engine.stream` yields `TokenEvent`s; `Engine.generate` consumes the same stream and assembles an
`EngineResult` with `Collector`. A `Run` holds what one call needs between device calls: the
prompts not yet handed to the scheduler (they are added lazily, so the scheduler's queue stays
bounded by max_seqs however many prompts a call has), the tracks of the requests handed over and
not finished, per-prompt timing arrays, and the events not yet yielded (aborted requests' final
events first, then the last device call's).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxinfer import validation
from jaxinfer.engine.config import EngineResult, EngineStats
from jaxinfer.engine.plan import Request, SchedulerStats
from jaxinfer.generate import NonFiniteLogitsError
from jaxinfer.sampling import SamplingParams

TopLogprobs = tuple[tuple[int, float], ...]
"""The (token id, raw logprob) alternatives of one generated token, most likely first."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """Tokens one request produced in one device call (`Engine.stream` yields these in the order
    the tokens were produced; joined per index they are the request's whole output)."""

    index: int
    """Position of the request's prompt in the call."""
    token_ids: tuple[int, ...]
    """The new tokens (several when the device ran a multi-step decode loop; empty in the final
    event of a request aborted before producing more)."""
    logprobs: tuple[float, ...]
    """Raw log-probability of each new token."""
    finish_reason: str | None
    """None until the request's last event; then 'stop' (a stop token, included in token_ids),
    'length' (max_new_tokens reached), 'error' (non-finite logits) or the reason given to
    `Engine.abort` ('abort' by default). Each request has exactly one event with a reason."""
    top_logprobs: tuple[TopLogprobs, ...] | None = None
    """Per new token its params.logprobs most likely alternatives; None when params.logprobs is
    None."""


@dataclasses.dataclass(eq=False)
class Track:
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
    num_top: int | None
    """params.logprobs: top alternatives per token, or None."""
    error: bool = False
    """Its logits were not finite (finished with reason 'error')."""


def check_params(params, n: int) -> list[SamplingParams]:
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


class Run:
    """What one `stream`/`generate` call keeps between device calls."""

    def __init__(self, prompts: list[list[int]], plist: list[SamplingParams], seed: int,
                 call: int, before: SchedulerStats):
        n = len(prompts)
        self.prompts, self.plist, self.seed, self.call, self.before = (prompts, plist, seed,
                                                                       call, before)
        self.num_top = max((p.logprobs or 0 for p in plist), default=0)
        self.next_prompt = 0
        self.live: dict[int, Track] = {}
        self.skip: set[int] = set()
        self.delivered: set[int] = set()
        self.queue: collections.deque[TokenEvent] = collections.deque()
        self.finals: collections.deque[TokenEvent] = collections.deque()
        self.first_s = np.full(n, math.nan)
        self.last_s = np.full(n, math.nan)
        self.counts = np.zeros(n, np.int64)
        self.start = 0.0
        self.device_s = 0.0
        self.device_calls = 0

    @property
    def unfed(self) -> bool:
        """Whether some prompt has not been handed to the scheduler yet."""
        return self.next_prompt < len(self.prompts)

    def note_tokens(self, index: int, count: int, now: float) -> None:
        """`count` tokens of request `index` arrived at `now` (seconds since the start)."""
        if math.isnan(self.first_s[index]):
            self.first_s[index] = now
        self.last_s[index] = now
        self.counts[index] += count

    def next_event(self) -> TokenEvent | None:
        """The next event to yield (aborted requests' final events first), or None."""
        source = self.finals or self.queue
        if not source:
            return None
        event = source.popleft()
        if event.finish_reason is not None:
            self.delivered.add(event.index)
        return event

    def abort_event(self, index: int, reason: str) -> None:
        """Take the queued, undelivered event of `index` (if any) and queue its final event with
        `reason` (its tokens kept) after earlier aborts, before every other event."""
        mine = [e for e in self.queue if e.index == index]
        for e in mine:
            self.queue.remove(e)
        top = None if self.plist[index].logprobs is None else sum(
            (e.top_logprobs for e in mine), ())
        self.finals.append(TokenEvent(
            index=index, token_ids=sum((e.token_ids for e in mine), ()),
            logprobs=sum((e.logprobs for e in mine), ()), finish_reason=reason,
            top_logprobs=top))

    def stats(self, after: SchedulerStats, wall: float) -> EngineStats:
        """The call's `EngineStats` (scheduler counters since `before`)."""
        diff = lambda name: getattr(after, name) - getattr(self.before, name)
        generated = diff("generated_tokens")
        nan_none = lambda x: None if math.isnan(x) else float(x)
        tpot = tuple(None if c < 2 else float((last - first) / (c - 1))
                     for c, first, last in zip(self.counts, self.first_s, self.last_s))
        return EngineStats(
            requests=len(self.prompts), prompt_tokens=diff("prompt_tokens"),
            prefill_tokens=diff("prefill_tokens"), prefix_hit_tokens=diff("prefix_hit_tokens"),
            generated_tokens=generated, preemptions=diff("preemptions"), steps=diff("steps"),
            device_calls=self.device_calls, wall_s=wall, device_s=self.device_s,
            tokens_per_s=generated / wall if wall > 0 else 0.0,
            host_s_per_token=(wall - self.device_s) / generated if generated else 0.0,
            ttft_s=tuple(nan_none(x) for x in self.first_s), tpot_s=tpot)


class Collector:
    """Joins a stream's events per prompt into an `EngineResult` (what `generate` returns)."""

    def __init__(self, plist: list[SamplingParams]):
        n = len(plist)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.top: list[list[TopLogprobs] | None] = [
            None if p.logprobs is None else [] for p in plist]
        self.reasons: list[str | None] = [None] * n

    def add(self, event: TokenEvent) -> None:
        self.tokens[event.index].extend(event.token_ids)
        self.logprobs[event.index].extend(event.logprobs)
        if event.top_logprobs is not None:
            self.top[event.index].extend(event.top_logprobs)
        self.reasons[event.index] = event.finish_reason

    def result(self, stats: EngineStats, tokenizer) -> EngineResult:
        """The result; raises `NonFiniteLogitsError` (carrying it) if a request hit non-finite
        logits."""
        text = None if tokenizer is None else [tokenizer.decode(t) for t in self.tokens]
        result = EngineResult(
            tokens=self.tokens, logprobs=self.logprobs, finish_reasons=list(self.reasons),
            text=text, timings={"wall_s": stats.wall_s, "device_s": stats.device_s},
            stats=stats, top_logprobs=self.top)
        bad = [i for i, r in enumerate(self.reasons) if r == "error"]
        if bad:
            raise NonFiniteLogitsError(f"the model produced non-finite logits (prompts {bad}); "
                                       "those requests stopped (finish_reason 'error')", result)
        return result
