"""The model builder's child process: one child serves the jobs of a builder session (its
imports paid once), a failed or killed job leaves the session usable, a job past its
timeout or interrupted is killed, the builder's own writes (Python and native) never reach
the protocol, each job sees the caller's environment, and without a session each job
still gets a child of its own."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import signal
import subprocess
import tempfile
import threading
import time

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
if what == "exit-1":
    sys.exit(-1)
if what == "exit0":
    os._exit(0)
if what == "raise":
    raise RuntimeError("boom")
if what == "die":
    os._exit(7)
if what == "sleep":
    if os.environ.get("QUICKDRAFT_TEST_STARTED"):  # tell the test the job runs
        open(os.environ["QUICKDRAFT_TEST_STARTED"], "w").close()
    time.sleep(60)
if what == "env":
    print("QUICKDRAFT_TEST_VALUE=" + os.environ.get("QUICKDRAFT_TEST_VALUE", "unset"))
    os.environ["QUICKDRAFT_TEST_VALUE"] = "set by the job"
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

    def run(self, argv, timeout=None, *, script=None):
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


@contextlib.contextmanager
def once_the_job_runs(monkeypatch, tmp_path, action):
    """``action()`` from another thread as soon as NOISY's sleep job has started (it marks
    a file); the thread is joined at the end, whatever happened."""
    marker = tmp_path / "started"
    monkeypatch.setenv("QUICKDRAFT_TEST_STARTED", str(marker))
    gave_up = threading.Event()

    def wait_then_act():
        deadline = time.monotonic() + 30
        while not marker.exists():
            if gave_up.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=wait_then_act)
    thread.start()
    try:
        yield
    finally:
        gave_up.set()
        thread.join()


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
        assert process.run(["exit-1"], 60, script=noisy)[0] == 255  # as Python exits
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


def test_a_child_killed_by_a_signal_in_a_job_says_which(noisy, monkeypatch, tmp_path):
    with BuilderProcess() as process:
        assert process.run(["ok"], 60, script=noisy)[0] == 0
        pid = process.pid
        with once_the_job_runs(monkeypatch, tmp_path, lambda: os.kill(pid, signal.SIGTERM)):
            status, output = process.run(["sleep"], 30, script=noisy)
        assert status == -signal.SIGTERM
        assert f"was killed by signal {int(signal.SIGTERM)} (SIGTERM)" in output
        assert process.run(["ok"], 60, script=noisy)[0] == 0 and process.starts == 2


def test_a_child_that_exits_0_in_a_job_fails_it_and_says_so(noisy):
    with BuilderProcess() as process:
        status, output = process.run(["exit0"], 60, script=noisy)
        assert status == 1 and "process ended with status 0" in output


def test_a_job_past_its_timeout_is_killed(noisy, tmp_path, monkeypatch):
    _needs_builder()
    with ScriptProcess(noisy) as process:
        with pytest.raises(subprocess.TimeoutExpired):
            process.run(["sleep"], 1)
        assert process.pid is None
        monkeypatch.setattr(builder, "BUILDER_TIMEOUT_S", 1)  # read at the call
        with builder_session(process=process):
            with pytest.raises(ExportError, match=r"ran past its timeout of 1 s") as late:
                real_run_builder()(tmp_path / "sleep", tmp_path / "out", dtype="fp32",
                                   device="cpu", cache_dir=tmp_path / "cache")
            assert "set quickdraft.export.builder.BUILDER_TIMEOUT_S higher" in str(late.value)
        monkeypatch.undo()
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
    main = threading.main_thread().ident
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with BuilderProcess() as process:
            assert process.run(["ok"], 60, script=noisy)[0] == 0
            pid = process.pid
            assert len(list(tmp_path.glob("quickdraft-builder-*"))) == 1
            with pytest.raises(Interrupted), once_the_job_runs(
                    monkeypatch, tmp_path, lambda: signal.pthread_kill(main, signal.SIGUSR1)):
                process.run(["sleep"], 30, script=noisy)
            assert process.pid is None
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert not list(tmp_path.glob("quickdraft-builder-*"))
            assert process.run(["ok"], 60, script=noisy)[0] == 0 and process.starts == 2
        assert not list(tmp_path.glob("quickdraft-builder-*"))
    finally:
        signal.signal(signal.SIGUSR1, previous)  # after the signalling thread's join


def test_close_from_another_thread_ends_a_running_job_now(noisy, monkeypatch, tmp_path):
    with BuilderProcess() as process:
        started = time.monotonic()
        with once_the_job_runs(monkeypatch, tmp_path, process.close):
            status, output = process.run(["sleep"], 30, script=noisy)
        assert time.monotonic() - started < 20  # not the job's 60 s
        assert status == -signal.SIGKILL and "(SIGKILL)" in output
        assert process.closed and process.pid is None
        with pytest.raises(RuntimeError, match="was closed"):
            process.run(["ok"], 60, script=noisy)


def test_each_job_sees_the_callers_environment(noisy, monkeypatch):
    with BuilderProcess() as process:
        monkeypatch.delenv("QUICKDRAFT_TEST_VALUE", raising=False)
        assert "QUICKDRAFT_TEST_VALUE=unset" in process.run(["env"], 60, script=noisy)[1]
        monkeypatch.setenv("QUICKDRAFT_TEST_VALUE", "1")
        assert "QUICKDRAFT_TEST_VALUE=1" in process.run(["env"], 60, script=noisy)[1]
        assert "QUICKDRAFT_TEST_VALUE=1" in process.run(["env"], 60, script=noisy)[1]
        monkeypatch.delenv("QUICKDRAFT_TEST_VALUE")  # the job's own setting is gone too
        assert "QUICKDRAFT_TEST_VALUE=unset" in process.run(["env"], 60, script=noisy)[1]
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


def test_a_closed_session_is_not_used(monkeypatch, tmp_path):
    """A context copied from inside a session (a thread from asyncio.to_thread, say) that
    runs a job after the session ended gets a child of its own, not the closed one."""
    _needs_builder()
    own = []
    monkeypatch.setattr(builder, "_run_once",
                        lambda argv, timeout: own.append(argv) or (0, "a child of its own"))

    def body():
        with builder_session() as session:
            inside = contextvars.copy_context()
        assert session.closed
        return session, inside.run(real_run_builder(), tmp_path / "src", tmp_path / "out",
                                   dtype="fp32", device="cpu", cache_dir=tmp_path / "cache")

    session, output = outside_any_session(body)
    assert output == "a child of its own" and len(own) == 1
    assert session.starts == 0 and session.pid is None


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
