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
import struct
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.params import Params, check_params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CHUNK_BYTES = 32 * 2**20
"""Row blocks of at most this many bytes are read at a time when slicing columns, so reading a
column shard of a tensor never holds the whole tensor."""


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    filename: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the first element in the file."""


class SafetensorsReader:
    """Reads tensors, or row/column blocks of them, by name from a single ``model.safetensors``
    or a sharded index.

    Reads go through ``os.pread`` of exactly the bytes needed (the safetensors layout: an 8-byte
    header length, a JSON header, row-major data), not through a memory map: a process loading
    its shard of a model then holds that shard only, not page-cache pages of the whole file
    (sharded multi-host loading, `read_hf_shard`).
    """

    bytes_read = 0
    """Bytes read from weight files by all readers of this process (loading statistics)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._headers: dict[str, dict[str, _TensorInfo]] = {}
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
                for key in self._header(name):
                    weight_map[key] = name
        self.weight_map: dict[str, str] = weight_map

    def _header(self, filename: str) -> dict[str, _TensorInfo]:
        if filename in self._headers:
            return self._headers[filename]
        path = os.path.join(self.directory, filename)
        if not os.path.exists(path):
            raise CheckpointError(f"weight file {path} listed in the index is missing")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(fh.read(n))
            base, infos = 8 + n, {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                dtype, shape = np.dtype(_ST_DTYPES[entry["dtype"]]), tuple(entry["shape"])
                if end - begin != dtype.itemsize * math.prod(shape) or base + end > size:
                    raise ValueError(f"tensor {name!r} bytes [{begin}, {end}) do not fit its "
                                     f"shape {shape} {entry['dtype']} or the file ({size} bytes)")
                infos[name] = _TensorInfo(filename, dtype, shape, base + begin)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as err:
            raise CheckpointError(f"corrupt weight file {path}: {err}") from None
        self._headers[filename] = infos
        return infos

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
        """``tensor[rows]`` (``tensor[rows, cols]`` for a matrix), reading only those rows."""
        info = self.info(name)
        r0, r1, _ = rows.indices(info.shape[0] if info.shape else 1)
        row_elems = math.prod(info.shape[1:])
        row_bytes = row_elems * info.dtype.itemsize
        out = []
        step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        path = os.path.join(self.directory, info.filename)
        with open(path, "rb") as fh:
            for a in range(r0, max(r1, r0 + (not info.shape)), step):
                b = min(a + step, r1) if info.shape else 1
                buf = os.pread(fh.fileno(), (b - a) * row_bytes, info.offset + a * row_bytes)
                SafetensorsReader.bytes_read += len(buf)
                if len(buf) != (b - a) * row_bytes:
                    raise CheckpointError(f"cannot read weight {name!r} from {path}: the file "
                                          "is truncated")
                block = np.frombuffer(buf, info.dtype).reshape((b - a,) + info.shape[1:])
                out.append(block if cols is None else block[:, cols].copy())
        if not info.shape:
            return out[0].reshape(())
        return np.concatenate(out) if len(out) != 1 else out[0]


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

    Only the bytes of the shard's HF rows are read (layer by layer for layer weights), so a
    process holding a shard never materializes the whole parameter (sharded loading).
    """
    fn = _leaf_readers(cfg)
    for key in path:
        fn = fn[key]
    np_dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
    if path[0] != "layers":
        return _read_leaf_shard(reader, fn, index, np_dtype)
    layers = range(cfg.n_layers)[index[0]]
    return np.stack([_read_leaf_shard(reader, lambda read, i=i: next(iter(fn(read, [i]))),
                                      index[1:], np_dtype) for i in layers])


def _read_leaf_shard(reader: SafetensorsReader, leaf: Callable[[Read], np.ndarray],
                     index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """``leaf(read)[index]`` reading only the HF rows the shard needs.

    Every leaf is one HF tensor reshaped / transposed / sliced: applied to the tensor's row and
    column numbers (zero-copy broadcast views) it says which HF element each shard element is.
    """
    used: list[str] = []

    def numbers(axis: int) -> Read:
        def read(name: str) -> np.ndarray:
            used.append(name)
            shape = reader.info(name).shape
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
        return reader.get_block(name, slice(r0, int(rows.max()) + 1))[rows - r0].astype(dtype)
    cols = np.asarray(leaf(numbers(1))[index])
    c0 = int(cols.min())
    block = reader.get_block(name, slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
    return block[rows - r0, cols - c0].astype(dtype)
