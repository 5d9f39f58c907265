"""Host side of the continuous-batching engine, without a model: pages, prefix cache, scheduler.

The "model" here is a fake: the next token is a hash of the sequence's whole context, and the
context is READ BACK from a numpy page pool into which every step's plan writes its tokens (token id
as the K value at (page_table[slot, pos // page_size], pos % page_size)). So a wrong page table, a
stale page after preemption or a wrongly shared prefix page changes the generated tokens, and every
request is compared with the same fake model run on its prompt alone.
"""

import types

import numpy as np
import pytest

from jaxinfer.engine import (PagePool, PagePoolError, PrefixCache, RequestState, Scheduler,
                             StepPlan)
from jaxinfer.engine.groups import GroupedScheduler
from jaxinfer.engine.pages import build_page_table, page_table_row
from jaxinfer.engine.plan import MIN_PAGE_BUCKET
from jaxinfer.engine.prefix_cache import ROOT_HASH, block_hash, extend_block_hashes

VOCAB = 50


def fake_next_token(context) -> int:
    """A deterministic 'model': a hash of every token of the context and its position."""
    acc = 0
    for i, t in enumerate(context):
        acc = (acc * 1000003 + (i + 1) * (int(t) + 7)) % (2**61 - 1)
    return acc % VOCAB


def reference_output(prompt, max_new_tokens, stop_token):
    """The fake model run on `prompt` alone."""
    ctx, out = list(prompt), []
    while len(out) < max_new_tokens:
        t = fake_next_token(ctx)
        out.append(t)
        ctx.append(t)
        if t == stop_token:
            break
    return out


class DenseOracle:
    """A numpy KV page pool written and read exactly as the plan's arrays say."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kv = np.full((sched.num_pages, sched.page_size), -1, np.int64)

    def step(self, plan: StepPlan) -> list[np.ndarray]:
        """Write this step's tokens, return each slot's context as attention would read it."""
        ps = self.sched.page_size
        targets = set()
        for i in range(plan.num_seqs):
            for row in range(plan.query_start[i], plan.query_start[i + 1]):
                pos = int(plan.positions[row])
                page = int(plan.page_table[i, pos // ps])
                assert (page, pos % ps) not in targets, "two tokens write one cache cell"
                targets.add((page, pos % ps))
                assert plan.slot_mapping[row] == page * ps + pos % ps
                self.kv[page, pos % ps] = plan.token_ids[row]
        contexts = []
        for i in range(plan.num_seqs):
            kv_len = int(plan.kv_lens[i])
            pages = plan.page_table[i, :-(-kv_len // ps)]
            contexts.append(self.kv[pages].reshape(-1)[:kv_len])
        return contexts


def check_plan(plan: StepPlan, sched: Scheduler) -> None:
    """Every invariant of a plan's arrays against its per-slot tuples and the scheduler."""
    n, ps = plan.num_seqs, sched.page_size
    lens = np.array([len(c) for c in plan.chunk_token_ids], np.int64)
    assert 1 <= n <= sched.max_seqs
    assert plan.num_tokens == lens.sum() <= sched.token_budget
    assert lens.max() <= sched.max_prefill_chunk
    assert all(lens[:plan.num_decode_seqs] == 1)
    T = len(plan.token_ids)
    assert T >= max(plan.num_tokens, sched.min_token_bucket) and T & (T - 1) == 0
    assert T < 2 * max(plan.num_tokens, sched.min_token_bucket)
    assert plan.query_start[0] == 0
    np.testing.assert_array_equal(np.diff(plan.query_start)[:n], lens)
    assert all(plan.query_start[n:] == plan.num_tokens)
    starts = np.array(plan.start_positions)
    np.testing.assert_array_equal(plan.kv_lens[:n], starts + lens)
    assert all(plan.kv_lens[n:] == 0) and all(plan.page_table[n:].ravel() == 0)
    for i, chunk in enumerate(plan.chunk_token_ids):
        lo, hi = plan.query_start[i], plan.query_start[i + 1]
        np.testing.assert_array_equal(plan.token_ids[lo:hi], chunk)
        np.testing.assert_array_equal(plan.positions[lo:hi],
                                      np.arange(starts[i], starts[i] + lens[i]))
        assert plan.sample_rows[i] == hi - 1
        used = -(-int(plan.kv_lens[i]) // ps)
        row = plan.page_table[i]
        assert len(set(row[:used].tolist())) == used and all(row[used:] == 0)
    assert all(plan.token_ids[plan.num_tokens:] == 0) and all(plan.positions[plan.num_tokens:] == 0)
    assert all(plan.slot_mapping[plan.num_tokens:] == sched.num_pages * ps)
    np.testing.assert_array_equal(plan.sample_mask[:n], plan.samples)
    assert not plan.sample_mask[n:].any()
    by_id = {r.request_id: r for r in sched.running()}
    # the table is only as wide as the longest slot needs: a power of two (>= MIN_PAGE_BUCKET)
    # below twice its page count, or the max_model_len width
    width, most = plan.page_table.shape[1], max(len(by_id[r].pages) for r in plan.request_ids)
    assert most <= width <= sched.pages_per_seq
    assert width == sched.pages_per_seq or (
        width & (width - 1) == 0 and width < max(2 * most, MIN_PAGE_BUCKET + 1))
    for i, rid in enumerate(plan.request_ids):
        req = by_id[rid]
        assert len(req.pages) == -(-int(plan.kv_lens[i]) // ps)  # rows cover kv_lens exactly
        assert plan.samples[i] == (plan.kv_lens[i] == len(req.token_ids))


def run_engine(sched, prompts, max_new, stop_token=None, arrivals=None, plans=None,
               max_steps=20_000):
    """Drive `sched` with the fake model until every request finishes; returns outputs by id.

    arrivals[i] is the step before which request i is added (all at step 0 by default). More
    than `max_steps` steps fails the test (a livelocked scheduler must not hang it)."""
    arrivals = arrivals if arrivals is not None else [0] * len(prompts)
    oracle, tokens, finished = DenseOracle(sched), {}, {}
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    step = 0
    while pending or sched.has_unfinished:
        assert step < max_steps, f"not finished after {max_steps} steps: {sched.stats}"
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            sched.add_request(i, prompts[i], max_new[i])
            tokens[i] = list(prompts[i])
        if not sched.has_unfinished:
            step += 1
            continue
        plan = sched.schedule()
        if isinstance(sched, GroupedScheduler):
            check_grouped_plan(plan, sched)
        else:
            check_plan(plan, sched)
        if plans is not None:
            plans.append(plan)
        contexts = [c for view in group_views(plan, sched) for c in oracle.step(view)]
        sampled = np.zeros(plan.num_seqs, np.int64)
        for i, (rid, ctx) in enumerate(zip(plan.request_ids, contexts)):
            np.testing.assert_array_equal(ctx, tokens[rid][:len(ctx)])
            if plan.samples[i]:
                sampled[i] = fake_next_token(ctx)
                tokens[rid].append(int(sampled[i]))
        stops = (sampled == stop_token) & np.array(plan.samples, bool)
        for req in sched.update(plan, sampled, stops):
            finished[req.request_id] = req
        step += 1
    for i, p in enumerate(prompts):
        req = finished[i]
        assert req.state is RequestState.FINISHED
        assert req.output == reference_output(p, max_new[i], stop_token)
        assert req.finish_reason == ("stop" if req.output[-1] == stop_token else "length")
        assert len(req.output) == max_new[i] or req.output[-1] == stop_token
    return {i: finished[i].output for i in range(len(prompts))}


def group_views(plan, sched):
    """Each group's block of a plan as a one-group plan over the whole pool (page ids made
    global: segment g starts at page g * P/G); [plan] without groups."""
    if not isinstance(sched, GroupedScheduler):
        return [plan]
    g_n, ps = plan.num_groups, sched.page_size
    sg, rows, seg = sched.max_seqs // g_n, len(plan.token_ids) // g_n, sched.num_pages // g_n
    views = []
    for g in range(g_n):
        blk, sl = slice(g * rows, (g + 1) * rows), slice(g * sg, (g + 1) * sg)
        views.append(types.SimpleNamespace(
            num_seqs=int(plan.group_seqs[g]), token_ids=plan.token_ids[blk],
            positions=plan.positions[blk], slot_mapping=plan.slot_mapping[blk] + g * seg * ps,
            page_table=plan.page_table[sl] + g * seg, kv_lens=plan.kv_lens[sl],
            query_start=plan.query_start[g * (sg + 1):(g + 1) * (sg + 1)]))
    return views


def check_grouped_plan(plan, sched):
    """A grouped plan's blocks: each group's sequences, tokens and pages in its own block and
    pool segment, within its share of slots and budget."""
    g_n, ps = plan.num_groups, sched.page_size
    sg, seg = sched.max_seqs // g_n, sched.num_pages // g_n
    rows = len(plan.token_ids) // g_n
    assert g_n == sched.num_groups and len(plan.token_ids) == g_n * rows
    by_id = {r.request_id: r for r in sched.running()}
    bounds = np.cumsum([0, *plan.group_seqs])
    for g, sub in enumerate(sched.groups):
        n = int(plan.group_seqs[g])
        qs = plan.query_start[g * (sg + 1):(g + 1) * (sg + 1)]
        assert n <= sg and qs[n] <= sched.token_budget // g_n
        real = plan.slot_mapping[g * rows:g * rows + int(qs[n])]
        assert (real < seg * ps).all()
        assert (plan.slot_mapping[g * rows + int(qs[n]):(g + 1) * rows] == seg * ps).all()
        for i, rid in enumerate(plan.request_ids[bounds[g]:bounds[g + 1]]):
            req = by_id[rid]
            assert sched.group_of(req) == g and plan.slots[bounds[g] + i] == g * sg + i
            assert all(0 <= p < seg and sub.pool.refcount(p) > 0 for p in req.pages)
            used = -(-int(plan.kv_lens[g * sg + i]) // ps)
            np.testing.assert_array_equal(plan.page_table[g * sg + i, :used], req.pages[:used])
    assert sum(len(c) for c in plan.chunk_token_ids) == plan.num_tokens


def assert_no_leak(sched):
    if isinstance(sched, GroupedScheduler):
        for sub in sched.groups:
            assert_no_leak(sub)
        return
    pool = sched.pool
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert pool.num_free + len(sched.prefix_cache.idle_pages()) == pool.num_pages
    sched.prefix_cache.clear()
    assert pool.num_free == pool.num_pages
    assert sched.prefix_cache_stats().cached_pages == 0


# ----------------------------------------------------------------------------- pages


def test_page_pool_accounting_and_errors():
    pool = PagePool(4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1 and pool.refcount(1) == 1
    with pytest.raises(PagePoolError, match="cannot allocate 2 pages: only 1 of 4 are free"):
        pool.allocate(2)
    pool.incref(1)
    pool.free([1])
    assert pool.refcount(1) == 1 and pool.state(1) == "held" and pool.num_free == 1
    pool.free(a)
    assert pool.num_free == 4 and pool.state(2) == "free"
    with pytest.raises(PagePoolError, match="double free of page 2"):
        pool.free([2])
    with pytest.raises(PagePoolError, match="incref of page 3, which is free"):
        pool.incref(3)
    with pytest.raises(PagePoolError, match=r"page id must be an int in \[0, 4\), got 7"):
        pool.decref(7)
    with pytest.raises(PagePoolError, match="num_pages must be an int >= 1, got 0"):
        PagePool(0)
    # Freed pages are reused oldest-freed first: 3 was never used, then 0, 1, 2 in free order.
    assert pool.allocate(4) == [3, 0, 1, 2]


def test_page_table_rows():
    np.testing.assert_array_equal(page_table_row([5, 2, 9], 5), [5, 2, 9, 0, 0])
    assert page_table_row([5], 2).dtype == np.int32
    with pytest.raises(PagePoolError,
                       match="3 pages does not fit a page-table row of pages_per_seq=2"):
        page_table_row([1, 2, 3], 2)
    table = build_page_table([[4], [1, 3]], 3, 2)
    np.testing.assert_array_equal(table, [[4, 0], [1, 3], [0, 0]])
    with pytest.raises(PagePoolError, match="2 sequences do not fit a page table of num_slots=1"):
        build_page_table([[4], [1]], 1, 2)


# ----------------------------------------------------------------------------- prefix cache


def test_block_hash_chain_is_stable_and_salted():
    h0 = block_hash(ROOT_HASH, [1, 2, 3, 4])
    # SHA-256 of fixed bytes: the same in every process (no PYTHONHASHSEED dependence).
    assert h0 == block_hash(ROOT_HASH, np.array([1, 2, 3, 4], np.int32)) and len(h0) == 32
    assert h0 != block_hash(ROOT_HASH, [1, 2, 3, 5])
    assert h0 != block_hash(ROOT_HASH, [1, 2, 3, 4], b"adapter-a")
    hashes = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert hashes == [h0, block_hash(h0, [5, 6, 7, 8])]  # the partial block 9 is not hashed
    other = []
    extend_block_hashes(other, [9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert other[1] != hashes[1]  # same block tokens, different parent


def test_prefix_cache_lru_eviction_order():
    pool = PagePool(6)
    cache = PrefixCache(pool, page_size=2)
    a, b = cache.allocate(2), cache.allocate(2)
    ha, hb = [], []
    extend_block_hashes(ha, [1, 1, 2, 2], 2)
    extend_block_hashes(hb, [3, 3, 4, 4], 2)
    for h, p in zip(ha + hb, a + b):
        assert cache.insert(h, p)
    assert not cache.insert(ha[0], b[0])  # a second page for a cached block stays private
    cache.release(a)  # released tail first: the chain tail is the older idle page
    cache.release(b)
    assert cache.idle_pages() == [a[1], a[0], b[1], b[0]]
    assert cache.num_available == 6
    got = cache.allocate(3)  # 2 free pages, then the LRU idle page a[1]
    assert a[1] in got and cache.stats().evictions == 1
    assert cache.match(ha) == [a[0]] and cache.match(hb) == b
    cache.claim(cache.match(hb[:1]))  # a hit holds b[0]: no longer evictable
    assert pool.refcount(b[0]) == 1 and cache.idle_pages() == [a[0], b[1]]
    assert cache.allocate(2) == [a[0], b[1]]
    assert cache.match(ha) == [] and cache.match(hb) == [b[0]]
    with pytest.raises(PagePoolError, match="cannot allocate 1 pages: 0 free and 0 evictable of 6"):
        cache.allocate(1)
    cache.release([b[0]])
    st = cache.stats()
    assert (st.evictions, st.queries, st.hit_pages, st.inserted_pages, st.cached_pages,
            st.idle_pages) == (3, 1, 1, 4, 1, 1)


# ----------------------------------------------------------------------------- scheduler


def make_sched(**kw):
    args = dict(max_seqs=4, page_size=4, num_pages=64, token_budget=16, max_prefill_chunk=8,
                max_model_len=128)
    args.update(kw)
    return Scheduler(**args)


def test_step_policy_decodes_first_then_oldest_prefill_then_fcfs():
    sched = make_sched(max_seqs=3, token_budget=8, max_prefill_chunk=4)
    sched.add_request("A", list(range(1, 7)), 3)     # 6 prompt tokens
    sched.add_request("B", list(range(11, 21)), 3)   # 10 prompt tokens
    sched.add_request("C", [31, 32, 33], 3)
    sched.add_request("D", [41], 3)
    plans = []

    def step():
        plan = sched.schedule()
        check_plan(plan, sched)
        plans.append(plan)
        sched.update(plan, [7] * plan.num_seqs)
        return plan.request_ids, [len(c) for c in plan.chunk_token_ids], plan.samples

    # Step 0: A and B admitted, a 4-token chunk each (chunk cap), budget 8 spent; C waits.
    assert step() == (("A", "B"), [4, 4], (False, False))
    # Step 1: the older prefill A finishes its prompt (2) and samples, B gets 4, C gets 2.
    assert step() == (("A", "B", "C"), [2, 4, 2], (True, False, False))
    # Step 2: A decodes first; then prefills oldest first: B its last 2, C its last 1; D: no slot.
    assert step() == (("A", "B", "C"), [1, 2, 1], (True, True, True))
    assert plans[2].num_decode_seqs == 1
    # Step 3: all three decode (admission order); A reaches max_new_tokens=3 and finishes.
    assert step() == (("A", "B", "C"), [1, 1, 1], (True, True, True))
    assert [r.request_id for r in sched.running()] == ["B", "C"]
    # Step 4: A's slot went to D (admitted after the decodes).
    assert step() == (("B", "C", "D"), [1, 1, 1], (True, True, True))
    assert plans[4].num_decode_seqs == 2
    np.testing.assert_array_equal(plans[4].query_start, [0, 1, 2, 3])


def test_many_random_requests_no_page_leak():
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, VOCAB, 12).tolist() for _ in range(4)]
    prompts, max_new = [], []
    for _ in range(1000):
        p = rng.integers(0, VOCAB, int(rng.integers(1, 24))).tolist()
        if rng.random() < 0.5:  # half share one of 4 prefixes: exercises the prefix cache
            p = prefixes[int(rng.integers(4))] + p
        prompts.append(p)
        max_new.append(int(rng.integers(1, 16)))
    arrivals = np.sort(rng.integers(0, 600, 1000)).tolist()
    # 16 sequences of at most 12 + 23 + 15 - 1 = 49 tokens (13 pages) fit 224 pages: no
    # preemption, so the token accounting below is exact; idle cached pages still get evicted.
    sched = make_sched(max_seqs=16, num_pages=224, token_budget=48, max_prefill_chunk=16)
    plans = []
    outputs = run_engine(sched, prompts, max_new, stop_token=3, arrivals=arrivals, plans=plans)
    st, cst = sched.stats, sched.prefix_cache_stats()
    assert st.finished_requests == 1000 and st.preemptions == 0
    assert st.generated_tokens == sum(len(o) for o in outputs.values())
    assert st.prompt_tokens == sum(len(p) for p in prompts)
    assert st.prefill_tokens + st.prefix_hit_tokens == st.prompt_tokens
    assert st.prefix_hit_tokens == cst.hit_tokens > 0 and cst.queries == 1000
    assert cst.evictions > 0
    # Every sampled token but the last of each request is fed back once as a decode token.
    assert st.decode_tokens == st.generated_tokens - 1000
    assert st.steps == len(plans)
    assert max(p.num_seqs for p in plans) == 16 and max(p.num_tokens for p in plans) == 48
    assert_no_leak(sched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_small_pool_recomputes_and_finishes(prefix_caching):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, int(rng.integers(6, 21))).tolist() for _ in range(12)]
    max_new = [int(rng.integers(8, 17)) for _ in range(12)]
    # 10 pages of 4 tokens: any one request (<= 36 cached tokens) fits, four at once do not.
    sched = make_sched(num_pages=10, prefix_caching=prefix_caching)
    run_engine(sched, prompts, max_new)  # no stop token: exactly max_new_tokens each
    st = sched.stats
    assert st.preemptions > 0
    assert st.generated_tokens == sum(max_new) and st.finished_requests == 12
    # Recompute re-prefills prompt + generated-so-far: more prefill than the prompts alone.
    assert st.prefill_tokens + st.prefix_hit_tokens > st.prompt_tokens
    # Tokens fed (or reused) exceed each request's prompt + max_new - 1 once: the recompute tax.
    fed = st.decode_tokens + st.prefill_tokens + st.prefix_hit_tokens
    assert fed > sum(len(p) + m - 1 for p, m in zip(prompts, max_new))
    assert_no_leak(sched)


def test_prefix_sharing_64_prompts_with_512_token_prefix():
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, VOCAB, 512).tolist()
    prompts = [prefix + rng.integers(0, VOCAB, 8).tolist() for _ in range(64)]
    sched = make_sched(max_seqs=8, page_size=16, num_pages=128, token_budget=256,
                       max_prefill_chunk=256, max_model_len=1024)
    plans = []
    run_engine(sched, prompts, [4] * 64, plans=plans)
    st, cst = sched.stats, sched.prefix_cache_stats()
    # Steps 0 and 1 spend the whole 256-token budget on prompt 0's first 512 tokens, so nobody
    # else is admitted before those 32 pages are computed and cached. From step 2 on, every
    # admitted prompt hits all 32 prefix pages (a hit is capped at whole pages below the prompt's
    # last token: (520 - 1) // 16 = 32 pages) and computes only its 8 suffix tokens:
    # 512 + 64 * 8 prefill tokens, exactly.
    assert st.prefill_tokens == 512 + 64 * 8
    assert st.prefix_hit_tokens == cst.hit_tokens == 63 * 512
    assert (cst.queries, cst.hit_pages, cst.evictions, st.preemptions) == (64, 63 * 32, 0, 0)
    assert [p.request_ids for p in plans[:2]] == [(0,), (0,)]
    # The shared pages really are shared: every later slot's first 32 entries are prompt 0's.
    shared = plans[0].page_table[0, :16].tolist() + plans[1].page_table[0, 16:32].tolist()
    for plan in plans[2:]:
        for i in range(plan.num_seqs):
            assert plan.page_table[i, :32].tolist() == shared
    assert_no_leak(sched)

    off = make_sched(max_seqs=8, page_size=16, num_pages=128, token_budget=256,
                     max_prefill_chunk=256, max_model_len=1024, prefix_caching=False)
    run_engine(off, prompts, [4] * 64)
    assert off.stats.prefill_tokens == 64 * 520 and off.stats.prefix_hit_tokens == 0


def test_extra_key_separates_cache_entries():
    sched = make_sched()
    prompt = list(range(1, 10))
    for rid, key in [("a", "tenant-1"), ("b", "tenant-2"), ("c", "tenant-1"), ("d", None)]:
        sched.add_request(rid, prompt, 1, extra_key=key)
        while sched.has_unfinished:
            plan = sched.schedule()
            sched.update(plan, [5] * plan.num_seqs)
    # Only "c" (same prompt, same key as "a") hits: 2 full pages below the last token.
    assert sched.stats.prefix_hit_tokens == 8
    assert sched.prefix_cache_stats().queries == 4


def test_prefix_hit_always_leaves_a_token_to_compute():
    sched = make_sched()
    for rid, prompt in [("a", list(range(8))), ("b", list(range(8))), ("c", list(range(9)))]:
        sched.add_request(rid, prompt, 1)
        plan = sched.schedule()
        check_plan(plan, sched)
        sched.update(plan, [5])
        if rid == "b":  # 8 tokens = 2 full cached pages, but the last token must run for logits
            assert plan.start_positions == (4,) and plan.chunk_token_ids == ((4, 5, 6, 7),)
        if rid == "c":  # 9 tokens: both pages hit, one token computed
            assert plan.start_positions == (8,) and plan.chunk_token_ids == ((8,),)
    assert sched.stats.prefix_hit_tokens == 4 + 8 and sched.stats.prefill_tokens == 8 + 4 + 1


def test_impossible_requests_are_rejected_at_add():
    sched = make_sched(num_pages=4, max_model_len=64)  # 4 pages of 4 tokens = 16 cached tokens
    with pytest.raises(ValueError, match=(
            r"request 'big': prompt of 10 tokens \+ max_new_tokens=8 needs 5 pages of 4 tokens "
            r"\(17 cached tokens\) but the pool has num_pages=4")):
        sched.add_request("big", [1] * 10, 8)
    sched.add_request("fits", [1] * 10, 7)  # 16 cached tokens: exactly the pool
    with pytest.raises(ValueError, match=(
            r"request 'long': prompt of 60 tokens \+ max_new_tokens=5 = 65 tokens exceeds "
            r"max_model_len=64")):
        sched.add_request("long", [1] * 60, 5)
    with pytest.raises(ValueError, match="request_id 'fits' is already waiting or running"):
        sched.add_request("fits", [1], 1)
    with pytest.raises(ValueError, match=r"prompt must be a non-empty 1-D sequence.*shape \(0,\)"):
        sched.add_request("empty", [], 1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2147483647\], got min -1"):
        sched.add_request("neg", [3, -1], 1)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        sched.add_request("zero", [3], 0)
    with pytest.raises(ValueError, match="extra_key must be str, bytes or None, got 5"):
        sched.add_request("key", [3], 1, extra_key=5)
    assert sched.num_waiting == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="token_budget=4 must be >= max_seqs=8"):
        make_sched(max_seqs=8, token_budget=4, max_prefill_chunk=4)
    with pytest.raises(ValueError, match="max_prefill_chunk=32 must be <= token_budget=16"):
        make_sched(max_prefill_chunk=32)
    with pytest.raises(ValueError, match="page_size must be an int >= 1, got 0"):
        make_sched(page_size=0)
    with pytest.raises(ValueError, match="prefix_caching must be a bool, got 1"):
        make_sched(prefix_caching=1)


def test_update_errors():
    sched = make_sched()
    sched.add_request("a", [1, 2, 3], 2)
    sched.add_request("b", list(range(20)), 2)   # 20 tokens: chunks of 8, no sample in step 0
    plan = sched.schedule()
    assert plan.samples == (True, False)
    with pytest.raises(RuntimeError, match="step 0 was planned but not updated"):
        sched.schedule()
    with pytest.raises(ValueError, match=r"finished_flags is True at slot 1 \(request 'b'\)"):
        sched.update(plan, [4, 0], [False, True])
    with pytest.raises(ValueError,
                       match="sampled_tokens must be 1-D of length num_seqs=2 or max_seqs=4"):
        sched.update(plan, [4, 0, 0])
    with pytest.raises(ValueError, match=r"sampled_tokens must be in \[0, 2147483647\].*min -4"):
        sched.update(plan, [-4, 0])
    assert sched.update(plan, [4, 0], [True, False])[0].finish_reason == "stop"
    with pytest.raises(ValueError,
                       match="got the plan of step 0, but the step awaiting its update is None"):
        sched.update(plan, [4, 0])
    assert plan.token_ids.flags.writeable is False


# ----------------------------------------------------------------------------- slot groups


def make_grouped(**kw):
    args = dict(groups=4, max_seqs=8, page_size=4, num_pages=4 * 48, token_budget=32,
                max_prefill_chunk=8, max_model_len=128)
    args.update(kw)
    return GroupedScheduler(**args)


def test_grouped_many_random_requests_no_page_leak():
    rng = np.random.default_rng(3)
    prefixes = [rng.integers(0, VOCAB, 12).tolist() for _ in range(3)]
    prompts, max_new = [], []
    for _ in range(300):
        p = rng.integers(0, VOCAB, int(rng.integers(1, 24))).tolist()
        if rng.random() < 0.5:
            p = prefixes[int(rng.integers(3))] + p
        prompts.append(p)
        max_new.append(int(rng.integers(1, 16)))
    arrivals = np.sort(rng.integers(0, 200, 300)).tolist()
    # 2 sequences of at most 49 tokens (13 pages) per group fit its 48-page segment: no
    # preemption; idle cached pages still get evicted.
    sched = make_grouped()
    plans = []
    outputs = run_engine(sched, prompts, max_new, stop_token=3, arrivals=arrivals, plans=plans)
    st, cst = sched.stats, sched.prefix_cache_stats()
    assert st.finished_requests == 300 and st.preemptions == 0 and st.steps == len(plans)
    assert st.generated_tokens == sum(len(o) for o in outputs.values())
    assert st.prompt_tokens == sum(len(p) for p in prompts)
    assert st.prefill_tokens + st.prefix_hit_tokens == st.prompt_tokens
    assert st.prefix_hit_tokens == cst.hit_tokens > 0 and cst.evictions > 0
    assert all(g.stats.finished_requests > 0 for g in sched.groups)  # every group worked
    assert max(p.num_seqs for p in plans) == 8 and max(p.num_tokens for p in plans) > 8
    assert_no_leak(sched)


def test_grouped_preemption_stays_within_the_group():
    # Segments of 6 pages (24 tokens). A and C (12 + 12 tokens: 6 pages each) go to group 0,
    # B and D (3 + 3 tokens: 2 pages each) to group 1 (requests go to the least loaded group).
    sched = make_grouped(groups=2, max_seqs=4, num_pages=12, token_budget=8)
    rng = np.random.default_rng(4)
    long, short = rng.integers(0, VOCAB, (2, 12)).tolist(), rng.integers(0, VOCAB, (2, 3)).tolist()
    prompts = [long[0], short[0], long[1], short[1]]
    run_engine(sched, prompts, [12, 3, 12, 3])
    assert sched.groups[0].stats.preemptions > 0  # group 0's pool is short: C is recomputed
    assert sched.groups[1].stats.preemptions == 0  # group 1 never lends or loses a page
    assert sched.groups[0].stats.finished_requests == sched.groups[1].stats.finished_requests == 2
    assert_no_leak(sched)


def test_grouped_errors_and_device_slot_outputs():
    with pytest.raises(ValueError, match="max_seqs=6 must be divisible by the 4 slot groups"):
        make_grouped(max_seqs=6)
    with pytest.raises(ValueError, match="num_pages=30 must be divisible by the 4 slot groups"):
        make_grouped(num_pages=30)
    sched = make_grouped(num_pages=4 * 4)
    with pytest.raises(ValueError, match=r"needs 5 pages .* num_pages=4 \(one of the 4 slot "
                                         r"groups' segments"):
        sched.add_request("big", list(range(17)), 3)
    a = sched.add_request("a", [1, 2], 2)
    b = sched.add_request("b", [3, 4, 5], 2)
    plan = sched.schedule()
    assert plan.slots == (0, 2) and plan.request_ids == ("a", "b")  # groups 0 and 1
    assert (sched.group_of(a), sched.group_of(b)) == (0, 1)
    np.testing.assert_array_equal(plan.group_seqs, [1, 1, 0, 0])
    device = np.zeros(8, np.int64)
    device[[0, 2]] = [7, 9]  # outputs per device slot are read at plan.slots
    sched.update(plan, device)
    assert a.output == [7] and b.output == [9]
    c = sched.add_request("c", [6], 1)  # queued, not yet handed to a group
    sched.abort(c, "cancel")
    sched.abort(a)
    assert (c.finish_reason, a.finish_reason) == ("cancel", "abort")
    with pytest.raises(ValueError, match="request 'a' is not waiting or running"):
        sched.abort(a)
    assert sched.stats.finished_requests == 2 and sched.running() == (b,)
