"""Output folders written atomically, for `hf-vlm-gptq quantize`, `export-vllm` and the demo.

`OutputDir(out, overwrite=..., protect=[...])` checks OUT before any work is done and reserves a temporary
sibling folder `.OUT.hf_vlm_gptq-tmp-<pid>-<random>` (creating it is the real test that the disk takes
writes). The caller writes into `.tmp` inside `with target.writing():` and calls `commit()`, which adds
the marker file and renames the folder to OUT; leaving the `with OutputDir(...)` block without a commit
removes it. So OUT appears complete or not at all, and:

* OUT must not be a file, SRC / MODEL (`protect`), or a folder containing one of them;
* an existing OUT is replaced only with `overwrite` and only when it is a previous output of this package
  (it holds `MARKER`, or a `config.json` with `quant_method: "vlm_gptq"`); anything else is left alone;
* temporary folders of the same OUT left by a killed run (their process is gone) are removed;
* the folder gets the usual permissions (0777 minus the umask: 0755), not mkdtemp's 0700, and its files
  0666 minus the umask (0644; safetensors writes its files 0600);
* an OS error while writing (full disk, read-only disk, no permission) becomes one `OutputError` line
  naming OUT, and nothing is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MARKER", "TMP_TAG", "OutputDir", "OutputError", "is_our_output", "save_model_atomic"]

MARKER = ".hf_vlm_gptq-output.json"
"""Written into every folder this package outputs; `--overwrite` replaces only folders that have it (or
our quantization config)."""
TMP_TAG = ".hf_vlm_gptq-tmp-"

_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
          errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to write there",
          errno.EPERM: "no permission to write there"}


class OutputError(OSError):
    """Writing an output folder failed (full disk, read-only disk, no permission); nothing was left behind."""


def _describe(out: Path, err: OSError) -> str:
    hint = _HINTS.get(err.errno)
    what = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    return f"cannot write {out}: {what}{where}" + (f"; {hint}" if hint else "") + ". Nothing was written."


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def is_our_output(folder: Path) -> bool:
    """True for a folder this package wrote: it holds MARKER, or our quantization config."""
    if (folder / MARKER).is_file():
        return True
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    from .config import QUANT_METHOD

    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or an odd number: keep the folder)
    return True


def _stale_temporaries(out: Path) -> list[Path]:
    """Temporary folders of this OUT whose process is gone (a killed save or export)."""
    stale = []
    prefix = f".{out.name}{TMP_TAG}"
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    for item in siblings:
        pid = item.name[len(prefix):].partition("-")[0] if item.name.startswith(prefix) else ""
        if pid.isdigit() and item.is_dir() and not item.is_symlink() and not _alive(int(pid)):
            stale.append(item)
    return stale


def _normal_file_modes(folder: Path) -> None:
    """Give every file under `folder` the mode a plain write gets (0666 minus the umask, read from the
    folder's own mode, made with 0777 minus the umask); safetensors and copies of SRC's files may differ."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for item in folder.rglob("*"):
        if item.is_file() and not item.is_symlink() and stat.S_IMODE(item.stat().st_mode) != mode:
            item.chmod(mode)


class OutputDir:
    """OUT checked and reserved now, written under a temporary name, renamed into place by `commit()`."""

    def __init__(self, out: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (),
                 command: str = "save") -> None:
        self.out = Path(out).absolute()
        self.overwrite, self.command = overwrite, command
        self.protect = [Path(p).resolve() for p in protect if p is not None and Path(p).exists()]
        self._check()
        for item in _stale_temporaries(self.out):
            shutil.rmtree(item, ignore_errors=True)
        with self.writing():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self._new_sibling()
        self.committed = False

    # --- checks -----------------------------------------------------------------------------------
    def _check(self) -> None:
        out = self.out
        if out.is_symlink():
            raise ValueError(f"OUT {out} is a symbolic link; pass the folder itself.")
        if out.exists() and not out.is_dir():
            raise ValueError(f"OUT {out} is a file, not a folder; choose another OUT.")
        resolved = out.resolve()
        for src in self.protect:
            if _contains(resolved, src):
                what = "is" if resolved == src else "contains"
                raise ValueError(f"OUT {out} {what} the input {src}; choose an OUT outside it.")
        if out.exists():
            if not self.overwrite:
                raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) or choose another OUT")
            if not is_our_output(out):
                raise ValueError(
                    f"OUT {out} exists and was not written by hf_vlm_gptq (no {MARKER} and no vlm_gptq "
                    "config.json); --overwrite replaces only a previous output. Delete it yourself or choose "
                    "another OUT.")

    def _new_sibling(self) -> Path:
        for _ in range(100):
            path = self.out.parent / f".{self.out.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(path, 0o777)  # the umask applies: 0755 usually
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free temporary name beside {self.out}")

    # --- writing ----------------------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[Path | None]:
        """Turn OS errors of the enclosed writes into one OutputError naming OUT."""
        try:
            yield getattr(self, "tmp", None)
        except OutputError:
            raise
        except OSError as err:
            error = OutputError(_describe(self.out, err))
            error.errno = err.errno
            raise error from err

    def commit(self) -> Path:
        """Add the marker and rename the temporary folder to OUT (replacing a previous output of ours)."""
        self._check()  # OUT may have appeared while the work ran
        from . import __version__

        with self.writing():
            (self.tmp / MARKER).write_text(json.dumps(
                {"written_by": "hf_vlm_gptq", "version": __version__, "command": self.command}) + "\n")
            _normal_file_modes(self.tmp)
            old = None
            if self.out.exists():  # a previous output of ours (checked): moved aside, deleted once OUT is in place
                old = self._new_sibling()
                os.replace(self.out, old / "previous")
            try:
                os.replace(self.tmp, self.out)
            except OSError:
                if old is not None:
                    os.replace(old / "previous", self.out)
                    shutil.rmtree(old, ignore_errors=True)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.out

    def discard(self) -> None:
        if not self.committed and getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def save_model_atomic(model, out_dir: str | Path, processor=None, overwrite: bool = False,
                      extra_files: dict[str, str] | None = None, protect: Iterable[str | Path] = (),
                      command: str = "save") -> Path:
    """Save `model` (and `processor`, and `extra_files` name -> text) into `out_dir` atomically."""
    with OutputDir(out_dir, overwrite=overwrite, protect=protect, command=command) as target:
        with target.writing() as tmp:
            model.save_pretrained(tmp)
            if processor is not None:
                processor.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return target.commit()
