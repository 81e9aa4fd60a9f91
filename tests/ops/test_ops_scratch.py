"""MatrixPool (ops/scratch.py): what it keeps and hands out, and solves and Hessians from a pool of dirty
matrices equal to those from fresh memory, bit for bit."""

from __future__ import annotations

import pytest
import torch

from hf_vlm_gptq.ops import AsymmetricAccumulator, HessianAccumulator, gptq_quantize_shared
from hf_vlm_gptq.ops.scratch import MAX_PER_SHAPE, MIN_BYTES, MatrixPool

from .helpers import correlated_hessian, correlated_inputs, weight

N = 512  # 512 x 512 float32 = 1 MiB, the smallest matrix the pool keeps


def test_a_given_back_matrix_is_handed_out_again_for_its_shape_and_dtype():
    pool = MatrixPool()
    m = torch.empty(N, N)
    pool.give(m)
    assert pool.take((N, N), torch.float64, "cpu").data_ptr() != m.data_ptr()  # another dtype: fresh
    assert pool.take((N, N), torch.float32, "cpu").data_ptr() == m.data_ptr()
    assert pool.take((N, N), torch.float32, "cpu").data_ptr() != m.data_ptr()  # taken: gone from the pool
    assert (pool.reused, pool.fresh) == (1, 2)


def test_views_small_tensors_and_repeats_are_not_kept():
    pool = MatrixPool()
    big = torch.empty(2 * N, N)
    pool.give(big[:N], big.t(), torch.empty(8, 8), None)  # a row slice, a transpose, a small matrix
    assert pool.kept_bytes == 0
    m = torch.empty(N, N)
    pool.give(m, m)
    assert pool.kept_bytes == N * N * 4
    pool.give(*[torch.empty(N, N) for _ in range(MAX_PER_SHAPE + 2)])
    assert pool.kept_bytes == MAX_PER_SHAPE * N * N * 4
    assert MIN_BYTES == N * N * 4
    pool.clear()
    assert pool.kept_bytes == 0


def _dirty_pool(count: int = MAX_PER_SHAPE) -> MatrixPool:
    pool = MatrixPool()
    pool.give(*[torch.full((N, N), float("nan")) for _ in range(count)])
    return pool


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"group_order": True, "gptaq": True}])
def test_a_solve_from_a_pool_of_dirty_matrices_equals_a_fresh_solve(options):
    options = dict(options)
    h = correlated_hessian(N, seed=3).float()
    ws = [weight(48, N, seed=4).float(), weight(16, N, seed=5).float()]
    cross = 0.01 * correlated_hessian(N, seed=6).float() if options.pop("gptaq", False) else None
    common = dict(bits=4, group_size=128, clip=True, gptaq_cross=cross, **options)
    fresh = gptq_quantize_shared(ws, h, **common)
    pool = _dirty_pool()
    for _ in range(2):  # the second solve takes the first one's matrices back out
        pooled = gptq_quantize_shared(ws, h, pool=pool, **common)
        for a, b in zip(fresh, pooled):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
            assert torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)
            assert a.loss == b.loss
    assert pool.reused >= 4 and pool.kept_bytes > 0


@pytest.mark.parametrize("cls", [HessianAccumulator, AsymmetricAccumulator])
def test_an_accumulator_from_a_pool_of_dirty_matrices_starts_at_zero(cls):
    x = correlated_inputs(N, seed=7, rows=300).float()
    fresh, pooled = cls(N), cls(N, pool=_dirty_pool())
    for acc in (fresh, pooled):
        acc.add_batch(x[:200])
        acc.add_batch(x[200:])
    assert torch.equal(fresh.hessian, pooled.hessian)
    assert pooled.hessian.data_ptr() in {m.data_ptr() for m in pooled.matrices()}
    if cls is AsymmetricAccumulator:
        assert torch.equal(fresh.cross, pooled.cross)
