"""Backend selection shared by every kernel wrapper.

``backend`` is one of "tpu" (Pallas Mosaic kernel), "gpu" (Pallas Triton kernel), "xla" (the
pure-jnp reference twin, also the CPU path) or "auto" (the kernel of the platform JAX runs on,
else XLA).

The attention wrappers also take "tpu-interpret" and "gpu-interpret": the same Pallas kernels run
by the Pallas HLO interpreter on any platform, so a model can be told through its one
``attention_backend`` option to run the kernels on CPU (whole-model parity tests).
"""

from __future__ import annotations

import warnings

import jax

BACKENDS = ("auto", "tpu", "gpu", "xla")
INTERPRET_BACKENDS = ("tpu-interpret", "gpu-interpret")


class UnsupportedInput(ValueError):
    """A kernel cannot take these shapes or dtypes; backend "auto" then uses the XLA twin."""


class KernelFallbackWarning(UserWarning):
    """Backend "auto" ran the XLA twin because the platform's kernel cannot take the inputs."""


_REPORTED: set[str] = set()


def report_fallback(kernel: str, backend: str, reason: Exception) -> None:
    """Warn, once per distinct kernel / backend / reason, that "auto" chose the XLA twin."""
    message = f"{kernel}: the {backend} kernel cannot run these inputs ({reason}); using XLA"
    if message not in _REPORTED:
        _REPORTED.add(message)
        warnings.warn(message, KernelFallbackWarning, stacklevel=3)


def resolve_backend(backend: str) -> str:
    """Turn "auto" into a concrete backend; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "xla"


def resolve_attention_backend(backend: str, interpret) -> tuple[str, object]:
    """(concrete backend, interpret) for the attention wrappers, which also take the
    "<kernel>-interpret" names (they set ``interpret=True`` unless InterpretParams are given)."""
    if backend in INTERPRET_BACKENDS:
        return backend.split("-")[0], interpret or True
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + INTERPRET_BACKENDS}, "
                         f"got {backend!r}")
    return resolve_backend(backend), interpret
