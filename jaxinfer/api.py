"""The public Python API: `load(source)` returns a `Model` with `logits`, `generate` and `save`."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import (builtin, chat, checkpoint, hf_weights, placement, quant, streaming,
                      validation)
from jaxinfer.cache import KVCache
from jaxinfer.compile_cache import enable_compilation_cache
from jaxinfer.config import ModelConfig
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.engine.run import check_params
from jaxinfer.generate import GenerationResult, Generator
from jaxinfer.hf_weights import CheckpointError
from jaxinfer.model import Runtime
from jaxinfer.params import Params, abstract_params, init_params, param_bytes
from jaxinfer.programs import Programs
from jaxinfer.sampling import SamplingConfig, SamplingParams
from jaxinfer.sharding import PhaseSharding
from jaxinfer.tokenizer import Tokenizer
from partitioning.execution import plan_shardings

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_MODES = (None, "int8")


def _check_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(validation.dtype_name("dtype", dtype, DTYPES))


class Model:
    """A loaded model: configuration, parameters, optional tokenizer, compiled programs."""

    def __init__(self, config: ModelConfig, params: Params, tokenizer: Tokenizer | None = None,
                 attention_backend: str = "auto", kv_cache: str | None = None,
                 quantization: quant.QuantConfig | None = None, plan=None, mesh=None):
        """plan: a `partitioning.plan.Plan` (prefill and decode run under its layouts on `mesh`,
        default all devices); None: one device."""
        if kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
        if (quantization is not None) != quant.is_quantized(params):
            raise ValueError("pass quantization exactly when the parameters are quantized")
        self.config = config
        self.tokenizer = tokenizer
        self.plan = plan
        self.attention_backend = attention_backend
        self.dtype = params["embed"].dtype  # embeddings stay float in a quantized model
        self.kv_cache = kv_cache
        self.quantization = quantization
        self.cache_dtype = jnp.dtype(jnp.int8) if kv_cache == "int8" else self.dtype
        self.shardings = _shardings(config, plan, mesh)
        self.params = placement.place_params(params, config, quantization, self.shardings[1])
        self._generator = _generator(config, self.shardings, attention_backend, quantization,
                                     self.cache_dtype)

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype="float32", **kwargs) -> "Model":
        """A model with randomly initialised weights (tests, benchmarks, planning dry-runs)."""
        return cls(config, init_params(config, jax.random.key(seed), _check_dtype(dtype)), **kwargs)

    def __repr__(self) -> str:
        c = self.config
        weights = self.quantization.name if self.quantization else self.dtype.name
        plan = "one device" if self.plan is None else (
            f"prefill {self.plan.prefill.layout}/{self.plan.prefill.attention}, decode "
            f"{self.plan.decode.layout}/{self.plan.decode.attention} on mesh "
            f"{self.plan.decode.mesh}")
        return (f"Model({c.name}, {c.param_count() / 1e6:.1f}M params, {c.n_layers} layers, "
                f"{c.attention_kind} attention, weights={weights}, "
                f"kv_cache={self.kv_cache or self.cache_dtype.name}, plan={plan}, "
                f"backend={self.attention_backend}, "
                f"tokenizer={'yes' if self.tokenizer else 'none'})")

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
        prompts = validation.prompts(prompts)
        if isinstance(prompts[0], str):
            if self.tokenizer is None:
                raise validation.InvalidArgument(
                    "text prompts need a tokenizer, and this model has none: pass token ids "
                    "(list[list[int]])")
            return [self.tokenizer.encode(p) for p in prompts]
        return prompts

    def logits(self, tokens) -> np.ndarray:
        """tokens int [B, T] -> float32 numpy logits [B, T, vocab] (causal, position 0 first)."""
        tokens = validation.logits_tokens(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype}"
                             f"{tokens.shape}")
        if tokens.shape[1] == 0 or tokens.shape[1] > self.config.max_context:
            raise ValueError(f"sequence length {tokens.shape[1]} must be in "
                             f"[1, {self.config.max_context}] (the model's context)")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got range "
                             f"[{tokens.min()}, {tokens.max()}]")
        sh = self.shardings[0]
        batch = -(-tokens.shape[0] // sh.batch_multiple) * sh.batch_multiple
        padded = np.zeros((batch, tokens.shape[1]), np.int32)
        padded[:tokens.shape[0]] = tokens
        logits = self._generator.programs.logits(
            self.params, placement.host_array(padded, sh.row_spec(1), sh))
        return np.asarray(_fetch_all(logits))[:tokens.shape[0]]

    def compiled_hlo(self, phase: str, batch: int, context: int,
                     prompt_len: int | None = None) -> str:
        """The optimized HLO (`compiled.as_text()`) of exactly the program `generate` runs for
        this shape bucket under the model's plan and backends: "prefill" of `prompt_len` tokens
        (default `context`), or "decode": one step of the decode loop, compiled alone with the
        loop's shardings, over a cache of `context` positions."""
        lowered = self._generator.lowered(self.params, phase, batch, context, prompt_len)
        return lowered.compile().as_text()

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop_tokens: Sequence[int] | None = None, seed: int = 0,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 engine: Engine | None = None, stop=None,
                 include_stop_str_in_output: bool = False, n: int = 1) -> GenerationResult:
        """Generate continuations of ragged prompts (token-id lists, or text with a tokenizer).

        stop_tokens=None stops at the checkpoint's EOS id(s); [] never stops early.
        params (one `SamplingParams` for all prompts, or one per prompt) or engine (from
        `Model.engine`) run the continuous-batching engine instead of one static batch; with
        params the sampling keywords must stay at their defaults (seed still applies to requests
        whose params.seed is None). The result is then an `EngineResult` (with `stats`).
        stop (stop strings), include_stop_str_in_output and n (completions per prompt) run
        `stream` and collect it: a `jaxinfer.streaming.StreamResult`, flattened prompt-major
        with `prompt_index` per result. `res.timings`: wall-clock seconds ('prefill_s' and
        'decode_s' for the static batch; 'wall_s' and 'device_s' for the engine).
        """
        options = streaming.TextOptions(stop, include_stop_str_in_output, n)
        if options != streaming.TextOptions():
            events = self.stream(prompts, params, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
                                 seed=seed, engine=engine, stop=options.stop, n=options.n,
                                 include_stop_str_in_output=options.include_stop_str_in_output)
            return streaming.collect(events, events.count, self.tokenizer is not None)
        if params is not None or engine is not None:
            keywords = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                            stop_tokens=stop_tokens)
            return self._engine_generate(prompts, params, engine, keywords, seed)
        sampling_args = validation.sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        max_new_tokens, seed = validation.max_new_tokens(max_new_tokens), validation.seed(seed)
        stop_tokens = validation.stop_tokens(stop_tokens)
        token_prompts = self._encode(prompts)
        sampling = SamplingConfig(**sampling_args)
        stops = self.config.eos_token_ids if stop_tokens is None else stop_tokens
        bad = [t for t in stops if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"stop token {bad[0]} is outside the vocabulary")
        result = self._generator.generate(self.params, token_prompts, sampling, max_new_tokens,
                                          stops, seed)
        if self.tokenizer is not None:
            text = [self.tokenizer.decode(t) for t in result.tokens]
            result = dataclasses.replace(result, text=text)
        return result

    def engine(self, config: EngineConfig | None = None) -> Engine:
        """A continuous-batching engine over this model (`jaxinfer.engine`; with a plan, under
        its decode layout)."""
        return Engine(self, config)

    def _engine_generate(self, prompts, params, engine, keywords: dict, seed):
        engine, params = self._engine_and_params(engine, params, keywords)
        return engine.generate(prompts, params, seed=seed)

    def _engine_and_params(self, engine, params, keywords: dict):
        """(the engine to run, params or one SamplingParams made of the sampling keywords)."""
        if engine is None:
            engine = self.engine()
        elif not isinstance(engine, Engine) or engine.model is not self:
            raise validation.fail("engine", engine, "an Engine made by this model's engine()")
        if params is None:
            params = SamplingParams(**keywords)
        elif SamplingParams(**keywords) != SamplingParams():
            raise validation.InvalidArgument(
                "pass either params= or the sampling keywords (max_new_tokens, temperature, "
                "top_k, top_p, min_p, repetition_penalty, stop_tokens, logprobs), not both")
        return engine, params

    def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, seed: int = 0, stop=None, include_stop_str_in_output: bool = False,
               n: int = 1, engine: Engine | None = None, **sampling) -> "streaming.EventStream":
        """Stream generation: `StreamEvent`s (index, prompt_index, text, token_ids, logprobs,
        finish_reason) as the engine produces tokens; prompts: one string or token-id list, or a
        list of them. `text` holds only the new text and never splits a UTF-8 character;
        joined per index it equals `generate`'s text. `sampling`: SamplingParams fields
        (max_new_tokens, temperature, ...), or pass params. stop: stop strings (finish_reason
        'stop'; cut from the text unless include_stop_str_in_output; the request is aborted in
        the engine). n: completions per prompt, index = prompt_index * n + sample."""
        fields = [f.name for f in dataclasses.fields(SamplingParams) if f.name != "seed"]
        unknown = sorted(set(sampling) - set(fields))
        if unknown:
            raise validation.InvalidArgument(
                f"stream() got the unknown keyword {unknown[0]!r}; sampling keywords are "
                f"{', '.join(fields)} (or pass params=)")
        token_prompts = self._encode(validation.one_or_many_prompts(prompts))
        engine, params = self._engine_and_params(engine, params, sampling)
        plist = check_params(params, len(token_prompts))
        options = [streaming.TextOptions(stop, include_stop_str_in_output, n)] * len(plist)
        return streaming.EventStream(engine, token_prompts, plist, options, validation.seed(seed))

    def chat(self, messages, add_generation_prompt: bool = True, **kwargs) -> GenerationResult:
        """Generate the reply to one conversation (a list of {"role", "content"} dicts) under
        the checkpoint's chat template (`jaxinfer.chat`; an error when it has none). kwargs:
        those of `generate`."""
        text = chat.render(self.tokenizer, messages, add_generation_prompt)
        return self.generate([self.tokenizer.encode(text, add_special_tokens=False)], **kwargs)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Save as a jaxinfer (orbax) checkpoint; `jaxinfer.load(path)` restores it exactly.

        Atomic: written into a temporary sibling directory, then renamed into place. An existing
        non-empty directory is replaced only with overwrite=True."""
        path, overwrite = validation.save_path(path), validation.boolean("overwrite", overwrite)
        checkpoint.save_jaxinfer(path, self.config, self.params,
                                 self.tokenizer.path if self.tokenizer else None,
                                 self.quantization.to_dict() if self.quantization else None,
                                 overwrite=overwrite)


def _fetch_all(x: jax.Array) -> np.ndarray:
    """A host copy of an array that may span several processes' devices."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _generator(cfg: ModelConfig, shardings, attention_backend: str, qc, cache_dtype) -> Generator:
    prefill_sh, decode_sh = shardings
    return Generator(Programs(cfg, Runtime(prefill_sh, attention_backend, qc),
                              Runtime(decode_sh, attention_backend, qc), jnp.dtype(cache_dtype)))


def compiled_hlo(config: ModelConfig, phase: str, batch: int, context: int,
                 prompt_len: int | None = None, *, dtype="float32", quantize: str | None = None,
                 group_size: int | None = None, kv_cache: str | None = None, plan=None, mesh=None,
                 attention_backend: str = "xla") -> str:
    """`Model.compiled_hlo` of a model that is never materialized: the programs are lowered
    from the parameters' shapes and shardings (any size of model; planning and audits)."""
    program, args = _abstract_step(config, phase, batch, context, prompt_len, dtype, quantize,
                                   group_size, kv_cache, plan, mesh, attention_backend)
    return program.lower(*args).compile().as_text()


def step_shape(config: ModelConfig, phase: str, batch: int, prompt_len: int, *, plan=None,
               mesh=None) -> tuple[int, int]:
    """(rows, tokens per row) of the step `generate` compiles for `batch` prompts of
    `prompt_len` tokens: the batch and prompt buckets (decode: one token per row)."""
    generator = _generator(config, _shardings(config, plan, mesh), "xla", None, jnp.float32)
    tokens = 1 if phase == "decode" else generator.prompt_bucket(prompt_len)
    return generator.batch_bucket(batch), tokens


def export_step(config: ModelConfig, phase: str, batch: int, context: int,
                prompt_len: int | None = None, *, platform: str, dtype="bfloat16",
                quantize: str | None = None, group_size: int | None = None,
                kv_cache: str | None = None, plan=None, mesh=None,
                attention_backend: str = "auto") -> jax.export.Exported:
    """The same step exported (`jax.export`) for `platform` ("tpu", "cuda"): checks from any
    host that the partitioned program, its Mosaic / Triton kernels included, lowers there."""
    program, args = _abstract_step(config, phase, batch, context, prompt_len, dtype, quantize,
                                   group_size, kv_cache, plan, mesh, attention_backend)
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return jax.export.export(program, platforms=[platform], disabled_checks=[triton])(*args)


def _abstract_step(config, phase, batch, context, prompt_len, dtype, quantize, group_size,
                   kv_cache, plan, mesh, attention_backend):
    dtype = _check_dtype(dtype)
    qc = None if quantize is None else quant.QuantConfig.from_mode(quantize, group_size)
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
    shardings = _shardings(config, plan, mesh)
    abstract = (abstract_params(config, dtype) if qc is None
                else quant.abstract_quantized_params(config, qc, dtype))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, placement.param_shardings(config, qc, shardings[1]))
    cache_dtype = jnp.int8 if kv_cache == "int8" else dtype
    generator = _generator(config, shardings, attention_backend, qc, cache_dtype)
    return generator.step_program(params, phase, batch, context, prompt_len)


def _shardings(cfg: ModelConfig, plan, mesh) -> tuple[PhaseSharding, PhaseSharding]:
    """(prefill, decode) shardings: the plan's layouts on `mesh`, or one device."""
    if plan is None:
        if mesh is not None:
            raise ValueError("mesh= needs plan= (a partitioning.plan.Plan naming the layouts)")
        single = PhaseSharding.single_device()
        return single, single
    return plan_shardings(plan, cfg, mesh)


def load(source: str, dtype="float32", *, attention_backend: str = "auto",
         quantize: str | None = None, kv_cache: str | None = None,
         group_size: int | None = None, plan=None, mesh=None) -> Model:
    """Load a Hugging Face checkpoint directory, a jaxinfer (orbax) checkpoint directory, or a
    built-in model ("builtin", "builtin-draft": see `jaxinfer.builtin`).

    dtype applies to HF weights and the built-in models; a jaxinfer checkpoint restores the dtypes it was saved with (and
    its quantization). quantize: "int8" (per output channel) or "int4" (group-wise, `group_size`
    rows per scale, default 128) weight-only quantization of the projections (`jaxinfer.quant`).
    kv_cache: "int8" stores the KV cache as int8 with per-token-per-head scales.
    plan: a `partitioning.plan.Plan`; weights and cache are placed on `mesh` (default: all devices
    as the plan's x, y, z mesh) and prefill and decode run under the plan's layouts, each as one
    per-chip program with the layout's collectives (`jaxinfer.model`).
    """
    source, dtype = validation.source_path(source), _check_dtype(dtype)
    group_size = validation.optional_integer("group_size", group_size, 1)
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
    if os.path.exists(source) and not os.path.isdir(source):
        raise CheckpointError(f"checkpoint path {source!r} is a file, not a checkpoint directory")
    if not os.path.isdir(source):
        raise CheckpointError(f"checkpoint directory {source!r} does not exist")
    stored = None
    shardings = _shardings(checkpoint.read_config(source), plan, mesh)
    decode_sh = shardings[1]
    if checkpoint.is_jaxinfer_checkpoint(source):
        stored = checkpoint.read_quantization(source)
        if stored is not None and qc is not None:
            raise ValueError(f"{source} is already quantized (int{stored['bits']}); load it "
                             "without quantize=, or quantize its float checkpoint")
        stored_qc = None if stored is None else quant.QuantConfig.from_dict(stored)
        cfg_jaxinfer = checkpoint.read_config(source)
        cfg, params = checkpoint.load_jaxinfer(
            source, lambda tree: placement.param_shardings(cfg_jaxinfer, stored_qc, decode_sh))
        if builtin_dir is not None:  # shipped in bfloat16 to stay small; computed in `dtype`
            params = jax.tree.map(lambda x: x.astype(dtype), params)
    elif plan is not None:  # each process reads only its devices' shards
        cfg = checkpoint.read_config(source)
        reader = hf_weights.SafetensorsReader(source)
        params = placement.read_params(
            cfg, dtype, decode_sh,
            functools.partial(hf_weights.read_hf_shard, reader, cfg, dtype.name))
    else:
        cfg, params = checkpoint.load_hf(source, dtype)
    if qc is not None:
        params = quant.quantize_params(params, cfg, qc)
    elif stored is not None:
        qc = quant.QuantConfig.from_dict(stored)
    return Model(cfg, params, Tokenizer.from_dir(source), attention_backend=attention_backend,
                 kv_cache=kv_cache, quantization=qc, plan=plan,
                 mesh=None if plan is None else decode_sh.mesh)
