"""The public Python API: `load(source)` returns a `Model` with `logits`, `generate` and `save`."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import builtin, checkpoint, hf_weights, model as model_lib, quant
from jaxinfer.cache import KVCache
from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import ModelConfig
from jaxinfer.generate import GenerationResult, Generator
from jaxinfer.hf_weights import CheckpointError
from jaxinfer.params import (Params, abstract_params, init_params, param_bytes, stack_layers,
                             unstack_layers)
from jaxinfer.sampling import SamplingConfig
from jaxinfer.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")
LAYER_LOOPS = ("scan", "unrolled")
"""How the decoder runs its layers: one `lax.scan` over stacked weights (fast to compile) or a loop
unrolled over per-layer weights (each weight read in place: on XLA:CPU a scan copies every layer's
weights out of the stack each step, ~1.4x slower decode). 'auto' picks unrolled on CPU, scan on
TPU/GPU (compile time of deep models)."""
KV_CACHE_MODES = (None, "int8")
COLLECTIVES = ("xla", "explicit")
"""How a plan's layouts run: sharding constraints only, or per-chip code with the paper's
collectives (`partitioning.collective_layer`)."""


def _layer_loop(layer_loop: str) -> str:
    if layer_loop not in LAYER_LOOPS + ("auto",):
        raise ValueError(f"layer_loop must be 'auto' or one of {LAYER_LOOPS}, got {layer_loop!r}")
    if layer_loop == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "scan"
    return layer_loop


def _check_dtype(dtype) -> jnp.dtype:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return jnp.dtype(name)


class Model:
    """A loaded model: configuration, parameters, optional tokenizer, compiled programs."""

    def __init__(self, config: ModelConfig, params: Params, tokenizer: Tokenizer | None = None,
                 attention_backend: str = "auto", layer_loop: str = "auto",
                 kv_cache: str | None = None, quantization: quant.QuantConfig | None = None,
                 plan=None, mesh=None, collectives: str = "xla"):
        layer_loop = _layer_loop(layer_loop)
        if kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
        if (quantization is not None) != quant.is_quantized(params):
            raise ValueError("pass quantization exactly when the parameters are quantized")
        self.config = config
        restructure = unstack_layers if layer_loop == "unrolled" else stack_layers
        self.layer_loop = layer_loop
        self.tokenizer = tokenizer
        self.runtime = model_lib.Runtime(attention_backend=attention_backend)
        self.dtype = params["embed"].dtype  # embeddings stay float in a quantized model
        self.kv_cache = kv_cache
        self.quantization = quantization
        self.cache_dtype = jnp.dtype(jnp.int8) if kv_cache == "int8" else self.dtype
        if collectives == "explicit" and quantization is not None:
            raise ValueError("collectives='explicit' runs float weights only; use "
                             "collectives='xla' for a quantized model under a plan")
        self.placement = _placement(config, plan, mesh, collectives)
        logits_rt = self.runtime
        if self.placement is None:
            self.params = restructure(params)
        else:
            if _on_host(params):  # host arrays: placed first, restructured on the mesh
                params = self.placement.place_params(params, quantization)
            self.params = self.placement.restructure_params(params, restructure, quantization)
            logits_rt = self.placement.runtime("prefill", self.runtime)
        self._generator = Generator(config, self.runtime, cache_dtype=self.cache_dtype,
                                    placement=self.placement)
        self._logits_fn = jax.jit(functools.partial(model_lib.forward_logits, cfg=config,
                                                    rt=logits_rt))

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype="float32", **kwargs) -> "Model":
        """A model with randomly initialised weights (tests, benchmarks, planning dry-runs)."""
        return cls(config, init_params(config, jax.random.key(seed), _check_dtype(dtype)), **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.name}, {c.param_count() / 1e6:.1f}M params, {c.n_layers} layers, "
                f"{c.attention_kind} attention, dtype={self.dtype.name})")

    @property
    def param_bytes(self) -> int:
        return param_bytes(self.params)

    def memory_report(self, batch: int = 1, context: int | None = None) -> dict[str, int | str]:
        """Bytes of the parameters and of a KV cache for `batch` sequences of `context` tokens
        (default: the model's context), as held now and for the float (model dtype) and bfloat16
        twins, so the effect of weight and KV-cache quantization is visible.
        ``param_bytes_this_process`` counts every parameter buffer on this process's devices
        (shards, and each replica): under a plan it scales with 1 / process count."""
        context = self.config.max_context if context is None else context
        if batch < 1 or context < 1:
            raise ValueError(f"batch and context must be positive, got {batch}, {context}")

        def cache_bytes(dtype) -> int:
            return KVCache.abstract(self.config, batch, context, dtype).nbytes()

        return {
            "weights": self.quantization.name if self.quantization else self.dtype.name,
            "kv_cache": self.kv_cache or self.cache_dtype.name,
            "param_bytes": self.param_bytes,
            "param_bytes_this_process": sum(
                s.data.nbytes for x in jax.tree.leaves(self.params)
                for s in getattr(x, "addressable_shards", ())) or self.param_bytes,
            "param_bytes_float": param_bytes(abstract_params(self.config, self.dtype)),
            "param_bytes_bf16": param_bytes(abstract_params(self.config, jnp.bfloat16)),
            "cache_bytes": cache_bytes(self.cache_dtype),
            "cache_bytes_float": cache_bytes(self.dtype),
            "cache_bytes_bf16": cache_bytes(jnp.bfloat16),
        }

    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts and all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer, and this model has none: "
                                 "pass token ids (list[list[int]])")
            return [self.tokenizer.encode(p) for p in prompts]
        if any(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be all strings or all token-id lists, not a mix")
        return [[int(t) for t in p] for p in prompts]

    def logits(self, tokens) -> np.ndarray:
        """tokens int [B, T] -> float32 numpy logits [B, T, vocab] (causal, position 0 first)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype}"
                             f"{tokens.shape}")
        if tokens.shape[1] == 0 or tokens.shape[1] > self.config.max_context:
            raise ValueError(f"sequence length {tokens.shape[1]} must be in "
                             f"[1, {self.config.max_context}] (the model's context)")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got range "
                             f"[{tokens.min()}, {tokens.max()}]")
        return np.asarray(self._logits_fn(self.params, jnp.asarray(tokens, jnp.int32)))

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop_tokens: Sequence[int] | None = None, seed: int = 0) -> GenerationResult:
        """Generate continuations of ragged prompts (token-id lists, or text with a tokenizer).

        stop_tokens=None stops at the checkpoint's EOS id(s); [] never stops early.
        """
        token_prompts = self._encode(prompts)
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty)
        stops = self.config.eos_token_ids if stop_tokens is None else tuple(stop_tokens)
        bad = [t for t in stops if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"stop token {bad[0]} is outside the vocabulary")
        result = self._generator.generate(self.params, token_prompts, sampling, max_new_tokens,
                                          stops, seed)
        if self.tokenizer is not None:
            text = [self.tokenizer.decode(t) for t in result.tokens]
            result = dataclasses.replace(result, text=text)
        return result

    def save(self, path: str) -> None:
        """Save as a jaxinfer (orbax) checkpoint; `jaxinfer.load(path)` restores it exactly."""
        checkpoint.save_jaxinfer(path, self.config, stack_layers(self.params),
                                 self.tokenizer.path if self.tokenizer else None,
                                 self.quantization.to_dict() if self.quantization else None)


def _on_host(params) -> bool:
    return any(not isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def _placement(cfg: ModelConfig, plan, mesh, collectives: str):
    """A `partitioning.sharding.Placement` for `plan` (mesh: a `jax.sharding.Mesh` with axes
    x, y, z, built from all devices by default), or None without a plan."""
    if collectives not in COLLECTIVES:
        raise ValueError(f"collectives must be one of {COLLECTIVES}, got {collectives!r}")
    if plan is None:
        if mesh is not None:
            raise ValueError("mesh= needs plan= (a partitioning.plan.Plan naming the layouts)")
        return None
    from partitioning.mesh import make_mesh
    from partitioning.plan import Plan
    from partitioning.sharding import Placement
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a partitioning.plan.Plan, got {type(plan).__name__}")
    return Placement(plan, cfg, make_mesh(plan.decode.mesh) if mesh is None else mesh,
                     explicit=collectives == "explicit")


def load(source: str, dtype="float32", *, attention_backend: str = "auto",
         layer_loop: str = "auto", quantize: str | None = None, kv_cache: str | None = None,
         group_size: int | None = None, plan=None, mesh=None,
         collectives: str = "xla") -> Model:
    """Load a Hugging Face checkpoint directory, a jaxinfer (orbax) checkpoint directory, or a
    built-in model ("builtin", "builtin-draft": see `jaxinfer.builtin`).

    dtype applies to HF weights and the built-in models; a jaxinfer checkpoint restores the dtypes it was saved with (and
    its quantization). quantize: "int8" (per output channel) or "int4" (group-wise, `group_size`
    rows per scale, default 128) weight-only quantization of the projections (`jaxinfer.quant`).
    kv_cache: "int8" stores the KV cache as int8 with per-token-per-head scales.
    plan: a `partitioning.plan.Plan`; weights and cache are placed on `mesh` (default: all devices
    as the plan's x, y, z mesh) and prefill and decode run under the plan's layouts.
    collectives: "xla" (sharding constraints; XLA picks the collectives) or "explicit" (the
    paper's collectives written out per chip, `partitioning.collective_layer`; float weights).
    """
    dtype = _check_dtype(dtype)
    qc = None if quantize is None else quant.QuantConfig.from_mode(quantize, group_size)
    if quantize is None and group_size is not None:
        raise ValueError("group_size only applies with quantize='int4' or 'int8'")
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
    enable_compilation_cache()
    builtin_dir = builtin.builtin_path(source)
    if builtin_dir is not None and not os.path.isdir(builtin_dir):
        raise CheckpointError(f"the built-in model {source!r} is missing from this installation "
                              f"({builtin_dir}); run scripts/train_builtin.py")
    source = builtin_dir or source
    if not os.path.isdir(source):
        raise CheckpointError(f"checkpoint directory {source!r} does not exist")
    stored = None
    placement = _placement(checkpoint.read_config(source), plan, mesh, collectives)
    if checkpoint.is_jaxinfer_checkpoint(source):
        stored = checkpoint.read_quantization(source)
        if stored is not None and qc is not None:
            raise ValueError(f"{source} is already quantized (int{stored['bits']}); load it "
                             "without quantize=, or quantize its float checkpoint")
        shardings = None if placement is None else functools.partial(
            placement.param_shardings,
            quantization=None if stored is None else quant.QuantConfig.from_dict(stored))
        cfg, params = checkpoint.load_jaxinfer(source, shardings)
        if builtin_dir is not None:  # shipped in bfloat16 to stay small; computed in `dtype`
            params = jax.tree.map(lambda x: x.astype(dtype), params)
    elif placement is not None:  # each process reads only its devices' shards
        cfg = placement.cfg
        reader = hf_weights.SafetensorsReader(source)
        abstract = abstract_params(cfg, dtype)
        params = placement.read_params(
            jax.eval_shape(unstack_layers, abstract) if _layer_loop(layer_loop) == "unrolled"
            else abstract,
            functools.partial(hf_weights.read_hf_shard, reader, cfg, dtype.name))
    else:
        cfg, params = checkpoint.load_hf(source, dtype)
    if qc is not None:
        params = quant.quantize_params(params, cfg, qc)
    elif stored is not None:
        qc = quant.QuantConfig.from_dict(stored)
    return Model(cfg, params, Tokenizer.from_dir(source), attention_backend=attention_backend,
                 layer_loop=layer_loop, kv_cache=kv_cache, quantization=qc, plan=plan,
                 mesh=mesh if placement is None else placement.mesh, collectives=collectives)
