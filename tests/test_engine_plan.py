"""The engine under a partitioning plan on 8 simulated CPU devices: the step and the on-device
decode loop run as per-chip programs under shard_map (pool split over KV heads) and generate
exactly the tokens of the same engine on one device."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import EngineConfig, InvalidArgument, SamplingParams
from jaxinfer.config import ModelConfig
from partitioning.mesh import MeshShape
from partitioning.plan import Plan, PhasePlan

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                  d_ff=128, max_context=64)
ENGINE = EngineConfig(max_seqs=4, page_size=4, token_budget=16, steps_per_call=4)


def _plan(decode, mesh):
    m = MeshShape(*mesh)
    return Plan(PhasePlan("prefill", *decode, m), PhasePlan("decode", *decode, m))


@pytest.fixture(scope="module")
def reference():
    model = jaxinfer.Model.random(CFG, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist()
               for n in rng.integers(2, 14, size=6)]
    params = [SamplingParams(max_new_tokens=6, stop_tokens=()),
              SamplingParams(max_new_tokens=6, stop_tokens=(), temperature=1.0, seed=5)] * 3
    return model, prompts, params, model.engine(ENGINE).generate(prompts, params).tokens


@pytest.mark.parametrize("decode,mesh", [(("2d-ws", "heads"), (2, 2, 2)),
                                         (("1d-ws", "heads"), (8, 1, 1))])
def test_engine_under_a_heads_sharded_plan_equals_one_device(reference, decode, mesh):
    model, prompts, params, want = reference
    sharded = jaxinfer.Model(CFG, model.params, plan=_plan(decode, mesh))
    engine = sharded.engine(ENGINE)
    res = engine.generate(prompts, params)
    assert res.tokens == want
    assert res.stats.device_calls < res.stats.steps  # the decode loop ran sharded too
    assert len(engine.kv.k[0].sharding.device_set) == 8


def test_a_batch_sharded_attention_plan_is_a_clear_error(reference):
    model = reference[0]
    sharded = jaxinfer.Model(CFG, model.params, plan=_plan(("1d-ws", "batch"), (8, 1, 1)))
    with pytest.raises(InvalidArgument, match="attention='batch'"):
        sharded.engine(ENGINE)
