"""`ModelConfig`: the one description of a decoder architecture that every part of jaxinfer reads.

One generic decoder covers Llama, Mistral, Qwen2, Gemma, Falcon (multiquery + parallel block) and
PaLM-style models; the fields below are the switches between them. The config is frozen and hashable
so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NORMS = ("rms", "layer")


class ConfigError(ValueError):
    """A model configuration is invalid or uses a feature jaxinfer does not implement."""


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
"""RoPE scaling types jaxinfer implements (HF ``rope_type``); plain RoPE is ``rope_scaling=None``."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face resolves it (``rope_parameters`` / ``rope_scaling``).

    The frequencies themselves are computed by `jaxinfer.rope`. Fields a type does not use are None.
    """

    factor: float
    """Context extension factor (linear: positions divided by it; llama3/yarn: low frequencies)."""
    low_freq_factor: float | None = None
    """llama3: wavelengths longer than original_context / low_freq_factor are fully scaled."""
    high_freq_factor: float | None = None
    """llama3: wavelengths shorter than original_context / high_freq_factor are left unscaled."""
    original_context: int | None = None
    """Context length the model was pre-trained with (HF ``original_max_position_embeddings``;
    for 'dynamic', HF's ``max_position_embeddings``, beyond which NTK scaling would start)."""
    rope_type: str = "llama3"
    """One of `ROPE_TYPES`."""
    attention_factor: float | None = None
    """yarn/longrope: multiplier of cos and sin; None = derived from factor as HF does."""
    beta_fast: float | None = None
    """yarn: rotations above which dimensions are extrapolated (HF default 32)."""
    beta_slow: float | None = None
    """yarn: rotations below which dimensions are interpolated (HF default 1)."""
    mscale: float | None = None
    """yarn: numerator mscale of the derived attention factor (with mscale_all_dim)."""
    mscale_all_dim: float | None = None
    """yarn: denominator mscale of the derived attention factor (with mscale)."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions."""
    short_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors [H/2] for sequences within original_context."""
    long_factor: tuple[float, ...] | None = None
    """longrope: per-frequency divisors [H/2] beyond original_context (never reached: the context
    is checked not to exceed original_context)."""

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, "
                              f"got {self.rope_type!r}")
        _check_number("rope_scaling.factor", self.factor, positive=True)
        required = {"llama3": ("low_freq_factor", "high_freq_factor", "original_context"),
                    "yarn": ("original_context",), "longrope": ("original_context", "short_factor"),
                    "dynamic": ("original_context",), "linear": ()}[self.rope_type]
        for name in required:
            if getattr(self, name) is None:
                raise ConfigError(f"rope_scaling.{name} is required for rope_type "
                                  f"{self.rope_type!r}")
        for name in ("low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _check_number(f"rope_scaling.{name}", getattr(self, name), positive=False)
        if self.original_context is not None and (
                not isinstance(self.original_context, int) or isinstance(self.original_context, bool)
                or self.original_context <= 0):
            raise ConfigError(f"rope_scaling.original_context must be a positive int, got "
                              f"{self.original_context!r}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                              f"low_freq_factor ({self.low_freq_factor})")
        for name in ("short_factor", "long_factor"):
            for v in getattr(self, name) or ():
                _check_number(f"rope_scaling.{name}", v, positive=True)


def _check_number(field: str, value: Any, positive: bool) -> None:
    """A finite int/float (not bool); > 0 when `positive`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ConfigError(f"{field} must be a finite {'positive ' if positive else ''}number, "
                          f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (einsum letters as in `jaxinfer.axes`)."""

    vocab_size: int
    """V: number of token ids."""
    d_model: int
    """D: width of the residual stream."""
    n_layers: int
    """L: number of decoder layers."""
    n_heads: int
    """N: query heads."""
    n_kv_heads: int
    """K: key/value heads; 1 = multiquery, fewer than n_heads = grouped-query, equal = multihead."""
    head_dim: int
    """H: width of one attention head (need not equal d_model // n_heads, e.g. Gemma)."""
    d_ff: int
    """F: hidden width of the feed-forward network."""
    max_context: int
    """Longest sequence (prompt + generated tokens) the model may process."""
    activation: str = "silu"
    """Feed-forward nonlinearity: 'silu', 'gelu' (exact erf) or 'gelu_tanh' (tanh approximation)."""
    gated_ffn: bool = True
    """True: act(x W_gate) * (x W_up) then W_down (SwiGLU/GeGLU); False: act(x W_up) W_down."""
    norm: str = "rms"
    """'rms' (RMSNorm, no bias) or 'layer' (LayerNorm with bias)."""
    norm_eps: float = 1e-6
    """Epsilon added to the variance inside the norm."""
    norm_scale_offset: float = 0.0
    """Added to the learned norm scale: 1.0 for Gemma's `x * (1 + w)`, 0.0 elsewhere."""
    parallel_block: bool = False
    """True: x + Attn(norm(x)) + FFN(norm(x)) with one shared norm (PaLM, Falcon); False: serial."""
    qkv_bias: bool = False
    """Whether the Q, K and V projections have biases (Qwen2)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: RopeScaling | None = None
    """RoPE frequency scaling (`RopeScaling`, computed by `jaxinfer.rope`), or None for plain RoPE."""
    tie_embeddings: bool = False
    """True: the output projection is the transpose of the input embedding."""
    embed_scale: bool = False
    """True: multiply embeddings by sqrt(d_model) before the first layer (Gemma)."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation by default (from the checkpoint's config)."""
    bos_token_id: int | None = None
    """Token id that starts a sequence, if the tokenizer uses one."""
    name: str = "decoder"
    """Human-readable family or preset name; does not change the computation."""

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "d_ff", "max_context"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} is not one of {NORMS}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        _check_number("ModelConfig.norm_eps", self.norm_eps, positive=True)
        _check_number("ModelConfig.norm_scale_offset", self.norm_scale_offset, positive=False)
        _check_number("ModelConfig.rope_theta", self.rope_theta, positive=True)
        for field in ("gated_ffn", "parallel_block", "qkv_bias", "tie_embeddings", "embed_scale"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"ModelConfig.{field} must be a bool, got "
                                  f"{getattr(self, field)!r}")
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        self._check_token_ids()
        self._check_rope_scaling()

    def _check_token_ids(self) -> None:
        ids = self.eos_token_ids + (() if self.bos_token_id is None else (self.bos_token_id,))
        for tok in ids:
            if not isinstance(tok, int) or isinstance(tok, bool):
                raise ConfigError(f"eos/bos token ids must be ints, got {tok!r}")
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"eos/bos token id {tok} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")

    def _check_rope_scaling(self) -> None:
        """Types whose frequencies depend on the running sequence length are exact only while the
        context stays within the length at which HF would switch (dynamic NTK, longrope)."""
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, RopeScaling):
            raise ConfigError(f"ModelConfig.rope_scaling must be a RopeScaling or None, got {rs!r}")
        if rs.rope_type in ("dynamic", "longrope") and self.max_context > rs.original_context:
            raise ConfigError(
                f"rope_scaling.rope_type={rs.rope_type!r} changes the RoPE frequencies with the "
                f"running sequence length beyond {rs.original_context} tokens, which jaxinfer "
                f"does not implement; max_context {self.max_context} must not exceed it")
        for name in ("short_factor", "long_factor"):
            factors = getattr(rs, name)
            if factors is not None and len(factors) != self.head_dim // 2:
                raise ConfigError(f"rope_scaling.{name} has {len(factors)} entries; head_dim "
                                  f"{self.head_dim} needs {self.head_dim // 2}")

    @property
    def q_per_kv(self) -> int:
        """G: query heads that share one KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attention_kind(self) -> str:
        """'multiquery', 'grouped-query' or 'multihead'."""
        if self.n_kv_heads == 1:
            return "multiquery"
        return "multihead" if self.n_kv_heads == self.n_heads else "grouped-query"

    def layer_param_count(self) -> int:
        """Weights of one decoder layer (matrices, biases and norm scales)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = self.d_model * self.d_ff * (3 if self.gated_ffn else 2)
        bias = self.head_dim * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
        norms = (1 if self.parallel_block else 2) * self.d_model * (2 if self.norm == "layer" else 1)
        return attn + ffn + bias + norms

    def param_count(self) -> int:
        """Total number of parameters, embeddings included."""
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        final_norm = self.d_model * (2 if self.norm == "layer" else 1)
        return self.n_layers * self.layer_param_count() + embed + final_norm

    def kv_bytes_per_token(self, bytes_per_element: float = 2) -> float:
        """KV-cache bytes one token occupies across all layers (Pope et al. §3.3)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
