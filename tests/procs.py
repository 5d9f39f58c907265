"""Launching local multi-process groups for tests: free coordinator ports, bounded runs, cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A port p with p and p + 1 free (jaxinfer.distributed's coordinator and rendezvous)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no pair of free ports")


def run_processes(argvs: list[list[str]], timeout: float = 120,
                  separate_stderr: bool = False) -> list[tuple]:
    """Run `python *argv` for each argv concurrently (without the test's XLA_FLAGS, so each
    process picks its own CPU device count); (returncode, output) each, or (returncode, stdout,
    stderr) with `separate_stderr`. Processes still running after `timeout` seconds are killed
    (returncode -9), so a hang fails instead of blocking."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXINFER_COMPILATION_CACHE"] = "0"
    stderr = subprocess.PIPE if separate_stderr else subprocess.STDOUT
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], env=env,
                              stdout=subprocess.PIPE, stderr=stderr, text=True)
             for argv in argvs]
    outs = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs.append((p.returncode, out, err) if separate_stderr else (p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs
