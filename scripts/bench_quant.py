"""Decode speed and memory of float vs int8 / int4 weights (and an int8 KV cache) on this machine.

A random model whose weights dominate the decode step (the regime quantization targets); greedy
decode of `--new-tokens` tokens after a short prompt; the best of `--repeats` runs (after a warm-up
that compiles). Prints one row per variant: decode tokens/s, ms/step, parameter and cache bytes.

Usage: python scripts/bench_quant.py [--d-model 1024] [--layers 4] [--batch 1 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxinfer import quant
from jaxinfer.api import Model
from jaxinfer.config import ModelConfig
from jaxinfer.params import init_params

VARIANTS = (  # name, float dtype, quantization, kv cache
    ("float32", "float32", None, None),
    ("bfloat16", "bfloat16", None, None),
    ("int8", "float32", quant.QuantConfig(8), None),
    ("int8+kv8", "float32", quant.QuantConfig(8), "int8"),
    ("int4-g128", "float32", quant.QuantConfig(4, 128), None),
)


def _config(args) -> ModelConfig:
    heads = args.d_model // 64
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                       n_heads=heads, n_kv_heads=max(1, heads // 4), head_dim=64,
                       d_ff=4 * args.d_model, max_context=1024, name="bench")


def _model(cfg, dtype, qc, kv_cache) -> Model:
    params = init_params(cfg, jax.random.key(0), dtype)
    if qc is not None:
        params = quant.quantize_params(params, cfg, qc)
    return Model(cfg, params, kv_cache=kv_cache, quantization=qc,
                 attention_backend="xla")


def _decode_seconds(model: Model, batch: int, new_tokens: int, repeats: int) -> float:
    prompts = [[(7 * i + j) % model.config.vocab_size for j in range(16)] for i in range(batch)]
    model.generate(prompts, max_new_tokens=new_tokens, stop_tokens=[])  # compile
    return min(model.generate(prompts, max_new_tokens=new_tokens, stop_tokens=[])
               .timings["decode_s"] for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    args = p.parse_args(argv)
    cfg = _config(args)
    print(f"# {jax.devices()[0].device_kind}: D={cfg.d_model} F={cfg.d_ff} L={cfg.n_layers} "
          f"V={cfg.vocab_size} ({cfg.param_count() / 1e6:.1f}M params), "
          f"{args.new_tokens} new tokens")
    print(f"{'variant':<10} {'batch':>5} {'tok/s':>9} {'ms/step':>8} {'param MB':>9} "
          f"{'cache MB':>9}")
    for name, dtype, qc, kv in VARIANTS:
        if name not in args.variants:
            continue
        model = _model(cfg, dtype, qc, kv)
        for batch in args.batch:
            seconds = _decode_seconds(model, batch, args.new_tokens, args.repeats)
            steps = args.new_tokens - 1  # the first token comes from the prefill logits
            mem = model.memory_report(batch, 16 + args.new_tokens)
            print(f"{name:<10} {batch:>5} {batch * steps / seconds:>9.1f} "
                  f"{1e3 * seconds / steps:>8.2f} {mem['param_bytes'] / 1e6:>9.2f} "
                  f"{mem['cache_bytes'] / 1e6:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
