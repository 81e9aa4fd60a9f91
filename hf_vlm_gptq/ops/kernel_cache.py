"""Building, caching and loading the C kernels of the CPU paths (``cpu_fused.py``, ``cpu_amx.py``, ``cpu_avx2.py``,
``cpu_clip.py``, ``cpu_gptq.py``, ``cpu_dequant.py``, ``cpu_gram.py``; :func:`module_kernel` gives the last four their
look-up functions).

A kernel (:class:`KernelSource`) is built with the system C compiler (``$CC``, else ``cc`` / ``gcc``) into a
cache folder (``$HF_VLM_GPTQ_CACHE``, else ``$XDG_CACHE_HOME/hf_vlm_gptq``, else ``~/.cache/hf_vlm_gptq``),
named by a hash of its source (with the headers it includes), flags and compiler. The cache is never trusted
blindly (a truncated library kills the process with SIGBUS inside ``dlopen``, before Python can catch anything):

* each ``<name>.so`` has a record ``<name>.json`` beside it: the hash of source + flags + compiler (the
  cache key, in full) and the size and SHA-256 of the library itself;
* before ``dlopen`` the library is read and checked against its record (and for the kernel's symbol name);
  an entry that fails (truncated, changed, no record, another build's record) is logged, removed and rebuilt;
* a build is written under a temporary name, fsync'ed, then renamed (library first, record last, then the
  folder is fsync'ed), all under a lock on the folder, so a killed build or a concurrent one never leaves a half
  entry that passes; builds of older sources and stale temporaries are removed then;
* a library that loads but lacks the kernel's symbol makes the kernel unavailable in this process (said
  why, other paths used) and is removed, so the next process rebuilds it.

:func:`checked_kernel` looks for a kernel once per process and runs its self-check before anything uses it;
:func:`load_fastest` takes the faster of several builds of one source for different CPU flags (each its own
cache entry, ``KernelSource.name``), as measured on the host.
Without Linux on x86-64 with the kernel's CPU flags, or a compiler, or with ``HF_VLM_GPTQ_CPU_KERNEL=0``, a
kernel is unavailable and its state says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_SWITCH = "HF_VLM_GPTQ_CPU_KERNEL"
RECORD_FORMAT = 1
_COMPILE_TIMEOUT_S = 120
_STALE_TMP_S = 600  # a temporary file this old belongs to a build that was killed

# reentrant: a kernel's self-check may itself look for another kernel (the matmul kernels' probes dequantize
# through the dequantization kernel), in the same thread, while the first one's look-up holds the lock
_lock = threading.RLock()


@dataclass(frozen=True)
class KernelSource:
    """One C kernel built into the cache: its source, compiler flags, exported symbol and ctypes signature,
    the CPU flags it needs, and its name in log messages (``cpu_fused.py`` and ``cpu_avx2.py`` each define one)."""

    source: Path
    cflags: tuple[str, ...]
    symbol: str
    argtypes: tuple
    required_cpu_flags: tuple[str, ...]
    what: str
    libs: tuple[str, ...] = ()  # linker inputs, after the source (``-lm``)
    name: str = ""  # of its cache entries (default: the source's stem); builds of one source for two CPUs differ
    headers: tuple[Path, ...] = ()  # files the source includes: part of the cache key

    @property
    def entry_name(self) -> str:
        return self.name or self.source.stem


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("HF_VLM_GPTQ_CACHE"):
        return Path(os.environ["HF_VLM_GPTQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_vlm_gptq"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compiler_id(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cc


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_inputs(cc: str, src: KernelSource) -> dict:
    """What a build of ``src`` depends on; its hash (the cache key) names the
    entry and is recorded beside it."""
    inputs = {"source_sha256": sha256(src.source.read_bytes()), "cflags": list(src.cflags) + list(src.libs),
              "compiler": compiler_id(cc), "compiler_path": os.path.realpath(cc)}
    if src.headers:
        inputs["headers_sha256"] = [sha256(header.read_bytes()) for header in src.headers]
    return {"key": sha256(json.dumps(inputs, sort_keys=True).encode()), **inputs}


def entry_paths(key: str, src: KernelSource) -> tuple[Path, Path]:
    """(library, record) of the cache entry of ``key``."""
    stem = cache_dir() / f"{src.entry_name}-{key[:16]}"
    return stem.with_suffix(".so"), stem.with_suffix(".json")


def entry_problem(library: Path, record: Path, inputs: dict, src: KernelSource) -> str | None:
    """Why the cache entry cannot be trusted (None when the library matches its record and the key)."""
    symbol = src.symbol
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
    if rec.get("sha256") != sha256(data):
        return "its SHA-256 differs from the record (the file changed after it was built)"
    if symbol.encode() not in data:
        return f"it does not contain the symbol {symbol}"
    return None


def remove_entry(library: Path, record: Path) -> None:
    library.unlink(missing_ok=True)
    record.unlink(missing_ok=True)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
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


class CacheLock:
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
        cmd = [cc, *src.cflags, "-o", tmp, str(src.source), *src.libs]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
        data = Path(tmp).read_bytes()
        if src.symbol.encode() not in data:
            raise RuntimeError(f"{' '.join(cmd)} wrote a library without the symbol {src.symbol}")
        fsync_file(tmp)
        Path(tmp_record).write_text(json.dumps(
            {"format": RECORD_FORMAT, **inputs, "size": len(data), "sha256": sha256(data)}, indent=1))
        fsync_file(tmp_record)
        os.chmod(tmp, 0o755)
        os.chmod(tmp_record, 0o644)
        os.replace(tmp, library)
        os.replace(tmp_record, record)
        fsync_dir(folder)
    finally:
        for path in (tmp, tmp_record):
            if os.path.exists(path):
                os.unlink(path)
    logger.info("compiled the %s into %s", src.what, library)


def _remove_stale(library: Path, src: KernelSource) -> None:
    """Builds of older sources / compilers, and temporaries of killed builds (called under the lock)."""
    now = time.time()
    for path in library.parent.glob(f"{src.entry_name}-*"):
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


def build(cc: str, src: KernelSource) -> Path:
    """The checked library path of ``src``: the cached entry when it matches its
    record, else a fresh build."""
    inputs = build_inputs(cc, src)
    library, record = entry_paths(inputs["key"], src)
    library.parent.mkdir(parents=True, exist_ok=True)
    with CacheLock(library.parent):
        problem = entry_problem(library, record, inputs, src)
        if problem is None:
            return library
        if problem != "missing" or record.exists():
            logger.warning("cached %s %s failed its check (%s); rebuilding it", src.what, library, problem)
        remove_entry(library, record)
        _compile(cc, library, record, inputs, src)
        problem = entry_problem(library, record, inputs, src)
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
    missing = [f for f in src.required_cpu_flags if f not in cpu_flags()]
    if missing:
        state["reason"] = f"this CPU lacks {', '.join(missing)}"
        return
    cc = compiler()
    if cc is None:
        state["reason"] = "no C compiler found (set CC, or install gcc)"
        return
    try:
        path = build(cc, src)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        state["reason"] = f"could not build the kernel: {err}"
        logger.warning("%s unavailable, using the other paths: %s", src.what, err)
        return
    try:
        fn = getattr(lib, src.symbol)
    except AttributeError:
        # this process keeps the bad mapping (dlopen would hand it back for the same path): the next one rebuilds
        remove_entry(path, path.with_suffix(".json"))
        state["reason"] = f"the cached library {path} has no symbol {src.symbol} (removed; the next process rebuilds)"
        logger.warning("%s unavailable, using the other paths: %s", src.what, state["reason"])
        return
    fn.argtypes = list(src.argtypes)
    fn.restype = ctypes.c_int
    state["lib"] = fn


def load_fastest(builds: Sequence[KernelSource], state: dict, fastest: Callable[[dict], str] | None) -> None:
    """:func:`load_kernel` for builds of one kernel for different CPU flags: ``state["lib"]`` becomes the one
    ``fastest({name: fn})`` names among those this CPU can load (measured on this host, not assumed from its
    flags; with one, that one, unmeasured), ``state["build"]`` its name; else ``state["reason"]`` is the first
    build's reason."""
    found: dict[str, Callable] = {}
    reasons: list[str] = []
    for src in builds:
        one: dict = {}
        load_kernel(src, one)
        if "lib" in one:
            found[src.entry_name] = one["lib"]
        else:
            reasons.append(one["reason"])
    if not found:
        state["reason"] = reasons[0]
        return
    name = next(iter(found)) if len(found) == 1 else fastest(found)
    state["lib"], state["build"] = found[name], name


def best_seconds_in_turns(fns: dict[str, Callable], run: Callable[[str, Callable], object],
                          rounds: int = 3) -> dict[str, float]:
    """``{name: best seconds of run(name, fn)}`` over ``rounds`` rounds, the functions taken in turns (a
    first call's set-up is outrun, and a drift of the host's load is spread over all of them)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            run(name, fn)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest_build(fns: dict[str, Callable], run: Callable[[str, Callable], object], what: str) -> str:
    """The name of the fastest of the builds ``{name: fn}`` (for :func:`load_fastest`): ``run(name, fn)`` on a
    probe (:func:`best_seconds_in_turns`); the times are logged under ``what``."""
    best = best_seconds_in_turns(fns, run)
    chosen = min(best, key=best.get)
    logger.info("%s: the %s build (%s)", what, chosen, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in best.items()))
    return chosen


def module_kernel(src: KernelSource, module: str, others: Sequence[KernelSource] = (),
                  fastest: Callable[[dict], str] | None = None) -> tuple[Callable, Callable]:
    """``(checked_kernel, unavailable_reason)`` for the kernel ``src`` of the module named ``module``, which keeps
    its look-up state in its ``_state`` dict (read on every call, so a test can swap it):
    ``checked_kernel(check)`` is the kernel once built, loaded and passed ``check(fn)`` (None, else why: it is
    then not used in this process), looked for once per process, or None when unavailable;
    ``unavailable_reason(check)`` says why it cannot run (None when it can). With ``others`` (builds of the
    same kernel for other CPU flags), the one ``fastest`` picks (:func:`load_fastest`)."""

    def state() -> dict:
        return sys.modules[module]._state

    def checked(check: Callable[[Callable], str | None]) -> Callable | None:
        return checked_kernel(state(), lambda: load_fastest([src, *others], state(), fastest), check)

    def unavailable_reason(check: Callable[[Callable], str | None]) -> str | None:
        return None if checked(check) is not None else state()["reason"]

    return checked, unavailable_reason


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


