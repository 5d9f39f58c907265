"""Streaming (`Model.stream`, `jaxinfer generate --stream`), incremental decoding that never
splits a UTF-8 character, stop strings, n completions and top-k logprobs, on the built-in model."""

import json

import pytest

import jaxinfer
from jaxinfer import InvalidArgument
from jaxinfer.cli import main
from jaxinfer.streaming import StopStrings
from jaxinfer.tokenizer import REPLACEMENT_CHAR

PROMPTS = ["def fib(n):", "import os\n", "class Tree:"]


@pytest.fixture(scope="module")
def model():
    return jaxinfer.load("builtin")


def _joined(events, count):
    texts, tokens, reasons = [""] * count, [[] for _ in range(count)], [None] * count
    for ev in events:
        assert reasons[ev.index] is None, "an event after the request's last"
        texts[ev.index] += ev.text
        tokens[ev.index] += ev.token_ids
        reasons[ev.index] = ev.finish_reason
    return texts, tokens, reasons


def test_stream_deltas_join_to_generate_text_and_arrive_early(model):
    events = list(model.stream(PROMPTS, max_new_tokens=40, stop_tokens=[]))
    texts, tokens, reasons = _joined(events, len(PROMPTS))
    want = model.generate(PROMPTS, max_new_tokens=40, stop_tokens=[])
    assert texts == want.text and tokens == want.tokens
    assert reasons == ["length"] * len(PROMPTS)
    for i in range(len(PROMPTS)):
        mine = [ev for ev in events if ev.index == i]
        assert len(mine) > 1 and mine[0].finish_reason is None and mine[0].token_ids
        assert all(REPLACEMENT_CHAR not in ev.text for ev in mine)


def test_one_prompt_as_text_or_token_list(model):
    ids = model.tokenizer.encode("def fib(n):")
    a = [(e.index, e.token_ids) for e in model.stream("def fib(n):", max_new_tokens=5)]
    b = [(e.index, e.token_ids) for e in model.stream(ids, max_new_tokens=5)]
    assert a == b and {i for i, _ in a} == {0}


def test_incremental_decoder_never_splits_a_character(model):
    text = "naïve café — 数据 😀 ok"
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: a token per byte
    dec = model.tokenizer.incremental()
    deltas = [dec.push([t]) for t in ids]
    deltas.append(dec.finish())
    assert "".join(deltas) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "😀" in deltas  # the 4 bytes of the emoji came out together, once whole
    assert deltas.count("") >= len("😀".encode()) - 1


def test_incremental_decoder_finish_shows_incomplete_bytes_like_decode(model):
    ids = model.tokenizer.encode("a€", add_special_tokens=False)[:-1]  # cut inside the euro
    dec = model.tokenizer.incremental()
    assert dec.push(ids[:1]) == "a"
    assert dec.push(ids[1:]) == ""  # held back: a character is incomplete
    rest = dec.finish()
    assert rest.startswith(REPLACEMENT_CHAR) and "a" + rest == model.tokenizer.decode(ids)


def test_stop_strings_matcher_across_pieces():
    s = StopStrings(["END", "\n\n"], include=False)
    assert s.push("abc E") == ("abc ", False)  # "E" might begin "END": held back
    assert s.push("N") == ("", False)
    assert s.push("Dxyz") == ("", True)
    s = StopStrings(["END"], include=True)
    assert s.push("aEN") == ("a", False)
    assert s.push("Dq") == ("END", True)
    s = StopStrings(["b", "ab"], include=False)
    assert s.push("xab") == ("x", True)  # the earliest match wins
    s = StopStrings(["zz"], include=False)
    assert s.push("az") == ("a", False) and s.finish() == "z"


def test_stop_string_cuts_text_and_aborts(model):
    full = model.generate(PROMPTS, max_new_tokens=40, stop_tokens=[])
    res = model.generate(PROMPTS, max_new_tokens=40, stop_tokens=[], stop=["\n"])
    kept = model.generate(PROMPTS, max_new_tokens=40, stop_tokens=[], stop=["\n"],
                          include_stop_str_in_output=True)
    for i, text in enumerate(full.text):
        assert "\n" in text  # the model writes code: a newline comes within 40 bytes
        assert res.text[i] == text.split("\n")[0] and res.finish_reasons[i] == "stop"
        assert kept.text[i] == res.text[i] + "\n"
        # the tokens end with the one that completed the stop string: nothing more computed
        assert res.tokens[i] == full.tokens[i][:len(res.tokens[i])]
        assert model.tokenizer.decode(res.tokens[i]).endswith("\n")
        assert len(res.tokens[i]) < len(full.tokens[i])


def test_n_completions_are_distinct_and_flattened_prompt_major(model):
    prompts = ["x = ", "import "]  # open-ended: samples differ at temperature 1
    res = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=7, n=3)
    assert res.prompt_index == [0, 0, 0, 1, 1, 1]
    assert len({tuple(t) for t in res.tokens[:3]}) == 3
    assert len({tuple(t) for t in res.tokens[3:]}) == 3
    one = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=7,
                         engine=model.engine())
    assert [res.tokens[0], res.tokens[3]] == one.tokens  # sample 0 is what n=1 gives


def test_top_k_logprobs_pass_through(model):
    params = jaxinfer.SamplingParams(max_new_tokens=6, logprobs=3)
    res = model.generate(PROMPTS[:1], params=params, stop=["\n\n\n"])
    alts = res.top_logprobs[0]
    assert len(alts) == len(res.tokens[0]) == 6
    for tok, lp, row in zip(res.tokens[0], res.logprobs[0], alts):
        assert len(row) == 3 and row[0][0] == tok and row[0][1] == pytest.approx(lp)


def test_stream_argument_errors(model):
    with pytest.raises(InvalidArgument, match=r"stop\[0\] must be a non-empty string"):
        model.stream("x", stop=[""])
    with pytest.raises(InvalidArgument, match="unknown keyword 'temprature'"):
        model.stream("x", temprature=0.5)
    with pytest.raises(InvalidArgument, match="n must be an int in"):
        model.stream("x", n=0)
    with pytest.raises(InvalidArgument, match="pass either params= or the sampling keywords"):
        model.stream("x", params=jaxinfer.SamplingParams(), temperature=0.5)
    ids_only = jaxinfer.Model.random(jaxinfer.ModelConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
        max_context=64))
    with pytest.raises(InvalidArgument, match="stop strings need a tokenizer"):
        ids_only.stream([[1, 2]], stop=["a"])


def test_cli_stream_prints_prompt_and_text(capsys, model):
    assert main(["generate", "--prompt", "def fib(n):", "--max-new-tokens", "20", "--stream"]) == 0
    want = model.generate(["def fib(n):"], max_new_tokens=20).text[0]
    assert capsys.readouterr().out == "def fib(n):" + want + "\n"
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--max-new-tokens", "3",
                 "--stream", "--json"]) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert {e["index"] for e in events} == {0, 1}
    assert sum(e["finish_reason"] is not None for e in events) == 2


def test_reprs(model):
    q = jaxinfer.load("builtin", quantize="int8", kv_cache="int8")
    assert "weights=float32" in repr(model) and "kv_cache=float32" in repr(model)
    assert "weights=int8" in repr(q) and "kv_cache=int8" in repr(q)
    assert "plan=one device" in repr(q) and "backend=auto" in repr(q)
    res = model.generate(PROMPTS, max_new_tokens=30)
    text = repr(res)
    assert text.startswith("GenerationResult(3 results, 90 tokens, finish length=3")
    assert len(text) < 300 and str(res.logprobs[0][0]) not in text
    assert repr(model.tokenizer).startswith("Tokenizer(259 tokens")
