"""Hugging Face safetensors weights -> jaxinfer's parameter tree.

The conversion is a table: for each family, every jaxinfer leaf names its HF tensor and the reshape
that brings HF's ``[out, in]`` matrices to jaxinfer's ``[in, ...out]`` layout. Layer weights are
stacked along the leading ``layers`` axis. Missing tensors, wrong shapes and corrupt files raise
`CheckpointError` naming the tensor or file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
import safetensors

from jaxinfer.config import ModelConfig
from jaxinfer.params import Params, check_params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CHUNK_BYTES = 32 * 2**20
"""A read copies at most this many bytes of whole rows per memory map (see `get_block`)."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors dtypes a weight may have (converted to the load dtype); an integer or bool weight
is an error, never a silent cast."""


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    filename: str
    """The safetensors file holding the tensor (relative to the checkpoint directory)."""
    dtype: str
    """safetensors dtype name ('F32', 'BF16', 'I32', ...)."""
    shape: tuple[int, ...]
    """The tensor's shape as stored."""


class SafetensorsReader:
    """Reads tensors, or row/column blocks of them, by name from a single ``model.safetensors``
    or a sharded index, through the `safetensors` library.

    A block is ``safe_open(...).get_slice(name)[rows, cols]``: a slice through the file's memory
    map, which touches only the pages of those rows. Each read opens the file and closes it
    afterwards, so the map (and its resident pages) lives only while a block is copied out: a
    process loading its shard holds that shard only (sharded multi-host loading, `read_hf_shard`).
    """

    bytes_read = 0
    """Bytes read from weight files by all readers of this process (loading statistics)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._headers: dict[str, dict[str, _TensorInfo]] = {}
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            weight_map = _read_index(index_path)
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weight files in {directory}")
            weight_map = {}
            for name in files:
                for key in self._header(name):
                    weight_map[key] = name
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        path = os.path.join(self.directory, filename)
        if not os.path.exists(path):
            raise CheckpointError(f"weight file {path} listed in the index is missing")
        try:
            return safetensors.safe_open(path, framework="numpy")
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt weight file {path}: {err}") from None

    def _header(self, filename: str) -> dict[str, _TensorInfo]:
        if filename not in self._headers:
            with self._open(filename) as fh:
                infos = {}
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    infos[name] = _TensorInfo(filename, sl.get_dtype(), tuple(sl.get_shape()))
            self._headers[filename] = infos
        return self._headers[filename]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> _TensorInfo:
        if name not in self.weight_map:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint in "
                                  f"{self.directory}")
        header = self._header(self.weight_map[name])
        if name not in header:
            raise CheckpointError(f"weight {name!r} is missing from "
                                  f"{os.path.join(self.directory, self.weight_map[name])}")
        return header[name]

    def get(self, name: str) -> np.ndarray:
        return self.get_block(name, slice(None))

    def get_block(self, name: str, rows: slice, cols: slice | None = None) -> np.ndarray:
        """``tensor[rows]`` (``tensor[rows, cols]`` for a matrix), reading only those rows.

        Rows are copied out in blocks of at most `_CHUNK_BYTES` of whole rows, each through its
        own short-lived map, so a column shard never has the pages of all its rows resident."""
        info = self.info(name)
        if not info.shape:
            with self._open(info.filename) as fh:
                return np.asarray(fh.get_slice(name)[:]).reshape(())
        r0, r1, step = rows.indices(info.shape[0])
        if step != 1:
            raise ValueError(f"get_block reads contiguous rows, got step {step}")
        row_bytes = math.prod(info.shape[1:]) * np.dtype(_ST_DTYPES[info.dtype]).itemsize
        chunk = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        out = []
        for a in range(r0, max(r1, r0 + 1), chunk):
            b = min(a + chunk, r1)
            with self._open(info.filename) as fh:
                sl = fh.get_slice(name)
                out.append(np.asarray(sl[a:b] if cols is None else sl[a:b, cols]))
            SafetensorsReader.bytes_read += out[-1].nbytes
        return out[0] if len(out) == 1 else np.concatenate(out)


def _read_index(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt safetensors index {index_path}: {err!r}") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"corrupt safetensors index {index_path}: weight_map must map "
                              "tensor names to file names")
    return weight_map


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


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF shape of every per-layer tensor, by name suffix (HF linear weights are [out, in])."""
    N, K, H, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
    if cfg.name == "falcon":
        return {"input_layernorm.weight": (D,), "input_layernorm.bias": (D,),
                "self_attention.query_key_value.weight": ((N + 2) * H, D),
                "self_attention.dense.weight": (D, N * H),
                "mlp.dense_h_to_4h.weight": (F, D), "mlp.dense_4h_to_h.weight": (D, F)}
    shapes = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
              "self_attn.q_proj.weight": (N * H, D), "self_attn.k_proj.weight": (K * H, D),
              "self_attn.v_proj.weight": (K * H, D), "self_attn.o_proj.weight": (D, N * H),
              "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
              "mlp.down_proj.weight": (D, F)}
    if cfg.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (N * H,), "self_attn.k_proj.bias": (K * H,),
                       "self_attn.v_proj.bias": (K * H,)})
    return shapes


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape the config declares for every HF tensor jaxinfer reads."""
    names = _global_names(cfg)
    shapes = {names["embed"]: (cfg.vocab_size, cfg.d_model), names["norm"] + ".weight":
              (cfg.d_model,)}
    if cfg.norm == "layer":
        shapes[names["norm"] + ".bias"] = (cfg.d_model,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    for i in range(cfg.n_layers):
        for suffix, shape in _layer_shapes(cfg).items():
            shapes[f"{names['layers']}{i}.{suffix}"] = shape
    return shapes


def check_tensor(reader: SafetensorsReader, expected: dict[str, tuple[int, ...]],
                 name: str) -> _TensorInfo:
    """The tensor's stored shape and dtype, checked against the config's declaration."""
    info = reader.info(name)
    where = os.path.join(reader.directory, info.filename)
    if info.shape != expected[name]:
        raise CheckpointError(f"weight {name!r} in {where} has shape {info.shape}, but the "
                              f"config declares {expected[name]}")
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"weight {name!r} in {where} has dtype {info.dtype}; weights must "
                              f"be one of {FLOAT_DTYPES}")
    return info


def check_finite(name: str, block: np.ndarray) -> np.ndarray:
    """`block` unchanged, or a `CheckpointError` naming the tensor and its first bad element."""
    finite = np.isfinite(block)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        value = block[tuple(bad)]
        raise CheckpointError(f"weight {name!r} holds {int((~finite).sum())} non-finite "
                              f"value(s) (first: {value} at index {tuple(int(i) for i in bad)} "
                              "of the block read)")
    return block


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _reader_fn(reader: SafetensorsReader, cfg: ModelConfig, dtype) -> Read:
    """name -> the whole tensor in `dtype`, its shape, dtype and values checked."""
    np_dtype, expected = _np_dtype(dtype), hf_shapes(cfg)

    def read(name: str) -> np.ndarray:
        check_tensor(reader, expected, name)
        return check_finite(name, reader.get(name)).astype(np_dtype)

    return read


def convert_hf_weights(reader: SafetensorsReader, cfg: ModelConfig, dtype) -> Params:
    """Read every tensor the config needs and return jaxinfer's (host numpy) parameter tree."""
    read = _reader_fn(reader, cfg, dtype)
    readers = _leaf_readers(cfg)
    params = {key: ([jax.tree.map(lambda f, i=i: next(iter(f(read, [i]))), value)
                     for i in range(cfg.n_layers)] if key == "layers"
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

    Only the bytes of the shard's HF rows are read (layer by layer for layer weights), so a
    process holding a shard never materializes the whole parameter (sharded loading).
    """
    fn = _leaf_readers(cfg)
    for key in path:
        fn = fn[key]
    np_dtype, expected = _np_dtype(dtype), hf_shapes(cfg)
    if path[0] != "layers":
        return _read_leaf_shard(reader, expected, fn, index, np_dtype)
    layers = range(cfg.n_layers)[index[0]]
    return np.stack([_read_leaf_shard(reader, expected,
                                      lambda read, i=i: next(iter(fn(read, [i]))),
                                      index[1:], np_dtype) for i in layers])


def _read_leaf_shard(reader: SafetensorsReader, expected: dict[str, tuple[int, ...]],
                     leaf: Callable[[Read], np.ndarray],
                     index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """``leaf(read)[index]`` reading only the HF rows the shard needs.

    Every leaf is one HF tensor reshaped / transposed / sliced: applied to the tensor's row and
    column numbers (zero-copy broadcast views) it says which HF element each shard element is.
    """
    used: list[str] = []

    def numbers(axis: int) -> Read:
        def read(name: str) -> np.ndarray:
            used.append(name)
            shape = check_tensor(reader, expected, name).shape
            ids = np.arange(shape[axis]).reshape([-1 if a == axis else 1
                                                  for a in range(len(shape))])
            return np.broadcast_to(ids, shape)
        return read

    rows = np.asarray(leaf(numbers(0))[index])
    name = used[-1]
    if rows.size == 0:
        return np.empty(rows.shape, dtype)
    r0 = int(rows.min())
    if len(reader.info(name).shape) == 1:
        block = check_finite(name, reader.get_block(name, slice(r0, int(rows.max()) + 1)))
        return block[rows - r0].astype(dtype)
    cols = np.asarray(leaf(numbers(1))[index])
    c0 = int(cols.min())
    block = reader.get_block(name, slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
    return check_finite(name, block)[rows - r0, cols - c0].astype(dtype)
