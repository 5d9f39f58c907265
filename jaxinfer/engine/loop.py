"""The on-device multi-step decode loop and the jitted programs of the engine.

`decode_loop` runs up to `max_steps` engine steps of a decode-only `StepPlan` in one device call
(`lax.while_loop`): each step feeds every slot the token it sampled in the previous step (the
plan's tokens in the first), one position further, its K/V written into the pages the scheduler
reserved (`Scheduler.schedule(lookahead=...)`). The page table, the sampling parameters and the
slots stay fixed. It returns after step j when j + 1 reaches min(step_limits) over the slots
(pages reserved or max_new_tokens left), when some slot sampled one of its stop tokens or had
non-finite logits, or when max_steps steps ran. Every step is exactly `engine_step`, so a
request's tokens (greedy or sampled: token i uses fold_in(key(seed), i)) equal those of single
steps.

Decode-only layout (`jaxinfer.engine.plan`): slot i of a group owns packed row i of the group's
block (Tg >= its num_seqs rows, the rest padding), so the next step's inputs are computed on
device from the sampled tokens [S]. Under a weight-gathered layout each chip loops over its own
groups' slots; the step bound (a min) and the stop flag (a sum) are reduced over the gathered
axes so every chip runs the same steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer import axes as ax
from jaxinfer import model as model_lib
from jaxinfer import placement
from jaxinfer.config import ModelConfig
from jaxinfer.engine.device import PagedKV, StepInputs, StepOutput, engine_step, fill_seen_row
from jaxinfer.sampling import DeviceSampling


def _next_group_rows(positions, page_table, kv_lens, num_seqs, tokens, page_size: int,
                     num_pages: int):
    """One group's next decode rows: row r < num_seqs (= slot r) feeds tokens[r] one position
    further; padding rows stay padding. positions [Tg], page_table [Sg, W], kv_lens, tokens
    [Sg] -> (token_ids, positions, slot_mapping [Tg], kv_lens [Sg])."""
    rows = jnp.arange(positions.shape[0])  # [Tg]
    real = rows < num_seqs
    positions = jnp.where(real, positions + 1, 0)
    slot_of_row = jnp.minimum(rows, page_table.shape[0] - 1)
    pages = page_table[slot_of_row, positions // page_size]  # [Tg]
    slot_mapping = jnp.where(real, pages * page_size + positions % page_size,
                             num_pages * page_size)
    slots = jnp.arange(kv_lens.shape[0])
    return (jnp.where(real, jnp.take(tokens, slot_of_row), 0), positions, slot_mapping,
            jnp.where(slots < num_seqs, kv_lens + 1, 0))


def next_decode_inputs(inp: StepInputs, tokens: jax.Array, page_size: int,
                       num_pages: int) -> StepInputs:
    """The inputs of the next decode step, group by group (`_next_group_rows`); tokens [S],
    num_pages: pages of one group's pool segment."""
    next_rows = functools.partial(_next_group_rows, page_size=page_size, num_pages=num_pages)
    token_ids, positions, slot_mapping, kv_lens = jax.vmap(next_rows)(
        inp.positions, inp.page_table, inp.kv_lens, inp.num_seqs,
        tokens.reshape(inp.kv_lens.shape))
    return inp.replace(token_ids=token_ids, positions=positions, slot_mapping=slot_mapping,
                       kv_lens=kv_lens, token_index=inp.token_index + 1)


def decode_loop(params, kv: PagedKV, seen: jax.Array, inp: StepInputs, sp: DeviceSampling,
                step_limits: jax.Array, stops: jax.Array, cfg: ModelConfig,
                rt: model_lib.Runtime, num_top: int = 0, max_steps: int = 8):
    """Up to max_steps decode steps (see the module docstring) -> (steps run: int32 scalar,
    StepOutput with a leading [max_steps] axis (rows past the steps run are zeros), kv, seen).

    step_limits int32 [S]: tokens each slot may sample (ignored on non-sampling slots);
    stops int32 [S, W]: each slot's stop token ids, padded with -1."""
    active = inp.sample_mask  # [S] (this chip's slots under a weight-gathered layout)
    gathered = rt.lc.gathered
    bound = jnp.minimum(max_steps, jnp.min(jnp.where(active, step_limits, max_steps)))
    if gathered:  # every chip runs the same steps: the bound and the stop are global
        bound = jax.lax.pmin(bound, gathered)
    s = active.shape[0]
    buffers = StepOutput(
        tokens=jnp.zeros((max_steps, s), jnp.int32),
        logprobs=jnp.zeros((max_steps, s), jnp.float32),
        finite=jnp.zeros((max_steps, s), bool),
        top_ids=jnp.zeros((max_steps, s, num_top), jnp.int32),
        top_logprobs=jnp.zeros((max_steps, s, num_top), jnp.float32))

    def cond(carry):
        j, stopped = carry[0], carry[1]
        return (j < bound) & ~stopped

    def body(carry):
        j, _, kv, seen, inp, out = carry
        step, kv, seen = engine_step(params, kv, seen, inp, sp, cfg, rt, num_top)
        out = jax.tree.map(lambda buf, x: buf.at[j].set(x), out, step)
        hit = jnp.any(step.tokens[:, None] == stops, axis=-1) | ~step.finite  # [S]
        inp = next_decode_inputs(inp, step.tokens, kv.page_size, kv.num_pages)
        stopped = jnp.sum(active & hit, dtype=jnp.int32)
        if gathered:  # the loop condition's all-reduce (priced: cost_model.step_collectives)
            stopped = jax.lax.psum(stopped, gathered)
        return j + 1, stopped > 0, kv, seen, inp, out

    j, _, kv, seen, _, out = jax.lax.while_loop(
        cond, body, (jnp.int32(0), jnp.bool_(False), kv, seen, inp, buffers))
    return j, out, kv, seen


def pool_specs(kv: PagedKV, sh) -> PagedKV:
    """PartitionSpecs of a pool under a phase sharding, split like the dense cache
    (`PhaseSharding.cache` rules): its pages like the batch (one segment per slot group under
    batch-sharded attention, whole otherwise), KV heads like the heads."""
    pages = sh.cache.spec((ax.BATCH, ax.ACT_KV_HEADS, None, None))  # [P, K, page, H]
    scales = sh.cache.spec((ax.BATCH, ax.ACT_KV_HEADS, None))  # [P, K, page]
    layers = lambda spec, buffers: None if buffers is None else tuple(spec for _ in buffers)
    return PagedKV(k=layers(pages, kv.k), v=layers(pages, kv.v),
                   k_scale=layers(scales, kv.k_scale), v_scale=layers(scales, kv.v_scale))


def num_groups(rt: model_lib.Runtime) -> int:
    """The step's slot groups: one per attention batch shard (1 with attention over heads on
    a weight-stationary layout). Weight-gathered layouts split the residual's batch over their
    gathered axes (pope2022.md §5.3), which are attention batch axes too: chip c's residual
    holds the groups of its gathered index."""
    return rt.sharding.size(rt.lc.attn_batch)


def slot_spec(rt: model_lib.Runtime, leading: int = 0) -> P:
    """PartitionSpec of per-group and per-slot arrays ([G, ...] / [S, ...], after `leading`
    unsplit dims): split over the gathered axes of a weight-gathered layout (each chip runs its
    own groups' rows end to end), replicated otherwise."""
    gathered = rt.lc.gathered
    return P(*(None,) * leading, gathered) if gathered else P()


class StepProgram:
    """The jitted engine step, on-device decode loop and seen-row fill of one model (the pool
    and the seen table donated). On a mesh of several devices each program is the per-chip
    function under one `jax.shard_map`: parameters by their placement specs, the pool over KV
    heads or its pages over the slot groups (`pool_specs`), the step's inputs, sampling
    parameters, outputs and seen table replicated (weight-stationary layouts: every chip samples
    the same tokens from the same logits) or split over the gathered axes (weight-gathered
    layouts: each chip samples its own groups' slots; `slot_spec`). `groups`: the slot groups
    the step's plans must have (`num_groups`)."""

    def __init__(self, cfg: ModelConfig, rt: model_lib.Runtime, pool: PagedKV):
        self.cfg, self.rt = cfg, rt
        self.groups = num_groups(rt)
        step = functools.partial(engine_step, cfg=cfg, rt=rt)
        loop = functools.partial(decode_loop, cfg=cfg, rt=rt)
        sh = rt.sharding
        self.kv_specs = pool_specs(pool, sh)
        self.seen_spec = slot_spec(rt)
        if sh.mesh.size > 1:
            params = placement.param_specs(cfg, rt.quantization, sh)
            rows, steps = slot_spec(rt), slot_spec(rt, leading=1)
            step = self._sharded(step, (params, self.kv_specs, rows, rows, rows),
                                 (rows, self.kv_specs, rows), ("num_top",))
            loop = self._sharded(loop, (params, self.kv_specs, rows, rows, rows, rows, rows),
                                 (P(), steps, self.kv_specs, rows), ("num_top", "max_steps"))
        self.step = jax.jit(step, static_argnames=("num_top",), donate_argnums=(1, 2))
        self.loop = jax.jit(loop, static_argnames=("num_top", "max_steps"),
                            donate_argnums=(1, 2))
        self.fill_seen = jax.jit(fill_seen_row, donate_argnums=(0,))

    def _sharded(self, fn, in_specs, out_specs, static: tuple[str, ...]):
        """fn(*arrays, **static) under shard_map over the phase's mesh (static keywords bound
        before mapping)."""
        mesh = self.rt.sharding.mesh

        def mapped(*args, **kwargs):
            bound = functools.partial(fn, **{k: kwargs[k] for k in static})
            return jax.shard_map(bound, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False)(*args)

        return mapped
