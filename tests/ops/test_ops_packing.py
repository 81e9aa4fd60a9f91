"""GPTQ checkpoint packing: layout, padding, round trips, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_vlm_gptq.ops import pack_gptq, unpack_gptq
from hf_vlm_gptq.ops.packing import packed_rows, padded_size


def _random_layer(out_f: int, in_f: int, bits: int, n_groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    scales = torch.rand(out_f, n_groups, generator=g) + 0.01
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=g, dtype=torch.int32)
    zeros[0, 0] = 0  # the v1 corner case: stored as 2**bits - 1
    g_idx = torch.randint(0, n_groups, (in_f,), generator=g, dtype=torch.int32)
    return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("out_f", "in_f"), [(50, 1176), (1, 3420), (33, 4304), (7, 1)])
def test_round_trip_is_exact(bits, out_f, in_f):
    codes, scales, zeros, g_idx = _random_layer(out_f, in_f, bits, 3, seed=bits * in_f + out_f)
    packed = pack_gptq(codes, scales, zeros, g_idx, bits)
    assert packed["qweight"].dtype == torch.int32
    assert packed["qweight"].shape == (padded_size(in_f, bits) * bits // 32, out_f)
    assert packed["qzeros"].dtype == torch.int32
    assert packed["qzeros"].shape == (3, padded_size(out_f, bits) * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (3, out_f)
    assert packed["g_idx"].dtype == torch.int32
    c2, s2, z2, g2 = unpack_gptq(packed, in_f, out_f, bits)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(g2, g_idx)
    assert torch.equal(s2, scales.half().float())


def test_padding_sizes():
    assert [padded_size(50, b) for b in (2, 3, 4, 8)] == [64, 64, 56, 52]
    assert packed_rows(1176, 3) == 1184 * 3 // 32
    assert packed_rows(4304, 4) == 538


def _words(packed: torch.Tensor) -> np.ndarray:
    return packed.numpy().view(np.uint32)


def test_low_bits_first_and_v1_zeros():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]], dtype=torch.uint8)  # out=1, in=9
    zeros = torch.tensor([[8]], dtype=torch.int32)
    packed = pack_gptq(codes, torch.ones(1, 1), zeros, torch.zeros(9, dtype=torch.int32), 4)
    assert _words(packed["qweight"])[:, 0].tolist() == [0x87654321, 0x9]  # second word: padding codes 0
    assert _words(packed["qzeros"]).tolist() == [[7]]  # zero - 1; padded out entries store 0 (zero 1)


def _reference_pack_3bit(values: np.ndarray) -> np.ndarray:
    """The GPTQ reference's 3-bit packing, written as its explicit word-straddling loop."""
    rows = values.shape[0] // 32 * 3
    out = np.zeros((rows, values.shape[1]), dtype=np.uint64)
    v = values.astype(np.uint64)
    i = row = 0
    while row < rows:
        for j in range(10):
            out[row] |= v[i + j] << np.uint64(3 * j)
        i += 10
        out[row] |= v[i] << np.uint64(30)
        row += 1
        out[row] |= (v[i] >> np.uint64(2)) & np.uint64(1)
        i += 1
        for j in range(10):
            out[row] |= v[i + j] << np.uint64(3 * j + 1)
        i += 10
        out[row] |= v[i] << np.uint64(31)
        row += 1
        out[row] |= (v[i] >> np.uint64(1)) & np.uint64(3)
        i += 1
        for j in range(10):
            out[row] |= v[i + j] << np.uint64(3 * j + 2)
        i += 10
        row += 1
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def test_3bit_layout_matches_reference_loop():
    codes, scales, zeros, g_idx = _random_layer(5, 64, 3, 1, seed=1)
    packed = pack_gptq(codes, scales, zeros, g_idx, 3)
    expected = _reference_pack_3bit(codes.T.numpy())
    assert np.array_equal(_words(packed["qweight"]), expected)
    zeros_expected = _reference_pack_3bit(np.pad((zeros.numpy() - 1) & 7, ((0, 27), (0, 0))))
    assert np.array_equal(_words(packed["qzeros"]).T, zeros_expected)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"bits": 5}, "bits"),
        ({"codes": torch.full((4, 8), 16, dtype=torch.uint8)}, "codes"),
        ({"codes": torch.zeros(4, 8)}, "codes"),
        ({"zeros": torch.full((4, 2), -1, dtype=torch.int32)}, "zeros"),
        ({"zeros": torch.zeros(4, 3, dtype=torch.int32)}, "zeros"),
        ({"scales": torch.ones(3, 2)}, "scales"),
        ({"scales": torch.full((4, 2), 1e6)}, "scales"),
        ({"scales": torch.full((4, 2), float("nan"))}, "scales"),
        ({"g_idx": torch.full((8,), 2, dtype=torch.int32)}, "g_idx"),
        ({"g_idx": torch.zeros(7, dtype=torch.int32)}, "g_idx"),
    ],
)
def test_pack_validates_arguments(change, name):
    args = {
        "codes": torch.zeros(4, 8, dtype=torch.uint8),
        "scales": torch.ones(4, 2),
        "zeros": torch.full((4, 2), 8, dtype=torch.int32),
        "g_idx": torch.zeros(8, dtype=torch.int32),
        "bits": 4,
    }
    args.update(change)
    with pytest.raises(ValueError, match=name):
        pack_gptq(**args)


def test_unpack_validates_arguments():
    codes, scales, zeros, g_idx = _random_layer(16, 64, 4, 2, seed=3)
    packed = pack_gptq(codes, scales, zeros, g_idx, 4)
    with pytest.raises(ValueError, match="qweight"):
        unpack_gptq(packed, 63 + 16, 16, 4)
    with pytest.raises(ValueError, match="qzeros"):
        unpack_gptq({**packed, "qzeros": packed["qzeros"][:, :1]}, 64, 16, 4)
    with pytest.raises(ValueError, match="g_idx"):
        unpack_gptq({k: v for k, v in packed.items() if k != "g_idx"}, 64, 16, 4)
    with pytest.raises(ValueError, match="in_features"):
        unpack_gptq(packed, 0, 16, 4)
    with pytest.raises(ValueError, match="bits"):
        unpack_gptq(packed, 64, 16, 7)
