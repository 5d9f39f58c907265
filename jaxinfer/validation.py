"""The one validation layer of jaxinfer's public arguments (API and CLI).

Every function checks one argument and returns it normalized: numpy integer / float scalars and
arrays are accepted as the Python ints / floats they hold, iterables (generators) are materialized
once. Nothing is coerced silently: a float or bool where an int is meant, a string where a number
is meant, a value out of range is an `InvalidArgument` (a `ValueError`) whose message names the
argument, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np

SEED_LIMIT = 2**63
"""Seeds are ints in [0, SEED_LIMIT)."""


class InvalidArgument(ValueError):
    """A public argument has the wrong type or a value outside what is allowed."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(name: str, value: Any, allowed: str) -> InvalidArgument:
    """The error for argument `name` holding `value`, which must be `allowed`."""
    return InvalidArgument(f"{name} must be {allowed}, got {_show(value)} "
                           f"({type(value).__name__})")


def _scalar(value: Any) -> Any:
    """A 0-d numpy or JAX array as the numpy scalar it holds; anything else unchanged."""
    if hasattr(value, "__array__") and getattr(value, "ndim", None) == 0:
        return np.asarray(value)[()]
    return value


def _is_int(value: Any) -> bool:
    """A Python or numpy integer (0-d integer arrays included), never a bool."""
    value = _scalar(value)
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, (numbers.Real, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def integer(name: str, value: Any, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """An int in [minimum, maximum] (bounds inclusive, None = unbounded)."""
    lo = "-inf" if minimum is None else minimum
    hi = "inf" if maximum is None else maximum
    allowed = f"an int in [{lo}, {hi}]"
    if not _is_int(value):
        raise fail(name, value, allowed)
    out = int(_scalar(value))
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise fail(name, value, allowed)
    return out


def optional_integer(name: str, value: Any, minimum: int | None = None,
                     maximum: int | None = None) -> int | None:
    return None if value is None else integer(name, value, minimum, maximum)


def real(name: str, value: Any, low: float, high: float = math.inf,
         low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with `low_open`)."""
    allowed = f"a finite number in {'(' if low_open else '['}{low}, {high}]"
    if not _is_real(value):
        raise fail(name, value, allowed)
    out = float(_scalar(value))
    if not math.isfinite(out) or out > high or out < low or (low_open and out == low):
        raise fail(name, value, allowed)
    return out


def optional_real(name: str, value: Any, low: float, high: float = math.inf,
                  low_open: bool = False) -> float | None:
    return None if value is None else real(name, value, low, high, low_open)


def seed(value: Any) -> int:
    return integer("seed", value, 0, SEED_LIMIT - 1)


def max_new_tokens(value: Any) -> int:
    return integer("max_new_tokens", value, 1)


def sampling(temperature: Any, top_k: Any, top_p: Any, min_p: Any,
             repetition_penalty: Any) -> dict[str, Any]:
    """The sampling arguments as `SamplingConfig` keywords (Python ints / floats / None)."""
    return dict(temperature=real("temperature", temperature, 0.0),
                top_k=optional_integer("top_k", top_k, 1),
                top_p=optional_real("top_p", top_p, 0.0, 1.0, low_open=True),
                min_p=optional_real("min_p", min_p, 0.0, 1.0),
                repetition_penalty=optional_real("repetition_penalty", repetition_penalty, 0.0,
                                                 low_open=True))


def token_ids(name: str, value: Any) -> list[int]:
    """A sequence of token ids: a list / tuple / 1-D integer array / iterable of ints."""
    if isinstance(value, (str, bytes, dict, set, frozenset)) or _is_int(value):
        raise fail(name, value, "a sequence of int token ids")
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not (np.issubdtype(value.dtype, np.integer)
                                   and value.dtype != np.bool_):
            raise InvalidArgument(f"{name} must be a 1-D integer array of token ids, got an "
                                  f"array of dtype {value.dtype} and shape {value.shape}")
        return [int(t) for t in value]
    try:
        items = list(value)
    except TypeError:
        raise fail(name, value, "a sequence of int token ids") from None
    for i, t in enumerate(items):
        if not _is_int(t):
            raise fail(f"{name}[{i}]", t, "an int token id (not a float or bool)")
    return [int(t) for t in items]


def ids_in_vocab(sequences, vocab: int, item: str = "prompt {i}") -> None:
    """Raise `InvalidArgument` naming the first token id of `sequences` outside [0, vocab);
    `item` names sequence i in the message."""
    for i, seq in enumerate(sequences):
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"{item.format(i=i)} has token id {bad[0]} outside the "
                                  f"vocabulary [0, {vocab})")


def _text(name: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidArgument(f"{name} is not valid Unicode text: {err.reason} at character "
                              f"{err.start} ({text[err.start:err.end]!r})") from None
    return text


def prompts(value: Any) -> list[str] | list[list[int]]:
    """A batch of prompts: one string, or a sequence (list, tuple, 2-D integer array, generator)
    of strings or of token-id sequences, all of one kind."""
    if isinstance(value, str):
        return [_text("prompts[0]", value)]
    if isinstance(value, np.ndarray):
        if value.ndim != 2:
            raise InvalidArgument(f"prompts given as an array must be 2-D [B, T] token ids, got "
                                  f"shape {value.shape}")
        return [token_ids(f"prompts[{i}]", row) for i, row in enumerate(value)]
    if isinstance(value, (bytes, dict, set, frozenset)) or value is None or _is_real(value):
        raise fail("prompts", value, "a string or a sequence of prompts (strings or token-id "
                   "lists)")
    try:
        items = list(value)
    except TypeError:
        raise fail("prompts", value, "a string or a sequence of prompts") from None
    if not items:
        raise InvalidArgument("prompts must hold at least one prompt, got none (no prompts "
                              "given)")
    if all(_is_int(t) for t in items):
        raise InvalidArgument(f"prompts must be a list of prompts, got a flat list of token ids "
                              f"{_show(items)}: wrap one prompt in a list, e.g. [[1, 2, 3]]")
    if all(isinstance(p, str) for p in items):
        return [_text(f"prompts[{i}]", p) for i, p in enumerate(items)]
    if any(isinstance(p, str) for p in items):
        raise InvalidArgument("prompts must be all strings or all token-id lists, not a mix")
    return [token_ids(f"prompts[{i}]", p) for i, p in enumerate(items)]


def stop_tokens(value: Any) -> tuple[int, ...] | None:
    """None (the checkpoint's EOS ids) or a sequence of token ids ([] = never stop early)."""
    if value is None:
        return None
    if _is_int(value):
        raise InvalidArgument(f"stop_tokens must be a sequence of token ids, got the single int "
                              f"{int(value)}: write stop_tokens=[{int(value)}]")
    return tuple(token_ids("stop_tokens", value))


def logits_tokens(value: Any) -> np.ndarray:
    """Token ids [B, T] for `Model.logits`: a nested list or an integer array (not float/bool)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise fail("tokens", value, "an integer array [B, T] of token ids")
    if not isinstance(value, np.ndarray):
        try:
            rows = list(value)
        except TypeError:
            raise fail("tokens", value, "an integer array [B, T] of token ids") from None
        rows = [token_ids(f"tokens[{i}]", r) for i, r in enumerate(rows)]
        if len({len(r) for r in rows}) > 1:
            raise InvalidArgument(f"tokens must be a rectangular [B, T] array, got rows of "
                                  f"lengths {[len(r) for r in rows]}")
        if not rows:
            raise InvalidArgument("tokens must hold at least one sequence, got none")
        value = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)
    if value.ndim != 2 or value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.integer):
        raise InvalidArgument(f"tokens must be an integer array [B, T], got dtype {value.dtype} "
                              f"and shape {value.shape}")
    if value.shape[0] == 0:
        raise InvalidArgument("tokens must hold at least one sequence, got shape "
                              f"{value.shape}")
    return value


def dtype_name(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """A dtype given as a name ('float32'), a numpy/JAX dtype or scalar type, as its name."""
    if isinstance(value, str):
        key = value
    else:
        try:
            key = np.dtype(value).name if value is not None and not _is_real(value) else None
        except TypeError:
            key = None
    if key not in allowed:
        raise fail(name, value, f"one of {allowed}")
    return key


def _path_like(name: str, value: Any) -> str:
    if value is None or not isinstance(value, (str, os.PathLike)):
        raise fail(name, value, "a path (str or os.PathLike)")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise fail(name, value, "a non-empty path")
    return path


def source_path(value: Any) -> str:
    """`load`'s source: a path or a built-in model name, as a str (existence checked by load)."""
    return _path_like("source", value)


def save_path(value: Any) -> str:
    """`Model.save`'s path, which must not be an existing file."""
    path = _path_like("path", value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"path {path!r} is an existing file; save needs a directory path")
    return path


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise fail(name, value, "True or False")
    return bool(value)


def stop_strings(value: Any) -> tuple[str, ...]:
    """Stop strings: None / [] (none), one non-empty string, or a sequence of them."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (bytes, dict, set, frozenset)) or _is_real(items):
        raise fail("stop", value, "a string or a list of non-empty strings")
    try:
        items = list(items)
    except TypeError:
        raise fail("stop", value, "a string or a list of non-empty strings") from None
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise fail(f"stop[{i}]", s, "a non-empty string")
        _text(f"stop[{i}]", s)
    return tuple(items)


def one_or_many_prompts(value: Any) -> list[str] | list[list[int]]:
    """`prompts`, where one prompt (a string, or a flat sequence of token ids) is also accepted
    and stands for a batch of one."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return prompts(value[None])
    if isinstance(value, (list, tuple)) and value and all(_is_int(t) for t in value):
        return prompts([value])
    return prompts(value)
