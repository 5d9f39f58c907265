"""The partitioned steps lower for TPU and GPU from this CPU host (`jax.export`): the shard_map'd
prefill and decode-loop step with the Pallas kernels on each chip's shards (Mosaic for TPU,
Triton for CUDA), float and int8 weights. Interpret success is not compilation."""

import pytest

from jaxinfer import api
from jaxinfer.config import ModelConfig
from partitioning.mesh import MeshShape
from partitioning.plan import Plan, PhasePlan

CFG = ModelConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128,
                  d_ff=512, max_context=256)
MESH = MeshShape(2, 2, 2)
PLAN = Plan(PhasePlan("prefill", "wg-xy", "heads", MESH), PhasePlan("decode", "2d-ws", "batch",
                                                                     MESH))
MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_partitioned_step_lowers_with_kernels(platform, backend, phase, quantize):
    exported = api.export_step(CFG, phase, 8, 128, 64, platform=platform, plan=PLAN,
                               attention_backend=backend, quantize=quantize)
    text = exported.mlir_module()
    assert exported.platforms == (platform,)
    assert MARKERS[platform] in text
    assert "all_gather" in text or "all-gather" in text  # the layout's collectives are there
    assert exported.nr_devices == MESH.n
