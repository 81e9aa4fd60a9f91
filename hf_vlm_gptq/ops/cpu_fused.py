"""A fused low-bit GEMM for CPUs with AVX512-BF16, compiled on first use (``csrc/lowbit_gemm_avx512bf16.c``).

Why: on CPU, torch's int4 kernel is matrix-vector code (its cost grows linearly with the rows of ``x``) and
dequantize + dense matmul pays a full dequantization per call, so a 4-bit layer was slower than dense bf16
from ~10 rows up. This kernel dequantizes the weight exactly as the reference does (integer code - zero, one
float32 multiply, one rounding to bfloat16) into an L1-sized buffer chunk by chunk and runs a register-blocked
``vdpbf16ps`` GEMM on it, so it reads low-bit weights and computes at the dense bf16 rate (bench/ops.py).
2, 4 and 8 bits take that path; 4 bits also have 1-4 row paths that beat torch's int4 kernel (no
dequantized weight at all: codes become the bf16 numbers ``128 + q`` and the scale is applied per group).

It reads the checkpoint buffers as they are (``qweight``, fp16 ``scales``, ``g_idx``); the only derived
data is the zero points as uint8 ``[n_groups, out]``. Act-order (any ``g_idx``) is handled in the kernel.

The shared library is built with the system C compiler (``$CC``, else ``cc`` / ``gcc``) into a cache
directory (``$HF_VLM_GPTQ_CACHE``, else ``$XDG_CACHE_HOME/hf_vlm_gptq``, else ``~/.cache/hf_vlm_gptq``),
named by a hash of the source, flags and compiler, written under a temporary name and renamed; builds of
older sources are removed then. Without
Linux on x86-64 with AVX512F/BW/VL/VBMI/BF16, a compiler or OpenMP, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``, the
kernel is unavailable and :func:`fused_unavailable_reason` says why; callers then use the other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels import contiguous_groups

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lowbit_gemm_avx512bf16.c"
FUSED_BITS = (2, 4, 8)
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512bf16", "-mfma", "-mf16c",
          "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")
ENV_SWITCH = "HF_VLM_GPTQ_CPU_KERNEL"
_COMPILE_TIMEOUT_S = 120
SERIAL_MACS = 1 << 20

_lock = threading.Lock()
_state: dict = {}  # "lib" -> ctypes function, or "reason" -> str


@dataclass
class FusedWeights:
    """What the kernel reads for one layer, checked once (built on first use, cached by the module)."""

    qweight: torch.Tensor  # int32 [ceil(in / 8), out], the checkpoint buffer
    scales: torch.Tensor  # float16 [n_groups, out], the checkpoint buffer
    zeros: torch.Tensor  # uint8 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in], contiguous
    regular_group: int  # columns per group when g_idx is col // group (a multiple of 8, or all), else 0
    bits: int

    @property
    def small_batch_path(self) -> bool:
        """Whether the kernel's 1-4 row paths (4-bit, groups of consecutive columns) serve this layer."""
        return self.bits == 4 and self.regular_group > 0

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.zeros.shape[1]


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("HF_VLM_GPTQ_CACHE"):
        return Path(os.environ["HF_VLM_GPTQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_vlm_gptq"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_id(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cc


def _build(cc: str) -> Path:
    """Compile the kernel into the cache (once per source / flags / compiler) and return the library path."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS).encode() + _compiler_id(cc).encode()).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the fused CPU low-bit kernel into %s", target)
    for stale in target.parent.glob(f"{SOURCE.stem}-*.so"):  # builds of older sources / compilers
        if stale != target:
            stale.unlink(missing_ok=True)  # a process still using it keeps its mapping
    return target


def _load() -> None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _state["reason"] = f"disabled by {ENV_SWITCH}=0"
        return
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = f"needs Linux on x86-64, this is {platform.system()} {platform.machine()}"
        return
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        _state["reason"] = f"this CPU lacks {', '.join(missing)}"
        return
    cc = _compiler()
    if cc is None:
        _state["reason"] = "no C compiler found (set CC, or install gcc)"
        return
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _state["reason"] = f"could not build the kernel: {err}"
        logger.warning("fused CPU low-bit kernel unavailable, using the other paths: %s", err)
        return
    fn = lib.hvg_lowbit_gemm_bf16
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    _state["lib"] = fn


def _kernel():
    if not _state:  # looked for once per process; the lock only guards that first look
        with _lock:
            if not _state:
                _load()
    return _state.get("lib")


def fused_unavailable_reason(
    bits: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why the fused kernel cannot serve this layer / input (None when it can)."""
    if device.type != "cpu":
        return f"device {device.type} (the fused kernel is CPU code)"
    if bits not in FUSED_BITS:
        return f"bits={bits} (the fused kernel takes {FUSED_BITS})"
    if dtype != torch.bfloat16:
        return f"input dtype {dtype} (the fused kernel is bfloat16 only)"
    if out_features % 16:
        return f"out_features={out_features} not a multiple of 16"
    if in_features % 2:
        return f"in_features={in_features} is odd"
    if _kernel() is None:
        return _state["reason"]
    return None


def build_fused(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    group_size: int,
    bits: int = 4,
) -> FusedWeights:
    """Kernel data from the checkpoint buffers ``qweight`` / ``scales``, the unpacked zero points
    ``[n_groups, out]``, ``g_idx``, the group size and the bit width. The kernel indexes memory with these unchecked,
    so shapes, dtypes and the range of ``g_idx`` are checked here. Groups of consecutive columns (no
    act-order) whose size is a multiple of 8 enable the small-batch path."""
    n_groups, out_features = zeros.shape
    in_features = g_idx.numel()
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n_groups, out_features):
        raise ValueError(f"scales must be float16 {(n_groups, out_features)}, got {scales.dtype} {tuple(scales.shape)}")
    if bits not in FUSED_BITS:
        raise ValueError(f"bits must be one of {FUSED_BITS}, got bits={bits!r}")
    per_word = 32 // bits
    if qweight.dtype != torch.int32 or qweight.shape[1] != out_features or qweight.shape[0] * per_word < in_features:
        raise ValueError(
            f"qweight must be int32 [>= {in_features} / {per_word}, {out_features}], "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"g_idx values must lie in [0, {n_groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    regular = 0
    if contiguous_groups(g_idx, group_size):
        if group_size == -1 or group_size >= in_features:
            regular = in_features
        elif group_size % 8 == 0:
            regular = group_size
    return FusedWeights(
        qweight=qweight.contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        g_idx=g_idx.to(torch.int32).contiguous(),
        regular_group=regular,
        bits=bits,
    )


def fused_matmul(x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2[M, in] @ W^T (+ bias)`` in bfloat16 through the fused kernel (see :func:`fused_unavailable_reason`)."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_state.get('reason')}")
    if x2.dtype != torch.bfloat16 or x2.dim() != 2 or x2.shape[1] != w.in_features or x2.device.type != "cpu":
        raise ValueError(f"x must be bfloat16 [rows, {w.in_features}] on the CPU, got {x2.dtype} {tuple(x2.shape)}")
    x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if m == 0:
        return y
    # below ~1M multiply-adds a second thread costs more (fork / join) than it saves
    threads = 1 if m * n * w.in_features < SERIAL_MACS else torch.get_num_threads()
    rc = fn(
        x2.data_ptr(), m, w.in_features, w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
        w.g_idx.data_ptr(), n, None if bias is None else bias.data_ptr(), y.data_ptr(), threads, w.regular_group,
        w.bits,
    )
    if rc != 0:
        raise RuntimeError(f"fused CPU kernel failed (code {rc}) for x {tuple(x2.shape)}, out_features {n}")
    return y
