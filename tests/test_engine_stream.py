"""The engine's stream, abort, top logprobs and on-device multi-step loop on a tiny random model.

Reference outputs come from `Engine.generate` (itself checked against the static path in
test_engine.py) and, for greedy multi-step runs and logprobs, from the static path directly
(`Model.generate` of each prompt alone, `Model.logits`).
"""

import contextlib

import jax
import numpy as np
import pytest

from jaxinfer import InvalidArgument, Model, ModelConfig
from jaxinfer.engine import Engine, EngineConfig, Scheduler, TokenEvent
from jaxinfer.sampling import SamplingParams

VOCAB = 96
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, max_context=96)
GREEDY = SamplingParams(max_new_tokens=7, stop_tokens=())


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, seed=5)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _engine(model, **kwargs):
    return Engine(model, EngineConfig(**{"max_seqs": 3, "page_size": 4, "token_budget": 12,
                                         **kwargs}))


PROMPTS = _prompts([5, 11, 2, 17, 8])
LENGTHS = [SamplingParams(max_new_tokens=n, stop_tokens=()) for n in (3, 9, 6, 2, 12)]


def _joined(events, n):
    tokens, reasons = [[] for _ in range(n)], [[] for _ in range(n)]
    for e in events:
        tokens[e.index] += e.token_ids
        reasons[e.index].append(e.finish_reason)
    return tokens, reasons


def test_stream_events_join_to_generate_and_arrive_before_the_end(model):
    eng = _engine(model)
    expected = eng.generate(PROMPTS, LENGTHS)
    events, unfinished_at = [], []
    for e in eng.stream(PROMPTS, LENGTHS):
        assert isinstance(e, TokenEvent) and len(e.token_ids) == len(e.logprobs) >= 1
        unfinished_at.append(eng.scheduler.has_unfinished)
        events.append(e)
    tokens, reasons = _joined(events, len(PROMPTS))
    assert tokens == expected.tokens
    # exactly one final event per request, and it is the request's last
    assert all(r[-1] == "length" and r[:-1] == [None] * (len(r) - 1) for r in reasons)
    assert unfinished_at[0] and not unfinished_at[-1]
    logprobs = [[lp for e in events if e.index == i for lp in e.logprobs] for i in range(5)]
    np.testing.assert_allclose(sum(logprobs, []), sum(expected.logprobs, []), rtol=1e-5)


def test_abort_ends_a_request_frees_its_pages_and_is_the_next_event(model):
    eng = _engine(model, prefix_caching=False)
    reference = eng.generate(PROMPTS, LENGTHS).tokens
    stream = eng.stream(PROMPTS, LENGTHS)
    events = [next(stream)]
    first = events[0].index
    eng.abort(first, "stop")
    eng.abort(4, "abort")  # not handed to the scheduler yet (max_seqs 3): never runs
    events += list(stream)
    assert (events[1].index, events[1].finish_reason) == (first, "stop")
    assert (events[2].index, events[2].token_ids, events[2].finish_reason) == (4, (), "abort")
    tokens, reasons = _joined(events, len(PROMPTS))
    assert tokens[first] == list(events[0].token_ids)
    for i in set(range(4)) - {first}:
        assert tokens[i] == reference[i] and reasons[i][-1] == "length"
    assert eng.scheduler.pool.num_free == eng.num_pages
    with pytest.raises(InvalidArgument, match="abort"):
        eng.abort(0)


def test_abort_errors_name_the_problem(model):
    eng = _engine(model)
    stream = eng.stream(PROMPTS[:2], GREEDY)
    with pytest.raises(InvalidArgument, match="none is"):
        eng.abort(0)  # the stream has not started
    assert sum(e.finish_reason is not None for e in stream) == 2
    stream = eng.stream(PROMPTS[:2], SamplingParams(max_new_tokens=1, stop_tokens=()))
    final = next(stream)
    with pytest.raises(InvalidArgument, match="already finished"):
        eng.abort(final.index)
    with pytest.raises(InvalidArgument, match="index"):
        eng.abort(2)
    with pytest.raises(InvalidArgument, match="reason"):
        eng.abort(1 - final.index, "")
    with pytest.raises(RuntimeError, match="still open"):
        next(eng.stream(PROMPTS[:1], GREEDY))
    stream.close()


def test_closing_a_stream_early_aborts_its_requests(model):
    eng = _engine(model, prefix_caching=False)
    with contextlib.closing(eng.stream(PROMPTS, LENGTHS)) as stream:
        next(stream)
    assert not eng.scheduler.has_unfinished
    assert eng.scheduler.pool.num_free == eng.num_pages
    again = eng.generate(PROMPTS[:2], GREEDY)  # the engine is usable afterwards
    assert again.finish_reasons == ["length"] * 2


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_top_logprobs_equal_log_softmax_of_the_static_logits(model, steps_per_call):
    prompts = _prompts([4, 9], seed=3)
    params = [SamplingParams(max_new_tokens=6, stop_tokens=(), logprobs=5),
              SamplingParams(max_new_tokens=6, stop_tokens=(), temperature=1.0, seed=2)]
    res = _engine(model, steps_per_call=steps_per_call).generate(prompts, params)
    assert res.top_logprobs[1] is None and len(res.top_logprobs[0]) == 6
    full = prompts[0] + res.tokens[0]
    logits = model.logits([full])[0, len(prompts[0]) - 1:-1]  # [6, V]: the generating rows
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for j, alternatives in enumerate(res.top_logprobs[0]):
        ids = [t for t, _ in alternatives]
        assert ids == np.argsort(-ref[j])[:5].tolist()
        np.testing.assert_allclose([lp for _, lp in alternatives], ref[j, ids], atol=2e-5)
        assert res.logprobs[0][j] == pytest.approx(ref[j, res.tokens[0][j]], abs=2e-5)


@pytest.mark.parametrize("value", [0, 21, 2.0, True])
def test_bad_logprobs_count_is_named(value):
    with pytest.raises(InvalidArgument, match="logprobs"):
        SamplingParams(logprobs=value)


def test_multi_step_loop_equals_single_steps_and_the_static_path(model):
    prompts = _prompts([3, 14, 6, 1], seed=8)
    alone = [model.generate([p], max_new_tokens=20, stop_tokens=[]).tokens[0] for p in prompts]
    stop = alone[1][9]
    params = [SamplingParams(max_new_tokens=20, stop_tokens=()),
              SamplingParams(max_new_tokens=20, stop_tokens=(stop,)),
              SamplingParams(max_new_tokens=20, stop_tokens=(), temperature=0.9, top_k=7, seed=4),
              SamplingParams(max_new_tokens=5, stop_tokens=(), repetition_penalty=1.3)]
    one = _engine(model, steps_per_call=1).generate(prompts, params)
    multi = _engine(model, steps_per_call=8).generate(prompts, params)
    assert multi.tokens == one.tokens
    assert multi.tokens[0] == alone[0]
    assert multi.tokens[1] == alone[1][:alone[1].index(stop) + 1]
    assert multi.finish_reasons == one.finish_reasons == ["length", "stop", "length", "length"]
    assert one.stats.device_calls == one.stats.steps == multi.stats.steps
    assert multi.stats.device_calls < multi.stats.steps


def _scheduler(**kw):
    args = dict(max_seqs=2, page_size=4, num_pages=8, token_budget=8, max_prefill_chunk=8,
                max_model_len=32)
    return Scheduler(**{**args, **kw})


def test_lookahead_reserves_pages_and_update_takes_one_row_per_step():
    sched = _scheduler()
    a = sched.add_request("a", [1, 2, 3], 10)
    b = sched.add_request("b", [4, 5, 6, 7, 8], 2)
    prefill = sched.schedule(lookahead=6)
    assert prefill.step_limits[:2].tolist() == [1, 1]  # not decode-only: no lookahead
    sched.update(prefill, [9, 9])
    plan = sched.schedule(lookahead=6)
    # a: 3 cached tokens + 6 more -> 3 pages; b: 1 token left (max_new_tokens 2)
    assert plan.step_limits[:2].tolist() == [6, 1] and len(a.pages) == 3 and len(b.pages) == 2
    with pytest.raises(ValueError, match="at most min"):
        sched.update(plan, np.zeros((2, 2), np.int32))
    sched.update(plan, np.array([[11, 12]], np.int32))
    assert b.finish_reason == "length" and a.token_ids[-2:] == [9, 11]
    plan = sched.schedule(lookahead=6)
    assert plan.step_limits[0] == 6  # 4 cached + 6 fit the three reserved pages (12 tokens)
    with pytest.raises(ValueError, match="before the last row"):
        sched.update(plan, np.zeros((3, 1), np.int32), np.array([[True], [False], [False]]))
    sched.update(plan, np.array([[20], [21], [22]], np.int32),
                 np.array([[False], [False], [True]]))
    assert a.output == [9, 11, 20, 21, 22] and a.finish_reason == "stop"
    assert sched.prefix_cache.num_available == 8 and sched.stats.steps == 5


def test_scheduler_abort_releases_pages_of_running_and_waiting_requests():
    sched = _scheduler(max_seqs=1, prefix_caching=False)
    run = sched.add_request("run", [1, 2, 3, 4, 5], 4)
    wait = sched.add_request("wait", [6], 4)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="call update first"):
        sched.abort(run)
    sched.update(plan, [7])
    sched.abort(run, "stop")
    sched.abort(wait)
    assert (run.finish_reason, wait.finish_reason) == ("stop", "abort")
    assert sched.pool.num_free == 8 and not sched.has_unfinished
    with pytest.raises(ValueError, match="not waiting or running"):
        sched.abort(run)


def test_prompts_are_fed_lazily_so_engine_state_is_bounded_by_max_seqs(model):
    eng = _engine(model, prefix_caching=False)
    prompts = _prompts([3, 6, 2, 5] * 10, seed=12)
    params = SamplingParams(max_new_tokens=3, stop_tokens=())
    held = []
    for _ in eng.stream(prompts, params):
        held.append(eng.scheduler.num_waiting + eng.scheduler.num_running)
    assert max(held) <= 2 * 3 < len(prompts)
    assert eng.scheduler.stats.finished_requests == len(prompts)
    assert eng.scheduler.pool.num_free == eng.num_pages
