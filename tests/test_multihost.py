"""Two processes x 4 CPU devices (jax.distributed over gloo, coordinator on 127.0.0.1) load a
random HF checkpoint sharded over the 8 devices and generate exactly the single-process tokens,
for a weight-stationary plan and one with batch-sharded multiquery attention in decode, in one
static batch and through the continuous-batching engine under the plan. Each
process holds and peaks at about half the parameter memory of a one-process run."""

import json
import os
import re

import pytest

import hf_fixtures
import jaxinfer
import multihost_program
from procs import free_port, run_processes

PROGRAM = os.path.join(os.path.dirname(__file__), "multihost_program.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """~100 MB of float32 weights: large enough for peak memory to show the sharding."""
    model = hf_fixtures.build_hf_model("llama", hidden_size=512, intermediate_size=2048,
                                       num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                       vocab_size=16384)
    path = str(tmp_path_factory.mktemp("multihost_llama"))
    hf_fixtures.save_hf_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Unsharded single-process generation of the program's prompts: one static batch and the
    engine."""
    import numpy as np

    model = jaxinfer.load(checkpoint)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, size=int(k)).tolist()
               for k in rng.integers(2, 12, size=6)]
    engine = model.engine(multihost_program.engine_config())
    return {"tokens": model.generate(prompts, max_new_tokens=6, stop_tokens=[]).tokens,
            "engine_tokens": engine.generate(prompts, multihost_program.engine_params()).tokens}


def _run(checkpoint, plan, n):
    port = free_port()
    outs = run_processes([[PROGRAM, checkpoint, plan, n, pid, port] for pid in range(n)],
                         timeout=240)
    results = []
    for rc, out in outs:
        assert rc == 0, out[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert line, out[-3000:]
        results.append(json.loads(line[-1][len("RESULT "):]))
    return results


@pytest.mark.parametrize("plan", ["ws", "batch"])
def test_two_processes_generate_the_single_process_tokens(checkpoint, reference, plan):
    results = _run(checkpoint, plan, 2)
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 8
        assert r["tokens"] == reference["tokens"]  # gathered: every process has every sequence
        assert r["engine_tokens"] == reference["engine_tokens"]


def test_per_process_memory_halves_with_two_processes(checkpoint, reference):
    (one,) = _run(checkpoint, "ws", 1)
    two = _run(checkpoint, "ws", 2)
    assert one["tokens"] == reference["tokens"]
    size = os.path.getsize(os.path.join(checkpoint, "model.safetensors"))
    assert one["local_param_bytes"] == pytest.approx(size, rel=0.05)
    growth_one = one["peak_rss_after_load"] - one["peak_rss_before_load"]
    for r in two:
        assert r["local_param_bytes"] * 2 == one["local_param_bytes"]
        growth = r["peak_rss_after_load"] - r["peak_rss_before_load"]
        assert growth < 0.75 * growth_one, (growth, growth_one)


def test_cli_plan_auto_across_two_processes(checkpoint):
    """`jaxinfer generate --plan auto` in 2 processes: the planner puts the process boundary on a
    mesh axis (DCN), process 0 alone prints, the tokens are the one-process CLI's, and stdout holds
    only them (Gloo's connection chatter goes to stderr)."""
    cli = ["-m", "jaxinfer", "generate", "--model", checkpoint, "--tokens", "5,6,7,8",
           "--tokens", "9,10", "--max-new-tokens", "6"]
    ((rc, single),) = run_processes([cli])
    assert rc == 0, single
    port = free_port()
    outs = run_processes([cli + ["--plan", "auto", "--verbose", "--coordinator",
                                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                 str(pid), "--local-devices", "4"] for pid in range(2)],
                         timeout=240, separate_stderr=True)
    want = [ln for ln in single.splitlines() if re.fullmatch(r"[0-9,]+", ln)]
    assert len(want) == 2
    for pid, (rc, out, err) in enumerate(outs):
        assert rc == 0, err[-3000:]
        assert "(dcn " in err  # --verbose: the mesh spans two granules
        assert out.splitlines() == (want if pid == 0 else []), (out, err[-3000:])


def test_quantize_on_load_across_two_processes(tmp_path):
    """int4 weights + int8 KV cache, quantized after the sharded load in each process, under a
    plan whose decode shards attention over the batch: tokens equal a one-process run."""
    model = hf_fixtures.build_hf_model("llama", hidden_size=128, num_attention_heads=8,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=256)
    path = hf_fixtures.save_hf_checkpoint(model, str(tmp_path))
    cli = ["-m", "jaxinfer", "generate", "--model", path, "--tokens", "5,6,7,8", "--tokens",
           "9,10", "--max-new-tokens", "8", "--quantize", "int4", "--group-size", "32",
           "--kv-cache", "int8"]
    ((rc, single, err),) = run_processes([cli], separate_stderr=True)
    assert rc == 0, err[-3000:]
    port = free_port()
    outs = run_processes([cli + ["--plan", "2d-ws/heads,2d-ws/batch", "--mesh", "2x2x2",
                                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                 "--process-id", str(pid), "--local-devices", "4"]
                          for pid in range(2)], timeout=240, separate_stderr=True)
    assert len(single.splitlines()) == 2
    for pid, (rc, out, err) in enumerate(outs):
        assert rc == 0, err[-3000:]
        assert out == (single if pid == 0 else ""), (out, err[-3000:])
