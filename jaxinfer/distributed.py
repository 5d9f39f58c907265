"""Multi-process (multi-host) start-up over `jax.distributed`, with errors instead of hangs.

Every process runs the same program and calls `initialize` before any other JAX call::

    jaxinfer.distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=i)

Arguments default to the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_COUNT``); with none of them, JAX's own cluster detection
(TPU pods, SLURM, Open MPI) decides. On CPU the gloo collectives are selected.

`jax.distributed.initialize` aborts the whole process (a C++ fatal error) when the coordinator is
unreachable or a process is missing. So before it, the processes meet in a small rendezvous on the
port after the coordinator's: process 0 listens, every other process connects and states its
process count and id, and process 0 checks that all agree and that all arrived within `timeout_s`.
Any disagreement or absence becomes a `DistributedError` naming it, on every process, in bounded time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time

import jax
import numpy as np


class DistributedError(RuntimeError):
    """Processes could not be brought together (unreachable coordinator, mismatched counts, ...)."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits among all processes of the program."""

    coordinator_address: str
    """host:port of process 0's coordinator service."""
    num_processes: int
    """Total number of processes."""
    process_id: int
    """This process's index in [0, num_processes)."""


def _from_env(name: str, cast=str):
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return cast(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not a valid "
                               f"{cast.__name__}") from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"coordinator address must be host:port, got {address!r}")
    return host, int(port)


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


def _receive(sock: socket.socket, deadline: float) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return json.loads(data)


def _validate_peers(group: ProcessGroup, peers: dict[int, dict]) -> str | None:
    for pid, hello in peers.items():
        if hello["num_processes"] != group.num_processes:
            return (f"process {pid} was started with num_processes={hello['num_processes']}, "
                    f"process 0 with {group.num_processes}")
    return None


def _rendezvous_leader(group: ProcessGroup, port: int, deadline: float) -> None:
    server = socket.create_server(("", port), reuse_port=False)
    connections: list[socket.socket] = []
    peers: dict[int, dict] = {}
    error = None
    try:
        while len(peers) < group.num_processes - 1 and error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, group.num_processes)) - set(peers))
                error = (f"only {len(peers) + 1} of {group.num_processes} processes joined "
                         f"within the timeout; missing process ids {missing}")
                break
            server.settimeout(remaining)
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            connections.append(conn)
            hello = _receive(conn, deadline)
            pid = hello["process_id"]
            if pid in peers or pid == 0 or not 0 < pid < max(group.num_processes,
                                                              hello["num_processes"]):
                error = f"process id {pid} is duplicated or out of range"
            peers[pid] = hello
            error = error or _validate_peers(group, peers)
        reply = {"error": error} if error else {"ok": True}
        for conn in connections:
            try:
                _send(conn, reply)
            except OSError:
                pass
    finally:
        for conn in connections:
            conn.close()
        server.close()
    if error:
        raise DistributedError(error)


def _rendezvous_follower(group: ProcessGroup, host: str, port: int, deadline: float) -> None:
    while True:
        try:
            sock = socket.create_connection((host, port),
                                            timeout=max(0.01, deadline - time.monotonic()))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {group.process_id} cannot reach the coordinator at {host}:{port} "
                    "(rendezvous port, coordinator port + 1) within the timeout: is process 0 "
                    "running with the same coordinator address?") from None
            time.sleep(0.2)
    try:
        _send(sock, {"num_processes": group.num_processes, "process_id": group.process_id})
        reply = _receive(sock, deadline)
    except (OSError, ConnectionError, ValueError) as err:
        raise DistributedError(f"process {group.process_id}: rendezvous with the coordinator "
                               f"failed: {err}") from None
    finally:
        sock.close()
    if "error" in reply:
        raise DistributedError(f"process {group.process_id}: {reply['error']}")


def rendezvous(group: ProcessGroup, timeout_s: float) -> None:
    """Check that all processes agree on the group, within `timeout_s`; raise otherwise."""
    host, port = _split_address(group.coordinator_address)
    deadline = time.monotonic() + timeout_s
    if group.process_id == 0:
        _rendezvous_leader(group, port + 1, deadline)
    else:
        _rendezvous_follower(group, host, port + 1, deadline)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               timeout_s: float = 60.0) -> ProcessGroup | None:
    """Join this process to the program's process group; returns the group (None if automatic).

    local_device_count: CPU only, the number of simulated devices this process contributes.
    """
    coordinator_address = coordinator_address or _from_env("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _from_env(
        "JAX_NUM_PROCESSES", int)
    process_id = process_id if process_id is not None else _from_env("JAX_PROCESS_ID", int)
    local_device_count = local_device_count or _from_env("JAX_LOCAL_DEVICE_COUNT", int)
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise DistributedError("coordinator_address, num_processes and process_id must be given "
                               "together (arguments or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                               "JAX_PROCESS_ID)")
    if all(given):
        _split_address(coordinator_address)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not any(given):
        jax.distributed.initialize(initialization_timeout=int(timeout_s))
        return None
    group = ProcessGroup(coordinator_address, num_processes, process_id)
    rendezvous(group, timeout_s)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
    return group


def broadcast_from_process_zero(obj):
    """A JSON-serializable object (e.g. prompts read on process 0 only) as process 0 has it,
    returned on every process; a no-op in a single process."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if leader else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = data if leader else np.zeros(size, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def min_over_processes(value: int) -> int:
    """The least of every process's non-negative int `value` (e.g. a size each process derives
    from its own devices' free memory), returned on every process; a no-op in a single process.
    A collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    value = int(value)
    if value < 0:
        raise ValueError(f"min_over_processes takes a non-negative int, got {value}")
    halves = np.asarray([value >> 31, value & 0x7FFFFFFF], np.int32)  # int32: no jax x64 needed
    gathered = np.asarray(multihost_utils.process_allgather(halves)).reshape(-1, 2)
    return min((int(hi) << 31) | int(lo) for hi, lo in gathered)


def is_leader() -> bool:
    """True on process 0 (the one that prints and writes results)."""
    return jax.process_index() == 0


def peak_host_bytes() -> int:
    """Peak resident memory of this process (Linux VmHWM; ru_maxrss elsewhere), bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def native_stdout_to_stderr():
    """In a multi-process program, what native libraries write to file descriptor 1 goes to
    stderr within the block, while Python's ``sys.stdout`` keeps writing to the real stdout.

    Gloo (the CPU collectives) prints a line per connection with C++ ``std::cout``, interleaved
    with the program's output; the CLI runs its commands inside this block so their stdout holds
    only results (``--json`` stays parseable). A no-op in a single process.
    """
    if jax.process_count() == 1:
        yield
        return
    sys.stdout.flush()
    saved_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved_fd), "w", buffering=1) as results, \
                contextlib.redirect_stdout(results):
            yield
    finally:
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if jax.process_count() > 1:
        jax.distributed.shutdown()


def add_distributed_args(parser) -> None:
    """The multi-process flags shared by `jaxinfer generate` and `jaxinfer bench`."""
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--distributed-auto", action="store_true",
                       help="join with JAX's cluster auto-detection (TPU pod slices, SLURM, "
                       "Open MPI) instead of --coordinator/--num-processes/--process-id")
    group.add_argument("--coordinator", default=None,
                       help="host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None, help="total processes")
    group.add_argument("--process-id", type=int, default=None, help="this process's index")
    group.add_argument("--local-devices", type=int, default=None,
                       help="CPU only: simulated devices this process contributes")
    group.add_argument("--distributed-timeout", type=float, default=60.0,
                       help="seconds to wait for all processes before failing")


def initialize_from_args(args) -> ProcessGroup | None:
    """Call `initialize` when any multi-process flag or environment variable asks for it."""
    wanted = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    wanted = wanted or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if args.distributed_auto:
        if wanted:
            raise DistributedError("--distributed-auto detects the cluster itself: drop "
                                   "--coordinator/--num-processes/--process-id")
        return initialize(timeout_s=args.distributed_timeout)
    if not wanted:
        return None
    return initialize(args.coordinator, args.num_processes, args.process_id,
                      local_device_count=args.local_devices, timeout_s=args.distributed_timeout)
