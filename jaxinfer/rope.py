"""RoPE frequencies for every rotary scaling jaxinfer implements, as Hugging Face computes them.

`inv_freq(cfg)` gives the inverse frequencies [H/2] (angle of position p = p * inv_freq) and
`attention_factor(cfg)` the multiplier HF applies to cos and sin (yarn, longrope; 1.0 otherwise).
Both depend only on the config, so the cos/sin tables can be built once per compiled program.
The formulas follow ``transformers.modeling_rope_utils`` (HF ``rope_type``):

- plain (``rope_scaling=None``) and 'dynamic': theta^(-2i/H). Dynamic NTK only changes the base
  once the sequence grows past ``original_context``, which `ModelConfig` does not allow.
- 'linear': plain / factor (positions interpolated).
- 'llama3': low frequencies / factor, high ones kept, a smooth ramp between.
- 'yarn': a ramp over dimensions between interpolation (/ factor) and extrapolation, with the
  attention factor 0.1 ln(factor) + 1 (or the mscale ratio, or the explicit value).
- 'longrope': plain / short_factor (the context never exceeds ``original_context``), attention
  factor sqrt(1 + ln(factor) / ln(original_context)).

Computed in float64 on the host and returned as float32.
"""

from __future__ import annotations

import math

import numpy as np

from jaxinfer.config import ModelConfig, RopeScaling


def _plain(cfg: ModelConfig) -> np.ndarray:
    """theta^(-2i/H) for i in [0, H/2), float64 [H/2]."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    return 1.0 / cfg.rope_theta ** exponents


def _llama3(base: np.ndarray, rs: RopeScaling) -> np.ndarray:
    low_wavelen = rs.original_context / rs.low_freq_factor
    high_wavelen = rs.original_context / rs.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = np.where(wavelen > low_wavelen, base / rs.factor, base)
    smooth = (rs.original_context / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn_ramp(cfg: ModelConfig, rs: RopeScaling) -> np.ndarray:
    """Weight [H/2] of extrapolation (1: frequency kept, 0: divided by factor)."""
    dim, base = cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(rs.beta_fast or 32.0)
    high = correction_dim(rs.beta_slow or 1.0)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return 1.0 - ramp


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, float32 [H/2]."""
    base = _plain(cfg)
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "dynamic":
        out = base
    elif rs.rope_type == "linear":
        out = base / rs.factor
    elif rs.rope_type == "llama3":
        out = _llama3(base, rs)
    elif rs.rope_type == "yarn":
        extrapolation = _yarn_ramp(cfg, rs)
        out = base / rs.factor * (1 - extrapolation) + base * extrapolation
    elif rs.rope_type == "longrope":
        out = base / np.asarray(rs.short_factor, np.float64)
    else:
        raise ValueError(f"rope_scaling.rope_type {rs.rope_type!r} has no frequency formula")
    return out.astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(cfg: ModelConfig) -> float:
    """The multiplier of cos and sin (HF ``attention_scaling``)."""
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type not in ("yarn", "longrope"):
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.rope_type == "yarn":
        if rs.mscale and rs.mscale_all_dim:
            return _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
        return _yarn_mscale(rs.factor)
    if rs.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(rs.factor) / math.log(rs.original_context))
