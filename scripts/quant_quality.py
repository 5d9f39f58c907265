"""Quality of quantized inference: bits per token and perplexity for float, int8, int4, int8 KV.

The model is `--model` (a checkpoint directory, or "builtin") or, by default, a random llama
checkpoint from tests/hf_fixtures.py. The text is `--text FILE` (tokenized by the model's
tokenizer); for "builtin", the held-out standard-library files of `jaxinfer.builtin` (bits/token =
bits/byte); otherwise sequences sampled from the float model at temperature 1 (so the float
model's bits/token is its own entropy and any quantization loss shows as extra bits). Weight
variants are scored with full-sequence logits; the int8-KV variant is scored token by token
through the KV cache (one-token prefill, then teacher-forced decode steps), so every attention
read comes from the int8 cache; its float-cache twin is printed beside it.

Usage: python scripts/quant_quality.py [--model DIR] [--text FILE] [--seqs 16] [--len 256]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxinfer
from jaxinfer import builtin, model as model_lib
from jaxinfer.sharding import PhaseSharding


def _random_checkpoint() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import hf_fixtures

    path = tempfile.mkdtemp(prefix="quant_quality_")
    hf_fixtures.save_hf_checkpoint(hf_fixtures.build_hf_model("llama", max_position_embeddings=512),
                                   path)
    return path


def _tokens(model, args) -> np.ndarray:
    if args.text:
        if model.tokenizer is None:
            raise SystemExit("--text needs a model with a tokenizer")
        with open(args.text) as fh:
            ids = model.tokenizer.encode(fh.read())
        n = min(args.seqs, len(ids) // args.len)
        if n == 0:
            raise SystemExit(f"{args.text} has fewer than {args.len} tokens")
        return np.asarray(ids[:n * args.len]).reshape(n, args.len)
    if args.model in builtin.BUILTIN_NAMES:  # byte-level: held-out stdlib files, one id per byte
        data = b"".join(builtin.read_documents(builtin.stdlib_files()[1],
                                               args.seqs * args.len))
        ids = np.frombuffer(data, np.uint8)[:args.seqs * args.len].astype(np.int32)
        return ids.reshape(-1, args.len)
    prompts = [[1 + i % (model.config.vocab_size - 1)] for i in range(args.seqs)]
    out = model.generate(prompts, max_new_tokens=args.len - 1, temperature=1.0, stop_tokens=[],
                         seed=123)
    return np.asarray([p + t for p, t in zip(prompts, out.tokens)])


def _nll_forward(model, tokens) -> float:
    logits = model.logits(tokens)[:, :-1]
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    return -float(jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)))


@functools.partial(jax.jit, static_argnames=("cfg", "rt", "cache_dtype"))
def _nll_cached(params, tokens, cfg, rt, cache_dtype):
    b, t = tokens.shape
    logits, cache = model_lib.prefill(params, tokens[:, :1], jnp.ones((b,), jnp.int32), cfg, rt,
                                      cache_dtype)
    cache = cache.extend(t)

    def step(carry, inputs):
        logits, cache = carry
        token = inputs
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
        logits, cache = model_lib.decode_step(params, token, cache, cfg, rt)
        return (logits, cache.replace(lengths=cache.lengths + 1)), nll

    _, nll = jax.lax.scan(step, (logits, cache), tokens[:, 1:].T)
    return jnp.mean(nll)


def _row(name, nll):
    print(f"| {name:<22} | {nll / math.log(2):>10.4f} | {math.exp(nll):>10.3f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group (default 128; 32 for the random checkpoint, d_ff = 160)")
    args = p.parse_args(argv)
    path = args.model or _random_checkpoint()
    if args.model is None and args.group_size is None:
        args.group_size = 32
    float_model = jaxinfer.load(path)
    tokens = _tokens(float_model, args)
    text = ("held-out text" if args.text or args.model in builtin.BUILTIN_NAMES
            else "float-model samples")
    print(f"# model {args.model or 'random llama (tests/hf_fixtures.py)'}, {tokens.shape[0]} x "
          f"{tokens.shape[1]} tokens of {text}")
    print("| variant                | bits/token | perplexity |")
    print("|------------------------|-----------:|-----------:|")
    _row("float32", _nll_forward(float_model, tokens))
    _row("int8 weights", _nll_forward(jaxinfer.load(path, quantize="int8"), tokens))
    int4 = jaxinfer.load(path, quantize="int4", group_size=args.group_size)
    groups = sorted({int(w.group_size) for w in jax.tree.leaves(
        int4.params, is_leaf=lambda x: hasattr(x, "group_size")) if hasattr(w, "group_size")})
    _row(f"int4 weights (g{'/'.join(map(str, groups))})", _nll_forward(int4, tokens))
    cfg, params = float_model.config, float_model.params
    rt = model_lib.Runtime(PhaseSharding.single_device())
    tokens_j = jnp.asarray(tokens, jnp.int32)
    _row("float KV (cached)", float(_nll_cached(params, tokens_j, cfg, rt, jnp.float32)))
    _row("int8 KV (cached)", float(_nll_cached(params, tokens_j, cfg, rt, jnp.int8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
