"""The scheduler's data: requests, the per-step plan the device consumes, and statistics.

Layout of one step (what the ragged paged attention kernel and the device step read): the step's
sequences occupy slots 0..num_seqs-1 (a fresh, dense numbering every step, decodes first); slot i
feeds `query_start[i+1] - query_start[i]` tokens, packed into `token_ids` rows
query_start[i]..query_start[i+1]-1, at positions kv_lens[i] - q_len .. kv_lens[i] - 1 of its
sequence; its K/V live in pages `page_table[i, :ceil(kv_lens[i] / page_size)]`, in order, and the
new tokens' K/V are written at `slot_mapping` (page * page_size + offset) before attention reads.

Grouped layout (`stack_plans`, batch-sharded attention, pope2022.md §6.2b): the S slots form G
groups of S/G, the packed rows G blocks of T/G, the page pool G segments; group g's sequences sit
at slots g*S/G.., its tokens in row block g (each block laid out as above, offsets local to it),
its pages in segment g (ids local to the segment). One group (G = 1) is the layout above.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Hashable, Sequence

import numpy as np

from jaxinfer.engine.pages import build_page_table


class RequestState(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    """Queued: not admitted yet, or preempted (it holds no pages and will be recomputed)."""
    RUNNING = "running"
    """Admitted: holds pages and is scheduled every step while budget and pages allow."""
    FINISHED = "finished"
    """Done (see `finish_reason`); its pages were released."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and the scheduler's bookkeeping for it (compared by identity)."""

    request_id: Hashable
    """The caller's name for the request, unique within a scheduler."""
    prompt: tuple[int, ...]
    """Prompt token ids (at least one)."""
    max_new_tokens: int
    """Tokens to generate at most; reaching it finishes the request with reason 'length'."""
    arrival: int
    """Arrival index: 0 for the first request added to the scheduler, then 1, 2, ..."""
    extra_key: bytes = b""
    """Salt mixed into every prefix-cache block hash (adapter name, tenant, ...); b'' for none."""
    state: RequestState = RequestState.WAITING
    """Life-cycle state."""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    """Prompt followed by the tokens generated so far (filled from `prompt` at creation)."""
    num_computed: int = 0
    """Leading tokens of `token_ids` whose K/V are in this request's pages."""
    pages: list[int] = dataclasses.field(default_factory=list)
    """KV pages in sequence order: page j holds positions j*page_size .. (j+1)*page_size-1."""
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    """Prefix-cache chain hashes of the full blocks of `token_ids` computed so far."""
    prefill_target: int = 0
    """len(token_ids) when last admitted: positions below it are prefill (or recompute)."""
    num_preemptions: int = 0
    """Times this request was preempted (pages freed, to be recomputed)."""
    finish_reason: str | None = None
    """'stop' (the caller flagged a stop), 'length' (max_new_tokens reached) or the reason
    given to `Scheduler.abort` once finished."""

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt)

    @property
    def output(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[len(self.prompt):]

    @property
    def num_remaining(self) -> int:
        """Tokens still to feed before the next sampled token (1 while decoding)."""
        return len(self.token_ids) - self.num_computed


@dataclasses.dataclass
class SchedulerStats:
    """Counters of a scheduler since it was made (`Scheduler.stats` returns a copy)."""

    prompt_tokens: int = 0
    """Prompt tokens of all requests added."""
    prefill_tokens: int = 0
    """Prefill tokens computed: prompt (and, after a preemption, recomputed) tokens fed to the
    model, i.e. excluding prefix-cache hits and decode tokens."""
    decode_tokens: int = 0
    """Decode tokens fed (one per running sequence per step once its prefill is done)."""
    generated_tokens: int = 0
    """Tokens sampled and appended to requests."""
    prefix_hit_tokens: int = 0
    """Tokens whose K/V came from the prefix cache instead of being computed."""
    preemptions: int = 0
    """Sequences preempted (pages freed, recomputed later) for lack of pages."""
    steps: int = 0
    """Steps planned and updated."""
    finished_requests: int = 0
    """Requests finished ('stop', 'length' or aborted with a caller's reason)."""


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one engine step computes. Arrays are read-only numpy; S = max_seqs, T = token bucket."""

    step: int
    """Step index (0, 1, ...); `Scheduler.update` must get the plan of the latest step."""
    request_ids: tuple[Hashable, ...]
    """Request id of each sequence, slot 0..num_seqs-1 (grouped: device slot `slots[i]`); the
    per-sequence tuples below follow this order."""
    chunk_token_ids: tuple[tuple[int, ...], ...]
    """Token ids each slot feeds this step (one decode token, or a prefill chunk)."""
    start_positions: tuple[int, ...]
    """Position of each slot's first fed token in its sequence (= tokens already cached)."""
    samples: tuple[bool, ...]
    """Whether each slot's last fed token yields a sampled token (decode, or last prompt chunk)."""
    num_seqs: int
    """Slots in use; entries of the per-slot arrays past it are padding (grouped: those past
    each group's `group_seqs`)."""
    num_decode_seqs: int
    """Slots 0..num_decode_seqs-1 are decodes (sequences past their prefill, each fed the one
    token it sampled last); the prefill chunks follow (grouped: within each group)."""
    num_tokens: int
    """Real token rows; rows num_tokens..T-1 of the packed arrays are padding."""
    token_ids: np.ndarray
    """int32 [T]: the fed tokens of all slots, packed in slot order, zero-padded."""
    positions: np.ndarray
    """int32 [T]: position of each packed token in its sequence, zero-padded."""
    slot_mapping: np.ndarray
    """int32 [T]: flat cache index page * page_size + offset where each token's K/V is written;
    padding rows hold num_pages * page_size, one past the end (scatter with mode='drop')."""
    page_table: np.ndarray
    """int32 [S, W]: each slot's page ids in order, zero-padded. W = `page_bucket` of the most
    pages any slot holds (reserved lookahead pages included), so attention reads only as many
    page slots as this step's longest sequence needs (rounded up to a power of two)."""
    kv_lens: np.ndarray
    """int32 [S]: tokens in each slot's cache including this step's (start + chunk length);
    0 for padding slots."""
    query_start: np.ndarray
    """int32 [S+1]: cumulative offsets of each slot's rows in the packed arrays; num_tokens pads.
    Grouped: [G * (S/G + 1)], group g's offsets within its row block."""
    sample_rows: np.ndarray
    """int32 [S]: packed row of each slot's last fed token (its logits row); 0 for padding."""
    sample_mask: np.ndarray
    """bool [S]: `samples` as an array, False for padding slots."""
    step_limits: np.ndarray
    """int32 [S]: tokens each slot may sample in this device call. 1 for a sampling slot of an
    ordinary step; in a decode-only step planned with lookahead, up to the lookahead (pages
    reserved for the extra tokens, capped by max_new_tokens); 0 for non-sampling and padding
    slots. The device runs at most min(step_limits[slots]) steps of a decode-only plan."""
    group_seqs: np.ndarray
    """int32 [G]: sequences of each slot group (G = 1: [num_seqs]); see the grouped layout."""
    slots: tuple[int, ...]
    """Device slot of each of the num_seqs sequences (the index of the per-slot arrays):
    0..num_seqs-1 in one group, g*S/G + i for the i-th sequence of group g."""

    @property
    def num_groups(self) -> int:
        """G: the slot groups (attention batch shards) of the layout."""
        return len(self.group_seqs)


def token_bucket(num_tokens: int, minimum: int) -> int:
    """The padded token count: the smallest power of two >= max(num_tokens, minimum)."""
    n = max(num_tokens, minimum, 1)
    return 1 << (n - 1).bit_length()


MIN_PAGE_BUCKET = 4
"""Narrowest page table of a step (in pages): widths are powers of two >= this."""


def page_bucket(num_pages: int, pages_per_seq: int) -> int:
    """The page-table width of a step whose longest slot holds `num_pages` pages: the smallest
    power of two >= max(num_pages, MIN_PAGE_BUCKET), capped at pages_per_seq (the width of a
    max_model_len sequence). Attention cost grows with this width, compilation count with the
    number of distinct widths (log2 of pages_per_seq at most)."""
    return min(pages_per_seq, token_bucket(num_pages, MIN_PAGE_BUCKET))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _packed_arrays(chunks, starts, lens, query_start, page_table, rows: int, page_size: int,
                   num_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """token_ids, positions and slot_mapping over `rows` packed rows (padding after the tokens)."""
    num_seqs, num_tokens = len(chunks), int(lens.sum())
    token_ids = np.zeros(rows, np.int32)
    token_ids[:num_tokens] = list(itertools.chain.from_iterable(chunks))
    slot_of_row = np.repeat(np.arange(num_seqs), lens)
    offsets = np.asarray(starts, np.int64) - query_start[:num_seqs]
    pos = np.arange(num_tokens) + np.repeat(offsets, lens)
    positions = np.zeros(rows, np.int32)
    positions[:num_tokens] = pos
    slot_mapping = np.full(rows, num_pages * page_size, np.int32)
    slot_mapping[:num_tokens] = (page_table[slot_of_row, pos // page_size] * page_size
                                 + pos % page_size)
    return token_ids, positions, slot_mapping


def build_step_plan(step: int, entries: Sequence[tuple[Request, int]], *, num_decode_seqs: int,
                    max_seqs: int, pages_per_seq: int, page_size: int, num_pages: int,
                    min_token_bucket: int, step_limits: Sequence[int] | None = None) -> StepPlan:
    """The plan for `entries` (request, tokens to feed) in slot order, from each request's
    `num_computed` and `pages` (already grown to cover the chunk); step_limits: per entry, the
    tokens a sampling slot may sample (default 1)."""
    starts = [req.num_computed for req, _ in entries]
    chunks = [tuple(req.token_ids[s:s + n]) for (req, n), s in zip(entries, starts)]
    lens = np.array([n for _, n in entries], np.int64)
    num_seqs, num_tokens = len(entries), int(lens.sum())
    query_start = np.full(max_seqs + 1, num_tokens, np.int32)
    query_start[:num_seqs + 1] = np.concatenate([[0], np.cumsum(lens)])
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[:num_seqs] = np.asarray(starts, np.int64) + lens
    seq_pages = [req.pages for req, _ in entries]
    width = page_bucket(max((len(p) for p in seq_pages), default=0), pages_per_seq)
    page_table = build_page_table(seq_pages, max_seqs, width)
    token_ids, positions, slot_mapping = _packed_arrays(
        chunks, starts, lens, query_start, page_table, token_bucket(num_tokens, min_token_bucket),
        page_size, num_pages)
    samples = tuple(s + len(c) == len(req.token_ids)
                    for (req, _), s, c in zip(entries, starts, chunks))
    sample_rows = np.zeros(max_seqs, np.int32)
    sample_rows[:num_seqs] = query_start[1:num_seqs + 1] - 1
    sample_mask = np.zeros(max_seqs, bool)
    sample_mask[:num_seqs] = samples
    limits = np.zeros(max_seqs, np.int32)
    limits[:num_seqs] = np.asarray(samples, np.int32) * (
        1 if step_limits is None else np.asarray(step_limits, np.int32))
    return StepPlan(
        step=step, request_ids=tuple(req.request_id for req, _ in entries),
        chunk_token_ids=tuple(chunks), start_positions=tuple(starts), samples=samples,
        num_seqs=num_seqs, num_decode_seqs=num_decode_seqs, num_tokens=num_tokens,
        token_ids=_frozen(token_ids), positions=_frozen(positions),
        slot_mapping=_frozen(slot_mapping), page_table=_frozen(page_table),
        kv_lens=_frozen(kv_lens), query_start=_frozen(query_start),
        sample_rows=_frozen(sample_rows), sample_mask=_frozen(sample_mask),
        step_limits=_frozen(limits), group_seqs=_frozen(np.array([num_seqs], np.int32)),
        slots=tuple(range(num_seqs)))


def _padded(plan: StepPlan, rows: int, width: int, pad_slot: int) -> dict[str, np.ndarray]:
    """The packed arrays of a one-group plan padded to `rows` rows and a `width`-page table."""
    extra = rows - len(plan.token_ids)
    table = np.zeros((len(plan.kv_lens), width), np.int32)
    table[:, :plan.page_table.shape[1]] = plan.page_table
    return {"token_ids": np.pad(plan.token_ids, (0, extra)),
            "positions": np.pad(plan.positions, (0, extra)),
            "slot_mapping": np.pad(plan.slot_mapping, (0, extra), constant_values=pad_slot),
            "page_table": table}


def stack_plans(step: int, plans: Sequence[StepPlan], pad_slot: int) -> StepPlan:
    """One plan in the grouped layout (module docstring) from one-group plans of equal slot
    counts, plan g for group g (page ids local to its segment; `pad_slot` = pages per segment *
    page_size, every plan's padding slot). Blocks are padded to the widest token bucket and
    page table; a plan with prefill chunks in some group runs one step (step_limits <= 1)."""
    if len(plans) == 1:
        return dataclasses.replace(plans[0], step=step)
    rows = max(len(p.token_ids) for p in plans)
    width = max(p.page_table.shape[1] for p in plans)
    padded = [_padded(p, rows, width, pad_slot) for p in plans]
    cat = lambda arrays: _frozen(np.concatenate(arrays))
    joined = lambda name: sum((getattr(p, name) for p in plans), ())
    per_group = len(plans[0].kv_lens)
    num_seqs = sum(p.num_seqs for p in plans)
    num_decode_seqs = sum(p.num_decode_seqs for p in plans)
    limits = np.concatenate([p.step_limits for p in plans])
    if num_decode_seqs < num_seqs:
        limits = np.minimum(limits, 1)
    return StepPlan(
        step=step, request_ids=joined("request_ids"), chunk_token_ids=joined("chunk_token_ids"),
        start_positions=joined("start_positions"), samples=joined("samples"), num_seqs=num_seqs,
        num_decode_seqs=num_decode_seqs, num_tokens=sum(p.num_tokens for p in plans),
        **{name: cat([d[name] for d in padded]) for name in padded[0]},
        **{name: cat([getattr(p, name) for p in plans])
           for name in ("kv_lens", "query_start", "sample_rows", "sample_mask")},
        step_limits=_frozen(limits),
        group_seqs=_frozen(np.array([p.num_seqs for p in plans], np.int32)),
        slots=tuple(g * per_group + i for g, p in enumerate(plans) for i in range(p.num_seqs)))
