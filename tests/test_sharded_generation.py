"""Sharded generation on 8 simulated CPU devices: every Pope et al. layout (pope2022.md §5, §6)
generates exactly the tokens of the unsharded model, including a prefill->decode layout switch
(weight-gathered prefill, 2D weight-stationary decode, KV cache resharded heads->batch, §5.3, §6.4).
"""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import quant
from jaxinfer.cache import KVCache
from jaxinfer.config import ModelConfig
from partitioning.layouts import resolve
from partitioning.mesh import MeshShape, make_mesh
from partitioning.plan import Plan, PhasePlan
from partitioning.rules import ShardingError, ShardingRules
from partitioning.sharding import Placement

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
                  d_ff=128, max_context=64)
NEW_TOKENS = 5


def _plan(prefill, decode, mesh):
    m = MeshShape(*mesh)
    return Plan(PhasePlan("prefill", *prefill, m), PhasePlan("decode", *decode, m))


@pytest.fixture(scope="module")
def reference():
    model = jaxinfer.Model.random(CFG, seed=3, layer_loop="scan")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist()
               for n in rng.integers(2, 14, size=8)]
    return model, prompts, model.generate(prompts, max_new_tokens=NEW_TOKENS,
                                          stop_tokens=[]).tokens


CASES = [  # (prefill layout, attention), (decode layout, attention), mesh (x, y, z)
    (("2d-ws", "heads"), ("2d-ws", "heads"), (2, 2, 2)),
    (("1d-ws", "heads"), ("1d-ws", "batch"), (1, 2, 4)),
    (("1d-ws", "batch"), ("1d-ws", "heads"), (8, 1, 1)),
    (("wg-x", "heads"), ("2d-ws", "batch"), (2, 2, 2)),
    (("wg-xy", "batch"), ("2d-ws", "heads"), (1, 2, 4)),
    (("wg-xyz", "heads"), ("2d-ws", "batch"), (8, 1, 1)),
]


@pytest.mark.parametrize("prefill,decode,mesh", CASES, ids=lambda c: "-".join(map(str, c)))
def test_sharded_tokens_match_single_device(reference, prefill, decode, mesh):
    model, prompts, want = reference
    sharded = jaxinfer.Model(CFG, model.params, layer_loop="scan",
                             plan=_plan(prefill, decode, mesh))
    assert sharded.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens == want


@pytest.mark.parametrize("prefill,decode,mesh", [CASES[1], CASES[3]],
                         ids=lambda c: "-".join(map(str, c)))
def test_explicit_collectives_match_single_device(reference, prefill, decode, mesh):
    """The per-chip layers with the paper's collectives (`partitioning.collective_layer`)."""
    model, prompts, want = reference
    sharded = jaxinfer.Model(CFG, model.params, layer_loop="scan", collectives="explicit",
                             plan=_plan(prefill, decode, mesh))
    assert sharded.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens == want


def test_unrolled_layers_and_logits_sharded(reference):
    model, prompts, want = reference
    plan = _plan(("wg-xy", "heads"), ("2d-ws", "batch"), (2, 2, 2))
    sharded = jaxinfer.Model(CFG, model.params, layer_loop="unrolled", plan=plan)
    wq = sharded.params["layers"][0]["wq"]  # [D, N, H] stored E_x N_yz (§5.2)
    assert wq.sharding.shard_shape(wq.shape) == (32, 2, 8)
    assert sharded.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens == want
    tokens = np.array([p[:2] for p in prompts])
    np.testing.assert_allclose(sharded.logits(tokens), model.logits(tokens), rtol=2e-5,
                               atol=2e-5)


def test_load_quantized_int8_cache_with_plan(reference, tmp_path):
    """jaxinfer.load(plan=) places int8 weights and an int8 KV cache; 5 prompts pad to 8 rows."""
    model, prompts, _ = reference
    model.save(str(tmp_path))
    plan = _plan(("wg-xyz", "batch"), ("2d-ws", "batch"), (2, 2, 2))
    ref = jaxinfer.load(str(tmp_path), quantize="int8", kv_cache="int8", layer_loop="scan")
    want = ref.generate(prompts[:5], max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens
    sharded = jaxinfer.load(str(tmp_path), quantize="int8", kv_cache="int8", layer_loop="scan",
                            plan=plan)
    assert sharded.placement.batch_multiple == 8
    assert sharded.generate(prompts[:5], max_new_tokens=NEW_TOKENS,
                            stop_tokens=[]).tokens == want


def test_weights_stay_put_and_cache_reshards():
    """wg-* and 2d-ws store identical weight shards; the cache moves heads -> batch (§5.3, §6.4)."""
    mesh = MeshShape(2, 2, 2)
    specs = {layout: resolve(PhasePlan("decode", layout, "heads", mesh), CFG).weight_rules()
             for layout in ("2d-ws", "wg-x", "wg-xy", "wg-xyz")}
    names = ("layers", "embed", "mlp")
    assert len({r.spec(names) for r in specs.values()}) == 1
    placement = Placement(_plan(("2d-ws", "heads"), ("2d-ws", "batch"), (2, 2, 2)), CFG,
                          make_mesh(mesh))
    cache = placement.reshard_cache(KVCache.init(CFG, 8, 16), "prefill")
    assert cache.k.sharding.shard_shape(cache.k.shape) == (2, 8, 2, 16, 8)  # 2 KV heads: replicated
    moved = placement.reshard_cache(cache, "decode")
    assert moved.k.sharding.shard_shape(moved.k.shape) == (2, 1, 2, 16, 8)  # batch over x, y, z


def test_errors_are_loud():
    with pytest.raises(ShardingError, match="both map to mesh axis"):
        ShardingRules.from_dict({"embed": "x", "mlp": "x"}).spec(("embed", "mlp"))
    with pytest.raises(ShardingError, match="d_ff = 100 is not divisible"):
        bad = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=8, n_kv_heads=2,
                          head_dim=8, d_ff=100, max_context=32)
        resolve(PhasePlan("decode", "2d-ws", "heads", MeshShape(2, 2, 2)), bad).check(bad)
    with pytest.raises(ShardingError, match="pair 1d-ws only with 1d-ws"):
        Placement(_plan(("wg-xyz", "heads"), ("1d-ws", "heads"), (2, 2, 2)), CFG,
                  make_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="collectives must be one of"):
        jaxinfer.Model.random(CFG, collectives="magic")
    with pytest.raises(ValueError, match="collectives='explicit' runs float weights only"):
        qc = quant.QuantConfig.from_mode("int8")
        params = quant.quantize_params(jaxinfer.Model.random(CFG, layer_loop="scan").params, CFG,
                                       qc)
        jaxinfer.Model(CFG, params, quantization=qc, collectives="explicit",
                       plan=_plan(("2d-ws", "heads"), ("2d-ws", "heads"), (2, 2, 2)))
    with pytest.raises(ValueError, match="mesh= needs plan="):
        jaxinfer.Model.random(CFG, mesh=make_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="does not match the plan's mesh"):
        Placement(_plan(("2d-ws", "heads"), ("2d-ws", "heads"), (2, 2, 2)), CFG,
                  make_mesh((8, 1, 1)))
