"""The engine under a partitioning plan on 8 simulated CPU devices: the step and the on-device
decode loop run as per-chip programs under shard_map (pool split over KV heads, or, with
batch-sharded attention or a weight-gathered layout, into one page segment per chip and slot
group) and generate exactly the tokens of the same engine on one device."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import EngineConfig, InvalidArgument, SamplingParams
from jaxinfer.config import ModelConfig
from partitioning.mesh import MeshShape
from partitioning.plan import Plan

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                  d_ff=128, max_context=64)
ENGINE = EngineConfig(max_seqs=4, page_size=4, token_budget=16, steps_per_call=4)


def _plan(decode, mesh):
    return Plan.uniform(*decode, MeshShape(*mesh))


@pytest.fixture(scope="module")
def reference():
    model = jaxinfer.Model.random(CFG, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist()
               for n in rng.integers(2, 14, size=6)]
    params = [SamplingParams(max_new_tokens=6, stop_tokens=()),
              SamplingParams(max_new_tokens=6, stop_tokens=(), temperature=1.0, seed=5),
              SamplingParams(max_new_tokens=6, stop_tokens=(), temperature=0.8, seed=7,
                             repetition_penalty=1.3)] * 2
    return model, prompts, params, model.engine(ENGINE).generate(prompts, params).tokens


@pytest.mark.parametrize("decode,mesh", [(("2d-ws", "heads"), (2, 2, 2)),
                                         (("1d-ws", "heads"), (8, 1, 1)),
                                         (("wg-x", "heads"), (2, 2, 2))])
def test_engine_under_a_heads_sharded_plan_equals_one_device(reference, decode, mesh):
    model, prompts, params, want = reference
    sharded = jaxinfer.Model(CFG, model.params, plan=_plan(decode, mesh))
    engine = sharded.engine(ENGINE)
    res = engine.generate(prompts, params)
    assert res.tokens == want
    assert res.stats.device_calls < res.stats.steps  # the decode loop ran sharded too
    assert len(engine.kv.k[0].sharding.device_set) == 8


BATCHED = EngineConfig(max_seqs=8, page_size=4, token_budget=32, steps_per_call=4)
"""One slot per group: 8 groups, one per attention batch shard."""


@pytest.mark.parametrize("decode,mesh", [(("1d-ws", "batch"), (8, 1, 1)),
                                         (("2d-ws", "batch"), (2, 2, 2)),
                                         (("wg-xy", "batch"), (2, 2, 2)),
                                         (("wg-xyz", "heads"), (2, 2, 2))])
def test_engine_under_a_batch_sharded_plan_equals_one_device(reference, decode, mesh):
    """Batch-sharded attention, and weight-gathered layouts (the residual's batch split over
    the gathered axes, §5.3: each chip runs and samples its own groups, its block of the
    seen table included)."""
    model, prompts, params, want = reference
    sharded = jaxinfer.Model(CFG, model.params, plan=_plan(decode, mesh))
    engine = sharded.engine(BATCHED)
    assert engine.groups == 8 and engine.scheduler.num_groups == 8
    res = engine.generate(prompts, params)
    assert res.tokens == want  # tokens never depend on slots or batching: equal one device
    assert res.stats.device_calls < res.stats.steps  # the decode loop ran sharded too
    k = engine.kv.k[0]
    assert len(k.sharding.device_set) == 8  # the pool's pages: one segment per chip
    assert {s.data.shape[0] for s in k.addressable_shards} == {engine.num_pages // 8}
    assert sum(g.stats.finished_requests > 0 for g in engine.scheduler.groups) == 6
    if decode[0].startswith("wg-"):  # the seen table split like the slots, one block per chip
        assert {s.data.shape[0] for s in engine.seen.addressable_shards} == {
            8 // sharded.shardings[1].size(sharded.shardings[1].layer.gathered)}


def test_slot_groups_that_do_not_divide_max_seqs_are_a_clear_error(reference):
    model = reference[0]
    for decode in (("1d-ws", "batch"), ("wg-x", "heads")):
        batch = jaxinfer.Model(CFG, model.params, plan=_plan(decode, (8, 1, 1)))
        with pytest.raises(InvalidArgument,
                           match="max_seqs=4 must be divisible by the 8 slot groups"):
            batch.engine(ENGINE)


@pytest.mark.parametrize("decode,mesh", [(("2d-ws", "heads"), (2, 2, 2)),
                                         (("1d-ws", "batch"), (8, 1, 1)),
                                         (("wg-xy", "batch"), (2, 2, 2))])
def test_engine_step_sends_the_priced_collective_bytes(reference, decode, mesh):
    """`Engine.compiled_hlo`: the compiled engine step of 8 decoding sequences sends exactly the
    per-chip bytes the cost model prices for a decode step of batch 8 under the same plan (less
    the decode loop's condition, which only the engine's multi-step loop holds)."""
    from partitioning import audit
    from partitioning.cost_model import Workload

    plan = _plan(decode, mesh)
    sharded = jaxinfer.Model(CFG, reference[0].params, plan=plan)
    engine = sharded.engine(EngineConfig(max_seqs=8, page_size=4, token_budget=16))
    hlo = engine.compiled_hlo(8, 20)
    result = audit.audit_hlo(hlo, CFG, plan.decode, Workload(8, 1, 21, 4.0, 4.0, 4.0),
                             exclude=("loop",))
    assert sum(result.measured.values()) > 0
    for kind, ratio in result.ratios().items():
        assert ratio == pytest.approx(1.0, abs=1e-6), (kind, result.rows())
    with pytest.raises(InvalidArgument, match="compiled_hlo needs"):
        engine.compiled_hlo(9, 20)
