"""The built-in models: small byte-level decoders jaxinfer trained on the Python standard library.

``jaxinfer.load("builtin")`` and ``jaxinfer.load("builtin-draft")`` resolve to checkpoints shipped
inside the package (`jaxinfer/builtin_models/`), written by ``scripts/train_builtin.py``. Their
tokenizer is byte-level: token id b < 256 is the byte b; the special tokens follow.

The corpus and its held-out split live here, not in the script, so tests measure held-out
bits-per-byte on exactly the files training never saw.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib

import tokenizers

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin_models")
BUILTIN_NAMES = {"builtin": "builtin", "builtin-draft": "builtin-draft"}

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 264  # 256 bytes + 3 specials, padded to a multiple of 8
SPECIALS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
HELD_OUT_EVERY = 20
"""A file is held out when crc32 of its path relative to the stdlib root is divisible by this."""


def builtin_path(name: str) -> str | None:
    """Directory of a built-in checkpoint, or None when `name` is not a built-in name."""
    if name not in BUILTIN_NAMES:
        return None
    return os.path.join(BUILTIN_DIR, BUILTIN_NAMES[name])


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (GPT-2)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> tokenizers.Tokenizer:
    """A `tokenizers` byte-level tokenizer whose ids are the byte values; BOS prepended."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update(SPECIALS)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                            use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return tok


def stdlib_files() -> tuple[list[str], list[str]]:
    """(train, held-out) .py files of this interpreter's standard library, split by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and "dist-packages" not in f)
    train, held_out = [], []
    for path in files:
        rel = os.path.relpath(path, root).encode()
        (held_out if zlib.crc32(rel) % HELD_OUT_EVERY == 0 else train).append(path)
    return train, held_out


def read_documents(paths: list[str], max_bytes: int | None = None) -> list[bytes]:
    """File contents as bytes (unreadable files skipped), stopping after `max_bytes` in total."""
    docs, total = [], 0
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if not data:
            continue
        docs.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return docs
