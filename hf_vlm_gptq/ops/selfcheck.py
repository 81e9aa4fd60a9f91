"""The one self-check helper: a fast path is compared with its reference on the device before it is trusted.

Every kernel that cannot be tested on the development host (the fused CPU kernel, torch's CUDA int4 kernel,
the Triton matmul, the Triton GPTQ sweep) is checked with :func:`self_check` the first time it would serve
(once per process, per module or per device, as its caller caches the answer). A check is a sequence of
probes; each returns None when the fast path agrees with its reference, else what differs. An exception
(a compile, launch or ctypes failure) counts as a disagreement: a broken kernel must not take the model down.

Comparisons: :func:`matmul_probes` (a matmul kernel against ``F.linear`` with the reference weight, within
:data:`MATMUL_RTOL` of the largest reference output plus :data:`MATMUL_ATOL`); kernels with tighter
guarantees pass their own probes (the fused CPU kernel: elementwise bounds; the GPTQ sweep: equal codes).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MATMUL_RTOL = 0.02  # of the largest |reference output|: a wrong layout or table is far off, rounding is not
MATMUL_ATOL = 1e-3

Probe = Callable[[], "str | None"]


def self_check(what: str, probes: Iterable[Probe], fallback: str, log: logging.Logger | None = None) -> str | None:
    """Run ``probes`` in order until one disagrees or raises. Returns None when all agree, else the reason
    ``"<what> self-check failed (<detail>)"``, logged once as a warning (on ``log``) with ``fallback``
    (what is used instead)."""
    try:
        problem = next((p for p in (probe() for probe in probes) if p is not None), None)
    except Exception as exc:  # any failure of the candidate (compile, launch, ctypes) is a failed check
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return None
    reason = f"{what} self-check failed ({problem})"
    (log or logger).warning("%s; %s", reason, fallback)
    return reason


def matmul_probes(
    run: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, rows: Sequence[int]
) -> Iterator[Probe]:
    """Probes of ``run(x) ~ x @ weight^T`` for random ``x`` of each row count, in ``weight``'s dtype and on
    its device (``weight`` is the reference ``[out, in]``; a seeded generator of its own leaves the caller's
    RNG alone)."""
    gen = torch.Generator(device=weight.device).manual_seed(0)

    def probe(n: int) -> str | None:
        x = torch.randn(n, weight.shape[1], generator=gen, device=weight.device).to(weight.dtype)
        ref = F.linear(x, weight).float()
        err = (run(x).float() - ref).abs().max()
        if bool(err <= MATMUL_RTOL * ref.abs().max() + MATMUL_ATOL):
            return None
        return f"max err {float(err):.3g} at {n} rows"

    return (functools.partial(probe, n) for n in rows)
