"""Predicted vs measured step times on this machine (issue 16 item 3).

Each `Case` is a step jaxinfer really runs (`Model.generate`: the prefill program, or one step
of the decode loop) and the same workload priced by `partitioning.efficiency.expected_time` on
the calibrated ``cpu`` profile (`partitioning.hardware.cpu_profile` for the devices it runs on).
``scripts/validate_cost_model.py`` prints the full table; ``tests/test_calibration.py`` runs a
small version.

Measurement: float32 weights, activations and cache (what `jaxinfer bench` runs on CPU). A
decode step is the difference of two `generate` calls in one output bucket over the difference
of their steps (`calibrate.decode_step_seconds`: prefill, first-token sampling and host
transfers cancel); a prefill is `generate`'s ``prefill_s`` with one new token. Both take the best
of several repeats after a warm-up. The priced workload is the bucketed batch and prompt, and
for decode the cache as the loop holds it: prompt bucket + output bucket positions (the XLA
attention reads all of them, masked).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from jaxinfer.config import ModelConfig
from partitioning.calibrate_collectives import host_devices_env
from partitioning.cost_model import Workload
from partitioning.efficiency import ExpectedStep, expected_time
from partitioning.mesh import MeshShape
from partitioning.plan import PhasePlan, Plan

TOLERANCE = 0.25
"""A prediction within +-25% of the measurement passes."""
DECODE_STEPS = (33, 64)
"""New-token counts of the two `generate` calls a decode step is the difference of (one
output bucket, 64): 31 steps apart, so a burst of slowness on a shared machine weighs half as
much as over 15."""


def bench_config(n_heads: int = 12) -> ModelConfig:
    """The 125M bench model (`jaxinfer.bench.BENCH_SHAPE`, a Llama); `n_heads` other than 12
    keeps d_model by narrowing the heads (16 x 48: the 8-device weight-stationary layouts need
    the heads divisible by 8, which 12 is not)."""
    from jaxinfer.bench import BENCH_SHAPE

    s = BENCH_SHAPE
    return ModelConfig(
        name="bench-125m" if n_heads == 12 else f"bench-125m-{n_heads}h",
        vocab_size=s["vocab_size"], d_model=s["hidden_size"], n_layers=s["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=s["num_key_value_heads"],
        head_dim=s["hidden_size"] // n_heads, d_ff=s["intermediate_size"],
        max_context=s["max_position_embeddings"])


@dataclasses.dataclass(frozen=True)
class Case:
    """One step to measure and predict."""

    name: str
    phase: str
    """'decode' or 'prefill'."""
    batch: int
    prompt_len: int
    layout: str = "1d-ws"
    attention: str = "heads"
    mesh: tuple[int, int, int] = (1, 1, 1)
    n_heads: int = 12
    """Of `bench_config` (ignored when a config is given to `run_cases`)."""

    def phase_plan(self, phase: str | None = None) -> PhasePlan:
        return PhasePlan(phase or self.phase, self.layout, self.attention, MeshShape(*self.mesh))

    def plan(self) -> Plan | None:
        if MeshShape(*self.mesh).n == 1:
            return None
        return Plan(self.phase_plan("prefill"), self.phase_plan("decode"))


@dataclasses.dataclass(frozen=True)
class Row:
    """A case's measurement and prediction."""

    name: str
    devices: int
    measured_s: float
    expected_s: float
    roofline_s: float
    bound: str
    workload: dict
    start_expected_s: float | None = None
    """With a calibration per row (`run_cases`' `recalibrate`): the prediction from the run's
    first calibration alone."""

    @property
    def ratio(self) -> float:
        """Predicted (expected) / measured."""
        return self.expected_s / self.measured_s

    @property
    def within(self) -> bool:
        return abs(self.ratio - 1) <= TOLERANCE

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), ratio=self.ratio, within=self.within)


def single_device_cases(decode_batches=(1, 8, 32), prefill_lens=(128, 512),
                        decode_prompt: int = 128) -> list[Case]:
    """The bench model on one device: decode steps and one-sequence prefills."""
    return ([Case(f"decode b={b}", "decode", b, decode_prompt) for b in decode_batches]
            + [Case(f"prefill {t} tokens", "prefill", 1, t) for t in prefill_lens])


MESH_CASES = (
    Case("decode b=8, 1d-ws/heads 1x1x8", "decode", 8, 128, "1d-ws", "heads", (1, 1, 8), 16),
    Case("decode b=8, 2d-ws/heads 2x2x2", "decode", 8, 128, "2d-ws", "heads", (2, 2, 2), 16),
    Case("decode b=8, 1d-ws/batch 1x1x8", "decode", 8, 128, "1d-ws", "batch", (1, 1, 8), 16),
)
"""Three layouts on 8 host devices: 1D weight-stationary (activation all-gathers and
reduce-scatters of every block), 2D weight-stationary (more, smaller collectives over x and
y*z) and 1D with batch-sharded attention (all-to-alls around attention, §6.2)."""


def _workload(case: Case, model, steps) -> tuple[Workload, int]:
    """(the priced workload, cache positions) of the bucketed step `generate` runs."""
    from jaxinfer.generate import MIN_OUTPUT_BUCKET, bucket

    gen = model._generator
    batch, prompt = gen.batch_bucket(case.batch), gen.prompt_bucket(case.prompt_len)
    if case.phase == "prefill":
        return Workload(batch, prompt, prompt, 4.0, 4.0, 4.0), prompt
    context = prompt + bucket(steps[1], MIN_OUTPUT_BUCKET)
    return Workload(batch, 1, context, 4.0, 4.0, 4.0), context


def measure_case(case: Case, model, steps=DECODE_STEPS, repeats: int = 3) -> float:
    """Seconds of the case's step with jaxinfer's programs (module docstring)."""
    import numpy as np

    from partitioning.calibrate import decode_step_seconds

    if case.phase == "decode":
        return decode_step_seconds(model, case.batch, case.prompt_len, steps, repeats)[0]
    prompts = np.random.default_rng(0).integers(
        3, model.config.vocab_size, size=(case.batch, case.prompt_len)).tolist()
    run = lambda: model.generate(prompts, max_new_tokens=1, stop_tokens=[],
                                 temperature=0.0).timings["prefill_s"]
    run()
    return min(run() for _ in range(repeats))


def predict(cfg: ModelConfig, case: Case, wl: Workload, calibration: dict) -> ExpectedStep:
    from partitioning.hardware import cpu_profile

    hw = cpu_profile(calibration, MeshShape(*case.mesh).n)
    return expected_time(cfg, case.phase_plan(), wl, hw)


def run_cases(cases, calibration: dict, cfg: ModelConfig | None = None, steps=DECODE_STEPS,
              repeats: int = 3, progress=None, recalibrate=None) -> list[Row]:
    """Measure and predict every case in this process (which needs the cases' devices).
    `recalibrate` (optional, no arguments): called just before each case's measurement for the
    calibration that prices it (a shared machine's speed drifts over minutes); `calibration`
    then prices `Row.start_expected_s`."""
    from jaxinfer.api import Model

    rows, models = [], {}
    for case in cases:
        config = cfg or bench_config(case.n_heads)
        key = (config, case.plan())
        if key not in models:
            models.clear()  # one model's weights at a time
            models[key] = Model.random(config, plan=case.plan())
        model = models[key]
        row_calibration = recalibrate() if recalibrate else calibration
        measured = measure_case(case, model, steps, repeats)
        wl, context = _workload(case, model, steps)
        x = predict(config, case, wl, row_calibration)
        start = predict(config, case, wl, calibration).step_s if recalibrate else None
        rows.append(Row(case.name, MeshShape(*case.mesh).n, measured, x.step_s, x.roofline_s,
                        x.bound, dict(model=config.name, batch=wl.batch, tokens=wl.tokens,
                                      context=context, layout=case.layout,
                                      attention=case.attention, mesh=list(case.mesh)), start))
        if progress:
            progress(rows[-1])
    return rows


def run_cases_on_devices(cases, calibration_file: str, devices: int, steps=DECODE_STEPS,
                         repeats: int = 3, timeout_s: float = 1800,
                         recalibrate=None) -> list[Row]:
    """`run_cases` in a subprocess with `devices` simulated host devices; with `recalibrate`
    (as `run_cases`, called in this process), one subprocess per case, each priced with the
    calibration taken just before it starts."""
    if recalibrate is None:
        return _run_in_subprocess(cases, calibration_file, None, devices, steps, repeats,
                                  timeout_s)
    from partitioning import calibrate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            path = calibrate.save(recalibrate(), os.path.join(tmp, f"row{i}.json"))
            rows += _run_in_subprocess([case], calibration_file, path, devices, steps, repeats,
                                       timeout_s)
    return rows


def _run_in_subprocess(cases, calibration_file, row_calibration_file, devices, steps, repeats,
                       timeout_s) -> list[Row]:
    env = host_devices_env(devices)
    spec = json.dumps({"cases": [dataclasses.asdict(c) for c in cases], "steps": list(steps),
                       "repeats": repeats, "calibration": calibration_file,
                       "row_calibration": row_calibration_file})
    proc = subprocess.run([sys.executable, "-m", "partitioning.measured", spec], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"the {devices}-device measurements failed:\n{proc.stderr[-3000:]}")
    return [Row(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _subprocess_main(spec: str) -> None:
    from partitioning import calibrate

    spec = json.loads(spec)
    cases = [Case(**dict(c, mesh=tuple(c["mesh"]))) for c in spec["cases"]]
    row_file = spec["row_calibration"]
    rows = run_cases(cases, calibrate.load(spec["calibration"]), steps=tuple(spec["steps"]),
                     repeats=spec["repeats"],
                     recalibrate=(lambda: calibrate.load(row_file)) if row_file else None,
                     progress=lambda r: print(f"{r.name}: {r.measured_s * 1e3:.1f} ms",
                                              file=sys.stderr, flush=True))
    print(json.dumps([{k: v for k, v in r.to_json().items() if k not in ("ratio", "within")}
                      for r in rows]))


if __name__ == "__main__":
    _subprocess_main(sys.argv[1])
