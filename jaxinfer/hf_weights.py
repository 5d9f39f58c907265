"""Hugging Face safetensors weights -> jaxinfer's parameter tree.

The conversion is a table: for each family, every jaxinfer leaf names its HF tensor and the reshape
that brings HF's ``[out, in]`` matrices to jaxinfer's ``[in, ...out]`` layout. Layer weights are
stacked along the leading ``layers`` axis. Missing tensors, wrong shapes and corrupt files raise
`CheckpointError` naming the tensor or file.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxinfer.config import ModelConfig
from jaxinfer.params import Params, check_params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class SafetensorsReader:
    """Reads tensors by name from a single ``model.safetensors`` or a sharded index."""

    def __init__(self, directory: str):
        self.directory = directory
        self._handles: dict[str, object] = {}
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            try:
                with open(index_path) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"corrupt safetensors index {index_path}: {err}") from None
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weight files in {directory}")
            weight_map = {}
            for name in files:
                for key in self._keys(name):
                    weight_map[key] = name
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        if filename not in self._handles:
            path = os.path.join(self.directory, filename)
            if not os.path.exists(path):
                raise CheckpointError(f"weight file {path} listed in the index is missing")
            try:
                self._handles[filename] = safe_open(path, framework="flax")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"corrupt weight file {path}: {err}") from None
        return self._handles[filename]

    def _keys(self, filename: str) -> list[str]:
        return list(self._open(filename).keys())

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint in "
                                  f"{self.directory}")
        filename = self.weight_map[name]
        try:
            return np.asarray(self._open(filename).get_tensor(name))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read weight {name!r} from "
                                  f"{os.path.join(self.directory, filename)}: {err}") from None


Read = Callable[[str], np.ndarray]


def _in_out(w: np.ndarray, *out_shape: int) -> np.ndarray:
    """HF linear weight [out, in] -> [in, *out_shape]."""
    return w.T.reshape(w.shape[1], *out_shape)


LayerLeaf = Callable[[Read, str], np.ndarray]  # (read, "model.layers.{i}.") -> one layer's leaf


def _llama_layer(cfg: ModelConfig) -> dict:
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    layer = {
        "attn_norm": {"scale": lambda r, p: r(p + "input_layernorm.weight")},
        "ffn_norm": {"scale": lambda r, p: r(p + "post_attention_layernorm.weight")},
        "wq": lambda r, p: _in_out(r(p + "self_attn.q_proj.weight"), N, H),
        "wk": lambda r, p: _in_out(r(p + "self_attn.k_proj.weight"), K, H),
        "wv": lambda r, p: _in_out(r(p + "self_attn.v_proj.weight"), K, H),
        "wo": lambda r, p: r(p + "self_attn.o_proj.weight").T.reshape(N, H, D),
        "w_gate": lambda r, p: r(p + "mlp.gate_proj.weight").T,
        "w_up": lambda r, p: r(p + "mlp.up_proj.weight").T,
        "w_down": lambda r, p: r(p + "mlp.down_proj.weight").T,
    }
    if cfg.qkv_bias:
        layer["bq"] = lambda r, p: r(p + "self_attn.q_proj.bias").reshape(N, H)
        layer["bk"] = lambda r, p: r(p + "self_attn.k_proj.bias").reshape(K, H)
        layer["bv"] = lambda r, p: r(p + "self_attn.v_proj.bias").reshape(K, H)
    return layer


def _falcon_layer(cfg: ModelConfig) -> dict:
    N, H, D = cfg.n_heads, cfg.head_dim, cfg.d_model

    def qkv(r: Read, p: str) -> np.ndarray:  # [(N + 2) * H, D]
        return r(p + "self_attention.query_key_value.weight")

    return {
        "attn_norm": {"scale": lambda r, p: r(p + "input_layernorm.weight"),
                      "bias": lambda r, p: r(p + "input_layernorm.bias")},
        "wq": lambda r, p: _in_out(qkv(r, p)[:N * H], N, H),
        "wk": lambda r, p: _in_out(qkv(r, p)[N * H:(N + 1) * H], 1, H),
        "wv": lambda r, p: _in_out(qkv(r, p)[(N + 1) * H:], 1, H),
        "wo": lambda r, p: r(p + "self_attention.dense.weight").T.reshape(N, H, D),
        "w_up": lambda r, p: r(p + "mlp.dense_h_to_4h.weight").T,
        "w_down": lambda r, p: r(p + "mlp.dense_4h_to_h.weight").T,
    }


def _global_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.name == "falcon":
        return {"embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f",
                "layers": "transformer.h."}
    return {"embed": "model.embed_tokens.weight", "norm": "model.norm", "layers": "model.layers."}


def _leaf_readers(cfg: ModelConfig) -> Params:
    """For every parameter leaf, a function (read) -> per-layer arrays (a generator) or an array."""
    names = _global_names(cfg)
    layer_leaves = (_falcon_layer if cfg.name == "falcon" else _llama_layer)(cfg)
    prefixes = [f"{names['layers']}{i}." for i in range(cfg.n_layers)]

    def stacked(leaf: LayerLeaf):
        # A generator: one layer's tensor is read (and can be sliced and dropped) at a time.
        return lambda read, layers=None: (leaf(read, prefixes[i])
                                          for i in (range(cfg.n_layers) if layers is None
                                                    else layers))

    def single(name: str, transpose: bool = False):
        return lambda read: read(name).T if transpose else read(name)

    readers: Params = {
        "embed": single(names["embed"]),
        "layers": jax.tree.map(stacked, layer_leaves),
        "final_norm": {"scale": single(names["norm"] + ".weight")},
    }
    if cfg.norm == "layer":
        readers["final_norm"]["bias"] = single(names["norm"] + ".bias")
    if not cfg.tie_embeddings:
        readers["unembed"] = single("lm_head.weight", transpose=True)
    return readers


def _reader_fn(reader: SafetensorsReader, dtype) -> Read:
    np_dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
    return lambda name: reader.get(name).astype(np_dtype)


def convert_hf_weights(reader: SafetensorsReader, cfg: ModelConfig, dtype) -> Params:
    """Read every tensor the config needs and return jaxinfer's (host numpy) parameter tree."""
    read = _reader_fn(reader, dtype)
    readers = _leaf_readers(cfg)
    params = {key: (jax.tree.map(lambda f: np.stack(list(f(read))), value) if key == "layers"
                    else jax.tree.map(lambda f: f(read), value))
              for key, value in readers.items()}
    try:
        check_params(cfg, params)
    except ValueError as err:
        raise CheckpointError(f"checkpoint in {reader.directory} does not match its config: "
                              f"{err}") from None
    return params


def read_hf_shard(reader: SafetensorsReader, cfg: ModelConfig, dtype, path: tuple[str, ...],
                  index: tuple[slice, ...]) -> np.ndarray:
    """One shard (`index` into the stacked parameter at `path`) read from the safetensors files.

    Only the layers inside ``index[0]`` are read for layer weights, one HF tensor at a time, so a
    process holding a shard never materializes the whole parameter (sharded loading).
    """
    read = _reader_fn(reader, dtype)
    fn = _leaf_readers(cfg)
    for key in path:
        fn = fn[key]
    if path[0] != "layers":
        return np.ascontiguousarray(fn(read)[index])
    layers = range(cfg.n_layers)[index[0]]
    return np.stack([layer[index[1:]] for layer in fn(read, layers)])
