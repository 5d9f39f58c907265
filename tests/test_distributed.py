"""Multi-process start-up: errors, not hangs, when processes cannot meet (jaxinfer.distributed)."""

import time

import pytest
from procs import free_port, run_processes

_PROGRAM = """
import sys
from jaxinfer import distributed
n, pid, port, timeout = (int(a) for a in sys.argv[1:5])
try:
    distributed.initialize(f"127.0.0.1:{port}", n, pid, local_device_count=2, timeout_s=timeout)
except distributed.DistributedError as err:
    print("DistributedError:", err, flush=True)
    sys.exit(3)
import jax
print("devices", jax.device_count(), "processes", jax.process_count(), flush=True)
distributed.shutdown()
"""


def _launch(args_per_process):
    return run_processes([["-c", _PROGRAM, *args] for args in args_per_process])


def test_two_processes_form_one_group():
    port = free_port()
    outs = _launch([(2, 0, port, 60), (2, 1, port, 60)])
    for rc, out in outs:
        assert rc == 0, out
        assert "devices 4 processes 2" in out


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time():
    port = free_port()
    start = time.monotonic()
    ((rc, out),) = _launch([(2, 1, port, 3)])
    assert rc == 3, out
    assert "cannot reach the coordinator" in out
    assert time.monotonic() - start < 60


def test_missing_process_is_reported_by_process_zero():
    port = free_port()
    ((rc, out),) = _launch([(2, 0, port, 3)])
    assert rc == 3, out
    assert "missing process ids [1]" in out


def test_mismatched_process_count_fails_on_every_process():
    port = free_port()
    outs = _launch([(2, 0, port, 20), (3, 1, port, 20)])
    for rc, out in outs:
        assert rc == 3, out
        assert "num_processes=3" in out


def test_bad_arguments():
    from jaxinfer.distributed import DistributedError, initialize

    with pytest.raises(DistributedError, match="host:port"):
        initialize("localhost", 2, 0, timeout_s=1)
    with pytest.raises(DistributedError, match="process_id must be in"):
        initialize("127.0.0.1:1234", 2, 5, timeout_s=1)
    with pytest.raises(DistributedError, match="given together"):
        initialize("127.0.0.1:1234", None, 0, timeout_s=1)
