"""`jaxinfer bench --engine`: the continuous-batching engine against static batches.

The workload of issue 14: prompt lengths lognormal in [4, 400] (mean ~91), output lengths
lognormal in [2, 200] (mean ~53); every request wants exactly its output length (no stop tokens).
Four sides on the same random Llama checkpoint (float32, greedy):

- the engine (`Model.engine`): each request its own max_new_tokens;
- jaxinfer static batches of 32 (`Model.generate`): a batch runs to its longest request;
- Hugging Face `generate` in static batches of 32 with left padding (same stopping rule);
- the roofline of this machine for the engine's schedule: every decode step reads the weights
  once and each token's context once, at the measured memory bandwidth, and every fed token
  costs 2 x matmul parameters FLOPs at the measured matmul rate; the bound is the larger of the
  two totals.

Only requested tokens count as useful. A warm-up run of the first `--warmup` requests compiles
the programs first (static and engine), so the measured run is warm.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.bench import _peak_rss_mb, _reset_peak_rss, measure_bandwidth
from jaxinfer.config import ModelConfig

MODELS = {
    "30m": ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                       head_dim=64, d_ff=1408, max_context=1024, name="bench-30m"),
    # the 125M model of `jaxinfer bench` (jaxinfer.bench.BENCH_SHAPE)
    "125m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                        head_dim=64, d_ff=2048, max_context=2048, name="bench-125m"),
}
"""The benchmark's model shapes (random weights)."""


@dataclasses.dataclass
class Side:
    """One side's figures on the workload."""

    name: str
    useful_tok_s: float
    """Requested output tokens / wall seconds."""
    wall_s: float
    ttft_p50: float = float("nan")
    ttft_p99: float = float("nan")
    tpot_p50: float = float("nan")
    tpot_p99: float = float("nan")
    peak_mb: float = float("nan")
    """Peak resident memory of the process during the run (MiB)."""
    extra: dict = dataclasses.field(default_factory=dict)


def workload(n: int, seed: int, vocab: int, prompt_mean: float = 91, output_mean: float = 53,
             sigma: float = 0.9, prompt_range: tuple[int, int] = (4, 400),
             output_range: tuple[int, int] = (2, 200)) -> tuple[list[list[int]], list[int]]:
    """n prompts (token ids in [3, vocab)) and their output lengths: lognormal with these means
    (before clipping) and log-space sigma, clipped to the ranges; the defaults are issue 14's."""
    rng = np.random.default_rng(seed)
    mu = lambda mean: np.log(mean) - sigma**2 / 2  # noqa: E731
    prompt_lens = np.clip(rng.lognormal(mu(prompt_mean), sigma, n), *prompt_range).astype(int)
    out_lens = np.clip(rng.lognormal(mu(output_mean), sigma, n), *output_range).astype(int)
    prompts = [rng.integers(3, vocab, k).tolist() for k in prompt_lens]
    return prompts, out_lens.tolist()


def build_checkpoint(cfg: ModelConfig, path: str, seed: int = 0) -> str:
    """A random Llama checkpoint of `cfg`'s shape (float32 safetensors) in `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_context, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    transformers.LlamaForCausalLM(hf).save_pretrained(path)
    return path


def _pct(values, q: float) -> float:
    vals = [v for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else float("nan")


def run_engine(model, prompts, out_lens, engine_config, warmup: int) -> Side:
    from jaxinfer import SamplingParams

    engine = model.engine(engine_config)
    params = [SamplingParams(max_new_tokens=k, stop_tokens=()) for k in out_lens]
    engine.generate(prompts[:warmup], params[:warmup])
    _reset_peak_rss()
    res = engine.generate(prompts, params)
    s = res.stats
    if [len(t) for t in res.tokens] != list(out_lens):
        raise RuntimeError("the engine did not produce every requested token")
    return Side("engine", sum(out_lens) / s.wall_s, s.wall_s, _pct(s.ttft_s, 50),
                _pct(s.ttft_s, 99), _pct(s.tpot_s, 50), _pct(s.tpot_s, 99), _peak_rss_mb(),
                extra={"steps": s.steps, "device_calls": s.device_calls,
                       "host_ms_per_token": 1e3 * s.host_s_per_token,
                       "preemptions": s.preemptions, "num_pages": engine.num_pages})


def _static_batches(prompts, out_lens, batch: int):
    for b in range(0, len(prompts), batch):
        yield prompts[b:b + batch], out_lens[b:b + batch]


def run_static(model, prompts, out_lens, batch: int, warmup: int) -> Side:
    def once(ps, ls):
        start, ttft, tpot = time.perf_counter(), [], []
        for bp, bl in _static_batches(ps, ls, batch):
            t0 = time.perf_counter() - start
            res = model.generate(bp, max_new_tokens=max(bl), stop_tokens=[])
            ttft += [t0 + res.timings["prefill_s"]] * len(bl)
            tpot += [res.timings["decode_s"] / max(max(bl) - 1, 1)] * len(bl)
        return time.perf_counter() - start, ttft, tpot

    once(prompts[:warmup], out_lens[:warmup])
    _reset_peak_rss()
    wall, ttft, tpot = once(prompts, out_lens)
    return Side(f"jaxinfer static x{batch}", sum(out_lens) / wall, wall, _pct(ttft, 50),
                _pct(ttft, 99), _pct(tpot, 50), _pct(tpot, 99), _peak_rss_mb())


def run_hf(path: str, prompts, out_lens, batch: int) -> Side:
    """HF `generate`, static batches with left padding, each batch to its longest request."""
    import torch
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        for bp, bl in _static_batches(prompts, out_lens, batch):
            width = max(len(p) for p in bp)
            ids = torch.zeros((len(bp), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(bp):
                ids[i, width - len(p):] = torch.as_tensor(p)
                mask[i, width - len(p):] = 1
            new = max(bl)
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0)
            assert out.shape[1] == width + new
    wall = time.perf_counter() - start
    return Side(f"HF static x{batch}", sum(out_lens) / wall, wall, peak_mb=_peak_rss_mb())


def matmul_rate(cfg: ModelConfig, tokens: int = 256, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a [tokens, d_model] x [d_model, d_ff] matmul (the MLP's shape)."""
    x = jnp.ones((tokens, cfg.d_model), jnp.float32)
    w = jnp.ones((cfg.d_model, cfg.d_ff), jnp.float32)
    fn = jax.jit(lambda x, w: x @ w)
    fn(x, w).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * tokens * cfg.d_model * cfg.d_ff / best


def roofline(cfg: ModelConfig, prompts, out_lens, max_seqs: int, bandwidth: float,
             flops: float) -> Side:
    """The bound described in the module docstring, for decode steps of max_seqs sequences."""
    weights = 4 * cfg.param_count()
    matmul_params = cfg.param_count() - cfg.vocab_size * cfg.d_model  # the embedding is a gather
    kv_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    steps = -(-sum(out_lens) // max_seqs)
    context = sum(len(p) * k + k * (k - 1) // 2 for p, k in zip(prompts, out_lens))
    fed = sum(len(p) for p in prompts) + sum(out_lens)
    attn_flops = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
    seconds = max((steps * weights + context * kv_token) / bandwidth,
                  (2 * matmul_params * fed + attn_flops) / flops)
    return Side("roofline", sum(out_lens) / seconds, seconds,
                extra={"bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9})


def profile_decode(model, engine_config, context: int) -> dict:
    """Where a decode step's time goes: one engine step (the jitted `StepProgram.step`: paged
    cache, ragged paged attention, per-request sampling) of max_seqs sequences of `context`
    cached tokens each, against a static `generate` decode step (dense cache) of the same batch
    and context: same weights and matmuls, so the difference is the paged attention."""
    from jaxinfer import SamplingParams
    from jaxinfer.engine import device, plan as plan_lib
    from jaxinfer.engine.pages import pages_for_tokens
    from jaxinfer.sampling import stack_configs

    cfg, s, ps = model.config, engine_config.max_seqs, engine_config.page_size
    engine = model.engine(engine_config)
    per_seq = pages_for_tokens(context + 1, ps)
    ids = [3 + i % (cfg.vocab_size - 3) for i in range(context + 1)]
    requests = []
    for i in range(s):
        req = plan_lib.Request(i, tuple(ids), 2, i)
        req.num_computed, req.pages = context, list(range(i * per_seq, (i + 1) * per_seq))
        requests.append((req, 1))
    step_plan = plan_lib.build_step_plan(
        0, requests, num_decode_seqs=s, max_seqs=s, page_size=ps, num_pages=engine.num_pages,
        pages_per_seq=engine.scheduler.pages_per_seq, min_token_bucket=8)
    inputs = jax.tree.map(jnp.asarray, device.step_inputs(
        step_plan, np.full(s, s, np.int32), np.zeros((s, 2), np.uint32), np.zeros(s, np.int32)))
    sp = stack_configs([SamplingParams().config()] * s, cfg.vocab_size)

    def step():
        out, engine.kv, engine.seen = engine.program.step(model.params, engine.kv, engine.seen,
                                                          inputs, sp, num_top=0)
        return out

    step_s = _best(step)
    prompts = [ids[:context]] * s
    model.generate(prompts, max_new_tokens=9, stop_tokens=[])  # compile
    res = model.generate(prompts, max_new_tokens=9, stop_tokens=[])
    static_s = res.timings["decode_s"] / 8
    return {"context": context, "sequences": s, "page_table_width": step_plan.page_table.shape[1],
            "engine_step_ms": 1e3 * step_s, "static_step_ms": 1e3 * static_s}


def _best(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def run(model: str | ModelConfig, n: int, *, seed: int = 0, engine_config=None, static_batch: int = 32,
        hf: bool = True, static: bool = True, warmup: int = 64, profile: bool = True) -> dict:
    """Run every side on `model` (a `MODELS` name or a ModelConfig); returns a JSON-able
    report."""
    import jaxinfer

    cfg = MODELS[model] if isinstance(model, str) else model
    engine_config = engine_config or jaxinfer.EngineConfig(max_model_len=640)
    prompts, out_lens = workload(n, seed, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(cfg, tmp, seed)
        loaded = jaxinfer.load(path, dtype="float32")
        sides = [run_engine(loaded, prompts, out_lens, engine_config, warmup)]
        if static:
            sides.append(run_static(loaded, prompts, out_lens, static_batch, warmup))
        if hf:
            sides.append(run_hf(path, prompts, out_lens, static_batch))
    sides.append(roofline(cfg, prompts, out_lens, engine_config.max_seqs,
                          measure_bandwidth(), matmul_rate(cfg)))
    report = {"machine": machine(), "model": f"{cfg.name} ({cfg.param_count() / 1e6:.1f}M)",
              "requests": n, "mean_prompt": float(np.mean([len(p) for p in prompts])),
              "mean_output": float(np.mean(out_lens)), "useful_tokens": int(sum(out_lens)),
              "engine_config": dataclasses.asdict(engine_config),
              "sides": [dataclasses.asdict(s) for s in sides]}
    if profile:
        report["profile"] = [profile_decode(loaded, engine_config, c) for c in (128, 512)
                             if c < engine_config.max_model_len]
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    engine = report["sides"][0]["useful_tok_s"]
    table = Table(title=f"{report['model']}, {report['requests']} requests (mean prompt "
                        f"{report['mean_prompt']:.0f}, mean output {report['mean_output']:.0f})"
                        f" — {report['machine']}")
    for col in ("side", "useful tok/s", "engine speed-up", "wall s", "TTFT p50/p99 s",
                "TPOT p50/p99 ms", "peak MiB"):
        table.add_column(col, justify="right")
    na = lambda x, f: "n/a" if x != x else format(x, f)  # noqa: E731
    for s in report["sides"]:
        table.add_row(s["name"], f"{s['useful_tok_s']:.1f}", f"{engine / s['useful_tok_s']:.2f}x",
                      f"{s['wall_s']:.1f}",
                      f"{na(s['ttft_p50'], '.2f')} / {na(s['ttft_p99'], '.2f')}",
                      f"{na(1e3 * s['tpot_p50'], '.0f')} / {na(1e3 * s['tpot_p99'], '.0f')}",
                      na(s["peak_mb"], ".0f"))
    console = Console(width=160)
    console.print(table)
    console.print(f"engine: {report['sides'][0]['extra']}")
    console.print(f"roofline: {report['sides'][-1]['extra']}")
    for p in report.get("profile", []):
        console.print(f"decode step, {p['sequences']} sequences x {p['context']} tokens: engine "
                      f"{p['engine_step_ms']:.1f} ms (page table {p['page_table_width']} pages), "
                      f"static dense-cache step {p['static_step_ms']:.1f} ms")
