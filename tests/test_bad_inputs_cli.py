"""The command line on bad input: exit code 2 and one line naming the problem, never a traceback
(--debug adds it); an internal error exits 1 with a one-line summary; --json is strict JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

import jaxinfer
from jaxinfer.api import Model
from jaxinfer.cli import json_line, main
from jaxinfer.generate import GenerationResult, NonFiniteLogitsError


def _strict(line: str):
    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant} in {line!r}")
    return json.loads(line, parse_constant=reject)


@pytest.fixture()
def llama(family_checkpoints):
    return family_checkpoints("llama").path


def _generate(llama, *extra):
    return ["generate", "--model", llama, "--tokens", "5,17,33", "--max-new-tokens", "3",
            *extra]


USER_ERRORS = [
    (["--tokens", "5,999"], "prompt 1 has token id 999 outside the vocabulary"),
    (["--seed", "-1"], "seed must be an int in [0, 9223372036854775807], got -1"),
    (["--seed", str(2**64)], "seed must be an int in [0, 9223372036854775807]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an int in [1, inf], got 0"),
    (["--max-new-tokens", "500"], "exceeds the model's context of 256"),
    (["--top-p", "0"], "top_p must be a finite number in (0.0, 1.0], got 0.0"),
    (["--temperature", "nan"], "temperature must be a finite number in [0.0, inf], got nan"),
    (["--top-k", "0"], "top_k must be an int in [1, inf], got 0"),
    (["--top-k", "1000"], "top_k=1000 exceeds the vocabulary size 96"),
    (["--min-p", "2"], "min_p must be a finite number in [0.0, 1.0], got 2.0"),
    (["--repetition-penalty", "-1"], "repetition_penalty must be a finite number"),
    (["--stop-tokens", "400"], "stop token 400 is outside the vocabulary"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: invalid int value: 'x'"),
    (["--tokens", "1.5"], "--tokens must be comma-separated ints, got '1.5'"),
    (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'"),
    (["--group-size", "7"], "group_size only applies with quantize"),
    (["--prompt", "hello"], "text prompts need a tokenizer"),
]


def _rc(argv) -> int:
    """main's exit code, also where argparse exits itself (a usage error)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("extra, words", USER_ERRORS)
def test_user_error_is_one_line_exit_2(llama, capsys, extra, words):
    argv = _generate(llama, *extra)
    if "--prompt" in extra:
        argv = [a for a in argv if a not in ("--tokens", "5,17,33")]
    assert _rc(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("setup, words", [
    ("missing", "does not exist"),
    ("file", "is a file, not a checkpoint directory"),
    ("config_list", "config.json must hold a JSON object, got a JSON list"),
    ("empty", "neither a jaxinfer checkpoint"),
])
def test_bad_model_path_exit_2(tmp_path, capsys, setup, words):
    path = tmp_path / "model"
    if setup == "file":
        path.write_text("x")
    elif setup in ("config_list", "empty"):
        path.mkdir()
        if setup == "config_list":
            (path / "config.json").write_text("[1, 2]")
    assert main(["generate", "--model", str(path), "--tokens", "1,2"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(llama, capsys):
    assert main(["--debug", *_generate(llama, "--seed", "-1")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "InvalidArgument" in err
    assert err.strip().splitlines()[-1].startswith("jaxinfer generate: error: seed must be")
    assert main(_generate(llama, "--seed", "-1", "--debug")) == 2  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_internal_error_exits_1_with_one_line(llama, capsys, monkeypatch):
    def broken_load(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(jaxinfer, "load", broken_load)
    assert main(_generate(llama)) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("jaxinfer generate: internal error: KeyError: 'a bug' (run with "
                           "--debug for the traceback)")
    assert main(["--debug", *_generate(llama)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "broken_load" in err


def test_json_output_is_strict(llama, capsys):
    assert main(_generate(llama, "--json", "--stop-tokens", "", "--temperature", "1.0")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = _strict(lines[0])
    assert len(record["tokens"]) == 3 and all(math.isfinite(x) for x in record["logprobs"])


def test_json_line_writes_non_finite_as_null():
    line = json_line({"tokens": [1, 2], "logprobs": [-0.5, math.nan, -math.inf],
                      "finish_reason": "error", "text": None})
    assert _strict(line) == {"tokens": [1, 2], "logprobs": [-0.5, None, None],
                             "finish_reason": "error", "text": None}


def test_cli_subprocess_exit_code_and_no_traceback():
    env = dict(os.environ, JAXINFER_COMPILATION_CACHE="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--seed", "1.5",
                          "--prompt", "x"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "jaxinfer generate: error: argument --seed: invalid int value: '1.5'"]
    out = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--model", "/nowhere",
                          "--prompt", "x"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "jaxinfer generate: error: checkpoint directory '/nowhere' does not exist")


def test_non_finite_logits_keep_the_other_results_as_strict_json(llama, capsys, monkeypatch):
    """A request that stopped on non-finite logits: every result is still printed (strict JSON,
    the bad logprob as null), then one error line and exit code 2."""
    result = GenerationResult(tokens=[[4, 5], [7]], logprobs=[[-0.25, -1.5], [math.nan]],
                              finish_reasons=["length", "error"])

    def nan_generate(self, *args, **kwargs):
        raise NonFiniteLogitsError("the model produced non-finite logits (prompt 1, step 0)",
                                   result)

    monkeypatch.setattr(Model, "generate", nan_generate)
    assert main(_generate(llama, "--json")) == 2
    out, err = capsys.readouterr()
    records = [_strict(line) for line in out.strip().splitlines()]
    assert [r["finish_reason"] for r in records] == ["length", "error"]
    assert records[0]["logprobs"] == [-0.25, -1.5] and records[1]["logprobs"] == [None]
    assert err.strip() == ("jaxinfer generate: error: the model produced non-finite logits "
                           "(prompt 1, step 0)")


PLAN_ARGS = ["plan", "--model", "palm-8b", "--hardware", "tpu-v4", "--batch", "8",
             "--context", "64"]


@pytest.mark.parametrize("extra, words", [
    (["--chips", "8", "--phase", "prefill", "--prompt-len", "0"],
     "--prompt-len must be a positive integer, got 0"),
    (["--chips", "8", "--phase", "decode", "--latency-target-ms", "nan"],
     "--latency-target-ms must be a positive number, got nan"),
    (["--phase", "decode", "--mesh", "2x2"], "--mesh must be XxYxZ"),
    (["--phase", "decode", "--mesh", "2x2x2", "--chips", "4"], "--chips 4 disagrees with --mesh"),
    (["--phase", "decode"], "--chips must be a positive integer, got None"),
])
def test_plan_user_errors_exit_2(capsys, extra, words):
    assert _rc(PLAN_ARGS + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
