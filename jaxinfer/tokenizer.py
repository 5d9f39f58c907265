"""Thin wrapper over the `tokenizers` library for a checkpoint's ``tokenizer.json`` (and the
chat template of its ``tokenizer_config.json``), with incremental decoding for streaming."""

from __future__ import annotations

import json
import os

import tokenizers

from jaxinfer.hf_weights import CheckpointError
from jaxinfer.validation import InvalidArgument

REPLACEMENT_CHAR = "\ufffd"
"""What decoding shows for bytes that are not (yet) a whole UTF-8 character."""

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
"""The special tokens transformers passes to a chat template (its special_tokens_map)."""


def _read_tokenizer_config(directory: str) -> dict:
    """The checkpoint's ``tokenizer_config.json`` as a dict ({} when there is none)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _special_token(config: dict, name: str) -> str | None:
    """A special token of ``tokenizer_config.json`` (a string, or an AddedToken dict)."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, `incremental` decoding and the optional
    chat template (`chat_template`, the Jinja source from ``tokenizer_config.json``)."""

    def __init__(self, path: str, config: dict | None = None):
        """path: a ``tokenizer.json``; config: the parsed ``tokenizer_config.json`` (or None)."""
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # the Rust library raises plain Exception subclasses
            reason = " ".join(str(err).split())
            raise CheckpointError(f"cannot read tokenizer {path}: {reason}") from None
        config = config or {}
        template = config.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(
                f"chat_template in the tokenizer_config.json beside {path} must be a string "
                f"(one Jinja template), got {type(template).__name__}")
        self.chat_template: str | None = template
        self.special_tokens: dict[str, str] = {
            name: token for name in SPECIAL_TOKEN_NAMES
            if (token := _special_token(config, name)) is not None}
        """The special tokens ``tokenizer_config.json`` names (what a chat template sees)."""

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer | None":
        path = os.path.join(directory, "tokenizer.json")
        return cls(path, _read_tokenizer_config(directory)) if os.path.exists(path) else None

    def __repr__(self) -> str:
        chat = "with chat template" if self.chat_template else "no chat template"
        return (f"Tokenizer({self._tok.get_vocab_size(with_added_tokens=True)} tokens, "
                f"{self.path}, {chat})")

    @property
    def vocab_size(self) -> int:
        """Tokens of the vocabulary, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's own special tokens (e.g. BOS) added unless
        `add_special_tokens` is False (a chat template writes them itself)."""
        if not isinstance(text, str):
            raise InvalidArgument(f"text to encode must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidArgument(f"text to encode is not valid Unicode: {err.reason} at "
                                  f"character {err.start}") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def incremental(self) -> "IncrementalDecoder":
        """A decoder that turns a growing token sequence into text deltas (`IncrementalDecoder`)."""
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Text deltas of a token sequence that grows a few ids at a time.

    A delta never ends inside a multi-byte UTF-8 character: while the decoded text ends with the
    replacement character (bytes of a character still to come), it is held back. Each step
    decodes a short window (the tokens since the previous delta, with the ones before it as
    context, as vLLM does), so streaming n tokens costs O(n), and the deltas joined equal
    `Tokenizer.decode` of all the ids once `finish` has been called."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        """Start of the decoding window (context for the tokens after `_read`)."""
        self._read = 0
        """Tokens whose text has been emitted."""

    def _window_delta(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read])
        return before, decode(self._ids[self._prefix:])

    def push(self, ids: list[int]) -> str:
        """Add generated ids; the new text that is complete (possibly "")."""
        self._ids.extend(ids)
        before, text = self._window_delta()
        if len(text) <= len(before) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

    def finish(self) -> str:
        """The rest of the text, incomplete characters included (as `decode` shows them)."""
        before, text = self._window_delta()
        self._prefix = self._read = len(self._ids)
        return text[len(before):]
