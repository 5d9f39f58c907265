"""Planner sweeps, calibration and the cpu profile, mesh factorization."""

import json

import pytest

from jaxinfer.cli import main
from partitioning.hardware import get_hardware
from partitioning.mesh import MeshShape, factorizations, make_mesh
from partitioning.planner import pareto_frontier, plan_phase
from partitioning.cost_model import Workload
from partitioning.presets import PRESETS, resolve_model


def test_pareto_frontier_is_non_dominated():
    points, frontier = pareto_frontier(PRESETS["palm-62b"], "decode", [8, 16, 32],
                                       [1, 16, 128, 512], get_hardware("tpu-v4"), 1, 2048)
    assert frontier and len(points) >= len(frontier)
    for p in frontier:
        assert not any(q.latency_s < p.latency_s and q.cost_chip_s_per_token
                       < p.cost_chip_s_per_token for q in points)
    latencies = [p.latency_s for p in frontier]
    costs = [p.cost_chip_s_per_token for p in frontier]
    assert latencies == sorted(latencies) and costs == sorted(costs, reverse=True)


def test_runners_up_say_why_they_lost():
    result = plan_phase(PRESETS["llama-3-70b"], "decode", 8, Workload(64, 1, 4096),
                        get_hardware("h100-sxm"))
    assert result.runners_up
    assert all("slower" in c.rejected for c in result.runners_up)


def test_factorizations_and_meshes():
    shapes = factorizations(8)
    assert MeshShape(2, 2, 2) in shapes and MeshShape(8, 1, 1) in shapes
    assert all(s.n == 8 for s in shapes) and len(set(shapes)) == len(shapes) == 10
    assert all(s.z == 1 for s in factorizations(8, max_axes=2))
    mesh = make_mesh((1, 2, 4))
    assert dict(mesh.shape) == {"x": 1, "y": 2, "z": 4}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((2, 2, 4))


def test_calibrate_and_cpu_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["calibrate", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["memory_bw"] > 1e8 and measured["matmul_flops"] > 1e8
    cpu = get_hardware("cpu")
    assert cpu.hbm_bw == measured["memory_bw"]
    assert main(["plan", "--model", "llama-2-7b", "--hardware", "cpu", "--chips", "1",
                 "--batch", "1", "--phase", "decode", "--context", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bound"] == "memory"  # batch-1 decode streams every weight once per token


def test_model_from_checkpoint_dir(family_checkpoints, capsys):
    """`plan --model CKPT_DIR` reads the config (no weights) and prices the checkpoint's own
    dtype by default: a float32 HF checkpoint is not priced as bf16 weights."""
    path = family_checkpoints("falcon").path
    assert main(["plan", "--model", path, "--hardware", "tpu-v4", "--mesh", "1x1x2",
                 "--batch", "2", "--phase", "decode", "--context", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {"x": 1, "y": 1, "z": 2}
    assert main(["plan", "--model", path, "--hardware", "tpu-v4", "--mesh", "1x1x2",
                 "--batch", "2", "--phase", "decode", "--context", "32", "--json",
                 "--weights", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert out["breakdown"]["weight_load_s"] == pytest.approx(2 * bf16["breakdown"]["weight_load_s"])
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_model("palm-9000b")


def test_dcn_collectives_cost_the_slow_network():
    """A collective whose group spans 2 granules: the fast links carry the within-granule half,
    DCN the cross-granule leg, (D-1)/D of the full volume at dcn_bw (pope2022.md §2.2)."""
    from partitioning.cost_model import Collective, collective_time

    hw = get_hardware("h100-sxm")
    c = Collective("all-gather", ("x",), 16, 1e8, 2.0, "t", 15)
    ici = collective_time(c, hw)
    assert ici == pytest.approx(2e8 * 15 / 16 / hw.axis_bw + 15 * hw.hop_latency_s)
    dcn = collective_time(Collective("all-gather", ("x",), 16, 1e8, 2.0, "t", 15, dcn_group=2),
                          hw)
    assert dcn == pytest.approx(1e8 * 7 / 8 / hw.axis_bw + 2e8 / 2 / hw.dcn_bw
                                + 15 * hw.hop_latency_s)
    assert dcn > 3 * ici  # 50 GB/s InfiniBand vs 450 GB/s NVLink


def test_planner_places_the_process_boundary_on_the_cheapest_axis():
    cfg, wl = PRESETS["llama-3-70b"], Workload(64, 1, 4096)
    hw = get_hardware("h100-sxm")
    result = plan_phase(cfg, "decode", 16, wl, hw)  # 16 GPUs: two 8-GPU NVLink nodes
    best = result.best
    assert best.plan.mesh.granules == 2
    sizes = best.plan.mesh.sizes
    placements = [d for d in ((2, 1, 1), (1, 2, 1), (1, 1, 2))
                  if all(s % g == 0 for s, g in zip(sizes, d))]
    same_layout = [plan_phase(cfg, "decode", 16, wl, hw, layouts=(best.plan.layout,),
                              attentions=(best.plan.attention,),
                              meshes=[MeshShape(*sizes, dcn=d)]).best.estimate.comm_s
                   for d in placements]
    assert len(same_layout) >= 2
    assert best.estimate.comm_s == pytest.approx(min(same_layout))
    one_node = plan_phase(cfg, "decode", 16, wl, hw, granules=1).best.estimate
    assert one_node.comm_s < best.estimate.comm_s  # DCN is slower than NVLink
    with pytest.raises(ValueError, match="cannot be split evenly over 3"):
        plan_phase(cfg, "decode", 16, wl, hw, granules=3)


def test_plan_generation_is_executable():
    from jaxinfer.config import ModelConfig
    from partitioning.layouts import resolve, storage_of
    from partitioning.planner import plan_generation

    cfg = ModelConfig(vocab_size=264, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                      head_dim=32, d_ff=512, max_context=256)
    plan = plan_generation(cfg, 8, 1, 16, 32, get_hardware("tpu-v4"), granules=2)
    assert plan.decode.mesh.n == 8 and plan.decode.mesh.granules == 2
    storage_of((plan.prefill.layout, plan.decode.layout))  # compatible weight storage
    for phase in (plan.prefill, plan.decode):
        resolve(phase, cfg).check(cfg, 8)  # 6 heads on 8 chips: batch padded to 8


def test_mesh_shape_dcn():
    m = MeshShape(2, 2, 4, dcn=(1, 1, 2))
    assert m.granules == 2 and m.dcn_axes() == ("z",) and m.ici_sizes() == (2, 2, 2)
    assert str(m) == "2x2x4 (dcn 1x1x2)"
    with pytest.raises(ValueError, match="cannot span 4 DCN granules"):
        MeshShape(2, 2, 2, dcn=(4, 1, 1))


def test_generate_plan_flags(capsys):
    assert main(["generate", "--plan", "2d-ws", "--tokens", "1,2"]) == 2
    assert "--plan must be 'auto' or PREFILL,DECODE" in capsys.readouterr().err
    assert main(["generate", "--mesh", "2x2x2", "--tokens", "1,2"]) == 2
    assert "--mesh needs --plan" in capsys.readouterr().err
    assert main(["generate", "--plan", "2d-ws/heads,2d-ws/heads", "--mesh", "2x2", "--tokens",
                 "1,2"]) == 2
    assert "--mesh must be XxYxZ" in capsys.readouterr().err
    assert main(["generate", "--plan", "2d-ws/heads,2d-ws/heads", "--mesh", "1x2x2",
                 "--tokens", "1,2"]) == 2
    assert "needs 4 devices, 8 available" in capsys.readouterr().err
