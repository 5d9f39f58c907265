"""Hugging Face ``config.json`` -> `ModelConfig`, rejecting every field jaxinfer does not implement.

Supported families: llama (incl. Llama-3 rope scaling), mistral, qwen2 (QKV bias), gemma, and falcon
with ``multi_query=True, parallel_attn=True`` (the PaLM-style multiquery + parallel block).
A field is accepted only if it is understood: mapped to the architecture, checked to hold a value
jaxinfer implements, or known not to affect inference (dropout, init, bookkeeping). Anything else
raises `ConfigError` naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from jaxinfer.config import ConfigError, ModelConfig, RopeScaling

_REQUIRED = object()

# PretrainedConfig bookkeeping and legacy generation defaults: they do not change the forward pass.
_GENERIC_FIELDS = frozenset("""
_name_or_path architectures model_type transformers_version torch_dtype dtype use_cache
initializer_range pad_token_id bos_token_id eos_token_id sep_token_id decoder_start_token_id
attention_dropout hidden_dropout output_hidden_states output_attentions return_dict id2label label2id
problem_type chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
cross_attention_hidden_size tie_encoder_decoder pruned_heads torchscript use_bfloat16 tf_legacy_loss
finetuning_task prefix task_specific_params tokenizer_class auto_map _attn_implementation_autoset
bad_words_ids begin_suppress_tokens suppress_tokens diversity_penalty do_sample early_stopping
encoder_no_repeat_ngram_size exponential_decay_length_penalty forced_bos_token_id
forced_eos_token_id length_penalty max_length min_length no_repeat_ngram_size num_beam_groups
num_beams num_return_sequences output_scores remove_invalid_values repetition_penalty
return_dict_in_generate temperature top_k top_p typical_p pretraining_tp
""".split())

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


class _Fields:
    """Reads an HF config dict and records which fields were consumed."""

    def __init__(self, raw: dict[str, Any], family: str):
        self.raw, self.family, self.used = raw, family, set(_GENERIC_FIELDS)

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.raw.get(key, default)

    def require(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.raw:
            raise ConfigError(f"{self.family} config.json lacks required field {key!r}")
        return self.raw[key]

    def integer(self, key: str, default: Any = _REQUIRED, positive: bool = True) -> int | None:
        """An int field (not bool/float); `default` when absent (required without one)."""
        value = self.require(key) if default is _REQUIRED else self.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or (positive and value <= 0):
            kind = "a positive int" if positive else "an int"
            raise ConfigError(f"config field {key} must be {kind}, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        """A finite int/float field, returned as float."""
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise ConfigError(f"config field {key} must be a finite number, got {value!r}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"config field {key} must be true or false, got {value!r}")
        return value

    def expect(self, key: str, allowed: tuple, default: Any = None) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(f"unsupported config field {key}={value!r} for {self.family}: "
                              f"jaxinfer implements only {allowed}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(f"unsupported config field(s) for {self.family}: {', '.join(unknown)}")


def _activation(name: str, field: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unsupported config field {field}={name!r}: jaxinfer implements "
                          f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# HF's keys per rope_type (``RotaryEmbeddingConfigMixin._validate_*``): required, then optional.
_ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"),
                 ("attention_factor", "factor")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor"), ()),
}
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _rope_dict(f: _Fields) -> tuple[str, dict[str, Any]]:
    """The RoPE parameters transformers (v5) applies: a non-empty legacy ``rope_scaling``
    replaces ``rope_parameters`` whole; ``rope_theta`` inside the dict wins over the top-level
    field, which defaults to 10000. Returns (the field they came from, the dict)."""
    f.get("rope_parameters")  # consumed even where a legacy rope_scaling replaces it
    field = "rope_scaling" if f.get("rope_scaling") else "rope_parameters"
    params = f.get(field)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field {field} must be an object, got {params!r}")
    params = dict(params)
    params.setdefault("rope_theta", f.raw.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    f.get("rope_theta")
    return field, params


def _rope(f: _Fields, max_pos: int) -> tuple[float, RopeScaling | None]:
    """Plain RoPE or a `RopeScaling` from either the v4 or the v5 form; anything transformers would
    compute differently from jaxinfer is an error naming the field."""
    field, params = _rope_dict(f)
    rope_type = params["rope_type"]
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"unsupported config field {field}.rope_type={rope_type!r}: jaxinfer "
                          f"implements {tuple(_ROPE_KEYS)}")
    required, optional = _ROPE_KEYS[rope_type]
    unknown = sorted(set(params) - set(required) - set(optional) - set(_ROPE_COMMON_KEYS))
    if unknown:
        raise ConfigError(f"unsupported config field {field}.{unknown[0]} for rope_type "
                          f"{rope_type!r}")
    if rope_type in ("yarn", "longrope", "llama3"):
        params.setdefault("original_max_position_embeddings", max_pos)
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"config field {field} lacks {missing[0]!r}, required for rope_type "
                          f"{rope_type!r}")
    partial = params.get("partial_rotary_factor", f.raw.get("partial_rotary_factor", 1.0))
    f.get("partial_rotary_factor")
    if partial != 1.0:
        raise ConfigError(f"unsupported config field {field}.partial_rotary_factor={partial!r}: "
                          "jaxinfer rotates the whole head")
    theta = _rope_number(field, "rope_theta", params["rope_theta"])
    if theta is None or theta <= 0:
        raise ConfigError(f"config field {field}.rope_theta must be a positive number, got "
                          f"{params['rope_theta']!r}")
    if rope_type == "default":
        return theta, None
    return theta, _rope_scaling(field, rope_type, params, max_pos)


def _rope_number(field: str, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"config field {field}.{key} must be a finite number, got {value!r}")
    return float(value)


def _rope_factors(field: str, key: str, value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError(f"config field {field}.{key} must be a list of numbers, got {value!r}")
    return tuple(_rope_number(field, key, v) for v in value)


def _rope_scaling(field: str, rope_type: str, params: dict[str, Any],
                  max_pos: int) -> RopeScaling:
    num = {k: _rope_number(field, k, params.get(k)) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
        "beta_slow", "mscale", "mscale_all_dim")}
    original = params.get("original_max_position_embeddings", max_pos)
    if rope_type == "dynamic":
        original = max_pos  # HF's dynamic NTK starts beyond max_position_embeddings
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise ConfigError(f"config field {field}.original_max_position_embeddings must be a "
                          f"positive int, got {original!r}")
    if num["factor"] is None and rope_type in ("yarn", "longrope"):
        num["factor"] = max_pos / original  # as HF when factor is null
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"config field {field}.truncate must be true or false, got {truncate!r}")
    try:
        return RopeScaling(
            rope_type=rope_type, original_context=original, truncate=truncate,
            short_factor=_rope_factors(field, "short_factor", params.get("short_factor")),
            long_factor=_rope_factors(field, "long_factor", params.get("long_factor")), **num)
    except ConfigError as err:
        raise ConfigError(f"config field {field}: {err}") from None


def _eos_ids(f: _Fields, generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    ids: list[int] = []
    sources = (("config.json eos_token_id", f.get("eos_token_id")),
               ("generation_config.json eos_token_id", (generation_config or {}).get("eos_token_id")))
    for field, source in sources:
        if source is None:
            continue
        for tok in source if isinstance(source, list) else [source]:
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0:
                raise ConfigError(f"{field} must be a token id (int >= 0) or a list of them, "
                                  f"got {source!r}")
            if tok not in ids:
                ids.append(tok)
    return tuple(ids)


def _check_window(f: _Fields, max_pos: int, window_active: bool) -> None:
    """Sliding-window attention is not implemented: a window shorter than the context is an error
    (within the window it would equal full attention, but longer sequences would differ)."""
    window = f.get("sliding_window")
    if not window_active or window is None:
        return
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ConfigError(f"config field sliding_window must be a positive int or null, got "
                          f"{window!r}")
    if window < max_pos:
        raise ConfigError(f"unsupported config field sliding_window={window}: it is shorter than "
                          f"the context (max_position_embeddings={max_pos}) and jaxinfer does not "
                          "implement sliding-window attention")


def _qwen2_window_active(f: _Fields) -> bool:
    """As transformers' Qwen2: the window exists only with use_sliding_window, and applies to the
    layers whose layer_types entry is 'sliding_attention' (by default those from
    max_window_layers on)."""
    use = f.boolean("use_sliding_window", False)
    n_layers = f.integer("num_hidden_layers")
    first = f.integer("max_window_layers", n_layers, positive=False)
    layer_types = f.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(n_layers)]
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(layer_types, list) or any(t not in kinds for t in layer_types):
        raise ConfigError(f"config field layer_types must be a list of {kinds}, got "
                          f"{layer_types!r}")
    return use and "sliding_attention" in layer_types


def _heads(f: _Fields, explicit_head_dim: bool) -> tuple[int, int, int]:
    """(d_model, n_heads, head_dim); without an explicit head_dim the heads must divide the width."""
    d_model, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    head_dim = f.integer("head_dim", None) if explicit_head_dim else None
    if head_dim is None:
        if d_model % heads:
            raise ConfigError(f"config field num_attention_heads={heads} does not divide "
                              f"hidden_size={d_model} (and no head_dim is given)")
        head_dim = d_model // heads
    return d_model, heads, head_dim


def _llama_like(f: _Fields, family: str) -> dict[str, Any]:
    d_model, heads, head_dim = _heads(f, explicit_head_dim=True)
    max_pos = f.integer("max_position_embeddings")
    theta, scaling = _rope(f, max_pos)
    window_active = True
    if family == "qwen2":
        window_active = _qwen2_window_active(f)
    elif family == "gemma":
        f.expect("use_bidirectional_attention", (None, False))
    else:
        f.get("layer_types")
    _check_window(f, max_pos, window_active)
    act_field = "hidden_activation" if f.raw.get("hidden_activation") else "hidden_act"
    f.get("hidden_activation"), f.get("hidden_act")
    f.expect("attention_bias", (False,), False)
    f.expect("mlp_bias", (False,), False)
    return dict(
        vocab_size=f.integer("vocab_size"), d_model=d_model,
        n_layers=f.integer("num_hidden_layers"), n_heads=heads,
        n_kv_heads=f.integer("num_key_value_heads", None) or heads, head_dim=head_dim,
        d_ff=f.integer("intermediate_size"), max_context=max_pos,
        activation=_activation(f.raw.get(act_field, "silu"), act_field), gated_ffn=True,
        norm="rms", norm_eps=f.number("rms_norm_eps", 1e-6),
        norm_scale_offset=1.0 if family == "gemma" else 0.0, qkv_bias=family == "qwen2",
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=f.boolean("tie_word_embeddings", family == "gemma"),
        embed_scale=family == "gemma")


def _falcon(f: _Fields) -> dict[str, Any]:
    f.expect("multi_query", (True,), True)
    f.expect("parallel_attn", (True,), True)
    f.expect("new_decoder_architecture", (False,), False)
    f.expect("alibi", (False,), False)
    f.expect("bias", (False,), False)
    f.expect("num_ln_in_parallel_attn", (None, 1), None)
    f.get("num_kv_heads")  # only used by the new decoder architecture, rejected above
    f.expect("num_key_value_heads", (None, 1), None)  # newer transformers: 1 under multi_query
    d_model, heads, head_dim = _heads(f, explicit_head_dim=False)
    max_pos = f.integer("max_position_embeddings", 2048)
    theta, scaling = _rope(f, max_pos)
    return dict(
        vocab_size=f.integer("vocab_size"), d_model=d_model,
        n_layers=f.integer("num_hidden_layers"), n_heads=heads, n_kv_heads=1, head_dim=head_dim,
        d_ff=f.integer("ffn_hidden_size", None) or 4 * d_model, max_context=max_pos,
        activation=_activation(f.get("activation", "gelu"), "activation"), gated_ffn=False,
        norm="layer", norm_eps=f.number("layer_norm_epsilon", 1e-5), parallel_block=True,
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=f.boolean("tie_word_embeddings", True))


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "falcon")


def config_from_hf(raw: dict[str, Any],
                   generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Translate an HF config dict (and optional generation_config) into a `ModelConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
    if generation_config is not None and not isinstance(generation_config, dict):
        raise ConfigError(f"generation_config.json must hold a JSON object, got "
                          f"{type(generation_config).__name__}")
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"unsupported model_type {family!r}; jaxinfer loads {FAMILIES}")
    if raw.get("quantization_config"):
        raise ConfigError("unsupported config field quantization_config: load an unquantized "
                          "checkpoint and use jaxinfer's own quantization")
    f = _Fields(raw, family)
    fields = _falcon(f) if family == "falcon" else _llama_like(f, family)
    eos = _eos_ids(f, generation_config)
    bos = f.integer("bos_token_id", None, positive=False)
    f.reject_unknown()
    return ModelConfig(**fields, eos_token_ids=eos, bos_token_id=bos, name=family)
