"""Catalogue of bad and unusual inputs to the Python API: each gives the right exception type with
words naming the argument, or (for the inputs that should work) the right result."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import InvalidArgument, ModelConfig, validation

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                  d_ff=32, max_context=24)


@pytest.fixture(scope="module")
def tiny():
    return jaxinfer.Model.random(CFG)


def _greedy(model, prompts, n=3, **kw):
    return model.generate(prompts, max_new_tokens=n, stop_tokens=[], **kw).tokens


BAD_PROMPTS = [
    ([[1.7, 10.9]], "prompts[0][0] must be an int token id (not a float or bool), got 1.7"),
    ([[True, 2]], "prompts[0][0] must be an int token id"),
    ([[1, 2.0]], "prompts[0][1] must be an int token id"),
    ([["1", "2"]], "prompts[0][0] must be an int token id"),
    (np.array([[1.5, 2.0]]), "prompts[0] must be a 1-D integer array of token ids, got an array "
                             "of dtype float64"),
    (np.array([[True, False]]), "prompts[0] must be a 1-D integer array"),
    (np.array([1, 2, 3]), "prompts given as an array must be 2-D [B, T]"),
    ([1, 2, 3], "prompts must be a list of prompts, got a flat list of token ids"),
    (None, "prompts must be a string or a sequence of prompts"),
    (5, "prompts must be a string or a sequence of prompts"),
    (b"hello", "prompts must be a string or a sequence of prompts"),
    ({1, 2}, "prompts must be a string or a sequence of prompts"),
    ([], "no prompts given"),
    (iter([]), "no prompts given"),
    (["a", [1, 2]], "all strings or all token-id lists, not a mix"),
    (["ok", "bad \ud800 text"], "prompts[1] is not valid Unicode text: surrogates not allowed "
                               "at character 4"),
    ([[1, 2], 7], "prompts[1] must be a sequence of int token ids, got 7"),
]


@pytest.mark.parametrize("prompts, words", BAD_PROMPTS)
def test_bad_prompts(tiny, prompts, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        tiny.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize("prompts, words", [
    ([[1, 32]], "prompt 0 has token id 32 outside the vocabulary [0, 32)"),
    ([[4], [1, -1]], "prompt 1 has token id -1 outside the vocabulary"),
    ([[1, 2], []], "prompt 1 is empty"),
    ([list(range(20))], "exceeds the model's context of 24"),
])
def test_prompt_values_out_of_range(tiny, prompts, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny.generate(prompts, max_new_tokens=8)


def test_text_prompt_without_tokenizer(tiny):
    with pytest.raises(InvalidArgument, match="text prompts need a tokenizer"):
        tiny.generate("hello")


@pytest.mark.parametrize("prompts", [
    np.array([[1, 2, 3], [4, 5, 6]]),
    [np.array([1, 2, 3], np.int32), np.array([4, 5, 6], np.int64)],
    ((1, 2, 3), (4, 5, 6)),
    (p for p in [[1, 2, 3], [4, 5, 6]]),
    [[np.int64(1), np.int16(2), 3], [4, np.uint8(5), 6]],
    [np.array([1, 2, 3]), (4, 5, 6)],
])
def test_prompt_forms_that_work(tiny, prompts):
    assert _greedy(tiny, prompts) == _greedy(tiny, [[1, 2, 3], [4, 5, 6]])


def test_generator_of_prompts_is_consumed_once(tiny):
    consumed = []

    def prompts():
        for p in ([1, 2], [3]):
            consumed.append(p)
            yield p

    assert _greedy(tiny, prompts()) == _greedy(tiny, [[1, 2], [3]])
    assert consumed == [[1, 2], [3]]


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "1", None, np.float64(3.0)])
def test_bad_seed(tiny, seed):
    with pytest.raises(InvalidArgument, match=r"seed must be an int in \[0, 9223372036854775807\]"):
        tiny.generate([[1, 2]], max_new_tokens=2, seed=seed)


def test_numpy_seed_is_the_int_it_holds(tiny):
    kw = dict(temperature=1.0, n=6)
    assert _greedy(tiny, [[1, 2]], seed=np.int64(7), **kw) == _greedy(tiny, [[1, 2]], seed=7, **kw)
    assert validation.seed(np.uint64(2**63 - 1)) == 2**63 - 1


def test_seed_beyond_32_bits(tiny):
    kw = dict(temperature=1.0, n=8)
    assert _greedy(tiny, [[1, 2]], seed=2**40, **kw) != _greedy(tiny, [[1, 2]], seed=0, **kw)
    assert _greedy(tiny, [[1, 2]], seed=2**40 + 5, **kw) != _greedy(tiny, [[1, 2]], seed=5, **kw)
    assert _greedy(tiny, [[1, 2]], seed=2**63 - 1, **kw) == _greedy(tiny, [[1, 2]], seed=2**63 - 1,
                                                                     **kw)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_bad_max_new_tokens(tiny, value):
    with pytest.raises(InvalidArgument, match=r"max_new_tokens must be an int in \[1, inf\]"):
        tiny.generate([[1]], max_new_tokens=value)


BAD_SAMPLING = [
    (dict(temperature=-0.1), r"temperature must be a finite number in \[0.0, inf\], got -0.1"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature="0.7"), "temperature must be a finite number .* got '0.7' \\(str\\)"),
    (dict(temperature=None), "temperature must be a finite number"),
    (dict(top_k=0), r"top_k must be an int in \[1, inf\]"),
    (dict(top_k=2.5), "top_k must be an int"),
    (dict(top_k=True), "top_k must be an int"),
    (dict(top_p="0.9"), r"top_p must be a finite number in \(0.0, 1.0\], got '0.9'"),
    (dict(top_p=0.0), r"top_p must be a finite number in \(0.0, 1.0\]"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(min_p=-0.1), r"min_p must be a finite number in \[0.0, 1.0\]"),
    (dict(min_p=False), "min_p must be"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number in \(0.0, inf\]"),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be"),
]


@pytest.mark.parametrize("kwargs, words", BAD_SAMPLING)
def test_bad_sampling_arguments(tiny, kwargs, words):
    with pytest.raises(InvalidArgument, match=words):
        tiny.generate([[1]], max_new_tokens=2, **kwargs)


def test_top_k_beyond_vocabulary(tiny):
    with pytest.raises(ValueError, match="top_k=33 exceeds the vocabulary size 32"):
        tiny.generate([[1]], max_new_tokens=2, top_k=33)


def test_numpy_scalars_as_sampling_arguments(tiny):
    kw = dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=3)
    np_kw = dict(temperature=np.float32(0.8), top_k=np.int64(5), top_p=np.float64(0.9),
                 min_p=np.float32(0.01), repetition_penalty=np.float16(1.2), seed=np.int32(3))
    # np.float32(0.8) holds 0.800000011920929 and np.float16(1.2) 1.2001953125: compare with them.
    exact = dict(kw, temperature=float(np.float32(0.8)), min_p=float(np.float32(0.01)),
                 repetition_penalty=float(np.float16(1.2)))
    got = tiny.generate([[1, 2]], max_new_tokens=np.int64(5), stop_tokens=[], **np_kw)
    want = tiny.generate([[1, 2]], max_new_tokens=5, stop_tokens=[], **exact)
    assert got.tokens == want.tokens and len(got.tokens[0]) == 5
    jax_kw = dict(temperature=jnp.float32(0.8), top_k=jnp.int32(5), seed=jnp.int32(3))
    got = tiny.generate([[1, 2]], max_new_tokens=np.array(5), stop_tokens=[], **jax_kw)
    want = tiny.generate([[1, 2]], max_new_tokens=5, stop_tokens=[], seed=3, top_k=5,
                         temperature=float(np.float32(0.8)))
    assert got.tokens == want.tokens
    with pytest.raises(InvalidArgument, match="top_k must be an int"):
        tiny.generate([[1]], top_k=np.array([5]))


@pytest.mark.parametrize("stops, words", [
    (5, "stop_tokens must be a sequence of token ids, got the single int 5: write "
        "stop_tokens=[5]"),
    (np.int64(3), "got the single int 3"),
    ([1.5], "stop_tokens[0] must be an int token id"),
    ([True], "stop_tokens[0] must be an int token id"),
    ("ab", "stop_tokens must be a sequence of int token ids, got 'ab'"),
    (np.array([[1, 2]]), "stop_tokens must be a 1-D integer array"),
])
def test_bad_stop_tokens(tiny, stops, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        tiny.generate([[1]], max_new_tokens=2, stop_tokens=stops)


def test_stop_token_outside_vocabulary(tiny):
    with pytest.raises(ValueError, match="stop token 99 is outside the vocabulary"):
        tiny.generate([[1]], max_new_tokens=2, stop_tokens=[99])


def test_stop_tokens_as_array_and_tuple(tiny):
    first = _greedy(tiny, [[1, 2]], n=4)[0][0]
    for stops in (np.array([first]), (first,), {first: "x"}.keys()):
        res = tiny.generate([[1, 2]], max_new_tokens=4, stop_tokens=stops)
        assert res.tokens[0] == [first] and res.finish_reasons[0] == "stop"


@pytest.mark.parametrize("tokens, words", [
    ([[1.5, 2]], "tokens[0][0] must be an int token id"),
    (np.zeros((1, 3), np.float32), "tokens must be an integer array [B, T], got dtype float32"),
    (np.array([[True, False]]), "tokens must be an integer array [B, T], got dtype bool"),
    ([[1, 2], [3]], "tokens must be a rectangular [B, T] array, got rows of lengths [2, 1]"),
    ([1, 2, 3], "tokens[0] must be a sequence of int token ids, got 1"),
    ("abc", "tokens must be an integer array [B, T] of token ids, got 'abc'"),
    (None, "tokens must be an integer array"),
    ([], "tokens must hold at least one sequence"),
])
def test_bad_logits_tokens(tiny, tokens, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        tiny.logits(tokens)


@pytest.mark.parametrize("tokens, words", [
    ([[1, 99]], "token ids must be in [0, 32), got range [1, 99]"),
    (np.zeros((1, 25), np.int64), "sequence length 25 must be in [1, 24]"),
])
def test_logits_values_out_of_range(tiny, tokens, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        tiny.logits(tokens)


def test_logits_forms_that_work(tiny):
    want = tiny.logits(np.array([[1, 2, 3]], np.int32))
    for tokens in ([[1, 2, 3]], ((1, 2, 3),), [np.array([1, 2, 3], np.uint8)],
                   np.array([[1, 2, 3]], np.int64)):
        np.testing.assert_array_equal(tiny.logits(tokens), want)


@pytest.mark.parametrize("dtype, words", [
    ("int8", "dtype must be one of ('float32', 'bfloat16', 'float16'), got 'int8'"),
    (5, "dtype must be one of"),
    (None, "dtype must be one of"),
    (np.int32, "dtype must be one of"),
    ("float64", "got 'float64'"),
])
def test_bad_dtype(dtype, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        jaxinfer.Model.random(CFG, dtype=dtype)


@pytest.mark.parametrize("dtype, name", [(np.float32, "float32"), (jnp.bfloat16, "bfloat16"),
                                         (np.dtype("float16"), "float16")])
def test_dtype_objects_that_work(dtype, name):
    assert jaxinfer.Model.random(CFG, dtype=dtype).dtype.name == name
