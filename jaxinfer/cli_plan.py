"""`jaxinfer plan` and `jaxinfer calibrate`: the planner's command line.

Composes `partitioning` (cost model, planner, audit) with jaxinfer's checkpoints and programs:
``--audit`` compiles the chosen step with `jaxinfer.api.compiled_hlo` (the program `generate`
runs) and compares its collectives with the priced ones.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp

from jaxinfer import api, checkpoint
from jaxinfer.config import ModelConfig
from jaxinfer import engine_planner
from partitioning import audit as audit_lib
from partitioning import calibrate
from partitioning.cost_model import WEIGHT_BYTES, Workload
from partitioning.hardware import get_hardware
from partitioning.mesh import MeshShape, make_mesh
from partitioning.plan import ATTENTION, LAYOUTS, Plan, PhasePlan
from partitioning.planner import plan_phase
from partitioning.presets import NOMINAL_PARAMS, PRESETS


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose a partitioning with the analytical cost model")
    p.add_argument("--model", required=True,
                   help=f"preset ({', '.join(PRESETS)}) or checkpoint directory")
    p.add_argument("--hardware", required=True, help="tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, "
                   "a100-80gb, h100-sxm, h200 or cpu (measured by `jaxinfer calibrate`)")
    p.add_argument("--chips", type=int, default=None,
                   help="chips to plan over (every mesh factorization is priced); or --mesh")
    p.add_argument("--mesh", default=None, metavar="XxYxZ",
                   help="price only this mesh, e.g. 2x2x2 (its product is the chip count)")
    p.add_argument("--granules", type=int, default=None,
                   help="hosts or TPU slices the chips span, joined by the data-center network "
                   "(default: 1 on TPU, one per 8-GPU NVLink node on GPU)")
    p.add_argument("--batch", type=int, default=None, help="one phase: sequences per step")
    p.add_argument("--phase", choices=["prefill", "decode"], default=None,
                   help="one phase to plan (required without --workload)")
    p.add_argument("--context", type=int, default=None,
                   help="decode: tokens in the KV cache; prefill: default prompt length")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens per sequence")
    p.add_argument("--weights", choices=list(WEIGHT_BYTES), default=None,
                   help="weight dtype (default: a checkpoint's own, else bf16)")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="evaluate only this layout")
    p.add_argument("--attention", choices=ATTENTION, default=None)
    p.add_argument("--latency-target-ms", type=float, default=None,
                   help="minimise cost per token among plans at most this slow")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--audit", action="store_true",
                   help="also compile the best plan's step (exactly what generate runs) on this "
                   "machine's devices and compare its HLO collectives with the priced bytes")
    engine_planner.add_arguments(p)
    p.set_defaults(handler=run_plan)


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine for the 'cpu' hardware profile")
    p.add_argument("--json", action="store_true")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated host devices to measure collectives across (a subprocess)")
    p.set_defaults(handler=run_calibrate)


def _positive(name: str, value) -> int:
    if value is None or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return value


def _workload(args, cfg: ModelConfig) -> Workload:
    _positive("batch", args.batch)
    _positive("context", args.context)
    if args.prompt_len is not None:
        _positive("prompt_len", args.prompt_len)
    size = WEIGHT_BYTES[args.weights]
    act = 4.0 if args.weights == "f32" else 2.0
    if args.phase == "decode":
        return Workload(args.batch, 1, args.context, size, act, act)
    prompt = args.prompt_len or args.context
    if prompt > args.context:
        raise ValueError(f"--prompt-len must be in [1, --context={args.context}], got {prompt}")
    return Workload(args.batch, prompt, prompt, size, act, act)


def _resolve_model(name: str) -> tuple[ModelConfig, str]:
    """(config, default --weights) of a preset or a checkpoint directory (no weights read)."""
    if name in PRESETS:
        return PRESETS[name], "bf16"
    if os.path.isdir(name):
        return checkpoint.read_config(name), _checkpoint_weights(name)
    raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) nor a "
                     "checkpoint directory")


def _checkpoint_weights(path: str) -> str:
    """The --weights a checkpoint holds: its quantization, else its float dtype."""
    names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    if checkpoint.is_jaxinfer_checkpoint(path):
        quantized = checkpoint.read_quantization(path)
        if quantized is not None:
            return f"int{quantized['bits']}"
        with open(os.path.join(path, checkpoint.JAXINFER_META)) as fh:
            dtypes = json.load(fh).get("dtypes", [])
        floats = [names[d] for d in dtypes if d in names]
        return floats[0] if floats else "f32"
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    return names.get(hf.get("torch_dtype") or hf.get("dtype"), "f32")


def _meshes(args):
    """(chips, meshes to price or None)."""
    if args.mesh is None:
        return _positive("chips", args.chips), None
    try:
        sizes = tuple(int(v) for v in args.mesh.lower().split("x"))
        shape = MeshShape(*sizes)
    except (ValueError, TypeError):
        raise ValueError(f"--mesh must be XxYxZ with positive integers, got {args.mesh!r}") \
            from None
    if len(sizes) != 3:
        raise ValueError(f"--mesh must be XxYxZ (three axes), got {args.mesh!r}")
    if args.chips is not None and args.chips != shape.n:
        raise ValueError(f"--chips {args.chips} disagrees with --mesh {args.mesh} ({shape.n} "
                         "chips)")
    return shape.n, [shape]


def plan_to_json(best, hw_name: str, cfg: ModelConfig | None = None,
                 wl: Workload | None = None) -> dict:
    e, p = best.estimate, best.plan
    priced = {} if cfg is None else {
        "collective_bytes_per_chip": audit_lib.priced_bytes(cfg, p, wl)}
    return {"layout": p.layout, "attention": p.attention, "mesh": p.mesh.as_dict(),
            "dcn": dict(zip(("x", "y", "z"), p.mesh.dcn)),
            "hardware": hw_name, "step_time_s": e.step_time_s, "mfu": e.mfu,
            "cost_chip_s_per_token": e.cost_chip_s_per_token,
            "memory_per_chip_bytes": e.memory_per_chip_bytes, "fits": e.fits, "bound": e.bound,
            "breakdown": e.breakdown(), **_expected_json(best), **priced}


def _expected_json(best) -> dict:
    """The roofline and the expected time side by side (`partitioning.efficiency`)."""
    x = best.expected
    if x is None:
        return {}
    return {"roofline_step_s": x.roofline_s, "expected_step_s": x.step_s,
            "expected_mfu": x.mfu, "expected_cost_chip_s_per_token": x.cost_chip_s_per_token,
            "expected_bound": x.bound, "expected_breakdown": x.breakdown()}


def run_plan(args) -> int:
    cfg, default_weights = _resolve_model(args.model)
    args.weights = args.weights or default_weights
    if args.workload is not None:
        return _run_engine_plan(args, cfg)
    for flag in ("batch", "phase", "context"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required (or --workload, to plan the engine)")
    wl = _workload(args, cfg)
    chips, meshes = _meshes(args)
    hw = get_hardware(args.hardware, devices=chips)  # 'cpu': chips share this machine
    target = None
    if args.latency_target_ms is not None:
        if not math.isfinite(args.latency_target_ms) or args.latency_target_ms <= 0:
            raise ValueError(f"--latency-target-ms must be a positive number, got "
                             f"{args.latency_target_ms}")
        target = args.latency_target_ms / 1e3
    result = plan_phase(cfg, args.phase, chips, wl, hw,
                        layouts=(args.layout,) if args.layout else LAYOUTS,
                        attentions=(args.attention,) if args.attention else ATTENTION,
                        meshes=meshes, latency_target_s=target,
                        nominal_params=NOMINAL_PARAMS.get(args.model), granules=args.granules)
    if target is not None and result.best.expected.step_s > target:
        raise ValueError(f"no plan meets the latency target of {args.latency_target_ms} ms; the "
                         f"fastest is expected to take {result.best.expected.step_s * 1e3:.3g} ms")
    audit = _audit(cfg, args, wl, result.best.plan) if args.audit else None
    if args.json:
        out = plan_to_json(result.best, hw.name, cfg, wl)
        if audit is not None:
            out["audit"] = audit.rows()
        out["runners_up"] = [dict(plan_to_json(c, hw.name), lost_because=c.rejected)
                             for c in result.runners_up]
        print(json.dumps(out, indent=2))
    else:
        _print_plan(cfg, args, result, hw)
        if audit is not None:
            print(audit_lib.format_audit(audit))
    return 0


def _run_engine_plan(args, cfg: ModelConfig) -> int:
    """`--workload`: plan the continuous-batching engine (`jaxinfer.engine_planner`)."""
    from jaxinfer.tokenizer import Tokenizer

    for flag in ("batch", "phase", "context", "prompt_len", "layout", "attention",
                 "latency_target_ms", "audit"):
        if getattr(args, flag) not in (None, False):
            raise ValueError(f"--{flag.replace('_', '-')} plans one phase: it does not combine "
                             "with --workload")
    chips, meshes = (1, None) if args.chips is None and args.mesh is None else _meshes(args)
    hw = get_hardware(args.hardware, devices=chips)
    tokenizer = Tokenizer.from_dir(args.model) if os.path.isdir(args.model) else None
    return engine_planner.run(args, cfg, tokenizer, hw, chips, meshes,
                              WEIGHT_BYTES[args.weights])


def _audit(cfg: ModelConfig, args, wl: Workload, plan: PhasePlan):
    """Compile the step of `plan` (on this machine's devices, never materializing the weights)
    and audit its collectives: float32 on CPU (XLA:CPU widens bf16 collectives to f32, which
    would double every measured byte), else the planned dtype."""
    if args.weights not in ("bf16", "f32"):
        raise ValueError("--audit compiles float weights; drop --weights "
                         f"{args.weights} (or use bf16 / f32) to audit the layout's collectives")
    if jax.device_count() < plan.mesh.n:
        raise ValueError(f"--audit of mesh {plan.mesh} needs {plan.mesh.n} devices, "
                         f"{jax.device_count()} available (on CPU set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={plan.mesh.n})")
    f32 = jax.default_backend() == "cpu" or args.weights == "f32"
    dtype = jnp.float32 if f32 else jnp.bfloat16
    twin = PhasePlan("decode" if plan.phase == "prefill" else "prefill", plan.layout,
                     plan.attention, plan.mesh)
    full = Plan(plan, twin) if plan.phase == "prefill" else Plan(twin, plan)
    mesh = make_mesh(plan.mesh, jax.devices()[:plan.mesh.n])
    batch, tokens = api.step_shape(cfg, plan.phase, wl.batch, wl.tokens, plan=full, mesh=mesh)
    hlo = api.compiled_hlo(cfg, plan.phase, batch, wl.context, tokens, dtype=dtype, plan=full,
                           mesh=mesh)
    size = 4.0 if f32 else 2.0
    return audit_lib.audit_hlo(hlo, cfg, plan, Workload(batch, tokens, wl.context, size, size,
                                                        size))


def _print_plan(cfg, args, result, hw) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{cfg.name} {args.phase} on {args.chips} x {hw.name}, batch {args.batch}, "
             f"context {args.context}, {args.weights} weights")
    table = Table(title=title)
    for col in ("", "layout", "attention", "mesh", "expected ms", "roofline ms", "MFU",
                "chip-ms/token", "GiB/chip", "bound", "why not"):
        table.add_column(col)
    for tag, c in [("best", result.best)] + [("", c) for c in result.runners_up]:
        e, x, p = c.estimate, c.expected, c.plan
        table.add_row(tag, p.layout, p.attention, str(p.mesh), f"{x.step_s * 1e3:.3g}",
                      f"{e.step_time_s * 1e3:.3g}", f"{x.mfu:.1%}",
                      f"{x.cost_chip_s_per_token * 1e3:.3g}",
                      f"{e.memory_per_chip_bytes / 2**30:.1f}", x.bound, c.rejected or "")
    console = Console(width=170)
    console.print(table)
    e, x = result.best.estimate, result.best.expected
    console.print("roofline breakdown (s): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in e.breakdown().items()))
    console.print("expected breakdown (s): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in x.breakdown().items()))
    console.print("MFU, cost and bound at the expected time (efficiencies of "
                  f"{hw.name}: {hw.efficiency.source('*')[:90]})")
    console.print(f"{len(result.rejected)} candidates rejected (invalid or not fitting)")


def run_calibrate(args) -> int:
    result = calibrate.measure(collective_devices=args.devices)
    path = calibrate.save(result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    coll = result["collectives"]
    print(f"{result['machine']} ({result['device']}), {result['calibration_s']:.0f} s:\n"
          f"  matmul peak {result['matmul_flops'] / 1e9:.1f} GFLOP/s; efficiency "
          f"{result['matmul_peak_fraction']:.3f} x M / (M + {result['matmul_half_tokens']:.1f}) "
          f"for M >= 2 rows, {result['matvec_fraction']:.3f} at M = 1 (matrix-vector); "
          f"attention {result['attention_fraction']:.3f} of peak\n"
          f"  decode attention reads the KV cache at {result['kv_fraction']:.3f} x the "
          f"weight-streaming bandwidth\n"
          f"  weight streaming {result['memory_bw'] / 1e9:.1f} GB/s (plain sum "
          f"{result['sum_bw'] / 1e9:.1f} GB/s)\n"
          f"  fixed costs {result['layer_overhead_s'] * 1e6:.1f} µs per layer, "
          f"{result['step_overhead_s'] * 1e6:.1f} µs per step\n"
          f"  collectives on {coll['devices']} host devices: {coll['latency_s'] * 1e6:.0f} µs "
          f"+ {coll['hop_latency_s'] * 1e6:.0f} µs per device, "
          f"{coll['bandwidth'] / 1e9:.2f} GB/s per device\n"
          f"saved to {path}")
    return 0
