"""Checkpoint sources: Hugging Face directories and jaxinfer's own orbax checkpoints.

A jaxinfer checkpoint directory holds ``jaxinfer.json`` (format version, `ModelConfig`, dtype),
``params/`` (an orbax-checkpoint pytree) and, when the model has one, ``tokenizer.json``.
A quantized model records ``"quantization": {"bits", "group_size"}`` in ``jaxinfer.json`` and
stores each `QuantizedWeight` as its ``data`` and ``scale`` arrays, restored without re-quantizing.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxinfer.config import ConfigError, ModelConfig
from jaxinfer.hf_config import config_from_hf
from jaxinfer.hf_weights import CheckpointError, SafetensorsReader, convert_hf_weights
from jaxinfer.params import Params, abstract_params

JAXINFER_META = "jaxinfer.json"
FORMAT_VERSION = 1


def is_jaxinfer_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, JAXINFER_META))


def is_hf_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt JSON in {path}: {err}") from None


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
                  tokenizer_file: str | None = None, quantization: dict | None = None) -> None:
    """Write params with orbax plus the config (and tokenizer) next to them."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"refusing to overwrite non-empty directory {path}")
    os.makedirs(path, exist_ok=True)
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), flax.serialization.to_state_dict(params))
    checkpointer.wait_until_finished()
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(path, "tokenizer.json"))
    meta = {"format": "jaxinfer", "version": FORMAT_VERSION, "config": cfg.to_dict(),
            "dtypes": dtypes}
    if quantization is not None:
        meta["quantization"] = quantization
    with open(os.path.join(path, JAXINFER_META), "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


def _read_jaxinfer_meta(path: str) -> tuple[ModelConfig, dict]:
    meta = _read_json(os.path.join(path, JAXINFER_META))
    if meta.get("format") != "jaxinfer" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported jaxinfer checkpoint format "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
    try:
        return ModelConfig.from_dict(meta["config"]), meta
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: corrupt model config in {JAXINFER_META}: {err}") from None


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
    try:
        metadata = checkpointer.metadata(params_dir)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)  # orbax >= 0.11 wraps the tree in TreeMetadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
        expected_tree = _expected_params(cfg, meta)
        expected = flax.serialization.to_state_dict(expected_tree)
        if shardings is not None:
            placed = flax.serialization.to_state_dict(shardings(expected_tree))
            target = jax.tree.map(lambda t, sh: jax.ShapeDtypeStruct(t.shape, t.dtype,
                                                                     sharding=sh),
                                  target, placed)
        if jax.tree.structure(target) != jax.tree.structure(expected):
            raise CheckpointError(f"{path}: stored parameter tree does not match its config")
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
        raise CheckpointError(f"cannot restore parameters from {params_dir}: {err}") from None
    return cfg, params
