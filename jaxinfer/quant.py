"""Model-level weight-only quantization: which parameters are quantized, and how.

Every projection weight (a `ParamSpec` with ``contract > 0``: wq, wk, wv, wo, w_up, w_gate, w_down
and an untied unembedding) becomes a `pallas_kernels.QuantizedWeight`; embeddings (a gather, and the
tied unembedding), norms and biases stay in float. The quantized tree has the same dict structure,
so the same model functions run it (`jaxinfer.layers.project` dispatches on the leaf type), and
`quantized_param_axes` gives each quantized array logical axes so it shards like its float twin.

- int8: symmetric, one scale per output channel (or per group of ``group_size`` rows when given).
- int4: symmetric, group-wise along the contraction (``group_size``, default 128), two per byte.

A group never exceeds a weight's contraction (Kc): a larger group size is capped at Kc, so a
model narrower than the group uses per-channel int4 for that weight. A requested group that does
not divide Kc is an error naming the weight; the int4 default (group_size=None) is 128, or the
largest even divisor of Kc below 128 where 128 does not divide it (`resolve_group_size`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.params import (Params, ParamSpec, abstract_params, param_axes, param_specs,
                             quantized_axes)
from pallas_kernels import QuantizedWeight, quantize_weights
from pallas_kernels.quantize import resolve_group_size

QUANTIZE_MODES = {"int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a model's projection weights are quantized."""

    bits: int
    """8 or 4."""
    group_size: int | None = None
    """Contraction rows per scale; None: per output channel (int8) or 128 (int4, see above)."""

    def __post_init__(self):
        if self.bits not in QUANTIZE_MODES.values():
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(
                self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def from_mode(cls, mode: str, group_size: int | None = None) -> "QuantConfig":
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {tuple(QUANTIZE_MODES)} or None, "
                             f"got {mode!r}")
        return cls(QUANTIZE_MODES[mode], group_size)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(bits=d["bits"], group_size=d.get("group_size"))


def _is_quantized_leaf(x) -> bool:
    return isinstance(x, QuantizedWeight)


def is_quantized(params: Params) -> bool:
    """Whether any weight of `params` is a `QuantizedWeight`."""
    return any(_is_quantized_leaf(x) for x in jax.tree.leaves(params, is_leaf=_is_quantized_leaf))


def _contract_size(spec: ParamSpec) -> int:
    contract = 1
    for n in spec.shape[:spec.contract]:
        contract *= n
    return contract


def _group_size(spec: ParamSpec, qc: QuantConfig) -> int:
    return resolve_group_size(qc.bits, qc.group_size, _contract_size(spec))


@functools.lru_cache(maxsize=None)
def _quantizer(bits: int, group_size: int | None, contract_ndim: int):
    """A jitted `quantize_weights`."""
    return jax.jit(functools.partial(quantize_weights, bits=bits, group_size=group_size,
                                     contract_ndim=contract_ndim))


def _quantize_leaf(path, spec: ParamSpec, w, qc: QuantConfig):
    if not spec.contract:
        return w
    try:
        return _quantizer(qc.bits, qc.group_size, spec.contract)(w)
    except ValueError as err:
        raise ValueError(f"cannot quantize {jax.tree_util.keystr(path)}: {err}") from None


def quantize_params(params: Params, cfg: ModelConfig, qc: QuantConfig) -> Params:
    """Float parameters -> the same tree with its projections quantized."""
    if is_quantized(params):
        raise ValueError("the model is already quantized; load the float checkpoint to quantize "
                         "it differently")
    specs = jax.tree_util.tree_flatten_with_path(
        param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    for path, spec in specs:  # validate every weight before quantizing any
        if spec.contract:
            try:
                _group_size(spec, qc)
            except ValueError as err:
                raise ValueError(f"cannot quantize {jax.tree_util.keystr(path)}: {err}") from None
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, w: _quantize_leaf(path, spec, w, qc), param_specs(cfg),
        params, is_leaf=lambda x: isinstance(x, ParamSpec))


def abstract_quantized_params(cfg: ModelConfig, qc: QuantConfig, dtype=jnp.float32) -> Params:
    """Shapes and dtypes of `quantize_params` output, without computing anything."""
    return jax.eval_shape(lambda p: quantize_params(p, cfg, qc), abstract_params(cfg, dtype))


def quantized_param_axes(cfg: ModelConfig, qc: QuantConfig) -> Params:
    """Logical axes of every array of the quantized tree (a `QuantizedWeight` of axis tuples in
    place of each quantized weight); see `jaxinfer.params.quantized_axes`."""
    def axes(spec: ParamSpec):
        if not spec.contract:
            return spec.axes
        group = _group_size(spec, qc)
        data_axes, scale_axes = quantized_axes(spec, grouped=group < _contract_size(spec))
        return QuantizedWeight(data=data_axes, scale=scale_axes, bits=qc.bits, group_size=group)

    return jax.tree.map(axes, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def param_logical_axes(cfg: ModelConfig, qc: QuantConfig | None) -> Params:
    """Logical axes of every array of the float (qc None) or quantized parameter tree."""
    return param_axes(cfg) if qc is None else quantized_param_axes(cfg, qc)
