"""The continuous-batching engine end to end on a tiny random model.

Greedy outputs are compared token for token with `Model.generate` of each prompt alone (the static
path: dense cache, flash/decode attention, an independent implementation) under ragged batches,
chunked prefill, preemption and prefix hits; sampled outputs with per-request seeds must not
depend on companions, arrival order or slots.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import InvalidArgument, Model, ModelConfig
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.device import PagedKV
from jaxinfer.sampling import SamplingConfig, SamplingParams, sample, stack_configs

VOCAB = 128
CFG = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=128, max_context=128)
MAX_NEW = 9


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, seed=3)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _alone(model, prompts, **kwargs):
    """Each prompt generated alone by the static path."""
    kwargs = {"max_new_tokens": MAX_NEW, "stop_tokens": [], **kwargs}
    return [model.generate([p], **kwargs).tokens[0] for p in prompts]


def _engine(model, **kwargs):
    return Engine(model, EngineConfig(**{"max_seqs": 4, "page_size": 4, "token_budget": 16,
                                         **kwargs}))


GREEDY = SamplingParams(max_new_tokens=MAX_NEW, stop_tokens=())
RAGGED = _prompts([3, 9, 14, 21, 30, 1, 12])


@pytest.fixture(scope="module")
def ragged_reference(model):
    return _alone(model, RAGGED)


def test_greedy_mixed_batch_with_chunked_prefill_equals_each_prompt_alone(model,
                                                                         ragged_reference):
    eng = _engine(model, max_prefill_chunk=5, prefix_caching=False)
    res = eng.generate(RAGGED, GREEDY)
    assert res.tokens == ragged_reference
    assert res.finish_reasons == ["length"] * len(RAGGED)
    assert res.stats.preemptions == 0
    assert res.stats.prefill_tokens == sum(map(len, RAGGED))


def test_greedy_under_preemption_equals_alone(model, ragged_reference):
    # 12 pages of 4 tokens: the longest request (30 + 9 - 1 tokens) needs 10 of them alone.
    page = PagedKV.bytes_per_page(CFG, 4, jnp.float32)
    eng = _engine(model, kv_cache_bytes=12 * page, max_prefill_chunk=8)
    assert eng.num_pages == 12
    res = eng.generate(RAGGED, GREEDY)
    assert res.stats.preemptions > 0
    assert res.tokens == ragged_reference
    # every page is back in the pool (free, or idle in the prefix cache) after the call
    assert eng.scheduler.prefix_cache.num_available == 12


def test_greedy_with_prefix_hits_equals_alone(model):
    shared = _prompts([13], seed=5)[0]
    prompts = [shared + tail for tail in _prompts([2, 5, 1, 7], seed=6)] + [shared[:9]]
    reference = _alone(model, prompts)
    eng = _engine(model)
    first = eng.generate(prompts[:1], GREEDY)
    res = eng.generate(prompts[1:], GREEDY)
    assert [first.tokens[0]] + res.tokens == reference
    # shared = 3 full pages; the 9-token prompt reuses 2 (its last token is always computed)
    assert res.stats.prefix_hit_tokens == 3 * 12 + 8
    assert res.stats.prefill_tokens == res.stats.prompt_tokens - res.stats.prefix_hit_tokens


def test_repetition_penalty_and_stop_tokens_equal_alone(model):
    prompts = _prompts([6, 11, 3], seed=9)
    penalized = _alone(model, prompts[:2], repetition_penalty=1.5)
    plain = _alone(model, prompts[2:])[0]
    stop = plain[3]
    params = [SamplingParams(max_new_tokens=MAX_NEW, stop_tokens=(), repetition_penalty=1.5)] * 2
    params.append(SamplingParams(max_new_tokens=MAX_NEW, stop_tokens=(stop,)))
    res = _engine(model).generate(prompts, params)
    assert res.tokens[:2] == penalized
    assert res.tokens[2] == plain[:plain.index(stop) + 1]
    assert res.finish_reasons == ["length", "length", "stop"]


def test_int8_kv_pages_equal_the_static_int8_cache(model):
    int8 = Model(CFG, model.params, kv_cache="int8")
    prompts = RAGGED[:4]
    res = _engine(int8, max_prefill_chunk=6).generate(prompts, GREEDY)
    assert res.tokens == _alone(int8, prompts)
    assert _engine(int8).kv.k[0].dtype == jnp.int8


def test_sampled_tokens_depend_only_on_the_request_and_its_seed(model):
    target = _prompts([7], seed=11)[0]
    others = _prompts([4, 15, 9], seed=12)
    mine = SamplingParams(max_new_tokens=MAX_NEW, stop_tokens=(), temperature=1.0, seed=7)
    companion = SamplingParams(max_new_tokens=5, stop_tokens=(), temperature=0.8, top_k=5,
                               top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    alone = _engine(model).generate([target], mine).tokens[0]
    crowd = _engine(model, max_prefill_chunk=3).generate(
        others + [target], [companion] * 3 + [mine], seed=99).tokens[-1]
    first = _engine(model).generate([target] + others, [mine] + [companion] * 3).tokens[0]
    assert alone == crowd == first
    other_seed = _engine(model).generate([target], SamplingParams(
        max_new_tokens=MAX_NEW, stop_tokens=(), temperature=1.0, seed=8)).tokens[0]
    assert other_seed != alone
    # seed=None takes the call's seed
    by_call = _engine(model).generate([target], SamplingParams(
        max_new_tokens=MAX_NEW, stop_tokens=(), temperature=1.0), seed=7).tokens[0]
    assert by_call == alone


def test_per_row_sampling_equals_each_row_alone():
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 2.0
    seen = jax.random.bernoulli(jax.random.key(1), 0.2, (4, 64))
    keys = jax.random.split(jax.random.key(2), 4)
    configs = [SamplingConfig(temperature=0.9), SamplingConfig(temperature=0.0),
               SamplingConfig(temperature=1.3, top_k=6, top_p=0.8, repetition_penalty=1.4),
               SamplingConfig(temperature=0.7, min_p=0.1)]
    rows = jax.tree.map(jnp.asarray, stack_configs(configs, 64))
    tokens, logprobs = sample(logits, seen, keys, rows)
    for i, c in enumerate(configs):
        t, lp = sample(logits[i:i + 1], seen[i:i + 1], keys[i:i + 1], c.device_params())
        assert int(tokens[i]) == int(t[0])
        np.testing.assert_allclose(float(logprobs[i]), float(lp[0]), rtol=1e-6)


def test_stats_are_exact_for_a_scripted_case(model):
    prompts = _prompts([5, 8], seed=4)
    eng = _engine(model, token_budget=16)
    params = SamplingParams(max_new_tokens=3, stop_tokens=())
    s = eng.generate(prompts, params).stats
    assert (s.requests, s.prompt_tokens, s.prefill_tokens, s.prefix_hit_tokens,
            s.generated_tokens, s.preemptions, s.steps) == (2, 13, 13, 0, 6, 0, 3)
    assert len(s.ttft_s) == 2 and all(0 < t <= s.wall_s for t in s.ttft_s)
    assert all(t is not None and t > 0 for t in s.tpot_s)
    assert s.tokens_per_s == pytest.approx(6 / s.wall_s)
    # the same prompts again: full pages below each prompt's last token come from the cache
    s2 = eng.generate(prompts, params).stats
    assert (s2.prefix_hit_tokens, s2.prefill_tokens, s2.steps) == (4 + 4, 13 - 8, 3)
    one = eng.generate(prompts[:1], SamplingParams(max_new_tokens=1, stop_tokens=())).stats
    assert (one.generated_tokens, one.tpot_s) == (1, (None,))


def test_a_request_too_large_for_the_pool_is_a_clear_error(model):
    page = PagedKV.bytes_per_page(CFG, 4, jnp.float32)
    eng = _engine(model, kv_cache_bytes=3 * page)
    with pytest.raises(ValueError, match=r"needs 5 pages of 4 tokens .* num_pages=3"):
        eng.generate([list(range(15))], SamplingParams(max_new_tokens=5, stop_tokens=()))
    # the failed call left nothing behind: the next one runs alone and finishes
    assert eng.generate([[1, 2]], SamplingParams(max_new_tokens=2)).tokens[0]
    assert eng.scheduler.num_waiting == 0


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("top_k", 0), ("top_p", 1.5),
    ("min_p", True), ("repetition_penalty", 0.0), ("seed", -3), ("stop_tokens", 5)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**{field: value})


def test_bad_engine_arguments_are_clear_errors(model):
    with pytest.raises(InvalidArgument, match="token_budget"):
        EngineConfig(max_seqs=8, token_budget=4)
    with pytest.raises(InvalidArgument, match=r"params must hold one SamplingParams per prompt"):
        _engine(model).generate([[1], [2]], [GREEDY])
    with pytest.raises(InvalidArgument, match=r"params\[1\]"):
        _engine(model).generate([[1], [2]], [GREEDY, {"temperature": 1.0}])
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        _engine(model).generate([[1, VOCAB]], GREEDY)


def test_model_generate_with_params_runs_the_engine(model, ragged_reference):
    eng = model.engine(EngineConfig(max_seqs=4, page_size=4, token_budget=16))
    res = model.generate(RAGGED, params=GREEDY, engine=eng)
    assert res.tokens == ragged_reference and res.stats.requests == len(RAGGED)
    per_prompt = [SamplingParams(max_new_tokens=n, stop_tokens=()) for n in (2, 5)]
    res = model.generate(RAGGED[:2], params=per_prompt, engine=eng)
    assert res.tokens == [ragged_reference[0][:2], ragged_reference[1][:5]]
    # keywords alone with an engine build one SamplingParams
    res = model.generate(RAGGED[:1], max_new_tokens=3, stop_tokens=[], engine=eng)
    assert res.tokens == [ragged_reference[0][:3]]
    with pytest.raises(InvalidArgument, match="not both"):
        model.generate(RAGGED[:1], temperature=0.5, params=GREEDY)
    with pytest.raises(InvalidArgument, match="engine"):
        Model.random(CFG, seed=4).generate(RAGGED[:1], params=GREEDY, engine=eng)
