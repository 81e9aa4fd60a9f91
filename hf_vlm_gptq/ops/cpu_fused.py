"""A fused low-bit GEMM for CPUs with AVX512-BF16, compiled on first use (``csrc/lowbit_gemm_avx512bf16.c``).

The kernel dequantizes the weight exactly as the reference does (integer code - zero, one float32 multiply,
one rounding to bfloat16) into an L1-sized buffer chunk by chunk and runs a register-blocked ``vdpbf16ps``
GEMM on it, so it reads low-bit weights and computes at the dense bf16 rate. 2, 4 and 8 bits take that
path; 4 bits also have 1-4 row paths (no dequantized weight at all: codes become the bf16 numbers
``128 + q`` and the scale is applied per group). ``backends/fused.py`` serves the packed modules with it;
README (Performance) and ``bench/results/ops_cpu.md`` have its speed.

It reads the checkpoint buffers as they are (``qweight``, fp16 ``scales``, ``g_idx``); the only derived
data is the zero points as uint8 ``[n_groups, out]``. Act-order (any ``g_idx``) is handled in the kernel.

The shared library is built with the system C compiler (``$CC``, else ``cc`` / ``gcc``) into a cache
directory (``$HF_VLM_GPTQ_CACHE``, else ``$XDG_CACHE_HOME/hf_vlm_gptq``, else ``~/.cache/hf_vlm_gptq``),
named by a hash of the source, flags and compiler. The cache is never trusted blindly (a truncated library
kills the process with SIGBUS inside ``dlopen``, before Python can catch anything):

* each ``<name>.so`` has a record ``<name>.json`` beside it: the hash of source + flags + compiler (the
  cache key, in full) and the size and SHA-256 of the library itself;
* before ``dlopen`` the library is read and checked against its record (and for the kernel's symbol name);
  an entry that fails (truncated, changed, no record, another build's record) is logged, removed and rebuilt;
* a build is written under a temporary name, fsync'ed, then renamed (library first, record last, then the
  folder is fsync'ed), all under a lock on the folder, so a killed build or a concurrent one never leaves a half
  entry that passes; builds of older sources and stale temporaries are removed then;
* a library that loads but lacks the kernel's symbol makes the kernel unavailable in this process (said
  why, other paths used) and is removed, so the next process rebuilds it.

Before the first layer uses it, the kernel is checked once per process against dequantize + matmul on small
probe layers (each of its paths: 1-4 row and GEMM, 2/4/8 bits, act-order, one and several threads; through
``selfcheck.self_check``); a kernel that disagrees is logged and not used in this process. Without
Linux on x86-64 with AVX512F/BW/VL/VBMI/BF16, a compiler or OpenMP, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``, the
kernel is unavailable and :func:`kernel_unavailable_reason` says why; callers then use the other paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .packing import contiguous_groups, dequantize_packed, pack_gptq, unpack_zeros
from .selfcheck import self_check

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lowbit_gemm_avx512bf16.c"
FUSED_BITS = (2, 4, 8)
CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi", "-mavx512bf16", "-mfma", "-mf16c",
          "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_bf16")
ENV_SWITCH = "HF_VLM_GPTQ_CPU_KERNEL"
SYMBOL = "hvg_lowbit_gemm_bf16"
RECORD_FORMAT = 1
_COMPILE_TIMEOUT_S = 120
_STALE_TMP_S = 600  # a temporary file this old belongs to a build that was killed
SERIAL_MACS = 1 << 20

_lock = threading.Lock()
# "lib" -> the ctypes function, or "reason" -> why there is none; "ready" once the self-check has run
_state: dict = {}


@dataclass(frozen=True)
class KernelSource:
    """One C kernel built into the cache: its source, compiler flags, exported symbol and ctypes signature,
    the CPU flags it needs, and its name in log messages (the AVX2 kernel, ``cpu_avx2.py``, is another)."""

    source: Path
    cflags: tuple[str, ...]
    symbol: str
    argtypes: tuple
    required_cpu_flags: tuple[str, ...]
    what: str


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
ARGTYPES = (_P, _I64, _I64, _P, _P, _P, _P, _I64, _P, _P, _INT, _I64, _INT)


def _avx512() -> KernelSource:
    """This module's kernel, read from the module constants at call time (the tests build it with -O0)."""
    return KernelSource(SOURCE, tuple(CFLAGS), SYMBOL, ARGTYPES, tuple(REQUIRED_CPU_FLAGS),
                        "fused CPU low-bit kernel")


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_inputs(cc: str, src: KernelSource | None = None) -> dict:
    """What a build of ``src`` (default: the AVX512 kernel) depends on; its hash (the cache key) names the
    entry and is recorded beside it."""
    src = src or _avx512()
    inputs = {"source_sha256": _sha256(src.source.read_bytes()), "cflags": list(src.cflags),
              "compiler": _compiler_id(cc), "compiler_path": os.path.realpath(cc)}
    return {"key": _sha256(json.dumps(inputs, sort_keys=True).encode()), **inputs}


def _entry_paths(key: str, src: KernelSource | None = None) -> tuple[Path, Path]:
    """(library, record) of the cache entry of ``key``."""
    stem = cache_dir() / f"{(src or _avx512()).source.stem}-{key[:16]}"
    return stem.with_suffix(".so"), stem.with_suffix(".json")


def _entry_problem(library: Path, record: Path, inputs: dict, src: KernelSource | None = None) -> str | None:
    """Why the cache entry cannot be trusted (None when the library matches its record and the key)."""
    symbol = (src or _avx512()).symbol
    try:
        data = library.read_bytes()
    except FileNotFoundError:
        return "missing"
    try:
        rec = json.loads(record.read_text())
    except FileNotFoundError:
        return f"no record {record.name} beside it"
    except (OSError, ValueError) as err:
        return f"unreadable record {record.name}: {err}"
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        return f"record {record.name} is not a format-{RECORD_FORMAT} record"
    if rec.get("key") != inputs["key"]:
        return "its record belongs to another source / flags / compiler"
    if rec.get("size") != len(data):
        return f"size {len(data)} bytes, the record says {rec.get('size')} (truncated or overwritten)"
    if rec.get("sha256") != _sha256(data):
        return "its SHA-256 differs from the record (the file changed after it was built)"
    if symbol.encode() not in data:
        return f"it does not contain the symbol {symbol}"
    return None


def _remove_entry(library: Path, record: Path) -> None:
    library.unlink(missing_ok=True)
    record.unlink(missing_ok=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the renames are still atomic
        pass
    finally:
        os.close(fd)


class _CacheLock:
    """An exclusive ``flock`` on the cache folder (checks and builds of concurrent processes take turns);
    where the file system has no locks, it goes on without (every write is still temporary + rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl  # POSIX only (the kernel is Linux-only anyway)

            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError) as err:
            logger.debug("no lock on %s (%s); going on without", self.folder, err)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


def _compile(cc: str, library: Path, record: Path, inputs: dict, src: KernelSource) -> None:
    """Build into temporaries, fsync them, rename the library, then its record (a crash in between leaves
    a library without a record: rebuilt next time)."""
    folder = library.parent
    fd, tmp = tempfile.mkstemp(prefix=library.name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    fd, tmp_record = tempfile.mkstemp(prefix=record.name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        cmd = [cc, *src.cflags, "-o", tmp, str(src.source)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
        data = Path(tmp).read_bytes()
        if src.symbol.encode() not in data:
            raise RuntimeError(f"{' '.join(cmd)} wrote a library without the symbol {src.symbol}")
        _fsync_file(tmp)
        Path(tmp_record).write_text(json.dumps(
            {"format": RECORD_FORMAT, **inputs, "size": len(data), "sha256": _sha256(data)}, indent=1))
        _fsync_file(tmp_record)
        os.chmod(tmp, 0o755)
        os.chmod(tmp_record, 0o644)
        os.replace(tmp, library)
        os.replace(tmp_record, record)
        _fsync_dir(folder)
    finally:
        for path in (tmp, tmp_record):
            if os.path.exists(path):
                os.unlink(path)
    logger.info("compiled the %s into %s", src.what, library)


def _remove_stale(library: Path, src: KernelSource) -> None:
    """Builds of older sources / compilers, and temporaries of killed builds (called under the lock)."""
    now = time.time()
    for path in library.parent.glob(f"{src.source.stem}-*"):
        if path.stem == library.stem:
            continue
        if path.suffix == ".tmp":
            try:
                if now - path.stat().st_mtime < _STALE_TMP_S:
                    continue  # maybe a build of a process that found no lock
            except OSError:
                continue
        elif path.suffix not in (".so", ".json"):
            continue
        path.unlink(missing_ok=True)  # a process still using an old library keeps its mapping


def _build(cc: str, src: KernelSource | None = None) -> Path:
    """The checked library path of ``src`` (default: the AVX512 kernel): the cached entry when it matches its
    record, else a fresh build."""
    src = src or _avx512()
    inputs = _build_inputs(cc, src)
    library, record = _entry_paths(inputs["key"], src)
    library.parent.mkdir(parents=True, exist_ok=True)
    with _CacheLock(library.parent):
        problem = _entry_problem(library, record, inputs, src)
        if problem is None:
            return library
        if problem != "missing" or record.exists():
            logger.warning("cached %s %s failed its check (%s); rebuilding it", src.what, library, problem)
        _remove_entry(library, record)
        _compile(cc, library, record, inputs, src)
        problem = _entry_problem(library, record, inputs, src)
        if problem is not None:
            raise RuntimeError(f"the fresh build {library} fails its own check: {problem}")
        _remove_stale(library, src)
    return library


def load_kernel(src: KernelSource, state: dict) -> None:
    """Look for ``src`` on this host: ``state["lib"]`` becomes its ctypes function (built or taken from the
    cache), else ``state["reason"]`` says why there is none (logged as a warning where a build failed)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        state["reason"] = f"disabled by {ENV_SWITCH}=0"
        return
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        state["reason"] = f"needs Linux on x86-64, this is {platform.system()} {platform.machine()}"
        return
    missing = [f for f in src.required_cpu_flags if f not in _cpu_flags()]
    if missing:
        state["reason"] = f"this CPU lacks {', '.join(missing)}"
        return
    cc = _compiler()
    if cc is None:
        state["reason"] = "no C compiler found (set CC, or install gcc)"
        return
    try:
        path = _build(cc, src)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        state["reason"] = f"could not build the kernel: {err}"
        logger.warning("%s unavailable, using the other paths: %s", src.what, err)
        return
    try:
        fn = getattr(lib, src.symbol)
    except AttributeError:
        # this process keeps the bad mapping (dlopen would hand it back for the same path): the next one rebuilds
        _remove_entry(path, path.with_suffix(".json"))
        state["reason"] = f"the cached library {path} has no symbol {src.symbol} (removed; the next process rebuilds)"
        logger.warning("%s unavailable, using the other paths: %s", src.what, state["reason"])
        return
    fn.argtypes = list(src.argtypes)
    fn.restype = ctypes.c_int
    state["lib"] = fn


def checked_kernel(state: dict, load, check):
    """The kernel of ``state`` once loaded (``load()``) and passed ``check(fn)`` (None, else the reason, which
    takes the kernel out of this process), looked for once per process; None when unavailable."""
    if not state.get("ready"):  # looked for and checked once per process; the lock only guards that
        with _lock:
            if not state.get("ready"):
                if "lib" not in state and "reason" not in state:
                    load()
                if "lib" in state:
                    problem = check(state["lib"])
                    if problem is not None:
                        del state["lib"]
                        state["reason"] = problem
                state["ready"] = True
    return state.get("lib")


def _load() -> None:
    load_kernel(_avx512(), _state)


def _kernel():
    return checked_kernel(_state, _load, _self_check)


# (bits, in, out, group_size, act_order, rows): the kernel's paths -- 1-row and 2-4-row 4-bit paths, the GEMM
# micro-kernel (5+ rows, 2/8 bits, act-order), a partial last group, and several threads (>= SERIAL_MACS)
_PROBES = (
    (4, 160, 32, 64, False, (1, 3, 4, 7)),
    (4, 256, 64, 64, False, (64,)),
    (4, 128, 32, 32, True, (1, 6)),
    (2, 128, 16, 64, False, (5,)),
    (8, 96, 48, -1, False, (2, 9)),
)


def _probe_layer(bits: int, in_f: int, out_f: int, group_size: int, act_order: bool, gen: torch.Generator):
    """Random packed buffers of one layer (any codes, zero points and fp16 scales), and its bias."""
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (out_f, n_groups), generator=gen, dtype=torch.int32)
    scales = (torch.rand(out_f, n_groups, generator=gen) * 0.05 + 0.002).half().float()
    g_idx = torch.zeros(in_f, dtype=torch.int32) if group_size == -1 else torch.arange(in_f, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)].contiguous()
    packed = pack_gptq(codes, scales, zeros, g_idx, bits)
    bias = torch.randn(out_f, generator=gen).to(torch.bfloat16)
    return packed, bias


def kernel_probes(call, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,), layers=_PROBES):
    """Probes of ``call(x, w, bias)`` against dequantize + matmul in float64 on random probe layers (each of
    ``layers``: (bits, in, out, group_size, act_order, rows)), for inputs of each of ``dtypes``.

    Bound per element: 2**-7 of |reference| + 2**-7 of sum |x| |w| (a correct kernel stays within bf16
    rounding of the output and, where it does not round the weight, of the weight: ~4x below), and 1%
    relative error overall. The reference weight is dequantized in the input's dtype."""
    gen = torch.Generator().manual_seed(1234)
    for bits, in_f, out_f, group_size, act_order, all_rows in layers:
        packed, bias = _probe_layer(bits, in_f, out_f, group_size, act_order, gen)
        w = build_fused(packed["qweight"], packed["scales"], unpack_zeros(packed["qzeros"], bits, out_f),
                        packed["g_idx"], group_size, bits)
        where = f"{bits}-bit {out_f}x{in_f} group {group_size}{' act-order' if act_order else ''}"
        for dtype in dtypes:
            dense = dequantize_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                                      bits=bits, in_features=in_f, out_features=out_f, group_size=group_size,
                                      dtype=dtype).double()
            for rows in all_rows:
                yield functools.partial(_probe, call, w, dense, bias.to(dtype), rows, gen,
                                        f"{where}, {rows} rows, {dtype}", dtype)


def _self_check(fn) -> str | None:
    """Run the kernel on the probe layers against dequantize + matmul; None when it agrees, else why (logged)."""
    return self_check("fused CPU kernel", kernel_probes(lambda x, w, bias: _call(fn, x, w, bias)),
                      "not used in this process", logger)


def _probe(call, w: FusedWeights, dense: torch.Tensor, bias: torch.Tensor, rows: int, gen: torch.Generator,
           where: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    x = torch.randn(rows, w.in_features, generator=gen).to(dtype)
    y = call(x, w, bias).double()
    ref = x.double() @ dense.T + bias.double()
    scale = x.double().abs() @ dense.abs().T
    if not bool(torch.isfinite(y).all()):
        return f"non-finite outputs ({where})"
    err = (y - ref).abs()
    if not bool((err <= 2**-7 * (ref.abs() + scale) + 1e-6).all()):
        return f"max error {float(err.max()):.3g} against outputs up to {float(ref.abs().max()):.3g} ({where})"
    rel = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
    if not math.isfinite(rel) or rel > 1e-2:
        return f"relative error {rel:.3g} ({where})"
    return None


def kernel_unavailable_reason() -> str | None:
    """Why the fused kernel cannot run in this process (None when it can): looked for, built and
    self-checked on the first call."""
    return None if _kernel() is not None else _state["reason"]


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
    """``x2[M, in] @ W^T (+ bias)`` in bfloat16 through the fused kernel (see :func:`kernel_unavailable_reason`).

    Under ``torch.compile`` it is the custom op ``hf_vlm_gptq::fused_matmul`` (traced once through its fake
    implementation, whatever the rows); eager calls go to the kernel directly. Forward only: the packed
    modules' op ``hf_vlm_gptq::packed_linear`` (``qbase.py``) gives the gradients."""
    if torch.compiler.is_compiling():
        return fused_matmul_op(x2, w.qweight, w.scales, w.zeros, w.g_idx, bias, w.regular_group, w.bits)
    fn = _kernel()
    if fn is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_state.get('reason')}")
    return _call(fn, x2, w, bias)


@torch.library.custom_op("hf_vlm_gptq::fused_matmul", mutates_args=())
def fused_matmul_op(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor, bias: torch.Tensor | None, regular_group: int, bits: int) -> torch.Tensor:
    """The fused kernel as a torch op (the :class:`FusedWeights` fields as arguments)."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError(f"the fused CPU kernel is unavailable: {_state.get('reason')}")
    return _call(fn, x2, FusedWeights(qweight, scales, zeros, g_idx, regular_group, bits), bias)


@fused_matmul_op.register_fake
def _fused_matmul_fake(x2, qweight, scales, zeros, g_idx, bias, regular_group, bits):
    return x2.new_empty(x2.shape[0], zeros.shape[1], dtype=torch.bfloat16)


def _call(fn, x2: torch.Tensor, w: FusedWeights, bias: torch.Tensor | None) -> torch.Tensor:
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
