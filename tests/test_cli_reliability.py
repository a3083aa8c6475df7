"""Ordinary events get one line and the right exit code, never a traceback: a prompt that
is not UTF-8, Ctrl-C, a closed stdout, out-of-range arguments; and the API refuses
inputs that are not what they claim to be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from quickdraft.ort_backend import DecodeConfig, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402

CMD = [sys.executable, "-m", "quickdraft.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(*args, timeout=120, **kw):
    return subprocess.run([*CMD, *map(os.fsencode, args)], capture_output=True, timeout=timeout,
                          env=ENV, **kw)


def _one_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_a_prompt_that_is_not_utf8_is_refused_before_loading():
    done = _run("generate", b"--prompt", b"def f(\xff\xfe):", "--device", "cpu")
    assert done.returncode == 1
    assert "not valid UTF-8" in _one_line(done.stderr)


def test_ctrl_c_during_generate_exits_130_with_one_line():
    # a shell's background job starts with SIGINT ignored, and Python keeps it so: restore
    # the default in the child, so that it gets KeyboardInterrupt as a terminal's would
    p = subprocess.Popen([*CMD, "generate", "--prompt", "def main(", "--stream",
                          "--max-new-tokens", "480", "--device", "cpu", "--compare"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.read(1)  # generating
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert "interrupted" in _one_line(err)


def test_a_closed_stdout_ends_quietly():
    p = subprocess.Popen([*CMD, "generate", "--prompt", "def main(", "--stream",
                          "--max-new-tokens", "480", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert p.stdout.read(1)
        p.stdout.close()  # what `| head -c1` does
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 141
    assert "broken pipe" in _one_line(err)


@pytest.mark.parametrize("args, message", [
    (("theory", "--alpha", "0.8", "--c", "nan"), "--c must be a finite number"),
    (("theory", "--alpha", "nan"), "--alpha must be a number in [0, 1]"),
    (("theory", "--alpha", "0.8", "--max-gamma", "100000000"), "--max-gamma must be in"),
    (("demo", "--chars", "-5"), "--chars must be at least"),
])
def test_out_of_range_arguments_get_one_line(args, message):
    done = _run(*args, timeout=60)
    assert done.returncode == 1 and done.stdout == b""
    assert message in _one_line(done.stderr)


def test_the_api_refuses_what_is_not_a_prompt():
    pair = load_pair(default_model_dir(), device="cpu")
    assert DecodeConfig().sampling.greedy  # the runtime and the CLI both default to greedy
    with pair.generator(DecodeConfig(max_new_tokens=4), gamma=2) as gen:
        with pytest.raises(ValueError, match="call prefill"):
            gen.step()  # before any prefill: an error, not []
        with pytest.raises(TypeError, match="bytes"):
            gen.prefill(b"def f(")
        with pytest.raises(TypeError, match="integers"):
            gen.prefill([1.0, 2.0])
        with pytest.raises(TypeError, match="integers"):
            gen.prefill(np.array([1.5]))
        assert len(gen.generate([5, 6, 7]).tokens) == 4  # int ids, NumPy ints too
        assert len(gen.generate(np.array([5, 6, 7])).tokens) == 4


def test_gamma_beyond_a_static_cache_names_gamma(static_llama_pair):
    with pytest.raises(ValueError, match=r"--gamma 1000 needs target steps and draft chains "
                                         r"of 1001 tokens.*--gamma <= 198"):
        load_pair(static_llama_pair, device="cpu", max_gamma=1000)
