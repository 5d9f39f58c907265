"""Predicted vs measured step times on this machine: the cost model's ``cpu`` profile (issue 16).

    python scripts/validate_cost_model.py [--calibration FILE] [--save-calibration FILE]
                                          [--rows all|single|mesh] [--repeats 5] [--json]
                                          [--no-calibrate-each-row]

Calibrates this machine (`partitioning.calibrate.measure`, as `jaxinfer calibrate`; or loads
``--calibration FILE``), then measures with jaxinfer's own programs and prices with
`partitioning.efficiency.expected_time` (`partitioning.measured`):

- the decode step of the 125M bench model at batch 1, 8 and 32 on one device;
- its prefill of 128 and 512 tokens (one sequence) on one device;
- the decode step at batch 8 under three plans on 8 simulated host devices (a subprocess with
  ``--xla_force_host_platform_device_count=8``): 1d-ws/heads, 2d-ws/heads and 1d-ws/batch, on the
  bench model with 16 heads of 48 (12 heads do not divide over 8 devices in any
  weight-stationary layout).

Before each row the one-device terms (`calibrate.measure_local`: matmul curve, bandwidth, attention
and KV fractions, fixed costs) are measured again, and the row is priced with the median of every
calibration taken so far in the run (`calibrate.median_of`; the collectives from the first). On
a shared VM one calibration can catch a slow or fast spell (the calibrated peak ranged over
175-292 GFLOP/s in one session, and a run's first calibration measured half the weight-streaming
bandwidth of the next): the median does not follow one spell. The "vs start" column is the ratio
with the first calibration alone (``--no-calibrate-each-row``: that one prices every row).

Prints one table (measured, expected, roofline, ratio, within ±25%?) and exits 1 if a row misses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioning import calibrate, measured  # noqa: E402


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def print_table(rows, calibration: dict, elapsed_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"Cost model on this machine: {calibration['machine']}, jax "
             f"{calibration.get('jax', '?')}, float32, load average {_load_average()}")
    t = Table(title=title)
    for col in ("row", "devices", "measured ms", "expected ms", "roofline ms", "ratio",
                "±25%", "vs start", "expected bound"):
        t.add_column(col, justify="left" if col in ("row", "expected bound") else "right")
    for r in rows:
        t.add_row(r.name, str(r.devices), f"{r.measured_s * 1e3:.1f}",
                  f"{r.expected_s * 1e3:.1f}", f"{r.roofline_s * 1e3:.1f}", f"{r.ratio:.2f}",
                  "yes" if r.within else "NO", _start_ratio(r), r.bound)
    console = Console(width=150)
    console.print(t)
    console.print(calibration_summary(calibration))
    console.print(f"{sum(r.within for r in rows)}/{len(rows)} rows within ±25%; "
                  f"{elapsed_s:.0f} s in all")


def _start_ratio(r) -> str:
    return "-" if r.start_expected_s is None else f"{r.start_expected_s / r.measured_s:.2f}"


def calibration_summary(c: dict) -> str:
    coll = c["collectives"]
    return (f"calibration ({c['calibration_s']:.0f} s): peak {c['matmul_flops'] / 1e9:.0f} "
            f"GFLOP/s, matmul_peak_fraction {c['matmul_peak_fraction']:.3f}, "
            f"matmul_half_tokens {c['matmul_half_tokens']:.1f}, matvec_fraction "
            f"{c['matvec_fraction']:.3f}, attention_fraction {c['attention_fraction']:.3f}, "
            f"kv_fraction {c['kv_fraction']:.3f}, "
            f"memory {c['memory_bw'] / 1e9:.1f} GB/s "
            f"(plain sum {c['sum_bw'] / 1e9:.1f}), layer overhead "
            f"{c['layer_overhead_s'] * 1e6:.0f} µs, step overhead "
            f"{c['step_overhead_s'] * 1e6:.0f} µs, collectives on {coll['devices']} devices: "
            f"latency {coll['latency_s'] * 1e6:.0f} µs + {coll['hop_latency_s'] * 1e6:.0f} µs "
            f"per device, {coll['bandwidth'] / 1e9:.2f} GB/s per device")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", default=None, help="a calibration JSON to use (default: "
                    "calibrate now)")
    ap.add_argument("--save-calibration", default=None, help="write the calibration here")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (rows, calibration, machine) instead of the table")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed repeats per measurement (the best counts: the machine is shared)")
    ap.add_argument("--rows", choices=("all", "single", "mesh"), default="all",
                    help="the one-device rows, the 8-device rows, or both")
    ap.add_argument("--calibrate-each-row", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the one-device terms again before each row and price it "
                    "with the median of the run's calibrations so far (module docstring)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    cal = calibrate.load(args.calibration) if args.calibration else calibrate.measure()
    if args.save_calibration:
        calibrate.save(cal, args.save_calibration)
    print(calibration_summary(cal), file=sys.stderr, flush=True)
    show = lambda r: print(f"{r.name}: measured {r.measured_s * 1e3:.1f} ms, expected "
                           f"{r.expected_s * 1e3:.1f} ms (vs start {_start_ratio(r)})",
                           file=sys.stderr, flush=True)
    taken = [cal]

    def median_so_far() -> dict:
        taken.append({**cal, **calibrate.measure_local()})
        return calibrate.median_of(taken)

    recalibrate = median_so_far if args.calibrate_each_row else None

    rows = []
    if args.rows in ("all", "single"):
        rows += measured.run_cases(measured.single_device_cases(), cal, repeats=args.repeats,
                                   progress=show, recalibrate=recalibrate)
    if args.rows in ("all", "mesh"):
        with tempfile.TemporaryDirectory() as tmp:
            path = calibrate.save(cal, os.path.join(tmp, "calibration.json"))
            mesh_rows = measured.run_cases_on_devices(measured.MESH_CASES, path, 8,
                                                      repeats=args.repeats,
                                                      recalibrate=recalibrate)
        for r in mesh_rows:
            show(r)
        rows += mesh_rows
    if args.json:
        print(json.dumps({"machine": cal["machine"], "platform": platform.platform(),
                          "load_average": _load_average(), "elapsed_s": time.perf_counter()
                          - started, "rows": [r.to_json() for r in rows], "calibration": cal,
                          "row_calibrations": taken[1:]},
                         indent=2))
    else:
        print_table(rows, cal, time.perf_counter() - started)
    return 0 if all(r.within for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
