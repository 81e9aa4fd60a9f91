"""The package's logging, after transformers' conventions (``transformers.utils.logging``).

Every module logs to a child of the library root logger ``hf_vlm_gptq`` (``logging.getLogger(__name__)``);
the library never prints. At import the library root logger gets a default handler, so that warnings (e.g.
"calibration data has 4 samples, fewer than the 128 asked for") reach the user of the Python API without any
logging set up, as transformers' do:

* the default handler writes ``[hf_vlm_gptq] message`` to the current ``sys.stderr``, for records at the
  library's verbosity: WARNING and above unless :func:`set_verbosity` or the environment variable
  ``HF_VLM_GPTQ_VERBOSITY`` (``debug``, ``info``, ``warning``, ``error``, ``critical``; like
  ``TRANSFORMERS_VERBOSITY``) says otherwise. Without either, the library logger has no level of its own and
  follows the root logger's (WARNING by default), so an application that sets the root level (the CLI's
  ``-v``) sets ours too.
* records still propagate to the root logger (unlike transformers, which stops them outside CI): an
  application that configured logging (``logging.basicConfig``, a handler on the root logger or on
  ``hf_vlm_gptq``) gets them through its own handlers, and the default handler then stays quiet, so no line
  shows twice. pytest's ``caplog`` sees them.
* the root logger's configuration (level, handlers) is never changed; :func:`disable_default_handler` /
  :func:`enable_default_handler` switch ours off and on.
"""

from __future__ import annotations

import logging
import os
import sys

LIBRARY = "hf_vlm_gptq"
ENV_VERBOSITY = "HF_VLM_GPTQ_VERBOSITY"
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

__all__ = [
    "ENV_VERBOSITY",
    "disable_default_handler",
    "enable_default_handler",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
    "set_verbosity_debug",
    "set_verbosity_error",
    "set_verbosity_info",
    "set_verbosity_warning",
]


class _DefaultHandler(logging.StreamHandler):
    """stderr (looked up at each record, so a redirected ``sys.stderr`` is followed), while the application
    has no handler of its own that would show the record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(f"[{LIBRARY}] %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current sys.stderr is used
        pass

    def handle(self, record: logging.LogRecord) -> bool:
        if _others_show(record):
            return False
        return super().handle(record)


def _others_show(record: logging.LogRecord) -> bool:
    """Whether a handler other than ours, on the library root logger or (through propagation) above it,
    receives ``record``."""
    logger = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not _handler and record.levelno >= h.level for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


_handler = _DefaultHandler()


def _library_logger() -> logging.Logger:
    return logging.getLogger(LIBRARY)


def _configure() -> None:
    """Install the default handler once (importing twice, or reloading, adds no second one), and apply
    ``HF_VLM_GPTQ_VERBOSITY``."""
    logger = _library_logger()
    for h in list(logger.handlers):
        if isinstance(h, logging.NullHandler) or type(h).__name__ == "_DefaultHandler":
            logger.removeHandler(h)
    logger.addHandler(_handler)
    value = os.environ.get(ENV_VERBOSITY)
    if value:
        level = LOG_LEVELS.get(value.strip().lower())
        if level is None:
            logger.warning("%s=%r is not a verbosity; use one of %s", ENV_VERBOSITY, value, ", ".join(LOG_LEVELS))
        else:
            logger.setLevel(level)


def get_logger(name: str | None = None) -> logging.Logger:
    """The library root logger, or the logger ``name`` (``hf_vlm_gptq.something``)."""
    return logging.getLogger(name or LIBRARY)


def get_verbosity() -> int:
    """The library's effective level (``logging.WARNING`` by default)."""
    return _library_logger().getEffectiveLevel()


def set_verbosity(level: int | str) -> None:
    """Set the library's level: a ``logging`` level or one of ``debug``, ``info``, ``warning``, ``error``,
    ``critical``."""
    if isinstance(level, str):
        if level.strip().lower() not in LOG_LEVELS:
            raise ValueError(f"verbosity must be one of {', '.join(LOG_LEVELS)} or a logging level, got {level!r}")
        level = LOG_LEVELS[level.strip().lower()]
    _library_logger().setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    set_verbosity(logging.ERROR)


def disable_default_handler() -> None:
    """Remove the default stderr handler: records then go where Python's logging sends them (the
    application's handlers; with none, Python's last-resort stderr handler, WARNING and above)."""
    _library_logger().removeHandler(_handler)


def enable_default_handler() -> None:
    """Start the default stderr handler again."""
    logger = _library_logger()
    if _handler not in logger.handlers:
        logger.addHandler(_handler)


_configure()
