"""Sampling strategies: filters keep exactly what they promise; seeds reproduce; T=0 is greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxinfer import Model, ModelConfig
from jaxinfer.sampling import SamplingConfig, apply_repetition_penalty, sample

VOCAB = 50
DRAWS = 400


def _logits(seed=0, rows=4):
    return jax.random.normal(jax.random.key(seed), (rows, VOCAB)) * 2.0


def _draw(logits, cfg: SamplingConfig, draws=DRAWS, seed=0):
    sp = cfg.device_params()
    seen = jnp.zeros(logits.shape, bool)
    keys = jax.random.split(jax.random.key(seed), draws * logits.shape[0])
    keys = keys.reshape(draws, logits.shape[0])
    tokens, _ = jax.jit(jax.vmap(lambda k: sample(logits, seen, k, sp)))(keys)
    return np.asarray(tokens)  # [draws, rows]


def _probs(logits, temperature=1.0):
    return np.asarray(jax.nn.softmax(logits / temperature, axis=-1))


def test_top_k_never_leaves_the_top_k():
    logits = _logits()
    tokens = _draw(logits, SamplingConfig(temperature=1.5, top_k=5))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for row in range(logits.shape[0]):
        assert set(tokens[:, row]) <= set(top5[row])
        assert len(set(tokens[:, row])) > 1  # still sampling, not greedy


def _nucleus(probs_row, p):
    order = np.argsort(-probs_row)
    mass_before = np.cumsum(probs_row[order]) - probs_row[order]
    return set(order[mass_before < p])


def test_top_p_stays_in_the_nucleus():
    logits = _logits(1)
    tokens = _draw(logits, SamplingConfig(temperature=1.0, top_p=0.6))
    probs = _probs(logits)
    for row in range(logits.shape[0]):
        nucleus = _nucleus(probs[row], 0.6)
        assert probs[row][sorted(nucleus)].sum() >= 0.6 - 1e-6
        assert set(tokens[:, row]) <= nucleus


def test_min_p_respects_threshold():
    logits = _logits(2)
    tokens = _draw(logits, SamplingConfig(temperature=1.0, min_p=0.2))
    probs = _probs(logits)
    for row in range(logits.shape[0]):
        allowed = set(np.nonzero(probs[row] >= 0.2 * probs[row].max())[0])
        assert set(tokens[:, row]) <= allowed


def test_unfiltered_sampling_follows_the_distribution():
    logits = _logits(3, rows=1) * 0.5
    tokens = _draw(logits, SamplingConfig(temperature=1.0), draws=4000)
    freq = np.bincount(tokens[:, 0], minlength=VOCAB) / tokens.shape[0]
    assert np.abs(freq - _probs(logits)[0]).max() < 0.04


def test_temperature_zero_is_argmax():
    logits = _logits(4)
    tokens = _draw(logits, SamplingConfig(temperature=0.0, top_k=3), draws=3)
    assert (tokens == np.asarray(logits).argmax(-1)).all()


def test_logprob_is_raw_log_softmax():
    logits = _logits(5)
    sp = SamplingConfig(temperature=0.7, top_k=4).device_params()
    keys = jax.random.split(jax.random.key(0), logits.shape[0])
    tokens, logprobs = sample(logits, jnp.zeros(logits.shape, bool), keys, sp)
    expected = jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6)


def test_repetition_penalty_matches_transformers():
    logits = np.array(_logits(6))  # a writable copy: torch wraps it
    input_ids = np.array([[1, 5, 5, 9], [0, 2, 3, 4], [7, 7, 7, 7], [10, 20, 30, 40]])
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(
        torch.as_tensor(input_ids), torch.as_tensor(logits)).numpy()
    got = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_k=VOCAB + 1), "exceeds the vocabulary"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature")])
def test_invalid_sampling_options_are_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**bad).validate(VOCAB)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                      head_dim=8, d_ff=64, max_context=128, eos_token_ids=(0,))
    return Model.random(cfg, seed=3)


def test_same_seed_same_tokens_different_seed_different(tiny_model):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, stop_tokens=[])
    prompts = [[3, 4, 5], [6, 7]]
    a = tiny_model.generate(prompts, seed=11, **kwargs)
    b = tiny_model.generate(prompts, seed=11, **kwargs)
    c = tiny_model.generate(prompts, seed=12, **kwargs)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_temperature_zero_generation_is_greedy(tiny_model):
    prompt = [3, 4, 5, 6]
    res = tiny_model.generate([prompt], max_new_tokens=6, temperature=0.0, stop_tokens=[])
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(tiny_model.logits(np.array([seq]))[0, -1].argmax()))
    assert res.tokens[0] == seq[len(prompt):]
