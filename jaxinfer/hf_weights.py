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


def _llama_layer(read: Read, prefix: str, cfg: ModelConfig) -> dict:
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    layer = {
        "attn_norm": {"scale": read(prefix + "input_layernorm.weight")},
        "ffn_norm": {"scale": read(prefix + "post_attention_layernorm.weight")},
        "wq": _in_out(read(prefix + "self_attn.q_proj.weight"), N, H),
        "wk": _in_out(read(prefix + "self_attn.k_proj.weight"), K, H),
        "wv": _in_out(read(prefix + "self_attn.v_proj.weight"), K, H),
        "wo": read(prefix + "self_attn.o_proj.weight").T.reshape(N, H, D),
        "w_gate": read(prefix + "mlp.gate_proj.weight").T,
        "w_up": read(prefix + "mlp.up_proj.weight").T,
        "w_down": read(prefix + "mlp.down_proj.weight").T,
    }
    if cfg.qkv_bias:
        layer["bq"] = read(prefix + "self_attn.q_proj.bias").reshape(N, H)
        layer["bk"] = read(prefix + "self_attn.k_proj.bias").reshape(K, H)
        layer["bv"] = read(prefix + "self_attn.v_proj.bias").reshape(K, H)
    return layer


def _falcon_layer(read: Read, prefix: str, cfg: ModelConfig) -> dict:
    N, H, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    qkv = read(prefix + "self_attention.query_key_value.weight")  # [(N + 2) * H, D]
    return {
        "attn_norm": {"scale": read(prefix + "input_layernorm.weight"),
                      "bias": read(prefix + "input_layernorm.bias")},
        "wq": _in_out(qkv[:N * H], N, H),
        "wk": _in_out(qkv[N * H:(N + 1) * H], 1, H),
        "wv": _in_out(qkv[(N + 1) * H:], 1, H),
        "wo": read(prefix + "self_attention.dense.weight").T.reshape(N, H, D),
        "w_up": read(prefix + "mlp.dense_h_to_4h.weight").T,
        "w_down": read(prefix + "mlp.dense_4h_to_h.weight").T,
    }


def _global_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.name == "falcon":
        return {"embed": "transformer.word_embeddings.weight", "norm": "transformer.ln_f",
                "layers": "transformer.h."}
    return {"embed": "model.embed_tokens.weight", "norm": "model.norm", "layers": "model.layers."}


def _stack(layers: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def convert_hf_weights(reader: SafetensorsReader, cfg: ModelConfig, dtype) -> Params:
    """Read every tensor the config needs and return jaxinfer's (host numpy) parameter tree."""
    np_dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)

    def read(name: str) -> np.ndarray:
        return reader.get(name).astype(np_dtype)

    names = _global_names(cfg)
    layer_fn = _falcon_layer if cfg.name == "falcon" else _llama_layer
    params: Params = {
        "embed": read(names["embed"]),
        "layers": _stack([layer_fn(read, f"{names['layers']}{i}.", cfg)
                          for i in range(cfg.n_layers)]),
        "final_norm": {"scale": read(names["norm"] + ".weight")},
    }
    if cfg.norm == "layer":
        params["final_norm"]["bias"] = read(names["norm"] + ".bias")
    if not cfg.tie_embeddings:
        params["unembed"] = read("lm_head.weight").T
    try:
        check_params(cfg, params)
    except ValueError as err:
        raise CheckpointError(f"checkpoint in {reader.directory} does not match its config: "
                              f"{err}") from None
    return params
