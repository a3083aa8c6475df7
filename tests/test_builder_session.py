"""The model builder's child process: one child serves the jobs of a builder session (its
imports paid once), a failed or killed job leaves the session usable, a job past its
timeout or interrupted is killed, the builder's own writes (Python and native) never reach
the protocol, each job sees the caller's environment, and without a session each job
still gets a child of its own."""

from __future__ import annotations

import contextvars
import inspect
import os
import signal
import subprocess
import tempfile
import threading

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
if what == "env":
    print("QUICKDRAFT_TEST_VALUE=" + os.environ.get("QUICKDRAFT_TEST_VALUE", "unset"))
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


def outside_any_session(body):
    """``body()`` in a fresh context: no builder session is open there (not even the
    tests' own, tests/conftest.py)."""
    return contextvars.Context().run(body)


class Interrupted(Exception):
    pass


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
        noisy, tmp_path):
    _needs_builder()  # run_builder checks that the builder could run
    run = real_run_builder()
    with ScriptProcess(noisy) as process, builder_session(process=process):
        with pytest.raises(ExportError, match="model builder failed") as failed:
            run(tmp_path / "die", tmp_path / "out", dtype="fp32", device="cpu",
                cache_dir=tmp_path / "cache")
        assert "to stderr" in str(failed.value)
        assert "exit status 7" in str(failed.value)
        assert "process ended with status 7" in str(failed.value)
        assert "done" in run(tmp_path / "ok", tmp_path / "out", dtype="fp32",
                             device="cpu", cache_dir=tmp_path / "cache")
        assert process.starts == 2


def test_a_child_killed_by_a_signal_in_a_job_says_which(noisy):
    with BuilderProcess() as process:
        assert process.run(["ok"], 60, script=noisy)[0] == 0  # started: the next job runs now
        pid = process.pid
        threading.Timer(1.0, os.kill, (pid, signal.SIGTERM)).start()
        status, output = process.run(["sleep"], 30, script=noisy)
        assert status == -signal.SIGTERM
        assert f"was killed by signal {int(signal.SIGTERM)}" in output
        assert process.run(["ok"], 60, script=noisy)[0] == 0 and process.starts == 2


def test_a_job_past_its_timeout_is_killed(noisy, tmp_path):
    _needs_builder()
    with ScriptProcess(noisy) as process:
        with pytest.raises(subprocess.TimeoutExpired):
            process.run(["sleep"], 1)
        assert process.pid is None
        with builder_session(process=process):
            with pytest.raises(ExportError, match=r"ran past its timeout of 1 s") as late:
                real_run_builder()(tmp_path / "sleep", tmp_path / "out", dtype="fp32",
                                   device="cpu", cache_dir=tmp_path / "cache", timeout=1)
            assert "larger timeout" in str(late.value)
        assert process.run(["ok"], 60)[0] == 0
        assert process.starts == 3


def test_an_interrupted_job_kills_its_child_and_its_folder_goes(noisy, monkeypatch, tmp_path):
    """An exception in the caller's thread during a job (here a signal's handler, as for
    Ctrl-C) ends the child: no job goes on writing once its caller gave up on it."""
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("signal handlers need the main thread: run pytest in it")

    def interrupt(signum, frame):
        raise Interrupted

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the child's folder goes
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with BuilderProcess() as process:
            assert process.run(["ok"], 60, script=noisy)[0] == 0
            pid = process.pid
            assert len(list(tmp_path.glob("quickdraft-builder-*"))) == 1
            main = threading.main_thread().ident
            threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGUSR1)).start()
            with pytest.raises(Interrupted):
                process.run(["sleep"], 30, script=noisy)
            assert process.pid is None
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert not list(tmp_path.glob("quickdraft-builder-*"))
            assert process.run(["ok"], 60, script=noisy)[0] == 0 and process.starts == 2
        assert not list(tmp_path.glob("quickdraft-builder-*"))
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_each_job_sees_the_callers_environment(noisy, monkeypatch):
    with BuilderProcess() as process:
        monkeypatch.delenv("QUICKDRAFT_TEST_VALUE", raising=False)
        assert "QUICKDRAFT_TEST_VALUE=unset" in process.run(["env"], 60, script=noisy)[1]
        monkeypatch.setenv("QUICKDRAFT_TEST_VALUE", "1")
        assert "QUICKDRAFT_TEST_VALUE=1" in process.run(["env"], 60, script=noisy)[1]
        assert process.starts == 1  # set in the child, which goes on serving
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [os.environ.get("PYTHONPATH"), os.fspath(noisy.parent)])))
        assert process.run(["ok"], 60, script=noisy)[0] == 0
        assert process.starts == 2  # read when Python starts: a new child


def test_sessions_nest_and_end_their_child(noisy):
    def body():
        with builder_session() as outer:
            with builder_session() as inner:
                assert inner is outer and builder._SESSION.get() is outer
                assert outer.run(["ok"], 60, script=noisy)[0] == 0
                pid = outer.pid
            assert builder._SESSION.get() is outer and outer.pid == pid
        assert builder._SESSION.get() is None and outer.pid is None
        return pid

    pid = outside_any_session(body)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_given_process_is_left_open(noisy):
    with BuilderProcess() as process:
        def body():
            with builder_session(process=process) as session:
                assert session is process and builder._SESSION.get() is process
                assert process.run(["ok"], 60, script=noisy)[0] == 0
            assert builder._SESSION.get() is None

        outside_any_session(body)
        assert process.pid is not None  # its owner closes it
    assert process.pid is None


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


def test_without_a_session_a_job_has_a_child_of_its_own(hf_pair_dirs, tmp_path):
    _needs_builder()

    def body():
        return real_run_builder()(hf_pair_dirs["draft"], tmp_path / "draft", dtype="fp32",
                                  device="cpu", cache_dir=tmp_path / "cache")

    output = outside_any_session(body)
    assert (tmp_path / "draft" / "model.onnx").is_file() and output
