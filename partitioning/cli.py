"""`jaxinfer plan` and `jaxinfer calibrate`."""

from __future__ import annotations

import json

from partitioning.cost_model import WEIGHT_BYTES, Workload
from partitioning.plan import ATTENTION, LAYOUTS


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose a partitioning with the analytical cost model")
    p.add_argument("--model", required=True, help="preset name or checkpoint directory")
    p.add_argument("--hardware", required=True, help="tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e, "
                   "a100-80gb, h100-sxm, h200 or cpu (measured by `jaxinfer calibrate`)")
    p.add_argument("--chips", type=int, required=True)
    p.add_argument("--granules", type=int, default=None,
                   help="hosts or TPU slices the chips span, joined by the data-center network "
                   "(default: 1 on TPU, one per 8-GPU NVLink node on GPU)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--phase", choices=["prefill", "decode"], required=True)
    p.add_argument("--context", type=int, required=True,
                   help="decode: tokens in the KV cache; prefill: default prompt length")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill tokens per sequence")
    p.add_argument("--weights", choices=list(WEIGHT_BYTES), default="bf16")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="evaluate only this layout")
    p.add_argument("--attention", choices=ATTENTION, default=None)
    p.add_argument("--latency-target-ms", type=float, default=None,
                   help="minimise cost per token among plans at most this slow")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--audit", action="store_true",
                   help="also compile one step of the best plan on this machine's devices and "
                   "compare its HLO collectives with the cost model (partitioning.audit)")
    p.set_defaults(handler=run_plan)


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine for the 'cpu' hardware profile")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_calibrate)


def _workload(args) -> Workload:
    for name in ("chips", "batch", "context"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.phase == "decode":
        return Workload(args.batch, 1, args.context, WEIGHT_BYTES[args.weights])
    prompt = args.prompt_len or args.context
    if prompt < 1 or prompt > args.context:
        raise ValueError(f"--prompt-len must be in [1, --context={args.context}], got {prompt}")
    return Workload(args.batch, prompt, prompt, WEIGHT_BYTES[args.weights])


def plan_to_json(best, hw_name: str) -> dict:
    e, p = best.estimate, best.plan
    return {"layout": p.layout, "attention": p.attention, "mesh": p.mesh.as_dict(),
            "dcn": dict(zip(("x", "y", "z"), p.mesh.dcn)),
            "hardware": hw_name, "step_time_s": e.step_time_s, "mfu": e.mfu,
            "cost_chip_s_per_token": e.cost_chip_s_per_token,
            "memory_per_chip_bytes": e.memory_per_chip_bytes, "fits": e.fits, "bound": e.bound,
            "breakdown": e.breakdown(), **_expected_json(best)}


def _expected_json(best) -> dict:
    """The roofline and the expected time side by side (`partitioning.efficiency`)."""
    x = best.expected
    if x is None:
        return {}
    return {"roofline_step_s": x.roofline_s, "expected_step_s": x.step_s,
            "expected_mfu": x.mfu, "expected_cost_chip_s_per_token": x.cost_chip_s_per_token,
            "expected_bound": x.bound, "expected_breakdown": x.breakdown()}


def run_plan(args) -> int:
    from partitioning.hardware import get_hardware
    from partitioning.planner import plan_phase
    from partitioning.presets import NOMINAL_PARAMS, resolve_model

    cfg = resolve_model(args.model)
    hw = get_hardware(args.hardware)
    wl = _workload(args)
    target = None if args.latency_target_ms is None else args.latency_target_ms / 1e3
    result = plan_phase(cfg, args.phase, args.chips, wl, hw,
                        layouts=(args.layout,) if args.layout else LAYOUTS,
                        attentions=(args.attention,) if args.attention else ATTENTION,
                        latency_target_s=target, nominal_params=NOMINAL_PARAMS.get(args.model),
                        granules=args.granules)
    if target is not None and result.best.estimate.step_time_s > target:
        raise ValueError(f"no plan meets the latency target of {args.latency_target_ms} ms; the "
                         f"fastest takes {result.best.estimate.step_time_s * 1e3:.3g} ms")
    audit = _audit(cfg, args, wl, result.best.plan) if args.audit else None
    if args.json:
        out = plan_to_json(result.best, hw.name)
        if audit is not None:
            out["audit"] = audit.rows()
        out["runners_up"] = [dict(plan_to_json(c, hw.name), lost_because=c.rejected)
                             for c in result.runners_up]
        print(json.dumps(out, indent=2))
    else:
        _print_plan(cfg, args, result, hw)
        if audit is not None:
            from partitioning.audit import format_audit
            print(format_audit(audit))
    return 0


def _audit(cfg, args, wl: Workload, plan):
    """HLO audit of the chosen plan's step: bfloat16, or float32 on CPU (XLA:CPU widens bf16
    collectives to f32, which would double every measured byte)."""
    import jax
    import jax.numpy as jnp

    from partitioning.audit import audit_step
    if args.weights != "bf16":
        raise ValueError("--audit compiles the float layers (bf16); drop --weights "
                         f"{args.weights} to audit the layout's collectives")
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return audit_step(cfg, plan, args.batch, wl.context, wl.tokens, dtype=dtype)


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
    from partitioning import calibrate

    result = calibrate.measure()
    path = calibrate.save(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"memory bandwidth {result['memory_bw'] / 1e9:.1f} GB/s, matmul "
              f"{result['matmul_flops'] / 1e9:.1f} GFLOP/s on {result['device']} "
              f"({result['machine']}); saved to {path}")
    return 0
