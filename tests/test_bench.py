"""`jaxinfer bench` end to end on a tiny checkpoint: it runs, measures both sides and prints the
table (speed figures themselves are the benchmark's business, never asserted here)."""

import re

import numpy as np

import hf_fixtures
from jaxinfer import bench


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_prints_a_row_per_batch(tmp_path, capsys):
    path = hf_fixtures.save_hf_checkpoint(hf_fixtures.build_hf_model("llama"), str(tmp_path))
    assert bench.main(["--checkpoint", path, "--batch", "1", "2", "--prompt-len", "8",
                       "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"1", "2"}, out
    for cells in rows.values():
        jax_tok_s, hf_tok_s, ratio = float(cells[0]), float(cells[1]), cells[2]
        assert jax_tok_s > 0 and hf_tok_s > 0 and ratio.endswith("x")
        assert cells[-1].endswith("%")
    cold, warm = map(float, re.search(r"cold compile ([\d.]+) s, warm persistent cache ([\d.]+) s",
                                      out).groups())
    assert cold > 0 and warm > 0


def test_table_marks_unmeasured_figures_na(capsys):
    """With --no-hf the Hugging Face figures are NaN: the table says n/a, not "nan"."""
    import argparse

    row = bench.Row(batch=1, jax_tok_s=12.5, jax_prefill_tok_s=300.0, compile_s=2.0,
                    jax_peak_mb=900.0, roofline=0.5)
    args = argparse.Namespace(quantize=None, prompt_len=8, new_tokens=4)
    bench.print_table([row], args, bandwidth=1e10, ttft=None)
    (cells,) = _rows(capsys.readouterr().out).values()
    assert cells == ["12.5", "n/a", "n/a", "300", "n/a", "2.0", "900", "n/a", "50%"]


def test_engine_workload_follows_the_issue_distribution():
    from jaxinfer import bench_engine

    prompts, outs = bench_engine.workload(4000, 0, vocab=100)
    lens = np.array([len(p) for p in prompts])
    assert lens.min() >= 4 and lens.max() <= 400 and 80 < lens.mean() < 100
    assert min(outs) >= 2 and max(outs) <= 200 and 45 < np.mean(outs) < 60
    assert min(min(p) for p in prompts) >= 3 and max(max(p) for p in prompts) < 100
    assert bench_engine.workload(10, 1, 100) == bench_engine.workload(10, 1, 100)


def test_engine_roofline_is_the_larger_of_the_memory_and_compute_bounds():
    from jaxinfer import bench_engine

    cfg = bench_engine.MODELS["30m"]
    prompts, outs = [[5] * 10, [5] * 20], [4, 8]
    slow_memory = bench_engine.roofline(cfg, prompts, outs, 32, bandwidth=1e6, flops=1e15)
    weights = 4 * cfg.param_count()
    kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    context = 10 * 4 + 6 + 20 * 8 + 28  # each output token reads its whole context
    assert np.isclose(slow_memory.wall_s, (weights + context * kv_token) / 1e6, rtol=1e-3)
    slow_compute = bench_engine.roofline(cfg, prompts, outs, 32, bandwidth=1e15, flops=1e6)
    assert slow_compute.wall_s > 2 * (cfg.param_count() - cfg.vocab_size * cfg.d_model) * 42 / 1e6
    assert slow_memory.useful_tok_s == 12 / slow_memory.wall_s


def test_engine_bench_runs_every_side_on_a_tiny_model(capsys):
    from jaxinfer import EngineConfig, ModelConfig, bench_engine

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64, max_context=640, name="tiny")
    report = bench_engine.run(cfg, 5, warmup=2, engine_config=EngineConfig(
        max_seqs=4, token_budget=64, max_model_len=640, prefix_caching=False))
    names = [s["name"] for s in report["sides"]]
    assert names == ["engine", "jaxinfer static x32", "HF static x32", "roofline"]
    assert all(s["useful_tok_s"] > 0 for s in report["sides"])
    assert report["useful_tokens"] == sum(bench_engine.workload(5, 0, 64)[1])
    assert [p["context"] for p in report["profile"]] == [128, 512]
    assert all(p["engine_step_ms"] > 0 and p["static_step_ms"] > 0 for p in report["profile"])
    bench_engine.print_report(report)
    out = capsys.readouterr().out
    assert "engine speed-up" in out and "HF static x32" in out and "roofline" in out


def test_engine_bench_cli_rejects_bad_requests():
    from jaxinfer.cli import main

    assert main(["bench", "--engine", "--requests", "0"]) == 2
