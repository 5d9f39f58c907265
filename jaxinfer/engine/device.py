"""Device side of the continuous-batching engine: the paged KV pool and the jitted engine step.

One step runs the model over a `StepPlan`'s packed tokens as ONE row (tokens [1, T]), or, with G
slot groups (batch-sharded attention, pope2022.md §6.2b), as G rows [G, T/G], one per group, so
the model's all-to-all hands chip g the queries of group g, whose pages its pool segment holds:
each layer's `attend` scatters the step's new K/V of its row into that layer's page pool at
`slot_mapping` (padding rows point one past the pool and are dropped), then calls
`pallas_kernels.ragged_paged_attention` over the page table; logits are computed only at the S sampling rows (`forward(select=...)`) and each
slot samples with its own request's parameters and key: the i-th generated token of a request
uses fold_in(key(request seed), i), so tokens never depend on slot, batch or chunking.

The repetition penalty's seen-token sets live on device, one row per running request
(`seen [max_seqs, V]`, assigned by the host, `StepInputs.seen_rows`): the host fills a row with
the request's tokens when the request is (re)admitted (`fill_seen_row`), and each step marks the
token it samples. Requests without a penalty point at row max_seqs (out of range: never written,
and read as all False). A request's row lies in its slot group's block of max_seqs / G rows, so
under a weight-gathered layout, where the table is split over the gathered axes like the slots,
its row is on the chip that samples it.

`engine_step` is per chip (it takes the `model.Runtime`); `jaxinfer.engine.loop.StepProgram`
jits it (and the on-device multi-step `decode_loop`) for one device,
donating the pool and the seen table. Shapes that key compilation: the token bucket T, the page-table
width W (`plan.page_bucket`; the table is [max_seqs, W]), the static sampling flags and the
top-logprob count;
for `decode_loop` also its step bound and stop-table width.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxinfer import model as model_lib
from jaxinfer.cache import Buffers, quantize_kv
from jaxinfer.config import ModelConfig
from jaxinfer.sampling import DeviceSampling, sample, seed_key


@flax.struct.dataclass
class PagedKV:
    """The paged KV pool: per layer a [P, K, page_size, H] key and value pool."""

    k: Buffers
    """Keys, one [P, K, page_size, H] array per layer (int8 when quantized)."""
    v: Buffers
    """Values, one [P, K, page_size, H] array per layer."""
    k_scale: Buffers | None = None
    """int8 pools only: float32 key scales, one [P, K, page_size] array per layer."""
    v_scale: Buffers | None = None
    """int8 pools only: float32 value scales, one [P, K, page_size] array per layer."""

    @classmethod
    def init(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> "PagedKV":
        """A zeroed pool of `num_pages` pages; dtype int8 stores K/V quantized with scales."""
        shape = (num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)
        dtype = jnp.dtype(dtype)
        if dtype != jnp.int8 and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"KV pool dtype must be a float type or int8, got {dtype}")
        zeros = lambda s, d: tuple(jnp.zeros(s, d) for _ in range(cfg.n_layers))
        if dtype == jnp.int8:
            return cls(k=zeros(shape, dtype), v=zeros(shape, dtype),
                       k_scale=zeros(shape[:-1], jnp.float32),
                       v_scale=zeros(shape[:-1], jnp.float32))
        return cls(k=zeros(shape, dtype), v=zeros(shape, dtype))

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
        """Bytes one page takes over all layers (keys, values and int8 scales)."""
        per_vector = cfg.head_dim * jnp.dtype(dtype).itemsize
        if jnp.dtype(dtype) == jnp.int8:
            per_vector += 4  # one float32 scale per token and head
        return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * per_vector

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> "PagedKV":
        """Store the step's k, v [T, K, H] of `layer` at flat slots page * page_size + offset;
        slots >= P * page_size (padding rows) are dropped."""
        page, offset = slot_mapping // self.page_size, slot_mapping % self.page_size

        def put(buffers: Buffers, new: jax.Array) -> Buffers:  # new [T, K(, H)] at [p, :, off]
            one = buffers[layer].at[page, :, offset].set(new.astype(buffers[layer].dtype),
                                                         mode="drop")
            return buffers[:layer] + (one,) + buffers[layer + 1:]

        if not self.quantized:
            return self.replace(k=put(self.k, k), v=put(self.v, v))
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        return self.replace(k=put(self.k, kq), v=put(self.v, vq), k_scale=put(self.k_scale, ks),
                            v_scale=put(self.v_scale, vs))


@flax.struct.dataclass
class StepInputs:
    """One step's arrays (from a `StepPlan` plus per-request sampling state). S = max_seqs,
    G = slot groups (the plan's; 1 unless attention is batch-sharded), Sg = S / G slots and
    Tg = T / G packed rows per group; row g of the grouped arrays is group g's one-group layout
    (`jaxinfer.engine.plan`), page ids local to its pool segment of P / G pages."""

    token_ids: jax.Array
    """int32 [G, Tg]: packed fed tokens of each group's slots, zero-padded."""
    positions: jax.Array
    """int32 [G, Tg]: position of each packed token in its sequence."""
    slot_mapping: jax.Array
    """int32 [G, Tg]: flat segment index of each token's K/V; padding = P/G * page_size
    (dropped)."""
    page_table: jax.Array
    """int32 [G, Sg, W]: each slot's pages in order (W: `plan.page_bucket`)."""
    kv_lens: jax.Array
    """int32 [G, Sg]: cached tokens of each slot after this step's writes."""
    query_start: jax.Array
    """int32 [G, Sg + 1]: cumulative row offsets of the slots within their group's row."""
    num_seqs: jax.Array
    """int32 [G]: slots in use in each group."""
    sample_rows: jax.Array
    """int32 [G, Sg]: row (in its group's) of each slot's last fed token (its logits row)."""
    sample_mask: jax.Array
    """bool [S]: slots that sample a token this step."""
    seen_rows: jax.Array
    """int32 [S]: each slot's row of the seen table (max_seqs: no penalty, never written)."""
    seeds: jax.Array
    """uint32 [S, 2]: each slot's request seed as (low, high) halves."""
    token_index: jax.Array
    """int32 [S]: index among its request's generated tokens of the token each slot samples."""


def request_keys(seeds: jax.Array, token_index: jax.Array) -> jax.Array:
    """Keys [S] of each request's token_index-th token: fold_in(key(seed), index)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(seed_key(s), i))(seeds, token_index)


def _paged_attend(inp: StepInputs, cfg: ModelConfig, rt: model_lib.Runtime):
    """The model's attend callback over the paged pool (carry = the `PagedKV`, this chip's
    segment): each chip attends one row, its group's (`model.attention_rows`: the group whose
    pool segment it holds under batch-sharded attention; the only one otherwise)."""
    own = lambda a: model_lib.attention_rows(a, rt)[0]
    slot_mapping, page_table, kv_lens, query_start, num_seqs = (own(a) for a in (
        inp.slot_mapping, inp.page_table, inp.kv_lens, inp.query_start, inp.num_seqs))

    def attend(q, k, v, layer, kv: PagedKV):  # q [1, Tg, n, H]; k, v [1, Tg, k, H]
        if q.shape[0] != 1:
            raise ValueError(f"the engine step attends one row (slot group) per chip, this "
                             f"layout gives a chip {q.shape[0]}")
        kv = kv.write(layer, k[0], v[0], slot_mapping)
        sel = model_lib.kv_heads_for_queries(kv.k[layer].shape[1], q.shape[2], cfg, rt)
        scales = {} if not kv.quantized else {"k_scale": sel(kv.k_scale[layer]),
                                              "v_scale": sel(kv.v_scale[layer])}
        out = pallas_kernels.ragged_paged_attention(
            q[0], sel(kv.k[layer]), sel(kv.v[layer]), page_table, kv_lens, query_start,
            num_seqs, backend=rt.attention_backend, **scales)  # [Tg, n, H]
        return out[None], kv

    return attend


@flax.struct.dataclass
class StepOutput:
    """What one engine step returns per slot (S = max_seqs, k = the call's top-logprob count)."""

    tokens: jax.Array
    """int32 [S]: sampled token (0 where the slot does not sample or its logits are not finite)."""
    logprobs: jax.Array
    """float32 [S]: raw log-probability of the sampled token."""
    finite: jax.Array
    """bool [S]: the slot's logits were all finite."""
    top_ids: jax.Array
    """int32 [S, k]: the k most likely token ids under the raw distribution, most likely first."""
    top_logprobs: jax.Array
    """float32 [S, k]: their raw log-probabilities."""


def engine_step(params, kv: PagedKV, seen: jax.Array, inp: StepInputs, sp: DeviceSampling,
                cfg: ModelConfig, rt: model_lib.Runtime, num_top: int = 0):
    """One engine step (per chip) -> (StepOutput, kv, seen). num_top (static): how many top
    raw logprobs per slot to return (0: none, [S, 0] arrays)."""
    attend = _paged_attend(inp, cfg, rt)
    logits, kv = model_lib.forward(params, inp.token_ids, inp.positions, attend, kv, cfg, rt,
                                   select=inp.sample_rows)  # [G, Sg, V]
    logits = logits.reshape(-1, logits.shape[-1])  # [S, V] (this chip's slots: see below)
    # weight-gathered layouts: this chip holds its slots' block of the seen table (rows
    # offset like its residual rows; the no-penalty row max_seqs stays out of range)
    seen_rows = inp.seen_rows - model_lib.row_ids(seen.shape[0], rt)[0]  # [S]
    row_seen = (jnp.take(seen, seen_rows, axis=0, mode="fill", fill_value=False)
                if sp.use_penalty else jnp.zeros(logits.shape, bool))  # [S, V]
    tokens, logprobs = sample(logits, row_seen, request_keys(inp.seeds, inp.token_index), sp)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    tokens = jnp.where(inp.sample_mask & finite, tokens, 0)
    if sp.use_penalty:
        seen = seen.at[seen_rows, tokens].max(inp.sample_mask, mode="drop")
    top_logprobs, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), num_top)
    out = StepOutput(tokens=tokens, logprobs=logprobs, finite=finite,
                     top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)
    return out, kv, seen


def fill_seen_row(seen: jax.Array, row: jax.Array, tokens: jax.Array,
                  length: jax.Array) -> jax.Array:
    """seen [R, V] with row `row` replaced by the set of tokens[:length] (tokens [L] padded)."""
    valid = jnp.arange(tokens.shape[0]) < length
    return seen.at[row].set(jnp.zeros(seen.shape[1], bool).at[tokens].max(valid))


def step_inputs(plan, seen_rows: np.ndarray, seeds: np.ndarray,
                token_index: np.ndarray) -> StepInputs:
    """The device inputs of a `StepPlan` (numpy arrays; jit moves them); seen_rows, seeds and
    token_index are per device slot [S]."""
    g = plan.num_groups
    rows = lambda a: a.reshape((g, -1) + a.shape[1:])
    return StepInputs(
        token_ids=rows(plan.token_ids), positions=rows(plan.positions),
        slot_mapping=rows(plan.slot_mapping), page_table=rows(plan.page_table),
        kv_lens=rows(plan.kv_lens), query_start=rows(plan.query_start),
        num_seqs=plan.group_seqs, sample_rows=rows(plan.sample_rows),
        sample_mask=plan.sample_mask, seen_rows=seen_rows, seeds=seeds, token_index=token_index)
