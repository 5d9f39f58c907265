"""`jaxinfer bench` end to end on a tiny checkpoint: it runs, measures both sides and prints the
table (speed figures themselves are the benchmark's business, never asserted here)."""

import re

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
