"""Analytical cost of one prefill or decode step under a partitioning plan (pope2022.md §4-§6).

Per layer: the collectives of the layout (exact (K-1)/K volumes, §4.3), matmul FLOPs (2 per
parameter per token, §4.1, plus attention), weight bytes and KV-cache bytes read from HBM (§6.3),
each per chip from the layout's storage rules (`chip_weights`: a weight the layout leaves whole,
such as K/V projections whose heads do not divide over the chips, costs every chip its full size).
The step adds them up over layers (and the unembedding), combines them as
``max(compute, weight_load + kv_load) + comm`` (§4.1 [D]: no overlap of communication assumed), and
reports MFU (§4.2), cost in chip-seconds per token, per-chip memory and what bounds the step.

Notation as the paper's (§1): B batch, L tokens per sequence in this step, E d_model, F d_ff,
N query heads, K KV heads, Q head dim; mesh X x Y x Z = n chips.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax

from jaxinfer import axes as ax
from jaxinfer import params as params_lib
from jaxinfer import quant
from jaxinfer.config import ModelConfig
from partitioning.hardware import HardwareProfile
from partitioning.layouts import Layout, resolve
from partitioning.plan import GATHERED_AXES, PhasePlan

WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one step processes."""

    batch: int
    """B: sequences in the batch."""
    tokens: int
    """L: tokens per sequence in this step (prefill: the prompt length; decode: 1)."""
    context: int
    """Key/value positions each sequence attends to (and the cache holds) at this step."""
    weight_bytes: float = 2.0
    """Bytes per weight: 2 (bf16), 1 (int8), 0.5 (int4)."""
    act_bytes: float = 2.0
    """Bytes per activation element (bf16)."""
    kv_bytes: float = 2.0
    """Bytes per KV-cache element (bf16; 1 for an int8 cache)."""
    quantization: quant.QuantConfig | None = None
    """The projections' quantization, when known: weight gathers then move exactly the int8 /
    packed-int4 data and the float32 scales (else `weight_bytes` per element, no scales)."""
    logits_tokens: int = 1
    """Positions per sequence whose logits the step computes (prefill and decode: the last)."""


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of one layer, priced per the convention in `partitioning.plan`."""

    kind: str
    """'all-gather', 'reduce-scatter', 'all-reduce' or 'all-to-all'."""
    axes: tuple[str, ...]
    """Mesh axes the collective runs over."""
    group: int
    """K: chips in one group (product of the axes' sizes)."""
    elements: float
    """Per-chip elements the convention's volume is based on (AG: output, RS: input, ...)."""
    element_bytes: float
    """Bytes per element."""
    what: str
    """Which tensor moves."""
    torus_steps: int = 0
    """Ring steps on a torus: the sum over the axes of (size - 1) (latency term)."""
    dcn_group: int = 1
    """Granules (hosts / slices) the group spans: its cross-granule leg runs over DCN."""
    count: int = 1
    """Executions per step (a layer's collectives run once per layer)."""
    moves: str = "activations"
    """'weights' (a weight-gathered layout's weight all-gathers) or 'activations'."""
    part: str = "layer"
    """Where in the step it runs: 'layer' (each decoder layer), 'embedding', 'logits' or 'loop'
    (the decode loop's condition)."""

    @property
    def bytes_per_chip(self) -> float:
        """Bytes one chip sends (pope2022.md §4.3 with exact (K-1)/K)."""
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * self.elements * self.element_bytes * (self.group - 1) / self.group


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """Predicted cost of one step (prefill: the whole prompt; decode: one token)."""

    step_time_s: float
    compute_s: float
    weight_load_s: float
    kv_load_s: float
    comm_s: float
    mfu: float
    cost_chip_s_per_token: float
    memory_per_chip_bytes: float
    fits: bool
    bound: str
    collectives: tuple[Collective, ...]
    """Every collective of the step, each with its executions per step (`Collective.count`)."""

    def breakdown(self) -> dict[str, float]:
        return {"compute_s": self.compute_s, "weight_load_s": self.weight_load_s,
                "kv_load_s": self.kv_load_s, "comm_s": self.comm_s}


def _sizes(plan: PhasePlan) -> dict[str, int]:
    return plan.mesh.as_dict()


def _live(axes, sizes) -> tuple[str, ...]:
    """The axes of size > 1 (collectives over size-1 axes move nothing)."""
    return tuple(a for a in axes if sizes[a] > 1)


def _coll(kind, axes, sizes, elements, element_bytes, what) -> list[Collective]:
    axes = _live(axes, sizes)
    if not axes:
        return []
    group = math.prod(sizes[a] for a in axes)
    steps = sum(sizes[a] - 1 for a in axes)
    return [Collective(kind, axes, group, float(elements), element_bytes, what, steps)]


def _blocks(cfg: ModelConfig) -> int:
    """Residual-stream sub-blocks per layer: 1 (parallel attention+FFN) or 2 (serial)."""
    return 1 if cfg.parallel_block else 2


def _ffn_inputs(cfg: ModelConfig) -> int:
    return 2 if cfg.gated_ffn else 1


def _layer_matrices(cfg: ModelConfig) -> int:
    """Weight elements of one layer's matrices."""
    E, F, Q = cfg.d_model, cfg.d_ff, cfg.head_dim
    return E * Q * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + E * F * (_ffn_inputs(cfg) + 1)


def _ws_collectives(cfg: ModelConfig, plan: PhasePlan, wl: Workload,
                    fuse: bool = True) -> list[Collective]:
    """1D (§5.1) or 2D (§5.2) weight-stationary, attention per §6.2."""
    s, a = _sizes(plan), wl.act_bytes
    BL, E, F, Q, N, K = wl.batch * wl.tokens, cfg.d_model, cfg.d_ff, cfg.head_dim, \
        cfg.n_heads, cfg.n_kv_heads
    out: list[Collective] = []
    if plan.layout == "1d-ws":
        model_axes, x_axes = ("x", "y", "z"), ()
    else:
        model_axes, x_axes = ("y", "z"), ("x",)
    X = math.prod(s[ax] for ax in x_axes)
    M = math.prod(s[ax] for ax in model_axes)
    for _ in range(_blocks(cfg)):
        out += _coll("all-gather", model_axes, s, BL * E / X, a, "block input BLE")
        out += _coll("reduce-scatter", model_axes, s, BL * E / X, a, "block output BLE")
    # Feed-forward: the Megatron pairing needs no collective in 1D; 2D reduces the E-partial sums
    # of the input projections over x and re-gathers the activated intermediate (§5.2 steps 3, 5).
    out += _coll("reduce-scatter", x_axes, s, _ffn_inputs(cfg) * BL * F / M, a, "FFN pre-act BLF")
    out += _coll("all-gather", x_axes, s, BL * F / M, a, "FFN activated BLF")
    # Attention projections: queries like the FFN; K/V sharded with the heads when K divides, else
    # replicated over the head axes and all-reduced over x (§6.1 baseline multiquery).
    out += _coll("reduce-scatter", x_axes, s, BL * N * Q / M, a, "queries BLNQ")
    kv_sharded = K % M == 0
    for name in ("keys", "values"):
        if kv_sharded and (plan.attention == "batch" or K % (M * X) == 0):
            out += _coll("reduce-scatter", x_axes, s, BL * K * Q / M, a, f"{name} BLKQ")
        elif kv_sharded:  # K/V heads split over y*z only: each x chip needs its heads whole
            out += _coll("all-reduce", x_axes, s, BL * K * Q / M, a, f"{name} BLKQ")
        elif plan.attention == "batch":
            out += _coll("reduce-scatter", x_axes, s, BL * K * Q, a, f"{name} BLKQ into batch")
        else:
            out += _coll("all-reduce", x_axes, s, BL * K * Q, a, f"{name} BLKQ")
    if plan.attention == "batch":  # §6.2(b): queries and outputs between heads and batch
        n = plan.mesh.n
        out += _coll("all-to-all", ("x", "y", "z"), s, BL * N * Q / n, a, "queries heads->batch")
        out += _coll("all-to-all", ("x", "y", "z"), s, BL * N * Q / n, a, "attn out batch->heads")
    out += _coll("all-gather", x_axes, s, BL * N * Q / M, a, "attention output BLNQ")
    return _fuse_parallel(out) if cfg.parallel_block and fuse else out


def _fuse_parallel(collectives: list[Collective]) -> list[Collective]:
    """A parallel block fuses W_Q/W_K/W_V with the FFN input matrices and W_O with the FFN output
    (§7.1, §3.1 CODE q_wi / o_wo): their x-axis reduce-scatters run as one collective, and their
    all-gathers as another. Bytes are unchanged; the ring latency is paid once."""
    fused: dict[tuple, Collective] = {}
    out = []
    for c in collectives:
        if c.axes != ("x",) or c.kind not in ("reduce-scatter", "all-gather"):
            out.append(c)
            continue
        key = (c.kind, c.axes, c.element_bytes)
        if key in fused:
            prev = fused[key]
            fused[key] = dataclasses.replace(prev, elements=prev.elements + c.elements,
                                             what=f"{prev.what} + {c.what}")
        else:
            fused[key] = c
    return out + list(fused.values())


def _wg_collectives(cfg: ModelConfig, plan: PhasePlan, wl: Workload) -> list[Collective]:
    """Weight-gathered X / XY / XYZ (§5.3): weights gathered over G, batch sharded over G."""
    s = _sizes(plan)
    gathered = GATHERED_AXES[plan.layout]
    rest = tuple(ax for ax in ("x", "y", "z") if ax not in gathered)
    G = math.prod(s[ax] for ax in gathered)
    R = math.prod(s[ax] for ax in rest)
    BL, E, N, Q = wl.batch * wl.tokens, cfg.d_model, cfg.n_heads, cfg.head_dim
    out = _weight_gathers(_layer_leaves(cfg, wl), resolve(plan, cfg))
    for _ in range(_blocks(cfg)):
        out += _coll("all-gather", rest, s, BL * E / G, wl.act_bytes, "block input BLE")
        out += _coll("reduce-scatter", rest, s, BL * E / G, wl.act_bytes, "block output BLE")
    if plan.attention == "batch" and R > 1:
        out += _coll("all-to-all", rest, s, BL * N * Q / (G * R), wl.act_bytes,
                     "queries heads->batch")
        out += _coll("all-to-all", rest, s, BL * N * Q / (G * R), wl.act_bytes,
                     "attn out batch->heads")
    return out


def layer_collectives(cfg: ModelConfig, plan: PhasePlan, wl: Workload,
                      fuse: bool = True) -> list[Collective]:
    """Every collective of one decoder layer in this step, per chip (what the HLO audit checks).

    Args: the model, the phase plan (layout, attention, mesh), the workload (batch, tokens per
    sequence in this step, activation bytes). Tensors moved: block inputs/outputs [B, L, E]; in 2D
    WS the FFN intermediates [B, L, F] and Q/K/V/attention outputs over x; in batch-sharded
    attention the queries and attention outputs (all-to-all); in weight-gathered layouts every
    weight matrix of the layer over the gathered axes.
    """
    out = (_wg_collectives(cfg, plan, wl) if plan.layout in GATHERED_AXES
           else _ws_collectives(cfg, plan, wl, fuse))
    dcn = dict(zip(("x", "y", "z"), plan.mesh.dcn))
    return [dataclasses.replace(c, dcn_group=math.prod(dcn[a] for a in c.axes)) for c in out]


def step_collectives(cfg: ModelConfig, plan: PhasePlan, wl: Workload) -> list[Collective]:
    """Every collective of one step, per chip, each with its executions per step (`count`):
    the layers' (`layer_collectives`), their norm statistics and weight gathers, the
    embedding, the logits and (decode) the loop condition — what the step's program sends
    (`jaxinfer.model`, `jaxinfer.decode_loop`)."""
    lay = resolve(plan, cfg)
    dcn = dict(zip(("x", "y", "z"), plan.mesh.dcn))
    per_layer = layer_collectives(cfg, plan, wl) + _norm_statistics(cfg, lay, wl, wl.tokens)
    out = [dataclasses.replace(c, count=cfg.n_layers) for c in per_layer]
    out += _embedding_and_logits(cfg, lay, wl)
    if plan.phase == "decode":
        out += [dataclasses.replace(c, part="loop") for c in _coll(
            "all-reduce", lay.live(lay.gathered), _sizes(plan), 1, 4.0,
            "loop condition: rows still running")]
    return [dataclasses.replace(c, dcn_group=math.prod(dcn[a] for a in c.axes)) for c in out]


def _rows(lay: Layout, wl: Workload) -> float:
    """Residual rows per chip (weight-gathered layouts split the batch over the gathered axes)."""
    return wl.batch / lay.size(lay.live(lay.gathered))


def _norm_statistics(cfg: ModelConfig, lay: Layout, wl: Workload, tokens: int,
                     norms: int | None = None) -> list[Collective]:
    """2D layouts split d_model over x: each norm all-reduces its float32 statistics there."""
    norms = _blocks(cfg) if norms is None else norms
    stats = 2 if cfg.norm == "layer" else 1
    rows = _rows(lay, wl) * tokens
    return [c for _ in range(norms * stats) for c in _coll(
        "all-reduce", lay.live(lay.x_axes), lay.mesh.as_dict(), rows, 4.0, "norm statistics")]


def _leaves(specs, shapes, logical) -> list[tuple[str, tuple[int, ...], tuple, float]]:
    """(name, shape, logical axes, bytes per element) of every array of a weight subtree."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_axes = jax.tree.leaves(logical, is_leaf=params_lib.is_axes)
    return [(jax.tree_util.keystr(path), tuple(s.shape), names, float(s.dtype.itemsize))
            for (path, s), names in zip(flat_shapes, flat_axes)]


def _tree_leaves(cfg: ModelConfig, wl: Workload, select) -> list:
    """Leaves of `select(tree)` with their stored dtypes: exact with `wl.quantization`, else
    `wl.weight_bytes` per element of every weight."""
    qc = wl.quantization
    shapes = (params_lib.abstract_params(cfg) if qc is None
              else quant.abstract_quantized_params(cfg, qc))
    leaves = _leaves(None, select(shapes), select(quant.param_logical_axes(cfg, qc)))
    if qc is None:
        return [(n, s, a, wl.weight_bytes) for n, s, a, _ in leaves]
    # QuantizedWeight arrays (".data" int8, ".scale" float32) keep their dtypes; norms, biases
    # and embeddings stay in the model's float dtype
    return [(n, s, a, b if n.endswith((".data", ".scale")) else wl.act_bytes)
            for n, s, a, b in leaves]


def _layer_leaves(cfg: ModelConfig, wl: Workload) -> list:
    return _tree_leaves(cfg, wl, lambda t: t["layers"][0])


def _weight_gathers(leaves, lay: Layout) -> list[Collective]:
    """Weight-gathered layouts (§5.3): every stored weight array all-gathered over the gathered
    axes of its dims, from its stored shard to its gathered size. (`jaxinfer.model` gathers one
    dim at a time; the bytes are the same as one gather over all those axes.)"""
    gathered = set(lay.live(lay.gathered))
    if not gathered:
        return []
    rules, sizes = lay.weight_rules(), lay.mesh.as_dict()
    out = []
    for name, shape, names, nbytes in leaves:
        axes = tuple(a for n in names for a in rules.mesh_axes(n))
        take = tuple(a for a in axes if a in gathered)
        if take:
            kept = lay.size(tuple(a for a in axes if a not in gathered))
            out += [dataclasses.replace(c, moves="weights") for c in _coll(
                "all-gather", take, sizes, math.prod(shape) / kept, nbytes, name)]
    return out


def _embedding_and_logits(cfg: ModelConfig, lay: Layout, wl: Workload) -> list[Collective]:
    """The embedding lookup's reduce-scatter over the vocab shards, and the logits: residual
    all-gather, final-norm statistics, partial sums reduce-scattered over x, vocab all-gathered
    (float32); weight-gathered layouts first gather the embedding / unembedding / final norm."""
    sizes, rows, tl = lay.mesh.as_dict(), _rows(lay, wl), wl.logits_tokens
    globals_ = _tree_leaves(cfg, wl, lambda t: {k: v for k, v in t.items() if k != "layers"})
    globals_ = [(n, s, a, wl.act_bytes if "embed']" in n and "unembed" not in n else b)
                for n, s, a, b in globals_]  # the embedding table stays float
    gathered = set(lay.live(lay.gathered))
    vocab = tuple(a for a in lay.weight_rules().mesh_axes(ax.VOCAB) if a not in gathered)
    embed_x = tuple(a for a in lay.weight_rules().mesh_axes(ax.EMBED) if a not in gathered)
    x, model = lay.live(lay.x_axes), lay.live(lay.model_axes)
    E, V = cfg.d_model, cfg.vocab_size
    embedding = (_weight_gathers(globals_, lay)
                 + _coll("reduce-scatter", vocab, sizes, rows * wl.tokens * E / lay.size(embed_x),
                         wl.act_bytes, "embedding lookup"))
    logits = (_coll("all-gather", model, sizes, rows * tl * E / lay.size(x), wl.act_bytes,
                    "final residual")
              + _norm_statistics(cfg, lay, wl, tl, norms=1)
              + _coll("reduce-scatter", x, sizes, rows * tl * V / lay.size(vocab), 4.0,
                      "logits partial sums")
              + _coll("all-gather", vocab + x, sizes, rows * tl * V, 4.0, "logits vocab"))
    return ([dataclasses.replace(c, part="embedding") for c in embedding]
            + [dataclasses.replace(c, part="logits") for c in logits])


def collective_time(c: Collective, hw: HardwareProfile) -> float:
    """Bandwidth time (§4.3) plus per-step latency.

    A torus chip is credited its full interconnect bandwidth for every collective, whatever axes it
    runs over: the paper's model ("270 GB/s of interconnect bandwidth", §2.1, one "network
    bandwidth" in every §5 formula), under which its layout choices (2D WS for decode, §5.5) come
    out as published. Crediting only the links of the collective's axes (§2.2 [D]) would favour 1D.

    A group spanning D granules runs hierarchically: within each granule over the fast links on
    1/D of the data, then across granules over DCN, where each chip moves (D-1)/D of the full
    per-chip volume at ``hw.dcn_bw``.
    """
    bw = hw.axis_bw * hw.max_mesh_axes if hw.topology == "torus" else hw.axis_bw
    D = c.dcn_group
    if D > 1 and hw.dcn_bw is None:
        raise ValueError(f"hardware {hw.name} has no DCN bandwidth (dcn_bw): cannot price a "
                         "collective across hosts/slices")
    inner = dataclasses.replace(c, group=c.group // D, elements=c.elements / D)
    seconds = inner.bytes_per_chip / bw
    if c.kind == "all-to-all" and hw.topology == "torus":
        seconds /= 4  # scaling book: an all-to-all costs ~1/4 of an all-gather on a torus (§4.3)
    steps = c.torus_steps if hw.topology == "torus" else c.group - 1
    if D > 1:
        outer = dataclasses.replace(c, group=D)
        seconds += outer.bytes_per_chip / hw.dcn_bw
    return seconds + hw.hop_latency_s * steps


def kv_cache_bytes_per_chip(cfg: ModelConfig, plan: PhasePlan, batch: int, context: int,
                            kv_bytes: float) -> float:
    """Per-chip KV cache (§6.3): heads-sharded replicates heads that do not divide; batch-sharded
    splits sequences over the chips."""
    n = plan.mesh.n
    per_seq_head = 2 * cfg.n_layers * context * cfg.head_dim * kv_bytes
    if plan.layout in GATHERED_AXES:
        G = math.prod(plan.mesh.as_dict()[a] for a in GATHERED_AXES[plan.layout])
        if plan.attention == "batch":
            return per_seq_head * batch / n * cfg.n_kv_heads
        return per_seq_head * batch / G * max(cfg.n_kv_heads / (n // G), 1)
    if plan.attention == "batch":
        return per_seq_head * batch / n * cfg.n_kv_heads
    return per_seq_head * batch * max(cfg.n_kv_heads / n, 1)


@dataclasses.dataclass(frozen=True)
class ChipWeights:
    """One chip's share of the weights under a layout (`chip_weights`)."""

    stored_bytes: float
    """Bytes the chip stores (its shard of every weight; a weight whose dims the layout does
    not split, e.g. K/V projections replicated when n_kv_heads does not divide, whole)."""
    read_bytes: float
    """Bytes a step streams from memory: each weight at the size the chip uses it (gathered
    over the gathered axes in weight-gathered layouts, §5.3), except an untied input-embedding
    table, of which a step looks up only its tokens' rows (not counted)."""
    matmul_elements: float
    """Elements of the decoder layers' weight matrices the chip multiplies each of its rows
    by (at the size it uses them): the matmul FLOPs are 2 x rows x this."""


def chip_weights(cfg: ModelConfig, lay: Layout, wl: Workload) -> ChipWeights:
    """Per-chip weight bytes and matmul sizes from each array's logical axes under the
    layout's storage rules (pope2022.md §5.1 `F_xyz`, §5.2 `E_x F_yz`)."""
    return _chip_weights(cfg, lay, wl.weight_bytes, wl.act_bytes, wl.quantization)


@functools.lru_cache(maxsize=4096)
def _chip_weights(cfg: ModelConfig, lay: Layout, weight_bytes: float, act_bytes: float,
                  quantization) -> ChipWeights:
    wl = Workload(1, 1, 0, weight_bytes, act_bytes, act_bytes, quantization=quantization)
    rules, gathered = lay.weight_rules(), set(lay.live(lay.gathered))
    stored = read = elements = 0.0
    parts = ((cfg.n_layers, lambda t: t["layers"][0]),
             (1, lambda t: {k: v for k, v in t.items() if k != "layers"}))
    for count, select in parts:
        for name, shape, names, nbytes in _tree_leaves(cfg, wl, select):
            axes = tuple(a for n in names for a in rules.mesh_axes(n))
            full = count * math.prod(shape)
            in_use = full / lay.size(tuple(a for a in axes if a not in gathered))
            embed = "embed']" in name and "unembed" not in name
            nbytes = wl.act_bytes if embed else nbytes  # the embedding table stays float
            stored += full / lay.size(axes) * nbytes
            if not (embed and not cfg.tie_embeddings):
                read += in_use * nbytes
            if count > 1 and len(shape) >= 2 and not name.endswith(".scale"):
                elements += in_use
    return ChipWeights(stored, read, elements)


def memory_per_chip(cfg: ModelConfig, plan: PhasePlan, wl: Workload) -> float:
    """Weights (stored once, 2D layout, §5.3) + KV cache + one layer's working set."""
    n = plan.mesh.n
    weights = chip_weights(cfg, resolve(plan, cfg), wl).stored_bytes
    kv = kv_cache_bytes_per_chip(cfg, plan, wl.batch, wl.context, wl.kv_bytes)
    gathered = plan.layout in GATHERED_AXES
    tokens_per_chip = wl.batch * wl.tokens / (n if gathered else 1)
    # Live activations of one layer: the residual and its normed copy, one d_ff intermediate.
    acts = tokens_per_chip * (2 * cfg.d_model + cfg.d_ff / (1 if gathered else n)) * wl.act_bytes
    if gathered:  # the weights are streamed one gathered matrix at a time (§7.2)
        G = math.prod(plan.mesh.as_dict()[a] for a in GATHERED_AXES[plan.layout])
        largest = max(cfg.d_model * cfg.d_ff, cfg.d_model * cfg.n_heads * cfg.head_dim)
        acts += largest * wl.weight_bytes * G / n
    return weights + kv + acts


def attention_flops_per_chip(cfg: ModelConfig, wl: Workload, chips: int) -> float:
    """One chip's share (of `chips`) of attention's QK^T and AV FLOPs: 4 per query, key
    position and head dimension (every cached position, as the masked XLA attention computes)."""
    BL = wl.batch * wl.tokens
    return 4 * cfg.n_layers * BL * wl.context * cfg.n_heads * cfg.head_dim / chips


def _flops_per_chip(cfg: ModelConfig, lay: Layout, wl: Workload, weights: ChipWeights) -> float:
    """Matmul FLOPs of the step on one chip (§4.1): 2 per weight element it multiplies per row
    (all B*L rows in weight-stationary layouts, B*L/G when the batch is split over the G
    gathered chips), plus the chip's share of the logits and of attention (QK^T and AV)."""
    BL = wl.batch * wl.tokens
    dense = 2 * weights.matmul_elements * BL / lay.size(lay.live(lay.gathered))
    logits = 2 * cfg.vocab_size * cfg.d_model * wl.batch  # last position only
    return dense + logits / lay.mesh.n + attention_flops_per_chip(cfg, wl, lay.mesh.n)


def estimate(cfg: ModelConfig, plan: PhasePlan, wl: Workload, hw: HardwareProfile,
             nominal_params: float | None = None) -> StepEstimate:
    """Predict one step; MFU uses `nominal_params` (default: the config's count), §4.2."""
    n = plan.mesh.n
    peak = hw.peak_flops_bf16
    lay = resolve(plan, cfg)
    weights = chip_weights(cfg, lay, wl)
    compute = _flops_per_chip(cfg, lay, wl, weights) / peak
    weight_load = weights.read_bytes / hw.hbm_bw
    kv_load = kv_cache_bytes_per_chip(cfg, plan, wl.batch, wl.context, wl.kv_bytes) / hw.hbm_bw
    collectives = step_collectives(cfg, plan, wl)
    comm = sum(c.count * collective_time(c, hw) for c in collectives)
    memory = weight_load + kv_load
    step = max(compute, memory) + comm
    params = nominal_params or cfg.param_count()
    tokens = wl.batch * wl.tokens
    mfu = 2 * params * tokens / (n * peak * step)
    mem = memory_per_chip(cfg, plan, wl)
    bound = max((("compute", compute), ("memory", memory), ("communication", comm)),
                key=lambda kv: kv[1])[0]
    return StepEstimate(step_time_s=step, compute_s=compute, weight_load_s=weight_load,
                        kv_load_s=kv_load, comm_s=comm, mfu=mfu,
                        cost_chip_s_per_token=n * step / tokens, memory_per_chip_bytes=mem,
                        fits=mem <= hw.hbm_bytes, bound=bound, collectives=tuple(collectives))


def ffn_comm_elements(E: int, F: int, BL: int, layout: str, mesh, exact: bool = True) -> float:
    """Per-chip elements moved by one two-matrix FFN layer: exact (K-1)/K volumes (the §13.2 HLO
    oracle), or with exact=False the paper's K >> 1 approximation (§4.3) that Fig. 3 plots (§5.4)."""
    from partitioning.mesh import MeshShape

    cfg = ModelConfig(vocab_size=8, d_model=E, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2,
                      d_ff=F, max_context=BL, gated_ffn=False, parallel_block=True)
    plan = PhasePlan("prefill", layout, "heads", MeshShape.of(mesh))
    wl = Workload(batch=BL, tokens=1, context=1, weight_bytes=1.0, act_bytes=1.0)
    total = 0.0
    for c in layer_collectives(cfg, plan, wl, fuse=False):
        if c.moves == "weights" and c.what not in ("['w_up']", "['w_down']"):
            continue  # only the two FFN matrices
        if c.what.startswith(("queries", "keys", "values", "attention", "attn", "K/V")):
            continue
        total += c.bytes_per_chip if exact else c.bytes_per_chip * c.group / (c.group - 1)
    return total
