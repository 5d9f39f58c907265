"""Train the built-in byte-level models on the Python standard library (see `jaxinfer.builtin`).

Uses jaxinfer's own config and model functions (`forward_logits`) with optax AdamW. Writes the
checkpoints (bfloat16) into `jaxinfer/builtin_models/{builtin,builtin-draft}` and a loss-curve PNG.

    python scripts/train_builtin.py                 # both models, ~25 min on 2 CPU cores
    python scripts/train_builtin.py --steps 20 --draft-steps 20 --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxinfer
from jaxinfer import builtin, model
from jaxinfer.config import ModelConfig
from jaxinfer.params import init_params
from jaxinfer.sharding import PhaseSharding

MAIN = ModelConfig(vocab_size=builtin.VOCAB_SIZE, d_model=192, n_layers=4, n_heads=6,
                   n_kv_heads=2, head_dim=32, d_ff=512, max_context=1024, activation="silu",
                   gated_ffn=True, norm="rms", rope_theta=10000.0, tie_embeddings=True,
                   eos_token_ids=(builtin.EOS_ID,), bos_token_id=builtin.BOS_ID,
                   name="jaxinfer-builtin")
DRAFT = MAIN.replace(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=192,
                     name="jaxinfer-builtin-draft")


def encode_corpus(docs: list[bytes]) -> np.ndarray:
    """Documents as one int32 stream: <bos> bytes... <eos> per document."""
    parts = []
    for doc in docs:
        parts += [np.array([builtin.BOS_ID], np.int32), np.frombuffer(doc, np.uint8).astype(np.int32),
                  np.array([builtin.EOS_ID], np.int32)]
    return np.concatenate(parts)


def batches(stream: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        yield np.stack([stream[s:s + seq + 1] for s in starts])


def loss_fn(params, windows, cfg: ModelConfig):
    """Mean next-token cross-entropy (nats) of windows [B, T+1]."""
    rt = model.Runtime(PhaseSharding.single_device())
    logits = model.forward_logits(params, windows[:, :-1], cfg, rt)  # [B, T, V] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def make_step(cfg: ModelConfig, optimizer):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, windows):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows, cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate(params, stream: np.ndarray, cfg: ModelConfig, seq: int, n_windows: int) -> float:
    """Held-out bits per token (bytes, plus the odd <bos>/<eos>) on fixed evenly spaced windows."""
    starts = np.linspace(0, len(stream) - seq - 2, n_windows).astype(int)
    windows = np.stack([stream[s:s + seq + 1] for s in starts])
    eval_loss = jax.jit(functools.partial(loss_fn, cfg=cfg))
    losses = [float(eval_loss(params, windows[i:i + 8])) for i in range(0, n_windows, 8)]
    return float(np.mean(losses)) / math.log(2)


def train(cfg: ModelConfig, train_stream, held_stream, steps: int, batch: int, seq: int,
          lr: float, seed: int, label: str, progress) -> tuple[dict, list[float], float, float]:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps,
                                                  end_value=lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05))
    params = init_params(cfg, jax.random.key(seed), jnp.float32)
    opt_state = optimizer.init(params)
    step = make_step(cfg, optimizer)
    data = batches(train_stream, batch, seq, seed)
    losses = []
    task = progress.add_task(label, total=steps)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(data)))
        if i % 10 == 0 or i == steps - 1:
            losses.append((i, float(loss) / math.log(2)))
            progress.update(task, completed=i + 1,
                            description=f"{label} loss {losses[-1][1]:.2f} bits/token")
    elapsed = time.perf_counter() - start
    held_bpb = evaluate(params, held_stream, cfg, seq, 64)
    progress.update(task, completed=steps, description=f"{label} held-out {held_bpb:.3f} bits")
    return params, losses, held_bpb, elapsed


def save(cfg: ModelConfig, params, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    compact = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = os.path.join(tmp, "tokenizer.json")
        builtin.byte_tokenizer().save(tok_file)
        model_obj = jaxinfer.Model(cfg, compact, jaxinfer.tokenizer.Tokenizer(tok_file))
        model_obj.save(path)
    return path


def plot(curves: dict[str, list], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (bits/token)")
    ax.set_title("built-in models on the Python standard library")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--draft-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=builtin.BUILTIN_DIR)
    parser.add_argument("--plot", default=os.path.join("scripts", "builtin_loss.png"))
    args = parser.parse_args()

    train_files, held_files = builtin.stdlib_files()
    train_stream = encode_corpus(builtin.read_documents(train_files))
    held_stream = encode_corpus(builtin.read_documents(held_files))
    report = {"train_files": len(train_files), "held_out_files": len(held_files),
              "train_tokens": int(len(train_stream)), "held_out_tokens": int(len(held_stream))}
    curves = {}
    with Progress() as progress:
        for cfg, steps, name in ((MAIN, args.steps, "builtin"),
                                 (DRAFT, args.draft_steps, "builtin-draft")):
            params, losses, held_bpb, elapsed = train(
                cfg, train_stream, held_stream, steps, args.batch, args.seq, args.lr, args.seed,
                name, progress)
            path = save(cfg, params, args.out, name)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
                       for f in fs)
            curves[name] = losses
            report[name] = {"params": cfg.param_count(), "steps": steps,
                            "train_seconds": round(elapsed, 1),
                            "held_out_bits_per_token": round(held_bpb, 4),
                            "final_train_bits_per_token": round(losses[-1][1], 4),
                            "checkpoint_bytes": size}
    plot(curves, args.plot)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
