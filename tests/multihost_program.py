"""One process of the multi-host test (`tests/test_multihost.py`); also usable by hand.

    python tests/multihost_program.py CHECKPOINT PLAN NUM_PROCESSES PROCESS_ID PORT

Joins NUM_PROCESSES processes (8 CPU devices in all), loads CHECKPOINT sharded under PLAN
("ws": 2D weight-stationary; "batch": 2D WS prefill, weight-gathered XY decode with
batch-sharded multiquery attention, whose outputs are split over both processes), generates
from prompts broadcast by process 0 (one static batch, then the continuous-batching engine under
the same plan with greedy and seeded-sampling requests), and prints one JSON line: both token
lists, this process's parameter bytes and checkpoint bytes read, and its peak resident memory
before and after loading.
"""

import json
import sys


def engine_params():
    """Per-request parameters of the engine run: greedy and seeded sampling, alternating."""
    from jaxinfer import SamplingParams

    return [SamplingParams(max_new_tokens=6, stop_tokens=()),
            SamplingParams(max_new_tokens=6, stop_tokens=(), temperature=1.0, seed=5)] * 3


def engine_config():
    from jaxinfer import EngineConfig

    # max_seqs: one slot per attention batch shard of the "batch" plan (8 slot groups)
    return EngineConfig(max_seqs=8, page_size=4, token_budget=32, steps_per_call=4,
                        max_model_len=32)


def main(path: str, plan_name: str, n: int, pid: int, port: int) -> None:
    from jaxinfer import distributed

    if n > 1:
        distributed.initialize(f"127.0.0.1:{port}", n, pid, local_device_count=8 // n,
                               timeout_s=60)
    else:
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
    import jax
    import numpy as np

    import jaxinfer
    from jaxinfer import hf_weights
    from partitioning.mesh import MeshShape
    from partitioning.plan import PhasePlan, Plan

    mesh = MeshShape(2, 2, 2)
    decode = ("2d-ws", "heads") if plan_name == "ws" else ("wg-xy", "batch")
    plan = Plan(PhasePlan("prefill", "2d-ws", "heads", mesh), PhasePlan("decode", *decode, mesh))
    before = distributed.peak_host_bytes()
    hf_weights.SafetensorsReader.bytes_read = 0
    model = jaxinfer.load(path, plan=plan)
    after = distributed.peak_host_bytes()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, size=int(k)).tolist()
               for k in rng.integers(2, 12, size=6)]
    prompts = distributed.broadcast_from_process_zero(prompts if pid == 0 else None)
    result = model.generate(prompts, max_new_tokens=6, stop_tokens=[])
    engine_tokens = model.engine(engine_config()).generate(prompts, engine_params()).tokens
    local = model.memory_report()["param_bytes_this_process"]
    print("RESULT " + json.dumps({
        "tokens": result.tokens, "engine_tokens": engine_tokens,
        "process_count": jax.process_count(), "devices": jax.device_count(), "local_param_bytes": local,
        "read_bytes": hf_weights.SafetensorsReader.bytes_read,
        "peak_rss_before_load": before, "peak_rss_after_load": after}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:6]))
