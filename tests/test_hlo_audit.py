"""HLO audit (pope2022.md §4.3, §5, §6.2, §13.2): the collectives XLA compiles for one layer of
a prefill or decode step under each layout equal, kind by kind, the cost model's per-chip bytes."""

import json
import os
import subprocess
import sys

import pytest

from jaxinfer.config import ModelConfig
from partitioning import audit
from partitioning.cost_model import Workload
from partitioning.mesh import MeshShape
from partitioning.plan import PhasePlan

# Multihead (K = 8) so K/V shard like the queries on 8 chips; multiquery (K = 1) for batch-sharded
# attention (§6.1). f32: XLA:CPU widens bf16 collectives to f32.
MHA = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=8,
                  d_ff=128, max_context=64)
MQA = ModelConfig(vocab_size=128, d_model=64, n_layers=3, n_heads=8, n_kv_heads=1, head_dim=8,
                  d_ff=128, max_context=64, parallel_block=True)
B, CONTEXT, PROMPT = 8, 32, 16

CASES = [  # (model, phase, layout, attention, mesh)
    (MHA, "decode", "1d-ws", "heads", (2, 2, 2)),
    (MHA, "prefill", "2d-ws", "heads", (2, 2, 2)),
    (MHA, "decode", "2d-ws", "heads", (2, 2, 2)),
    (MHA, "prefill", "wg-x", "heads", (2, 2, 2)),
    (MHA, "prefill", "wg-xy", "heads", (2, 2, 2)),
    (MHA, "decode", "wg-xyz", "heads", (2, 2, 2)),
    (MQA, "decode", "1d-ws", "batch", (8, 1, 1)),
    (MQA, "decode", "2d-ws", "batch", (2, 2, 2)),
    (MQA, "prefill", "2d-ws", "batch", (1, 2, 4)),
    (MQA, "decode", "2d-ws", "heads", (2, 1, 4)),
    (MQA, "prefill", "wg-xyz", "batch", (2, 2, 2)),
    (MQA, "decode", "wg-x", "batch", (2, 2, 2)),  # K/V weights replicated over y, z: gathered on x
    (MQA, "prefill", "wg-xy", "heads", (2, 2, 2)),
]


def _plan(phase, layout, attention, mesh):
    return PhasePlan(phase, layout, attention, MeshShape(*mesh))


@pytest.mark.parametrize("cfg,phase,layout,attention,mesh", CASES,
                         ids=[f"{'mha' if c[0] is MHA else 'mqa'}-{c[1]}-{c[2]}-{c[3]}-"
                              f"{''.join(map(str, c[4]))}" for c in CASES])
def test_hlo_collectives_match_cost_model(cfg, phase, layout, attention, mesh):
    result = audit.audit_step(cfg, _plan(phase, layout, attention, mesh), B, CONTEXT, PROMPT)
    for kind, ratio in result.ratios().items():
        assert ratio == pytest.approx(1.0, abs=0.005), (kind, result.rows())
    assert sum(result.measured.values()) > 0


def test_audited_bytes_are_the_papers_formulas():
    """Independent of the cost model: §5.2 2D WS moves 2BL(E/X + F/(YZ)) per FFN, §6.2b the
    queries and attention outputs cross chips in two all-to-alls; (K-1)/K exact, 4-byte floats."""
    X, Y, Z = 2, 2, 2
    n, E, F, N, Q = X * Y * Z, MQA.d_model, MQA.d_ff, MQA.n_heads, MQA.head_dim
    r = audit.audit_step(MQA, _plan("decode", "2d-ws", "batch", (X, Y, Z)), B, CONTEXT)
    BL = B * 1
    a2a = 2 * BL * N * Q / n * 4 * (n - 1) / n
    assert r.measured["all-to-all"] == pytest.approx(a2a)
    yz = Y * Z
    ffn_and_block = (BL * E / X * (yz - 1) / yz  # all-gather(yz) of the block input
                     + BL * F / yz * (X - 1) / X)  # all-gather(x) of the activated FFN hidden
    attn_out = BL * N * Q / yz * (X - 1) / X  # all-gather(x) of the attention output, §6.2 step 4
    assert r.measured["all-gather"] == pytest.approx((ffn_and_block + attn_out) * 4)


def test_weight_gathered_xyz_moves_weights_not_activations():
    """§5.3: XYZ weight-gathered has no activation collectives, only the weights' all-gather:
    every matrix from 1/8 to whole, the two norm scales (stored E_x) over x."""
    r = audit.audit_step(MHA, _plan("prefill", "wg-xyz", "heads", (2, 2, 2)), B, CONTEXT, PROMPT)
    assert r.measured["reduce-scatter"] == r.measured["all-to-all"] == 0
    E, F, N, K, Q = MHA.d_model, MHA.d_ff, MHA.n_heads, MHA.n_kv_heads, MHA.head_dim
    matrices = E * Q * (2 * N + 2 * K) + 3 * E * F
    assert r.measured["all-gather"] == pytest.approx(matrices * 4 * 7 / 8 + 2 * E * 4 / 2)


HLO = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p.1), index=1
  %ag = f32[16]{0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[4]{0} reduce-scatter(%ag), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[4]{0}) tuple(%i2, %rs)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %ar = (f32[4]{0}, bf16[8]{0}) all-reduce(%a, %b), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([8]) {'axis_1'}, to_apply=%add
  %a2a = f32[8,2]{1,0} all-to-all(%q), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_parser_convention_groups_and_trip_counts():
    """Per-chip bytes by the plan.py convention; while bodies counted once per iteration."""
    found = {c.kind: c for c in audit.parse_collectives(HLO)}
    ag, rs, ar, a2a = (found[k] for k in audit.KINDS)
    assert (ag.group, ag.executions, ag.in_loop) == (4, 6, True)
    assert ag.bytes_per_chip == 64 * 3 / 4  # output bytes x (K-1)/K
    assert (rs.group, rs.payload_bytes) == (4, 64)  # input = K x output
    assert (ar.group, ar.in_loop) == (2, False)
    assert ar.bytes_per_chip == 2 * (16 + 16) * 1 / 2  # 2 x bytes x (K-1)/K, tuple summed
    assert a2a.bytes_per_chip == 64 * 7 / 8
    totals = audit.bytes_by_kind(audit.parse_collectives(HLO), loop_only=True)
    assert totals == {"all-gather": 6 * 48.0, "reduce-scatter": 6 * 48.0, "all-reduce": 0.0,
                      "all-to-all": 0.0}


def test_audit_errors_are_clear():
    with pytest.raises(audit.AuditError, match="replica groups"):
        audit.parse_collectives("ENTRY %m (a: f32[4]) -> f32[4] {\n"
                                "  %x = f32[4]{0} all-reduce(%a), channel_id=1, to_apply=%add\n}")
    with pytest.raises(audit.AuditError, match="does not fit"):
        audit.audit_step(MHA, _plan("prefill", "2d-ws", "heads", (2, 2, 2)), B, 8, 16)
    unmodelled = audit.unmodelled_collectives(
        MQA, _plan("decode", "2d-ws", "heads", (2, 2, 2)), Workload(8, 1, 8))
    assert [c.what for c in unmodelled] == ["norm statistics"]  # parallel block: one norm


def test_cli_plan_audit():
    """`jaxinfer plan --audit --json` adds one row per collective kind with its ratio."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "plan", "--model", "palm-8b", "--hardware", "tpu-v4",
         "--chips", "8", "--batch", "16", "--phase", "decode", "--context", "512", "--layout",
         "2d-ws", "--attention", "batch", "--audit", "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["audit"]
    assert [r["kind"] for r in rows] == list(audit.KINDS)
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=0.02), r
