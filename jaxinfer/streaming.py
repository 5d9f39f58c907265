"""Streaming generation: text deltas as tokens are produced, stop strings, n samples per prompt.

`EventStream(engine, prompts, params, options, seed)` runs the continuous-batching engine
(`Engine.stream`) and turns its token events into `StreamEvent`s with text: each request's text
goes through a `Tokenizer.incremental` decoder (a delta never splits a multi-byte UTF-8
character) and, when it has stop strings, a `StopStrings` matcher, which holds back the few
characters that could begin a stop string. A request whose text reaches a stop string is aborted
in the engine (it stops consuming compute) and finishes with reason "stop"; its text ends before
the stop string (or after it, with `include_stop_str_in_output`), its tokens end with the token
that completed it.

`n` samples of one prompt are n engine requests whose seeds are the prompt's seed + 0, 1, ...,
n - 1 (mod 2**63): sample 0 is what n=1 gives, and every sample is reproducible on its own (a
batch-mode rerun regenerates exactly the samples it lacks). Results are flattened prompt-major:
result index = prompt index * n + sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from jaxinfer import validation
from jaxinfer.generate import GenerationResult, NonFiniteLogitsError
from jaxinfer.sampling import SamplingParams
from jaxinfer.validation import SEED_LIMIT


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """What a request asks beyond `SamplingParams`: stop strings and samples per prompt."""

    stop: tuple[str, ...] = ()
    """Stop strings: the request finishes ("stop") once its text contains one."""
    include_stop_str_in_output: bool = False
    """Keep the stop string at the end of the text (default: cut it)."""
    n: int = 1
    """Completions of the prompt (distinct seeds: see the module docstring)."""

    def __post_init__(self):
        object.__setattr__(self, "stop", validation.stop_strings(self.stop))
        validation.boolean("include_stop_str_in_output", self.include_stop_str_in_output)
        object.__setattr__(self, "n", validation.integer("n", self.n, 1))


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """New output of one result: text and tokens produced since its previous event."""

    index: int
    """The result's position in the flattened results, prompt-major (with one n for every
    prompt, as `Model.stream` has it: prompt_index * n + sample)."""
    prompt_index: int
    """The prompt's position in the call."""
    text: str
    """New text only: "" while bytes of a character are still to come (and always for a model
    without a tokenizer)."""
    token_ids: list[int]
    """New token ids."""
    logprobs: list[float]
    """Logprob of each new token under the model's raw distribution."""
    finish_reason: str | None
    """None until the result's last event: then 'stop' (a stop token or stop string),
    'length' or 'error'."""
    top_logprobs: list | None = None
    """Per new token its (token id, logprob) alternatives, most likely first, when the request
    asked for `SamplingParams.logprobs`; else None."""


@dataclasses.dataclass(frozen=True)
class StreamResult(GenerationResult):
    """A `GenerationResult` of a call with stop strings or n: flattened prompt-major."""

    prompt_index: list[int] | None = None
    """The prompt each result belongs to (result i is sample i % n of prompt i // n)."""
    top_logprobs: list | None = None
    """Per result, per token its (token id, logprob) alternatives (None for a result whose
    request did not ask for `SamplingParams.logprobs`); None when no request asked."""


class StopStrings:
    """Finds the first stop string in a text that arrives in pieces."""

    def __init__(self, stops: Sequence[str], include: bool):
        self.stops, self.include = tuple(stops), include
        self._pending = ""

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string begins with."""
        for k in range(min(len(text), max(len(s) for s in self.stops) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def push(self, text: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was found)."""
        buf = self._pending + text
        hits = [(buf.find(s), -len(s), s) for s in self.stops if s in buf]
        if hits:
            pos, _, stop = min(hits)
            self._pending = ""
            return buf[:pos + len(stop) if self.include else pos], True
        keep = self._held(buf)
        self._pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def finish(self) -> str:
        """The held-back text (the request ended without a stop string)."""
        out, self._pending = self._pending, ""
        return out


def expand(params: Sequence[SamplingParams], options: Sequence[TextOptions],
           seed: int) -> tuple[list[int], list[SamplingParams]]:
    """(prompt index, SamplingParams) of every result: n per prompt, seeds base + sample."""
    owners, flat = [], []
    for i, (p, o) in enumerate(zip(params, options)):
        base = seed if p.seed is None else p.seed
        for j in range(o.n):
            owners.append(i)
            flat.append(dataclasses.replace(p, seed=(base + j) % SEED_LIMIT))
    return owners, flat


class _Output:
    """One result's text state: decoder and stop strings."""

    def __init__(self, tokenizer, options: TextOptions):
        if options.stop and tokenizer is None:
            raise validation.InvalidArgument("stop strings need a tokenizer, and this model has "
                                             "none: use stop_tokens")
        self.decoder = tokenizer.incremental() if tokenizer is not None else None
        self.stops = StopStrings(options.stop, options.include_stop_str_in_output) \
            if options.stop else None

    def push(self, ids: Sequence[int], final: bool) -> tuple[str, int, bool]:
        """(new text, how many of `ids` it covers, whether a stop string ended it). Tokens
        are decoded one at a time, so a stop string cuts the ids right after the one that
        completed it."""
        if self.decoder is None:
            return "", len(ids), False
        if self.stops is None:
            text = self.decoder.push(list(ids))
            return text + (self.decoder.finish() if final else ""), len(ids), False
        out = []
        for k, token in enumerate(ids):
            last = final and k == len(ids) - 1
            piece, stopped = self.stops.push(self.decoder.push([token]) +
                                             (self.decoder.finish() if last else ""))
            out.append(piece)
            if stopped:
                return "".join(out), k + 1, True
        if final:
            out.append(self.stops.finish())
        return "".join(out), len(ids), False


class EventStream:
    """The `StreamEvent`s of one call, in the order the engine produces tokens (iterate once).
    Arguments are checked when it is made; the engine runs as it is iterated."""

    def __init__(self, engine, prompts: list[list[int]], params: Sequence[SamplingParams],
                 options: Sequence[TextOptions], seed: int):
        self._engine, self._seed = engine, seed
        self._owners, self._flat = expand(params, options, seed)
        self._prompts = [prompts[i] for i in self._owners]
        tokenizer = engine.model.tokenizer
        self._outputs = [_Output(tokenizer, options[i]) for i in self._owners]
        self._started = False

    @property
    def count(self) -> int:
        """Results the stream produces (prompts x n)."""
        return len(self._flat)

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._started:
            raise RuntimeError("an EventStream can be iterated only once")
        self._started = True
        done = [False] * self.count
        for ev in self._engine.stream(self._prompts, self._flat, seed=self._seed):
            if done[ev.index]:  # the final event of a request aborted at a stop string
                continue
            text, used, stopped = self._outputs[ev.index].push(ev.token_ids,
                                                               ev.finish_reason is not None)
            if stopped and ev.finish_reason is None:
                self._engine.abort(ev.index)
            reason = "stop" if stopped else ev.finish_reason
            done[ev.index] = reason is not None
            top = None if ev.top_logprobs is None else list(ev.top_logprobs[:used])
            yield StreamEvent(index=ev.index, prompt_index=self._owners[ev.index], text=text,
                              token_ids=list(ev.token_ids[:used]),
                              logprobs=list(ev.logprobs[:used]), finish_reason=reason,
                              top_logprobs=top)


def collect(events: Iterator[StreamEvent], count: int, with_text: bool) -> StreamResult:
    """The `StreamResult` of `count` results' events; `NonFiniteLogitsError` (carrying it) when
    a request hit non-finite logits, as `Model.generate` raises it."""
    tokens = [[] for _ in range(count)]
    logprobs = [[] for _ in range(count)]
    text = ["" for _ in range(count)]
    reasons: list[str | None] = [None] * count
    owners = [0] * count
    top: list[list | None] = [None] * count
    for ev in events:
        if ev.top_logprobs is not None:
            top[ev.index] = (top[ev.index] or []) + ev.top_logprobs
        tokens[ev.index] += ev.token_ids
        logprobs[ev.index] += ev.logprobs
        text[ev.index] += ev.text
        reasons[ev.index], owners[ev.index] = ev.finish_reason, ev.prompt_index
    result = StreamResult(tokens=tokens, logprobs=logprobs, finish_reasons=reasons,
                          text=text if with_text else None, prompt_index=owners,
                          top_logprobs=top if any(t is not None for t in top) else None)
    bad = [i for i, r in enumerate(reasons) if r == "error"]
    if bad:
        raise NonFiniteLogitsError(f"the model produced non-finite logits (results {bad}); "
                                   "those requests stopped (finish_reason 'error')", result)
    return result
