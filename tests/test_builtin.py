"""The built-in models shipped in the package: they load offline, write Python, and predict
held-out standard-library files (never seen in training) at the measured bits-per-byte."""

import math
import subprocess
import sys

import numpy as np
import pytest

import jaxinfer
from jaxinfer import builtin

# Measured on these windows: builtin 1.65, builtin-draft 2.40 bits/byte (Python 3.11 stdlib); the
# thresholds leave margin for another Python version's standard library.
MAX_HELD_OUT_BITS_PER_BYTE = {"builtin": 2.0, "builtin-draft": 2.8}


def _held_out_windows(n_windows=8, seq=128):
    _, held = builtin.stdlib_files()
    data = b"".join(builtin.read_documents(held, max_bytes=400_000))
    stream = np.frombuffer(data, np.uint8).astype(np.int32)
    starts = np.linspace(0, len(stream) - seq - 1, n_windows).astype(int)
    return np.stack([stream[s:s + seq + 1] for s in starts])


def bits_per_byte(model, windows) -> float:
    logits = model.logits(windows[:, :-1]).astype(np.float64)  # [B, T, V]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    return float(nll.mean() / math.log(2))


def test_split_is_by_file_and_deterministic():
    train, held = builtin.stdlib_files()
    assert held and train and not set(train) & set(held)
    assert builtin.stdlib_files() == (train, held)


def test_byte_tokenizer_ids_are_bytes():
    tok = builtin.byte_tokenizer()
    text = "def fib(n):\n\treturn 'é' if n else \"\\x00\""
    ids = tok.encode(text).ids
    assert ids[0] == builtin.BOS_ID
    assert ids[1:] == list(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["builtin", "builtin-draft"])
def test_builtin_held_out_bits_per_byte(name):
    model = jaxinfer.load(name)
    assert model.config.vocab_size == builtin.VOCAB_SIZE
    bpb = bits_per_byte(model, _held_out_windows())
    assert bpb < MAX_HELD_OUT_BITS_PER_BYTE[name], bpb


def test_builtin_draft_is_much_smaller():
    assert (jaxinfer.load("builtin-draft").config.param_count() * 10
            < jaxinfer.load("builtin").config.param_count())


def test_cli_default_model_writes_python():
    out = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--prompt", "def fib(n):",
                          "--max-new-tokens", "48"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def fib(n):")
    continuation = out.stdout[len("def fib(n):"):]
    assert len(continuation) > 10
    # Python-like: the continuation is mostly printable ASCII with newlines and indentation.
    printable = sum(c.isprintable() or c in "\n\t" for c in continuation) / len(continuation)
    assert printable > 0.95 and "\n" in continuation
