"""jaxinfer's Pallas kernels, each beside its pure-jnp reference twin (the XLA / CPU path)."""

from pallas_kernels._dispatch import (BACKENDS, INTERPRET_BACKENDS, UnsupportedInput,
                                      resolve_backend)
from pallas_kernels.attention import decode_attention, flash_attention
from pallas_kernels.decode_attention_gpu import decode_attention_gpu
from pallas_kernels.decode_attention_tpu import decode_attention_tpu
from pallas_kernels.flash_attention_gpu import flash_attention_gpu
from pallas_kernels.flash_attention_tpu import flash_attention_tpu
from pallas_kernels.quantize import (QuantizedWeight, dequantize_ref, quantize_weights,
                                     quantized_matmul_ref)
from pallas_kernels.quantized_matmul import quantized_matmul
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention_ref import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu

__all__ = ["BACKENDS", "INTERPRET_BACKENDS", "UnsupportedInput", "resolve_backend",
           "flash_attention", "decode_attention", "flash_attention_tpu", "flash_attention_gpu",
           "decode_attention_tpu", "decode_attention_gpu",
           "QuantizedWeight", "quantize_weights", "quantized_matmul", "quantized_matmul_ref",
           "dequantize_ref",
           "ragged_paged_attention", "ragged_paged_attention_ref", "ragged_paged_attention_tpu",
           "ragged_paged_attention_gpu"]
