"""The `jaxinfer` command line.

Exit codes: 0 success; 2 a user error (bad argument, checkpoint or config: one line on stderr
naming the problem, no traceback; `--debug` adds it); 1 an internal error (one-line summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

import jaxinfer
from jaxinfer import batch, bench, chat, cli_plan, distributed
from jaxinfer.batch import json_line
from jaxinfer.config import ConfigError
from jaxinfer.generate import NonFiniteLogitsError
from jaxinfer.hf_weights import CheckpointError
from jaxinfer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from pallas_kernels import BACKENDS, INTERPRET_BACKENDS

USER_ERRORS = (ValueError, CheckpointError, ConfigError, distributed.DistributedError,
               NonFiniteLogitsError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
"""Exceptions that mean the input (arguments, checkpoint, environment) is wrong: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default in --help, unless it is None or False (nothing to show) or
    the help text already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _token_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated ints, got {text!r}")


def _logprobs_count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise argparse.ArgumentTypeError(f"must be an int in [0, {MAX_TOP_LOGPROBS}] "
                                         f"(alternatives per token; 0 = none), got {text!r}")
    return k


def add_generate_parser(sub) -> None:
    defaults = SamplingParams()
    p = sub.add_parser("generate", help="generate text or tokens from a checkpoint",
                       formatter_class=_DefaultsFormatter,
                       description="Generate from --prompt / --tokens (printed at the end, or "
                       "as they come with --stream), or run a JSON Lines batch with --input / "
                       "--output (resumable: see jaxinfer.batch).")
    p.add_argument("--model", default="builtin",
                   help="HF checkpoint dir, jaxinfer checkpoint dir, or builtin / builtin-draft "
                        "(builtin: a small model trained on Python sources)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append",
                        help="text prompt (repeat for a batch); with --chat, the user message")
    prompt.add_argument("--tokens", type=_token_list, action="append",
                        help="prompt as comma-separated token ids (repeat for a batch); the "
                        "output is token ids too")
    prompt.add_argument("--input", default=None, metavar="FILE",
                        help="batch mode: JSON Lines requests ('-' = stdin), one per line: id, "
                        "prompt or tokens, and any SamplingParams field; needs --output")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="batch mode: JSON Lines results, appended as requests finish; a rerun "
                   "skips the ids it already holds")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: keep the most likely tokens whose mass reaches P")
    p.add_argument("--min-p", type=float, default=None,
                   help="keep tokens at least P times as likely as the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF/CTRL penalty (> 0) on tokens already in the prompt or output")
    p.add_argument("--stop-tokens", type=_token_list, default=None,
                   help="comma-separated stop ids (default: the checkpoint's EOS; '' = none)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeat for several): generation ends once the text "
                   "contains it; it is cut from the output")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (seeds seed, "
                   "seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (per request)")
    p.add_argument("--logprobs", type=_logprobs_count, default=0, metavar="K",
                   help=f"per generated token, also give its K most likely alternatives "
                   f"(token id, logprob), K in [0, {MAX_TOP_LOGPROBS}] (default: 0, none): "
                   "printed as a 'top_logprobs' JSON line after each result ('top_logprobs' "
                   "field with --json); in batch mode the default of lines without 'logprobs'")
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (one prompt; with --json one JSON "
                   "object per event)")
    p.add_argument("--chat", action="store_true",
                   help="format each --prompt as a user message with the checkpoint's chat "
                   "template (tokenizer_config.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the weights and activations")
    p.add_argument("--attention-backend", default="auto",
                   choices=list(BACKENDS + INTERPRET_BACKENDS),
                   help="attention and matmul kernels: auto (Pallas where supported), xla, "
                   "tpu / gpu (Pallas), tpu-interpret / gpu-interpret (the Pallas kernels in "
                   "the interpreter, any platform)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the projections")
    p.add_argument("--group-size", type=int, default=None,
                   help="rows per scale for --quantize (must divide the input dims; default: "
                   "per channel int8, 128 int4)")
    p.add_argument("--kv-cache", default=None, choices=["int8"],
                   help="store the KV cache as int8 with per-token-per-head scales")
    p.add_argument("--verbose", action="store_true",
                   help="print the plan and the memory report (parameter and KV-cache bytes, "
                   "peak host memory) to stderr")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    part = p.add_argument_group("partitioning over all devices (all processes)")
    part.add_argument("--plan", default=None,
                      help="'auto' (the cost model picks prefill and decode layouts and the mesh) "
                      "or PREFILL,DECODE as LAYOUT/ATTENTION each, e.g. 2d-ws/heads,2d-ws/batch "
                      "(layouts: 1d-ws 2d-ws wg-x wg-xy wg-xyz; attention: heads batch); "
                      "default: one device")
    part.add_argument("--mesh", default=None,
                      help="XxYxZ for an explicit --plan (default: the paper's mesh for the "
                      "device count; every sharded dim must divide)")
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
        hw = get_hardware(args.hardware or detect_hardware(jax.devices()[0]),
                          devices=chips)  # 'cpu': the chips share this machine
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


def _check_modes(args) -> None:
    """Flags that cannot go together are a user error naming them."""
    if args.input is None:
        if args.output is not None:
            raise ValueError("--output needs --input (batch mode)")
    else:
        if args.output is None:
            raise ValueError("--input needs --output FILE (the results, which a rerun resumes)")
        for flag in ("stream", "chat", "json", "plan"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} does not apply to batch mode (--input); the "
                                 "output file is JSON Lines already")
    if args.chat and args.prompt is None:
        raise ValueError("--chat formats text: give the user message with --prompt")
    if args.stream and not args.json and (len(args.prompt or args.tokens or ()) != 1
                                          or args.n != 1):
        raise ValueError("--stream prints one completion as text: give one --prompt or "
                         "--tokens and --n 1 (or add --json for one JSON object per event)")


def _sampling_keywords(args) -> dict:
    """The SamplingParams fields the flags set (--logprobs 0: None, no alternatives)."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, stop_tokens=args.stop_tokens,
                logprobs=args.logprobs or None)


def _generate_and_print(args) -> int:
    _check_modes(args)
    prompts = args.prompt if args.prompt is not None else args.tokens
    prompts = distributed.broadcast_from_process_zero(prompts)
    plan = None if args.input is not None else _plan_from_args(args, prompts)
    model = jaxinfer.load(args.model, dtype=args.dtype, attention_backend=args.attention_backend,
                          quantize=args.quantize, kv_cache=args.kv_cache,
                          group_size=args.group_size, plan=plan)
    if args.verbose:
        _print_verbose(model, plan, len(prompts or [None]))
    if args.input is not None:
        defaults = {**_sampling_keywords(args), "stop": args.stop or (), "n": args.n}
        return batch.run_batch(model, args.input, args.output, defaults, args.seed)
    if args.chat:
        prompts = [model.tokenizer.encode(
            chat.render(model.tokenizer, [{"role": "user", "content": p}]),
            add_special_tokens=False) for p in prompts]
    keywords = _sampling_keywords(args)
    if args.stream:
        _print_stream(args, model.stream(prompts, stop=args.stop, n=args.n, seed=args.seed,
                                         **keywords))
        return 0
    # top logprobs come from the engine: SamplingParams run it (the static batch has none)
    sampling = ({"params": SamplingParams(**keywords)} if args.logprobs else
                {k: v for k, v in keywords.items() if k != "logprobs"})
    try:
        result = model.generate(prompts, stop=args.stop, n=args.n, seed=args.seed, **sampling)
    except NonFiniteLogitsError as err:  # the other requests' results are still printed
        if distributed.is_leader():
            _print_results(args, err.result)
        raise
    if distributed.is_leader():  # every process has the results; one prints them
        _print_results(args, result)
    return 0


def _print_verbose(model, plan, batch_size: int) -> None:
    if plan is not None:
        print(f"plan: prefill {plan.prefill.layout}/{plan.prefill.attention}, decode "
              f"{plan.decode.layout}/{plan.decode.attention} on mesh {plan.decode.mesh}",
              file=sys.stderr)
    report = model.memory_report(batch_size, model.config.max_context)
    report["peak_host_bytes"] = distributed.peak_host_bytes()
    print("memory: " + " ".join(f"{k}={v}" for k, v in report.items()), file=sys.stderr)


def _print_stream(args, events) -> None:
    """Events as they come: text (or ids with --tokens), or one JSON object each (--json)."""
    leader = distributed.is_leader()
    if leader and not args.json and args.prompt is not None and not args.chat:
        print(args.prompt[0], end="", flush=True)
    for ev in events:
        if not leader:
            continue
        if args.json:
            print(json_line(dataclasses.asdict(ev)), flush=True)
        elif args.tokens is not None:
            print("".join(f"{t}," for t in ev.token_ids), end="", flush=True)
        else:
            print(ev.text, end="", flush=True)
    if leader and not args.json:
        print()


def _print_results(args, result) -> None:
    owners = getattr(result, "prompt_index", None) or list(range(len(result.tokens)))
    top = getattr(result, "top_logprobs", None)
    for i in range(len(result.tokens)):
        text = result.text[i] if result.text is not None else None
        if args.json:
            record = {"prompt_index": owners[i], "tokens": result.tokens[i], "text": text,
                      "finish_reason": result.finish_reasons[i], "logprobs": result.logprobs[i]}
            if top is not None and top[i] is not None:
                record["top_logprobs"] = top[i]
            print(json_line(record))
        elif text is not None and args.tokens is None:
            prefix = "" if args.chat else args.prompt[owners[i]]
            print(prefix + text)
        else:
            print(",".join(map(str, result.tokens[i])))
        if not args.json and top is not None and top[i] is not None:
            print("top_logprobs " + json_line([[list(alt) for alt in tok] for tok in top[i]]))


# Each entry adds one subcommand parser and binds its handler with `set_defaults(handler=...)`.
SUBCOMMAND_BUILDERS = (add_generate_parser, bench.add_bench_parser, cli_plan.add_plan_parser,
                       cli_plan.add_calibrate_parser)


DEBUG_HELP = "on an error, print the full traceback too"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxinfer", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"jaxinfer {jaxinfer.__version__}")
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
