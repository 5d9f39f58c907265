"""Sharded generation on 8 simulated CPU devices: the one per-chip decoder under every Pope et al.
layout (pope2022.md §5, §6) generates exactly the tokens of the unsharded model (a 1-device mesh of
the same code), including prefill->decode layout switches (weight-gathered prefill, 2D
weight-stationary decode, KV cache moved heads->batch, §5.3, §6.4), int8 / int4 weights, the int8
KV cache and the Pallas kernels (interpret mode) on each chip's shards.
"""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import quant
from jaxinfer.config import ModelConfig
from jaxinfer.sharding import ShardingError, ShardingRules
from partitioning.execution import plan_shardings
from partitioning.layouts import resolve
from partitioning.mesh import MeshShape, make_mesh
from partitioning.plan import Plan, PhasePlan

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                  d_ff=128, max_context=64)
NEW_TOKENS = 5


def _plan(prefill, decode, mesh):
    m = MeshShape(*mesh)
    return Plan(PhasePlan("prefill", *prefill, m), PhasePlan("decode", *decode, m))


@pytest.fixture(scope="module")
def reference():
    model = jaxinfer.Model.random(CFG, seed=3)
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
    sharded = jaxinfer.Model(CFG, model.params, plan=_plan(prefill, decode, mesh))
    assert sharded.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens == want


def test_logits_sharded_and_weights_stored_2d(reference):
    model, prompts, _ = reference
    sharded = jaxinfer.Model(CFG, model.params,
                             plan=_plan(("wg-xy", "heads"), ("2d-ws", "batch"), (2, 2, 2)))
    wq = sharded.params["layers"][0]["wq"]  # [D, N, H] stored E_x N_yz (§5.2)
    assert wq.sharding.shard_shape(wq.shape) == (32, 2, 16)
    tokens = np.array([p[:2] for p in prompts[:5]])  # 5 rows: padded to the 4-way batch split
    np.testing.assert_allclose(sharded.logits(tokens), model.logits(tokens), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("mode,group,kv", [("int8", None, "int8"), ("int4", 16, None)])
def test_quantized_weights_and_int8_cache_under_plans(reference, mode, group, kv):
    """int8 (per channel) / int4 (grouped) weights, int8 KV cache: placed on the mesh and run on
    shards under a weight-gathered prefill and a batch-sharded 2D decode; 5 prompts pad to 8."""
    model, prompts, _ = reference
    qc = quant.QuantConfig.from_mode(mode, group)
    params = quant.quantize_params(model.params, CFG, qc)
    want = jaxinfer.Model(CFG, params, quantization=qc, kv_cache=kv).generate(
        prompts[:5], max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens
    for prefill, decode in [(("wg-xyz", "batch"), ("2d-ws", "batch")),
                            (("wg-xy", "heads"), ("2d-ws", "heads"))]:
        sharded = jaxinfer.Model(CFG, params, quantization=qc, kv_cache=kv,
                                 plan=_plan(prefill, decode, (2, 2, 2)))
        got = sharded.generate(prompts[:5], max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens
        assert got == want, (prefill, decode)


@pytest.mark.parametrize("backend", ["tpu-interpret", "gpu-interpret"])
def test_pallas_kernels_run_on_shards(reference, backend):
    """Flash and decode attention kernels are called inside the shard_map on local shapes."""
    model, prompts, want = reference
    sharded = jaxinfer.Model(CFG, model.params, attention_backend=backend,
                             plan=_plan(("wg-xy", "heads"), ("2d-ws", "batch"), (2, 2, 2)))
    assert sharded.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[]).tokens == want


def test_kernel_on_unsupported_local_shape_is_an_error_naming_it():
    """head_dim 8 is below the GPU kernels' minimum: an explicit backend raises, naming it."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8,
                      d_ff=64, max_context=32)
    model = jaxinfer.Model.random(cfg, attention_backend="gpu-interpret")
    with pytest.raises(ValueError, match="head_dim"):
        model.generate([[1, 2, 3]], max_new_tokens=2)


def test_layouts_share_stored_weights_and_the_cache_moves_between_phases():
    """wg-* and 2d-ws store identical weight shards; the cache moves heads -> batch (§5.3, §6.4)."""
    mesh = MeshShape(2, 2, 2)
    specs = {layout: resolve(PhasePlan("decode", layout, "heads", mesh), CFG).weight_rules()
             for layout in ("2d-ws", "wg-x", "wg-xy", "wg-xyz")}
    names = ("embed", "mlp")
    assert len({r.spec(names) for r in specs.values()}) == 1
    prefill, decode = plan_shardings(_plan(("2d-ws", "heads"), ("2d-ws", "batch"), (2, 2, 2)),
                                     CFG, make_mesh(mesh))
    assert prefill.cache_spec(2) != decode.cache_spec(2)
    assert decode.layer.attn_batch == ("z", "y", "x") and decode.layer.kv_heads == ()


def test_errors_are_loud():
    with pytest.raises(ShardingError, match="both map to mesh axis"):
        ShardingRules.from_dict({"embed": "x", "mlp": "x"}).spec(("embed", "mlp"))
    with pytest.raises(ShardingError, match="d_ff = 100 is not divisible"):
        bad = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=8, n_kv_heads=2,
                          head_dim=8, d_ff=100, max_context=32)
        resolve(PhasePlan("decode", "2d-ws", "heads", MeshShape(2, 2, 2)), bad).check(bad)
    with pytest.raises(ShardingError, match="pair 1d-ws only with 1d-ws"):
        plan_shardings(_plan(("wg-xyz", "heads"), ("1d-ws", "heads"), (2, 2, 2)), CFG)
    with pytest.raises(ValueError, match="mesh= needs plan="):
        jaxinfer.Model.random(CFG, mesh=make_mesh((2, 2, 2)))
    with pytest.raises(ValueError, match="does not match the plan's mesh"):
        plan_shardings(_plan(("2d-ws", "heads"), ("2d-ws", "heads"), (2, 2, 2)), CFG,
                       make_mesh((8, 1, 1)))
    qc = quant.QuantConfig.from_mode("int4", 32)  # wo: 128 rows in 4 groups, split 8 ways
    params = quant.quantize_params(jaxinfer.Model.random(CFG).params, CFG, qc)
    with pytest.raises(ShardingError, match=r"weight \['layers'\]\[0\]\['w\w+'\]\.scale"):
        jaxinfer.Model(CFG, params, quantization=qc,
                       plan=_plan(("1d-ws", "heads"), ("1d-ws", "heads"), (1, 2, 4)))
