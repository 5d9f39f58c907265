"""jaxinfer's Pallas kernels, each beside its pure-jnp reference twin (the XLA / CPU path)."""

from pallas_kernels._dispatch import BACKENDS, resolve_backend
from pallas_kernels.attention import decode_attention, flash_attention

__all__ = ["BACKENDS", "resolve_backend", "flash_attention", "decode_attention"]
