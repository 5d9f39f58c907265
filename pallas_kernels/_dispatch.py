"""Backend selection shared by every kernel wrapper.

``backend`` is one of "tpu" (Pallas Mosaic kernel), "gpu" (Pallas Triton kernel), "xla" (the pure-jnp
reference twin, also the CPU path) or "auto" (the kernel of the platform JAX runs on, else XLA).
"""

from __future__ import annotations

import jax

BACKENDS = ("auto", "tpu", "gpu", "xla")


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
