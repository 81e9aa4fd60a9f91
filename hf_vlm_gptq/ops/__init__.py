"""Pure tensor math and low-bit modules (no model knowledge): grids, Hessians, GPTQ / RTN solves,
GPTQ checkpoint packing, and the QuantLinear / QuantConv modules with their kernel paths."""

from .gptq import QuantResult, gptq_quantize, gptq_quantize_shared
from .grid import QuantGrid, dequantize, find_params, quantize_codes
from .hessian import HessianAccumulator, unfold_conv_input
from .packing import pack_gptq, unpack_gptq
from .qmodules import QuantConv, QuantLinear, set_dequant_cache
from .rtn import rtn_quantize

__all__ = [
    "HessianAccumulator",
    "QuantConv",
    "QuantGrid",
    "QuantLinear",
    "QuantResult",
    "dequantize",
    "find_params",
    "gptq_quantize",
    "gptq_quantize_shared",
    "pack_gptq",
    "quantize_codes",
    "rtn_quantize",
    "set_dequant_cache",
    "unfold_conv_input",
    "unpack_gptq",
]
