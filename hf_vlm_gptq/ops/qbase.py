"""``PackedWeightModule``: the GPTQ buffer set, the lazy derived-weight caches and the torch ops shared by
``QuantLinear`` and ``QuantConv``; which kernel computes a matmul is the business of ``backends/``.

Torch custom ops wrap the modules' matmul and dequantization (``hf_vlm_gptq::packed_matmul`` for inference,
``hf_vlm_gptq::packed_linear`` when a gradient is needed, ``hf_vlm_gptq::dequantize``), for what plain Python
dispatch cannot give:

* ``torch.compile``: the path choice, the derived-weight caches (keyed on the buffers' pointers and versions)
  and the kernels (ctypes, Triton launchers) are Python that dynamo cannot trace; inside a custom op they run
  as in eager, and the op's fake implementation gives dynamo the output's shape, so a compiled model is traced
  once per input shape class, without graph breaks in the packed layers.
* training (QLoRA-style adapters, ``is_trainable``): the packed weight is frozen; the op's backward gives the
  input's gradient ``grad @ dequantize(W)`` (and the bias's, if it requires one), re-dequantizing the weight
  then instead of keeping a dense copy alive between forward and backward. No kernel needs autograd support.

The ops take the module's buffers (so the graph sees what they read) and an integer handle naming the module
(its registry entry, made when the module is built, copied or unpickled). Plain eager calls without gradients
skip the ops (no dispatcher overhead): :meth:`PackedWeightModule._linear` picks.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..threads import CPU_PRESSURE, intra_op_threads
from .backends import BACKENDS, Backend, choose_remembered
from .grid import check_bits, check_group_size, num_groups
from .packing import PACKED_BUFFERS, dequantize_packed, pack_gptq, packed_rows
from .result import QuantResult

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# handle -> weak reference to its module, for the custom ops (entries go with their module)
_MODULES: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)


def _register(module: PackedWeightModule) -> None:
    handle = next(_HANDLES)
    _MODULES[handle] = weakref.ref(module, lambda _ref, h=handle: _MODULES.pop(h, None))
    module._op_handle = handle


def _module(handle: int) -> PackedWeightModule:
    ref = _MODULES.get(int(handle))
    module = None if ref is None else ref()
    if module is None:
        raise RuntimeError(f"hf_vlm_gptq: no packed module with handle {handle} (it was freed)")
    return module


# Inference: a plain torch.library op (no autograd kernel, no per-call aliasing check: less fixed cost than
# custom_op's wrapper, which a compiled decode step pays for every packed layer); training: the custom_op
# below, whose autograd formula gives the input's gradient.
_LIB = torch.library.Library("hf_vlm_gptq", "FRAGMENT")
_LIB.define("packed_matmul(Tensor x2, Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor? bias, "
            "int handle) -> Tensor")


def _packed_matmul_impl(x2, qweight, qzeros, scales, g_idx, bias, handle):
    return _module(handle)._matmul(x2, bias)


_LIB.impl("packed_matmul", _packed_matmul_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("hf_vlm_gptq::packed_matmul", lib=_LIB)
def _packed_matmul_fake(x2, qweight, qzeros, scales, g_idx, bias, handle):
    return x2.new_empty(x2.shape[0], scales.shape[1])


@torch.library.custom_op("hf_vlm_gptq::packed_linear", mutates_args=())
def packed_linear(x2: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, bias: torch.Tensor | None, handle: int) -> torch.Tensor:
    """``x2[M, in] @ W^T + bias`` of the packed module ``handle`` through its eager path choice."""
    return _module(handle)._matmul(x2, bias)


@packed_linear.register_fake
def _packed_linear_fake(x2, qweight, qzeros, scales, g_idx, bias, handle):
    return x2.new_empty(x2.shape[0], scales.shape[1])


def _packed_linear_setup(ctx, inputs, output) -> None:
    _x2, qweight, qzeros, scales, g_idx, bias, handle = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)  # the module's own buffers: nothing is copied
    ctx.handle = handle
    ctx.bias_dtype = None if bias is None else bias.dtype


def _packed_linear_backward(ctx, grad: torch.Tensor):
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dequantize_op(qweight, qzeros, scales, g_idx, ctx.handle, grad.dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None


packed_linear.register_autograd(_packed_linear_backward, setup_context=_packed_linear_setup)


@torch.library.custom_op("hf_vlm_gptq::dequantize", mutates_args=())
def dequantize_op(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                  handle: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[out, in]`` of the packed module ``handle`` in ``dtype`` (a copy, never its cache)."""
    module = _module(handle)
    w = module.dequantize_weight(dtype)
    return w.clone() if module.cache_dequantized else w


@dequantize_op.register_fake
def _dequantize_fake(qweight, qzeros, scales, g_idx, handle, dtype):
    return qweight.new_empty(scales.shape[1], g_idx.shape[0], dtype=dtype)


def check_positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    return v


class PackedWeightModule(nn.Module):
    """Shared buffer set, derived-weight caches and kernel dispatch for QuantLinear / QuantConv."""

    cache_dequantized: bool = False

    def _init_packed(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got bias={bias!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
        self.weight_dtype = dtype
        self.kernel = "auto"
        self._cache: dict = {}
        _register(self)
        n_groups = num_groups(in_features, group_size)
        cols = torch.arange(in_features, dtype=torch.int32, device=device)
        i32 = {"dtype": torch.int32, "device": device}
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_rows(out_features, bits), **i32))
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("g_idx", torch.zeros_like(cols) if group_size == -1 else cols // group_size)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def __setstate__(self, state) -> None:  # copy.copy / deepcopy / unpickling: a handle of its own
        super().__setstate__(state)
        self._cache = {}
        _register(self)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])

    def _load_result(self, result: QuantResult, bias: torch.Tensor | None) -> None:
        if (result.bits, result.group_size) != (self.bits, self.group_size):
            raise ValueError(
                f"result has bits={result.bits}, group_size={result.group_size}; this module has "
                f"bits={self.bits}, group_size={self.group_size}"
            )
        if result.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"result shape {result.shape} does not match ({self.out_features}, {self.in_features})"
            )
        for name, tensor in pack_gptq(
            result.codes, result.scales, result.zeros, result.g_idx, result.bits
        ).items():
            getattr(self, name).copy_(tensor)
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
            self.bias.data.copy_(bias.detach())

    # -- caches ---------------------------------------------------------------------------------------
    def _stamp(self) -> tuple:
        # inference tensors (made under torch.inference_mode) carry no version counter: their pointer must do.
        # Read from _buffers, not through getattr: Module.__getattr__ costs ~1 us a name on every matmul
        buffers, stamp = self._buffers, []
        for name in PACKED_BUFFERS:
            t = buffers[name]
            stamp.append((t.data_ptr(), 0 if t.is_inference() else t._version, t.device))
        return tuple(stamp)

    def _cached(self, key: tuple, build):
        stamp = self._stamp()
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = build()
        self._cache[key] = (stamp, value)
        return value

    def clear_cache(self) -> None:
        """Drop derived weights (kernel formats, dequantized copies)."""
        self._cache = {}

    def _apply(self, fn, recurse: bool = True):
        self.clear_cache()
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device))
        scales = self._buffers.get("scales")
        keep = scales is not None and scales.is_floating_point() and scales.element_size() in _INT_VIEW
        if keep:  # a bit-cast integer view is moved by fn but never cast
            self._buffers["scales"] = scales.view(_INT_VIEW[scales.element_size()])
        try:
            super()._apply(fn, recurse)
        finally:
            if keep:
                self._buffers["scales"] = self._buffers["scales"].view(scales.dtype)
        if probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
        return self

    # -- weights --------------------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` as ``scale * (code - zero)`` in ``dtype`` (default ``weight_dtype``)."""
        dtype = dtype or self.weight_dtype
        if self.qweight.is_meta:
            return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")
        if torch.compiler.is_compiling():  # the caches are not traceable: the op runs them
            return dequantize_op(self.qweight, self.qzeros, self.scales, self.g_idx, self._op_handle, dtype)
        if not self.cache_dequantized:
            return self._dequantize(dtype)
        return self._cached(("dense", dtype), lambda: self._dequantize(dtype))

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_packed(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            bits=self.bits,
            in_features=self.in_features,
            out_features=self.out_features,
            group_size=self.group_size,
            dtype=dtype,
        )

    def _prepare(self, backend: Backend | str, x2: torch.Tensor) -> Any:
        """``backend``'s weights for inputs like ``x2`` (built once, cached until the buffers change), or why
        it cannot serve this layer / input."""
        backend = BACKENDS[backend] if isinstance(backend, str) else backend
        reason = backend.unavailable_reason(self, x2.dtype, x2.device)
        if reason is not None:
            return reason
        if not backend.caches:
            return backend.prepare(self, x2)
        return self._cached((backend.name, x2.device, x2.dtype), lambda: backend.prepare(self, x2))

    def _linear(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2[M, in] @ W^T + bias``: through the custom op when compiling or when a gradient is needed (the
        packed weight stays frozen), else straight through :meth:`_matmul`."""
        if torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)):
            return packed_linear(x2, self.qweight, self.qzeros, self.scales, self.g_idx, bias, self._op_handle)
        if torch.compiler.is_compiling():
            return torch.ops.hf_vlm_gptq.packed_matmul(x2, self.qweight, self.qzeros, self.scales, self.g_idx, bias,
                                                       self._op_handle)
        return self._matmul(x2, bias)

    def _matmul(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2[M, in] @ W^T + bias`` through the backend ``self.kernel`` names or "auto" picks
        (``backends.choose``, remembered per kind of input: ``choose_remembered``); on fewer threads while other
        work waits for the cores (``threads.CPU_PRESSURE``)."""
        backend, weights = choose_remembered(self, x2, self.kernel)
        bias = None if bias is None else bias.to(x2.dtype)
        if x2.device.type == "cpu" and (count := torch.get_num_threads()) > 1:
            share = CPU_PRESSURE.threads(count)
            if share < count:
                with intra_op_threads(share):
                    return backend.matmul(self, x2, weights, bias)
        return backend.matmul(self, x2, weights, bias)

    def forward_reference(self, x2: torch.Tensor) -> torch.Tensor:
        """Reference ``x2 @ dequantize(W)^T + bias`` in x's dtype (what every path must match)."""
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return F.linear(x2, self._dequantize(x2.dtype), bias)
