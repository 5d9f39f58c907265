"""The `jaxinfer` command line.

Exit codes: 0 success; 2 a user error (bad argument, checkpoint or config: one line on stderr
naming the problem, no traceback; `--debug` adds it); 1 an internal error (one-line summary).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

from jaxinfer import bench, cli_plan, distributed
from jaxinfer.config import ConfigError
from jaxinfer.generate import NonFiniteLogitsError
from jaxinfer.hf_weights import CheckpointError

USER_ERRORS = (ValueError, CheckpointError, ConfigError, distributed.DistributedError,
               NonFiniteLogitsError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
"""Exceptions that mean the input (arguments, checkpoint, environment) is wrong: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated ints, got {text!r}")


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text or tokens from a checkpoint")
    p.add_argument("--model", default="builtin",
                   help="HF checkpoint dir, jaxinfer checkpoint dir, or builtin / builtin-draft "
                        "(default: builtin, a small model trained on Python sources)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="text prompt (repeat for a batch)")
    prompt.add_argument("--tokens", type=_token_list, action="append",
                        help="prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop-tokens", type=_token_list, default=None,
                   help="comma-separated stop ids (default: the checkpoint's EOS; '' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "tpu", "gpu"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the projections")
    p.add_argument("--group-size", type=int, default=None,
                   help="rows per scale for --quantize (default: per channel int8, 128 int4)")
    p.add_argument("--kv-cache", default=None, choices=["int8"],
                   help="store the KV cache as int8 with per-token-per-head scales")
    p.add_argument("--verbose", action="store_true",
                   help="print the plan and the memory report (parameter and KV-cache bytes, "
                   "peak host memory) to stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    part = p.add_argument_group("partitioning over all devices (all processes)")
    part.add_argument("--plan", default=None,
                      help="'auto' (the cost model picks prefill and decode layouts and the mesh) "
                      "or PREFILL,DECODE as LAYOUT/ATTENTION each, e.g. 2d-ws/heads,2d-ws/batch "
                      "(layouts: 1d-ws 2d-ws wg-x wg-xy wg-xyz; attention: heads batch); "
                      "default: one device")
    part.add_argument("--mesh", default=None,
                      help="XxYxZ for an explicit --plan (default: the paper's mesh for the "
                      "device count)")
    part.add_argument("--hardware", default=None,
                      help="profile --plan auto prices with (default: detected from the devices)")
    distributed.add_distributed_args(p)
    p.set_defaults(handler=run_generate)


def _weight_bytes(args) -> float:
    if args.quantize:
        return {"int8": 1.0, "int4": 0.5}[args.quantize]
    return 4.0 if args.dtype == "float32" else 2.0


def _plan_from_args(args, prompts):
    """The `partitioning.plan.Plan` that --plan / --mesh ask for (None: no partitioning)."""
    if args.plan is None:
        if args.mesh is not None:
            raise ValueError("--mesh needs --plan")
        return None
    import jax

    from partitioning import mesh as mesh_lib
    from partitioning.plan import PhasePlan, Plan

    chips = jax.device_count()
    granules, _ = mesh_lib.granules_of(jax.devices())
    if args.plan == "auto":
        if args.mesh is not None:
            raise ValueError("--mesh applies to an explicit --plan; 'auto' chooses the mesh")
        from jaxinfer.checkpoint import read_config
        from jaxinfer.builtin import builtin_path
        from partitioning.hardware import detect_hardware, get_hardware
        from partitioning.planner import plan_generation

        from jaxinfer.tokenizer import Tokenizer

        source = builtin_path(args.model) or args.model
        cfg = read_config(source)
        hw = get_hardware(args.hardware or detect_hardware(jax.devices()[0]))
        tokenizer = Tokenizer.from_dir(source) if args.prompt is not None else None
        if args.prompt is not None and tokenizer is None:
            raise ValueError("text prompts need a tokenizer, and this model has none: "
                             "pass --tokens")
        longest = max(len(tokenizer.encode(p)) if tokenizer else len(p) for p in prompts)
        return plan_generation(cfg, chips, len(prompts), longest, args.max_new_tokens, hw,
                               weight_bytes=_weight_bytes(args), granules=granules)
    phases = args.plan.split(",")
    if len(phases) != 2 or any(p.count("/") != 1 for p in phases):
        raise ValueError(f"--plan must be 'auto' or PREFILL,DECODE as LAYOUT/ATTENTION each "
                         f"(e.g. 2d-ws/heads,2d-ws/batch), got {args.plan!r}")
    if args.mesh is None:
        shape = mesh_lib.paper_mesh_shape(chips)
    else:
        try:
            sizes = [int(v) for v in args.mesh.lower().split("x")]
            if len(sizes) != 3:
                raise ValueError
            shape = mesh_lib.MeshShape(*sizes)
        except ValueError:
            raise ValueError(f"--mesh must be XxYxZ (e.g. 2x2x2), got {args.mesh!r}") from None
    if granules > 1:
        placements = mesh_lib.dcn_placements(shape, granules)
        if not placements:
            raise ValueError(f"mesh {shape}: no axis is divisible by the {granules} hosts/slices")
        shape = placements[0]
    (pl, pa), (dl, da) = (p.split("/") for p in phases)
    return Plan(PhasePlan("prefill", pl, pa, shape), PhasePlan("decode", dl, da, shape))


def run_generate(args) -> int:
    distributed.initialize_from_args(args)
    with distributed.native_stdout_to_stderr():
        return _generate_and_print(args)


def _generate_and_print(args) -> int:
    import jaxinfer

    prompts = args.prompt if args.prompt is not None else args.tokens
    prompts = distributed.broadcast_from_process_zero(prompts)
    plan = _plan_from_args(args, prompts)
    model = jaxinfer.load(args.model, dtype=args.dtype, attention_backend=args.attention_backend,
                          quantize=args.quantize, kv_cache=args.kv_cache,
                          group_size=args.group_size, plan=plan)
    if args.verbose:
        if plan is not None:
            print(f"plan: prefill {plan.prefill.layout}/{plan.prefill.attention}, decode "
                  f"{plan.decode.layout}/{plan.decode.attention} on mesh {plan.decode.mesh}",
                  file=sys.stderr)
        report = model.memory_report(len(prompts), model.config.max_context)
        report["peak_host_bytes"] = distributed.peak_host_bytes()
        print("memory: " + " ".join(f"{k}={v}" for k, v in report.items()), file=sys.stderr)
    try:
        result = model.generate(
            prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, stop_tokens=args.stop_tokens,
            seed=args.seed)
    except NonFiniteLogitsError as err:  # the other requests' results are still printed
        if distributed.is_leader():
            _print_results(args, err.result)
        raise
    if distributed.is_leader():  # every process has the results; one prints them
        _print_results(args, result)
    return 0


def json_line(record: dict) -> str:
    """`record` as one line of strict JSON: a non-finite float (a logprob of a request that
    stopped with finish_reason 'error') is written as null, never as a bare NaN."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps(clean(record), allow_nan=False)


def _print_results(args, result) -> None:
    for i in range(len(result.tokens)):
        text = result.text[i] if result.text is not None else None
        if args.json:
            print(json_line({"tokens": result.tokens[i], "text": text,
                             "finish_reason": result.finish_reasons[i],
                             "logprobs": result.logprobs[i]}))
        elif text is not None:
            prefix = args.prompt[i] if args.prompt is not None else ""
            print(prefix + text)
        else:
            print(",".join(map(str, result.tokens[i])))


# Each entry adds one subcommand parser and binds its handler with `set_defaults(handler=...)`.
SUBCOMMAND_BUILDERS = (add_generate_parser, bench.add_bench_parser, cli_plan.add_plan_parser,
                       cli_plan.add_calibrate_parser)


DEBUG_HELP = "on an error, print the full traceback too"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxinfer", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_parser in SUBCOMMAND_BUILDERS:
        add_parser(sub)
    for subparser in sub.choices.values():  # `jaxinfer generate ... --debug` works as well
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help=DEBUG_HELP)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"jaxinfer {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxinfer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"jaxinfer {args.command}: internal error: {type(err).__name__}: "
              f"{_one_line(err)}{hint}", file=sys.stderr)
        return 1
