"""Checkpoint sources: Hugging Face directories and jaxinfer's own orbax checkpoints.

A jaxinfer checkpoint directory holds ``jaxinfer.json`` (format version, `ModelConfig`, dtype),
``params/`` (an orbax-checkpoint pytree) and, when the model has one, ``tokenizer.json`` (and the
``tokenizer_config.json`` beside it: special tokens, chat template).
A quantized model records ``"quantization": {"bits", "group_size"}`` in ``jaxinfer.json`` and
stores each `QuantizedWeight` as its ``data`` and ``scale`` arrays, restored without re-quantizing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time

import flax.serialization
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.hf_config import config_from_hf
from jaxinfer.hf_weights import CheckpointError, SafetensorsReader, convert_hf_weights
from jaxinfer.params import Params, abstract_params

JAXINFER_META = "jaxinfer.json"
FORMAT_VERSION = 2
"""2: ``layers`` is a list of per-layer weight dicts (1, before: weights stacked [L, ...])."""


def is_jaxinfer_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, JAXINFER_META))


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _read_json(path: str) -> dict:
    """A JSON object from `path`; anything else (bad JSON, a list, unreadable) is an error."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt JSON in {path}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a JSON "
                              f"{type(data).__name__}")
    return data


def read_hf_config(path: str) -> ModelConfig:
    """The `ModelConfig` of an HF checkpoint directory (no weights are read)."""
    gen_path = os.path.join(path, "generation_config.json")
    generation = _read_json(gen_path) if os.path.exists(gen_path) else None
    return config_from_hf(_read_json(os.path.join(path, "config.json")), generation)


def read_config(path: str) -> ModelConfig:
    """The `ModelConfig` of any supported checkpoint directory."""
    if is_jaxinfer_checkpoint(path):
        return _read_jaxinfer_meta(path)[0]
    if is_hf_checkpoint(path):
        return read_hf_config(path)
    raise CheckpointError(f"{path} is neither a jaxinfer checkpoint ({JAXINFER_META}) nor a "
                          "Hugging Face checkpoint (config.json)")


def load_hf(path: str, dtype) -> tuple[ModelConfig, Params]:
    cfg = read_hf_config(path)
    params = convert_hf_weights(SafetensorsReader(path), cfg, dtype)
    return cfg, jax.tree.map(jnp.asarray, params)


def read_quantization(path: str) -> dict | None:
    """The ``quantization`` record of a jaxinfer checkpoint (None: float weights)."""
    return _read_json(os.path.join(path, JAXINFER_META)).get("quantization")


def _expected_params(cfg: ModelConfig, meta: dict) -> Params:
    from jaxinfer import quant  # quant imports the kernels; only quantized checkpoints need it

    if meta.get("quantization") is None:
        return abstract_params(cfg)
    return quant.abstract_quantized_params(cfg, quant.QuantConfig.from_dict(meta["quantization"]))


def save_jaxinfer(path: str, cfg: ModelConfig, params: Params,
                  tokenizer_file: str | None = None, quantization: dict | None = None,
                  overwrite: bool = False) -> None:
    """Write params with orbax plus the config (and tokenizer) next to them, atomically.

    Everything is written into a temporary sibling directory that is renamed into place once
    complete and removed on any failure (a full disk included), so `path` either holds the whole
    checkpoint or is left as it was. A non-empty `path` is replaced only with `overwrite`."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"refusing to overwrite non-empty directory {path} "
                              "(pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.saving-", dir=parent)
    try:
        write_checkpoint(tmp, cfg, params, tokenizer_file, quantization)
        _move_into_place(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot save checkpoint to {path}: {err.strerror or err}; "
                                  "nothing was written there") from err
        raise


def write_checkpoint(directory: str, cfg: ModelConfig, params: Params,
                     tokenizer_file: str | None, quantization: dict | None) -> None:
    """The checkpoint's files, written into the (empty) `directory`."""
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "params"), flax.serialization.to_state_dict(params))
    checkpointer.wait_until_finished()
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.json"))
        config = os.path.join(os.path.dirname(tokenizer_file), "tokenizer_config.json")
        if os.path.isfile(config):  # special tokens and the chat template travel with it
            shutil.copyfile(config, os.path.join(directory, "tokenizer_config.json"))
    meta = {"format": "jaxinfer", "version": FORMAT_VERSION, "config": cfg.to_dict(),
            "dtypes": dtypes}
    if quantization is not None:
        meta["quantization"] = quantization
    with open(os.path.join(directory, JAXINFER_META), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


def _move_into_place(tmp: str, path: str) -> None:
    """Rename the finished `tmp` to `path`; an existing `path` is moved aside first and deleted
    only after the rename succeeded (restored if it failed)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-",
                             dir=os.path.dirname(path))
    old = os.path.join(aside, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _read_jaxinfer_meta(path: str) -> tuple[ModelConfig, dict]:
    meta = _read_json(os.path.join(path, JAXINFER_META))
    if meta.get("format") == "jaxinfer" and meta.get("version") == 1:
        raise CheckpointError(f"{path}: a version-1 jaxinfer checkpoint (layer weights stacked "
                              f"[layers, ...]); this jaxinfer reads version {FORMAT_VERSION} "
                              "(one entry per layer): load its source checkpoint and save again")
    if meta.get("format") != "jaxinfer" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported jaxinfer checkpoint format "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
    try:
        return ModelConfig.from_dict(meta["config"]), meta
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: corrupt model config in {JAXINFER_META}: {err}") from None


_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore")
_SETTLE_S = 1.0


@contextlib.contextmanager
def quiet_restore():
    """Silence what orbax / TensorStore print about a corrupt checkpoint while it is read: their
    log records and, from TensorStore's callbacks into an event loop orbax already closed, a
    stream of "Event loop is closed" RuntimeErrors (reported through `sys.unraisablehook`). The
    one `CheckpointError` raised by `load_jaxinfer` says what is wrong. After a failure the
    callbacks still in flight are given up to `_SETTLE_S` seconds to arrive (and be dropped)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    previous_hook = sys.unraisablehook
    arrived = threading.Event()

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError):
            arrived.set()
        else:
            previous_hook(unraisable)

    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        deadline = time.monotonic() + _SETTLE_S
        while time.monotonic() < deadline and arrived.wait(0.05):
            arrived.clear()
        raise
    finally:
        sys.unraisablehook = previous_hook
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_jaxinfer(path: str, shardings=None) -> tuple[ModelConfig, Params]:
    """Restore a jaxinfer checkpoint. shardings: optional function (expected abstract params ->
    a tree of `jax.sharding.Sharding`); orbax then restores each array straight into its shards,
    every process reading only the shards its devices hold."""
    path = os.path.abspath(path)
    cfg, meta = _read_jaxinfer_meta(path)
    checkpointer = ocp.StandardCheckpointer()
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"cannot restore parameters: {params_dir} does not exist")
    with quiet_restore():
        return cfg, _restore(checkpointer, path, params_dir, cfg, meta, shardings)


def _restore(checkpointer, path: str, params_dir: str, cfg: ModelConfig, meta: dict,
             shardings) -> Params:
    try:
        metadata = checkpointer.metadata(params_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)  # orbax >= 0.11 wraps the tree in TreeMetadata
        if tree is None:
            raise CheckpointError(f"{path}: the parameters in {params_dir} are corrupt or "
                                  "incomplete (orbax cannot read their metadata)")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        expected_tree = _expected_params(cfg, meta)
        expected = flax.serialization.to_state_dict(expected_tree)
        if shardings is not None:
            placed = flax.serialization.to_state_dict(shardings(expected_tree))
            target = jax.tree.map(lambda t, sh: jax.ShapeDtypeStruct(t.shape, t.dtype,
                                                                     sharding=sh),
                                  target, placed)
        if jax.tree.structure(target) != jax.tree.structure(expected):
            raise CheckpointError(f"{path}: stored parameter tree does not match its config "
                                  "(corrupt, incomplete or from another model)")
        for (key, got), want in zip(jax.tree_util.tree_leaves_with_path(target),
                                    jax.tree.leaves(expected)):
            if got.shape != want.shape:
                raise CheckpointError(
                    f"{path}: parameter {jax.tree_util.keystr(key)} has shape {got.shape}, "
                    f"which does not match its config (expected {want.shape})")
        params = flax.serialization.from_state_dict(
            expected_tree, checkpointer.restore(params_dir, target))
    except CheckpointError:
        raise
    except Exception as err:  # orbax / tensorstore raise many error types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot restore parameters from {params_dir} (corrupt or "
                              f"incomplete checkpoint): {first_line[:300]}") from None
    return params
