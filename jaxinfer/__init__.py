"""jaxinfer: JAX/XLA inference for large language models on TPU and GPU.

Public API::

    m = jaxinfer.load(path)                 # HF checkpoint dir or jaxinfer (orbax) dir
    m.logits(tokens)                        # [B, T] -> float32 [B, T, vocab]
    res = m.generate(prompts, max_new_tokens=32, temperature=0.0, ...)
    for ev in m.stream(prompt, max_new_tokens=32): print(ev.text, end="")
    m.chat([{"role": "user", "content": "Hi"}])   # the checkpoint's chat template
    m.save(path)
"""

from importlib.metadata import PackageNotFoundError, version as _package_version

from jaxinfer.api import Model, load
from jaxinfer.cache import KVCache
from jaxinfer.config import ConfigError, ModelConfig, RopeScaling
from jaxinfer.generate import GenerationResult
from jaxinfer.hf_weights import CheckpointError
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.sampling import SamplingConfig, SamplingParams
from jaxinfer.streaming import StreamEvent, StreamResult, TextOptions
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.validation import InvalidArgument

__all__ = ["load", "Model", "ModelConfig", "RopeScaling", "KVCache", "GenerationResult",
           "SamplingConfig", "SamplingParams", "Engine", "EngineConfig", "ConfigError",
           "CheckpointError", "InvalidArgument", "StreamEvent", "StreamResult", "TextOptions",
           "Tokenizer", "__version__"]

try:
    __version__ = _package_version("jaxinfer")
    """The installed distribution's version (pyproject.toml)."""
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

