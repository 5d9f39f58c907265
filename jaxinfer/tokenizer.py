"""Thin wrapper over the `tokenizers` library for a checkpoint's ``tokenizer.json``."""

from __future__ import annotations

import os

import tokenizers

from jaxinfer.hf_weights import CheckpointError
from jaxinfer.validation import InvalidArgument


class Tokenizer:
    def __init__(self, path: str):
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust library raises plain Exception subclasses
            reason = " ".join(str(err).split())
            raise CheckpointError(f"cannot read tokenizer {path}: {reason}") from None

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer | None":
        path = os.path.join(directory, "tokenizer.json")
        return cls(path) if os.path.exists(path) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the tokenizer's own special tokens (e.g. BOS) added."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text to encode must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidArgument(f"text to encode is not valid Unicode: {err.reason} at "
                                  f"character {err.start}") from None
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
