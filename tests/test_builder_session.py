"""The model builder's child process: one child serves the jobs of a builder session (its
imports paid once), a failed or killed job leaves the session usable, a job past its
timeout is killed, the builder's own writes (Python and native) never reach the protocol,
and without a session each job still gets a child of its own."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess

import pytest

from quickdraft.export import builder
from quickdraft.export.builder import BuilderProcess, builder_session
from quickdraft.export.checks import ExportError

# a stand-in for the builder's script: it writes through every channel a builder might
# (Python prints, raw fd writes that look like protocol replies, C's printf), then does
# what its first argument (or the name of the -i folder) says
NOISY = r'''
import ctypes, os, sys, time
print("python print", sys.argv[1:])
os.write(1, b'{"reply": 0}\n')
os.write(2, b'{"reply": "started"}\n')
try:
    ctypes.CDLL(None).printf(b"libc printf\n")
except (OSError, AttributeError):
    pass
print("to stderr", file=sys.stderr)
what = os.path.basename(sys.argv[2]) if sys.argv[1:2] == ["-i"] else (sys.argv[1:] or [""])[0]
if what == "exit":
    sys.exit(3)
if what == "raise":
    raise RuntimeError("boom")
if what == "die":
    os._exit(7)
if what == "sleep":
    time.sleep(60)
print("done", what)
'''


@pytest.fixture
def noisy(tmp_path):
    path = tmp_path / "noisy.py"
    path.write_text(NOISY)
    return path


class ScriptProcess(BuilderProcess):
    """A BuilderProcess whose jobs run NOISY instead of the builder (no torch imports)."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def run(self, argv, timeout=builder.BUILDER_TIMEOUT_S, *, script=None):
        return super().run(argv, timeout, script=self.script)


def real_run_builder():
    """run_builder itself, not the tests' cache of its outputs (tests/conftest.py)."""
    return inspect.unwrap(builder.run_builder)


def _needs_builder():
    if builder.builder_problem():  # what run_builder checks first
        pytest.skip(builder.builder_problem())


# -- the protocol, with a stand-in script ----------------------------------------------------


def test_writes_of_every_kind_stay_in_the_job_output(noisy):
    with BuilderProcess() as process:
        for _ in range(2):
            status, output = process.run(["ok"], 60, script=noisy)
            assert status == 0
            for line in ("python print ['ok']", '{"reply": 0}', '{"reply": "started"}',
                         "to stderr", "done ok"):
                assert line in output
        assert process.starts == 1
    assert process.pid is None


def test_exits_and_exceptions_are_failed_jobs_in_the_same_child(noisy):
    with BuilderProcess() as process:
        status, output = process.run(["exit"], 60, script=noisy)
        pid = process.pid
        assert status == 3 and "to stderr" in output
        status, output = process.run(["raise"], 60, script=noisy)
        assert status == 1 and "RuntimeError: boom" in output.splitlines()[-1]
        assert process.run(["ok"], 60, script=noisy)[0] == 0
        assert process.pid == pid and process.starts == 1


def test_a_killed_child_is_replaced(noisy):
    with BuilderProcess() as process:
        assert process.run(["ok"], 60, script=noisy)[0] == 0
        first = process.pid
        os.kill(first, signal.SIGKILL)  # between jobs
        status, output = process.run(["ok"], 60, script=noisy)
        assert status == 0 and "done ok" in output
        assert process.starts == 2 and process.pid != first


def test_a_child_that_dies_in_a_job_fails_it_and_the_next_job_gets_a_new_one(
        noisy, monkeypatch, tmp_path):
    _needs_builder()  # run_builder checks that the builder could run
    process = ScriptProcess(noisy)
    monkeypatch.setattr(builder, "_SESSION", process)
    run = real_run_builder()
    try:
        with pytest.raises(ExportError, match="model builder failed") as failed:
            run(tmp_path / "die", tmp_path / "out", dtype="fp32", device="cpu",
                cache_dir=tmp_path / "cache")
        assert "to stderr" in str(failed.value)
        assert "process ended with status 7" in str(failed.value)
        assert "done" in run(tmp_path / "ok", tmp_path / "out", dtype="fp32",
                             device="cpu", cache_dir=tmp_path / "cache")
        assert process.starts == 2
    finally:
        process.close()


def test_a_job_past_its_timeout_is_killed(noisy, monkeypatch, tmp_path):
    _needs_builder()
    process = ScriptProcess(noisy)
    with process:
        with pytest.raises(subprocess.TimeoutExpired):
            process.run(["sleep"], 1)
        assert process.pid is None
        monkeypatch.setattr(builder, "_SESSION", process)
        with pytest.raises(ExportError, match=r"ran past 1 s"):
            real_run_builder()(tmp_path / "sleep", tmp_path / "out", dtype="fp32",
                               device="cpu", cache_dir=tmp_path / "cache", timeout=1)
        assert process.run(["ok"], 60)[0] == 0
        assert process.starts == 3


def test_sessions_nest_and_end_their_child(noisy, monkeypatch):
    monkeypatch.setattr(builder, "_SESSION", None)  # outside the tests' own session
    with builder_session() as outer:
        with builder_session() as inner:
            assert inner is outer and builder._SESSION is outer
            assert outer.run(["ok"], 60, script=noisy)[0] == 0
            pid = outer.pid
        assert builder._SESSION is outer and outer.pid == pid
    assert builder._SESSION is None and outer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the builder itself ----------------------------------------------------------------------


def test_builder_jobs_share_the_session_child(hf_pair_dirs, tmp_path):
    """Two models, then a source that is not a model (a failed job with the builder's
    last lines), then a model again: all in one child."""
    _needs_builder()
    run = real_run_builder()
    with builder_session() as session:
        options = {"dtype": "fp32", "device": "cpu", "cache_dir": tmp_path / "cache"}
        run(hf_pair_dirs["target"], tmp_path / "target", **options)
        pid, starts = session.pid, session.starts
        run(hf_pair_dirs["draft"], tmp_path / "draft", **options)
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "config.json").write_text("{}")
        with pytest.raises(ExportError, match="model builder failed") as failed:
            run(tmp_path / "junk", tmp_path / "junk-out", **options)
        assert "Unrecognized model" in str(failed.value).splitlines()[-1]
        run(hf_pair_dirs["draft"], tmp_path / "draft-again", **options)
        assert session.pid == pid and session.starts == starts
    for name in ("target", "draft", "draft-again"):
        assert (tmp_path / name / "model.onnx").is_file()
        assert (tmp_path / name / "genai_config.json").is_file()


def test_without_a_session_a_job_has_a_child_of_its_own(hf_pair_dirs, tmp_path, monkeypatch):
    _needs_builder()
    monkeypatch.setattr(builder, "_SESSION", None)
    output = real_run_builder()(hf_pair_dirs["draft"], tmp_path / "draft", dtype="fp32",
                                device="cpu", cache_dir=tmp_path / "cache")
    assert (tmp_path / "draft" / "model.onnx").is_file() and output
