"""Batch mode (`jaxinfer generate --input FILE --output FILE`): crash-safe resume, torn-line
repair, bad-line records, exit status; on the built-in model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxinfer import batch
from jaxinfer.cli import main

N_REQUESTS = 24


def _requests() -> list[dict]:
    """Requests that finish at different times (lengths 2..48), greedy and seeded sampling."""
    reqs = []
    for i in range(N_REQUESTS):
        req = {"id": f"r{i}", "prompt": f"def f{i}(x):", "max_new_tokens": 2 + 2 * i}
        if i % 3 == 1:
            req.update(temperature=0.9, seed=100 + i)
        if i % 5 == 2:
            req = {"tokens": [257, 105, 109, 112], "max_new_tokens": 3 + i}  # id: line number
        reqs.append(req)
    return reqs


def _write_input(path, lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines))
    return str(path)


def _records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(ln) for ln in text.splitlines()]


def _by_id(records) -> dict:
    ids = [json.dumps(r["id"]) for r in records]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {k: r for k, r in zip(ids, records)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the request file."""
    d = tmp_path_factory.mktemp("ref")
    inp = _write_input(d / "in.jsonl", _requests())
    out = str(d / "out.jsonl")
    assert main(["generate", "--input", inp, "--output", out]) == 0
    return inp, _by_id(_records(out))


def test_uninterrupted_run_has_every_request_once(reference):
    _, records = reference
    expected = {json.dumps(r.get("id", i + 1)) for i, r in enumerate(_requests())}
    assert set(records) == expected
    r0 = records['"r0"']
    assert r0["finish_reason"] in ("length", "stop") and len(r0["tokens"]) <= 2
    assert r0["usage"] == {"prompt_tokens": len("def f0(x):") + 1,
                           "completion_tokens": len(r0["tokens"])}
    assert "logprobs" not in r0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_mid_run_then_rerun_equals_uninterrupted(tmp_path, reference, sig):
    """kill -9 (nothing runs after it) and Ctrl-C (exit 130 after syncing the file)."""
    inp, want = reference
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxinfer", "generate", "--input", inp,
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = out.read_bytes().count(b"\n")
    assert 3 <= partial < len(want)
    assert main(["generate", "--input", inp, "--output", str(out)]) == 0
    assert _by_id(_records(out)) == want


def test_torn_last_line_is_truncated_and_completed(tmp_path, reference):
    inp, want = reference
    out = tmp_path / "out.jsonl"
    kept = list(want.values())[:5]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "r9", "text": "de')
    assert batch.scan_output(str(out)) == {json.dumps(r["id"]): False for r in kept}
    assert out.read_text().endswith("}\n")  # the torn tail is gone
    assert main(["generate", "--input", inp, "--output", str(out)]) == 0
    assert _by_id(_records(out)) == want


def test_invalid_line_before_the_last_is_an_error(tmp_path, reference, capsys):
    inp, _ = reference
    out = tmp_path / "out.jsonl"
    out.write_text('garbage\n{"id": "r0", "text": ""}\n')
    assert main(["generate", "--input", inp, "--output", str(out)]) == 2
    assert "line 1 is not a result record" in capsys.readouterr().err


def test_bad_lines_become_error_records_and_exit_1(tmp_path, capsys):
    inp = _write_input(tmp_path / "in.jsonl", [
        {"id": "ok", "prompt": "x = ", "max_new_tokens": 3},
        "{not json",
        {"id": "k", "prompt": "x", "top_k": 0},
        {"id": "both", "prompt": "x", "tokens": [1]},
        {"id": "field", "prompt": "x", "colour": "red"},
        {"id": "long", "prompt": "x", "max_new_tokens": 5000},
        "",
        [1, 2],
    ])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out)]) == 1
    recs = _by_id(_records(out))
    assert recs['"ok"']["finish_reason"] == "length" and len(recs['"ok"']["tokens"]) == 3
    assert recs["2"]["error"].startswith("line 2: not valid JSON")
    assert recs['"k"']["error"] == "line 3: top_k must be an int in [1, inf], got 0 (int)"
    assert "exactly one of 'prompt'" in recs['"both"']["error"]
    assert "unknown field 'colour'" in recs['"field"']["error"]
    assert recs['"long"']["error"].startswith("line 6:") and "5000" in recs['"long"']["error"]
    assert recs["8"]["error"] == "line 8: must be a JSON object, got list"
    assert len(recs) == 7  # the empty line 7 is no request
    err = capsys.readouterr().err
    assert "7 requests" in err and "6 failed" in err
    # a rerun has nothing to do and still reports the failures
    assert main(["generate", "--input", inp, "--output", str(out)]) == 1
    assert len(_records(out)) == 7


def test_duplicate_ids_name_both_lines(tmp_path, capsys):
    inp = _write_input(tmp_path / "in.jsonl", [{"id": 2, "prompt": "a"}, {"prompt": "b"}])
    assert main(["generate", "--input", inp, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "input lines 1 and 2 have the same id 2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_output_of_another_input_is_refused(tmp_path, capsys):
    inp = _write_input(tmp_path / "in.jsonl", [{"id": "a", "prompt": "a"}])
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "zzz", "text": "", "tokens": []}\n')
    assert main(["generate", "--input", inp, "--output", str(out)]) == 2
    assert 'id "zzz", which is not in the input' in capsys.readouterr().err


def test_stdin_input_stop_strings_n_and_logprobs(tmp_path):
    lines = [{"id": "s", "prompt": "def f(x):", "stop": ["\n"], "max_new_tokens": 30},
             {"id": "n", "prompt": "import ", "n": 2, "temperature": 1.0, "logprobs": 2,
              "max_new_tokens": 4}]
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE": "0"}
    run = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--input", "-",
                          "--output", str(out), "--seed", "5"], env=env, capture_output=True,
                         text=True, timeout=300,
                         input="".join(json.dumps(ln) + "\n" for ln in lines))
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "2 requests: 2 now" in run.stderr
    assert "━" not in run.stderr  # no progress bar: stderr is not a terminal
    recs = _by_id(_records(out))
    s = recs['"s"']
    assert "\n" not in s["text"] and s["finish_reason"] == "stop" and s["tokens"][-1] == 10
    choices = recs['"n"']["choices"]
    assert len(choices) == 2 and choices[0]["tokens"] != choices[1]["tokens"]
    assert recs['"n"']["usage"]["completion_tokens"] == 8
    for c in choices:
        assert len(c["logprobs"]) == len(c["top_logprobs"]) == 4
        assert all(len(alts) == 2 for alts in c["top_logprobs"])


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--output", "o.jsonl"], "--output needs --input"),
    (["--input", "i.jsonl"], "--input needs --output FILE"),
    (["--input", "i.jsonl", "--output", "o.jsonl", "--stream"], "--stream does not apply"),
])
def test_batch_flag_errors(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_tokens_in_gives_tokens_out(capsys):
    assert main(["generate", "--tokens", "257,100,101", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.strip()
    assert [int(t) for t in out.split(",")] and len(out.split(",")) == 4


def test_help_shows_defaults_and_every_flag_has_help(capsys):
    from jaxinfer.cli import build_parser

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    missing = [a.option_strings for a in generate._actions if not a.help]
    assert not missing
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 32)" in text and "tpu-interpret" in text and "(default: 0, none)" in text


def test_version(capsys):
    import jaxinfer

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxinfer {jaxinfer.__version__}"



def _two_processes(cli, outputs, timeout=120):
    """Run `cli` in 2 processes x 1 CPU device (outputs[pid]: its --input/--output pair)."""
    from procs import free_port, run_processes

    port = free_port()
    return run_processes([cli + ["--input", inp, "--output", out, "--coordinator",
                                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                 str(pid), "--local-devices", "1"]
                          for pid, (inp, out) in enumerate(outputs)],
                         timeout=timeout, separate_stderr=True)


def _assert_same_results(got: dict, want: dict) -> None:
    """Records by id equal: tokens, text, errors exactly; logprobs to float32 rounding (a
    process with one CPU device and this one with 8 may split a reduction differently)."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = dict(got[key])
        assert g.pop("logprobs", None) == pytest.approx(w.get("logprobs"), rel=1e-4, abs=1e-5)
        top = g.pop("top_logprobs", None)
        want_top = w.get("top_logprobs")
        assert (top is None) == (want_top is None), key
        for alts, want_alts in zip(top or (), want_top or ()):
            assert [a[0] for a in alts] == [a[0] for a in want_alts], key
            assert [a[1] for a in alts] == pytest.approx([a[1] for a in want_alts], rel=1e-4,
                                                         abs=1e-5)
        assert g == {k: v for k, v in w.items() if k not in ("logprobs", "top_logprobs")}, key


def test_two_processes_write_one_file_equal_to_one_process_and_resume(tmp_path):
    """Under jax.distributed only process 0 reads the input and writes the output (process 1 is
    given paths it never touches: a missing input, an output in an empty directory); the file
    holds every id once (a bad line as an error record, exit status 1) with the one-process
    tokens, and a rerun over it cut to 2 records and a torn line completes it alike."""
    inp = _write_input(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "def f(x):", "max_new_tokens": 4},
        {"id": "b", "prompt": "import ", "max_new_tokens": 6, "stop": ["."]},
        "{not json",
        {"id": "c", "tokens": [257, 105, 109], "max_new_tokens": 3, "temperature": 0.9,
         "seed": 7},
        {"id": "d", "prompt": "x = ", "max_new_tokens": 5, "logprobs": 2},
        {"id": "e", "prompt": "class A:", "max_new_tokens": 2},
    ])
    single = tmp_path / "single.jsonl"
    assert main(["generate", "--input", inp, "--output", str(single)]) == 1
    want = _by_id(_records(single))
    assert len(want) == 6 and want["3"]["error"].startswith("line 3: not valid JSON")
    elsewhere = tmp_path / "process1"
    elsewhere.mkdir()
    out = tmp_path / "out.jsonl"
    paths = [(inp, str(out)), (str(elsewhere / "in.jsonl"), str(elsewhere / "out.jsonl"))]
    cli = ["-m", "jaxinfer", "generate", "--model", "builtin"]
    for pid, (rc, stdout, stderr) in enumerate(_two_processes(cli, paths)):
        assert rc == 1, stderr[-3000:]  # the bad line: every process counts the failure
        assert stdout == "" and "jaxinfer generate:" not in stderr, stderr[-3000:]
        assert ("6 requests: 6 now" in stderr) == (pid == 0), stderr[-3000:]
    first = _by_id(_records(out))
    _assert_same_results(first, want)
    assert list(elsewhere.iterdir()) == []
    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + '{"id": "zz", "text": "de')
    for pid, (rc, stdout, stderr) in enumerate(_two_processes(cli, paths)):
        assert rc == 1, stderr[-3000:]
        assert ("6 requests: 4 now, 2 already" in stderr) == (pid == 0), stderr[-3000:]
    assert _records(out)[:2] == [json.loads(ln) for ln in kept]
    _assert_same_results(_by_id(_records(out)), first)  # logprobs: other batch, other padding
    assert list(elsewhere.iterdir()) == []


def test_logprobs_flag_in_token_mode_and_batch_mode(tmp_path, capsys):
    """--logprobs K: per token its K most likely alternatives (greedy: the token first), after
    each result's token line; in batch mode the default of lines that do not set 'logprobs'."""
    assert main(["generate", "--tokens", "257,100,101", "--max-new-tokens", "3",
                 "--logprobs", "2"]) == 0
    line, top = capsys.readouterr().out.splitlines()
    tokens = [int(t) for t in line.split(",")]
    assert len(tokens) == 3 and top.startswith("top_logprobs ")
    alts = json.loads(top[len("top_logprobs "):])
    assert [len(a) for a in alts] == [2, 2, 2]
    assert [a[0][0] for a in alts] == tokens and all(a[0][1] >= a[1][1] for a in alts)
    assert main(["generate", "--tokens", "257,100,101", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [line]  # same tokens without the flag
    inp = _write_input(tmp_path / "in.jsonl", [
        {"id": "flag", "tokens": [257, 100, 101], "max_new_tokens": 3},
        {"id": "line", "tokens": [257, 100, 101], "max_new_tokens": 3, "logprobs": 1}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", inp, "--output", str(out), "--logprobs", "2"]) == 0
    recs = _by_id(_records(out))
    assert recs['"flag"']["tokens"] == tokens and recs['"flag"']["top_logprobs"] == alts
    assert [len(a) for a in recs['"line"']["top_logprobs"]] == [1, 1, 1]


@pytest.mark.parametrize("value", ["x", "-1", "21", "1.5"])
def test_bad_logprobs_flag_is_a_usage_error_naming_it(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--tokens", "257", "--logprobs", value])
    assert exit_info.value.code == 2
    assert (f"argument --logprobs: must be an int in [0, 20] (alternatives per token; 0 = "
            f"none), got {value!r}") in capsys.readouterr().err
