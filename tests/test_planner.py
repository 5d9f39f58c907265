"""Planner sweeps, calibration and the cpu profile, mesh factorization."""

import json

import pytest

from jaxinfer.cli import main
from partitioning import calibrate
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


def test_model_from_checkpoint_dir(family_checkpoints):
    cfg = resolve_model(family_checkpoints("falcon").path)
    assert cfg.attention_kind == "multiquery" and cfg.parallel_block
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("palm-9000b")
