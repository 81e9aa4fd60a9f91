"""The Python API shows its warnings by default (transformers' conventions: a library root logger with a
stderr handler, a verbosity setting and an environment variable), without printing and without touching the
root logger's configuration."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import hf_vlm_gptq
from hf_vlm_gptq import log
from hf_vlm_gptq.calib import load_samples

FEWER = "fewer than the 5 asked for"
SCRIPT = (
    "{pre}\n"
    "import logging; root = logging.getLogger(); before = (root.level, list(root.handlers))\n"
    "import importlib, hf_vlm_gptq; importlib.reload(hf_vlm_gptq.log)  # a second import adds no handler\n"
    "assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)\n"
    "assert len(logging.getLogger('hf_vlm_gptq').handlers) == 1\n"
    "from hf_vlm_gptq.calib import load_samples\n"
    "load_samples([{{'text': 'a'}}, {{'text': 'b'}}], 5)\n"
    "logging.getLogger('hf_vlm_gptq.calib').info('an info line')\n"
)


def run_python(pre: str = "", **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != log.ENV_VERBOSITY}
    return subprocess.run([sys.executable, "-c", SCRIPT.format(pre=pre)], capture_output=True, text=True,
                          env={**environ, **env}, timeout=300, check=True)


def test_a_plain_script_sees_the_warning_on_stderr_once():
    done = run_python()
    assert done.stdout == ""  # logged, never printed
    lines = [line for line in done.stderr.splitlines() if FEWER in line]
    assert lines == ["[hf_vlm_gptq] calibration data has 2 samples, fewer than the 5 asked for; using all of them"]
    assert "an info line" not in done.stderr  # WARNING and above by default


def test_an_application_with_its_own_logging_gets_each_line_once_through_its_handlers():
    done = run_python("import logging; logging.basicConfig(level=logging.INFO, format='APP %(name)s %(message)s')")
    lines = [line for line in done.stderr.splitlines() if FEWER in line]
    assert len(lines) == 1 and lines[0].startswith("APP hf_vlm_gptq.calib.sources ")
    assert "APP hf_vlm_gptq.calib an info line" in done.stderr  # the root level (the CLI's -v) applies to us


def test_the_environment_variable_sets_the_verbosity():
    done = run_python(**{log.ENV_VERBOSITY: "error"})
    assert FEWER not in done.stderr


def test_in_process_the_warning_reaches_stderr_and_caplog(capsys, caplog, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a process that configured no logging (pytest adds its own)
    load_samples([{"text": "a"}, {"text": "b"}], 5)
    assert FEWER in capsys.readouterr().err
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        load_samples([{"text": "a"}, {"text": "b"}], 5)
    assert any(FEWER in r.getMessage() for r in caplog.records)  # records propagate to the root logger
    assert FEWER not in capsys.readouterr().err  # ... and then the default handler stays quiet


def test_set_verbosity_and_the_default_handler_switch(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    before = logging.getLogger(log.LIBRARY).level
    try:
        hf_vlm_gptq.set_verbosity("error")
        assert hf_vlm_gptq.get_verbosity() == logging.ERROR
        load_samples([{"text": "a"}, {"text": "b"}], 5)
        assert FEWER not in capsys.readouterr().err
        log.set_verbosity_info()
        logging.getLogger("hf_vlm_gptq.calib").info("an info line")
        assert "[hf_vlm_gptq] an info line" in capsys.readouterr().err
        log.set_verbosity_warning()
        log.disable_default_handler()  # then Python's own last resort (no prefix) has the record
        load_samples([{"text": "a"}, {"text": "b"}], 5)
        assert "[hf_vlm_gptq]" not in capsys.readouterr().err
        log.enable_default_handler()
        load_samples([{"text": "a"}, {"text": "b"}], 5)
        assert f"[hf_vlm_gptq] calibration data has 2 samples, {FEWER}" in capsys.readouterr().err
        with pytest.raises(ValueError, match="verbosity must be one of"):
            hf_vlm_gptq.set_verbosity("loud")
    finally:
        logging.getLogger(log.LIBRARY).setLevel(before)
        log.enable_default_handler()
