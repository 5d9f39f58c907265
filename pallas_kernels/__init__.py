"""jaxinfer's Pallas kernels, each beside its pure-jnp reference twin (the XLA / CPU path)."""

from pallas_kernels._dispatch import BACKENDS, resolve_backend
from pallas_kernels.attention import decode_attention, flash_attention
from pallas_kernels.quantize import (QuantizedWeight, dequantize_ref, quantize_weights,
                                     quantized_matmul_ref)
from pallas_kernels.quantized_matmul import quantized_matmul

__all__ = ["BACKENDS", "resolve_backend", "flash_attention", "decode_attention",
           "QuantizedWeight", "quantize_weights", "quantized_matmul", "quantized_matmul_ref",
           "dequantize_ref"]
