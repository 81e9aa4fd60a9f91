"""The dequantization of ``packing.dequantize_packed`` as a C kernel for CPUs with AVX2 + FMA + F16C
(``csrc/dequant_avx2.c``, compiled on first use; built, cached and loaded by ``kernel_cache.py``).

It writes the whole weight ``[out, in]`` straight from the checkpoint buffers (``qweight``, v1 ``qzeros``,
float16 ``scales``, ``g_idx``: any group per column) in float32, bfloat16 or float16, bit for bit what the
torch path gives (``scale * (code - zero)`` in float32, one cast, round to nearest even), for 2, 4 and 8
bits; blocks of 8 output rows are spread over the threads. The output's whole 2 MB pages are advised as
transparent huge pages before they are first written (``madvise``; first-touch page faults of a fresh output
otherwise cost about as much as the work).

Checked once per process before use, by the check ``packing.py`` passes (bit equality with the torch path on
probe layers). Unavailable (and the torch path used) without Linux on x86-64 with AVX2 + FMA + F16C, a
compiler, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import kernel_cache

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
KERNEL = kernel_cache.KernelSource(
    source=Path(__file__).with_name("csrc") / "dequant_avx2.c",
    cflags=("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"),
    symbol="hvg_dequant_avx2",
    argtypes=(_P, _P, _I64, _P, _P, _I64, _I64, _I64, _INT, _INT, _P, _INT),
    required_cpu_flags=("avx2", "fma", "f16c"),
    what="CPU dequantization kernel",
)
DEQUANT_BITS = (2, 4, 8)
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SERIAL_ELEMS = 1 << 18  # weights with fewer values are done by one thread (fork / join costs more)

# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


# the kernel once built, loaded and self-checked; why not (kernel_cache.module_kernel)
checked_kernel, unavailable_reason = kernel_cache.module_kernel(KERNEL, __name__)


def serves(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
           in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether :func:`call` takes these buffers: CPU tensors of the checkpoint's dtypes and shapes, 2 / 4 /
    8 bits, a float32 / bfloat16 / float16 output and every ``g_idx`` a group of ``scales``. Anything else
    goes to the torch path (which raises for what it cannot read)."""
    if bits not in DEQUANT_BITS or dtype not in OUT_KINDS:
        return False
    tensors = (qweight, qzeros, scales, g_idx)
    if any(t.device.type != "cpu" or t.dim() != (1 if t is g_idx else 2) for t in tensors):
        return False
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype != torch.float16:
        return False
    if g_idx.dtype not in (torch.int32, torch.int64):
        return False
    per_word = 32 // bits
    n_groups = scales.shape[0]
    if in_features <= 0 or out_features <= 0 or n_groups <= 0 or tuple(g_idx.shape) != (in_features,):
        return False
    if qweight.shape[1] != out_features or qweight.shape[0] * per_word < in_features:
        return False
    if scales.shape[1] != out_features or qzeros.shape[0] != n_groups or qzeros.shape[1] * per_word < out_features:
        return False
    return int(g_idx.min()) >= 0 and int(g_idx.max()) < n_groups


def call(fn, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
         in_features: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[out, in]`` (contiguous) in ``dtype`` through the kernel ``fn``, for buffers that
    :func:`serves` accepts (it indexes memory with them unchecked)."""
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    out = torch.empty(out_features, in_features, dtype=dtype)
    threads = 1 if out.numel() < SERIAL_ELEMS else torch.get_num_threads()
    rc = fn(qweight.data_ptr(), qzeros.data_ptr(), qzeros.shape[1], scales.data_ptr(), g_idx.data_ptr(),
            scales.shape[0], out_features, in_features, bits, OUT_KINDS[dtype], out.data_ptr(), threads)
    if rc != 0:
        raise RuntimeError(f"CPU dequantization kernel failed (code {rc}) for a {bits}-bit "
                           f"{out_features}x{in_features} weight")
    return out
