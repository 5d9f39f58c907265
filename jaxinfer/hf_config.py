"""Hugging Face ``config.json`` -> `ModelConfig`, rejecting every field jaxinfer does not implement.

Supported families: llama (incl. Llama-3 rope scaling), mistral, qwen2 (QKV bias), gemma, and falcon
with ``multi_query=True, parallel_attn=True`` (the PaLM-style multiquery + parallel block).
A field is accepted only if it is understood: mapped to the architecture, checked to hold a value
jaxinfer implements, or known not to affect inference (dropout, init, bookkeeping). Anything else
raises `ConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any

from jaxinfer.config import ConfigError, ModelConfig, RopeScaling

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


def _rope(f: _Fields) -> tuple[float, RopeScaling | None]:
    """Plain or Llama-3 RoPE from either the v4 (rope_theta/rope_scaling) or v5 (rope_parameters) form."""
    params = dict(f.get("rope_parameters") or {})
    scaling = f.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = float(params.get("rope_theta", f.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"unsupported config field rope_scaling.rope_type={rope_type!r}: "
                          "jaxinfer implements 'default' and 'llama3'")
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_context=int(params["original_max_position_embeddings"]))
    except KeyError as err:
        raise ConfigError(f"llama3 rope scaling lacks field {err.args[0]!r}") from None


def _eos_ids(f: _Fields, generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (f.get("eos_token_id"), (generation_config or {}).get("eos_token_id")):
        if source is None:
            continue
        for tok in source if isinstance(source, list) else [source]:
            if tok not in ids:
                ids.append(int(tok))
    return tuple(ids)


def _context_with_window(f: _Fields, max_pos: int, window_active: bool) -> int:
    """Sliding-window attention is not implemented; within the window it equals full attention,
    so the usable context is capped at the window (longer prompts are rejected, never wrong)."""
    window = f.get("sliding_window")
    if window_active and window is not None and window < max_pos:
        return int(window)
    return max_pos


def _llama_like(f: _Fields, family: str) -> dict[str, Any]:
    d_model, heads = f.require("hidden_size"), f.require("num_attention_heads")
    theta, scaling = _rope(f)
    max_pos = f.require("max_position_embeddings")
    window_active = True
    if family == "qwen2":
        window_active = bool(f.get("use_sliding_window", False)) or any(
            t != "full_attention" for t in (f.get("layer_types") or []))
        f.get("max_window_layers")
    elif family == "gemma":
        f.expect("use_bidirectional_attention", (None, False))
    else:
        f.get("layer_types")
    act_field = "hidden_activation" if f.raw.get("hidden_activation") else "hidden_act"
    f.get("hidden_activation"), f.get("hidden_act")
    f.expect("attention_bias", (False,), False)
    f.expect("mlp_bias", (False,), False)
    return dict(
        vocab_size=f.require("vocab_size"), d_model=d_model, n_layers=f.require("num_hidden_layers"),
        n_heads=heads, n_kv_heads=f.get("num_key_value_heads") or heads,
        head_dim=f.get("head_dim") or d_model // heads, d_ff=f.require("intermediate_size"),
        max_context=_context_with_window(f, max_pos, window_active),
        activation=_activation(f.raw.get(act_field, "silu"), act_field), gated_ffn=True,
        norm="rms", norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        norm_scale_offset=1.0 if family == "gemma" else 0.0, qkv_bias=family == "qwen2",
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(f.get("tie_word_embeddings", family == "gemma")),
        embed_scale=family == "gemma")


def _falcon(f: _Fields) -> dict[str, Any]:
    f.expect("multi_query", (True,), True)
    f.expect("parallel_attn", (True,), True)
    f.expect("new_decoder_architecture", (False,), False)
    f.expect("alibi", (False,), False)
    f.expect("bias", (False,), False)
    f.expect("num_ln_in_parallel_attn", (None, 1), None)
    f.get("num_kv_heads")  # only used by the new decoder architecture, rejected above
    d_model, heads = f.require("hidden_size"), f.require("num_attention_heads")
    theta, scaling = _rope(f)
    return dict(
        vocab_size=f.require("vocab_size"), d_model=d_model, n_layers=f.require("num_hidden_layers"),
        n_heads=heads, n_kv_heads=1, head_dim=d_model // heads,
        d_ff=f.get("ffn_hidden_size") or 4 * d_model,
        max_context=f.get("max_position_embeddings", 2048),
        activation=_activation(f.get("activation", "gelu"), "activation"), gated_ffn=False,
        norm="layer", norm_eps=float(f.get("layer_norm_epsilon", 1e-5)), parallel_block=True,
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(f.get("tie_word_embeddings", True)))


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "falcon")


def config_from_hf(raw: dict[str, Any],
                   generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Translate an HF config dict (and optional generation_config) into a `ModelConfig`."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"unsupported model_type {family!r}; jaxinfer loads {FAMILIES}")
    if raw.get("quantization_config"):
        raise ConfigError("unsupported config field quantization_config: load an unquantized "
                          "checkpoint and use jaxinfer's own quantization")
    f = _Fields(raw, family)
    fields = _falcon(f) if family == "falcon" else _llama_like(f, family)
    eos = _eos_ids(f, generation_config)
    bos = f.get("bos_token_id")
    f.reject_unknown()
    return ModelConfig(**fields, eos_token_ids=eos, bos_token_id=bos, name=family)
