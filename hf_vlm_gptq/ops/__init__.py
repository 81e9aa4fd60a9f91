"""Pure tensor math and low-bit modules (no model knowledge): grids, Hessians, GPTQ / RTN solves,
GPTQ checkpoint packing, and the QuantLinear / QuantConv modules with their kernel paths."""

from .conv_rows import unfold_conv_input
from .gptq import QuantResult, gptaq_correction, gptq_quantize, gptq_quantize_shared, group_aware_order
from .grid import QuantGrid, dequantize, find_params, quantize_codes
from .hessian import AsymmetricAccumulator, HessianAccumulator
from .packing import pack_gptq, unpack_gptq
from .qmodules import QuantConv, QuantLinear, set_dequant_cache
from .rtn import rtn_quantize

__all__ = [
    "AsymmetricAccumulator",
    "HessianAccumulator",
    "QuantConv",
    "QuantGrid",
    "QuantLinear",
    "QuantResult",
    "dequantize",
    "find_params",
    "gptaq_correction",
    "gptq_quantize",
    "gptq_quantize_shared",
    "group_aware_order",
    "pack_gptq",
    "quantize_codes",
    "rtn_quantize",
    "set_dequant_cache",
    "unfold_conv_input",
    "unpack_gptq",
]
