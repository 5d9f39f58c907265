"""HLO audit (pope2022.md App. A.1, §4.3, §5, §6.2, §13.2): the collectives of exactly the program
`generate` runs (`compiled_hlo`) equal, kind by kind, what the cost model prices for the whole step
(layers, norm statistics, weight gathers, embedding, logits, loop condition)."""

import json
import os
import subprocess
import sys

import pytest

from jaxinfer import api, quant
from jaxinfer.config import ModelConfig
from partitioning import audit
from partitioning.cost_model import Workload
from partitioning.mesh import MeshShape
from partitioning.plan import Plan, PhasePlan

# Multihead (K = 8) so K/V shard like the queries on 8 chips; GQA (K = 2); multiquery (K = 1) for
# batch-sharded attention (§6.1). f32 activations: XLA:CPU widens bf16 collectives to f32.
MHA = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=8,
                  d_ff=128, max_context=64)
GQA = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                  d_ff=128, max_context=64, norm="layer")
MQA = ModelConfig(vocab_size=128, d_model=64, n_layers=3, n_heads=8, n_kv_heads=1, head_dim=8,
                  d_ff=128, max_context=64, parallel_block=True, tie_embeddings=False)
B, CONTEXT, PROMPT = 8, 32, 16
WEIGHT_BYTES = {None: 4.0, "int8": 1.0, "int4": 0.5}


def _plan(phase, layout, attention, mesh) -> tuple[Plan, PhasePlan]:
    own = PhasePlan(phase, layout, attention, MeshShape(*mesh))
    twin = PhasePlan("decode" if phase == "prefill" else "prefill", layout, attention, own.mesh)
    return (Plan(own, twin) if phase == "prefill" else Plan(twin, own)), own


def _audit(cfg, phase, layout, attention, mesh, quantize=None, group=None, kv=None,
           backend="xla", batch=B):
    plan, own = _plan(phase, layout, attention, mesh)
    hlo = api.compiled_hlo(cfg, phase, batch, CONTEXT, PROMPT, plan=plan, quantize=quantize,
                           group_size=group, kv_cache=kv, attention_backend=backend)
    qc = None if quantize is None else quant.QuantConfig.from_mode(quantize, group)
    wl = Workload(batch, PROMPT if phase == "prefill" else 1, CONTEXT, WEIGHT_BYTES[quantize],
                  4.0, 1.0 if kv else 4.0, quantization=qc)
    return audit.audit_hlo(hlo, cfg, own, wl)


CASES = [  # (model, phase, layout, attention, mesh, quantize, group)
    (MHA, "decode", "1d-ws", "heads", (2, 2, 2), None, None),
    (MHA, "prefill", "2d-ws", "heads", (2, 2, 2), None, None),
    (MHA, "decode", "2d-ws", "heads", (2, 2, 2), "int8", None),
    (MHA, "prefill", "wg-x", "heads", (2, 2, 2), None, None),
    (MHA, "prefill", "wg-xy", "heads", (2, 2, 2), "int4", 16),
    (MHA, "decode", "wg-xyz", "heads", (2, 2, 2), None, None),
    (GQA, "decode", "2d-ws", "heads", (8, 1, 1), None, None),  # K/V all-reduced over x
    (GQA, "prefill", "wg-xy", "batch", (1, 2, 4), "int8", 16),
    (GQA, "decode", "1d-ws", "heads", (1, 2, 4), "int4", 16),
    (MQA, "decode", "1d-ws", "batch", (8, 1, 1), "int8", None),
    (MQA, "decode", "2d-ws", "batch", (2, 2, 2), None, None),
    (MQA, "prefill", "2d-ws", "batch", (1, 2, 4), "int4", 8),
    (MQA, "prefill", "wg-xyz", "batch", (2, 2, 2), None, None),
    (MQA, "decode", "wg-x", "batch", (2, 2, 2), "int8", None),  # K/V weights replicated over y, z
]
NAMES = {id(MHA): "mha", id(GQA): "gqa", id(MQA): "mqa"}


@pytest.mark.parametrize("cfg,phase,layout,attention,mesh,quantize,group", CASES,
                         ids=[f"{NAMES[id(c[0])]}-{c[1]}-{c[2]}-{c[3]}-{''.join(map(str, c[4]))}-"
                              f"{c[5] or 'f32'}" for c in CASES])
def test_hlo_collectives_match_cost_model(cfg, phase, layout, attention, mesh, quantize, group):
    result = _audit(cfg, phase, layout, attention, mesh, quantize, group,
                    kv="int8" if quantize == "int8" else None)
    for kind, ratio in result.ratios().items():
        assert ratio == pytest.approx(1.0, abs=0.02), (kind, result.rows())
    assert sum(result.measured.values()) > 0


def test_pallas_kernels_send_what_xla_sends():
    """The kernels run on each chip's shards: the interpreted Pallas step moves the same bytes."""
    args = (GQA, "decode", "2d-ws", "heads", (2, 2, 2))
    assert _audit(*args, backend="tpu-interpret").measured == _audit(*args).measured
    args = (GQA, "prefill", "wg-xy", "batch", (1, 2, 4))
    assert _audit(*args, backend="gpu-interpret").measured == _audit(*args).measured


def _layer_bytes(cfg, phase, layout, attention, mesh) -> dict[str, float]:
    """Bytes one decoder layer adds to the compiled step: (L + 1) layers minus L layers."""
    import dataclasses
    deeper = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1)
    one, two = (_audit(c, phase, layout, attention, mesh).measured for c in (cfg, deeper))
    return {k: two[k] - one[k] for k in audit.KINDS}


def test_audited_bytes_are_the_papers_formulas():
    """Independent of the cost model: §5.2 2D WS moves 2BL(E/X + F/(YZ)) per FFN, §6.2b the
    queries and attention outputs cross chips in two all-to-alls; (K-1)/K exact, 4-byte floats;
    the parallel block's one norm all-reduces its statistics over x (§7.1)."""
    X, Y, Z = 2, 2, 2
    n, E, F, N, Q = X * Y * Z, MQA.d_model, MQA.d_ff, MQA.n_heads, MQA.head_dim
    r = _layer_bytes(MQA, "decode", "2d-ws", "batch", (X, Y, Z))
    BL = B * 1
    a2a = 2 * BL * N * Q / n * 4 * (n - 1) / n
    assert r["all-to-all"] == pytest.approx(a2a)
    yz = Y * Z
    ffn_and_block = (BL * E / X * (yz - 1) / yz  # all-gather(yz) of the block input
                     + BL * F / yz * (X - 1) / X)  # all-gather(x) of the activated FFN hidden
    attn_out = BL * N * Q / yz * (X - 1) / X  # all-gather(x) of the attention output, §6.2 step 4
    assert r["all-gather"] == pytest.approx((ffn_and_block + attn_out) * 4)
    assert r["all-reduce"] == pytest.approx(2 * BL * 4 * (X - 1) / X)  # one RMS statistic
    assert r["collective-permute"] == 0


def test_weight_gathered_xyz_moves_weights_not_activations():
    """§5.3: XYZ weight-gathered has no activation collectives in a layer, only the weights'
    all-gather: every matrix from 1/8 to whole, the two norm scales (stored E_x) over x."""
    r = _layer_bytes(MHA, "prefill", "wg-xyz", "heads", (2, 2, 2))
    assert r["reduce-scatter"] == r["all-to-all"] == r["all-reduce"] == 0
    E, F, N, K, Q = MHA.d_model, MHA.d_ff, MHA.n_heads, MHA.n_kv_heads, MHA.head_dim
    matrices = E * Q * (2 * N + 2 * K) + 3 * E * F
    assert r["all-gather"] == pytest.approx(matrices * 4 * 7 / 8 + 2 * E * 4 / 2)


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
  %cp = f32[4]{0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_parser_convention_groups_and_trip_counts():
    """Per-chip bytes by the plan.py convention; while bodies counted once per iteration."""
    found = {c.kind: c for c in audit.parse_collectives(HLO)}
    ag, rs, ar, a2a, cp = (found[k] for k in audit.KINDS)
    assert (ag.group, ag.executions, ag.in_loop) == (4, 6, True)
    assert ag.bytes_per_chip == 64 * 3 / 4  # output bytes x (K-1)/K
    assert (rs.group, rs.payload_bytes) == (4, 64)  # input = K x output
    assert (ar.group, ar.in_loop) == (2, False)
    assert ar.bytes_per_chip == 2 * (16 + 16) * 1 / 2  # 2 x bytes x (K-1)/K, tuple summed
    assert a2a.bytes_per_chip == 64 * 7 / 8
    assert cp.bytes_per_chip == 16  # a collective-permute sends its operand
    totals = audit.bytes_by_kind(audit.parse_collectives(HLO))
    assert totals == {"all-gather": 6 * 48.0, "reduce-scatter": 6 * 48.0, "all-reduce": 32.0,
                      "all-to-all": 56.0, "collective-permute": 16.0}


def test_audit_errors_are_clear():
    with pytest.raises(audit.AuditError, match="replica groups"):
        audit.parse_collectives("ENTRY %m (a: f32[4]) -> f32[4] {\n"
                                "  %x = f32[4]{0} all-reduce(%a), channel_id=1, to_apply=%add\n}")


def test_cli_plan_collective_bytes_and_audit(tmp_path):
    """`jaxinfer plan --mesh --json` prices every collective kind of the whole step; `--audit`
    compiles that step and its bytes equal the priced ones."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "plan", "--model", "palm-8b", "--hardware", "tpu-v4",
         "--mesh", "2x2x2", "--batch", "16", "--phase", "decode", "--context", "512",
         "--layout", "2d-ws", "--attention", "batch", "--weights", "f32", "--audit", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    priced = result["collective_bytes_per_chip"]
    assert list(priced) == list(audit.KINDS) and priced["all-to-all"] > 0
    rows = result["audit"]
    assert [r["kind"] for r in rows] == list(audit.KINDS)
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=0.02), r
        assert r["predicted_bytes"] == pytest.approx(priced[r["kind"]])
