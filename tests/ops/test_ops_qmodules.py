"""QuantLinear / QuantConv: every matmul path against the reference, checkpoint round trips, caches, args."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from hf_vlm_gptq.ops import QuantConv, QuantLinear, gptq_quantize, rtn_quantize, set_dequant_cache
from hf_vlm_gptq.ops import cpu_avx2 as A
from hf_vlm_gptq.ops import cpu_fused as CF
from hf_vlm_gptq.ops.backends import BACKENDS, MAX_BATCH
from hf_vlm_gptq.ops.backends import int4 as I4
from hf_vlm_gptq.ops.packing import contiguous_groups

from .helpers import correlated_hessian, set_amx_kernel_aside


def _result(
    out_f: int, in_f: int, bits: int = 4, group_size: int = 32, act_order: bool = False, sym: bool = True
):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    if act_order:
        return gptq_quantize(
            w,
            correlated_hessian(in_f, seed=1).float(),
            bits=bits,
            group_size=group_size,
            sym=sym,
            act_order=True,
        )
    return rtn_quantize(w, bits=bits, group_size=group_size, sym=sym)


def _rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return float((y.double() - exact).norm() / exact.norm())


def _check_close_to_reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y`` must be as close to the exact result as the reference (dequantize + dense op in x's dtype) is,
    up to a small factor: i.e. it agrees within the dtype's rounding."""
    x2 = x.reshape(-1, module.in_features)
    w64 = module.dequantize_weight(torch.float64)
    b64 = None if module.bias is None else module.bias.to(x.dtype).double()
    exact = F.linear(x2.double(), w64, b64)
    ref = module.forward_reference(x2)
    tol = max(2 * _rel_err(ref, exact), torch.finfo(x.dtype).eps / 4)
    assert _rel_err(y.reshape(exact.shape), exact) <= tol


@pytest.fixture
def count_int4(monkeypatch):
    calls = []
    real = I4.int4_matmul

    def spy(x2, w):
        calls.append(x2.shape[0])
        return real(x2, w)

    monkeypatch.setattr(I4, "int4_matmul", spy)
    return calls


def test_int4_kernel_convention_is_asymmetric_with_float_zero():
    """Checked by experiment: the CPU kernel computes w = (q - 8) * scale + zero_f per group."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    s, z = torch.rand(2, 32, generator=g) + 0.5, torch.randn(2, 32, generator=g)
    table = torch.stack([s, z], -1).to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, table)
    sf, zf = table.float().repeat_interleave(32, 0).unbind(-1)
    w = (q.float() - 8) * sf.T + zf.T
    assert torch.allclose(y.float(), x.float() @ w.T, rtol=2e-2, atol=0.3)
    assert not torch.allclose(y.float(), x.float() @ (q.float() * sf.T + zf.T).T, rtol=2e-2, atol=0.3)


@pytest.mark.parametrize(
    ("group_size", "act_order", "sym"), [(32, False, True), (64, True, False), (128, True, True)]
)
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_path_matches_reference(group_size, act_order, sym, rows, count_int4):
    res = _result(48, 256, 4, group_size, act_order, sym)
    m = QuantLinear.from_result(res, torch.randn(48), torch.bfloat16)
    m.kernel = "int4"
    x = torch.randn(rows, 3, 256).to(torch.bfloat16)
    y = m(x)
    assert count_int4 == [rows * 3] and y.shape == (rows, 3, 48) and y.dtype == torch.bfloat16
    _check_close_to_reference(m, x, y)
    if act_order:
        assert not contiguous_groups(m.g_idx, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cached", [False, True])
def test_dequant_path_matches_reference(bits, dtype, cached):
    res = _result(50, 100, bits, 32, act_order=bits == 3)  # 100 columns: partial last group
    bias = torch.randn(50)
    m = QuantLinear.from_result(res, bias, dtype)
    m.kernel, m.cache_dequantized = "dequant", cached
    x = torch.randn(4, 100).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    # independent of the module: float64 scale * (code - zero) from the solve (scales stored as fp16), matmul
    g = res.g_idx.long()
    w64 = res.scales.half().double()[:, g] * (res.codes.double() - res.zeros[:, g].double())
    exact = x.double() @ w64.T + bias.to(dtype).double()
    # only x.dtype's rounding: in float32 the weight is exact and only the sums round (measured <= 1.6 eps);
    # in 16 bits the weight and the output round once each (measured <= 0.32 eps)
    assert _rel_err(y, exact) <= torch.finfo(dtype).eps * (4 if dtype == torch.float32 else 1)
    assert torch.equal(m.dequantize_weight(torch.float32), w64.float())


@pytest.fixture(params=["fused kernel", "no fused kernel", "no CPU kernel"])
def fused_available(request, monkeypatch) -> bool:
    """Run a test with the fused CPU kernel as this host has it, and as on a CPU without it (with the AVX2
    kernel as this host has it, or without that one either); never the AMX kernel (its own tests say where it
    serves)."""
    set_amx_kernel_aside(monkeypatch)
    if request.param == "no CPU kernel":
        monkeypatch.setattr(A, "kernel_unavailable_reason", lambda: "simulated CPU without AVX2")
    if request.param != "fused kernel":
        monkeypatch.setattr(CF, "kernel_unavailable_reason", lambda: "simulated CPU without the kernel")
        return False
    if CF.kernel_unavailable_reason() is not None:
        pytest.skip("the fused CPU kernel is unavailable on this host")
    return True


def _int4_most_rows_beside_the_fma_kernel(m) -> int:
    """The most rows torch's int4 kernel takes when the FMA kernel is its alternative (the column of the build
    that serves), or every batch without that kernel."""
    if A.kernel_unavailable_reason() is not None:
        return 1 << 30
    return MAX_BATCH["cpu"]["int4"][BACKENDS["avx2"].variant(m, None)]


@pytest.mark.parametrize("act_order", [False, True])
def test_auto_sends_only_small_bf16_batches_to_int4(count_int4, fused_available, act_order, monkeypatch):
    """Facts of the CPU policy (ops/backends), not its thresholds: the int4 kernel takes a range of small bf16
    batches starting at 1 row (none when the fused kernel's small-batch path serves the layer), never a big
    one, fewer rows when a dense weight is kept, and never float32; the fused kernel, where it serves the
    layer, takes every batch the int4 kernel does not."""
    fused_rows = []
    real_fused = CF.fused_matmul
    monkeypatch.setattr(CF, "fused_matmul", lambda x2, *a: fused_rows.append(x2.shape[0]) or real_fused(x2, *a))
    m = QuantLinear.from_result(_result(32, 128, 4, 32, act_order=act_order), None, torch.bfloat16)
    probe = (1, 2, 4, 8, 16, 64, 256, 1024)
    to_int4 = {}
    for cached in (False, True):
        m.cache_dequantized = cached
        count_int4.clear()
        fused_rows.clear()
        for rows in probe:
            m(torch.randn(rows, 128).to(torch.bfloat16))
        to_int4[cached] = list(count_int4)
        assert to_int4[cached] == list(probe[: len(to_int4[cached])])  # 1 row up to some batch, then no more
        assert 1024 not in to_int4[cached]
        others = [rows for rows in probe if rows not in to_int4[cached]]
        assert fused_rows == (others if fused_available else [])
    # int4 keeps 1 row unless a kernel with a small-batch path that beats it serves the layer: the fused one
    # (consecutive groups only), or the FMA kernel's AVX-512 build (act-order through its sorted copy)
    one_row_int4 = not fused_available or act_order  # the fused small-batch path needs consecutive groups
    assert all((1 in rows) == one_row_int4 for rows in to_int4.values())
    assert len(to_int4[True]) <= len(to_int4[False])  # a kept dense weight makes the fallback cheaper
    count_int4.clear()
    m(torch.randn(1, 128))  # float32: the CPU kernel has no fast fp32 path
    assert count_int4 == []


@pytest.mark.parametrize(
    ("bits", "group_size", "out_f", "dtype", "why"),
    [
        (8, 32, 32, torch.bfloat16, "bits"),
        (4, 48, 32, torch.bfloat16, "group_size"),
        (4, 32, 40, torch.bfloat16, "out_features"),
        (4, 32, 32, torch.float16, "dtype"),
    ],
)
def test_forcing_int4_where_unsupported_raises_with_the_reason(bits, group_size, out_f, dtype, why):
    m = QuantLinear.from_result(_result(out_f, 96, bits, group_size), None, dtype)
    m.kernel = "int4"
    with pytest.raises(ValueError, match=why):
        m(torch.randn(1, 96).to(dtype))
    m.kernel = "auto"  # auto silently falls back to another path
    x = torch.randn(1, 96).to(dtype)
    _check_close_to_reference(m, x, m(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_path_matches_reference():
    m = QuantLinear.from_result(
        _result(64, 256, 4, 64, act_order=True), torch.randn(64), torch.bfloat16
    ).cuda()
    m.kernel = "int4"
    x = torch.randn(3, 256, device="cuda").to(torch.bfloat16)
    _check_close_to_reference(m, x, m(x))


def test_state_dict_round_trip_through_safetensors():
    res = _result(48, 200, 3, 64, act_order=True)
    m = QuantLinear.from_result(res, torch.randn(48), torch.float16)
    blob = st_save(m.state_dict())
    sd = st_load(blob)
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert sd["scales"].dtype == torch.float16 and sd["qweight"].dtype == torch.int32
    with torch.device("meta"):
        fresh = QuantLinear(200, 48, 3, 64, True, torch.float16)
    assert fresh.weight.shape == (48, 200)  # answers on meta without data
    fresh.load_state_dict(sd, assign=True)
    x = torch.randn(2, 200).half()
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.dequantize_weight(torch.float32), m.dequantize_weight(torch.float32))


def test_caches_follow_buffer_updates():
    a = QuantLinear.from_result(_result(32, 128, 4, 32), None, torch.bfloat16)
    b = QuantLinear.from_result(  # asymmetric: other zero points too
        rtn_quantize(torch.randn(32, 128), bits=4, group_size=32, sym=False), None, torch.bfloat16
    )
    a.cache_dequantized = True
    kernels = ["int4", "dequant"]
    if CF.kernel_unavailable_reason() is None:
        kernels.append("fused")
    xs = torch.randn(1, 128).to(torch.bfloat16), torch.randn(64, 128).to(torch.bfloat16)
    for kernel in kernels:  # builds the int4 weights, the dense cache, the fused kernel's zero points
        a.kernel = kernel
        [a(x) for x in xs]
    a.load_state_dict(b.state_dict())  # in-place copy into the same buffers
    for kernel in kernels:
        a.kernel = b.kernel = kernel
        for x in xs:
            assert torch.equal(a(x), b(x)), kernel


def test_module_casts_keep_checkpoint_scales():
    m = QuantLinear.from_result(_result(16, 64), torch.randn(16), torch.float16)
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and m.qweight.dtype == torch.int32
    assert (
        m.bias.dtype == torch.bfloat16
        and m.weight_dtype == torch.bfloat16
        and m.weight.dtype == torch.bfloat16
    )
    m.float()
    assert m.scales.dtype == torch.float16 and m.weight.dtype == torch.float32


def test_set_dequant_cache_reaches_nested_modules():
    model = nn.Sequential(QuantLinear(32, 16, 4, 32, False), nn.ReLU(), QuantLinear(16, 8, 4, -1, False))
    assert set_dequant_cache(model, True) == 2
    assert all(m.cache_dequantized for m in model if isinstance(m, QuantLinear))


def test_qwen2_vl_style_patch_embed():
    conv = nn.Conv3d(3, 32, (2, 14, 14), stride=(2, 14, 14), bias=False)
    rows = torch.randn(10, 3 * 2 * 14 * 14)
    res = gptq_quantize(
        conv.weight.detach().reshape(32, -1), (rows.T @ rows) * (2 / 10), bits=4, group_size=-1
    )
    q = QuantConv.from_result(res, conv)
    assert q.weight.shape == conv.weight.shape and q.weight.dtype == conv.weight.dtype
    x = rows.view(-1, 3, 2, 14, 14).to(q.weight.dtype)
    y = q(x)
    assert y.shape == (10, 32, 1, 1, 1)
    assert torch.allclose(y, F.conv3d(x, q.weight), atol=1e-4)
    assert torch.allclose(q(rows).view(10, 32), y.view(10, 32), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_patch_and_general_paths_match_reference(dtype, count_int4, fused_available):
    conv2 = nn.Conv2d(4, 16, 4, stride=4, bias=True)  # patchify: 4*4*4 = 64 columns, group 32
    res = rtn_quantize(conv2.weight.detach().reshape(16, -1), bits=4, group_size=32)
    q = QuantConv.from_result(res, conv2, dtype=dtype)
    x = torch.randn(2, 4, 9, 10).to(dtype)  # 9 x 10 is not a multiple of 4: the conv drops the rest
    ref = F.conv2d(x, q.dequantize_weight(dtype).view(16, 4, 4, 4), conv2.bias.detach().to(dtype), stride=4)
    y = q(x)
    assert y.shape == ref.shape == (2, 16, 2, 2)
    assert torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # 8 patch rows in bf16: the fused kernel where the CPU has it, else torch's int4 kernel where the table
    # gives it 8 rows beside the FMA kernel (its AVX2 build), else the FMA kernel
    int4 = dtype == torch.bfloat16 and not fused_available and _int4_most_rows_beside_the_fma_kernel(q) >= 8
    assert len(count_int4) == (1 if int4 else 0)
    conv3 = nn.Conv3d(2, 8, 3, stride=(1, 2, 1), padding=1, bias=False)
    q3 = QuantConv.from_result(rtn_quantize(conv3.weight.detach().reshape(8, -1), bits=8), conv3, dtype=dtype)
    x3 = torch.randn(1, 2, 5, 6, 4).to(dtype)
    ref3 = F.conv3d(x3, q3.weight, None, (1, 2, 1), 1)
    assert torch.equal(q3(x3), ref3)
    assert q3(x3[0]).shape == ref3.shape[1:]  # unbatched input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 5}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": True}, "group_size"),
        ({"group_size": 32.0}, "group_size"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": 2.5}, "out_features"),
        ({"bias": 1}, "bias"),
        ({"dtype": torch.int8}, "dtype"),
    ],
)
def test_quant_linear_rejects_bad_arguments(kwargs, name):
    args = {"in_features": 64, "out_features": 32, "bits": 4, "group_size": 32, "bias": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        QuantLinear(**args)


def test_mismatched_shapes_raise():
    res = _result(32, 64)
    m = QuantLinear(64, 16, 4, 32, True)
    with pytest.raises(ValueError, match="shape"):
        m._load_result(res, None)
    with pytest.raises(ValueError, match="bias"):
        QuantLinear.from_result(res, torch.randn(31))
    with pytest.raises(ValueError, match="64"):
        QuantLinear.from_result(res)(torch.randn(2, 63))
    m.kernel = "fast"
    with pytest.raises(ValueError, match="kernel"):
        m(torch.randn(1, 64))


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"conv_kind": "conv1d"}, "conv_kind"),
        ({"kernel_size": (2, 2)}, "kernel_size"),
        ({"stride": 0}, "stride"),
        ({"padding": -1}, "padding"),
        ({"in_channels": 0}, "in_channels"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_quant_conv_rejects_bad_arguments(change, name):
    args = {
        "conv_kind": "conv3d",
        "in_channels": 3,
        "out_channels": 8,
        "kernel_size": (2, 4, 4),
        "stride": (2, 4, 4),
        "padding": 0,
        "bits": 4,
        "group_size": -1,
        "bias": False,
    }
    args.update(change)
    with pytest.raises(ValueError, match=name):
        QuantConv(**args)
    with pytest.raises(ValueError, match="groups"):
        QuantConv.from_result(_result(4, 18), nn.Conv2d(4, 4, 3, groups=2))


def test_loading_a_result_with_other_bits_or_groups_raises():
    m = QuantLinear(64, 32, 4, 32, False)
    with pytest.raises(ValueError, match="bits"):
        m._load_result(_result(32, 64, bits=3, group_size=32), None)
    with pytest.raises(ValueError, match="group_size"):
        m._load_result(_result(32, 64, bits=4, group_size=16), None)


def test_module_built_under_inference_mode_runs_every_path():
    g = torch.Generator().manual_seed(0)
    result = rtn_quantize(torch.randn(64, 128, generator=g), bits=4, group_size=32)
    with torch.inference_mode():
        q = QuantLinear.from_result(result, bias=None, dtype=torch.bfloat16)
        for rows, cached in ((1, False), (300, False), (300, True)):
            q.cache_dequantized = cached
            x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
            _check_close_to_reference(q, x, q(x))
