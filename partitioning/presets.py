"""Model presets for planning: architectures only, no weights.

PaLM and MT-NLG follow pope2022.md §3.1-§3.2 (PaLM: multiquery, parallel block, SwiGLU with the full
d_ff for both input matrices, shared embedding, vocab 256128; 540B with its 48 heads padded to 64
"to partition more effectively on 64+ chips", §3.1). Llama configs follow the published model
cards (Llama 2: Touvron et al. 2023 Table 1 and HF config.json; Llama 3 / 3.1: Meta's model cards
and HF config.json).
"""

from __future__ import annotations


from jaxinfer.config import ModelConfig, RopeScaling

_PALM = dict(vocab_size=256128, activation="silu", gated_ffn=True, norm="layer",
             parallel_block=True, tie_embeddings=True, head_dim=256, n_kv_heads=1,
             max_context=2048)
_LLAMA2 = dict(vocab_size=32000, max_context=4096, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_context=8192, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_context=8192)

PRESETS: dict[str, ModelConfig] = {
    "palm-8b": ModelConfig(name="palm-8b", d_model=4096, n_layers=32, n_heads=16, d_ff=16384,
                           **_PALM),
    "palm-62b": ModelConfig(name="palm-62b", d_model=8192, n_layers=64, n_heads=32, d_ff=32768,
                            **_PALM),
    "palm-540b": ModelConfig(name="palm-540b", d_model=18432, n_layers=118, n_heads=64,
                             d_ff=73728, **_PALM),
    "palm-540b-48heads": ModelConfig(name="palm-540b-48heads", d_model=18432, n_layers=118,
                                     n_heads=48, d_ff=73728, **_PALM),
    "mt-nlg-530b": ModelConfig(name="mt-nlg-530b", vocab_size=51200, d_model=20480, n_layers=105,
                               n_heads=128, n_kv_heads=128, head_dim=160, d_ff=81920,
                               max_context=2048, activation="gelu", gated_ffn=False, norm="layer",
                               parallel_block=False),
    "llama-2-7b": ModelConfig(name="llama-2-7b", d_model=4096, n_layers=32, n_heads=32,
                              n_kv_heads=32, head_dim=128, d_ff=11008, **_LLAMA2),
    "llama-2-13b": ModelConfig(name="llama-2-13b", d_model=5120, n_layers=40, n_heads=40,
                               n_kv_heads=40, head_dim=128, d_ff=13824, **_LLAMA2),
    "llama-2-70b": ModelConfig(name="llama-2-70b", d_model=8192, n_layers=80, n_heads=64,
                               n_kv_heads=8, head_dim=128, d_ff=28672, **_LLAMA2),
    "llama-3-8b": ModelConfig(name="llama-3-8b", d_model=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, head_dim=128, d_ff=14336, **_LLAMA3),
    "llama-3-70b": ModelConfig(name="llama-3-70b", d_model=8192, n_layers=80, n_heads=64,
                               n_kv_heads=8, head_dim=128, d_ff=28672, **_LLAMA3),
    "llama-3-405b": ModelConfig(name="llama-3-405b", d_model=16384, n_layers=126, n_heads=128,
                                n_kv_heads=8, head_dim=128, d_ff=53248,
                                **dict(_LLAMA3, max_context=131072), rope_scaling=_LLAMA31_ROPE),
}

NOMINAL_PARAMS = {"palm-8b": 8e9, "palm-62b": 62e9, "palm-540b": 540e9, "mt-nlg-530b": 530e9}
"""Parameter counts the paper uses for MFU (pope2022.md §4.2: MFU = 2·N·tokens/(n·peak·t))."""


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def resolve_model(name: str) -> ModelConfig:
    """A preset by name (checkpoint directories are read by `jaxinfer.cli_plan`)."""
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
