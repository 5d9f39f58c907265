"""Generation behaviour: invariances, stop conditions, buckets, the compiled loop and the cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import KVCache, Model, ModelConfig
from jaxinfer import model as model_lib
from jaxinfer.generate import bucket
from jaxinfer.sampling import SamplingConfig
from jaxinfer.sharding import PhaseSharding

RT = model_lib.Runtime(PhaseSharding.single_device())

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_context=96, eos_token_ids=(7,), name="tiny")


@pytest.fixture(scope="module")
def model():
    return Model.random(CFG, seed=0)


def _alone(model, prompt, **kw):
    return model.generate([prompt], **kw)


def test_sequence_output_does_not_depend_on_batch_companions_or_padding(model):
    target = [5, 9, 11, 2]
    kw = dict(max_new_tokens=10, stop_tokens=[])
    alone = _alone(model, target, **kw)
    # A long companion moves the batch to a bigger prompt bucket and a bigger batch bucket.
    long_prompt = list(range(1, 40))
    together = model.generate([[3] * 20, target, long_prompt], **kw)
    assert bucket(39, 16) > bucket(4, 16)
    assert together.tokens[1] == alone.tokens[0]
    np.testing.assert_allclose(together.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_sampled_output_does_not_depend_on_batch_companions(model):
    kw = dict(max_new_tokens=8, stop_tokens=[], temperature=1.0, top_k=10, seed=4)
    first = model.generate([[5, 6, 7, 8]], **kw)
    with_companion = model.generate([[5, 6, 7, 8], list(range(30))], **kw)
    assert with_companion.tokens[0] == first.tokens[0]


def test_causal_logits_do_not_depend_on_later_tokens(model):
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 20))
    full = model.logits(tokens)
    prefix = model.logits(tokens[:, :9])
    np.testing.assert_allclose(prefix, full[:, :9], atol=1e-5)


def test_stop_tokens_end_each_sequence_independently(model):
    probe = model.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=6, stop_tokens=[])
    stop = probe.tokens[0][2]  # the third token of sequence 0 becomes a stop token
    res = model.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=6, stop_tokens=[stop])
    first_hit = probe.tokens[0].index(stop)
    assert res.tokens[0] == probe.tokens[0][:first_hit + 1]
    assert res.finish_reasons[0] == "stop"
    if stop in probe.tokens[1]:
        assert res.tokens[1] == probe.tokens[1][:probe.tokens[1].index(stop) + 1]
    else:
        assert res.tokens[1] == probe.tokens[1] and res.finish_reasons[1] == "length"


def test_default_stop_is_checkpoint_eos(model):
    probe = model.generate([[9, 10]], max_new_tokens=12, stop_tokens=[])
    eos = probe.tokens[0][1]
    eos_model = Model(CFG.replace(eos_token_ids=(eos,)), model.params)
    res = eos_model.generate([[9, 10]], max_new_tokens=12)
    assert res.tokens[0] == probe.tokens[0][:probe.tokens[0].index(eos) + 1]
    assert res.finish_reasons == ["stop"]
    never = eos_model.generate([[9, 10]], max_new_tokens=12, stop_tokens=[])
    assert never.tokens == probe.tokens and never.finish_reasons == ["length"]


def test_max_new_tokens_is_exact_and_lengths_are_reported(model):
    res = model.generate([[1], [2, 3, 4]], max_new_tokens=5, stop_tokens=[])
    assert [len(t) for t in res.tokens] == [5, 5]
    assert [len(lp) for lp in res.logprobs] == [5, 5]
    assert all(lp <= 0 for row in res.logprobs for lp in row)


def test_prompt_buckets_bound_recompiles(model):
    m = Model(CFG, model.params)
    for length in (3, 5, 9, 14):
        m.generate([list(range(1, length + 1))], max_new_tokens=5, stop_tokens=[])
    programs = m._generator.programs
    assert programs.prefill._cache_size() == 1
    assert len(programs.decode_programs) == 1
    m.generate([list(range(1, 20))], max_new_tokens=5, stop_tokens=[])  # next bucket
    assert programs.prefill._cache_size() == 2


def test_prefill_does_not_depend_on_the_output_bucket_nor_decode_on_stop_tokens(model):
    """max_new_tokens 3, 9 and 17 (output buckets 8, 16, 32) share one prefill program; 0, 1 or
    3 stop tokens share one decode program (stop ids travel as a fixed-size array)."""
    m = Model(CFG, model.params)
    for new in (3, 9, 17):
        m.generate([[1, 2, 3]], max_new_tokens=new, stop_tokens=[])
    programs = m._generator.programs
    assert programs.prefill._cache_size() == 1
    for stops in ([], [5], [5, 6, 7]):
        m.generate([[1, 2, 3]], max_new_tokens=3, stop_tokens=stops)
    decode = programs.decode(8, jax.tree.structure(SamplingConfig().device_params()))
    assert decode._cache_size() == 1
    with pytest.raises(ValueError, match="at most 32"):
        m.generate([[1, 2, 3]], max_new_tokens=3, stop_tokens=list(range(33)))


def test_sampling_values_do_not_recompile(model):
    m = Model(CFG, model.params)
    for temperature, top_k in ((0.5, 3), (1.0, 8), (2.0, 20)):
        m.generate([[1, 2]], max_new_tokens=4, temperature=temperature, top_k=top_k)
    programs = m._generator.programs
    assert len(programs.decode_programs) == 1
    sp = SamplingConfig(temperature=1.0, top_k=3).device_params()
    assert programs.decode(8, jax.tree.structure(sp))._cache_size() == 1


def _lowered_decode_loop(model, out_len, batch=1):
    gen = model._generator
    sp = SamplingConfig().device_params()
    program = gen.programs.decode(out_len, jax.tree.structure(sp))
    prompts = np.zeros((batch, 16), np.int32)
    first, cache = gen.prefill(model.params, prompts, np.full(batch, 3, np.int32))
    return program.lower(model.params, first, prompts, cache, np.int32(1),
                         np.zeros(2, np.uint32), sp, np.full(32, -1, np.int32), np.int32(out_len))


def test_decode_loop_runs_as_one_while_loop(model):
    """The decode program is one XLA while loop: its size does not grow with the token count."""
    short, long = (_lowered_decode_loop(model, n).as_text() for n in (8, 64))
    assert "stablehlo.while" in short
    assert short.count("stablehlo.dot_general") == long.count("stablehlo.dot_general") > 0


@pytest.mark.parametrize("kv_cache", [None, "int8"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_writes_the_cache_in_place(batch, kv_cache):
    """No step of the compiled loop copies a K/V (or scale) buffer [B, K, S(, H)]: one row is
    written as a scatter, not a dynamic-update-slice that XLA:CPU would copy 4x per layer."""
    m = Model(CFG, Model.random(CFG).params, kv_cache=kv_cache)
    hlo = _lowered_decode_loop(m, 8, batch).compile().as_text()
    shape = rf"\[{batch},{CFG.n_kv_heads},\d+(?:,{CFG.head_dim})?\]"
    copies = re.findall(rf"= \w+{shape}\S* copy\(", hlo)
    assert "while(" in hlo and not copies, copies


def test_decode_step_matches_full_forward(model):
    """Prefill + one cached decode step equals the uncached forward pass at every position."""
    tokens = jnp.array([[4, 8, 15, 16, 23, 42, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    lengths = jnp.array([6, 8])
    last, cache = model_lib.prefill(model.params, tokens, lengths, CFG, RT, jnp.float32)
    cache = cache.extend(16)
    full = model_lib.forward_logits(model.params, tokens, CFG, RT)
    np.testing.assert_allclose(last[0], full[0, 5], atol=1e-5)
    np.testing.assert_allclose(last[1], full[1, 7], atol=1e-5)
    nxt = jnp.array([33, 9])
    step_logits, cache = model_lib.decode_step(model.params, nxt, cache, CFG, RT)
    assert cache.lengths.tolist() == [6, 8]  # the caller advances the lengths
    ext = jnp.array([[4, 8, 15, 16, 23, 42, 33], [1, 2, 3, 4, 5, 6, 7]])
    ref0 = model_lib.forward_logits(model.params, ext[:1], CFG, RT)[0, -1]
    ref1 = model_lib.forward_logits(model.params, jnp.concatenate(
        [tokens[1:], nxt[1:, None]], axis=1), CFG, RT)[0, -1]
    np.testing.assert_allclose(step_logits[0], ref0, atol=1e-5)
    np.testing.assert_allclose(step_logits[1], ref1, atol=1e-5)


def test_cache_stores_only_kv_heads_one_buffer_per_layer():
    mqa = CFG.replace(n_kv_heads=1)
    cache = KVCache.init(mqa, batch=3, max_len=32)
    assert len(cache.k) == CFG.n_layers and cache.k[0].shape == (3, 1, 32, CFG.head_dim)
    full = KVCache.init(CFG.replace(n_kv_heads=4), batch=3, max_len=32)
    assert full.nbytes() - 3 * 4 == 4 * (cache.nbytes() - 3 * 4)


def test_decode_returns_only_what_generate_reads(model):
    """The loop's outputs: tokens, logprobs, counts, stop and non-finite flags; no cache."""
    gen = model._generator
    sp = SamplingConfig().device_params()
    first, cache = gen.prefill(model.params, np.zeros((2, 16), np.int32),
                               np.array([3, 4], np.int32))
    out = gen.programs.decode(8, jax.tree.structure(sp))(
        model.params, first, np.zeros((2, 16), np.int32), cache, np.int32(2),
        np.zeros(2, np.uint32), sp, np.full(32, -1, np.int32), np.int32(4))
    assert [x.shape for x in out] == [(2, 8), (2, 8), (2,), (2,), (2,)]


def test_non_finite_logits_stop_that_request_with_an_error_naming_it(model):
    """A NaN embedding row poisons only the prompts that hold that token: that request stops at
    step 0 with finish_reason 'error', the error names it, the others finish normally."""
    from jaxinfer.generate import NonFiniteLogitsError

    params = dict(model.params, embed=model.params["embed"].at[5].set(jnp.nan))
    poisoned = Model(CFG, params)
    with pytest.raises(NonFiniteLogitsError, match=r"prompt 1 at step 0") as err:
        poisoned.generate([[1, 2, 3], [5, 6]], max_new_tokens=4, stop_tokens=[])
    result = err.value.result
    assert result.finish_reasons == ["length", "error"] and result.tokens[1] == []
    alone = model.generate([[1, 2, 3]], max_new_tokens=4, stop_tokens=[])
    assert result.tokens[0] == alone.tokens[0]
