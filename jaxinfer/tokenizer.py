"""Thin wrapper over the `tokenizers` library for a checkpoint's ``tokenizer.json``."""

from __future__ import annotations

import os

import tokenizers


class Tokenizer:
    def __init__(self, path: str):
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as err:
            raise ValueError(f"cannot read tokenizer {path}: {err}") from None

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer | None":
        path = os.path.join(directory, "tokenizer.json")
        return cls(path) if os.path.exists(path) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's own special tokens (e.g. BOS) added."""
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
