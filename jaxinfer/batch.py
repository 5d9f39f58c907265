"""JSON Lines batch generation that survives a crash: `jaxinfer generate --input --output`.

Input: one JSON object per line: `id` (a string or an int; default: the line number, from 1),
`prompt` (text) or `tokens` (token ids), and optionally any `SamplingParams` field
(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop_tokens, seed,
logprobs) and the `TextOptions` fields (stop, include_stop_str_in_output, n). Fields a line
leaves out take the command's flags. Empty lines are skipped.

Output: one JSON line per request, written (flushed) as soon as it finishes, in the order
requests finish, fsync'ed at least every `FSYNC_INTERVAL_S` and at the end:
`{"id", "text", "tokens", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}}`;
`logprobs: k` adds "logprobs" (per token) and "top_logprobs" (per token [[id, logprob], ...],
k most likely first); with n > 1, "choices" holds one {"text", "tokens", "finish_reason"} per
sample. A line that cannot be a request gives `{"id", "error"}` naming the line number and the
problem.

Resume: ids that already have a record in the output are skipped, so a rerun after a crash,
kill -9 or Ctrl-C completes the file with every id exactly once. Each request's result depends
only on itself (greedy, or its seed: `seed` field or --seed), so the file equals an uninterrupted
run's up to line order. A torn last line (a write cut short) is truncated before resuming.
Under jax.distributed only process 0 reads and writes files: it reads the input and the output
so far and broadcasts the plan (pending requests, error records, counts), so every process runs
the same requests through the same engine calls; an error reading or opening them fails every
process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, TextIO

import jax
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)

from jaxinfer import distributed, streaming, validation
from jaxinfer.sampling import SamplingParams

FSYNC_INTERVAL_S = 1.0
"""Longest time between two fsyncs of the output file."""
PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(streaming.TextOptions))
FIELDS = ("id", "prompt", "tokens") + PARAM_FIELDS + OPTION_FIELDS
"""Every field an input line may have."""


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One valid input line."""

    line: int
    """Line number in the input (from 1)."""
    id: Any
    """The request's id (str or int)."""
    tokens: list[int]
    """Prompt token ids (a text prompt encoded)."""
    params: SamplingParams
    """Its sampling parameters (line fields over the command's defaults)."""
    options: streaming.TextOptions
    """Stop strings and n."""


@dataclasses.dataclass(frozen=True)
class BadLine:
    """An input line that is not a valid request: it becomes an error record."""

    line: int
    """Line number in the input (from 1)."""
    id: Any
    """Its id (the line number when the line has none, or none readable)."""
    error: str
    """What is wrong, with the line number."""


def id_key(value: Any) -> str:
    """The identity of an id across input and output (1 and "1" are different ids)."""
    return json.dumps(value)


def _check_id(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise validation.fail("id", value, "a string or an int")
    return value


def parse_line(line_no: int, text: str, defaults: dict, tokenizer) -> BatchRequest | BadLine:
    """The request of one input line (defaults: SamplingParams / TextOptions keywords)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return BadLine(line_no, line_no, f"line {line_no}: not valid JSON: {err}")
    if not isinstance(data, dict):
        return BadLine(line_no, line_no,
                       f"line {line_no}: must be a JSON object, got {type(data).__name__}")
    try:
        rid = _check_id(data.get("id", line_no))
    except validation.InvalidArgument as err:
        return BadLine(line_no, line_no, f"line {line_no}: {err}")
    try:
        return _request(line_no, rid, data, defaults, tokenizer)
    except ValueError as err:  # InvalidArgument and the tokenizer's errors
        return BadLine(line_no, rid, f"line {line_no}: {err}")


def _request(line_no: int, rid, data: dict, defaults: dict, tokenizer) -> BatchRequest:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise validation.InvalidArgument(f"unknown field {unknown[0]!r}; allowed: "
                                         f"{', '.join(FIELDS)}")
    if ("prompt" in data) == ("tokens" in data):
        raise validation.InvalidArgument("needs exactly one of 'prompt' (text) or 'tokens' "
                                         "(token ids)")
    if "tokens" in data:
        tokens = validation.token_ids("tokens", data["tokens"])
    else:
        if not isinstance(data["prompt"], str):
            raise validation.fail("prompt", data["prompt"], "a string")
        if tokenizer is None:
            raise validation.InvalidArgument("text prompts need a tokenizer, and this model "
                                             "has none: give 'tokens'")
        tokens = tokenizer.encode(data["prompt"])
    merged = {**defaults, **{k: v for k, v in data.items() if k in PARAM_FIELDS + OPTION_FIELDS}}
    params = SamplingParams(**{k: v for k, v in merged.items() if k in PARAM_FIELDS})
    options = streaming.TextOptions(**{k: v for k, v in merged.items() if k in OPTION_FIELDS})
    return BatchRequest(line_no, rid, tokens, params, options)


def read_input(stream: TextIO, defaults: dict, tokenizer) -> list[BatchRequest | BadLine]:
    """Every non-empty input line parsed; two lines with one id are an `InvalidArgument`."""
    items, seen = [], {}
    for line_no, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        item = parse_line(line_no, text, defaults, tokenizer)
        key = id_key(item.id)
        if key in seen:
            raise validation.InvalidArgument(
                f"input lines {seen[key]} and {line_no} have the same id {item.id!r}: ids must "
                "be unique (a line without an id has its line number as id)")
        seen[key] = line_no
        items.append(item)
    return items


def failed(record: dict) -> bool:
    """Whether an output record is a failed request (an error record, or non-finite logits)."""
    return "error" in record or record.get("finish_reason") == "error" or any(
        c.get("finish_reason") == "error" for c in record.get("choices", ()))


def scan_output(path: str) -> dict[str, bool]:
    """{id key: whether its record is an error} of an existing output file (none: {}), after
    truncating a torn last line (no newline, or not a JSON record). An invalid line before the
    last is an error naming it (the file is not a batch run's output)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    good = data.rfind(b"\n") + 1
    lines = data[:good].split(b"\n")[:-1]
    records, offset = {}, 0
    for i, raw in enumerate(lines):
        try:
            record = json.loads(raw)
            records[id_key(record["id"])] = failed(record)
        except (ValueError, TypeError, KeyError):
            if i < len(lines) - 1:
                raise validation.InvalidArgument(
                    f"output file {path} line {i + 1} is not a result record, so it was not "
                    "written by a batch run: pass another --output") from None
            good = offset
            break
        offset += len(raw) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


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


class ResultWriter:
    """Appends JSON lines to the output: flushed per line, fsync'ed every FSYNC_INTERVAL_S."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        self._file.write(json_line(record) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        self._file.close()


def _record(req: BatchRequest, samples: list[dict]) -> dict:
    """The output record of a finished request (samples: one dict per completion)."""
    fields = ("text", "tokens", "finish_reason") + (
        ("logprobs", "top_logprobs") if req.params.logprobs else ())
    choices = [{k: s[k] for k in fields} for s in samples]
    usage = {"prompt_tokens": len(req.tokens),
             "completion_tokens": sum(len(s["tokens"]) for s in samples)}
    body = choices[0] if req.options.n == 1 else {"choices": choices}
    return {"id": req.id, **body, "usage": usage}


def _error_record(line: int, rid, message: str) -> dict:
    return {"id": rid, "error": message if message.startswith(f"line {line}:")
            else f"line {line}: {message}"}


def _finished(engine, reqs: list[BatchRequest], seed: int):
    """(position in reqs, record) of each request as its last completion finishes."""
    events = streaming.EventStream(engine, [r.tokens for r in reqs], [r.params for r in reqs],
                                   [r.options for r in reqs], seed)
    owners = [i for i, r in enumerate(reqs) for _ in range(r.options.n)]
    samples = [{"text": "", "tokens": [], "logprobs": [], "top_logprobs": [],
                "finish_reason": None} for _ in owners]
    left = [r.options.n for r in reqs]
    for ev in events:
        s = samples[ev.index]
        s["text"] += ev.text
        s["tokens"] += ev.token_ids
        s["logprobs"] += ev.logprobs
        s["top_logprobs"] += [[list(alt) for alt in tok] for tok in ev.top_logprobs or ()]
        if ev.finish_reason is not None:
            s["finish_reason"] = ev.finish_reason
            left[ev.prompt_index] -= 1
            if left[ev.prompt_index] == 0:
                mine = [samples[j] for j, o in enumerate(owners) if o == ev.prompt_index]
                yield ev.prompt_index, _record(reqs[ev.prompt_index], mine)


def generate_all(engine, reqs: list[BatchRequest], seed: int, emit) -> None:
    """emit(record) for every request as it finishes. When the engine rejects the call (a
    request it cannot take: too long, a parameter out of range for this model), the unfinished
    requests are split in halves and retried, so each rejected request gets its own error
    record and every other request its result."""
    finished = set()
    try:
        for pos, record in _finished(engine, reqs, seed):
            finished.add(pos)
            emit(record)
    except ValueError as err:
        rest = [r for i, r in enumerate(reqs) if i not in finished]
        if len(rest) == 1:
            emit(_error_record(rest[0].line, rest[0].id, " ".join(str(err).split())))
            return
        half = len(rest) // 2
        generate_all(engine, rest[:half], seed, emit)
        generate_all(engine, rest[half:], seed, emit)


def _progress(total: int, done: int) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal or not distributed.is_leader())


def _plan(input_path: str, output_path: str, defaults: dict, tokenizer):
    """(pending requests, error records to write, records already in the output, total)."""
    if input_path == "-":
        items = read_input(sys.stdin, defaults, tokenizer)
    else:
        with open(input_path, encoding="utf-8") as f:
            items = read_input(f, defaults, tokenizer)
    done = scan_output(output_path)
    inputs = {id_key(it.id) for it in items}
    stray = [k for k in done if k not in inputs]
    if stray:
        raise validation.InvalidArgument(
            f"output file {output_path} has a record for id {stray[0]}, which is not in the "
            f"input {input_path}: it belongs to another input (pass another --output)")
    todo = [it for it in items if id_key(it.id) not in done]
    bad = [_error_record(it.line, it.id, it.error) for it in todo if isinstance(it, BadLine)]
    pending = [it for it in todo if isinstance(it, BatchRequest)]
    return pending, bad, done, len(items)


def run_batch(model, input_path: str, output_path: str, defaults: dict, seed: int,
              engine_config=None) -> int:
    """Run the batch (see the module docstring); 0 when every request succeeded, else 1."""
    plan, writer = None, None
    if distributed.is_leader():  # the others learn the plan, or the leader's error
        try:
            pending, bad, done, total = _plan(input_path, output_path, defaults,
                                              model.tokenizer)
            writer = ResultWriter(output_path)  # an unwritable output fails every process
            plan = {"plan": ([dataclasses.asdict(r) for r in pending], bad, len(done),
                             sum(done.values()), total)}
        except (OSError, ValueError) as err:
            if jax.process_count() == 1:
                raise
            plan = {"error": f"{type(err).__name__}: {err}"}
    plan = distributed.broadcast_from_process_zero(plan)
    if "error" in plan:
        raise validation.InvalidArgument(f"batch input on process 0: {plan['error']}")
    wire, bad, already, failed_before, total = plan["plan"]
    pending = [BatchRequest(r["line"], r["id"], r["tokens"], SamplingParams(**r["params"]),
                            streaming.TextOptions(**r["options"])) for r in wire]
    counts = {"failed": failed_before, "new": 0, "tokens": 0}
    start = time.perf_counter()
    with _progress(total, already) as progress:
        task = progress.add_task("generate", total=total, completed=already, tps="-")

        def emit(record: dict) -> None:
            counts["failed"] += failed(record)
            counts["new"] += 1
            counts["tokens"] += record.get("usage", {}).get("completion_tokens", 0)
            if writer is not None:
                writer.write(record)
            rate = counts["tokens"] / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, tps=f"{rate:.1f}")

        try:
            for record in bad:
                emit(record)
            if pending:
                generate_all(model.engine(engine_config), pending, seed, emit)
        finally:
            if writer is not None:
                writer.close()
    _summary(output_path, total, already, counts, time.perf_counter() - start)
    return 1 if counts["failed"] else 0


def _summary(output_path: str, total: int, already: int, counts: dict, wall: float) -> None:
    if not distributed.is_leader():
        return
    rate = counts["tokens"] / wall if wall > 0 else 0.0
    print(f"batch: {total} requests: {counts['new']} now, {already} already in {output_path}; "
          f"{counts['failed']} failed; {counts['tokens']} tokens generated in {wall:.1f} s "
          f"({rate:.1f} tok/s)", file=sys.stderr)
