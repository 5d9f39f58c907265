"""The compiled programs: each per-chip function of `jaxinfer.model` / `jaxinfer.decode_loop`
under one `jax.shard_map` over its phase's mesh, jitted.

`Programs` holds one jitted function per entry point; the in/out specs come from the phase's
`PhaseSharding` and the parameters' logical axes, so the compiled program contains exactly the
collectives the model code writes (and `partitioning` prices). `lower(...)` returns the lowered
program for an abstract shape bucket (`Model.compiled_hlo`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer import decode_loop as loop_lib
from jaxinfer import model as model_lib
from jaxinfer import placement
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.sampling import DeviceSampling


def _shard_map(fn, sh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=sh.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _replicated(treedef):
    """Replicated specs for every leaf of a tree structure (the sampling parameters)."""
    return jax.tree.unflatten(treedef, [P()] * treedef.num_leaves)


def state_specs(state: loop_lib.SamplingState, sh) -> loop_lib.SamplingState:
    """PartitionSpecs of the decode loop's state: rows like the residual, cache by its rules."""
    rows = lambda x: sh.row_spec(x.ndim - 1)
    return loop_lib.SamplingState(
        step=P(), tokens=rows(state.tokens), logprobs=rows(state.logprobs),
        done=rows(state.done), stopped=rows(state.stopped),
        num_generated=rows(state.num_generated), nonfinite_step=rows(state.nonfinite_step),
        seen=rows(state.seen), last=rows(state.last),
        cache=placement.cache_specs(state.cache, sh), row_keys=rows(state.row_keys),
        running=P())


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted programs of one model under its prefill and decode runtimes."""

    cfg: ModelConfig
    """The model."""
    prefill_rt: model_lib.Runtime
    """Runtime (sharding, backends) of prefill and of full-sequence logits."""
    decode_rt: model_lib.Runtime
    """Runtime of the decode loop."""
    cache_dtype: jnp.dtype
    """KV cache dtype (int8: quantized with scales)."""
    decode_programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """The jitted decode loops built so far, by (output bucket, sampling-filter structure)."""

    def param_specs(self, rt: model_lib.Runtime):
        return placement.param_specs(self.cfg, rt.quantization, rt.sharding)

    def cache_specs(self, rt: model_lib.Runtime) -> KVCache:
        return placement.cache_specs(KVCache.abstract(self.cfg, 1, 1, self.cache_dtype),
                                     rt.sharding)

    @functools.cached_property
    def logits(self):
        """(params, tokens [B, T]) -> float32 logits [B, T, V]."""
        rt, sh = self.prefill_rt, self.prefill_rt.sharding
        fn = functools.partial(model_lib.forward_logits, cfg=self.cfg, rt=rt)
        return jax.jit(_shard_map(fn, sh, (self.param_specs(rt), sh.row_spec(1)),
                                  sh.row_spec(2)))

    @functools.cached_property
    def prefill(self):
        """(params, tokens [B, T], lengths [B]) -> (last-token logits [B, V], prompt KVCache)."""
        rt, sh = self.prefill_rt, self.prefill_rt.sharding
        fn = functools.partial(model_lib.prefill, cfg=self.cfg, rt=rt,
                               cache_dtype=self.cache_dtype)
        out = (sh.row_spec(1), self.cache_specs(rt))
        return jax.jit(_shard_map(fn, sh, (self.param_specs(rt), sh.row_spec(1), sh.row_spec()),
                                  out))

    def decode(self, out_len: int, sp_treedef):
        """(params, first logits [B, V], prompts [B, T], prompt cache, n, seed [2], sampling
        params, stop ids [MAX_STOP_TOKENS], max_new) -> (tokens, logprobs, num, stopped,
        nonfinite): the jitted decode loop for an output bucket and a sampling structure."""
        key = (out_len, sp_treedef)
        if key not in self.decode_programs:
            self.decode_programs[key] = self._decode(out_len, sp_treedef)
        return self.decode_programs[key]

    def _decode(self, out_len: int, sp_treedef):
        rt, sh = self.decode_rt, self.decode_rt.sharding
        fn = functools.partial(loop_lib.decode_loop, out_len=out_len, cfg=self.cfg, rt=rt)
        out = (sh.row_spec(1), sh.row_spec(1), sh.row_spec(), sh.row_spec(), sh.row_spec())
        specs = (self.param_specs(rt), sh.row_spec(1), sh.row_spec(1), self.cache_specs(rt), P(),
                 P(None), _replicated(sp_treedef), P(None), P())
        return jax.jit(_shard_map(fn, sh, specs, out))

    def decode_step(self, state: loop_lib.SamplingState, sp: DeviceSampling):
        """One step of the decode loop alone, with the loop's shardings (introspection)."""
        rt, sh = self.decode_rt, self.decode_rt.sharding
        fn = functools.partial(loop_lib.decode_body, cfg=self.cfg, rt=rt)
        specs = state_specs(state, sh)
        in_specs = (self.param_specs(rt), specs, _replicated(jax.tree.structure(sp)), P(None), P())
        # the state is donated: the loop updates its carry in place, so does the step alone
        return jax.jit(_shard_map(fn, sh, in_specs, specs), donate_argnums=(1,))
