"""The efficiency model on top of the roofline (issue 16 items 1, 2, 4; pope2022.md sections
cited per test)."""

import dataclasses
import json

import pytest

from jaxinfer.cli import main
from partitioning.cost_model import Collective, Workload
from partitioning.efficiency import (collective_seconds, collective_term, expected_time,
                                     matmul_efficiency)
from partitioning.efficiency_fit import BOUNDS, fit, paper_points, point_terms, predict
from partitioning.hardware import FIT_FIELDS, EfficiencyParams, get_hardware
from partitioning.mesh import MeshShape, paper_mesh_shape
from partitioning.plan import PhasePlan
from partitioning.planner import plan_phase
from partitioning.presets import NOMINAL_PARAMS, PRESETS

V4 = get_hardware("tpu-v4")
FITTED = V4.efficiency


def _params(**kw) -> EfficiencyParams:
    return dataclasses.replace(FITTED, **kw)


def test_matmul_efficiency_rises_with_tokens_and_stays_below_peak():
    ms = [1, 4, 16, 64, 256, 1024, 4096, 16384, 1 << 20]
    effs = [matmul_efficiency(m, FITTED) for m in ms]
    assert effs == sorted(effs) and len(set(effs)) == len(effs)
    assert all(0 < e <= FITTED.matmul_peak_fraction <= 1 for e in effs)
    assert effs[0] < 0.1 and effs[-1] > 0.99 * FITTED.matmul_peak_fraction
    half = matmul_efficiency(FITTED.matmul_half_tokens, FITTED)
    assert half == pytest.approx(FITTED.matmul_peak_fraction / 2)
    with pytest.raises(ValueError, match="tokens_per_chip must be positive"):
        matmul_efficiency(0, FITTED)


@pytest.mark.parametrize("field, value, message", [
    ("link_fraction", 1.5, r"link_fraction must be in \(0, 1\], got 1.5"),
    ("hbm_fraction", 0.0, r"hbm_fraction must be in \(0, 1\]"),
    ("hop_latency_s", -1e-6, "hop_latency_s must be finite and >= 0, got -1e-06"),
    ("comm_overlap", 1.2, r"comm_overlap must be in \[0, 1\]"),
    ("attention_fraction", -0.1, r"attention_fraction must be in \[0, 1\]"),
    ("kv_fraction", 1.5, r"kv_fraction must be in \[0, 1\]"),
])
def test_efficiency_params_reject_implausible_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        _params(**{field: value})


def test_collective_is_latency_plus_bytes_over_achievable_bandwidth():
    """§4.3 volumes over the torus interconnect, 270 GB/s (§2.1), halved without wrap-around
    (§2.2)."""
    params = _params(link_fraction=0.5, collective_latency_s=2e-6, hop_latency_s=1e-6)
    c = Collective("all-gather", ("y", "z"), 16, 1e6, 2.0, "block input BLE", torus_steps=6,
                   count=3)
    cube = PhasePlan("decode", "2d-ws", "batch", MeshShape(4, 4, 4))
    payload, latency = collective_seconds(collective_term(c, cube, V4), params)
    assert payload == pytest.approx(3 * 2e6 * 15 / 16 / (0.5 * 270e9))
    assert latency == pytest.approx(3 * (2e-6 + 6 * 1e-6))
    x = Collective("reduce-scatter", ("x",), 2, 1e6, 2.0, "t", torus_steps=1)
    no_wrap = PhasePlan("decode", "2d-ws", "batch", MeshShape(2, 4, 8))
    assert collective_seconds(collective_term(x, no_wrap, V4), params)[0] == pytest.approx(
        2e6 / 2 / (0.5 * 135e9))
    a2a = dataclasses.replace(c, kind="all-to-all", count=1)
    assert collective_seconds(collective_term(a2a, cube, V4), params)[0] == pytest.approx(
        payload / 3 / 4)  # scaling book: an all-to-all ~1/4 of an all-gather (§4.3)
    dcn = dataclasses.replace(c, dcn_group=2, count=1)
    term = collective_term(dcn, cube, V4)
    assert term.dcn_s == pytest.approx(2e6 / 2 / V4.dcn_bw)
    assert term.link_s == pytest.approx(1e6 * 7 / 8 / 270e9)


def _decode(attention="batch", batch=64, weight_bytes=1.0):
    return (PRESETS["palm-540b"], PhasePlan("decode", "2d-ws", attention, MeshShape(4, 4, 4)),
            Workload(batch, 1, 2048, weight_bytes), V4)


def test_overlap_model_adds_and_overlaps_the_documented_terms():
    for overlap in (0.0, 0.5, 1.0):
        x = expected_time(*_decode(), params=_params(comm_overlap=overlap))
        assert x.concurrent_s == pytest.approx(max(x.matmul_s, x.weight_load_s,
                                                   x.weight_gather_s + x.comm_hidden_s))
        assert x.step_s == pytest.approx(x.concurrent_s + x.comm_exposed_s + x.latency_s
                                         + x.kv_load_s + x.overhead_s)
    none = expected_time(*_decode(), params=_params(comm_overlap=0.0))
    full = expected_time(*_decode(), params=_params(comm_overlap=1.0))
    assert none.comm_hidden_s == 0 and full.comm_hidden_s > 0
    assert full.comm_exposed_s > 0  # the all-to-alls of batch-sharded attention always add
    heads = expected_time(*_decode("heads"), params=_params(comm_overlap=1.0))
    assert heads.comm_exposed_s == 0 and heads.kv_load_s > 10 * full.kv_load_s  # §6.3
    prefill = expected_time(PRESETS["palm-540b"],
                            PhasePlan("prefill", "wg-xyz", "batch", MeshShape(4, 4, 4)),
                            Workload(512, 2048, 2048, 2.0), V4)
    assert 0 < prefill.weight_gather_s < prefill.matmul_s  # gathered a layer ahead (§5.3)
    assert prefill.concurrent_s == prefill.matmul_s and prefill.comm_exposed_s == 0
    assert prefill.step_s > prefill.roofline_s


def test_attention_fraction_prices_only_attention_flops():
    """An unfused attention (XLA:CPU) runs at its own fraction of peak; the projections stay on
    the matmul curve. 0 (the fitted TPU profiles): attention on the matmul curve too."""
    cfg = PRESETS["palm-62b"]
    plan = PhasePlan("prefill", "1d-ws", "heads", MeshShape(1, 1, 16))
    wl = Workload(1, 2048, 2048, 2.0)
    fused = expected_time(cfg, plan, wl, V4, params=_params(attention_fraction=0.0))
    slow = expected_time(cfg, plan, wl, V4, params=_params(attention_fraction=0.1))
    attention_s = (4 * cfg.n_layers * 2048 * 2048 * cfg.n_heads * cfg.head_dim / 16
                   / V4.peak_flops_bf16)
    eff = matmul_efficiency(2048, FITTED)
    assert fused.matmul_s == pytest.approx(fused.roofline.compute_s / eff)
    assert slow.matmul_s - fused.matmul_s == pytest.approx(attention_s / 0.1 - attention_s / eff)
    short = expected_time(cfg, plan, Workload(1, 128, 128, 2.0), V4,
                          params=_params(attention_fraction=0.1))
    short_fused = expected_time(cfg, plan, Workload(1, 128, 128, 2.0), V4)
    # attention grows with T x S: what it adds shrinks faster than the step for short prompts
    assert (short.step_s / short_fused.step_s) < (slow.step_s / fused.step_s)


def test_kv_fraction_prices_only_the_kv_cache_reads():
    base = expected_time(*_decode("heads"))
    slow = expected_time(*_decode("heads"), params=_params(kv_fraction=0.25))
    assert base.kv_load_s == pytest.approx(base.roofline.kv_load_s / FITTED.hbm_fraction)
    assert slow.kv_load_s == pytest.approx(base.roofline.kv_load_s / 0.25)
    assert slow.weight_load_s == base.weight_load_s and slow.matmul_s == base.matmul_s
    assert slow.step_s - base.step_s == pytest.approx(slow.kv_load_s - base.kv_load_s)


def test_weight_precision_and_hbm_fraction():
    """§7.3: int8 halves the weight bytes; the weight read runs at hbm_fraction of 1.2 TB/s."""
    int8 = expected_time(*_decode(weight_bytes=1.0))
    bf16 = expected_time(*_decode(weight_bytes=2.0))
    # int8 halves the matrices; the (tied) embedding table stays in the activations' float
    table = PRESETS["palm-540b"].vocab_size * PRESETS["palm-540b"].d_model * 2.0 / 64
    table_s = table / (V4.hbm_bw * FITTED.hbm_fraction)
    assert bf16.weight_load_s == pytest.approx(2 * (int8.weight_load_s - table_s) + table_s)
    assert int8.weight_load_s == pytest.approx(int8.roofline.weight_load_s / FITTED.hbm_fraction)
    assert bf16.step_s > int8.step_s


def test_fit_reproduces_the_stored_values_within_bounds():
    params, rms = fit(V4)
    for f in FIT_FIELDS:
        lo, hi = BOUNDS[f]
        assert lo <= getattr(params, f) <= hi and lo <= getattr(FITTED, f) <= hi
        assert getattr(params, f) == pytest.approx(getattr(FITTED, f), rel=0.05, abs=1e-7), f
    assert params.matmul_peak_fraction <= 1 and params.link_fraction <= 1
    assert rms < 0.05
    for p in paper_points():
        if p.fitted:
            terms = point_terms(p, V4)
            assert predict(terms, params)[0] == pytest.approx(predict(terms, FITTED)[0],
                                                              rel=0.01)


TARGET = {"§10.1 Table 2": 0.15, "§10.2 Table 3": 0.15, "§6.7": 0.20}


def test_stored_fit_meets_the_issue_targets_and_improves_on_the_roofline():
    checked = 0
    for p in paper_points():
        if not p.fitted or p.source not in TARGET:
            continue
        expected, roofline = predict(point_terms(p, V4), FITTED)
        assert abs(expected / p.published_s - 1) <= TARGET[p.source], p.name
        assert abs(expected - p.published_s) < abs(roofline - p.published_s), p.name
        checked += 1
    assert checked == 16  # Tables 2-3 (8) and Figure 8's multiquery lines (8)


def _best(model, phase, chips, batch, weight_bytes, meshes=None):
    wl = Workload(batch, 2048 if phase == "prefill" else 1, 2048, weight_bytes)
    return plan_phase(PRESETS[model], phase, chips, wl, V4, meshes=meshes,
                      nominal_params=NOMINAL_PARAMS[model])


@pytest.mark.parametrize("model, phase, chips, batch, weight_bytes, layout", [
    ("palm-540b", "prefill", 64, 1, 1.0, "2d-ws/heads"),   # Table 2 (§10.1)
    ("palm-540b", "prefill", 64, 512, 2.0, "wg-xyz/batch"),
    ("palm-540b", "decode", 64, 512, 2.0, "2d-ws/batch"),
    ("palm-62b", "prefill", 16, 1, 1.0, "2d-ws/heads"),    # Table 3 (§10.2)
    ("palm-62b", "prefill", 32, 512, 2.0, "wg-xyz/batch"),
])
def test_planner_reproduces_the_tables_layouts(model, phase, chips, batch, weight_bytes, layout):
    best = _best(model, phase, chips, batch, weight_bytes, [paper_mesh_shape(chips)]).best
    assert f"{best.plan.layout}/{best.plan.attention}" == layout
    assert best.expected.step_s >= best.estimate.step_time_s


def test_small_batch_int8_decode_on_540b_picks_2d_as_table_2():
    """Table 2's int8 decode at batch 64 uses 2D WS, and so does the planner: 1D WS would make
    every one of the 64 chips read and multiply the whole (replicated, multiquery) K/V
    projections, 2D only their x shard; 2D's extra collectives nearly offset that (within 2%)."""
    cfg, mesh = PRESETS["palm-540b"], paper_mesh_shape(64)
    wl = Workload(64, 1, 2048, 1.0)
    one, two = (expected_time(cfg, PhasePlan("decode", layout, "batch", mesh), wl, V4)
                for layout in ("1d-ws", "2d-ws"))
    assert two.step_s < one.step_s < 1.02 * two.step_s
    assert one.weight_load_s > two.weight_load_s and two.latency_s > one.latency_s
    best = _best("palm-540b", "decode", 64, 64, 1.0, [mesh]).best
    assert (best.plan.layout, best.plan.attention) == ("2d-ws", "batch")


def test_small_batch_int8_decode_on_62b_prefers_1d_by_collective_latency():
    """Table 3 decodes int8 at batch 32 with 2D WS; the model ranks 1D WS first, 2D WS within
    10%. At this batch the step is latency-bound (int8 weights load fast): 2D WS runs more
    collectives per layer than 1D (x-axis reduce-scatters and all-gathers, and the norm
    statistics' all-reduce over x), each paying its latency and torus hops, and its logits
    take a reduce-scatter over x before the vocab all-gather. Disagreement explained, not
    hidden (issue 16 item 4)."""
    cfg, mesh = PRESETS["palm-62b"], paper_mesh_shape(16)
    wl = Workload(32, 1, 2048, 1.0)
    one, two = (expected_time(cfg, PhasePlan("decode", layout, "batch", mesh), wl, V4)
                for layout in ("1d-ws", "2d-ws"))
    assert one.step_s < two.step_s < 1.10 * one.step_s
    assert two.latency_s > one.latency_s
    best = _best("palm-62b", "decode", 16, 32, 1.0, [mesh]).best
    assert (best.plan.layout, best.plan.attention) == ("1d-ws", "batch")


def test_high_throughput_prefill_gathers_over_all_axes_on_any_mesh():
    """Table 2's WG-XYZ at 512 x 2048 on 64 chips; the roofline ranks WG-XY first (its additive
    weight gathers), the expected time hides them under the matmuls (§5.3, §7.2)."""
    result = _best("palm-540b", "prefill", 64, 512, 2.0)
    assert (result.best.plan.layout, result.best.plan.attention) == ("wg-xyz", "batch")
    cube = [MeshShape(4, 4, 4)]
    xy = _best("palm-540b", "prefill", 64, 512, 2.0, cube)
    by_layout = {c.plan.layout: c for c in (xy.best,) + xy.runners_up}
    assert by_layout["wg-xy"].estimate.step_time_s < by_layout["wg-xyz"].estimate.step_time_s
    assert by_layout["wg-xyz"].expected.step_s < by_layout["wg-xy"].expected.step_s


def test_eight_chip_decode_disagrees_with_table3_as_section_5_2_predicts():
    """Table 3 decodes PaLM 62B on 8 chips with 2D WS; §5.2: 2D WS is more communication-
    efficient only when n > 16 (for F = 4E). On 2x2x2 the model picks 1D WS, 2D within 15%."""
    result = _best("palm-62b", "decode", 8, 512, 2.0, [MeshShape(2, 2, 2)])
    assert result.best.plan.layout == "1d-ws"
    two_d = next(c for c in result.runners_up if c.plan.layout == "2d-ws")
    assert 1.0 < two_d.expected.step_s / result.best.expected.step_s < 1.15
    assert two_d.expected.comm_exposed_s > result.best.expected.comm_exposed_s


def test_plan_reports_roofline_and_expected(capsys):
    assert main(["plan", "--model", "palm-540b", "--hardware", "tpu-v4", "--chips", "64",
                 "--context", "2048", "--batch", "64", "--phase", "decode", "--weights", "int8",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expected_step_s"] > out["roofline_step_s"] == out["step_time_s"]
    assert out["expected_step_s"] * 64 == pytest.approx(1.82, rel=0.15)  # Table 2 (§10.1)
    assert set(out["expected_breakdown"]) >= {"matmul_s", "kv_load_s", "latency_s"}
