"""Small random Hugging Face checkpoints built with `transformers` (the reference implementation).

Weights are redrawn with a larger spread than HF's default init so that logits are peaked: greedy
decoding then has clear winners and token-for-token comparisons are meaningful.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

VOCAB = 96
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# family -> (config class, model class, config kwargs); attention kinds: MHA, GQA and MQA covered.
FAMILY_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
        rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        hidden_act="gelu_pytorch_tanh")),
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM, dict(
        num_attention_heads=4, multi_query=True, parallel_attn=True, alibi=False,
        new_decoder_architecture=False, bias=False)),
}
FAMILIES = tuple(FAMILY_CONFIGS)
ATTENTION_KIND = {"llama": "grouped-query", "mistral": "multiquery", "qwen2": "multihead",
                  "gemma": "grouped-query", "falcon": "multiquery"}


def hf_config(family: str, **overrides):
    config_cls, _, extra = FAMILY_CONFIGS[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "falcon":
        kwargs.update(ffn_hidden_size=160)
    else:
        kwargs.update(intermediate_size=160)
    kwargs.update(extra)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and ("norm" in name or "ln" in name):
                base = 0.0 if "gemma" in type(model).__name__.lower() or name.endswith("bias") else 1.0
                p.copy_(base + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]) * 1.5)


def build_hf_model(family: str, seed: int = 0, **overrides):
    _, model_cls, _ = FAMILY_CONFIGS[family]
    torch.manual_seed(seed)
    model = model_cls(hf_config(family, **overrides)).eval().to(torch.float32)
    _randomize(model, seed)
    return model


def save_hf_checkpoint(model, path: str, max_shard_size: str | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int,
              repetition_penalty: float | None = None) -> list[int]:
    """Greedy decoding with HF's forward pass and logits processor, never stopping early.

    (HF `generate` would need min_new_tokens to ignore EOS, and that masks EOS out of the argmax.)
    """
    processors = transformers.LogitsProcessorList()
    if repetition_penalty is not None:
        processors.append(transformers.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            scores = processors(ids, model(ids).logits[:, -1].float())
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()
