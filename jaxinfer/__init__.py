"""jaxinfer: JAX/XLA inference for large language models on TPU and GPU.

Public API::

    m = jaxinfer.load(path)                 # HF checkpoint dir or jaxinfer (orbax) dir
    m.logits(tokens)                        # [B, T] -> float32 [B, T, vocab]
    res = m.generate(prompts, max_new_tokens=32, temperature=0.0, ...)
    m.save(path)
"""

from jaxinfer.api import Model, load
from jaxinfer.cache import KVCache
from jaxinfer.config import ConfigError, ModelConfig, RopeScaling
from jaxinfer.generate import GenerationResult
from jaxinfer.hf_weights import CheckpointError
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.sampling import SamplingConfig, SamplingParams
from jaxinfer.validation import InvalidArgument

__all__ = ["load", "Model", "ModelConfig", "RopeScaling", "KVCache", "GenerationResult",
           "SamplingConfig", "SamplingParams", "Engine", "EngineConfig", "ConfigError",
           "CheckpointError", "InvalidArgument"]
__version__ = "0.1.0"
